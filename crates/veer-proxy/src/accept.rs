//! Listeners and accept loops.
//!
//! The inbound listener and the transparent outbound listeners are bound
//! once at start. Explicit upstream listeners follow the snapshot: a swap
//! that adds or removes an upstream's `local_bind` opens or closes its
//! listener (open connections are not touched).
use crate::state::Shared;
use crate::{inbound, net, outbound};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use veer_core::addr::ClientAddr;

fn resource_exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Resolves once `stop` is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts until `stop` flips to true. Out of file descriptors, it logs
/// (at most once a second), waits 100 ms and tries again, so it never spins;
/// the pending connections wait in the backlog.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(TcpStream, ClientAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    tokio::spawn(handler(s, ClientAddr::from(peer)));
                }
                Err(e) => {
                    shared.metrics.accept_errors.fetch_add(1, Relaxed);
                    if resource_exhausted(&e) {
                        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                            tracing::warn!(listener = what, error = %e, "cannot accept: out of resources; shedding until some free up");
                            last_warn = Some(tokio::time::Instant::now());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    } else {
                        tracing::debug!(listener = what, error = %e, "accept failed");
                    }
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
}

/// The running listeners.
pub struct Listeners {
    pub inbound: SocketAddr,
    pub outbound: Vec<SocketAddr>,
    stop_inbound: watch::Sender<bool>,
    stop_outbound: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Listeners {
    /// Binds every listener of the current snapshot and starts accepting.
    /// The inbound and the first outbound listener must bind; the IPv6
    /// outbound listener is skipped with a warning when the host has no IPv6.
    pub async fn start(shared: Arc<Shared>) -> io::Result<Listeners> {
        let snap = shared.snapshot();
        let (stop_inbound, stop_in_rx) = watch::channel(false);
        let (stop_outbound, stop_out_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let l = net::bind(snap.listen.inbound).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("inbound listener {}: {e}", snap.listen.inbound),
            )
        })?;
        let inbound_addr = l.local_addr()?;
        let sh = shared.clone();
        tasks.push(tokio::spawn(serve(
            l,
            "inbound",
            shared.clone(),
            stop_in_rx,
            move |s, peer| inbound::handle(sh.clone(), s, peer),
        )));

        let mut outbound_addrs = Vec::new();
        for (i, addr) in snap.listen.outbound.iter().enumerate() {
            let l = match net::bind(*addr) {
                Ok(l) => l,
                Err(e) if i > 0 && addr.is_ipv6() => {
                    tracing::warn!(%addr, error = %e, "IPv6 outbound listener not started (no IPv6 on this host?)");
                    continue;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("outbound listener {addr}: {e}"),
                    ))
                }
            };
            outbound_addrs.push(l.local_addr()?);
            let sh = shared.clone();
            tasks.push(tokio::spawn(serve(
                l,
                "outbound",
                shared.clone(),
                stop_out_rx.clone(),
                move |s, peer| outbound::handle_transparent(sh.clone(), s, peer),
            )));
        }
        tasks.push(tokio::spawn(explicit_upstreams(
            shared.clone(),
            stop_out_rx,
        )));
        tracing::info!(inbound = %inbound_addr, outbound = ?outbound_addrs, "listeners bound");
        Ok(Listeners {
            inbound: inbound_addr,
            outbound: outbound_addrs,
            stop_inbound,
            stop_outbound,
            tasks,
        })
    }

    /// Stops accepting inbound connections (drain); outbound keeps serving.
    pub fn stop_inbound(&self) {
        self.stop_inbound.send_replace(true);
    }

    /// Stops every listener.
    pub fn stop_all(&self) {
        self.stop_inbound.send_replace(true);
        self.stop_outbound.send_replace(true);
    }

    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Keeps one listener per explicit upstream (`local_bind`) of the current
/// snapshot.
async fn explicit_upstreams(shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let mut rx = shared.subscribe();
    let mut running: HashMap<SocketAddr, (watch::Sender<bool>, JoinHandle<()>)> = HashMap::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        let want: Vec<SocketAddr> = snap
            .routes
            .upstreams()
            .iter()
            .filter_map(|u| u.local_bind)
            .collect();
        running.retain(|addr, (tx, _)| {
            let keep = want.contains(addr);
            if !keep {
                tracing::info!(%addr, "explicit upstream listener closed");
                tx.send_replace(true);
            }
            keep
        });
        for addr in want {
            if running.contains_key(&addr) {
                continue;
            }
            match net::bind(addr) {
                Ok(l) => {
                    let (tx, srx) = watch::channel(false);
                    let sh = shared.clone();
                    let h = tokio::spawn(serve(
                        l,
                        "explicit_upstream",
                        shared.clone(),
                        srx,
                        move |s, peer| outbound::handle_explicit(sh.clone(), s, peer, addr),
                    ));
                    tracing::info!(%addr, "explicit upstream listener bound");
                    running.insert(addr, (tx, h));
                }
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot bind explicit upstream listener")
                }
            }
        }
        let mut stop2 = stop.clone();
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = stopped(&mut stop2) => break,
        }
    }
    for (_, (tx, _)) in running {
        tx.send_replace(true);
    }
}
