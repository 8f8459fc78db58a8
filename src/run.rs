//! `veer run`: start from a configuration file, serve, reload, shut down.
use crate::file_source;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use veer_proxy::accept::Listeners;
use veer_proxy::state::Shared;

pub fn run(config: PathBuf, threads: usize, grace: Duration) -> ExitCode {
    let loaded = match veer_core::config::load(&config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("veer: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("veer-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("veer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let files = loaded.files.clone();
        let shared = match Shared::new(loaded.spec) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("veer: {}: {e}", config.display());
                return ExitCode::from(2);
            }
        };
        let listeners = match Listeners::start(shared.clone()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("veer: {e}");
                return ExitCode::FAILURE;
            }
        };
        let snap = shared.snapshot();
        tracing::info!(
            identity = %snap.identity,
            upstreams = snap.routes.upstreams().len(),
            intentions = snap.intentions.rules().len(),
            "veer ready"
        );
        drop(snap);
        tokio::spawn(file_source::watch(config, files, shared.clone()));
        lifecycle(shared, listeners, grace).await
    })
}

fn active(shared: &Shared) -> u64 {
    use veer_proxy::metrics::Direction::*;
    let m = &shared.metrics;
    [Inbound, Outbound]
        .iter()
        .map(|d| {
            m.d(*d)
                .opened
                .load(Relaxed)
                .saturating_sub(m.d(*d).closed.load(Relaxed))
        })
        .sum()
}

/// SIGTERM: stop accepting inbound, keep outbound serving for the app,
/// wait for open connections up to the grace period, exit 0. A second
/// SIGTERM or a SIGINT exits at once.
async fn lifecycle(
    shared: std::sync::Arc<Shared>,
    listeners: Listeners,
    grace: Duration,
) -> ExitCode {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("veer: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {
            tracing::info!("SIGINT: exiting now");
            listeners.abort();
            return ExitCode::SUCCESS;
        }
    }
    tracing::info!(grace = ?grace, active = active(&shared), "SIGTERM: draining; inbound listener closed, outbound keeps serving");
    listeners.stop_inbound();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        if active(&shared) == 0 {
            tracing::info!("all connections finished; exiting");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                active = active(&shared),
                "grace period over; exiting with connections open"
            );
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = term.recv() => { tracing::info!("second SIGTERM: exiting now"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: exiting now"); break; }
        }
    }
    listeners.stop_all();
    ExitCode::SUCCESS
}
