//! In process, on loopback: veer <-> veer multiplexing between a `web`
//! sidecar (outbound, explicit upstream listener) and an `api` sidecar
//! (inbound): many app connections share one mTLS connection, intentions
//! decide and revoke each stream, a peer without multiplexing gets one TLS
//! connection per app connection, a dead connection is replaced by a new
//! dial, an idle one expires, new TLS material drains the old connection,
//! a bulk stream does not starve a small one, and streams to an L7 inbound
//! are served by the L7 engine (per-request authorization, XFCC).
mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use veer_proxy::accept::Listeners;
use veer_proxy::metrics::Direction;
use veer_proxy::state::Shared;

/// A local app that echoes each connection until EOF and counts them.
async fn counting_echo_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, n)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// web's configuration: an explicit upstream `api` on `bind` whose
/// endpoint is `endpoint`, `extra` appended.
fn web_config(endpoint: SocketAddr, bind: u16, extra: &str) -> String {
    format!(
        r#"[service]
name = "web"
datacenter = "dc1"
trust_domain = "{TD}"

[tls]
ca_file = "roots.pem"
cert_file = "web.pem"
key_file = "web-key.pem"

[inbound]
bind = "127.0.0.1:0"
local_app = "127.0.0.1:9"

[outbound]
bind = "127.0.0.1:0"
bind_ipv6 = ""

[admin]
bind = ""

[intentions]
default_action = "allow"

[[upstreams]]
name = "api"
local_bind = "127.0.0.1:{bind}"
endpoints = ["{endpoint}"]
{extra}
"#
    )
}

struct Pair {
    m: Material,
    api: Arc<Shared>,
    _api_l: Listeners,
    web: Arc<Shared>,
    _web_l: Listeners,
    /// web's explicit listener for api.
    front: SocketAddr,
    app_conns: Arc<AtomicUsize>,
}

/// api (inbound, `api_extra` in its TOML) and web (outbound to api's
/// inbound listener, or to `via` when given: a stand-in between them).
async fn pair_with(api_extra: &str, web_extra: &str, via: Option<SocketAddr>) -> Pair {
    let (app, app_conns) = counting_echo_app().await;
    pair_to(app, app_conns, api_extra, web_extra, via).await
}

/// [`pair_with`] with api's local app at `app`.
async fn pair_to(
    app: SocketAddr,
    app_conns: Arc<AtomicUsize>,
    api_extra: &str,
    web_extra: &str,
    via: Option<SocketAddr>,
) -> Pair {
    let m = Material::new();
    let (api, api_l) = m.start(app, api_extra).await;
    let port = free_port();
    let path = m.dir.join("web.toml");
    let endpoint = via.unwrap_or(api_l.inbound);
    std::fs::write(&path, web_config(endpoint, port, web_extra)).unwrap();
    let loaded = veer_core::config::load(&path).unwrap();
    let web = Shared::new(loaded.spec).unwrap();
    let web_l = Listeners::start(web.clone()).await.unwrap();
    Pair {
        m,
        api,
        _api_l: api_l,
        web,
        _web_l: web_l,
        front: format!("127.0.0.1:{port}").parse().unwrap(),
        app_conns,
    }
}

async fn pair() -> Pair {
    pair_with("", "", None).await
}

/// Sends `msg` and reads it back; `None` when the connection ends first.
async fn echo(s: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
    s.write_all(msg).await.ok()?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Some(got),
        _ => None,
    }
}

/// One app connection through web: `msg` echoed, then closed.
async fn call(front: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(front).await.ok()?;
    echo(&mut s, msg).await
}

