//! In process, on loopback: the inbound listener at L7. Real TLS from a
//! client presenting web's leaf, hyper (HTTP/1.1 and HTTP/2 by ALPN) and
//! curl as clients, a hyper app behind veer: per-request intentions with
//! permissions (403 while the connection keeps serving; a change applies to
//! the next request), HTTP RBAC, XFCC, pooled keep-alive app connections,
//! HTTP/2 trailers, and malformed requests refused before the app.
mod common;
use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer_core::authz::{RbacPolicy, RbacRules, StringMatch};
use veer_core::intentions::{Action, Intention, Target};
use veer_core::l7::{InboundHttp, PathMatch, Permission, PermissionMatch, RbacPermission, Xfcc};
use veer_core::route::Protocol;
use veer_core::snapshot::Spec;

/// A local app that answers every request with what it received:
/// `<version> <method> <path> xfcc=<header or ->`, counts its accepted
/// connections, and (over HTTP/2) sends a trailer `x-trailer: done`.
async fn app(h2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or("-".into());
                    let line = format!(
                        "{:?} {} {} xfcc={xfcc}",
                        req.version(),
                        req.method(),
                        req.uri().path()
                    );
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("x-trailer", "done".parse().unwrap());
                    let frames = vec![
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(line))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    Ok::<_, std::convert::Infallible>(Response::new(frames_body(frames)))
                });
                let io = TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, accepted)
}

