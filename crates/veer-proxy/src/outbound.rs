//! The outbound pipeline: original destination → route → connect → relay.
//!
//! Mesh and dialed-directly routes open mTLS with our leaf, send the
//! upstream's SNI and accept the server only if its certificate chains to
//! the upstream's roots and its URI SAN matches the upstream's expected
//! SANs (by default its exact SPIFFE ID). That check runs inside the TLS
//! handshake, so an impostor never receives veer's certificate; it is
//! repeated after the handshake (resumed sessions skip the first), before
//! any byte of the app is sent. An upstream with `max_connections` open
//! refuses more (`reason=overflow`).
//! Passthrough routes dial plain TCP and relay with splice. An upstream
//! with HTTP routes is served at L7 instead ([`http`]).
mod http;

use crate::metrics::envoy::ClusterStats;
use crate::metrics::Direction;
use crate::mux::{self, UpConn};
use crate::net::{self, DialError, Dialed};
use crate::relay::{self, Limits, Outcome};
use crate::state::Shared;
use crate::tls_stream::ClientTls;
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use veer_core::addr::{ClientAddr, EndpointAddr, OrigDstAddr};
use veer_core::route::{self, Route, RouteError, Upstream};
use veer_core::snapshot::Snapshot;
use veer_core::tls;

/// How long an endpoint that failed is tried last.
const ENDPOINT_BACKOFF: Duration = Duration::from_secs(10);

/// Why an outbound connection failed; `classify()` gives a metric label.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    /// No original destination: the connection was not redirected by iptables.
    #[error("no original destination (connection not redirected?): {0}")]
    NoOrigDst(std::io::Error),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("TLS handshake with {0} timed out")]
    HandshakeTimeout(EndpointAddr),
    #[error("TLS handshake with {0} failed: {2}")]
    Handshake(EndpointAddr, &'static str, String),
    /// The server presented a certificate for another identity.
    #[error("{addr} presented {got}, expected {want}")]
    ServerIdentity {
        addr: EndpointAddr,
        got: String,
        want: String,
    },
    #[error("no endpoint of {0} could be reached")]
    AllEndpointsFailed(String),
    /// The upstream has `max_connections` open (Envoy circuit breaker).
    #[error("upstream {0} has {1} connections open, its max_connections")]
    Overflow(String, u32),
    /// The multiplexing peer answered the stream's CONNECT with `status`
    /// (403: its intentions deny us; 503: its local app is down; 429: its
    /// inbound listener has `max_connections` open).
    #[error("{addr} refused the stream: HTTP status {status}")]
    Stream { addr: EndpointAddr, status: u16 },
    /// A multiplexed connection could not carry the stream.
    #[error("multiplexed connection to {0}: {1}")]
    Mux(EndpointAddr, String),
    /// The connection comes from one of veer's own dials: its traffic was
    /// redirected back to it.
    #[error("the connection comes from veer's own dial ({0}), redirected back to it again and again; refusing to loop (is the proxy UID excluded from redirection?)")]
    OwnTraffic(ClientAddr),
}

impl OutboundError {
    pub fn classify(&self) -> &'static str {
        match self {
            OutboundError::NoOrigDst(_) => "no_orig_dst",
            OutboundError::Route(e) => e.classify(),
            OutboundError::Dial(e) => e.classify(),
            OutboundError::HandshakeTimeout(_) => "handshake_timeout",
            OutboundError::Handshake(_, l, _) => l,
            OutboundError::ServerIdentity { .. } => "server_identity",
            OutboundError::AllEndpointsFailed(_) => "all_endpoints_failed",
            OutboundError::Overflow(..) => "overflow",
            OutboundError::OwnTraffic(_) => "loop",
            OutboundError::Stream { status: 403, .. } => "peer_denied",
            OutboundError::Stream { status: 503, .. } => "peer_app_unreachable",
            OutboundError::Stream { status: 429, .. } => "peer_overflow",
            OutboundError::Stream { .. } => "peer_refused",
            OutboundError::Mux(..) => "mux",
        }
    }
}

