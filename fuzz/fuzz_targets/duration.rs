//! `duration::parse` and `duration::format`, the durations of the
//! configuration file (`[timeouts]`, `upstreams[].connect_timeout`) and of
//! the command line.
//!
//! `config_parse` reaches these only behind a complete, valid `[service]`
//! and `[tls]`; this target hits them directly.
//!
//! Invariants:
//! - `parse` never panics; every `Err` has a non-empty message;
//! - it agrees with a model that adds the components up in u128
//!   milliseconds: a string is well-formed when every component is
//!   `<u64 digits>` followed by `ms`, `s`, `m` or `h` (or the whole string
//!   is `0`). Well-formed with a total up to `MUST_ACCEPT_MS` (ten years) ⇒
//!   `Ok(total)`; a larger total ⇒ `Ok(total)` or an error (a cap is
//!   allowed, a panic or a wrong value is not); not well-formed ⇒ `Err`;
//! - `format(d)` parses back to `d`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use veer_core::duration::{format, parse};

/// The total in milliseconds, or `None` if the string is refused.
fn model(s: &str) -> Option<u128> {
    let s = s.trim();
    if s == "0" {
        return Some(0);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(|b| !b.is_ascii_digit()).count();
        let ms_per_unit: u128 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += u128::from(n) * ms_per_unit;
    }
    Some(total)
}

/// The longest `Duration`, in whole milliseconds.
const MAX_MS: u128 = (u64::MAX as u128) * 1000 + 999;

/// Totals up to this (ten years of 365 days, in milliseconds) must be
/// accepted; above it `parse` may refuse.
const MUST_ACCEPT_MS: u128 = 10 * 365 * 86_400 * 1000;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let want = model(s);
    let got = parse(s);
    match (&got, want) {
        (Ok(d), Some(ms)) => {
            assert!(
                ms <= MAX_MS,
                "{s:?}: {ms} ms does not fit a Duration, parse gave {d:?}"
            );
            assert_eq!(d.as_millis(), ms, "{s:?}: parse gave {d:?}");
            assert_eq!(d.subsec_nanos() % 1_000_000, 0);
            let shown = format(*d);
            assert_eq!(parse(&shown), Ok(*d), "{s:?} = {d:?} formats as {shown:?}");
        }
        (Err(m), None) => assert!(!m.is_empty()),
        (Err(m), Some(ms)) => {
            assert!(!m.is_empty());
            assert!(ms > MUST_ACCEPT_MS, "{s:?} ({ms} ms) refused: {m}");
        }
        (Ok(d), None) => panic!("{s:?} accepted as {d:?}, the model refuses it"),
    }
    let _ = format(Duration::from_millis(data.len() as u64));
});
