//! The inbound pipeline: mTLS handshake → peer identity → authorization
//! (Consul intentions or Envoy network RBAC, whichever the snapshot has) →
//! dial the local app → relay. A peer that fails any step before the dial
//! never causes a connection to the local app.
//!
//! A connection whose original destination port is one of the snapshot's
//! `permissive_ports` (Consul's permissive mTLS) is relayed as plain TCP to
//! the local app instead; the port is only looked up when the list is not
//! empty.
//!
//! The check after the handshake is the one point where a request-level
//! (L7) check will sit for HTTP upstreams.
use crate::metrics::envoy::ClusterStats;
use crate::metrics::Direction;
use crate::net;
use crate::relay::{self, Leg, Limits};
use crate::state::{Registration, Shared};
use crate::tls_stream::ServerTls;
use rustls::server::UnbufferedServerConnection;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use veer_core::addr::{ClientAddr, EndpointAddr};
use veer_core::authz::{AuthzDecision, Peer};
use veer_core::snapshot::Snapshot;
use veer_core::tls::{self, IdentityError};

/// Why an inbound connection was refused; `classify()` gives a metric label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboundError {
    /// The TLS handshake did not finish within the handshake timeout
    /// (slow or silent peers, slowloris).
    #[error("TLS handshake timed out")]
    HandshakeTimeout,
    /// The handshake failed: no client certificate, untrusted or expired
    /// certificate, wrong usage, or not TLS at all.
    #[error("TLS handshake failed: {1}")]
    Handshake(&'static str, String),
    /// The certificate is valid but carries no usable service identity.
    #[error("client identity: {0}")]
    Identity(#[from] IdentityError),
    /// Intentions or RBAC deny the source.
    #[error("denied: {1}")]
    Denied(AuthzDecision, String),
    /// The local app did not accept the connection.
    #[error("local app: {0}")]
    LocalApp(#[from] net::DialError),
}

impl InboundError {
    pub fn classify(&self) -> &'static str {
        match self {
            InboundError::HandshakeTimeout => "handshake_timeout",
            InboundError::Handshake(l, _) => l,
            InboundError::Identity(e) => e.classify(),
            InboundError::Denied(d, _) => d.classify(),
            InboundError::LocalApp(e) => e.classify(),
        }
    }
}

/// Handles one accepted inbound connection.
pub async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: ClientAddr) {
    let started = Instant::now();
    shared.metrics.opened(Direction::Inbound);
    net::tune(&tcp);
    let snap = shared.snapshot();
    if !snap.permissive_ports.is_empty() {
        // A failed lookup keeps mTLS: permissive only when known to be.
        if let Ok(orig) = net::orig_dst(&tcp) {
            if snap.permissive_ports.contains(&orig.0.port()) {
                // Boxed: its relay's state then does not widen every
                // inbound connection's future.
                return Box::pin(plain(shared, snap, tcp, peer, orig.0.port(), started)).await;
            }
        }
    }
    let t0 = Instant::now();
    let Some(tls) = handshake(&shared, &snap, tcp, peer).await else {
        return;
    };
    shared.metrics.handshake(
        Direction::Inbound,
        tls.conn().handshake_kind(),
        t0.elapsed(),
    );
    // Envoy's public listener: its TCP proxy sees every connection whose
    // handshake completed; the RBAC filter then allows or denies it.
    let envoy = shared.metrics.envoy.inbound();
    envoy.tcp.cx_total.fetch_add(1, Relaxed);
    let Some(leaf) = tls.conn().peer_certificates().and_then(|c| c.first()) else {
        return refuse(
            &shared,
            peer,
            None,
            InboundError::Handshake("no_client_cert", "no certificate".into()),
        );
    };
    let source = if snap.authz.uses_intentions() {
        // Intentions: exactly one Consul SPIFFE ID, in our trust domain.
        let id = match tls::peer_identity(leaf) {
            Ok(id) => id,
            Err(e) => return refuse(&shared, peer, None, e.into()),
        };
        if id.trust_domain != snap.identity.trust_domain {
            let e = IdentityError::WrongTrustDomain {
                got: id.trust_domain.clone(),
                want: snap.identity.trust_domain.clone(),
            };
            return refuse(&shared, peer, Some(&id.to_string()), e.into());
        }
        Peer::from_id(id)
    } else {
        // RBAC: its principals match the certificate's names (a peered
        // cluster's SPIFFE IDs have their own trust domain).
        match tls::peer(leaf, &snap.identity.trust_domain) {
            Ok(p) => p,
            Err(e) => return refuse(&shared, peer, None, e.into()),
        }
    };
    let source = Arc::new(source);
    if tls.conn().alpn_protocol() == Some(crate::mux::ALPN) {
        // A multiplexed connection: each of its streams is one app
        // connection, counted, authorized and relayed on its own; the
        // connection itself is counted in `veer_mux_*` only.
        shared
            .metrics
            .d(Direction::Inbound)
            .opened
            .fetch_sub(1, Relaxed);
        envoy.tcp.cx_total.fetch_sub(1, Relaxed);
        // Its streams reach an L7 inbound through [`l7_serve`] as a plain
        // connection does, with this connection's XFCC element.
        let xfcc = veer_http::inbound::xfcc_element(&snap.identity.to_string(), leaf, &source);
        drop(snap);
        return Box::pin(crate::mux::serve(shared, tls, peer, source, xfcc)).await;
    }
    if snap.inbound_http.is_some() {
        // L7: each request is authorized (intentions with permissions, HTTP
        // RBAC) on the then-current snapshot.
        let xfcc = veer_http::inbound::xfcc_element(&snap.identity.to_string(), leaf, &source);
        drop(snap);
        return Box::pin(l7(shared, tls, source, xfcc, peer, started)).await;
    }
    // Register first, then decide on the current snapshot: a swap that
    // races with this check either sees the registration or is seen here.
    let reg = shared.register_l4(source.clone());
    let snap = shared.snapshot();
    if snap.inbound_http.is_some() {
        // A swap made the inbound L7 since the handshake: not relayed at L4.
        tracing::debug!(peer = %peer, source = %source, "inbound connection closed: the local service turned HTTP during its handshake");
        shared.metrics.closed(Direction::Inbound);
        return;
    }
    let decision = snap.authz.evaluate(&source);
    if !decision.allowed() {
        envoy.rbac.denied.fetch_add(1, Relaxed);
        let why = snap.authz.explain(&decision);
        return refuse(
            &shared,
            peer,
            Some(&source.display_name()),
            InboundError::Denied(decision, why),
        );
    }
    envoy.rbac.allowed.fetch_add(1, Relaxed);
    let app = match dial_app(&shared, &snap, Some(&envoy.cluster)).await {
        Ok(s) => s,
        Err(e) => return refuse(&shared, peer, Some(&source.to_string()), e.into()),
    };
    let limits = Limits {
        idle: snap.timeouts.idle,
        half_close: snap.timeouts.half_close,
    };
    let local_app = snap.local_app;
    drop(snap);
    let to = AppLeg {
        app,
        local_app,
        limits,
    };
    relay_l4(&shared, tls, to, reg, &source, peer, started, false).await;
}

