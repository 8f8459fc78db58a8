//! Process-wide state: the current snapshot, the registry of open inbound
//! connections (for closing those a new intention denies), and metrics.
use crate::metrics::Metrics;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use veer_core::authz::Peer;
use veer_core::route::Protocol;
use veer_core::snapshot::{Snapshot, SnapshotError, Spec, Unapplied};

struct Registered {
    /// Shared with the connection's task (one allocation, and a small
    /// registry entry: its table does not shrink).
    source: Arc<Peer>,
    revoke: Arc<Notify>,
    /// Relayed at L4 (a plain connection or a multiplexed stream): closed
    /// when a swap makes the inbound L7, whose requests it would bypass.
    l4: bool,
}

/// Shared by every listener and connection task.
pub struct Shared {
    snap: watch::Sender<Arc<Snapshot>>,
    pub metrics: Metrics,
    conns: Mutex<HashMap<u64, Registered>>,
    next_id: AtomicU64,
    version: AtomicU64,
    started: Instant,
    /// Unix seconds of the last applied snapshot.
    applied_at: AtomicU64,
    /// The current snapshot's per-listener connection limit, read by the
    /// accept loops without touching the snapshot.
    max_connections: AtomicUsize,
    /// The inbound listener's limit (the snapshot's
    /// `inbound_max_connections`, Envoy's `connection_limit`).
    inbound_max_connections: AtomicUsize,
    /// Rate limit of the warnings logged per refused or failed connection.
    pub warn_budget: WarnBudget,
    /// veer's own open dials, to recognise its traffic redirected back.
    pub own_dials: crate::net::OwnDials,
    /// Listeners bound ahead of a swap ([`Shared::apply`]) or at start,
    /// waiting for the task that serves them to [take](Shared::take_prebound) them.
    prebound: Mutex<HashMap<SocketAddr, std::net::TcpListener>>,
    /// veer <-> veer multiplexing: the outbound pool and the ALPN variants
    /// of the TLS configurations.
    pub mux: crate::mux::Mux,
    /// The inbound L7 engine's pooled clients to the local app, made by
    /// the first L7 connection ([`crate::inbound_http::app_client`]).
    pub inbound_app: std::sync::OnceLock<Arc<veer_http::inbound::AppClient>>,
    /// Keep-alive connections of outbound HTTP upstreams (L7).
    pub http_pool: Arc<veer_http::outbound::Pool>,
}

/// The listeners that follow the snapshot, with what each is for: explicit
/// upstreams (`local_bind`) and HTTP expose paths.
pub fn snapshot_listeners(snap: &Snapshot) -> Vec<(SocketAddr, String)> {
    let mut out: Vec<(SocketAddr, String)> = Vec::new();
    for u in snap.routes.upstreams() {
        if let Some(a) = u.local_bind {
            out.push((a, format!("upstream {:?} local_bind", u.name())));
        }
    }
    for e in &snap.expose {
        if e.protocol == Protocol::Http && !out.iter().any(|(a, _)| *a == e.listener) {
            out.push((e.listener, format!("expose path {:?} listener", e.path)));
        }
    }
    out
}

/// Keeps the listen addresses in force (they are bound once, at start) and
/// names the ones a new spec asks for as waiting for a restart.
fn pin_listen(cur: &Snapshot, spec: &mut Spec) {
    let (old, new) = (&cur.listen, &spec.listen);
    if old.inbound != new.inbound {
        spec.unapplied.push(Unapplied::needs_restart(
            "inbound listener address",
            format!(
                "{} asked; {} stays in force until veer restarts",
                new.inbound, old.inbound
            ),
        ));
    }
    if old.outbound != new.outbound {
        spec.unapplied.push(Unapplied::needs_restart(
            "outbound listener addresses",
            format!(
                "{:?} asked; {:?} stay in force until veer restarts",
                new.outbound, old.outbound
            ),
        ));
    }
    spec.listen = old.clone();
}

