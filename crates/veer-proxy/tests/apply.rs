//! `Shared::apply` (issue 15): a snapshot whose new listener cannot bind is
//! refused and the old one stays; listen addresses stay in force and a
//! change is named as waiting for a restart, once.
mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;
use veer_core::snapshot::SnapshotError;

fn spec(m: &common::Material, extra: &str) -> veer_core::snapshot::Spec {
    let path = m.dir.join("next.toml");
    std::fs::write(&path, m.config("127.0.0.1:9".parse().unwrap(), extra)).unwrap();
    veer_core::config::load(&path).unwrap().spec
}

fn upstream(port: u16) -> String {
    format!(
        "[[upstreams]]\nname = \"ledger\"\nlocal_bind = \"127.0.0.1:{port}\"\nendpoints = [\"127.0.0.1:9\"]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_bind_refuses_the_snapshot() {
    let m = common::Material::new();
    let (shared, listeners) = m.start("127.0.0.1:9".parse().unwrap(), "").await;
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();

    let e = shared.apply(spec(&m, &upstream(port))).unwrap_err();
    assert!(matches!(e, SnapshotError::Listener { .. }), "{e}");
    assert_eq!(e.classify(), "listener_bind");
    assert!(
        e.to_string().starts_with(&format!(
            "upstream \"ledger\" local_bind: cannot listen on 127.0.0.1:{port}"
        )),
        "{e}"
    );
    assert_eq!(shared.snapshot().version, 1);
    assert!(shared.snapshot().routes.upstreams().is_empty());
    assert_eq!(
        shared
            .metrics
            .snapshot_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Free: applied, and the listener is up as soon as apply returns.
    drop(taken);
    let s = shared.apply(spec(&m, &upstream(port))).unwrap();
    assert_eq!(s.routes.upstreams().len(), 1);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // Served: accepted (then reset, as its endpoint refuses), never refused.
    let refused = |a: &SocketAddr| {
        matches!(TcpStream::connect_timeout(a, Duration::from_secs(1)),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(!refused(&addr));

    // Removed: the listener closes.
    shared.apply(spec(&m, "")).unwrap();
    let mut closed = false;
    for _ in 0..100 {
        if refused(&addr) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(closed, "the listener of a removed upstream should close");
    listeners.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_stay_in_force_and_a_change_is_named_once() {
    let m = common::Material::new();
    let (shared, listeners) = m.start("127.0.0.1:9".parse().unwrap(), "").await;
    let before = shared.snapshot().listen.clone();
    let mut next = spec(&m, "");
    next.listen.inbound = "127.0.0.1:1".parse().unwrap();
    let s = shared.apply(next.clone()).unwrap();
    assert_eq!(s.listen, before);
    assert_eq!(s.unapplied.len(), 1, "{:?}", s.unapplied);
    assert_eq!(s.unapplied[0].kind, "needs_restart");
    assert_eq!(s.unapplied[0].setting, "inbound listener address");
    assert!(s.unapplied[0].detail.contains("127.0.0.1:1 asked"));
    let dump = s.dump();
    assert_eq!(dump["unapplied"][0]["kind"], "needs_restart");
    // The same change again: no second warning, no second count.
    shared.apply(next).unwrap();
    assert_eq!(
        shared
            .metrics
            .get("unapplied_settings_total", "needs_restart"),
        1
    );
    listeners.stop_all();
}
