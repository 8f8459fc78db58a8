//! Durations in configuration files: `"5s"`, `"250ms"`, `"1h"`, `"1m30s"`.
use std::time::Duration;

/// The longest duration accepted (ten years): large enough for any timeout,
/// small enough that arithmetic on it never overflows.
pub const MAX: Duration = Duration::from_secs(10 * 365 * 86400);

/// Parses a duration such as `5s`, `250ms`, `1h`, `1m30s`, `0`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "bad duration {s:?}: expected a number, e.g. \"5s\""
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("bad duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let ms_per: u64 = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(format!("bad duration {s:?}: missing unit (ms, s, m, h)")),
            u => {
                return Err(format!(
                    "bad duration {s:?}: unknown unit {u:?} (ms, s, m, h)"
                ))
            }
        };
        let too_large = || format!("bad duration {s:?}: longer than ten years");
        let d = n
            .checked_mul(ms_per)
            .map(Duration::from_millis)
            .ok_or_else(too_large)?;
        total = total
            .checked_add(d)
            .filter(|t| *t <= MAX)
            .ok_or_else(too_large)?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert!(parse("5").unwrap_err().contains("missing unit"));
        assert!(parse("5d").unwrap_err().contains("unknown unit"));
        assert!(parse("s").is_err());
        assert_eq!(format(Duration::from_secs(3600)), "1h");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }

    /// Found by fuzzing: huge numbers overflowed (a panic in debug builds).
    #[test]
    fn overflow_is_an_error_and_format_parses_back() {
        for s in [
            "18446744073709551615s1s",
            "307445734561825861m",
            "18446744073709552s1ms",
            "87601h",
        ] {
            assert!(parse(s).unwrap_err().contains("ten years"), "{s}");
        }
        assert_eq!(parse("87600h").unwrap(), MAX);
        for d in [MAX, Duration::from_millis(1), Duration::from_secs(90)] {
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }
}
