//! The engine in-process: real hyper servers on loopback as cluster
//! endpoints (plain TCP stands in for mTLS: the [`Connector`] is the
//! proxy's part), real hyper clients as the app.
use super::*;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;
use tokio::net::{TcpListener, TcpStream};
use veer_core::l7::{
    ClusterSpec, HttpRoutes, PathMatch, RequestMatch, RetryPolicy, RouteAction, RouteSpec,
};
use veer_core::l7route::HttpTable;
use veer_core::route::{Endpoint, Protocol};
use veer_core::snapshot::TargetSpec;
use veer_core::spiffe::ServiceId;

#[derive(Debug, Clone)]
struct Record {
    status: u16,
    reason: Option<&'static str>,
    cluster: Option<String>,
    route: Option<String>,
    attempts: u32,
}

#[derive(Default)]
struct TestConn {
    done: Mutex<Vec<Record>>,
    connects: AtomicUsize,
}

impl Connector for TestConn {
    type Io = TcpStream;
    fn connect<'a>(
        &'a self,
        _target: &'a Upstream,
        ep: EndpointAddr,
        _alpn: Alpn,
    ) -> BoxFuture<'a, Result<TcpStream, ConnectError>> {
        self.connects.fetch_add(1, Relaxed);
        Box::pin(async move {
            TcpStream::connect(ep.0).await.map_err(|e| ConnectError {
                label: "refused",
                msg: e.to_string(),
            })
        })
    }
    fn now_ms(&self) -> u64 {
        1
    }
    fn current(&self) -> Option<Arc<Upstream>> {
        None
    }
    fn done(&self, d: &Done<'_>) {
        self.done.lock().unwrap().push(Record {
            status: d.status,
            reason: d.reason,
            cluster: d.cluster.map(|c| c.name.clone()),
            route: d.route.map(str::to_string),
            attempts: d.attempts,
        });
    }
}

#[derive(Clone, Copy)]
enum Behaviour {
    /// Answers `<name> <version> <path> host=<host>`.
    Echo,
    /// 503 for the first `n` requests, then echo.
    FailFirst(usize),
    /// Waits this long before answering.
    Slow(Duration),
    /// A body and trailers `grpc-status: 0` (gRPC's shape).
    Trailers,
}

struct Backend {
    addr: SocketAddr,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
}

async fn backend(name: &'static str, b: Behaviour) -> Backend {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(AtomicUsize::new(0));
    let c2 = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            c2.fetch_add(1, Relaxed);
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let n = seen.fetch_add(1, Relaxed);
                    async move {
                        let text = format!(
                            "{name} {:?} {} host={}",
                            req.version(),
                            req.uri().path_and_query().map_or("", |p| p.as_str()),
                            authority(req.uri(), req.headers()).unwrap_or("-"),
                        );
                        let resp: Response<Body> = match b {
                            Behaviour::FailFirst(k) if n < k => {
                                let mut r = Response::new(
                                    Full::new(Bytes::from("busy"))
                                        .map_err(|n| match n {})
                                        .boxed(),
                                );
                                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                r
                            }
                            Behaviour::Slow(d) => {
                                tokio::time::sleep(d).await;
                                Response::new(
                                    Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed(),
                                )
                            }
                            Behaviour::Trailers => {
                                let mut t = HeaderMap::new();
                                t.insert("grpc-status", HeaderValue::from_static("0"));
                                let body = Full::new(Bytes::from(text))
                                    .map_err(|n| match n {})
                                    .with_trailers(async move { Some(Ok(t)) });
                                Response::new(body.boxed())
                            }
                            _ => Response::new(
                                Full::new(Bytes::from(text)).map_err(|n| match n {}).boxed(),
                            ),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Backend { addr, conns }
}

fn cluster(name: &str, protocol: Protocol, eps: &[SocketAddr]) -> ClusterSpec {
    let mut t = TargetSpec::new(ServiceId::new(
        "td.consul",
        "default",
        "default",
        "dc1",
        name,
    ));
    t.endpoints = eps.to_vec();
    ClusterSpec {
        name: name.into(),
        targets: vec![t],
        protocol,
    }
}

fn route(name: &str, path: PathMatch, action: RouteAction) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        matches: RequestMatch {
            path,
            ..Default::default()
        },
        action,
    }
}

