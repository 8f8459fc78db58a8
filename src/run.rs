//! `veer run`: start from a configuration file or from the Consul agent,
//! serve, follow changes, shut down.
//!
//! Start-up binds everything at once (admin, Prometheus and expose
//! listeners on the admin thread, then the inbound and outbound listeners)
//! and reports readiness: `/ready` turns 200, systemd gets `READY=1`, the
//! log says "veer ready". Configured by Consul, veer first waits for a
//! complete configuration; meanwhile the admin (and Prometheus) addresses
//! answer `503 PRE_INITIALIZING` and SIGTERM or SIGINT exit at once. The
//! Prometheus listener follows the registration's
//! `envoy_prometheus_bind_addr` unless `--prometheus-bind` is given. From
//! then on the lifecycle controller
//! ([`veer_admin::Lifecycle`]) owns draining and exiting, whether asked by
//! a signal or by the admin endpoint.
use crate::file_source;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use veer_admin::lifecycle::Exit;
use veer_admin::{AdminAddrs, AdminServer, Lifecycle, PreInitAdmin, ShutdownOpts, Signals};
use veer_core::config::{AdminBind, AdminSpec};
use veer_proxy::accept::Listeners;
use veer_proxy::state::Shared;

/// How long after start and after each snapshot swap veer hands the heap
/// the swap freed back to the kernel ([`veer_proxy::state::release_heap_after_swaps`]):
/// by then the source has dropped that update's buffers, and a burst of
/// swaps shares one trim.
pub(crate) const RELEASE_HEAP_AFTER: Duration = Duration::from_secs(2);

/// Where snapshots come from.
pub enum Source {
    /// A TOML file, reloaded when it or a file it names changes, or on SIGHUP.
    File(PathBuf),
    /// The local Consul agent (`--proxy-id` / `--sidecar-for`).
    Consul(Box<veer_consul::Flags>),
    /// An xDS server, from an Envoy bootstrap (veer in Envoy's place); run
    /// by [`crate::xds_source::run`].
    Xds(Box<crate::xds_source::XdsStart>),
}

/// What `veer run` was asked to do.
pub struct RunOpts {
    pub source: Source,
    pub threads: usize,
    pub grace: Duration,
    pub min_wait: Duration,
    /// `--admin-bind`, overriding the file.
    pub admin_bind: Option<AdminBind>,
    /// `--prometheus-bind`, overriding the file.
    pub prometheus_bind: Option<AdminBind>,
}

/// The admin addresses: the command line over the file over the defaults.
fn admin_addrs(file: &AdminSpec, opts: &RunOpts) -> AdminAddrs {
    let admin = opts.admin_bind.unwrap_or(file.bind);
    let prometheus = match opts.prometheus_bind {
        Some(b) => b.addr().filter(|_| b != AdminBind::Default),
        None => file.prometheus_bind,
    };
    AdminAddrs {
        admin: admin.addr(),
        prometheus,
    }
}

/// What to tell an operator whose admin (or Prometheus) address is taken.
fn admin_clash(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        format!(
            "{e}; is another sidecar's admin endpoint there? Give each sidecar its own \
             --admin-bind (VEER_ADMIN_BIND, [admin] bind) or \"\" to turn it off"
        )
    } else {
        e.to_string()
    }
}

/// Where a listener that cannot bind is configured, from `keys` (address,
/// `file:line: key` or a flag), when `e` is a bind failure of one of them.
fn bind_key<'a>(e: &std::io::Error, keys: &'a [(SocketAddr, String)]) -> Option<&'a str> {
    let b = veer_proxy::net::BindError::of(e)?;
    keys.iter()
        .find(|(a, _)| *a == b.addr)
        .map(|(_, k)| k.as_str())
}

/// The listen addresses the file sets and the flags over them, with where
/// each is set: the flags first, as they win.
fn listener_keys(file: &[(SocketAddr, String)], opts: &RunOpts) -> Vec<(SocketAddr, String)> {
    let mut keys = Vec::new();
    for (flag, b) in [
        ("--admin-bind", opts.admin_bind),
        (
            "--prometheus-bind",
            opts.prometheus_bind.filter(|b| *b != AdminBind::Default),
        ),
    ] {
        if let Some(a) = b.and_then(|b| b.addr()) {
            keys.push((a, flag.to_string()));
        }
    }
    keys.extend(file.iter().cloned());
    keys
}

