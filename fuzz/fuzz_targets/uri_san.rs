//! Peer-identity extraction on arbitrary DER bytes: `tls::uri_sans`,
//! `tls::peer_identity` and `tls::CertInfo::parse`.
//!
//! Invariants:
//! - none of them panics, whatever the bytes;
//! - they agree with each other: `peer_identity` is `Ok` exactly when
//!   `uri_sans` gives one URI that `ServiceId::parse` accepts (and then it
//!   is that identity); `NoUriSan` / `MultipleUriSans(n)` match the count;
//!   `CertInfo::parse`, when `Ok`, carries the same URI SANs;
//! - every error has a non-empty message and metric label.
//!
//! Seeds (`seeds/uri_san/`) are real certificates from `veer_ca`, with odd
//! SANs; regenerate them with `fuzz/seedgen` (see README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use veer_core::spiffe::ServiceId;
use veer_core::tls::{self, CertInfo, IdentityError};

fuzz_target!(|data: &[u8]| {
    let sans = tls::uri_sans(data);
    let id = tls::peer_identity(data);
    let info = CertInfo::parse(data);

    for e in [sans.as_ref().err(), id.as_ref().err(), info.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert!(!e.to_string().is_empty());
        assert!(!e.classify().is_empty());
    }

    match &sans {
        Err(e) => {
            assert!(matches!(e, IdentityError::BadCertificate(_)), "{e:?}");
            assert_eq!(id.as_ref().err(), Some(e), "peer_identity vs uri_sans");
            assert!(
                info.is_err(),
                "CertInfo parsed a certificate uri_sans refused"
            );
        }
        Ok(uris) => {
            match (uris.len(), &id) {
                (0, Err(IdentityError::NoUriSan)) => {}
                (1, Ok(got)) => {
                    assert_eq!(ServiceId::parse(&uris[0]).as_ref(), Ok(got));
                    let _ = got.sni();
                    let _ = got.to_string();
                }
                (1, Err(IdentityError::Spiffe(e))) => {
                    assert_eq!(ServiceId::parse(&uris[0]).as_ref(), Err(e));
                }
                (n, Err(IdentityError::MultipleUriSans(m))) if n > 1 => assert_eq!(n, *m),
                (n, other) => panic!("{n} URI SANs {uris:?} but peer_identity gave {other:?}"),
            }
            // CertInfo may fail where uri_sans did not only if it is the
            // certificate itself that x509-parser refuses; both parse the
            // same bytes the same way, so it must succeed.
            match &info {
                Ok(ci) => {
                    assert_eq!(&ci.uri_sans, uris);
                    let _ = format!("{ci:?}");
                }
                Err(e) => panic!("uri_sans accepted the certificate, CertInfo did not: {e}"),
            }
        }
    }
});