fn upstream(spec: HttpRoutes) -> Arc<Upstream> {
    let table = HttpTable::compile(spec, |t| {
        let mut u = Upstream::new(t.identity, Duration::from_secs(1));
        u.endpoints = t.endpoints.into_iter().map(Endpoint::new).collect();
        Ok(u)
    })
    .unwrap();
    let mut u = Upstream::new(
        ServiceId::new("td.consul", "default", "default", "dc1", "api"),
        Duration::from_secs(1),
    );
    u.protocol = Protocol::Http;
    u.http = Some(Arc::new(table));
    Arc::new(u)
}

/// The engine on a loopback listener; returns its address.
async fn engine(c: Arc<TestConn>, up: Arc<Upstream>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let pool = Arc::new(Pool::new());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(serve(c.clone(), pool.clone(), s, up.clone()));
        }
    });
    addr
}

/// An app's HTTP/1.1 (or HTTP/2 prior knowledge) connection.
enum App {
    H1(hyper::client::conn::http1::SendRequest<Body>),
    H2(hyper::client::conn::http2::SendRequest<Body>),
}

impl App {
    async fn connect(addr: SocketAddr, h2: bool) -> App {
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        if h2 {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            App::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            App::H1(s)
        }
    }

    /// Sends a request; returns status, the reason header, body, trailers.
    async fn get(
        &mut self,
        method: &str,
        path: &str,
    ) -> (u16, Option<String>, String, Option<HeaderMap>) {
        let (uri, h2) = match self {
            App::H1(_) => (path.to_string(), false),
            App::H2(_) => (format!("http://api.example{path}"), true),
        };
        let mut b = Request::builder().method(method).uri(uri);
        if !h2 {
            b = b.header("host", "api.example");
        }
        let req = b
            .body(Empty::new().map_err(|n| match n {}).boxed())
            .unwrap();
        let resp = match self {
            App::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(req).await.unwrap()
            }
            App::H2(s) => s.send_request(req).await.unwrap(),
        };
        let status = resp.status().as_u16();
        let reason = resp
            .headers()
            .get(REASON_HEADER)
            .map(|v| v.to_str().unwrap().to_string());
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
        (status, reason, body, trailers)
    }
}

