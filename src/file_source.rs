//! The static-file control-plane source: reloads when the configuration
//! file or any file it names changes (polled every second), or on SIGHUP.
//! A bad new configuration is logged and the current snapshot stays; one
//! that cannot be read (a file unreadable or half-written, or no fd free)
//! is tried again every 10 s, and a change of mode or owner (`chmod`,
//! `chown`) counts as a change.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use veer_proxy::state::Shared;

pub type Stamp = Vec<Option<(std::time::SystemTime, u64, u64, (i64, i64))>>;

/// How soon a configuration that could not be loaded is tried again.
const RETRY: Duration = Duration::from_secs(10);

/// The files' modification times, sizes, inodes and change times.
pub fn stamp(files: &[PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| {
                (
                    m.modified().unwrap_or(std::time::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                    (m.ctime(), m.ctime_nsec()),
                )
            })
        })
        .collect()
}

/// Follows the files; `last` is their stamp taken right after the load
/// the running snapshot came from (not when this task first runs: a write
/// in between would otherwise never be seen).
pub async fn watch(config: PathBuf, mut files: Vec<PathBuf>, mut last: Stamp, shared: Arc<Shared>) {
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
        };
        let now = stamp(&files);
        let retry = retry_at.is_some_and(|t| tokio::time::Instant::now() >= t);
        if !forced && !retry && now == last {
            continue;
        }
        last = now;
        match reload(&config, &shared, forced) {
            Some(f) => {
                // The stamps taken before the load stay, so that a write
                // during the load is seen at the next poll (stamping after
                // it missed such a write); a new list of files is stamped now.
                if f != files {
                    files = f;
                    last = stamp(&files);
                }
                retry_at = None;
            }
            None => retry_at = Some(tokio::time::Instant::now() + RETRY),
        }
    }
}

fn reload(config: &Path, shared: &Shared, forced: bool) -> Option<Vec<PathBuf>> {
    let why = if forced { "SIGHUP" } else { "file change" };
    match veer_core::config::load(config) {
        Err(e) => {
            shared
                .metrics
                .snapshot_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                "configuration reload ({why}) rejected, keeping the current snapshot: {e}"
            );
            None
        }
        Ok(l) => {
            // A change of listen addresses is kept for the next restart and
            // named (log, metric, /config_dump) by Shared::apply.
            let veer_core::config::Loaded {
                spec,
                files,
                listeners,
                ..
            } = l;
            match shared.apply(spec) {
                Ok(s) => {
                    tracing::info!(version = s.version, leaf_serial = %s.tls.leaf.serial, "configuration reloaded ({why})")
                }
                Err(e) => {
                    // A listener that cannot bind: named by its key and line.
                    let at = match &e {
                        veer_core::snapshot::SnapshotError::Listener { addr, .. } => listeners
                            .iter()
                            .find(|(a, _)| a == addr)
                            .map(|(_, k)| format!("{k}: ")),
                        _ => None,
                    };
                    tracing::error!(
                        "configuration reload ({why}) rejected, keeping the current snapshot: {}{e}",
                        at.unwrap_or_default()
                    )
                }
            }
            Some(files)
        }
    }
}
