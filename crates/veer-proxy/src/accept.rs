//! Listeners and accept loops.
//!
//! The inbound listener and the transparent outbound listeners are bound
//! once at start. Explicit upstream listeners follow the snapshot: a swap
//! that adds or removes an upstream's `local_bind` opens or closes its
//! listener (open connections are not touched).
use crate::metrics::envoy::ListenerStats;
use crate::state::Shared;
use crate::{inbound, net, outbound};
use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
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

/// One open connection's place in its listener's count (and in its
/// Envoy listener stats); freed on drop, also when the connection's task
/// panics.
struct Slot(Arc<AtomicUsize>, Option<(Arc<ListenerStats>, Instant)>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
        if let Some((l, since)) = &self.1 {
            l.cx_active.fetch_sub(1, Relaxed);
            l.length_ms.observe(since.elapsed().as_secs_f64() * 1e3);
        }
    }
}

/// A file descriptor held back so that a listener out of descriptors can
/// still accept, and at once close, a pending connection: its client gets a
/// reset now instead of waiting in the backlog for a handshake timeout.
fn reserve_fd() -> Option<File> {
    File::open("/dev/null").or_else(|_| File::open("/")).ok()
}

/// At most one warning a second per listener and kind; counts the rest.
struct Throttle {
    last: Option<tokio::time::Instant>,
    quiet: u64,
}

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            last: None,
            quiet: 0,
        }
    }
    /// `Some(events not logged since the last warning)` when one may be logged.
    fn take(&mut self) -> Option<u64> {
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last = Some(tokio::time::Instant::now());
            Some(std::mem::take(&mut self.quiet))
        } else {
            self.quiet += 1;
            None
        }
    }
}

/// Accepts until `stop` flips to true.
///
/// - At most [`Shared::max_connections_of`] connections are open at once per
///   listener; past that, a new connection is reset at once and counted in
///   `veer_connections_overflow_total{listener}`.
/// - Out of file descriptors, it sheds: a held-back descriptor is released
///   to accept the pending connection, which is reset at once and counted in
///   `veer_connections_shed_total{listener}`; without one it waits 100 ms
///   before trying again. It never spins, and serves again as soon as
///   descriptors free up.
///
/// Both log at most one warning a second per listener.
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
    let open = Arc::new(AtomicUsize::new(0));
    let stats = listener
        .local_addr()
        .ok()
        .map(|a| shared.metrics.envoy.listener(a));
    let mut reserve = reserve_fd();
    let mut warn_fds = Throttle::new();
    let mut warn_overflow = Throttle::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    if reserve.is_none() {
                        reserve = reserve_fd();
                    }
                    // Only this task adds to `open`, so the check cannot race past the limit.
                    let max = shared.max_connections_of(what);
                    if open.load(Relaxed) >= max {
                        net::reset_on_close(&s);
                        drop(s);
                        shared.metrics.count("connections_overflow_total", "listener", what);
                        if let Some(quiet) = warn_overflow.take() {
                            tracing::warn!(listener = what, max_connections = max, also_refused = quiet, "connection refused: the listener has max_connections open");
                        }
                        continue;
                    }
                    open.fetch_add(1, Relaxed);
                    let slot = Slot(open.clone(), stats.as_ref().map(|l| {
                        l.cx_total.fetch_add(1, Relaxed);
                        l.cx_active.fetch_add(1, Relaxed);
                        (l.clone(), Instant::now())
                    }));
                    // Boxed: the task then holds a pointer, not a second copy
                    // of the (several KiB) connection future.
                    let conn = Box::pin(handler(s, ClientAddr::from(peer)));
                    tokio::spawn(async move {
                        conn.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    shared.metrics.accept_errors.fetch_add(1, Relaxed);
                    if !resource_exhausted(&e) {
                        tracing::debug!(listener = what, error = %e, "accept failed");
                        continue;
                    }
                    let shed = shed_one(&listener, &mut reserve).await;
                    if shed {
                        shared.metrics.count("connections_shed_total", "listener", what);
                    }
                    if let Some(quiet) = warn_fds.take() {
                        tracing::warn!(listener = what, error = %e, also_failed = quiet, "cannot accept: out of resources; shedding new connections until some free up");
                    }
                    if reserve.is_none() {
                        // Nothing to shed with: let the backlog wait a little.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
            _ = stopped(&mut stop) => break,
        }
    }
    if what == "inbound" {
        // Pooled clients must stop opening streams here too.
        shared.mux.drain_inbound();
    }
}

/// Out of descriptors: closes the reserve, accepts one pending connection
/// and resets it, then takes the reserve again. Returns whether one was shed.
/// When none is pending, the listener's readiness is cleared by tokio, so
/// the accept loop waits instead of retrying.
async fn shed_one(listener: &TcpListener, reserve: &mut Option<File>) -> bool {
    if reserve.take().is_none() {
        return false;
    }
    let r = std::future::poll_fn(|cx| Poll::Ready(listener.poll_accept(cx))).await;
    let shed = match r {
        Poll::Ready(Ok((s, _))) => {
            net::reset_on_close(&s);
            drop(s);
            true
        }
        _ => false,
    };
    *reserve = reserve_fd();
    shed
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
    /// Raises the soft open-file limit to the hard one
    /// ([`crate::sys::raise_fd_limit`]), binds every listener of the current
    /// snapshot and starts accepting.
    /// The inbound and the first outbound listener must bind; the IPv6
    /// outbound listener is skipped with a warning when the host has no IPv6.
    pub async fn start(shared: Arc<Shared>) -> io::Result<Listeners> {
        match crate::sys::raise_fd_limit() {
            Ok((before, after)) if after > before => {
                tracing::info!(from = before, to = after, "raised the open-file limit")
            }
            Ok((_, limit)) => tracing::debug!(limit, "open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
        let snap = shared.snapshot();
        let (stop_inbound, stop_in_rx) = watch::channel(false);
        let (stop_outbound, stop_out_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let l = net::bind(snap.listen.inbound)
            .map_err(|e| net::BindError::wrap(e, "inbound listener", snap.listen.inbound))?;
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
                Err(e) => return Err(net::BindError::wrap(e, "outbound listener", *addr)),
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
        // Explicit upstream listeners bind now, so that none is reported
        // ready (or listed) without being bound.
        let mut initial = HashMap::new();
        for u in snap.routes.upstreams() {
            let Some(addr) = u.local_bind else { continue };
            let l = net::bind(addr).map_err(|e| {
                net::BindError::wrap(e, format!("upstream {:?} local_bind", u.name()), addr)
            })?;
            initial.insert(addr, l);
        }
        tasks.push(tokio::spawn(explicit_upstreams(
            shared.clone(),
            stop_out_rx,
            initial,
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
///
/// `initial` are the current snapshot's listeners, bound at start; later
/// ones were bound by [`Shared::apply`] before the swap (a snapshot whose
/// listener cannot bind is refused), so a bind here fails only in a race.
async fn explicit_upstreams(
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    mut initial: HashMap<SocketAddr, TcpListener>,
) {
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
            let bound = match initial.remove(&addr) {
                Some(l) => Ok(l),
                None => match shared.take_prebound(addr) {
                    Some(l) => TcpListener::from_std(l),
                    None => net::bind(addr),
                },
            };
            match bound {
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
                    shared.metrics.count(
                        "listener_bind_failures_total",
                        "listener",
                        "explicit_upstream",
                    );
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