/// The local app's side of an admitted L4 connection.
pub(crate) struct AppLeg {
    pub app: net::Dialed,
    pub local_app: std::net::SocketAddr,
    pub limits: Limits,
}

/// Relays an admitted L4 app connection to the local app until either
/// side ends or `reg` is revoked: `io` is its TLS connection, or one stream
/// of a multiplexed connection (`mux`). The same metrics (Envoy's
/// `local_app` cluster, veer's inbound relay) and access line either way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn relay_l4<IO: relay::End>(
    shared: &Shared,
    io: IO,
    to: AppLeg,
    reg: Registration,
    source: &Peer,
    peer: ClientAddr,
    started: Instant,
    mux: bool,
) {
    let envoy = shared.metrics.envoy.inbound();
    let up = Instant::now();
    let live = Some(
        shared
            .metrics
            .live(Direction::Inbound)
            .with(Some(envoy.tcp.bytes())),
    );
    let out = relay::copy(io, to.app, to.limits, Some(reg.revoke.clone()), live).await;
    drop(reg);
    envoy.cluster.closed(up.elapsed().as_secs_f64() * 1e3);
    shared
        .metrics
        .relayed(Direction::Inbound, started.elapsed());
    tracing::info!(
        target: "veer::access",
        direction = "inbound",
        peer = %peer,
        source = %source,
        upstream = %to.local_app,
        mux,
        rx_bytes = out.a_to_b,
        tx_bytes = out.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        close = %out.reason.as_str(),
        "connection closed"
    );
}

