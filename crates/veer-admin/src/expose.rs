//! Expose paths (Consul's HTTP probe overwrite): plain-HTTP listeners
//! that forward requests for one configured path each to the local app on
//! `127.0.0.1:<local_path_port>`, so that kubelet or Consul checks reach
//! the app while everything else on the pod address goes through mTLS.
//! Any other path gets 404 from veer; the app never sees it.
//!
//! The listeners follow the snapshot: a swap that adds, changes or removes
//! expose paths binds, re-routes or closes listeners (requests in flight
//! finish). They keep serving while veer drains, so probes keep reflecting
//! the app until the process exits.
use crate::http::{serve, server_builder, stopped, text, Body, Tracker};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use hyper::{HeaderMap, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use veer_core::route::Protocol;
use veer_core::snapshot::Snapshot;
use veer_proxy::state::Shared;

/// Connections one expose listener serves at once.
const MAX_CONNS: usize = 128;
/// The longest a forwarded request may take (probes time out sooner).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// path -> local app port, for one listener.
type Routes = Arc<Vec<(String, u16)>>;

struct Running {
    routes: watch::Sender<Routes>,
    stop: watch::Sender<bool>,
}

/// Keeps one listener per expose listener address of the current snapshot.
pub(crate) struct Exposer {
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    tracker: Tracker,
    running: HashMap<SocketAddr, Running>,
}

/// The snapshot's expose paths, grouped by listener (HTTP only).
fn wanted(snap: &Snapshot) -> HashMap<SocketAddr, Vec<(String, u16)>> {
    let mut want: HashMap<SocketAddr, Vec<(String, u16)>> = HashMap::new();
    for e in &snap.expose {
        if e.protocol != Protocol::Http {
            tracing::warn!(listener = %e.listener, path = %e.path, protocol = e.protocol.as_str(), "expose path skipped: only http is supported");
            continue;
        }
        want.entry(e.listener)
            .or_default()
            .push((e.path.clone(), e.local_path_port));
    }
    want
}

impl Exposer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        stop: watch::Receiver<bool>,
        tracker: Tracker,
    ) -> Exposer {
        Exposer {
            shared,
            stop,
            tracker,
            running: HashMap::new(),
        }
    }

    /// Binds the current snapshot's expose listeners; any bind failure is
    /// an error (start-up refuses to run without its probe listeners).
    pub(crate) fn reconcile_initial(&mut self) -> io::Result<Vec<SocketAddr>> {
        let snap = self.shared.snapshot();
        let mut bound = Vec::new();
        for (addr, routes) in wanted(&snap) {
            bound.push(self.bind(addr, routes)?);
        }
        bound.sort();
        Ok(bound)
    }

    /// Follows the snapshot until stopped.
    pub(crate) async fn run(&mut self) {
        let mut rx = self.shared.subscribe();
        // A swap between the initial bind and now is caught up here.
        let snap = rx.borrow_and_update().clone();
        self.reconcile(&snap);
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = stopped(&mut stop) => break,
            }
            let snap = rx.borrow_and_update().clone();
            self.reconcile(&snap);
        }
        for (_, r) in self.running.drain() {
            r.stop.send_replace(true);
        }
    }

    fn reconcile(&mut self, snap: &Snapshot) {
        let mut want = wanted(snap);
        self.running.retain(|addr, r| match want.remove(addr) {
            None => {
                tracing::info!(%addr, "expose listener closed");
                r.stop.send_replace(true);
                false
            }
            Some(routes) => {
                r.routes.send_if_modified(|cur| {
                    let changed = **cur != routes;
                    if changed {
                        tracing::info!(%addr, paths = ?routes, "expose listener re-routed");
                        *cur = Arc::new(routes);
                    }
                    changed
                });
                true
            }
        });
        for (addr, routes) in want {
            if let Err(e) = self.bind(addr, routes) {
                self.shared
                    .metrics
                    .count("listener_bind_failures_total", "listener", "expose");
                tracing::error!(%addr, error = %e, "cannot bind expose listener");
            }
        }
    }

    fn bind(&mut self, addr: SocketAddr, routes: Vec<(String, u16)>) -> io::Result<SocketAddr> {
        // Bound by `Shared::apply` ahead of the swap, or now (start-up).
        let std = match self.shared.take_prebound(addr) {
            Some(l) => l,
            None => std::net::TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("expose listener {addr}: {e}")))?,
        };
        std.set_nonblocking(true)?;
        let l = TcpListener::from_std(std)?;
        let local = l.local_addr()?;
        tracing::info!(%addr, paths = ?routes, "expose listener bound");
        let (routes_tx, routes_rx) = watch::channel(Arc::new(routes));
        let (stop_tx, stop_rx) = watch::channel(false);
        // Stop with the admin thread as well as on removal.
        let mut all = self.stop.clone();
        let stop_one = stop_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stopped(&mut all) => { stop_one.send_replace(true); }
                // The listener and its connections are gone (removed).
                _ = stop_one.closed() => {}
            }
        });
        let shared = self.shared.clone();
        tokio::spawn(serve(
            l,
            "expose",
            move |req, peer| handle(req, peer, routes_rx.clone(), shared.clone()),
            stop_rx,
            self.tracker.clone(),
            MAX_CONNS,
        ));
        self.running.insert(
            addr,
            Running {
                routes: routes_tx,
                stop: stop_tx,
            },
        );
        Ok(local)
    }
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    routes: watch::Receiver<Routes>,
    shared: Arc<Shared>,
) -> Response<Body> {
    let started = Instant::now();
    let routes = routes.borrow().clone();
    let connect_timeout = shared.snapshot().timeouts.local_connect;
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let (port, resp) = respond(req, &routes, |port| async move {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
        }
    })
    .await;
    tracing::debug!(
        target: "veer::access",
        direction = "expose",
        peer = %peer,
        method = %method,
        path = %path,
        local_port = port,
        status = resp.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "expose request"
    );
    resp
}

