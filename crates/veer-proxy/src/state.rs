//! Process-wide state: the current snapshot, the registry of open inbound
//! connections (for closing those a new intention denies), and metrics.
use crate::metrics::Metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{watch, Notify};
use veer_core::snapshot::{Snapshot, SnapshotError, Spec};
use veer_core::spiffe::ServiceId;

struct Registered {
    source: ServiceId,
    revoke: Arc<Notify>,
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
        let (snap, _) = watch::channel(Arc::new(first));
        Ok(Arc::new(Shared {
            snap,
            metrics: Metrics::default(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            version: AtomicU64::new(1),
            started: Instant::now(),
            applied_at: AtomicU64::new(unix_now()),
        }))
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

    /// Seconds since the current snapshot was applied.
    pub fn snapshot_age_secs(&self) -> u64 {
        unix_now().saturating_sub(self.applied_at.load(Relaxed))
    }

    /// Builds a snapshot from `spec` and swaps it in; open connections keep
    /// the one they started with. Open inbound connections whose source the
    /// new intentions deny are closed. On error the current snapshot stays.
    pub fn apply(&self, spec: Spec) -> Result<Arc<Snapshot>, SnapshotError> {
        let version = self.version.fetch_add(1, Relaxed) + 1;
        let snap = match Snapshot::build(spec, version) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.metrics.snapshot_errors.fetch_add(1, Relaxed);
                return Err(e);
            }
        };
        self.snap.send_replace(snap.clone());
        self.applied_at.store(unix_now(), Relaxed);
        self.metrics.snapshot_swaps.fetch_add(1, Relaxed);
        let conns = self.lock_conns();
        for r in conns.values() {
            let d = snap.intentions.evaluate(&r.source);
            if !d.allowed() {
                tracing::warn!(
                    source = %r.source,
                    reason = %snap.intentions.explain(&d),
                    "closing open inbound connection: intentions now deny its source"
                );
                self.metrics.revoked.fetch_add(1, Relaxed);
                r.revoke.notify_one();
            }
        }
        Ok(snap)
    }

    /// Registers an open inbound connection from `source`. Register before
    /// evaluating intentions against [`Shared::snapshot`], so that a swap
    /// racing with the check is never missed.
    pub fn register(self: &Arc<Self>, source: ServiceId) -> Registration {
        let id = self.next_id.fetch_add(1, Relaxed);
        let revoke = Arc::new(Notify::new());
        self.lock_conns().insert(
            id,
            Registered {
                source,
                revoke: revoke.clone(),
            },
        );
        Registration {
            shared: self.clone(),
            id,
            revoke,
        }
    }

    /// Open inbound connections in the registry.
    pub fn registered(&self) -> usize {
        self.lock_conns().len()
    }
}
