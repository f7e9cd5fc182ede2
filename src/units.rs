//! Units of the command line and the configuration file: durations (`500ms`, `5m`, `7d`),
//! sizes (`512k`, `64M`, `1G`), compaction level lists and thread counts. Values past what
//! 64 bits hold are refused, never wrapped.

use std::time::Duration;

/// Parses durations like `500ms`, `1s`, `5m`, `24h`, `7d`; `0` means "off" where allowed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("not a duration: {s:?} (examples: 500ms, 1s, 5m, 24h, 7d)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let i = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (num, unit) = s.split_at(i);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |k: u64| {
        n.checked_mul(k)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration too long: {s}"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(bad()),
    }
}

/// A sync interval: a duration that is not zero.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("the interval must be above zero: {s}")),
        d => Ok(d),
    }
}

/// A count of kernel request threads: at least one (none would answer no request).
pub fn parse_threads(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 would leave no thread to answer the kernel (at least 1)".into()),
        Ok(n) if n > 1024 => Err(format!("{n} threads is past the limit of 1024")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("not a number of threads: {s}")),
    }
}

/// Parses a replica's bound on requests in flight (1–1024).
pub fn parse_concurrency(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("0 would ship nothing (at least 1)".into()),
        Ok(n) if n > 1024 => Err(format!("{n} requests in flight is past the limit of 1024")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("not a number of requests: {s}")),
    }
}

/// Parses sizes like `512k`, `64M`, `1G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n = num
        .parse::<u64>()
        .map_err(|_| format!("not a size: {s} (examples: 512k, 64M, 1G)"))?;
    // A size past what 64 bits hold is refused, never wrapped: a wrapped limit would be
    // silently small (or zero).
    n.checked_mul(mult)
        .ok_or_else(|| format!("size too large: {s} (at most {} bytes)", u64::MAX))
}

/// Compaction intervals of levels 1, 2, … as one command-line value.
#[derive(Clone, Debug)]
pub struct Levels(pub Vec<Duration>);

/// Parses a comma-separated list of level intervals (`30s,5m,1h`; `none` for no compaction).
pub fn parse_levels(s: &str) -> Result<Levels, String> {
    if s.trim() == "none" || s.trim().is_empty() {
        return Ok(Levels(Vec::new()));
    }
    s.split(',')
        .map(parse_duration)
        .collect::<Result<_, _>>()
        .map(Levels)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes and durations past 64 bits are refused, never wrapped into small values.
    #[test]
    fn units_refuse_overflow() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("17179869183G"), Ok(17179869183 << 30));
        for bad in [
            "17179869184G",
            "17179869185G",
            "18446744073709551616",
            "G",
            "",
            "-1k",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("307445734561825861m").is_err());
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }
}
