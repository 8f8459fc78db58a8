//! The admin endpoint and the Prometheus listener, on their own thread.
//!
//! Admin (default `127.0.0.1:19000`, as Envoy's under Consul):
//!
//! | route | |
//! |---|---|
//! | `GET /ready` | `200 LIVE` when ready; `503 PRE_INITIALIZING` / `503 LEAF_EXPIRED` / `503 DRAINING`; header `veer-service: <service>` |
//! | `GET /stats/prometheus`, `GET /metrics` | metrics, Prometheus text format |
//! | `GET /config_dump` | the current snapshot as JSON (no private keys) |
//! | `POST /drain` (alias `POST /drain_listeners`) | stop accepting inbound; outbound keeps serving |
//!
//! `POST /drain_listeners` is consul-dataplane's call
//! (`?inboundonly&graceful`, and `&skip_exit` since 2026): veer always
//! drains the inbound listener only and never exits because of a drain
//! (the exit is `/quitquitquit`'s or a signal's), so the query parameters
//! change nothing and are accepted. Without `inboundonly` Envoy would also
//! drain its outbound listeners; veer keeps them serving the app. The
//! `?include_eds` of `GET /config_dump` is accepted too: the dump always
//! holds the upstream endpoints.
//! | `POST /quitquitquit` | graceful exit (as SIGTERM); in Envoy's place (xDS), an immediate exit, as Envoy's |
//!
//! The Prometheus listener (Consul's `envoy_prometheus_bind_addr`, usually
//! `0.0.0.0:20200`) serves only the read-only `/stats/prometheus`,
//! `/metrics` and `/ready`, so it can face the network.
//!
//! Both run, with the expose-path listeners, on one thread with a
//! current-thread runtime: the data plane's workers never delay them, and
//! they never take a data-plane worker.
use crate::expose::Exposer;
use crate::http::{respond, serve, stopped, text, Body, Tracker};
use crate::lifecycle::{ControlPlane, ControlPlaneStatus, Lifecycle, Request};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Response, StatusCode};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use veer_proxy::state::Shared;

/// Connections each admin-thread listener serves at once.
const MAX_CONNS: usize = 256;
/// How long [`AdminServer::stop`] lets in-flight requests finish.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Where to listen; `None` is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdminAddrs {
    pub admin: Option<SocketAddr>,
    pub prometheus: Option<SocketAddr>,
}

/// The running admin thread.
pub struct AdminServer {
    /// The bound admin address (port 0 resolved).
    pub admin: Option<SocketAddr>,
    pub prometheus: Option<SocketAddr>,
    /// The expose-path listeners bound at start.
    pub expose: Vec<SocketAddr>,
    thread: AdminThread,
}

