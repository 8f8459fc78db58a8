//! The xDS source: veer started in Envoy's place with a bootstrap.
//!
//! `run` (src/run.rs) drives it like the other sources: the bootstrap's
//! static listeners and the admin address (answering `503` until ready) are
//! bound first, then veer waits for the first configuration from
//! [`start_xds`], builds the snapshot from it, binds the data-plane
//! listeners and turns ready; later configurations are applied as they
//! come. Each configuration carries a channel on which veer answers whether
//! it was applied, so the ADS client can ACK or NACK.
use crate::run::{announce_ready, runtime, RunOpts, Source};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use veer_admin::lifecycle::Exit;
use veer_admin::static_http::{self, ListenerSpec, StaticListeners};
use veer_admin::{AdminAddrs, AdminServer, Lifecycle, PreInitAdmin, ShutdownOpts, Signals};
use veer_core::snapshot::Spec;
use veer_proxy::accept::Listeners;
use veer_proxy::state::Shared;
use veer_xds::ads::{AdsConfig, AdsStatus, NodeInfo, Server, Tls};
use veer_xds::bootstrap::{Addr, Bootstrap, PathMatch, RouteAction};
use veer_xds::translate::Translator;

/// What `veer envoy …` hands to `run`.
pub struct XdsStart {
    pub bootstrap: Bootstrap,
}

/// One complete configuration from the ADS client.
pub struct XdsUpdate {
    /// Compiled from the resources the client holds (the translation).
    pub spec: Spec,
    /// veer's answer: `Ok(snapshot version)` once the spec serves,
    /// `Err(reason)` when it was refused and the previous one keeps
    /// serving (the client NACKs with the reason). Dropping the receiver is
    /// allowed.
    pub applied: oneshot::Sender<Result<u64, String>>,
}

/// The running ADS client, as `run` sees it: a stream of configurations.
/// When the sender side is dropped the client has stopped for good (before
/// the first configuration that ends veer with an error; after it veer
/// keeps serving what it has).
pub struct XdsFeed {
    pub updates: mpsc::Receiver<XdsUpdate>,
    /// What the ADS client reports, for `/ready`, `/config_dump` and the
    /// metrics (through the lifecycle's control-plane hook).
    pub status: Arc<XdsStatus>,
}

/// The xDS source as a [`veer_admin::ControlPlaneStatus`]: upstreams in
/// force, how long the server has been away, NACKs and stream ends by
/// reason.
pub struct XdsStatus {
    metrics: Arc<veer_xds::ads::AdsMetrics>,
    /// Since when no stream has been open (after the first one; kept by
    /// [`follow_status`]).
    away_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// Upstreams in the snapshot in force.
    upstreams: std::sync::atomic::AtomicU64,
    /// The ADS client's report (resources and versions accepted, last
    /// replies, what a configuration waits for), borrowed when read: it
    /// holds every accepted resource's name and version, so a copy per
    /// response would cost as much as the mesh is large.
    last: tokio::sync::watch::Receiver<AdsStatus>,
}

impl XdsStatus {
    /// A status no client reports to (tests of the feed alone).
    #[cfg(test)]
    pub(crate) fn unconnected() -> Arc<XdsStatus> {
        Arc::new(XdsStatus {
            metrics: Default::default(),
            away_since: Default::default(),
            upstreams: Default::default(),
            last: tokio::sync::watch::channel(AdsStatus::default()).1,
        })
    }
}

impl veer_admin::ControlPlaneStatus for XdsStatus {
    fn control_plane(&self) -> veer_admin::ControlPlane {
        use std::sync::atomic::Ordering::Relaxed;
        let away = *self.away_since.lock().unwrap_or_else(|e| e.into_inner());
        let view_age = Some(away.map_or(Duration::ZERO, |t| t.elapsed()));
        let m = &self.metrics;
        let nacks = veer_xds::resources::Kind::ALL
            .iter()
            .map(|k| m.nacks.get(*k))
            .sum();
        let mut errors = vec![("nack", nacks)];
        for r in veer_xds::ads::RECONNECT_REASONS {
            errors.push((r, m.reconnects(r)));
        }
        veer_admin::ControlPlane {
            source: "xds",
            upstreams: self.upstreams.load(Relaxed),
            services: None,
            view_age,
            max_connections: 1,
            errors,
        }
    }

