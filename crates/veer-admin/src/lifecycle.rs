//! The lifecycle controller: the one place that decides when veer is
//! ready, when it stops accepting inbound connections, and when it exits.
//!
//! Everything that wants a change asks it with a [`Request`]: SIGTERM
//! (first: [`Request::Quit`], second: [`Request::Now`]), SIGINT
//! ([`Request::Now`]), `POST /drain` ([`Request::Drain`]) and
//! `POST /quitquitquit` ([`Request::Quit`]). Requests only escalate, so a
//! late drain can never undo a quit, and draining and exiting are separate
//! decisions that cannot race each other (consul-dataplane's `skip_exit`
//! lesson).
//!
//! - Drain: the inbound listener stops accepting; the outbound listeners
//!   keep serving the app; `/ready` answers 503. The process keeps running.
//! - Quit: drain, then exit 0 once no connection is open (but not before
//!   `min_wait`), or when the grace period is over, whichever comes first.
//! - Now: exit 0 at once.
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::time::Instant;
use veer_proxy::accept::Listeners;
use veer_proxy::state::Shared;

/// What has been asked of the controller; only ever escalates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Request {
    /// Keep serving.
    Run,
    /// Stop accepting inbound connections; keep outbound; do not exit.
    Drain,
    /// Drain, wait for open connections up to the grace period, exit.
    Quit,
    /// Exit at once.
    Now,
}

impl Request {
    pub fn as_str(&self) -> &'static str {
        match self {
            Request::Run => "run",
            Request::Drain => "drain",
            Request::Quit => "quit",
            Request::Now => "now",
        }
    }
}

/// How a quit proceeds.
#[derive(Clone, Copy, Debug)]
pub struct ShutdownOpts {
    /// The longest a quit waits for open connections.
    pub grace: Duration,
    /// The shortest a quit keeps the outbound listener serving, even when
    /// no connection is open (for apps that still dial out while they shut
    /// down next to a sidecar that got SIGTERM at the same time).
    pub min_wait: Duration,
}

impl Default for ShutdownOpts {
    fn default() -> Self {
        ShutdownOpts {
            grace: Duration::from_secs(30),
            min_wait: Duration::ZERO,
        }
    }
}

/// SIGTERM and SIGINT, caught. Install them first thing at start-up: a
/// signal that arrives before [`Lifecycle::drive`] runs is kept, not lost
/// to the default action (which would kill the process).
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Must be called inside a tokio runtime.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT, by name: for the time before
    /// [`Lifecycle::drive`] runs (nothing to drain yet, so either exits).
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Why [`Lifecycle::drive`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Every connection finished.
    Idle,
    /// The grace period ended with connections still open.
    GraceOver,
    /// A second SIGTERM, a SIGINT, or [`Request::Now`].
    Immediate,
}

/// `/ready`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// `LIVE`, `PRE_INITIALIZING` or `DRAINING` (Envoy's server states),
    /// or `LEAF_EXPIRED` (serving, but the leaf certificate ran out and no
    /// new one has arrived).
    pub state: &'static str,
    /// What is missing, when not ready.
    pub missing: Vec<String>,
}

/// What a control-plane source (the Consul agent) says about its view,
/// for `/ready`, `/config_dump` and metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ControlPlane {
    /// The source, e.g. `consul`.
    pub source: &'static str,
    /// Upstreams in the last configuration it handed out.
    pub upstreams: u64,
    /// Services it follows (e.g. the catalog size), when it knows.
    pub services: Option<u64>,
    /// How old the view is: zero while in sync, `None` before the first sync.
    pub view_age: Option<Duration>,
    /// Connections to the control plane it may hold at most.
    pub max_connections: u64,
    /// Errors talking to the control plane, by kind (monotonic).
    pub errors: Vec<(&'static str, u64)>,
}

/// Implemented by a source that can report a [`ControlPlane`].
pub trait ControlPlaneStatus: Send + Sync {
    fn control_plane(&self) -> ControlPlane;
    /// What the next configuration still waits for, if anything (said by
    /// `/ready` while veer is not ready).
    fn waiting_for(&self) -> Vec<String> {
        Vec::new()
    }
    /// The source's own view for `/config_dump` (e.g. the xDS resources
    /// accepted, their versions, the last NACK): a JSON object whose fields
    /// join `control_plane`.
    fn detail(&self) -> Option<serde_json::Value> {
        None
    }
}