/// A thread serving listeners until told to stop; told on drop too.
struct AdminThread {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminThread {
    /// Stops the listeners, lets in-flight requests finish (up to
    /// [`STOP_WAIT`]) and joins the thread.
    fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminThread {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

struct Ctx {
    shared: Arc<Shared>,
    lifecycle: Arc<Lifecycle>,
}

fn bind(addr: SocketAddr, what: &str) -> io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| veer_proxy::net::BindError::wrap(e, format!("{what} listener"), addr))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl AdminServer {
    /// Binds the admin and Prometheus listeners and the snapshot's expose
    /// paths, and serves them on a new thread. Fails when any of them
    /// cannot bind.
    pub fn start(
        addrs: AdminAddrs,
        shared: Arc<Shared>,
        lifecycle: Arc<Lifecycle>,
    ) -> io::Result<AdminServer> {
        let admin = addrs.admin.map(|a| bind(a, "admin")).transpose()?;
        let prom = addrs
            .prometheus
            .map(|a| bind(a, "prometheus"))
            .transpose()?;
        let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
        let prom_addr = prom.as_ref().map(|l| l.local_addr()).transpose()?;
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<SocketAddr>>>(1);
        let thread = std::thread::Builder::new()
            .name("veer-admin".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let tracker = Tracker::default();
                    let ctx = Arc::new(Ctx {
                        shared: shared.clone(),
                        lifecycle,
                    });
                    let mut exposer = Exposer::new(shared, stop_rx.clone(), tracker.clone());
                    let bound = match exposer.reconcile_initial() {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    for (l, what, handler) in [
                        (admin, "admin", admin_routes as Routes),
                        (prom, "prometheus", prometheus_routes as Routes),
                    ] {
                        let Some(l) = l else { continue };
                        let l = match TcpListener::from_std(l) {
                            Ok(l) => l,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                        let ctx = ctx.clone();
                        tokio::spawn(serve(
                            l,
                            what,
                            move |req, _peer| handler(req, ctx.clone()),
                            stop_rx.clone(),
                            tracker.clone(),
                            MAX_CONNS,
                        ));
                    }
                    let _ = ready_tx.send(Ok(bound));
                    let mut stop_rx = stop_rx;
                    tokio::select! {
                        _ = exposer.run() => {}
                        _ = stopped(&mut stop_rx) => {}
                    }
                    // The exposer holds a handle on the tracker: dropped
                    // first, or waiting for idle always takes STOP_WAIT.
                    drop(exposer);
                    let _ = tokio::time::timeout(STOP_WAIT, tracker.idle()).await;
                });
            })?;
        let expose = match ready_rx.recv() {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(io::Error::other("the admin thread failed to start"));
            }
        };
        if let Some(a) = admin_addr {
            tracing::info!(addr = %a, "admin endpoint listening");
        }
        if let Some(a) = prom_addr {
            tracing::info!(addr = %a, "prometheus endpoint listening");
        }
        Ok(AdminServer {
            admin: admin_addr,
            prometheus: prom_addr,
            expose,
            thread: AdminThread {
                stop,
                thread: Some(thread),
            },
        })
    }

    /// Stops every listener on the admin thread, lets in-flight requests
    /// (such as the `/quitquitquit` that caused the exit) finish for up to
    /// a second, and joins the thread.
    pub fn stop(self) {
        self.thread.stop();
    }
}

/// The admin and Prometheus addresses while veer waits for its first
/// complete configuration (from the Consul agent or the xDS server):
/// `/ready` answers `503 PRE_INITIALIZING` with what veer is waiting for,
/// so probes and `veer await-ready` get an answer rather than a refused
/// connection; `/stats/prometheus` (`veer_ready 0` and the control-plane
/// source's metrics) and `/config_dump` (the source's view) answer `200`,
/// as Envoy's do before it is initialized; everything else `503`. Stopped
/// (and its ports freed) just before the real admin endpoint binds them.
///
/// `POST /quitquitquit` is the exception: it answers `200 OK` and is
/// reported by [`PreInitAdmin::quit_requested`] (consul-dataplane calls it
/// at shutdown whether or not a configuration ever arrived).
pub struct PreInitAdmin {
    pub admin: Option<SocketAddr>,
    thread: AdminThread,
    quit: watch::Receiver<bool>,
    control_plane: Arc<std::sync::OnceLock<Arc<dyn ControlPlaneStatus>>>,
}