/// A connection redirected to the transparent outbound listener.
pub async fn handle_transparent(shared: Arc<Shared>, tcp: TcpStream, peer: ClientAddr) {
    shared.metrics.opened(Direction::Outbound);
    net::tune(&tcp);
    let orig = match net::orig_dst(&tcp) {
        Ok(o) => o,
        Err(e) => return fail(&shared, peer, None, None, OutboundError::NoOrigDst(e), &tcp),
    };
    let snap = shared.snapshot();
    match shared.own_dials.hops(peer, orig) {
        None => {}
        Some(hops) if hops < net::MAX_TURNS => {
            // veer's own dial, redirected back (see net::OwnDials): once
            // more, straight to where it was going, from a new port.
            tracing::debug!(peer = %peer, orig_dst = %orig, hops, "veer's own dial came back to it; relaying it to its destination");
            let route = Route::Passthrough {
                addr: EndpointAddr(orig.0),
            };
            return forward(shared, snap, tcp, peer, Some(orig), route, hops + 1).await;
        }
        Some(_) => {
            let e = OutboundError::OwnTraffic(peer);
            return fail(&shared, peer, Some(orig), None, e, &tcp);
        }
    }
    match route::route(&snap.routes, orig) {
        Ok(r) => forward(shared, snap, tcp, peer, Some(orig), r, 0).await,
        Err(e) => fail(&shared, peer, Some(orig), None, e.into(), &tcp),
    }
}

/// A connection to an explicit upstream's own listener.
pub async fn handle_explicit(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: ClientAddr,
    bind: SocketAddr,
) {
    shared.metrics.opened(Direction::Outbound);
    net::tune(&tcp);
    let snap = shared.snapshot();
    let Some(upstream) = snap.routes.upstream_by_bind(bind).cloned() else {
        return fail(
            &shared,
            peer,
            None,
            None,
            RouteError::NoEndpoints(bind.to_string()).into(),
            &tcp,
        );
    };
    match route::route_explicit(&upstream) {
        Ok(r) => forward(shared, snap, tcp, peer, None, r, 0).await,
        Err(e) => {
            // The upstream's TCP proxy has nowhere to send it (Envoy's
            // `downstream_cx_no_route`).
            if let Some(s) = shared.metrics.envoy.upstream(&upstream) {
                s.tcp.cx_total.fetch_add(1, Relaxed);
                s.tcp.no_route.fetch_add(1, Relaxed);
            }
            fail(&shared, peer, None, Some(upstream.name()), e.into(), &tcp)
        }
    }
}