/// An authenticated connection to an http-like local service: network
/// RBAC (xDS) still decides the connection, and revokes it like an L4 one;
/// intentions decide per request in the engine (an intention change then
/// applies to the next request, and no connection needs revoking).
async fn l7(
    shared: Arc<Shared>,
    tls: Box<ServerTls<TcpStream>>,
    source: Arc<Peer>,
    xfcc: String,
    peer: ClientAddr,
    started: Instant,
) {
    let reg = match l7_admit(&shared, &source) {
        Ok(r) => r,
        Err(e) => return refuse(&shared, peer, Some(&source.display_name()), e),
    };
    l7_serve(&shared, tls, source, xfcc, reg, peer, started, false).await;
}

/// The connection-level decision of an L7 inbound connection or
/// multiplexed stream: network RBAC (xDS) decides it and registers it for
/// revocation; with intentions nothing is decided here (the engine decides
/// each request). `Err` is the denial to refuse with.
pub(crate) fn l7_admit(
    shared: &Arc<Shared>,
    source: &Arc<Peer>,
) -> Result<Option<Registration>, InboundError> {
    if shared.snapshot().authz.uses_intentions() {
        return Ok(None);
    }
    let envoy = shared.metrics.envoy.inbound();
    let reg = shared.register(source.clone());
    let snap = shared.snapshot();
    let decision = snap.authz.evaluate(source);
    if !decision.allowed() {
        envoy.rbac.denied.fetch_add(1, Relaxed);
        let why = snap.authz.explain(&decision);
        return Err(InboundError::Denied(decision, why));
    }
    envoy.rbac.allowed.fetch_add(1, Relaxed);
    Ok(Some(reg))
}

/// Serves an admitted L7 connection, or one stream of a multiplexed
/// connection (`mux`), with the L7 engine until it ends or `reg` is
/// revoked; the same per-request authorization, XFCC, metrics and access
/// log either way.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn l7_serve<IO>(
    shared: &Arc<Shared>,
    io: IO,
    source: Arc<Peer>,
    xfcc: String,
    reg: Option<Registration>,
    peer: ClientAddr,
    started: Instant,
    mux: bool,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let down = veer_http::inbound::Downstream {
        source: source.clone(),
        xfcc,
    };
    let serve = crate::inbound_http::serve(shared, io, down);
    let close = match &reg {
        Some(r) => {
            tokio::select! {
                _ = serve => "closed",
                _ = r.revoke.notified() => "revoked",
            }
        }
        None => {
            serve.await;
            "closed"
        }
    };
    drop(reg);
    shared
        .metrics
        .relayed(Direction::Inbound, started.elapsed());
    tracing::info!(
        target: "veer::access",
        direction = "inbound",
        peer = %peer,
        source = %source,
        protocol = "http",
        mux,
        duration_ms = started.elapsed().as_millis() as u64,
        close,
        "connection closed"
    );
}

/// A connection to a permissive port: plain TCP to the local app, no
/// authorization (Consul's permissive mTLS filter chain).
async fn plain(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    tcp: TcpStream,
    peer: ClientAddr,
    port: u16,
    started: Instant,
) {
    let app = match dial_app(&shared, &snap, None).await {
        Ok(s) => s,
        Err(e) => return refuse(&shared, peer, None, e.into()),
    };
    shared
        .metrics
        .count("inbound_permissive_total", "port", &port.to_string());
    let limits = Limits {
        idle: snap.timeouts.idle,
        half_close: snap.timeouts.half_close,
    };
    let local_app = snap.local_app;
    drop(snap);
    let live = Some(shared.metrics.live(Direction::Inbound));
    let out = relay::splice(tcp, app, limits, None, live).await;
    shared
        .metrics
        .relayed(Direction::Inbound, started.elapsed());
    tracing::info!(
        target: "veer::access",
        direction = "inbound",
        peer = %peer,
        source = "-",
        permissive_port = port,
        upstream = %local_app,
        rx_bytes = out.a_to_b,
        tx_bytes = out.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        close = %out.reason.as_str(),
        "connection closed"
    );
}

/// Dials the local app, timed; a connection of Envoy's `local_app`
/// cluster when `cluster` is given (the caller reports its close).
pub(crate) async fn dial_app(
    shared: &Shared,
    snap: &Snapshot,
    cluster: Option<&ClusterStats>,
) -> Result<net::Dialed, net::DialError> {
    if let Some(c) = cluster {
        c.attempt();
    }
    let t0 = Instant::now();
    let dialed = net::dial(
        EndpointAddr(snap.local_app),
        snap.timeouts.local_connect,
        &shared.own_dials,
        0,
    )
    .await;
    match &dialed {
        Ok(_) => {
            let t = t0.elapsed();
            shared
                .metrics
                .h(Direction::Inbound)
                .connect
                .observe(t.as_secs_f64());
            if let Some(c) = cluster {
                c.connect_ms.observe(t.as_secs_f64() * 1e3);
            }
        }
        Err(e) => {
            if let Some(c) = cluster {
                c.failed(e.classify() == "timeout");
            }
        }
    }
    dialed
}