/// The lifecycle controller; shared by the admin server and `veer run`.
pub struct Lifecycle {
    /// `POST /quitquitquit` exits at once instead of draining (Envoy's
    /// meaning, which consul-dataplane relies on: it drains first with
    /// `/drain_listeners`, waits its grace period, then quits).
    quit_exits_now: AtomicBool,
    listeners_bound: AtomicBool,
    snapshot_applied: AtomicBool,
    requests: watch::Sender<Request>,
    control_plane: std::sync::OnceLock<Arc<dyn ControlPlaneStatus>>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Lifecycle {
    pub fn new() -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            quit_exits_now: AtomicBool::new(false),
            listeners_bound: AtomicBool::new(false),
            snapshot_applied: AtomicBool::new(false),
            requests: watch::channel(Request::Run).0,
            control_plane: std::sync::OnceLock::new(),
        })
    }

    /// Registers the source's status (once; later calls are ignored).
    pub fn set_control_plane(&self, s: Arc<dyn ControlPlaneStatus>) {
        let _ = self.control_plane.set(s);
    }

    /// Makes `POST /quitquitquit` exit at once, as Envoy's does (veer in
    /// Envoy's place); otherwise it is a graceful exit, as SIGTERM.
    pub fn set_quit_exits_now(&self) {
        self.quit_exits_now.store(true, SeqCst);
    }

    /// What `POST /quitquitquit` asks for.
    pub fn quit_request(&self) -> Request {
        if self.quit_exits_now.load(SeqCst) {
            Request::Now
        } else {
            Request::Quit
        }
    }

    /// The source's status, when one was registered.
    pub fn control_plane(&self) -> Option<ControlPlane> {
        self.control_plane.get().map(|s| s.control_plane())
    }

    /// The registered source itself.
    pub fn control_plane_status(&self) -> Option<&Arc<dyn ControlPlaneStatus>> {
        self.control_plane.get()
    }

    /// The inbound and outbound listeners are bound.
    pub fn set_listeners_bound(&self) {
        self.listeners_bound.store(true, SeqCst);
    }

    /// The first full snapshot (leaf, roots, intentions, upstreams) is
    /// applied. A control-plane source calls this once it has everything.
    pub fn set_snapshot_applied(&self) {
        self.snapshot_applied.store(true, SeqCst);
    }

    /// Asks for `r`; a request lower than the current one is ignored.
    /// Returns the request in force afterwards.
    pub fn request(&self, r: Request) -> Request {
        self.requests.send_if_modified(|cur| {
            if r > *cur {
                *cur = r;
                true
            } else {
                false
            }
        });
        *self.requests.borrow()
    }

    /// The request in force.
    pub fn current(&self) -> Request {
        *self.requests.borrow()
    }

    /// Notified whenever the request in force changes.
    pub fn subscribe(&self) -> watch::Receiver<Request> {
        self.requests.subscribe()
    }

    /// Ready when the listeners are bound, the first snapshot is applied,
    /// it has roots and an unexpired leaf, and no drain or quit was asked.
    pub fn readiness(&self, shared: &Shared) -> Readiness {
        if self.current() >= Request::Drain {
            return Readiness {
                ready: false,
                state: "DRAINING",
                missing: vec!["draining".into()],
            };
        }
        let mut missing = Vec::new();
        let mut expired = false;
        if !self.listeners_bound.load(SeqCst) {
            missing.push("listeners not bound".to_string());
        }
        if !self.snapshot_applied.load(SeqCst) {
            missing.push("first snapshot not applied".to_string());
        } else {
            let snap = shared.snapshot();
            if snap.tls.roots.is_empty() {
                missing.push("no CA roots".to_string());
            }
            if snap.tls.leaf.not_after <= unix_now() {
                expired = true;
                missing.push(format!(
                    "leaf certificate {} expired at {}",
                    snap.tls.leaf.serial,
                    veer_core::snapshot::format_unix(snap.tls.leaf.not_after)
                ));
            }
        }
        let state = if missing.is_empty() {
            "LIVE"
        } else if expired && missing.len() == 1 {
            "LEAF_EXPIRED"
        } else {
            "PRE_INITIALIZING"
        };
        Readiness {
            ready: missing.is_empty(),
            state,
            missing,
        }
    }

    /// Logs one error and counts `veer_leaf_expired_total` when the leaf in
    /// use expires (`/ready` then answers `503 LEAF_EXPIRED`); runs until
    /// the process ends. A new snapshot with a fresh leaf ends the episode.
    pub async fn watch_leaf(shared: Arc<Shared>) {
        let mut rx = shared.subscribe();
        let mut reported: Option<String> = None;
        loop {
            let snap = rx.borrow_and_update().clone();
            let left = snap.tls.leaf.not_after - unix_now();
            if left <= 0 && reported.as_deref() != Some(snap.tls.leaf.serial.as_str()) {
                reported = Some(snap.tls.leaf.serial.clone());
                shared.metrics.count_labels("leaf_expired_total", &[]);
                tracing::error!(
                    serial = %snap.tls.leaf.serial,
                    not_after = %veer_core::snapshot::format_unix(snap.tls.leaf.not_after),
                    "the leaf certificate expired; inbound and outbound mTLS fail and /ready answers 503 until a new one is applied"
                );
            }
            let wait = if left > 0 {
                Duration::from_secs(left as u64)
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs until veer should exit: turns `signals` (if any) into requests
    /// and acts on requests. The caller then stops everything and exits 0.
    pub async fn drive(
        &self,
        shared: &Shared,
        listeners: &Listeners,
        opts: ShutdownOpts,
        signals: Option<Signals>,
    ) -> io::Result<Exit> {
        let (mut term, mut int) = match signals {
            Some(s) => (Some(s.term), Some(s.int)),
            None => (None, None),
        };
        let mut rx = self.subscribe();
        let mut terms = 0u32;
        let mut drained = false;
        let mut quit_at: Option<Instant> = None;
        let exit = loop {
            let req = *rx.borrow_and_update();
            if req == Request::Now {
                tracing::info!(
                    active = shared.metrics.active(),
                    "exiting now, without waiting for open connections"
                );
                break Exit::Immediate;
            }
            if req >= Request::Drain && !drained {
                drained = true;
                listeners.stop_inbound();
                tracing::info!(
                    active = shared.metrics.active(),
                    "draining: inbound listener closed, outbound keeps serving"
                );
                crate::sdnotify::notify_logged("STATUS=draining: inbound closed, outbound serving");
            }
            if req == Request::Quit {
                let start = *quit_at.get_or_insert_with(|| {
                    tracing::info!(
                        grace = ?opts.grace,
                        min_wait = ?opts.min_wait,
                        active = shared.metrics.active(),
                        "shutting down: waiting for open connections"
                    );
                    crate::sdnotify::notify_logged("STOPPING=1");
                    Instant::now()
                });
                let now = Instant::now();
                let active = shared.metrics.active();
                if now >= start + opts.grace {
                    if active > 0 {
                        tracing::warn!(active, "grace period over; exiting with connections open");
                        break Exit::GraceOver;
                    }
                    break Exit::Idle;
                }
                if active == 0 && now >= start + opts.min_wait {
                    tracing::info!("all connections finished; exiting");
                    break Exit::Idle;
                }
            }
            let ticking = quit_at.is_some();
            tokio::select! {
                _ = recv(&mut term) => {
                    terms += 1;
                    if terms == 1 {
                        tracing::info!("SIGTERM");
                        self.request(Request::Quit);
                    } else {
                        tracing::info!("second SIGTERM");
                        self.request(Request::Now);
                    }
                }
                _ = recv(&mut int) => {
                    tracing::info!("SIGINT");
                    self.request(Request::Now);
                }
                r = rx.changed() => { r.map_err(io::Error::other)?; }
                _ = tokio::time::sleep(Duration::from_millis(50)), if ticking => {}
            }
        };
        listeners.stop_all();
        Ok(exit)
    }
}

async fn recv(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