    fn waiting_for(&self) -> Vec<String> {
        self.last.borrow().waiting_for.clone()
    }

    /// The accepted xDS resources by kind with their versions, the last
    /// reply per kind (a NACK with its reason), refused resources, and why
    /// the last stream ended. Never a resource's content: the secrets carry
    /// private keys.
    fn detail(&self) -> Option<serde_json::Value> {
        let s = self.last.borrow();
        let resources: serde_json::Map<String, serde_json::Value> = s
            .versions
            .iter()
            .map(|(k, v)| (k.short().to_string(), serde_json::json!(v)))
            .collect();
        let last: serde_json::Map<String, serde_json::Value> = s
            .last
            .iter()
            .map(|(k, r)| {
                (
                    k.short().to_string(),
                    serde_json::json!({"nonce": r.nonce, "nack": r.nack}),
                )
            })
            .collect();
        Some(serde_json::json!({
            "connected": s.connected,
            "resources": resources,
            "last_replies": last,
            "refused": s.refused,
            "last_stream_error": s.last_error,
        }))
    }
}

/// Starts the Delta ADS client for `bootstrap` (node, ADS server address,
/// TLS CA, `x-consul-token` metadata) on the current tokio runtime. It
/// sends one [`XdsUpdate`] per complete configuration (translated into a
/// `Spec`) and ACKs or NACKs the response behind it from veer's answer.
pub fn start_xds(bootstrap: &Bootstrap) -> Result<XdsFeed, String> {
    let cfg = ads_config(bootstrap)?;
    let (tx, updates) = mpsc::channel::<XdsUpdate>(1);
    let (status, seen) = tokio::sync::watch::channel(AdsStatus::default());
    let xds_status = Arc::new(XdsStatus {
        metrics: cfg.metrics.clone(),
        away_since: Default::default(),
        upstreams: Default::default(),
        last: seen.clone(),
    });
    tokio::spawn(follow_status(seen, xds_status.clone()));
    tracing::info!(ads_server = %cfg.server, node = %cfg.node.id, "connecting to the xDS server");
    tokio::spawn(async move {
        // The client's callback is synchronous (it decides the ACK or NACK
        // of the response being handled); veer's answer comes from the task
        // that owns the snapshot, so wait for it off the async workers.
        let apply = move |spec: Spec| -> Result<(), String> {
            let (answer, answered) = oneshot::channel();
            tokio::task::block_in_place(|| {
                tx.blocking_send(XdsUpdate {
                    spec,
                    applied: answer,
                })
                .map_err(|_| "veer is stopping".to_string())?;
                match answered.blocking_recv() {
                    Ok(r) => r.map(|_| ()),
                    Err(_) => Err("veer is stopping".to_string()),
                }
            })
        };
        match veer_xds::ads::run(cfg, Translator::new(), apply, status).await {
            Ok(never) => match never {},
            Err(e) => tracing::error!("the ADS client cannot run: {e}"),
        }
    });
    Ok(XdsFeed {
        updates,
        status: xds_status,
    })
}

/// Keeps [`XdsStatus::away_since`]: set when the stream to the server
/// closes, cleared when one is open again.
async fn follow_status(mut seen: tokio::sync::watch::Receiver<AdsStatus>, status: Arc<XdsStatus>) {
    while seen.changed().await.is_ok() {
        let connected = seen.borrow_and_update().connected;
        let mut away = status.away_since.lock().unwrap_or_else(|e| e.into_inner());
        match (connected, *away) {
            (true, _) => *away = None,
            (false, None) => *away = Some(std::time::Instant::now()),
            (false, Some(_)) => {}
        }
    }
}

