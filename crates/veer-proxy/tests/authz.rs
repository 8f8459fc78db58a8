//! In process, on loopback: network RBAC decides inbound connections and
//! revokes open ones like intentions do; per-upstream expected SANs are
//! checked inside the handshake; an upstream's and the inbound listener's
//! connection limits.
mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer_core::authz::{Principal, RbacPolicy, RbacRules, StringMatch};
use veer_core::intentions::Action;
use veer_core::snapshot::{Spec, UpstreamSpec};
use veer_core::spiffe::ServiceId;

fn web_regex() -> Principal {
    Principal::spiffe_regex(format!("^spiffe://{TD}/ns/default/dc/[^/]+/svc/web$"))
}

fn rules(action: Action, principals: Vec<Principal>) -> RbacRules {
    RbacRules {
        action,
        policies: if principals.is_empty() {
            vec![]
        } else {
            vec![RbacPolicy {
                permissions: Vec::new(),
                name: "consul-intentions-layer4".into(),
                principals,
            }]
        },
    }
}

/// The spec the sidecar was started with (from its TOML file).
fn spec(m: &Material) -> Spec {
    veer_core::config::load(&m.dir.join("veer.toml"))
        .unwrap()
        .spec
}

/// Sends `msg` and reads it back; `None` when the connection ends first.
async fn echo<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, msg: &[u8]) -> Option<Vec<u8>> {
    s.write_all(msg).await.ok()?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Some(got),
        _ => None,
    }
}

/// A TLS connection from web to the inbound listener, and one echo on it.
async fn call(m: &Material, inbound: SocketAddr) -> Option<Vec<u8>> {
    let tcp = TcpStream::connect(inbound).await.ok()?;
    let mut tls = m.web_connector().connect(server_name(), tcp).await.ok()?;
    echo(&mut tls, b"ping").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_decides_and_revokes_like_intentions() {
    let m = Material::new();
    let app = echo_app().await;
    let (shared, l) = m.start(app, "").await;
    let denials = |r: &str| shared.metrics.get("intention_denials_total", r);

    // Intentions (default allow): served, and kept open.
    let tcp = TcpStream::connect(l.inbound).await.unwrap();
    let mut open = m.web_connector().connect(server_name(), tcp).await.unwrap();
    assert_eq!(echo(&mut open, b"hi").await.as_deref(), Some(&b"hi"[..]));

    // Consul's `rules: {}`: an ALLOW filter without policies denies all,
    // the open connection too.
    let mut s = spec(&m);
    s.rbac = Some(vec![rules(Action::Allow, vec![])]);
    shared.apply(s).unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    assert_eq!(shared.metrics.revoked.load(Ordering::Relaxed), 1);
    assert_eq!(call(&m, l.inbound).await, None);
    assert!(eventually(5, || denials("denied_no_policy") == 1).await);

    // ALLOW web by regex: served.
    let mut s = spec(&m);
    s.rbac = Some(vec![rules(Action::Allow, vec![web_regex()])]);
    shared.apply(s).unwrap();
    assert_eq!(call(&m, l.inbound).await.as_deref(), Some(&b"ping"[..]));

    // Two filters, the second denies web: every filter must allow.
    let mut s = spec(&m);
    s.rbac = Some(vec![
        rules(Action::Allow, vec![web_regex()]),
        rules(
            Action::Deny,
            vec![Principal::Authenticated {
                principal_name: Some(StringMatch::suffix("/svc/web")),
            }],
        ),
    ]);
    shared.apply(s).unwrap();
    assert_eq!(call(&m, l.inbound).await, None);
    assert!(eventually(5, || denials("denied_by_policy") == 1).await);

    // No filter at all: allowed, whatever the intentions say.
    let mut s = spec(&m);
    s.default_action = Action::Deny;
    s.rbac = Some(vec![]);
    shared.apply(s).unwrap();
    assert_eq!(call(&m, l.inbound).await.as_deref(), Some(&b"ping"[..]));
    // Back to intentions (default deny).
    let mut s = spec(&m);
    s.default_action = Action::Deny;
    shared.apply(s).unwrap();
    assert_eq!(call(&m, l.inbound).await, None);
    assert!(eventually(5, || denials("denied_by_default") == 1).await);
    let text = shared.metrics.render(&[]);
    assert!(
        text.contains("veer_intention_denials_total{reason=\"denied_no_policy\"} 1"),
        "{text}"
    );
    l.stop_all();
}

/// A local app that counts the connections it accepts and echoes.
async fn counting_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, n)
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// An explicit upstream that points at the sidecar's own inbound listener
/// (the sidecar is `api`, so its own leaf is the upstream's identity).
fn self_upstream(inbound: SocketAddr, bind: SocketAddr) -> UpstreamSpec {
    let mut u = UpstreamSpec::new(ServiceId::new(TD, "default", "default", "dc1", "api"));
    u.local_bind = Some(bind);
    u.endpoints = vec![inbound];
    u
}