/// TLS handshakes api's inbound listener completed.
fn api_handshakes(api: &Shared) -> u64 {
    let d = api.metrics.d(Direction::Inbound);
    d.tls_full.load(Relaxed) + d.tls_resumed.load(Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_app_connections_ride_one_tls_connection() {
    let p = pair().await;
    let mut calls = Vec::new();
    for i in 0..60u32 {
        let front = p.front;
        calls.push(tokio::spawn(async move {
            let msg = format!("call {i} {}", "x".repeat(i as usize * 100));
            call(front, msg.as_bytes()).await == Some(msg.into_bytes())
        }));
    }
    for c in calls {
        assert!(c.await.unwrap(), "every call echoed byte-identical");
    }
    assert_eq!(
        api_handshakes(&p.api),
        1,
        "one TLS connection for 60 app connections"
    );
    let (api_mux, web_mux) = (
        p.api.metrics.mux(Direction::Inbound),
        p.web.metrics.mux(Direction::Outbound),
    );
    assert_eq!(api_mux.conns_opened.load(Relaxed), 1);
    assert_eq!(web_mux.conns_opened.load(Relaxed), 1);
    assert_eq!(web_mux.streams_opened.load(Relaxed), 60);
    assert_eq!(p.app_conns.load(Relaxed), 60);
    assert!(
        eventually(5, || api_mux.streams_closed.load(Relaxed) == 60).await,
        "api closed every stream"
    );
    assert_eq!(api_mux.streams_opened.load(Relaxed), 60);
    let text = p.api.metrics.render(&[]);
    assert!(
        text.contains("veer_mux_streams_opened_total{direction=\"inbound\"} 60"),
        "{text}"
    );
    assert!(
        text.contains("veer_mux_connections_active{direction=\"inbound\"} 1"),
        "{text}"
    );
    // The connection stays pooled for the next app connection.
    assert_eq!(p.web.mux.pooled(), 1);
    assert_eq!(
        call(p.front, b"again").await.as_deref(),
        Some(&b"again"[..])
    );
    assert_eq!(api_handshakes(&p.api), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_off_in_the_config_means_one_tls_connection_per_app_connection() {
    let p = pair_with("", "[mux]\nenabled = false\n", None).await;
    for i in 0..5 {
        let msg = format!("plain {i}");
        assert_eq!(call(p.front, msg.as_bytes()).await, Some(msg.into_bytes()));
    }
    assert_eq!(api_handshakes(&p.api), 5);
    assert_eq!(
        p.api
            .metrics
            .mux(Direction::Inbound)
            .conns_opened
            .load(Relaxed),
        0
    );
    assert_eq!(
        p.web
            .metrics
            .mux(Direction::Outbound)
            .fallbacks
            .load(Relaxed),
        0
    );
}

/// A peer that does not select the ALPN protocol (as Envoy does not):
/// each app connection gets its own TLS connection, and concurrent ones
/// are not serialized behind a dial lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_mux_gets_one_tls_connection_per_app_connection() {
    let p = pair_with("[mux]\nenabled = false\n", "", None).await;
    let mut calls = Vec::new();
    for i in 0..8 {
        let front = p.front;
        calls.push(tokio::spawn(async move {
            let msg = format!("fallback {i}");
            call(front, msg.as_bytes()).await == Some(msg.into_bytes())
        }));
    }
    for c in calls {
        assert!(c.await.unwrap());
    }
    assert_eq!(api_handshakes(&p.api), 8);
    let web_mux = p.web.metrics.mux(Direction::Outbound);
    assert_eq!(web_mux.fallbacks.load(Relaxed), 8);
    assert_eq!(web_mux.conns_opened.load(Relaxed), 0);
    assert_eq!(p.web.mux.pooled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intentions_decide_each_stream_and_revocation_resets_open_ones() {
    let p = pair().await;
    let mut open = TcpStream::connect(p.front).await.unwrap();
    assert_eq!(echo(&mut open, b"1").await.as_deref(), Some(&b"1"[..]));
    // Deny web: the open stream is reset, the connection stays.
    let mut spec = veer_core::config::load(&p.m.dir.join("veer.toml"))
        .unwrap()
        .spec;
    spec.default_action = veer_core::intentions::Action::Deny;
    p.api.apply(spec.clone()).unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), open.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the open stream was closed");
    assert_eq!(p.api.metrics.revoked.load(Relaxed), 1);
    // A new app connection is refused per stream: the local app never sees it.
    assert_eq!(call(p.front, b"2").await, None);
    assert_eq!(p.app_conns.load(Relaxed), 1);
    assert_eq!(
        p.api
            .metrics
            .get("intention_denials_total", "denied_by_default"),
        1
    );
    assert!(
        eventually(3, || p
            .web
            .metrics
            .get("outbound_failures_total", "peer_denied")
            == 1)
        .await,
        "web counts the refusal"
    );
    assert_eq!(api_handshakes(&p.api), 1, "denied on the same connection");
    // Allowed again: the same connection carries it.
    spec.default_action = veer_core::intentions::Action::Allow;
    p.api.apply(spec).unwrap();
    assert_eq!(call(p.front, b"3").await.as_deref(), Some(&b"3"[..]));
    assert_eq!(api_handshakes(&p.api), 1);
    assert_eq!(p.app_conns.load(Relaxed), 2);
}

/// A TCP stand-in between web and api whose connections can all be cut
/// at once (the endpoint "dies"); counts the connections it accepted.
async fn cuttable_proxy(
    to: SocketAddr,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::watch::Sender<u32>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let (cut, cut_rx) = tokio::sync::watch::channel(0u32);
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            count.fetch_add(1, Relaxed);
            let mut cut = cut_rx.clone();
            cut.mark_unchanged();
            tokio::spawn(async move {
                let Ok(mut b) = TcpStream::connect(to).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = cut.changed() => {
                        let _ = socket2::SockRef::from(&a).set_linger(Some(Duration::ZERO));
                    }
                }
            });
        }
    });
    (addr, n, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_connection_is_replaced_by_a_new_dial() {
    let m = Material::new();
    let (app, _) = counting_echo_app().await;
    let (api, api_l) = m.start(app, "").await;
    let (via, dials, cut) = cuttable_proxy(api_l.inbound).await;
    let port = free_port();
    let path = m.dir.join("web.toml");
    std::fs::write(&path, web_config(via, port, "")).unwrap();
    let web = Shared::new(veer_core::config::load(&path).unwrap().spec).unwrap();
    let _web_l = Listeners::start(web.clone()).await.unwrap();
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(
        call(front, b"before").await.as_deref(),
        Some(&b"before"[..])
    );
    assert_eq!(dials.load(Relaxed), 1);
    // The endpoint's connection dies (reset).
    cut.send_replace(1);
    let web_mux = web.metrics.mux(Direction::Outbound);
    assert!(
        eventually(3, || web_mux.conns_closed.load(Relaxed) == 1).await,
        "the dead connection left the pool"
    );
    assert_eq!(web.mux.pooled(), 0);
    assert_eq!(call(front, b"after").await.as_deref(), Some(&b"after"[..]));
    assert_eq!(dials.load(Relaxed), 2, "a new dial");
    assert_eq!(web_mux.conns_opened.load(Relaxed), 2);
    drop(api);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_expires_and_the_next_app_connection_dials_again() {
    let p = pair().await;
    p.web.mux.set_idle_expiry(Duration::from_millis(200));
    assert_eq!(call(p.front, b"a").await.as_deref(), Some(&b"a"[..]));
    let web_mux = p.web.metrics.mux(Direction::Outbound);
    assert!(
        eventually(3, || web_mux.conns_closed.load(Relaxed) == 1).await,
        "idle connection closed"
    );
    let api_mux = p.api.metrics.mux(Direction::Inbound);
    assert!(
        eventually(3, || api_mux.conns_closed.load(Relaxed) == 1).await,
        "api saw it close"
    );
    assert_eq!(p.web.mux.pooled(), 0);
    assert_eq!(call(p.front, b"b").await.as_deref(), Some(&b"b"[..]));
    assert_eq!(web_mux.conns_opened.load(Relaxed), 2);
}

/// api's leaf is replaced: an open stream goes on, a new app connection is
/// refused on the old connection and retried on a new one (a new
/// handshake under the new leaf).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tls_material_drains_the_old_connection() {
    let p = pair().await;
    let mut open = TcpStream::connect(p.front).await.unwrap();
    assert_eq!(echo(&mut open, b"old").await.as_deref(), Some(&b"old"[..]));
    let leaf = p.m.ca.service_leaf("dc1", "api").unwrap();
    let mut spec = veer_core::config::load(&p.m.dir.join("veer.toml"))
        .unwrap()
        .spec;
    spec.chain = veer_core::tls::parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap();
    spec.key = veer_core::tls::parse_key(leaf.key_pem.as_bytes(), "key").unwrap();
    p.api.apply(spec).unwrap();
    assert_eq!(call(p.front, b"new").await.as_deref(), Some(&b"new"[..]));
    assert_eq!(api_handshakes(&p.api), 2);
    assert_eq!(
        p.api
            .metrics
            .mux(Direction::Inbound)
            .streams_refused
            .load(Relaxed),
        1
    );
    assert_eq!(
        p.web
            .metrics
            .mux(Direction::Outbound)
            .streams_refused
            .load(Relaxed),
        1
    );
    // The stream opened before the change goes on.
    assert_eq!(
        echo(&mut open, b"still").await.as_deref(),
        Some(&b"still"[..])
    );
}

/// While one stream moves bulk data both ways, a small request on another
/// stream of the same connection is answered promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_does_not_starve_a_small_one() {
    let p = pair().await;
    // Warm the pool so both share one connection.
    assert_eq!(call(p.front, b"w").await.as_deref(), Some(&b"w"[..]));
    let mut bulk = TcpStream::connect(p.front).await.unwrap();
    let total = 256usize << 20;
    let (mut r, mut w) = bulk.split();
    let started = Instant::now();
    let mut small = TcpStream::connect(p.front).await.unwrap();
    let mut worst = Duration::ZERO;
    let mut pings = 0;
    let send = async {
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    };
    let probe = async {
        // Pings while the bulk transfer is under way.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..20u8 {
            let t = Instant::now();
            assert_eq!(echo(&mut small, &[i]).await, Some(vec![i]));
            worst = worst.max(t.elapsed());
            pings += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let ((), got, ()) = tokio::join!(send, recv, probe);
    assert_eq!(got, total);
    let took = started.elapsed();
    assert_eq!(pings, 20);
    assert_eq!(api_handshakes(&p.api), 1, "all on one connection");
    assert!(
        worst < Duration::from_millis(250),
        "worst ping {worst:?} during a bulk transfer of {} MiB in {took:?}",
        total >> 20
    );
    eprintln!(
        "bulk {} MiB both ways in {took:?}; worst ping {worst:?}",
        total >> 20
    );
}

/// A client that offers other ALPN protocols (Envoy offers `h2` to HTTP/2
/// upstreams) is served as a plain connection by the mux-enabled inbound
/// listener, with the protocol it asked for selected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_offering_h2_or_http1_are_served_as_plain_connections() {
    let p = pair().await;
    let inbound = p._api_l.inbound;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let roots = veer_core::tls::load_certs(&p.m.dir.join("roots.pem")).unwrap();
        let chain = veer_core::tls::load_certs(&p.m.dir.join("web.pem")).unwrap();
        let key = veer_core::tls::load_key(&p.m.dir.join("web-key.pem")).unwrap();
        let base = veer_core::tls::client_config(chain, key, &roots).unwrap();
        let mut cfg = (*base).clone();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(inbound).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(server_name(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        tls.write_all(b"plain").await.unwrap();
        let mut got = [0u8; 5];
        tls.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"plain");
    }
    assert_eq!(
        p.api
            .metrics
            .mux(Direction::Inbound)
            .conns_opened
            .load(Relaxed),
        0
    );
    assert_eq!(p.app_conns.load(Relaxed), 2);
}

/// Draining api (its inbound listener stopped): the open stream goes on,
/// the pooled connection takes no new stream (GOAWAY), so a new app
/// connection dials again (and, the listener being closed, fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_stops_new_streams_on_pooled_connections() {
    let p = pair().await;
    let mut open = TcpStream::connect(p.front).await.unwrap();
    assert_eq!(echo(&mut open, b"a").await.as_deref(), Some(&b"a"[..]));
    p._api_l.stop_inbound();
    // Let the GOAWAY arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        call(p.front, b"b").await,
        None,
        "no new stream on a draining api"
    );
    assert_eq!(p.app_conns.load(Relaxed), 1);
    assert_eq!(echo(&mut open, b"c").await.as_deref(), Some(&b"c"[..]));
}