async fn forward(
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    tcp: TcpStream,
    peer: ClientAddr,
    orig: Option<OrigDstAddr>,
    route: Route,
    hops: u8,
) {
    let started = Instant::now();
    let limits = Limits {
        idle: snap.timeouts.idle,
        half_close: snap.timeouts.half_close,
    };
    let live = Some(shared.metrics.live(Direction::Outbound));
    let (out, upstream): (Outcome, String) = match route {
        Route::Passthrough { addr } => {
            let t0 = Instant::now();
            let dialed = net::dial(addr, snap.timeouts.connect, &shared.own_dials, hops).await;
            if dialed.is_ok() {
                shared
                    .metrics
                    .h(Direction::Outbound)
                    .connect
                    .observe(t0.elapsed().as_secs_f64());
            }
            let up = match dialed {
                Ok(s) => s,
                Err(e) => return fail(&shared, peer, orig, Some("passthrough"), e.into(), &tcp),
            };
            drop(snap);
            (
                relay::splice(tcp, up, limits, None, live).await,
                "passthrough".to_string(),
            )
        }
        Route::Mesh { upstream } => {
            let Some(_slot) = upstream.try_open() else {
                let e = OutboundError::Overflow(
                    upstream.name().to_string(),
                    upstream.max_connections.unwrap_or(u32::MAX),
                );
                return fail(&shared, peer, orig, Some(upstream.name()), e, &tcp);
            };
            if upstream.http.is_some() {
                drop(snap);
                return http::serve(shared, tcp, peer, orig, upstream.clone()).await;
            }
            let stats = shared.metrics.envoy.upstream(&upstream);
            if let Some(s) = stats {
                s.tcp.cx_total.fetch_add(1, Relaxed);
            }
            let cluster = stats.map(|s| &s.cluster);
            let conn = match connect_mesh(&shared, &snap, &upstream, cluster).await {
                Ok(s) => s,
                Err(e) => return fail(&shared, peer, orig, Some(upstream.name()), e, &tcp),
            };
            drop(snap);
            let live = live.map(|l| l.with(stats.map(|s| s.tcp.bytes())));
            let out = relay_up(&shared, tcp, conn, limits, live, cluster).await;
            (out, upstream.name().to_string())
        }
        Route::Direct { upstream, addr } => {
            let Some(_slot) = upstream.try_open() else {
                let e = OutboundError::Overflow(
                    upstream.name().to_string(),
                    upstream.max_connections.unwrap_or(u32::MAX),
                );
                return fail(&shared, peer, orig, Some(upstream.name()), e, &tcp);
            };
            let stats = shared.metrics.envoy.upstream(&upstream);
            if let Some(s) = stats {
                s.tcp.cx_total.fetch_add(1, Relaxed);
            }
            let cluster = stats.map(|s| &s.cluster);
            let conn = match connect_up(&shared, &snap, &upstream, addr, cluster).await {
                Ok(s) => s,
                Err(e) => return fail(&shared, peer, orig, Some(upstream.name()), e, &tcp),
            };
            drop(snap);
            let live = live.map(|l| l.with(stats.map(|s| s.tcp.bytes())));
            let out = relay_up(&shared, tcp, conn, limits, live, cluster).await;
            (out, upstream.name().to_string())
        }
    };
    shared
        .metrics
        .relayed(Direction::Outbound, started.elapsed());
    tracing::info!(
        target: "veer::access",
        direction = "outbound",
        peer = %peer,
        orig_dst = %orig.map(|o| o.to_string()).unwrap_or_else(|| "-".into()),
        upstream = %upstream,
        relay = %if out.spliced { "splice" } else { "copy" },
        rx_bytes = out.a_to_b,
        tx_bytes = out.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        close = %out.reason.as_str(),
        "connection closed"
    );
}

/// Tries the endpoints of the upstream's current target (the first, in
/// failover order, with an endpoint) in round-robin order, skipping those
/// that fail (each within the target's connect timeout) and trying them
/// last for a while.
async fn connect_mesh(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    upstream: &Upstream,
    cluster: Option<&Arc<ClusterStats>>,
) -> Result<UpConn, OutboundError> {
    let Some(target) = upstream.target() else {
        return Err(RouteError::NoEndpoints(upstream.name().to_string()).into());
    };
    let now = shared.now_ms();
    for ep in target.pick_order(now) {
        match connect_up(shared, snap, target, ep.addr, cluster).await {
            Ok(s) => {
                target.mark_ok(ep);
                return Ok(s);
            }
            // The endpoint answered: its refusal is the service's.
            Err(e @ OutboundError::Stream { .. }) => return Err(e),
            Err(e) => {
                target.mark_failed(ep, shared.now_ms() + ENDPOINT_BACKOFF.as_millis() as u64);
                shared
                    .metrics
                    .endpoint_failure(upstream.name(), e.classify());
                if let Some(n) = shared.may_warn() {
                    tracing::warn!(upstream = %upstream.name(), endpoint = %ep.addr, reason = %e.classify(), suppressed = n, "upstream endpoint failed, trying the next: {e}");
                }
            }
        }
    }
    Err(OutboundError::AllEndpointsFailed(
        upstream.name().to_string(),
    ))
}