/// The expose-path decision and forwarding for one request, with the
/// connection to the local app made by `dial(port)`: the path must equal
/// one of `routes` exactly (else 404 and the app sees nothing); the app gets
/// the request in origin form without hop-by-hop headers. Returns the port
/// used (0 for none) and the response.
async fn respond<B, D, F, S>(
    req: Request<B>,
    routes: &[(String, u16)],
    dial: D,
) -> (u16, Response<Body>)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    D: FnOnce(u16) -> F,
    F: Future<Output = io::Result<S>>,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let path = req.uri().path();
    let Some(port) = routes
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, port)| *port)
    else {
        return (0, text(StatusCode::NOT_FOUND, "no such expose path\n"));
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let resp = match dial(port).await {
        Ok(io) => forward(req, io, addr).await,
        Err(e) => bad_gateway(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("upstream connect error: {addr}: {e}"),
        ),
    };
    (port, resp)
}

/// Serves one HTTP/1 connection of an expose listener on `io`, reaching the
/// local app through `dial(port)`: the listeners' own request handling over
/// any byte stream, for fuzzing and in-memory tests.
#[doc(hidden)]
pub async fn serve_connection<I, D, F, S>(
    io: I,
    routes: Vec<(String, u16)>,
    dial: D,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    D: Fn(u16) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let routes = Arc::new(routes);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let routes = routes.clone();
        let dial = dial.clone();
        async move { Ok::<_, Infallible>(respond(req, &routes, dial).await.1) }
    });
    server_builder()
        .serve_connection(TokioIo::new(io), svc)
        .await
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), plus any the
/// `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
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

fn bad_gateway(status: StatusCode, msg: String) -> Response<Body> {
    tracing::debug!("expose: {msg}");
    text(status, format!("{msg}\n"))
}

async fn forward<B, S>(mut req: Request<B>, io: S, addr: SocketAddr) -> Response<Body>
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
