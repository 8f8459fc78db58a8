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
//!
//! Routing and forwarding are [`crate::static_http`]'s: each expose path is
//! an exact-path route forwarding to `127.0.0.1:<local_path_port>`.
use crate::http::{serve, server_builder, stopped, Body, Tracker};
use crate::static_http::{self, Action, PathMatch, Route};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use veer_core::route::Protocol;
use veer_core::snapshot::Snapshot;
use veer_proxy::state::Shared;

/// Connections one expose listener serves at once.
const MAX_CONNS: usize = 128;

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
        // A swap between the initial bind and now is caught up here. (Not
        // kept in a variable: this future would hold that snapshot, the
        // first one, for the life of the process.)
        let first = rx.borrow_and_update().clone();
        self.reconcile(&first);
        drop(first);
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
                .map_err(|e| veer_proxy::net::BindError::wrap(e, "expose listener", addr))?,
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
    let (port, resp) = respond(req, &routes, |port| {
        static_http::dial_tcp(SocketAddr::from(([127, 0, 0, 1], port)), connect_timeout)
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

/// Expose paths as static routes: exact path -> 127.0.0.1:port.
fn as_routes(routes: &[(String, u16)]) -> Vec<Route> {
    routes
        .iter()
        .map(|(p, port)| Route {
            path: PathMatch::Exact(p.clone()),
            action: Action::Forward {
                addr: SocketAddr::from(([127, 0, 0, 1], *port)),
                prefix_rewrite: None,
            },
        })
        .collect()
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
    let (to, resp) = static_http::respond(
        req,
        &as_routes(routes),
        "no such expose path\n",
        |a: SocketAddr| dial(a.port()),
    )
    .await;
    (to.map_or(0, |a| a.port()), resp)
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