/// One app connection to `addr` of `upstream`: a stream of a multiplexed
/// connection when the snapshot allows it and the peer speaks it, its own
/// mTLS connection otherwise.
async fn connect_up(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    upstream: &Upstream,
    addr: EndpointAddr,
    cluster: Option<&Arc<ClusterStats>>,
) -> Result<UpConn, OutboundError> {
    if mux::enabled(snap) {
        return mux::connect(shared, snap, upstream, addr, cluster).await;
    }
    connect_tls(
        shared,
        snap,
        upstream,
        addr,
        cluster.map(|c| &**c),
        None,
        None,
    )
    .await
    .map(UpConn::Tls)
}

/// Relays an app connection over what [`connect_up`] gave; a connection
/// of its own is reported closed to the cluster here (a multiplexed one
/// when it ends).
async fn relay_up(
    shared: &Shared,
    tcp: TcpStream,
    conn: UpConn,
    limits: Limits,
    live: Option<relay::Live<'_>>,
    cluster: Option<&Arc<ClusterStats>>,
) -> Outcome {
    let up = Instant::now();
    match conn {
        UpConn::Tls(tls) => {
            let out = relay::copy(tcp, tls, limits, None, live).await;
            if let Some(c) = cluster {
                c.closed(up.elapsed().as_secs_f64() * 1e3);
            }
            out
        }
        UpConn::Dedicated(tls, upstream) => {
            let out = relay::copy(tcp, tls, limits, None, live).await;
            if let Some(c) = cluster {
                c.closed(up.elapsed().as_secs_f64() * 1e3);
            }
            mux::bulk_done(shared, &upstream, out.a_to_b + out.b_to_a);
            out
        }
        UpConn::Stream(s) => {
            let out = relay::copy(tcp, s, limits, None, live).await;
            shared
                .metrics
                .mux(Direction::Outbound)
                .streams_closed
                .fetch_add(1, Relaxed);
            out
        }
    }
}

/// mTLS to one address, counted as one connection attempt of the
/// upstream's cluster (Envoy's `upstream_cx_total`, `_connect_fail`,
/// `_connect_timeout`, `_connect_ms`; `_active` until the caller reports
/// the close). `config` replaces the upstream's TLS configuration (its
/// variant offering multiplexing); `alpn`: the one protocol to offer (L7),
/// none at L4.
pub(crate) async fn connect_tls(
    shared: &Shared,
    snap: &Snapshot,
    upstream: &Upstream,
    addr: EndpointAddr,
    cluster: Option<&ClusterStats>,
    config: Option<Arc<ClientConfig>>,
    alpn: Option<&'static [u8]>,
) -> Result<Box<ClientTls<Dialed>>, OutboundError> {
    if let Some(c) = cluster {
        c.attempt();
    }
    let r = try_tls(shared, snap, upstream, addr, cluster, config, alpn).await;
    if let (Err(e), Some(c)) = (&r, cluster) {
        c.failed(matches!(e, OutboundError::Dial(d) if d.classify() == "timeout"));
    }
    r
}

