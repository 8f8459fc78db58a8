//! Small static HTTP/1.1 listeners with ordered routes: the listeners an
//! Envoy bootstrap declares itself (consul-dataplane's and Consul's
//! Prometheus listener on e.g. `:20200` and the ready listener on
//! `:21000`), and, through the same routing and forwarding, the expose
//! paths ([`crate::expose`]).
//!
//! A request's path is matched against the routes in order (exact path, or
//! prefix); the first match answers:
//! - [`Action::Forward`]: the request goes to `addr` over HTTP/1.1 in origin
//!   form, hop-by-hop headers removed, with the matched part of the path
//!   replaced by `prefix_rewrite` when given (Envoy's semantics: for an exact
//!   match the whole path, for a prefix match the prefix; the query is kept).
//!   A route to veer's own admin address (Consul's `self_admin` cluster)
//!   reaches the admin handler this way.
//! - [`Action::Direct`]: a fixed status and body.
//!
//! No match answers 404. The listeners run on their own thread with a
//! current-thread runtime, like the admin endpoint, so they answer from
//! before the first configuration arrives (a ready route then forwards the
//! admin's `503`) until the process exits.
use crate::http::{serve, stopped, text, Body, Tracker};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use hyper::{HeaderMap, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[cfg(test)]
mod tests;

/// Connections one static listener serves at once.
const MAX_CONNS: usize = 128;
/// The longest a forwarded request may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`StaticListeners::stop`] lets in-flight requests finish.
const STOP_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Forward {
        addr: SocketAddr,
        prefix_rewrite: Option<String>,
    },
    Direct {
        status: u16,
        body: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub path: PathMatch,
    pub action: Action,
}

/// One listener to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// For logs (the bootstrap's listener name).
    pub name: String,
    pub addr: SocketAddr,
    pub routes: Vec<Route>,
}

/// The first route matching `path`.
pub fn find<'a>(routes: &'a [Route], path: &str) -> Option<&'a Route> {
    routes.iter().find(|r| r.path.matches(path))
}

/// The path and query to send upstream: `path_and_query` with the matched
/// part replaced by `rewrite` (none: unchanged).
pub fn rewrite(m: &PathMatch, rewrite: Option<&str>, path_and_query: &str) -> String {
    let Some(new) = rewrite else {
        return path_and_query.to_string();
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let rest = match m {
        PathMatch::Exact(_) => "",
        PathMatch::Prefix(p) => path.strip_prefix(p.as_str()).unwrap_or(""),
    };
    let mut out = format!("{new}{rest}");
    if out.is_empty() {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// The routing decision and forwarding for one request, with the upstream
/// connection made by `dial(addr)`. Returns the address forwarded to (if
/// any) and the response.
pub(crate) async fn respond<B, D, F, S>(
    mut req: Request<B>,
    routes: &[Route],
    not_found: &'static str,
    dial: D,
) -> (Option<SocketAddr>, Response<Body>)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    D: FnOnce(SocketAddr) -> F,
    F: Future<Output = io::Result<S>>,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let Some(route) = find(routes, req.uri().path()) else {
        return (None, text(StatusCode::NOT_FOUND, not_found));
    };
    match &route.action {
        Action::Direct { status, body } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::NOT_FOUND);
            (None, text(status, body.clone()))
        }
        Action::Forward {
            addr,
            prefix_rewrite,
        } => {
            let pq = req
                .uri()
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            let target = rewrite(&route.path, prefix_rewrite.as_deref(), &pq);
            *req.uri_mut() = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
            let resp = match dial(*addr).await {
                Ok(io) => forward(req, io, *addr).await,
                Err(e) => bad_gateway(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("upstream connect error: {addr}: {e}"),
                ),
            };
            (Some(*addr), resp)
        }
    }
}

/// Connects to `addr` within `timeout`.
pub(crate) async fn dial_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), plus any the
/// `Connection` header names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

pub(crate) fn bad_gateway(status: StatusCode, msg: String) -> Response<Body> {
    tracing::debug!("static http: {msg}");
    text(status, format!("{msg}\n"))
}

/// Sends `req` (its URI already in origin form) over `io` to `addr`.
pub(crate) async fn forward<B, S>(mut req: Request<B>, io: S, addr: SocketAddr) -> Response<Body>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(e) => {
            return bad_gateway(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("upstream connect error: {addr}: {e}"),
            )
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let origin_form = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = origin_form
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"));
    strip_hop_by_hop(req.headers_mut());
    if !req.headers().contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(&addr.to_string()) {
            req.headers_mut().insert(HOST, v);
        }
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req)).await {
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            resp.map(|b| b.boxed())
        }
        Ok(Err(e)) => bad_gateway(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream request to {addr} failed: {e}"),
        ),
        Err(_) => bad_gateway(
            StatusCode::GATEWAY_TIMEOUT,
            format!("upstream request to {addr} timed out"),
        ),
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    name: Arc<str>,
    routes: Arc<Vec<Route>>,
    connect_timeout: Duration,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (to, resp) = respond(req, &routes, "not found\n", |a| {
        dial_tcp(a, connect_timeout)
    })
    .await;
    tracing::debug!(
        target: "veer::access",
        direction = "static",
        listener = %name,
        peer = %peer,
        method = %method,
        path = %path,
        upstream = ?to,
        status = resp.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "static listener request"
    );
    resp
}

/// The bootstrap's static listeners, served on their own thread.
pub struct StaticListeners {
    /// (name, bound address), in the order given.
    pub bound: Vec<(String, SocketAddr)>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl StaticListeners {
    /// Binds every listener (any failure is an error, as in Envoy) and
    /// serves them until [`StaticListeners::stop`] or drop.
    pub fn start(specs: Vec<ListenerSpec>, connect_timeout: Duration) -> io::Result<Self> {
        let mut std_listeners = Vec::new();
        for s in specs {
            let l = std::net::TcpListener::bind(s.addr).map_err(|e| {
                io::Error::new(e.kind(), format!("listener {} on {}: {e}", s.name, s.addr))
            })?;
            l.set_nonblocking(true)?;
            let local = l.local_addr()?;
            std_listeners.push((s, l, local));
        }
        let bound = std_listeners
            .iter()
            .map(|(s, _, a)| (s.name.clone(), *a))
            .collect();
        let (stop, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("veer-static".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    tracing::error!("static listeners: cannot start their runtime");
                    return;
                };
                rt.block_on(async move {
                    let tracker = Tracker::default();
                    for (spec, l, local) in std_listeners {
                        let l = match TcpListener::from_std(l) {
                            Ok(l) => l,
                            Err(e) => {
                                tracing::error!(listener = %spec.name, error = %e, "static listener not served");
                                continue;
                            }
                        };
                        tracing::info!(listener = %spec.name, addr = %local, routes = spec.routes.len(), "static listener bound");
                        let name: Arc<str> = spec.name.into();
                        let routes = Arc::new(spec.routes);
                        tokio::spawn(serve(
                            l,
                            "static",
                            move |req, peer| {
                                handle(req, peer, name.clone(), routes.clone(), connect_timeout)
                            },
                            stop_rx.clone(),
                            tracker.clone(),
                            MAX_CONNS,
                        ));
                    }
                    let mut stop_rx = stop_rx;
                    stopped(&mut stop_rx).await;
                    let _ = tokio::time::timeout(STOP_WAIT, tracker.idle()).await;
                });
            })?;
        Ok(StaticListeners {
            bound,
            stop,
            thread: Some(thread),
        })
    }

    /// Closes the listeners, lets in-flight requests finish (up to a
    /// second) and joins the thread.
    pub fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StaticListeners {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
