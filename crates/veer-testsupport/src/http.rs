//! A test HTTP app (hyper): HTTP/1.1 and HTTP/2 with prior knowledge (h2c,
//! gRPC's transport) on one port, whichever the client opens with. Every
//! answer's body is `<name> <version> <method> <path?query> host=<host>`;
//! some paths behave:
//! - `/status/<code>`: answers with that status.
//! - `/slow/<ms>`: waits that long first.
//! - `/trailers`: adds the trailers `grpc-status: 0`, `x-app: <name>`.
//!
//! It counts connections and requests; each request's head is recorded.
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running HTTP app; its thread runs until the process ends.
#[derive(Clone)]
pub struct HttpApp {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    /// Each request's headers as `name: value` lines (in arrival order).
    pub heads: Arc<Mutex<Vec<String>>>,
}

/// Starts the app on `addr` inside `ns` (or here when `None`).
pub fn spawn_http_app(
    ns: Option<&crate::netns::Netns>,
    addr: SocketAddr,
    name: &'static str,
) -> HttpApp {
    let path = ns.map(|n| n.path());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Some(p) = path {
            crate::netns::enter(&p).expect("enter netns");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .expect("http app bind");
            let app = HttpApp {
                addr: l.local_addr().unwrap(),
                connections: Arc::new(AtomicUsize::new(0)),
                requests: Arc::new(AtomicUsize::new(0)),
                heads: Arc::new(Mutex::new(Vec::new())),
            };
            tx.send(app.clone()).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                app.connections.fetch_add(1, Ordering::SeqCst);
                let app = app.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let app = app.clone();
                        async move { Ok::<_, Infallible>(answer(name, &app, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().expect("http app started")
}

async fn answer(
    name: &str,
    app: &HttpApp,
    req: Request<Incoming>,
) -> Response<BoxBody<Bytes, Infallible>> {
    app.requests.fetch_add(1, Ordering::SeqCst);
    let head: String = req
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect();
    app.heads.lock().unwrap().push(head);
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "-".into());
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.to_string());
    let text = format!(
        "{name} {:?} {} {pq} host={host}\n",
        req.version(),
        req.method()
    );
    let path = req.uri().path().to_string();
    // Read the request body to its end.
    let _ = req.into_body().collect().await;
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let body = Full::new(Bytes::from(text));
    let body = if path == "/trailers" {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("x-app", HeaderValue::from_str(name).unwrap());
        body.with_trailers(async move { Some(Ok(t)) }).boxed()
    } else {
        body.boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// One HTTP/2 (prior knowledge) request from inside `ns` (or here) with
/// hyper: (status, body, trailers as `name: value` lines). For what curl
/// does not show, such as gRPC's trailers.
pub fn h2_request(
    ns: Option<&crate::netns::Netns>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, Vec<String>), String> {
    let path_ns = ns.map(|n| n.path());
    let method = method.to_string();
    let path = path.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::thread::spawn(move || {
        if let Some(p) = path_ns {
            crate::netns::enter(&p).map_err(|e| e.to_string())?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let s = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut b = Request::builder()
                .method(method.as_str())
                .uri(format!("http://{addr}{path}"));
            for (k, v) in &headers {
                b = b.header(k, v);
            }
            let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
                .await
                .map_err(|_| "no response in 10 s".to_string())?
                .map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let c = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?;
            let trailers = c
                .trailers()
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                        .collect()
                })
                .unwrap_or_default();
            let body = String::from_utf8_lossy(&c.to_bytes()).into_owned();
            Ok((status, body, trailers))
        })
    })
    .join()
    .map_err(|_| "client thread panicked".to_string())?
}