/// A body of the given frames.
fn frames_body(
    items: Vec<Result<Frame<Bytes>, std::convert::Infallible>>,
) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Send + Unpin {
    struct It(std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>);
    impl hyper::body::Body for It {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    It(items.into_iter())
}

fn spec(m: &Material) -> Spec {
    veer_core::config::load(&m.dir.join("veer.toml"))
        .unwrap()
        .spec
}

fn l7(protocol: Protocol, xfcc: Xfcc) -> InboundHttp {
    InboundHttp {
        protocol,
        rbac: None,
        xfcc,
        request_timeout: None,
    }
}

fn web_to_api(action: Action, permissions: Vec<Permission>) -> Intention {
    let mut i = Intention::new(
        Target::new("default", "default", "web"),
        Target::new("default", "default", "api"),
        action,
    );
    i.permissions = permissions;
    i
}

fn perm(action: Action, path: PathMatch, methods: &[&str]) -> Permission {
    Permission {
        action,
        http: PermissionMatch {
            path,
            headers: vec![],
            methods: methods.iter().map(|m| m.to_string()).collect(),
        },
    }
}

/// A TLS connection from web offering `alpn`.
async fn tls(
    m: &Material,
    inbound: SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let roots = veer_core::tls::load_certs(&m.dir.join("roots.pem")).unwrap();
    let chain = veer_core::tls::load_certs(&m.dir.join("web.pem")).unwrap();
    let key = veer_core::tls::load_key(&m.dir.join("web-key.pem")).unwrap();
    let mut cfg = (*veer_core::tls::client_config(chain, key, &roots).unwrap()).clone();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let c = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(inbound).await.unwrap();
    c.connect(server_name(), tcp).await.unwrap()
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(m: &Material, inbound: SocketAddr) -> Sender {
    let s = tls(m, inbound, &[b"http/1.1"]).await;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn get(
    send: &mut Sender,
    method: &str,
    path: &str,
    xfcc: Option<&str>,
) -> (StatusCode, String) {
    send.ready().await.unwrap();
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api.service.consul");
    if let Some(x) = xfcc {
        b = b.header("x-forwarded-client-cert", x);
    }
    let r = send
        .send_request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = r.status();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

const WEB: &str = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web";
const API: &str = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/api";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intentions_with_permissions_decide_each_request() {
    let m = Material::new();
    let (app, accepted) = app(false).await;
    let (shared, l) = m.start(app, "").await;
    let mut s = spec(&m);
    s.default_action = Action::Deny;
    s.intentions = vec![web_to_api(
        Action::Allow,
        vec![
            perm(Action::Deny, PathMatch::Prefix("/admin".into()), &[]),
            perm(Action::Allow, PathMatch::Any, &["GET"]),
        ],
    )];
    s.inbound_http = Some(l7(Protocol::Http, Xfcc::SanitizeSet));
    shared.apply(s.clone()).unwrap();

    let mut c = h1(&m, l.inbound).await;
    // Allowed; a forged XFCC is replaced by this hop's.
    let (st, body) = get(&mut c, "GET", "/hello", Some("URI=spiffe://evil")).await;
    assert_eq!(st, 200, "{body}");
    assert!(body.starts_with("HTTP/1.1 GET /hello xfcc=By="), "{body}");
    assert!(body.contains(&format!("By={API};Hash=")), "{body}");
    assert!(body.ends_with(&format!(";URI={WEB}")), "{body}");
    assert!(!body.contains("evil"), "{body}");
    // Denied by the first permission, then served on the same connection.
    let (st, body) = get(&mut c, "GET", "/admin/users", None).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    assert_eq!(get(&mut c, "GET", "/again", None).await.0, 200);
    // No permission matches POST: the default action (deny).
    assert_eq!(get(&mut c, "POST", "/x", None).await.0, 403);
    assert_eq!(
        shared
            .metrics
            .get("http_denials_total", "denied_by_permission"),
        1
    );
    assert_eq!(
        shared
            .metrics
            .get("http_denials_total", "denied_no_permission"),
        1
    );

    // The intention changes: the next request on the open connection
    // follows it.
    s.intentions = vec![web_to_api(
        Action::Allow,
        vec![perm(Action::Allow, PathMatch::Any, &["GET", "POST"])],
    )];
    shared.apply(s.clone()).unwrap();
    assert_eq!(get(&mut c, "POST", "/x", None).await.0, 200);
    // A plain deny intention: 403 per request, the connection stays.
    s.intentions = vec![web_to_api(Action::Deny, vec![])];
    shared.apply(s.clone()).unwrap();
    assert_eq!(get(&mut c, "GET", "/x", None).await.0, 403);
    assert_eq!(
        shared
            .metrics
            .get("http_denials_total", "denied_by_intention"),
        1
    );
    // Sanitize: no XFCC reaches the app.
    s.intentions = vec![];
    s.default_action = Action::Allow;
    s.inbound_http = Some(l7(Protocol::Http, Xfcc::Sanitize));
    shared.apply(s).unwrap();
    let (st, body) = get(&mut c, "GET", "/plain", Some("URI=spiffe://evil")).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "HTTP/1.1 GET /plain xfcc=-")
    );
    // A second client connection: the app connection is pooled, kept alive.
    let mut c2 = h1(&m, l.inbound).await;
    assert_eq!(get(&mut c2, "GET", "/two", None).await.0, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "app connections");
    assert!(shared.metrics.get("inbound_http_requests_total", "2xx") >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_by_alpn_to_an_h2_app_with_trailers() {
    let m = Material::new();
    let (app, accepted) = app(true).await;
    let (shared, l) = m.start(app, "").await;
    let mut s = spec(&m);
    s.inbound_http = Some(l7(Protocol::Grpc, Xfcc::AppendForward));
    shared.apply(s).unwrap();
    let t = tls(&m, l.inbound, &[b"h2", b"http/1.1"]).await;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(t))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Ten concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri(format!("http://api/svc.Echo/Call{i}"))
                .header("te", "trailers")
                .header("x-forwarded-client-cert", "By=upstream-hop")
                .body(Full::new(Bytes::from_static(b"x")))
                .unwrap();
            send.ready().await.unwrap();
            let r = send.send_request(req).await.unwrap();
            assert_eq!(r.status(), 200);
            let collected = r.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
            (i, body, trailers)
        }));
    }
    for t in tasks {
        let (i, body, trailers) = t.await.unwrap();
        assert!(
            body.starts_with(&format!(
                "HTTP/2.0 POST /svc.Echo/Call{i} xfcc=By=upstream-hop,By={API};"
            )),
            "{body}"
        );
        assert_eq!(trailers.unwrap().get("x-trailer").unwrap(), "done");
    }
    // HTTP/2 to the app multiplexes: one connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rbac_with_network_rbac() {
    let m = Material::new();
    let (app, _) = app(false).await;
    let (shared, l) = m.start(app, "").await;
    let mut s = spec(&m);
    // xDS's L7 shape: no network filter, an HTTP RBAC ALLOW filter for web
    // on paths under /api/ only.
    s.rbac = Some(vec![]);
    let mut h = l7(Protocol::Http, Xfcc::Sanitize);
    h.rbac = Some(vec![RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            name: "consul-intentions-layer7-0".into(),
            principals: vec![veer_core::authz::Principal::spiffe_regex(
                "^spiffe://[^/]+/ns/default/dc/[^/]+/svc/web$",
            )],
            permissions: vec![RbacPermission::UrlPath(StringMatch::prefix("/api/"))],
        }],
    }]);
    s.inbound_http = Some(h);
    shared.apply(s.clone()).unwrap();
    let mut c = h1(&m, l.inbound).await;
    assert_eq!(get(&mut c, "GET", "/api/x", None).await.0, 200);
    assert_eq!(get(&mut c, "GET", "/other", None).await.0, 403);
    assert_eq!(
        shared.metrics.get("http_denials_total", "denied_no_policy"),
        1
    );
    // A network RBAC filter that denies all closes the open connection
    // and refuses new ones, as on the L4 path.
    s.rbac = Some(vec![RbacRules {
        action: Action::Allow,
        policies: vec![],
    }]);
    shared.apply(s).unwrap();
    assert!(eventually(5, || c.is_closed()).await);
    let t = TcpStream::connect(l.inbound).await.unwrap();
    let mut cfg_c = tls_raw(&m, t).await;
    let mut buf = [0u8; 16];
    let _ = cfg_c.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let n = tokio::time::timeout(Duration::from_secs(5), cfg_c.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
}