/// A lock-free budget for warnings logged per connection (refusals,
/// failures, overflow): at most [`WarnBudget::PER_SEC`] a second, so that a
/// flood of bad peers can neither flood the log nor stall the workers on a
/// slow log pipe. Everything is still counted in the metrics.
pub struct WarnBudget {
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl WarnBudget {
    pub const PER_SEC: u64 = 20;

    pub fn new() -> WarnBudget {
        WarnBudget {
            second: AtomicU64::new(u64::MAX),
            used: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a warning may be logged now (`n` similar warnings
    /// were suppressed since the last one logged); `None` when over budget.
    pub fn take(&self, now_ms: u64) -> Option<u64> {
        let sec = now_ms / 1000;
        let seen = self.second.load(Relaxed);
        if seen != sec
            && self
                .second
                .compare_exchange(seen, sec, Relaxed, Relaxed)
                .is_ok()
        {
            self.used.store(0, Relaxed);
        }
        if self.used.fetch_add(1, Relaxed) < Self::PER_SEC {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

impl Default for WarnBudget {
    fn default() -> Self {
        WarnBudget::new()
    }
}

/// An inbound connection's place in the registry; removed on drop.
pub struct Registration {
    shared: Arc<Shared>,
    id: u64,
    pub revoke: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.lock_conns().remove(&self.id);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    /// Builds the first snapshot; fails when the spec is unusable.
    pub fn new(spec: Spec) -> Result<Arc<Shared>, SnapshotError> {
        let first = Snapshot::build(spec, 1)?;
        let max_connections = AtomicUsize::new(first.timeouts.max_connections);
        let inbound_max_connections = AtomicUsize::new(first.inbound_max_connections);
        let (snap, _) = watch::channel(Arc::new(first));
        let metrics = Metrics::default();
        // Consul's stats tags for this sidecar; the xDS source replaces
        // them with its bootstrap's.
        metrics
            .envoy
            .set_rules(veer_core::stats_tags::TagRules::consul(
                &snap.borrow().identity,
            ));
        let shared = Arc::new(Shared {
            snap,
            metrics,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            version: AtomicU64::new(1),
            started: Instant::now(),
            applied_at: AtomicU64::new(unix_now()),
            max_connections,
            inbound_max_connections,
            warn_budget: WarnBudget::new(),
            own_dials: Default::default(),
            prebound: Mutex::new(HashMap::new()),
            mux: Default::default(),
            inbound_app: std::sync::OnceLock::new(),
            http_pool: Default::default(),
        });
        shared.announce_unapplied(None, &shared.snapshot());
        Ok(shared)
    }

    /// Logs one warning per setting of `snap` that is not applied and was
    /// not already in `prev`, and counts it.
    fn announce_unapplied(&self, prev: Option<&Snapshot>, snap: &Snapshot) {
        for u in &snap.unapplied {
            if prev.is_some_and(|p| p.unapplied.contains(u)) {
                continue;
            }
            self.metrics
                .count("unapplied_settings_total", "kind", u.kind);
            tracing::warn!(setting = %u.setting, kind = u.kind, "setting not applied: {}: {}", u.setting, u.detail);
        }
    }

    /// The listener for `addr` bound ahead of the snapshot that wants it,
    /// if any; the serving task binds it itself otherwise.
    pub fn take_prebound(&self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.prebound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr)
    }

    fn lock_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Registered>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot new connections use.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.borrow().clone()
    }

    /// Notified on every swap.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snap.subscribe()
    }

    /// Milliseconds since start, for endpoint back-off.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Connections each listener may hold open at once.
    pub fn max_connections(&self) -> usize {
        self.max_connections.load(Relaxed)
    }

    /// Connections the listener named `listener` may hold open at once:
    /// the inbound listener has its own limit.
    pub fn max_connections_of(&self, listener: &str) -> usize {
        match listener {
            "inbound" => self.inbound_max_connections.load(Relaxed),
            _ => self.max_connections.load(Relaxed),
        }
    }

    /// A warning about one connection may be logged now: `Some(suppressed)`.
    pub fn may_warn(&self) -> Option<u64> {
        self.warn_budget.take(self.now_ms())
    }

    /// Seconds since the current snapshot was applied.
    pub fn snapshot_age_secs(&self) -> u64 {
        unix_now().saturating_sub(self.applied_at.load(Relaxed))
    }

    /// Builds a snapshot from `spec` and swaps it in; open connections keep
    /// the one they started with. Open inbound connections whose source the
    /// new authorization (intentions or RBAC) denies are closed, and so are
    /// those relayed at L4 once the inbound is L7 (`inbound_http`). On error
    /// the current snapshot stays.
    ///
    /// Listen addresses are bound once, at start: a spec that changes them
    /// keeps the ones in force and lists the new ones as waiting for a
    /// restart. New explicit-upstream and expose listeners are bound before
    /// the swap; if one cannot bind, the spec is refused and nothing changes.
    pub fn apply(&self, mut spec: Spec) -> Result<Arc<Snapshot>, SnapshotError> {
        let version = self.version.fetch_add(1, Relaxed) + 1;
        let cur = self.snapshot();
        pin_listen(&cur, &mut spec);
        let built = Snapshot::build_after(spec, version, Some(&cur)).and_then(|s| {
            let have: HashSet<SocketAddr> = snapshot_listeners(&cur)
                .into_iter()
                .map(|(a, _)| a)
                .collect();
            let fresh = bind_all(snapshot_listeners(&s), &have)?;
            Ok((s, fresh))
        });
        let (snap, fresh) = match built {
            Ok((s, fresh)) => (Arc::new(s), fresh),
            Err(e) => {
                self.metrics.snapshot_errors.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        let want: HashSet<SocketAddr> = snapshot_listeners(&snap)
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        self.prebound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(fresh);
        self.snap.send_replace(snap.clone());
        // Bound for a snapshot that a later one replaced before they were served.
        self.prebound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a, _| want.contains(a));
        self.announce_unapplied(Some(&cur), &snap);
        self.max_connections
            .store(snap.timeouts.max_connections, Relaxed);
        self.inbound_max_connections
            .store(snap.inbound_max_connections, Relaxed);
        self.applied_at.store(unix_now(), Relaxed);
        self.metrics.snapshot_swaps.fetch_add(1, Relaxed);
        let conns = self.lock_conns();
        // Any L4 relay still open under an L7 inbound would bypass it.
        let l7 = snap.inbound_http.is_some();
        for r in conns.values() {
            if l7 && r.l4 {
                tracing::warn!(
                    source = %r.source.display_name(),
                    "closing open inbound connection: the local service is now HTTP, authorized per request"
                );
                self.metrics.revoked.fetch_add(1, Relaxed);
                r.revoke.notify_one();
                continue;
            }
            let d = snap.authz.evaluate(&r.source);
            if !d.allowed() {
                let what = if snap.authz.uses_intentions() {
                    "intentions now deny its source"
                } else {
                    "network RBAC now denies its source"
                };
                tracing::warn!(
                    source = %r.source.display_name(),
                    reason = %snap.authz.explain(&d),
                    label = d.classify(),
                    "closing open inbound connection: {what}"
                );
                self.metrics.revoked.fetch_add(1, Relaxed);
                r.revoke.notify_one();
            }
        }
        Ok(snap)
    }

    /// Registers an open inbound connection from `source`. Register before
    /// evaluating the authorization against [`Shared::snapshot`], so that a swap
    /// racing with the check is never missed.
    pub fn register(self: &Arc<Self>, source: Arc<Peer>) -> Registration {
        self.register_as(source, false)
    }

    /// Registers an open inbound connection (or multiplexed stream) from
    /// `source` relayed at L4: besides what [`Shared::register`] does, a
    /// swap that turns the inbound L7 (`inbound_http`) revokes it, since it
    /// would bypass the per-request authorization. Check the snapshot after
    /// registering, as for intentions.
    pub fn register_l4(self: &Arc<Self>, source: Arc<Peer>) -> Registration {
        self.register_as(source, true)
    }

    fn register_as(self: &Arc<Self>, source: Arc<Peer>, l4: bool) -> Registration {
        let id = self.next_id.fetch_add(1, Relaxed);
        let revoke = Arc::new(Notify::new());
        self.lock_conns().insert(
            id,
            Registered {
                source,
                revoke: revoke.clone(),
                l4,
            },
        );
        Registration {
            shared: self.clone(),
            id,
            revoke,
        }
    }

    /// Sets the `envoy_*` gauges read from the current snapshot and the
    /// server's (`live`: not draining); call before rendering metrics.
    pub fn refresh_envoy_stats(&self, live: bool) {
        let snap = self.snapshot();
        self.metrics
            .envoy
            .refresh(&snap, self.now_ms(), live, self.started.elapsed().as_secs());
    }

    /// Open inbound connections in the registry.
    pub fn registered(&self) -> usize {
        self.lock_conns().len()
    }
}

/// Binds every listener in `want` whose address is not in `have`; all or
/// none.
fn bind_all(
    want: Vec<(SocketAddr, String)>,
    have: &HashSet<SocketAddr>,
) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, SnapshotError> {
    let mut fresh = Vec::new();
    for (addr, what) in want {
        if have.contains(&addr) {
            continue;
        }
        match crate::net::bind_std(addr) {
            Ok(l) => fresh.push((addr, l)),
            Err(e) => {
                return Err(SnapshotError::Listener {
                    what,
                    addr,
                    error: e.to_string(),
                })
            }
        }
    }
    Ok(fresh)
}

/// Returns the heap freed by building snapshots to the kernel, `settle`
/// after start and after each swap (swaps that come meanwhile share one
/// trim): a snapshot swap frees the old snapshot and the source's parse
/// buffers, and glibc keeps those pages otherwise (at 2,000 Consul
/// upstreams, about a quarter of the resident set). Runs until `shared`'s
/// snapshot channel closes.
pub async fn release_heap_after_swaps(shared: Arc<Shared>, settle: Duration) {
    let mut rx = shared.subscribe();
    drop(shared);
    loop {
        tokio::time::sleep(settle).await;
        rx.mark_unchanged();
        let t = Instant::now();
        let released = crate::sys::release_free_heap();
        tracing::debug!(took = ?t.elapsed(), released, "returned free heap memory to the kernel");
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WarnBudget;

    #[test]
    fn warn_budget_allows_a_few_a_second_and_reports_the_rest() {
        let b = WarnBudget::new();
        for _ in 0..WarnBudget::PER_SEC {
            assert_eq!(b.take(1_000), Some(0));
        }
        for _ in 0..500 {
            assert_eq!(b.take(1_999), None);
        }
        // The next second: allowed again, with the count of those not logged.
        assert_eq!(b.take(2_000), Some(500));
        assert_eq!(b.take(2_001), Some(0));
    }
}