/// The TLS handshake of an inbound connection, within the handshake
/// timeout; refuses (logged and counted) and returns `None` on failure. Its
/// own future, so that the handshake state does not stay in the
/// connection's future once it is done.
async fn handshake(
    shared: &Shared,
    snap: &Snapshot,
    tcp: TcpStream,
    peer: ClientAddr,
) -> Option<Box<ServerTls<TcpStream>>> {
    let deadline = tokio::time::Instant::now() + snap.timeouts.handshake;
    // An L7 listener offers ALPN h2 and http/1.1; with multiplexing on,
    // veer-mux/1 first.
    let server = match &snap.inbound_http {
        Some(l7) => &l7.server,
        None => &snap.tls.server,
    };
    let config = if crate::mux::enabled(snap) {
        shared.mux.server_config(server)
    } else {
        server.clone()
    };
    let conn = match UnbufferedServerConnection::new(config) {
        Ok(c) => c,
        Err(e) => {
            refuse(
                shared,
                peer,
                None,
                InboundError::Handshake("tls_setup", e.to_string()),
            );
            return None;
        }
    };
    // Boxed: the connection's future then holds a pointer, not the TLS
    // state inline in its own layout and again in the relay's.
    let mut tls = Box::new(ServerTls::new(tcp, conn));
    let res = tokio::time::timeout_at(deadline, tls.handshake()).await;
    match res {
        Err(_) => {
            // Slow or silent (slowloris): reset, so that no FIN_WAIT or
            // TIME_WAIT state outlives the connection.
            net::reset_on_close(tls.tcp());
            drop(tls);
            refuse(shared, peer, None, InboundError::HandshakeTimeout);
            None
        }
        // A peer that closes without sending a byte is a probe (Consul's
        // "Connect Sidecar Listening" TCP check every 10 s, kubelet
        // tcpSocket): counted on its own and logged at debug, not as a
        // failed handshake. (Told from the handshake's own reads: no extra
        // syscall per connection.)
        Ok(Err(e))
            if !tls.received_any()
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
        {
            let how = if e.kind() == std::io::ErrorKind::ConnectionReset {
                "reset"
            } else {
                "closed"
            };
            probe(shared, peer, how)
        }
        Ok(Err(e)) => {
            let label = tls::rustls_error(&e)
                .map(tls::classify_tls_error)
                .unwrap_or(match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => "eof_during_handshake",
                    std::io::ErrorKind::ConnectionReset => "reset_during_handshake",
                    _ => "handshake_io",
                });
            refuse(
                shared,
                peer,
                None,
                InboundError::Handshake(label, e.to_string()),
            );
            None
        }
        Ok(Ok(())) => Some(tls),
    }
}

/// Counts and logs (at debug) a connection that ended before sending a byte.
fn probe(
    shared: &Shared,
    peer: ClientAddr,
    how: &'static str,
) -> Option<Box<ServerTls<TcpStream>>> {
    shared.metrics.count_labels("inbound_probes_total", &[]);
    shared.metrics.closed(Direction::Inbound);
    tracing::debug!(peer = %peer, how, "inbound connection closed before sending a byte (a TCP probe)");
    None
}

pub(crate) fn refuse(shared: &Shared, peer: ClientAddr, source: Option<&str>, e: InboundError) {
    let label = e.classify();
    let metric = match &e {
        InboundError::HandshakeTimeout | InboundError::Handshake(..) => {
            "inbound_handshake_failures_total"
        }
        InboundError::Identity(_) => "inbound_identity_failures_total",
        InboundError::Denied(..) => "intention_denials_total",
        InboundError::LocalApp(_) => "local_app_connect_failures_total",
    };
    shared.metrics.count(metric, "reason", label);
    shared.metrics.closed(Direction::Inbound);
    if let Some(suppressed) = shared.may_warn() {
        tracing::warn!(peer = %peer, source = %source.unwrap_or("-"), reason = %label, suppressed, "inbound connection refused: {e}");
    }
}