async fn tls_raw(m: &Material, tcp: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
    m.web_connector().connect(server_name(), tcp).await.unwrap()
}

/// Sends raw bytes on a fresh connection; returns what came back until
/// the connection closed (or 5 s passed).
async fn raw(m: &Material, inbound: SocketAddr, req: &[u8]) -> String {
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let mut t = tls_raw(m, tcp).await;
    t.write_all(req).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_reach_the_app() {
    let m = Material::new();
    let (app, accepted) = app(false).await;
    let (shared, l) = m.start(app, "").await;
    let mut s = spec(&m);
    s.inbound_http = Some(l7(Protocol::Http, Xfcc::Sanitize));
    shared.apply(s).unwrap();
    // Request smuggling: Content-Length and Transfer-Encoding together.
    let smuggle = b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n";
    // hyper drops the Content-Length, reads the body as chunked and closes
    // the connection after the response (RFC 9112 §6.3): the request
    // smuggled behind it is never read, and the app sees one request,
    // framed anew.
    let got = raw(&m, l.inbound, smuggle).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("connection: close"), "{got}");
    assert!(!got.contains("/smuggled"), "{got}");
    // Two different Content-Length values.
    let got = raw(
        &m,
        l.inbound,
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    // Too many headers, and headers too large.
    let mut many = b"GET / HTTP/1.1\r\nhost: a\r\n".to_vec();
    for i in 0..150 {
        many.extend(format!("x-h{i}: v\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    let got = raw(&m, l.inbound, &many).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let got = raw(&m, l.inbound, big.as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    // An invalid method and an invalid target.
    let got = raw(&m, l.inbound, b"G(T / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    let got = raw(&m, l.inbound, b"GET /a b HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    // Only the smuggling request's own POST reached the app.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(
        eventually(5, || shared
            .metrics
            .get("inbound_http_errors_total", "bad_request")
            >= 3)
        .await
    );
    assert_eq!(
        shared
            .metrics
            .get("inbound_http_errors_total", "headers_too_large"),
        2
    );
}

/// Runs curl with web's leaf against the inbound listener; returns
/// `<status> <http_version> <body>`.
async fn curl(
    m: &Material,
    inbound: SocketAddr,
    version: &str,
    method: &str,
    path: &str,
) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-k", "--max-time", "5", version, "-X", method])
        .arg("--cert")
        .arg(m.dir.join("web.pem"))
        .arg("--key")
        .arg(m.dir.join("web-key.pem"))
        .args(["-w", " %{http_code} %{http_version}"])
        .arg(format!("https://{inbound}{path}"))
        .output()
        .await
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_h1_and_h2_with_toml_permissions() {
    let m = Material::new();
    let (app, _) = app(false).await;
    let extra = r#"
[[intentions.rules]]
source = "web"
[[intentions.rules.permissions]]
action = "allow"
path_prefix = "/api/"
methods = ["GET"]
"#;
    let text = m
        .config(app, extra)
        .replace("[inbound]\n", "[inbound]\nprotocol = \"http\"\n")
        .replace("default_action = \"allow\"", "default_action = \"deny\"");
    let path = m.dir.join("veer.toml");
    std::fs::write(&path, text).unwrap();
    let loaded = veer_core::config::load(&path).unwrap();
    let shared = veer_proxy::state::Shared::new(loaded.spec).unwrap();
    let l = veer_proxy::accept::Listeners::start(shared.clone())
        .await
        .unwrap();
    for v in ["--http1.1", "--http2"] {
        let got = curl(&m, l.inbound, v, "GET", "/api/x").await;
        assert!(
            got.starts_with("HTTP/1.1 GET /api/x xfcc=- 200"),
            "{v}: {got}"
        );
        let want = if v == "--http2" { " 2" } else { " 1.1" };
        assert!(got.ends_with(want), "{v}: {got}");
        let got = curl(&m, l.inbound, v, "POST", "/api/x").await;
        assert!(got.starts_with("RBAC: access denied 403"), "{v}: {got}");
        let got = curl(&m, l.inbound, v, "GET", "/other").await;
        assert!(got.starts_with("RBAC: access denied 403"), "{v}: {got}");
    }
    assert_eq!(
        shared
            .metrics
            .get("http_denials_total", "denied_no_permission"),
        4
    );
    // Envoy's names for the public listener's HTTP requests (besides
    // Consul's stats tags on every series).
    let text = shared.metrics.render(&[]);
    let pl = "envoy_http_conn_manager_prefix=\"public_listener\"";
    for (name, labels, value) in [
        ("envoy_http_downstream_rq_total", vec![pl], "6"),
        (
            "envoy_http_downstream_rq_xx",
            vec![pl, "envoy_response_code_class=\"2\""],
            "2",
        ),
        (
            "envoy_http_downstream_rq_xx",
            vec![pl, "envoy_response_code_class=\"4\""],
            "4",
        ),
        ("envoy_http_downstream_rq_time_count", vec![pl], "6"),
    ] {
        let found = text.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && labels.iter().all(|w| l.contains(w))
                && l.ends_with(&format!(" {value}"))
        });
        assert!(found, "{name} {labels:?} {value} in\n{text}");
    }
}

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_is_cut_off_and_others_are_served() {
    let m = Material::new();
    let (app, _) = app(false).await;
    let (shared, l) = m.start(app, "").await;
    let mut s = spec(&m);
    s.inbound_http = Some(l7(Protocol::Http, Xfcc::Sanitize));
    shared.apply(s).unwrap();
    // CVE-2023-44487: open a stream and cancel it at once, thousands of
    // times, on one connection.
    let mut t = tls(&m, l.inbound, &[b"h2"]).await;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
                                     // HPACK: :method GET, :scheme http, :path /, :authority "a".
    let headers = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        out.extend(frame(1, 0x5, id, &headers)); // HEADERS, END_STREAM|END_HEADERS
        out.extend(frame(3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = t.write_all(&out).await;
    // The server ends the connection (GOAWAY, then close).
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut got)).await;
    assert!(r.is_ok(), "the flooding connection was not closed");
    // Walk the frames the server sent: one must be a GOAWAY.
    let mut kinds = Vec::new();
    let mut rest = &got[..];
    while rest.len() >= 9 {
        let n = (rest[0] as usize) << 16 | (rest[1] as usize) << 8 | rest[2] as usize;
        kinds.push(rest[3]);
        rest = &rest[(9 + n).min(rest.len())..];
    }
    assert!(kinds.contains(&7), "no GOAWAY in {kinds:?} ({r:?})");
    assert!(
        eventually(5, || shared
            .metrics
            .get("inbound_http_errors_total", "h2_protocol")
            >= 1)
        .await
    );
    // Another client is served meanwhile.
    let mut c = h1(&m, l.inbound).await;
    assert_eq!(get(&mut c, "GET", "/ok", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_and_local_app_down() {
    let m = Material::new();
    let (app, _) = app(false).await;
    let (shared, l) = m.start(app, "").await;
    let mut s = spec(&m);
    let mut h = l7(Protocol::Http, Xfcc::Sanitize);
    h.request_timeout = Some(Duration::from_millis(200));
    s.inbound_http = Some(h);
    shared.apply(s.clone()).unwrap();
    let mut c = h1(&m, l.inbound).await;
    let t0 = std::time::Instant::now();
    let (st, body) = get(&mut c, "GET", "/slow", None).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(get(&mut c, "GET", "/fast", None).await.0, 200);
    assert_eq!(
        shared
            .metrics
            .get("inbound_http_requests_total", "local_app_timeout"),
        1
    );
    // The local app is gone: 503 with a reason, the connection stays.
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    s.local_app = gone.local_addr().unwrap();
    drop(gone);
    shared.apply(s).unwrap();
    let mut c = h1(&m, l.inbound).await;
    send_check_503(&mut c).await;
    send_check_503(&mut c).await;
    assert_eq!(
        shared
            .metrics
            .get("inbound_http_requests_total", "local_app_connect"),
        2
    );
}

async fn send_check_503(c: &mut Sender) {
    c.ready().await.unwrap();
    let r = c
        .send_request(
            Request::builder()
                .uri("/x")
                .header("host", "api")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-veer-reason"], "local_app_connect");
}