async fn connect_when_bound(addr: SocketAddr) -> TcpStream {
    for _ in 0..250 {
        if let Ok(s) = TcpStream::connect(addr).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never listened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_limits_and_expected_sans() {
    let m = Material::new();
    let (app, accepted) = counting_app().await;
    let (shared, l) = m.start(app, "").await;
    let bind = free_port();

    // max_connections = 1: the second connection overflows while the first
    // is open, and is served once it closes.
    let mut s = spec(&m);
    let mut u = self_upstream(l.inbound, bind);
    u.max_connections = Some(1);
    s.upstreams = vec![u].into_iter().map(std::sync::Arc::new).collect();
    shared.apply(s).unwrap();
    let mut first = connect_when_bound(bind).await;
    assert_eq!(echo(&mut first, b"one").await.as_deref(), Some(&b"one"[..]));
    // Refused with a reset, possibly before `connect` returns.
    if let Ok(mut second) = TcpStream::connect(bind).await {
        assert_eq!(echo(&mut second, b"two").await, None);
    }
    assert!(
        eventually(5, || shared
            .metrics
            .get("outbound_failures_total", "overflow")
            == 1)
        .await
    );
    drop(first);
    let routes = shared.snapshot();
    let up = routes.routes.upstreams()[0].clone();
    assert!(eventually(5, || up.open_connections() == 0).await);
    let mut third = TcpStream::connect(bind).await.unwrap();
    assert_eq!(echo(&mut third, b"3").await.as_deref(), Some(&b"3"[..]));
    drop(third);
    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(before, 2);

    // Expected SANs that the server's leaf (api) does not match: the
    // handshake fails on veer's side, the server never authenticates veer,
    // and its app sees nothing.
    let mut s = spec(&m);
    let mut u = self_upstream(l.inbound, bind);
    u.san_matchers = vec![StringMatch::suffix("/svc/db")];
    s.upstreams = vec![u].into_iter().map(std::sync::Arc::new).collect();
    shared.apply(s).unwrap();
    if let Ok(mut c) = TcpStream::connect(bind).await {
        assert_eq!(echo(&mut c, b"x").await, None);
    }
    assert!(
        eventually(5, || shared
            .metrics
            .get("upstream_endpoint_failures_total", "server_identity")
            == 1)
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), before);

    // A matcher that fits: served.
    let mut s = spec(&m);
    let mut u = self_upstream(l.inbound, bind);
    u.san_matchers = vec![StringMatch::regex(format!(
        "spiffe://{}/ns/default/dc/[^/]+/svc/api",
        TD.replace('.', "\\.")
    ))];
    s.upstreams = vec![u].into_iter().map(std::sync::Arc::new).collect();
    shared.apply(s).unwrap();
    let mut c = TcpStream::connect(bind).await.unwrap();
    assert_eq!(echo(&mut c, b"ok").await.as_deref(), Some(&b"ok"[..]));
    l.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_connection_limit_overrides_the_listener_default() {
    let m = Material::new();
    let app = echo_app().await;
    let (shared, l) = m.start(app, "[timeouts]\nhandshake = \"30s\"\n").await;
    let mut s = spec(&m);
    s.inbound_max_connections = Some(1);
    shared.apply(s).unwrap();
    assert_eq!(shared.max_connections_of("inbound"), 1);
    assert_eq!(shared.max_connections_of("outbound"), 100_000);
    let _held = TcpStream::connect(l.inbound).await.unwrap();
    assert!(eventually(5, || shared.metrics.active() == 1).await);
    // Reset at once, possibly before `connect` returns.
    if let Ok(mut s2) = TcpStream::connect(l.inbound).await {
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(2), s2.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    }
    assert!(
        eventually(5, || shared
            .metrics
            .get("connections_overflow_total", "inbound")
            == 1)
        .await
    );
    l.stop_all();
}
