//! The report; it measures no row itself. One [`Row`] per figure (a throughput pair, a
//! latency pair, or text measured on sqlfs only), numbers with thousands separators, and the
//! markdown [`table`] that main prints and writes to target/bench-results.md.

use std::process::Command;

pub struct Row {
    pub name: String,
    pub native: String,
    pub sqlfs: String,
    pub ratio: String,
    /// The Litestream column (compare.rs); `None` on every row leaves the column out.
    pub other: Option<String>,
}

impl Row {
    /// A throughput row: both sides measured, ratio = sqlfs / native.
    pub fn pair(name: String, native: f64, sqlfs: f64, digits: usize) -> Row {
        Row {
            name,
            native: fmt_num(native, digits),
            sqlfs: fmt_num(sqlfs, digits),
            ratio: if native > 0.0 {
                format!("{:.2}", sqlfs / native)
            } else {
                "–".into()
            },
            other: None,
        }
    }

    /// A latency row (ms): both sides measured, ratio = native / sqlfs, so that higher is
    /// still better.
    pub fn time(name: String, native_ms: f64, sqlfs_ms: f64) -> Row {
        Row {
            name,
            native: fmt_num(native_ms, 2),
            sqlfs: fmt_num(sqlfs_ms, 2),
            ratio: if sqlfs_ms > 0.0 {
                format!("{:.2}", native_ms / sqlfs_ms)
            } else {
                "–".into()
            },
            other: None,
        }
    }

    /// A floor row under a sqlfs row: the same workload through a bare pass-through FUSE
    /// server (floor.rs) in the sqlfs column, ratio = floor / native, and beside it sqlfs's
    /// share of the floor (sqlfs / floor), all three measured in one set of rounds.
    pub fn floor(name: String, native: f64, floor: f64, sqlfs: f64, digits: usize) -> Row {
        Row {
            name,
            native: fmt_num(native, digits),
            sqlfs: fmt_num(floor, digits),
            ratio: if native > 0.0 && floor > 0.0 {
                format!("{:.2} (sqlfs: {:.2} of it)", floor / native, sqlfs / floor)
            } else {
                "–".into()
            },
            other: None,
        }
    }

    /// A row measured on sqlfs only.
    pub fn text(name: &str, sqlfs: String) -> Row {
        Row {
            name: name.to_string(),
            native: "–".into(),
            sqlfs,
            ratio: "–".into(),
            other: None,
        }
    }
}

pub fn fmt_num(v: f64, digits: usize) -> String {
    let s = format!("{v:.digits$}");
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i.to_string(), Some(f.to_string())),
        None => (s.clone(), None),
    };
    let (sign, int) = match int.strip_prefix('-') {
        Some(i) => ("-", i),
        None => ("", int.as_str()),
    };
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

pub fn table(rows: &[Row]) -> String {
    let other = rows.iter().any(|r| r.other.is_some());
    let mut out = String::from("| workload | native | sqlfs | ratio |");
    if other {
        out += " Litestream (ratio to native) |";
    }
    out += "\n| --- | ---: | ---: | ---: |";
    if other {
        out += " ---: |";
    }
    out += "\n";
    for r in rows {
        out += &format!("| {} | {} | {} | {} |", r.name, r.native, r.sqlfs, r.ratio);
        if other {
            out += &format!(" {} |", r.other.as_deref().unwrap_or(""));
        }
        out += "\n";
    }
    out
}

pub fn command_output(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