/// The ADS client's configuration from the bootstrap.
fn ads_config(b: &Bootstrap) -> Result<AdsConfig, String> {
    let server = match &b.ads.addr {
        Addr::Tcp(a) => Server::Tcp {
            host: a.ip().to_string(),
            port: a.port(),
        },
        Addr::Host(h, p) => Server::Tcp {
            host: h.clone(),
            port: *p,
        },
        Addr::Unix(p) => Server::Unix(p.clone()),
    };
    let node = NodeInfo {
        id: b.node.id.clone(),
        cluster: b.node.cluster.clone(),
        metadata: b.node.metadata.clone(),
    };
    let mut cfg = AdsConfig::new(server, node);
    cfg.metadata = b.ads.initial_metadata.clone();
    if let Some(t) = &b.ads.tls {
        cfg.tls = Some(Tls {
            ca_pem: t
                .ca
                .pem()
                .map_err(|e| format!("cluster {}: {e}", b.ads.cluster))?,
            server_name: t.sni.clone(),
        });
    }
    Ok(cfg)
}

/// Waits for the first configuration that builds a snapshot. A refused one
/// is answered `Err` and the wait goes on; a closed feed is an error.
pub async fn first(feed: &mut XdsFeed) -> Result<Arc<Shared>, String> {
    loop {
        let Some(u) = feed.updates.recv().await else {
            return Err("the ADS client stopped before the first configuration".into());
        };
        match Shared::new(u.spec) {
            Ok(shared) => {
                let _ = u.applied.send(Ok(shared.snapshot().version));
                return Ok(shared);
            }
            Err(e) => {
                tracing::error!("first configuration from xDS refused: {e}");
                let _ = u.applied.send(Err(e.to_string()));
            }
        }
    }
}

