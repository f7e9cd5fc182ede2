//! Time as sqlfs shows and reads it: nanoseconds since the Unix epoch, written and parsed as
//! RFC 3339 in UTC (a proleptic Gregorian calendar, no time zone database).

use anyhow::Result;

/// Formats ns since the epoch as RFC 3339 UTC with milliseconds.
pub fn fmt_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let ms = (ns / 1_000_000) % 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses RFC 3339 (`2026-11-25T10:00:00Z`, fractions and numeric offsets allowed) into ns
/// since the epoch.
pub fn parse_time(s: &str) -> Result<u64> {
    let bad = || {
        anyhow::anyhow!("{s:?} is not an RFC 3339 time (like 2026-11-25T10:00:00Z or 2026-11-25T10:00:00.250+01:00)")
    };
    let b = s.trim().as_bytes();
    if b.len() < 20 {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64> {
        std::str::from_utf8(&b[r])
            .ok()
            .filter(|t| t.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(bad)
    };
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut frac_ns: i64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        let digits = &s.trim()[start..i];
        let mut v: i64 = 0;
        for (k, c) in digits.bytes().enumerate() {
            if k < 9 {
                v = v * 10 + (c - b'0') as i64;
            }
        }
        for _ in digits.len()..9 {
            v *= 10;
        }
        frac_ns = v;
    }
    let offset_s: i64 = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let v = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if c == b'+' {
                v
            } else {
                -v
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_s;
    if secs < 0 {
        return Err(bad());
    }
    Ok(secs as u64 * 1_000_000_000 + frac_ns as u64)
}

// Civil-date conversions for the proleptic Gregorian calendar (days since 1970-01-01).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = parse_time("2026-11-25T10:00:00Z").unwrap();
        assert_eq!(fmt_time(t), "2026-11-25T10:00:00.000Z");
        let u = parse_time("2026-11-25T11:00:00.250+01:00").unwrap();
        assert_eq!(u - t, 250_000_000);
        assert_eq!(parse_time("1970-01-01T00:00:00.000000001Z").unwrap(), 1);
        assert_eq!(
            fmt_time(parse_time("2024-02-29T23:59:59.999Z").unwrap()),
            "2024-02-29T23:59:59.999Z"
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-25T10:00:00",
            "2026-11-25T10:00:00.Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