/// The Consul source's counts for `/ready`, `/config_dump` and metrics.
struct ConsulStatus(Arc<veer_consul::Status>);

impl veer_admin::ControlPlaneStatus for ConsulStatus {
    fn control_plane(&self) -> veer_admin::ControlPlane {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.0;
        let services = s.catalog_services.load(Relaxed);
        veer_admin::ControlPlane {
            source: "consul",
            upstreams: s.upstreams.load(Relaxed),
            services: (services > 0).then_some(services),
            view_age: s.view_age(),
            max_connections: s.max_connections.load(Relaxed),
            errors: vec![
                ("unreachable", s.unreachable_errors.load(Relaxed)),
                ("closed", s.closed_errors.load(Relaxed)),
            ],
        }
    }
}

/// The first snapshot's spec and what keeps following the source.
enum Follow {
    File {
        path: PathBuf,
        files: Vec<PathBuf>,
        stamp: file_source::Stamp,
    },
    Consul(Box<veer_consul::ConsulSource>),
}

pub fn run(opts: RunOpts) -> ExitCode {
    if let Source::Xds(_) = &opts.source {
        return crate::xds_source::run(opts);
    }
    // A file is read (and refused, naming key and line) before anything starts.
    let loaded = match &opts.source {
        Source::File(path) => match veer_core::config::load(path) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("veer: {e}");
                return ExitCode::from(2);
            }
        },
        Source::Consul(_) | Source::Xds(_) => None,
    };
    let Some(rt) = runtime(opts.threads) else {
        return ExitCode::FAILURE;
    };
    let shutdown = ShutdownOpts {
        grace: opts.grace,
        min_wait: opts.min_wait,
    };
    let code = rt.block_on(async move {
        // First, so that a SIGTERM during start-up is acted on, not fatal.
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("veer: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        // SIGHUP (reload) is handled by the file source once it runs; from
        // here on an early one is ignored rather than fatal.
        let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        // Both sources hand over only complete specs (leaf, roots, the lot):
        // nothing serves with a half-built snapshot.
        let mut keys = Vec::new();
        let (spec, admin_spec, follow, what) = match (&opts.source, loaded) {
            (Source::File(path), Some(l)) => {
                keys = listener_keys(&l.listeners, &opts);
                (
                    l.spec,
                    l.admin,
                    Follow::File {
                        path: path.clone(),
                        stamp: file_source::stamp(&l.files),
                        files: l.files,
                    },
                    path.display().to_string(),
                )
            }
            (Source::Consul(flags), _) => {
                let mut source = match veer_consul::Options::from_env_and_flags(flags)
                    .and_then(veer_consul::ConsulSource::new)
                {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("veer: consul: {e}");
                        return ExitCode::from(2);
                    }
                };
                tracing::info!(
                    "waiting for the first complete configuration from the Consul agent"
                );
                // Until then /ready answers 503 rather than refusing.
                let addrs = admin_addrs(&AdminSpec::default(), &opts);
                let pre = match PreInitAdmin::start(
                    addrs,
                    "waiting for the first complete configuration from the Consul agent",
                ) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        eprintln!("veer: {}", admin_clash(&e));
                        return ExitCode::FAILURE;
                    }
                };
                if let Some(p) = &pre {
                    p.set_control_plane(Arc::new(ConsulStatus(source.status())));
                }
                let spec = tokio::select! {
                    r = source.first() => match r {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("veer: consul: {e}");
                            return ExitCode::from(2);
                        }
                    },
                    sig = signals.recv() => {
                        tracing::info!(signal = sig, "stopped before the first configuration arrived");
                        return ExitCode::SUCCESS;
                    }
                };
                if let Some(p) = pre {
                    p.stop();
                }
                let what = format!("consul proxy {}", source.proxy_id().unwrap_or("-"));
                // Consul's envoy_prometheus_bind_addr, unless the command
                // line says otherwise.
                let admin = AdminSpec {
                    prometheus_bind: source.prometheus_bind(),
                    ..AdminSpec::default()
                };
                (spec, admin, Follow::Consul(Box::new(source)), what)
            }
            (Source::File(_), None) => unreachable!("a file source is loaded above"),
            (Source::Xds(_), _) => unreachable!("run by xds_source::run"),
        };
        let addrs = admin_addrs(&admin_spec, &opts);
        let shared = match Shared::new(spec) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("veer: {what}: {e}");
                return ExitCode::from(2);
            }
        };
        let lifecycle = Lifecycle::new();
        if let Follow::Consul(source) = &follow {
            lifecycle.set_control_plane(Arc::new(ConsulStatus(source.status())));
        }
        lifecycle.set_snapshot_applied();
        // A taken admin address is an error, as with Envoy: running on
        // without it would let `veer await-ready` and probes reach another
        // sidecar's admin endpoint and take it for this one.
        // A listener that cannot bind is named by its key and line when
        // the file sets it (by the flag, when one does).
        let admin = match AdminServer::start(addrs, shared.clone(), lifecycle.clone()) {
            Ok(a) => a,
            Err(e) => {
                let at = bind_key(&e, &keys).unwrap_or(&what);
                eprintln!("veer: {at}: {}", admin_clash(&e));
                return ExitCode::FAILURE;
            }
        };
        let listeners = match Listeners::start(shared.clone()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("veer: {}: {e}", bind_key(&e, &keys).unwrap_or(&what));
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(Lifecycle::watch_leaf(shared.clone()));
        tokio::spawn(veer_proxy::state::release_heap_after_swaps(
            shared.clone(),
            RELEASE_HEAP_AFTER,
        ));
        lifecycle.set_listeners_bound();
        announce_ready(&shared, &lifecycle, &admin);
        match follow {
            Follow::File { path, files, stamp } => {
                tokio::spawn(file_source::watch(path, files, stamp, shared.clone()));
            }
            Follow::Consul(source) => {
                let sh = shared.clone();
                tokio::spawn(source.run(move |spec| match sh.apply(spec) {
                    Ok(s) => tracing::info!(
                        version = s.version,
                        upstreams = s.routes.upstreams().len(),
                        intentions = s.intentions.rules().len(),
                        leaf_serial = %s.tls.leaf.serial,
                        "snapshot applied (consul)"
                    ),
                    Err(e) => tracing::error!(
                        "update from consul rejected, keeping the current snapshot: {e}"
                    ),
                }));
            }
        }
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
            // Let the admin request that asked for the exit get its answer.
            // (Blocks this thread for at most a second; the workers run on.)
            admin.stop();
        }
        tracing::info!(?exit, "veer stopped");
        ExitCode::SUCCESS
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    code
}

/// The data plane's multi-threaded runtime (`--concurrency` workers), or
/// `None` after saying why it cannot start.
pub(crate) fn runtime(threads: usize) -> Option<tokio::runtime::Runtime> {
    // No heap trim (madvise, then a page fault) after every keep-alive
    // request's buffers are freed.
    veer_proxy::sys::keep_free_heap_top();
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("veer-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("veer: cannot start the runtime: {e}");
            None
        }
    }
}

pub(crate) fn announce_ready(shared: &Shared, lifecycle: &Lifecycle, admin: &AdminServer) {
    let r = lifecycle.readiness(shared);
    let snap = shared.snapshot();
    let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        identity = %snap.identity,
        upstreams = snap.routes.upstreams().len(),
        intentions = snap.intentions.rules().len(),
        leaf_serial = %snap.tls.leaf.serial,
        expose = ?admin.expose,
        admin = %show(admin.admin),
        prometheus = %show(admin.prometheus),
        ready = r.ready,
        "veer ready"
    );
    if r.ready {
        veer_admin::sdnotify::notify_logged(&format!(
            "READY=1\nSTATUS=serving as {}",
            snap.identity
        ));
    } else {
        tracing::warn!(missing = ?r.missing, "not ready yet");
    }
}