/// Applies every later configuration, answering each; returns when the
/// feed closes.
pub async fn follow(mut feed: XdsFeed, shared: Arc<Shared>) {
    while let Some(u) = feed.updates.recv().await {
        let answer = match shared.apply(u.spec) {
            Ok(s) => {
                feed.status.upstreams.store(
                    s.routes.upstreams().len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::info!(
                    version = s.version,
                    upstreams = s.routes.upstreams().len(),
                    intentions = s.intentions.rules().len(),
                    "snapshot applied (xds)"
                );
                Ok(s.version)
            }
            Err(e) => {
                tracing::error!("update from xDS rejected, keeping the current snapshot: {e}");
                Err(e.to_string())
            }
        };
        let _ = u.applied.send(answer);
    }
    tracing::error!("the ADS client stopped; serving the last configuration");
}

/// The bootstrap's static listeners as veer-admin listeners.
pub fn static_listeners(b: &Bootstrap) -> Vec<ListenerSpec> {
    b.listeners
        .iter()
        .map(|l| ListenerSpec {
            name: l.name.clone(),
            addr: l.addr,
            routes: l
                .routes
                .iter()
                .map(|r| static_http::Route {
                    path: match &r.path {
                        PathMatch::Exact(p) => static_http::PathMatch::Exact(p.clone()),
                        PathMatch::Prefix(p) => static_http::PathMatch::Prefix(p.clone()),
                    },
                    action: match &r.action {
                        RouteAction::Forward {
                            addr,
                            prefix_rewrite,
                            ..
                        } => static_http::Action::Forward {
                            addr: *addr,
                            prefix_rewrite: prefix_rewrite.clone(),
                        },
                        RouteAction::Direct { status, body } => static_http::Action::Direct {
                            status: *status,
                            body: body.clone(),
                        },
                    },
                })
                .collect(),
        })
        .collect()
}

/// The connect timeout of static routes: the longest of their clusters'
/// (Consul writes 5 s), else 5 s.
pub fn static_connect_timeout(b: &Bootstrap) -> Duration {
    b.clusters
        .iter()
        .filter(|c| {
            b.listeners.iter().any(|l| {
                l.routes.iter().any(|r| {
                    matches!(&r.action, RouteAction::Forward { cluster, .. } if *cluster == c.name)
                })
            })
        })
        .filter_map(|c| c.connect_timeout)
        .max()
        .unwrap_or(Duration::from_secs(5))
}

/// `run` for [`Source::Xds`]: binds the bootstrap's static listeners and
/// admin address at once (either taken is an error, as in Envoy), waits for
/// the first configuration with `/ready` answering 503, then serves and
/// follows like the other sources.
pub fn run(opts: RunOpts) -> ExitCode {
    let Source::Xds(start) = opts.source else {
        unreachable!("xds_source::run is called for Source::Xds only")
    };
    let b = start.bootstrap;
    let Some(rt) = runtime(opts.threads) else {
        return ExitCode::FAILURE;
    };
    let shutdown = ShutdownOpts {
        grace: opts.grace,
        min_wait: opts.min_wait,
    };
    let code = rt.block_on(async move {
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("veer: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        if !b.ignored.is_empty() {
            tracing::info!(settings = ?b.ignored, "bootstrap settings accepted but not applied");
        }
        if !b.unknown.is_empty() {
            tracing::warn!(fields = ?b.unknown, "unknown bootstrap fields ignored (--allow-unknown-static-fields)");
        }
        let addrs = AdminAddrs {
            admin: b.admin,
            prometheus: None,
        };
        // The admin first: a static route to `self_admin` must find it.
        let pre = match PreInitAdmin::start(
            addrs,
            "waiting for the first configuration from the xDS server",
        ) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("veer: {e}");
                return ExitCode::FAILURE;
            }
        };
        let statics = match StaticListeners::start(static_listeners(&b), static_connect_timeout(&b)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("veer: {e}");
                return ExitCode::FAILURE;
            }
        };
        let mut feed = match start_xds(&b) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("veer: xds: {e}");
                return ExitCode::FAILURE;
            }
        };
        pre.set_control_plane(feed.status.clone());
        tracing::info!(
            node = %b.node.id,
            ads_server = %b.ads.addr,
            admin = ?b.admin,
            static_listeners = ?statics.bound,
            "waiting for the first configuration from the xDS server"
        );
        let shared = tokio::select! {
            r = first(&mut feed) => match r {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("veer: xds: {e}");
                    return ExitCode::FAILURE;
                }
            },
            sig = signals.recv() => {
                tracing::info!(signal = sig, "stopped before the first configuration arrived");
                return ExitCode::SUCCESS;
            }
            _ = pre.quit_requested() => {
                tracing::info!("POST /quitquitquit before the first configuration arrived");
                pre.stop();
                return ExitCode::SUCCESS;
            }
        };
        pre.stop();
        // The bootstrap's stats tags name the envoy_* metrics' labels, as
        // they do Envoy's (checked when the bootstrap was parsed).
        shared.metrics.envoy.set_rules(
            b.stats_config
                .as_ref()
                .and_then(|sc| veer_core::stats_tags::TagRules::from_stats_config(sc).ok())
                .unwrap_or_default(),
        );
        let lifecycle = Lifecycle::new();
        // consul-dataplane drains with /drain_listeners, waits its grace
        // period, then calls /quitquitquit expecting Envoy's prompt exit.
        lifecycle.set_quit_exits_now();
        feed.status.upstreams.store(
            shared.snapshot().routes.upstreams().len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        lifecycle.set_control_plane(feed.status.clone());
        lifecycle.set_snapshot_applied();
        let admin = match AdminServer::start(addrs, shared.clone(), lifecycle.clone()) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("veer: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listeners = match Listeners::start(shared.clone()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("veer: {e}");
                return ExitCode::FAILURE;
            }
        };
        lifecycle.set_listeners_bound();
        announce_ready(&shared, &lifecycle, &admin);
        tokio::spawn(follow(feed, shared.clone()));
        // An expired leaf says so (/ready LEAF_EXPIRED, a metric), as in
        // the other modes.
        tokio::spawn(Lifecycle::watch_leaf(shared.clone()));
        // The decoded responses behind a swap are freed; hand the heap
        // they leave back to the kernel, as the other sources do.
        tokio::spawn(veer_proxy::state::release_heap_after_swaps(
            shared.clone(),
            crate::run::RELEASE_HEAP_AFTER,
        ));
        let exit = match lifecycle
            .drive(&shared, &listeners, shutdown, Some(signals))
            .await
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("veer: lifecycle: {e}");
                listeners.stop_all();
                return ExitCode::FAILURE;
            }
        };
        if exit != Exit::Immediate {
            admin.stop();
        }
        statics.stop();
        tracing::info!(?exit, "veer stopped");
        ExitCode::SUCCESS
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

#[cfg(test)]
mod tests;
