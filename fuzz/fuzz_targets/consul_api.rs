//! The Consul agent API response parsers of `veer_consul::api` on arbitrary
//! bodies: what a broken, newer or hostile agent (or a proxy in front of it)
//! could answer.
//!
//! The first byte picks the endpoint, the rest is the body (seeds are the
//! real Consul 1.8.7 answers recorded in `crates/veer-consul/tests/fixtures`,
//! each behind its selector byte).
//!
//! Invariants:
//! - no parser panics;
//! - every `Err` has a non-empty message and one of the documented metric
//!   labels, and is never "fatal at start" unless it is `NotAProxy` (a body
//!   cannot turn into a configuration or permission problem; only the HTTP
//!   status of the `mesh` answer, 403, may say "permission denied");
//! - `parse_intentions_match(svc, {svc: X})` agrees with
//!   `parse_intentions(X)` for any JSON value X (same intentions, same
//!   warnings, both fail or neither does);
//! - on `Ok`: roots are non-empty with one ID per certificate; a connect
//!   instance's endpoint is its IP and port, and only when both are usable;
//!   catalog instances come out sorted by ID; `sidecars_for` is sorted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veer_consul::api;
use veer_consul::Error;

const LABELS: &[&str] = &[
    "config",
    "tls",
    "connect",
    "transport",
    "timeout",
    "permission_denied",
    "not_found",
    "http_4xx",
    "http_5xx",
    "decode",
    "proxy_not_found",
    "not_a_proxy",
    "no_sidecar",
    "ambiguous_sidecar",
    "incomplete",
];

fn check_err(e: &Error, status: u16) {
    assert!(!e.to_string().trim().is_empty(), "empty message: {e:?}");
    assert!(LABELS.contains(&e.classify()), "label {}", e.classify());
    let allowed = match e {
        Error::NotAProxy { .. } => true,
        Error::PermissionDenied { .. } => status == 403,
        _ => false,
    };
    assert!(
        !e.is_fatal_at_start() || allowed,
        "a body made a fatal error (status {status}): {e:?}"
    );
}

fn check<T>(r: Result<T, Error>, ok: impl FnOnce(T)) {
    check_status(200, r, ok)
}

fn check_status<T>(status: u16, r: Result<T, Error>, ok: impl FnOnce(T)) {
    match r {
        Ok(v) => ok(v),
        Err(e) => check_err(&e, status),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match sel % 14 {
        0 => check(api::parse_registration("web-sidecar-proxy", body), |_| {}),
        1 => check(api::sidecars_for("web", body), |ids| {
            assert!(ids.windows(2).all(|w| w[0] <= w[1]), "{ids:?}");
        }),
        2 => check(api::parse_roots(body), |r| {
            assert!(!r.certs.is_empty());
            assert_eq!(r.ids.len(), r.certs.len());
            assert!(!r.trust_domain.is_empty());
        }),
        3 => check(api::parse_leaf("web", body), |l| {
            assert!(!l.chain.is_empty());
        }),
        4 => {
            // The same list behind the service's name, as /match answers.
            // Both go through serde_json::Value (which keeps the last of
            // duplicate keys, where a struct refuses them).
            if let Ok(list) = serde_json::from_slice::<serde_json::Value>(body) {
                let plain = api::parse_intentions(&serde_json::to_vec(&list).unwrap());
                let wrapped = serde_json::to_vec(&serde_json::json!({ "web": list })).unwrap();
                let matched = api::parse_intentions_match("web", &wrapped);
                match (&plain, &matched) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b),
                    (Err(_), Err(_)) => {}
                    _ => panic!("/match and the list disagree: {plain:?} vs {matched:?}"),
                }
            }
            check(api::parse_intentions(body), |_| {});
        }
        5 => check(api::parse_intentions_match("web", body), |_| {}),
        6 => check(api::parse_authorize(body), |_| {}),
        7 => check(api::default_from_agent_self(body), |_| {}),
        8 => check(api::parse_catalog_services(body), |_| {}),
        9 => check(api::parse_health_connect("db", body), |(list, _)| {
            for i in &list {
                match i.endpoint() {
                    Some(a) => {
                        assert_eq!(Some(a.ip()), i.ip);
                        assert_eq!(a.port(), i.port);
                        assert_ne!(i.port, 0);
                    }
                    None => assert!(i.ip.is_none() || i.port == 0, "{i:?}"),
                }
            }
        }),
        10 => check(api::parse_catalog_service("db", body), |list| {
            assert!(list.windows(2).all(|w| w[0].id <= w[1].id));
        }),
        11 => check(api::parse_service_defaults(body), |_| {}),
        12 => check(api::parse_proxy_defaults(body), |_| {}),
        _ => {
            // The status comes from the body's first byte too.
            let status = match body.first().map(|b| b % 4) {
                Some(0) => 200,
                Some(1) => 404,
                Some(2) => 500,
                _ => 403,
            };
            let r = api::parse_mesh(status, body.get(1..).unwrap_or(&[]));
            check_status(status, r, |_| {});
        }
    }
});