/// mTLS to one address; the server's identity is checked inside the
/// handshake by the upstream's TLS configuration and once more after it.
async fn try_tls(
    shared: &Shared,
    snap: &Snapshot,
    upstream: &Upstream,
    addr: EndpointAddr,
    cluster: Option<&ClusterStats>,
    config: Option<Arc<ClientConfig>>,
    alpn: Option<&'static [u8]>,
) -> Result<Box<ClientTls<Dialed>>, OutboundError> {
    let Some(mut config) = config.or_else(|| upstream.tls.as_ref().map(|t| t.get())) else {
        return Err(OutboundError::Handshake(
            addr,
            "tls_setup",
            "the upstream has no TLS configuration".into(),
        ));
    };
    let t0 = Instant::now();
    let tcp = net::dial(addr, upstream.connect_timeout, &shared.own_dials, 0).await?;
    let dialed = t0.elapsed();
    shared
        .metrics
        .h(Direction::Outbound)
        .connect
        .observe(dialed.as_secs_f64());
    if let Some(c) = cluster {
        c.connect_ms.observe(dialed.as_secs_f64() * 1e3);
    }
    let t1 = Instant::now();
    let name = ServerName::try_from(upstream.sni.clone())
        .map_err(|e| OutboundError::Handshake(addr, "bad_sni", e.to_string()))?;
    if let Some(p) = alpn {
        // A copy per new L7 connection (they are pooled); resumption state
        // is shared through the copied Arc.
        let mut c = (*config).clone();
        c.alpn_protocols = vec![p.to_vec()];
        config = Arc::new(c);
    }
    let conn = UnbufferedClientConnection::new(config, name)
        .map_err(|e| OutboundError::Handshake(addr, "tls_setup", e.to_string()))?;
    // Boxed: the connection's future then holds a pointer, not the TLS
    // state inline in its own layout and again in the relay's.
    let mut tls = Box::new(ClientTls::new(tcp, conn));
    match tokio::time::timeout(snap.timeouts.handshake, tls.handshake()).await {
        Err(_) => return Err(OutboundError::HandshakeTimeout(addr)),
        Ok(Err(e)) => {
            let re = tls::rustls_error(&e);
            if let Some(m) = re.and_then(san_mismatch) {
                return Err(OutboundError::ServerIdentity {
                    addr,
                    got: m.got.join(", "),
                    want: m.want.join(" or "),
                });
            }
            let label = re.map(tls::classify_tls_error).unwrap_or("handshake_io");
            return Err(OutboundError::Handshake(addr, label, e.to_string()));
        }
        Ok(Ok(())) => {}
    }
    shared.metrics.handshake(
        Direction::Outbound,
        tls.conn().handshake_kind(),
        t1.elapsed(),
    );
    // Second line (a resumed session skips the certificate check).
    let Some(leaf) = tls.conn().peer_certificates().and_then(|c| c.first()) else {
        return Err(OutboundError::ServerIdentity {
            addr,
            got: "no certificate".into(),
            want: upstream.identity.to_string(),
        });
    };
    if let Err(m) = tls::check_server_sans(leaf, &upstream.san_matchers) {
        return Err(OutboundError::ServerIdentity {
            addr,
            got: m.got.join(", "),
            want: m.want.join(" or "),
        });
    }
    Ok(tls)
}

/// The SAN mismatch inside a handshake error, if that is what it was.
fn san_mismatch(e: &rustls::Error) -> Option<&tls::SanMismatch> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<tls::SanMismatch>()
        }
        _ => None,
    }
}

fn fail(
    shared: &Shared,
    peer: ClientAddr,
    orig: Option<OrigDstAddr>,
    upstream: Option<&str>,
    e: OutboundError,
    tcp: &TcpStream,
) {
    let label = e.classify();
    shared
        .metrics
        .count("outbound_failures_total", "reason", label);
    shared.metrics.closed(Direction::Outbound);
    // Refused outright: reset, as Envoy does when no filter chain matches.
    net::reset_on_close(tcp);
    let Some(suppressed) = shared.may_warn() else {
        return;
    };
    let orig = orig.map(|o| o.to_string()).unwrap_or_else(|| "-".into());
    match &e {
        OutboundError::Route(RouteError::Loop(_)) | OutboundError::OwnTraffic(_) => {
            tracing::error!(peer = %peer, orig_dst = %orig, reason = %label, suppressed, "outbound connection refused: {e}")
        }
        _ => {
            tracing::warn!(peer = %peer, orig_dst = %orig, upstream = %upstream.unwrap_or("-"), reason = %label, suppressed, "outbound connection failed: {e}")
        }
    }
}
