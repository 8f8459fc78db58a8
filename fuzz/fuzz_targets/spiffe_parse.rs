//! `ServiceId::parse` on arbitrary UTF-8.
//!
//! Invariants:
//! - never panics (nor does `Display`, `sni()` or `SpiffeError::classify`);
//! - on `Ok(id)`: `id.to_string()` is the input again and parses back to an
//!   equal `id`; every field is a non-empty segment without `/`, and the
//!   SNI is built from exactly those fields;
//! - on `Err(e)`: the error names a non-empty metric label and message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veer_core::spiffe::ServiceId;

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match ServiceId::parse(s) {
        Ok(id) => {
            let shown = id.to_string();
            assert_eq!(
                shown, s,
                "Display does not round-trip: parsed {id:?}, shown as {shown:?}"
            );
            let again = ServiceId::parse(&shown)
                .unwrap_or_else(|e| panic!("{shown:?} (Display of {id:?}) does not parse: {e}"));
            assert_eq!(again, id, "re-parse of {shown:?} differs");
            assert_eq!(again.to_string(), shown);

            assert!(!id.trust_domain.is_empty());
            assert!(id.trust_domain.bytes().all(|b| b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'-' | b'_')));
            for f in [&id.partition, &id.namespace, &id.datacenter, &id.service] {
                assert!(segment_ok(f), "bad field {f:?} in {id:?}");
            }

            let sni = id.sni();
            let want = if id.partition == "default" {
                format!(
                    "{}.{}.{}.internal.{}",
                    id.service, id.namespace, id.datacenter, id.trust_domain
                )
            } else {
                format!(
                    "{}.{}.{}.{}.internal-v1.{}",
                    id.service, id.namespace, id.partition, id.datacenter, id.trust_domain
                )
            };
            assert_eq!(sni, want);
            assert!(id.same_service(&again));
        }
        Err(e) => {
            assert!(!e.classify().is_empty());
            assert!(!e.to_string().is_empty());
            // Errors quote at most 256 characters of the input.
            let _ = format!("{e:?}");
        }
    }
});