/// An HTTP/1.1 local app answering every request with
/// `<method> <path> xfcc=<x-forwarded-client-cert or ->`; counts its
/// connections.
async fn http_app() -> (SocketAddr, Arc<AtomicUsize>) {
    use http_body_util::Full;
    use hyper::body::Incoming;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|v| v.to_str().unwrap_or("?").to_string())
                        .unwrap_or("-".into());
                    let line = format!("{} {} xfcc={xfcc}", req.method(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        bytes::Bytes::from(line),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, n)
}

/// One HTTP/1.1 request on a raw connection (`Connection: close`): the
/// status and body, `None` when the connection ends without an answer.
async fn http1(s: &mut TcpStream, method: &str, path: &str) -> Option<(u16, String)> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: api\r\nx-forwarded-client-cert: URI=spiffe://forged\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1)?.to_string();
    Some((status, body))
}

const WEB_ID: &str =
    "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web";
const API_ID: &str =
    "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_an_l7_inbound_get_per_request_authorization_and_xfcc() {
    use veer_core::intentions::{Action, Intention, Target};
    use veer_core::l7::{InboundHttp, PathMatch, Permission, PermissionMatch, Xfcc};
    let (app, app_conns) = http_app().await;
    let p = pair_to(app, app_conns, "", "", None).await;
    // At L4 first: an open stream relays raw bytes to the app.
    let mut open = TcpStream::connect(p.front).await.unwrap();
    open.write_all(b"GET /l4 HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.ends_with("GET /l4 xfcc=-"), "L4: no XFCC: {head}");

    // api turns L7: web may GET anything but not DELETE under /admin.
    let mut spec = veer_core::config::load(&p.m.dir.join("veer.toml"))
        .unwrap()
        .spec;
    let perm = |action, path, methods: &[&str]| Permission {
        action,
        http: PermissionMatch {
            path,
            headers: vec![],
            methods: methods.iter().map(|m| m.to_string()).collect(),
        },
    };
    let mut i = Intention::new(
        Target::new("default", "default", "web"),
        Target::new("default", "default", "api"),
        Action::Allow,
    );
    i.permissions = vec![
        perm(
            Action::Deny,
            PathMatch::Prefix("/admin".into()),
            &["DELETE"],
        ),
        perm(Action::Allow, PathMatch::Any, &[]),
    ];
    spec.default_action = Action::Deny;
    spec.intentions = vec![i];
    spec.inbound_http = Some(InboundHttp {
        protocol: veer_core::route::Protocol::Http,
        rbac: None,
        xfcc: Xfcc::SanitizeSet,
        request_timeout: None,
    });
    p.api.apply(spec).unwrap();
    // The stream opened at L4 would bypass the per-request decisions: reset.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(3), open.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the L4 stream was closed when api turned L7");
    assert_eq!(p.api.metrics.revoked.load(Relaxed), 1);

    // New app connections ride the same multiplexed connection, each
    // request decided by the L7 engine.
    let mut s = TcpStream::connect(p.front).await.unwrap();
    let (st, body) = http1(&mut s, "DELETE", "/admin/users").await.unwrap();
    assert_eq!((st, body.as_str()), (403, "RBAC: access denied"));
    let mut s = TcpStream::connect(p.front).await.unwrap();
    let (st, body) = http1(&mut s, "GET", "/admin/users").await.unwrap();
    assert_eq!(st, 200, "{body}");
    // XFCC from the multiplexed connection's verified peer certificate; the
    // forged one is replaced.
    assert!(body.starts_with("GET /admin/users xfcc=By="), "{body}");
    assert!(body.contains(&format!("By={API_ID};Hash=")), "{body}");
    assert!(body.ends_with(&format!(";URI={WEB_ID}")), "{body}");
    assert!(!body.contains("forged"), "{body}");
    let mut s = TcpStream::connect(p.front).await.unwrap();
    assert_eq!(http1(&mut s, "DELETE", "/other").await.unwrap().0, 200);
    assert_eq!(
        api_handshakes(&p.api),
        1,
        "every app connection was a stream of one TLS connection"
    );
    let api_mux = p.api.metrics.mux(Direction::Inbound);
    assert_eq!(api_mux.streams_opened.load(Relaxed), 4);
    // The same metrics as a plain L7 connection's.
    assert_eq!(
        p.api
            .metrics
            .get("http_denials_total", "denied_by_permission"),
        1
    );
    let text = p.api.metrics.render(&[]);
    assert!(
        text.contains("veer_inbound_http_requests_total{code_class=\"2xx\",outcome=\"allowed\"} 2"),
        "{text}"
    );
    assert!(
        eventually(5, || api_mux.streams_closed.load(Relaxed) == 4).await,
        "api closed every stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_whose_stream_carried_bulk_gets_dedicated_connections_for_a_while() {
    let p = pair().await;
    p.web
        .mux
        .set_bulk_rule(1 << 20, Duration::from_millis(1500));
    let web_mux = p.web.metrics.mux(Direction::Outbound);
    assert_eq!(
        call(p.front, b"small").await.as_deref(),
        Some(&b"small"[..])
    );
    assert_eq!(p.web.metrics.get("mux_bulk_switches_total", "api"), 0);
    // One stream carries 1 MiB each way: past the threshold.
    let s = TcpStream::connect(p.front).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&vec![5u8; 1 << 20]).await.unwrap();
        w
    });
    let mut back = vec![0u8; 1 << 20];
    tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert!(back.iter().all(|b| *b == 5));
    drop(writer.await.unwrap());
    drop(r);
    assert_eq!(p.web.metrics.get("mux_bulk_switches_total", "api"), 1);
    assert_eq!(web_mux.streams_opened.load(Relaxed), 2);
    assert_eq!(api_handshakes(&p.api), 1);
    // The next app connections get their own TLS connection.
    for i in 0..2 {
        let msg = format!("dedicated {i}");
        assert_eq!(call(p.front, msg.as_bytes()).await, Some(msg.into_bytes()));
    }
    assert_eq!(api_handshakes(&p.api), 3, "one TLS connection each");
    assert_eq!(web_mux.streams_opened.load(Relaxed), 2);
    assert_eq!(p.web.metrics.get("mux_bulk_dedicated_total", "api"), 2);
    let text = p.web.metrics.render(&[]);
    assert!(
        text.contains("veer_mux_bulk_switches_total{upstream=\"api\"} 1"),
        "{text}"
    );
    // Small ones do not renew the mark: after the hold, streams again.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_eq!(call(p.front, b"back").await.as_deref(), Some(&b"back"[..]));
    assert_eq!(web_mux.streams_opened.load(Relaxed), 3);
    assert_eq!(api_handshakes(&p.api), 3);
    assert_eq!(p.web.metrics.get("mux_bulk_switches_total", "api"), 1);
}