impl PreInitAdmin {
    pub fn start(addrs: AdminAddrs, waiting_for: &str) -> io::Result<PreInitAdmin> {
        let listeners = [addrs.admin, addrs.prometheus]
            .into_iter()
            .flatten()
            .map(|a| bind(a, "admin"))
            .collect::<io::Result<Vec<_>>>()?;
        let admin = match (addrs.admin, listeners.first()) {
            (Some(_), Some(l)) => Some(l.local_addr()?),
            _ => None,
        };
        let (stop, stop_rx) = watch::channel(false);
        let (quit_tx, quit) = watch::channel(false);
        let quit_tx = Arc::new(quit_tx);
        let body: Arc<str> = format!("PRE_INITIALIZING: {waiting_for}\n").into();
        let control_plane: Arc<std::sync::OnceLock<Arc<dyn ControlPlaneStatus>>> =
            Default::default();
        let cp_all = control_plane.clone();
        let started = std::time::Instant::now();
        let thread = std::thread::Builder::new()
            .name("veer-admin-pre".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let tracker = Tracker::default();
                    for l in listeners {
                        let Ok(l) = TcpListener::from_std(l) else {
                            continue;
                        };
                        let body = body.clone();
                        let quit_tx = quit_tx.clone();
                        let cp_all = cp_all.clone();
                        tokio::spawn(serve(
                            l,
                            "admin",
                            move |req: hyper::Request<Incoming>, _peer| {
                                let get = req.method() == Method::GET
                                    || req.method() == Method::HEAD;
                                let post = req.method() == Method::POST;
                                let cp = cp_all.get();
                                let resp = match req.uri().path() {
                                    "/quitquitquit" if post => {
                                        tracing::info!(
                                            "admin: exit requested before the first configuration"
                                        );
                                        quit_tx.send_replace(true);
                                        text(StatusCode::OK, "OK\n")
                                    }
                                    "/ready" if get => text(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        pre_init_ready(&body, cp),
                                    ),
                                    "/stats/prometheus" | "/metrics" if get => respond(
                                        StatusCode::OK,
                                        PROMETHEUS_TYPE,
                                        render_pre_init(cp, started),
                                    ),
                                    "/config_dump" if get => {
                                        let dump = serde_json::json!({
                                            "state": "PRE_INITIALIZING",
                                            "waiting": body.trim_end().trim_start_matches("PRE_INITIALIZING: "),
                                            "control_plane": cp.map(control_plane_dump),
                                        });
                                        let mut b = serde_json::to_vec_pretty(&dump).unwrap_or_default();
                                        b.push(b'\n');
                                        respond(StatusCode::OK, "application/json", b)
                                    }
                                    _ => text(StatusCode::SERVICE_UNAVAILABLE, body.as_bytes().to_vec()),
                                };
                                async move { resp }
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
        Ok(PreInitAdmin {
            admin,
            thread: AdminThread {
                stop,
                thread: Some(thread),
            },
            quit,
            control_plane,
        })
    }

    /// Registers the control-plane source, so that `/ready`, the metrics
    /// and `/config_dump` say why veer is not ready yet.
    pub fn set_control_plane(&self, s: Arc<dyn ControlPlaneStatus>) {
        let _ = self.control_plane.set(s);
    }

    /// Resolves once `POST /quitquitquit` was received.
    pub async fn quit_requested(&self) {
        let mut q = self.quit.clone();
        let _ = q.wait_for(|q| *q).await;
    }

    /// Closes the listeners and joins the thread.
    pub fn stop(self) {
        self.thread.stop();
    }
}

type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>;
type Routes = fn(hyper::Request<Incoming>, Arc<Ctx>) -> Fut;

const PROMETHEUS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn admin_routes(req: hyper::Request<Incoming>, ctx: Arc<Ctx>) -> Fut {
    Box::pin(async move {
        let m = req.method().clone();
        let get = m == Method::GET || m == Method::HEAD;
        let post = m == Method::POST;
        match req.uri().path() {
            "/ready" if get => ready(&ctx),
            "/stats/prometheus" | "/metrics" if get => metrics(&ctx),
            "/config_dump" if get => config_dump(&ctx),
            "/drain" | "/drain_listeners" if post => {
                ctx.lifecycle.request(Request::Drain);
                tracing::info!("admin: drain requested");
                text(StatusCode::OK, "OK\n")
            }
            "/quitquitquit" if post => {
                let r = ctx.lifecycle.quit_request();
                ctx.lifecycle.request(r);
                if r == Request::Now {
                    tracing::info!(
                        "admin: exit requested (/quitquitquit exits at once, as Envoy's)"
                    );
                } else {
                    tracing::info!("admin: graceful exit requested");
                }
                text(StatusCode::OK, "OK\n")
            }
            "/" if get => text(StatusCode::OK, INDEX),
            "/ready" | "/stats/prometheus" | "/metrics" | "/config_dump" | "/" => {
                not_allowed("GET, HEAD")
            }
            "/drain" | "/drain_listeners" | "/quitquitquit" => not_allowed("POST"),
            _ => text(StatusCode::NOT_FOUND, "not found; see GET /\n"),
        }
    })
}

fn prometheus_routes(req: hyper::Request<Incoming>, ctx: Arc<Ctx>) -> Fut {
    Box::pin(async move {
        let m = req.method().clone();
        let get = m == Method::GET || m == Method::HEAD;
        match req.uri().path() {
            "/ready" if get => ready(&ctx),
            "/stats/prometheus" | "/metrics" if get => metrics(&ctx),
            "/ready" | "/stats/prometheus" | "/metrics" => not_allowed("GET, HEAD"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    })
}

const INDEX: &str = "veer admin\n\
GET  /ready             200 when ready, 503 before and while draining\n\
GET  /stats/prometheus  metrics (also /metrics)\n\
GET  /config_dump       the current snapshot as JSON\n\
POST /drain             stop accepting inbound connections; outbound keeps serving\n\
POST /quitquitquit      graceful exit: drain, wait for connections (grace period), exit\n";

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

fn ready(ctx: &Ctx) -> Response<Body> {
    let r = ctx.lifecycle.readiness(&ctx.shared);
    let mut resp = if r.ready {
        match ctx.lifecycle.control_plane() {
            None => text(StatusCode::OK, "LIVE\n"),
            Some(cp) => text(StatusCode::OK, format!("LIVE\n{}\n", describe(&cp))),
        }
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}: {}\n", r.state, r.missing.join(", ")),
        )
    };
    // Which sidecar answers (`veer await-ready --service`).
    if let Ok(v) = HeaderValue::from_str(&ctx.shared.snapshot().identity.service) {
        resp.headers_mut().insert(crate::client::SERVICE_HEADER, v);
    }
    resp
}

/// One line about the control plane's view, for `/ready`.
fn describe(cp: &ControlPlane) -> String {
    let age = match cp.view_age {
        None => "never in sync".to_string(),
        Some(d) if d.is_zero() => "in sync".to_string(),
        Some(d) => format!("last in sync {}s ago", d.as_secs()),
    };
    let services = cp
        .services
        .map(|n| format!(" of {n} services"))
        .unwrap_or_default();
    format!("{}: {} upstreams{services}, {age}", cp.source, cp.upstreams)
}

fn control_plane_json(cp: &ControlPlane) -> serde_json::Value {
    serde_json::json!({
        "source": cp.source,
        "upstreams": cp.upstreams,
        "services": cp.services,
        "in_sync": cp.view_age.is_some_and(|d| d.is_zero()),
        "view_age_seconds": cp.view_age.map(|d| d.as_secs_f64()),
        "max_connections": cp.max_connections,
        "errors": cp.errors.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The Prometheus text: the data plane's counters, then process and
/// lifecycle gauges.
pub fn render_metrics(shared: &Shared, lifecycle: &Lifecycle) -> String {
    use veer_proxy::metrics::{max_fds, open_fds};
    let snap = shared.snapshot();
    let ready = lifecycle.readiness(shared).ready;
    let nan = f64::NAN;
    let extra: [(&str, &str, f64); 8] = [
        (
            "open_fds",
            "Open file descriptors of the process.",
            open_fds().map_or(nan, |n| n as f64),
        ),
        (
            "max_fds",
            "The process's limit on open file descriptors.",
            max_fds().map_or(nan, |n| n as f64),
        ),
        (
            "snapshot_age_seconds",
            "Seconds since the current snapshot was applied.",
            shared.snapshot_age_secs() as f64,
        ),
        (
            "snapshot_version",
            "Version of the current snapshot (increases with every swap).",
            snap.version as f64,
        ),
        (
            "leaf_expiry_seconds",
            "Seconds until the leaf certificate expires (negative once expired).",
            (snap.tls.leaf.not_after - unix_now()) as f64,
        ),
        (
            "ready",
            "1 when /ready answers 200.",
            if ready { 1.0 } else { 0.0 },
        ),
        (
            "draining",
            "1 once a drain or a shutdown began.",
            if lifecycle.current() >= Request::Drain {
                1.0
            } else {
                0.0
            },
        ),
        (
            "uptime_seconds",
            "Seconds since the process started serving.",
            shared.now_ms() as f64 / 1000.0,
        ),
    ];
    shared.refresh_envoy_stats(lifecycle.current() < Request::Drain);
    let mut out = shared.metrics.render(&extra);
    if let Some(cp) = lifecycle.control_plane() {
        render_control_plane(&mut out, &cp);
    }
    out
}

/// The `veer_control_plane_*` metrics of a source's status.
fn render_control_plane(out: &mut String, cp: &ControlPlane) {
    use std::fmt::Write;
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = write!(
            out,
            "# HELP veer_control_plane_{name} {help}\n# TYPE veer_control_plane_{name} gauge\nveer_control_plane_{name} {v}\n"
        );
    };
    gauge(
        "upstreams",
        "Upstreams in the last configuration from the control plane.",
        cp.upstreams as f64,
    );
    gauge(
        "services",
        "Services the control plane source follows.",
        cp.services.map_or(f64::NAN, |n| n as f64),
    );
    gauge(
        "view_age_seconds",
        "How old the control plane view is: 0 while in sync (NaN before the first sync).",
        cp.view_age.map_or(f64::NAN, |d| d.as_secs_f64()),
    );
    gauge(
        "max_connections",
        "Connections to the control plane the source may hold at most.",
        cp.max_connections as f64,
    );
    let _ = write!(
        out,
        "# HELP veer_control_plane_errors_total Errors talking to the control plane, by kind.\n# TYPE veer_control_plane_errors_total counter\n"
    );
    for (kind, n) in &cp.errors {
        let _ = writeln!(
            out,
            "veer_control_plane_errors_total{{source=\"{}\",kind=\"{kind}\"}} {n}",
            cp.source
        );
    }
}

/// The metrics served before the first configuration: not ready, the
/// process's uptime, and what the control-plane source reports (why it is
/// not ready yet), so that scrapes succeed from the start as Envoy's do.
fn render_pre_init(
    cp: Option<&Arc<dyn ControlPlaneStatus>>,
    started: std::time::Instant,
) -> String {
    let mut out = format!(
        "# HELP veer_ready 1 when /ready answers 200.\n# TYPE veer_ready gauge\nveer_ready 0\n\
         # HELP veer_process_uptime_seconds Seconds since the process started.\n# TYPE veer_process_uptime_seconds gauge\nveer_process_uptime_seconds {}\n\
         # HELP envoy_server_live 1 once the server is live (Envoy's server.live).\n# TYPE envoy_server_live gauge\nenvoy_server_live 0\n",
        started.elapsed().as_secs_f64()
    );
    if let Some(cp) = cp {
        render_control_plane(&mut out, &cp.control_plane());
    }
    out
}

/// `/ready`'s text before the first configuration.
fn pre_init_ready(body: &str, cp: Option<&Arc<dyn ControlPlaneStatus>>) -> String {
    let mut out = body.to_string();
    if let Some(cp) = cp {
        out.push_str(&describe(&cp.control_plane()));
        out.push('\n');
        let waiting = cp.waiting_for();
        if !waiting.is_empty() {
            out.push_str(&format!("waiting for: {}\n", waiting.join(", ")));
        }
    }
    out
}

/// `control_plane` in `/config_dump`: the summary and the source's detail.
fn control_plane_dump(status: &Arc<dyn ControlPlaneStatus>) -> serde_json::Value {
    let mut v = control_plane_json(&status.control_plane());
    let waiting = status.waiting_for();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("waiting_for".into(), serde_json::json!(waiting));
        if let Some(serde_json::Value::Object(d)) = status.detail() {
            obj.extend(d);
        }
    }
    v
}

fn metrics(ctx: &Ctx) -> Response<Body> {
    respond(
        StatusCode::OK,
        PROMETHEUS_TYPE,
        render_metrics(&ctx.shared, &ctx.lifecycle),
    )
}

fn config_dump(ctx: &Ctx) -> Response<Body> {
    let mut dump = ctx.shared.snapshot().dump();
    if let (Some(cp), Some(obj)) = (ctx.lifecycle.control_plane_status(), dump.as_object_mut()) {
        obj.insert("control_plane".into(), control_plane_dump(cp));
    }
    let mut body = serde_json::to_vec_pretty(&dump).unwrap_or_default();
    body.push(b'\n');
    respond(StatusCode::OK, "application/json", body)
}