#[tokio::test]
async fn routes_rewrite_and_both_protocols() {
    let a = backend("a", Behaviour::Echo).await;
    let b = backend("b", Behaviour::Echo).await;
    let mut rw = RouteAction::to_cluster(1);
    rw.prefix_rewrite = Some("/".into());
    let up = upstream(HttpRoutes {
        clusters: vec![
            cluster("a", Protocol::Http, &[a.addr]),
            cluster("b", Protocol::Http2, &[b.addr]),
        ],
        routes: vec![
            route("admin", PathMatch::Prefix("/admin/".into()), rw),
            route("default", PathMatch::Any, RouteAction::to_cluster(0)),
        ],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    for h2 in [false, true] {
        let mut app = App::connect(addr, h2).await;
        let (s, _, body, _) = app.get("GET", "/x?q=1").await;
        assert_eq!(s, 200);
        // HTTP/1.1 to cluster a, whatever the app spoke; Host kept.
        assert_eq!(body, "a HTTP/1.1 /x?q=1 host=api.example");
        let (s, _, body, _) = app.get("GET", "/admin/users?id=2").await;
        assert_eq!(s, 200);
        // HTTP/2 to cluster b, the prefix rewritten, :authority from Host.
        assert_eq!(body, "b HTTP/2.0 /users?id=2 host=api.example");
    }
    let done = c.done.lock().unwrap().clone();
    assert_eq!(done.len(), 4);
    assert_eq!(done[1].route.as_deref(), Some("admin"));
    assert_eq!(done[1].cluster.as_deref(), Some("b"));
    assert!(done.iter().all(|d| d.status == 200 && d.reason.is_none()));
}

#[tokio::test]
async fn keep_alive_connections_are_pooled() {
    let a = backend("a", Behaviour::Echo).await;
    let h = backend("h", Behaviour::Echo).await;
    let up = upstream(HttpRoutes {
        clusters: vec![
            cluster("a", Protocol::Http, &[a.addr]),
            cluster("h", Protocol::Http2, &[h.addr]),
        ],
        routes: vec![
            route(
                "h2",
                PathMatch::Prefix("/h2".into()),
                RouteAction::to_cluster(1),
            ),
            route("default", PathMatch::Any, RouteAction::to_cluster(0)),
        ],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    // Two app connections, sequential requests: one upstream connection
    // per cluster.
    for _ in 0..2 {
        let mut app = App::connect(addr, false).await;
        for _ in 0..3 {
            assert_eq!(app.get("GET", "/a").await.0, 200);
            assert_eq!(app.get("GET", "/h2").await.0, 200);
            // The HTTP/1.1 connection comes back once its response is read.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(a.conns.load(Relaxed), 1, "HTTP/1.1 connection reused");
    assert_eq!(h.conns.load(Relaxed), 1, "HTTP/2 connection shared");
    assert_eq!(c.connects.load(Relaxed), 2);
}

#[tokio::test]
async fn local_answers_name_their_reason() {
    let up = upstream(HttpRoutes {
        clusters: vec![
            // No endpoint at all.
            cluster("empty", Protocol::Http, &[]),
            // An endpoint that refuses connections.
            cluster("closed", Protocol::Http, &["127.0.0.1:1".parse().unwrap()]),
        ],
        routes: vec![
            route(
                "e",
                PathMatch::Prefix("/empty".into()),
                RouteAction::to_cluster(0),
            ),
            route(
                "c",
                PathMatch::Prefix("/closed".into()),
                RouteAction::to_cluster(1),
            ),
        ],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    let mut app = App::connect(addr, false).await;
    let (s, r, _, _) = app.get("GET", "/nothing").await;
    assert_eq!((s, r.as_deref()), (503, Some("no_route")));
    let (s, r, _, _) = app.get("GET", "/empty").await;
    assert_eq!((s, r.as_deref()), (503, Some("no_healthy_upstream")));
    let (s, r, body, _) = app.get("GET", "/closed").await;
    assert_eq!((s, r.as_deref()), (503, Some("connect_failure")), "{body}");
    // The connection keeps serving after local answers.
    let (s, r, _, _) = app.get("GET", "/nothing").await;
    assert_eq!((s, r.as_deref()), (503, Some("no_route")));
    let reasons: Vec<_> = c.done.lock().unwrap().iter().map(|d| d.reason).collect();
    assert_eq!(
        reasons,
        vec![
            Some("no_route"),
            Some("no_healthy_upstream"),
            Some("connect_failure"),
            Some("no_route")
        ]
    );
}

#[tokio::test]
async fn retries_on_status_and_connect_failure() {
    let flaky = backend("flaky", Behaviour::FailFirst(2)).await;
    let ok = backend("ok", Behaviour::Echo).await;
    let retry = |n: u32, codes: Vec<u16>, connect: bool| {
        let mut a = RouteAction::to_cluster(0);
        a.retry = Some(RetryPolicy {
            num_retries: n,
            on_connect_failure: connect,
            on_reset: false,
            on_status_codes: codes,
        });
        a
    };
    let mut retry_down = retry(1, vec![], true);
    retry_down.clusters[0].cluster = 1;
    let up = upstream(HttpRoutes {
        clusters: vec![
            cluster("flaky", Protocol::Http, &[flaky.addr]),
            // A dead endpoint first, then a live one.
            cluster(
                "half",
                Protocol::Http,
                &["127.0.0.1:1".parse().unwrap(), ok.addr],
            ),
        ],
        routes: vec![
            route(
                "once",
                PathMatch::Exact("/once".into()),
                retry(1, vec![503], false),
            ),
            route(
                "twice",
                PathMatch::Exact("/twice".into()),
                retry(2, vec![503], false),
            ),
            route("half", PathMatch::Exact("/half".into()), retry_down),
        ],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    let mut app = App::connect(addr, false).await;
    // Two attempts, both 503 (the upstream's own: no reason header).
    let (s, r, body, _) = app.get("GET", "/once").await;
    assert_eq!((s, r, body.as_str()), (503, None, "busy"));
    // The backend has failed twice; the third request succeeds at once.
    let (s, _, body, _) = app.get("GET", "/twice").await;
    assert_eq!(
        (s, body.as_str()),
        (200, "flaky HTTP/1.1 /twice host=api.example")
    );
    // Whatever endpoint the round robin starts at, the live one answers.
    for _ in 0..3 {
        let (s, _, _, _) = app.get("GET", "/half").await;
        assert_eq!(s, 200);
    }
    let done = c.done.lock().unwrap().clone();
    assert_eq!(done[0].attempts, 2);
    assert_eq!(done[1].attempts, 1);
}

#[tokio::test]
async fn retry_gets_a_fresh_attempt_after_a_503() {
    let flaky = backend("flaky", Behaviour::FailFirst(1)).await;
    let mut a = RouteAction::to_cluster(0);
    a.retry = Some(RetryPolicy {
        num_retries: 1,
        on_connect_failure: false,
        on_reset: false,
        on_status_codes: vec![503],
    });
    let up = upstream(HttpRoutes {
        clusters: vec![cluster("flaky", Protocol::Http2, &[flaky.addr])],
        routes: vec![route("r", PathMatch::Any, a)],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    let mut app = App::connect(addr, true).await;
    let (s, _, body, _) = app.get("GET", "/p").await;
    assert_eq!(
        (s, body.as_str()),
        (200, "flaky HTTP/2.0 /p host=api.example")
    );
    assert_eq!(c.done.lock().unwrap()[0].attempts, 2);
}

#[tokio::test]
async fn route_timeout_answers_504() {
    let slow = backend("slow", Behaviour::Slow(Duration::from_secs(3))).await;
    let mut a = RouteAction::to_cluster(0);
    a.timeout = Some(Duration::from_millis(150));
    let up = upstream(HttpRoutes {
        clusters: vec![cluster("slow", Protocol::Http, &[slow.addr])],
        routes: vec![route("r", PathMatch::Any, a)],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    let mut app = App::connect(addr, false).await;
    let t0 = Instant::now();
    let (s, r, _, _) = app.get("GET", "/").await;
    assert_eq!((s, r.as_deref()), (504, Some("timeout")));
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(c.done.lock().unwrap()[0].reason, Some("timeout"));
}

#[tokio::test]
async fn trailers_pass_through_h2() {
    let g = backend("g", Behaviour::Trailers).await;
    let up = upstream(HttpRoutes {
        clusters: vec![cluster("g", Protocol::Grpc, &[g.addr])],
        routes: vec![route("r", PathMatch::Any, RouteAction::to_cluster(0))],
    });
    let c = Arc::new(TestConn::default());
    let addr = engine(c.clone(), up).await;
    let mut app = App::connect(addr, true).await;
    let (s, _, body, trailers) = app.get("POST", "/pkg.Svc/Method").await;
    assert_eq!(s, 200);
    assert_eq!(body, "g HTTP/2.0 /pkg.Svc/Method host=api.example");
    let t = trailers.expect("trailers reach the app");
    assert_eq!(t.get("grpc-status").unwrap(), "0");
}

#[test]
fn hop_by_hop_headers_are_dropped() {
    let mut h = HeaderMap::new();
    h.insert("connection", HeaderValue::from_static("close, x-private"));
    h.insert("x-private", HeaderValue::from_static("1"));
    h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    h.insert("te", HeaderValue::from_static("gzip, trailers"));
    h.insert("x-kept", HeaderValue::from_static("1"));
    strip_hop_by_hop(&mut h);
    let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["te", "x-kept"]);
    assert_eq!(h.get("te").unwrap(), "trailers");
}
