//! The outbound pipeline at L7: a connection to an upstream with HTTP
//! routes is served by [`veer_http::outbound`]; this module gives it what
//! it needs from the proxy — mTLS to an endpoint with the target's
//! identity check and ALPN (`h2` or `http/1.1`), counted as a connection of
//! the target's cluster; the current snapshot's upstream for each request;
//! and, per finished request, Envoy's request stats and an access-log line.
use super::connect_tls;
use crate::metrics::Direction;
use crate::net::Dialed;
use crate::state::Shared;
use crate::tls_stream::ClientTls;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use veer_core::addr::{ClientAddr, EndpointAddr, OrigDstAddr};
use veer_core::route::{self, Route, Upstream};
use veer_http::outbound::{Alpn, BoxFuture, ConnectError, Connector, Done};

/// One downstream connection's view of the proxy.
struct MeshConnector {
    shared: Arc<Shared>,
    peer: ClientAddr,
    orig: Option<OrigDstAddr>,
    /// The upstream's explicit listener, if it came that way.
    bind: Option<std::net::SocketAddr>,
}

/// An upstream mTLS connection that tells its cluster when it closes
/// (Envoy's `upstream_cx_active`, `upstream_cx_length_ms`) and counts its
/// bytes (`upstream_cx_rx_bytes_total` / `_tx_`).
pub struct CountedTls {
    io: Box<ClientTls<Dialed>>,
    opened: Instant,
    stats: Option<Arc<crate::metrics::envoy::ClusterStats>>,
}

impl Drop for CountedTls {
    fn drop(&mut self) {
        if let Some(c) = &self.stats {
            c.closed(self.opened.elapsed().as_secs_f64() * 1e3);
        }
    }
}

impl AsyncRead for CountedTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(c)) = (&r, &self.stats) {
            c.rx_bytes
                .fetch_add((buf.filled().len() - before) as u64, Relaxed);
        }
        r
    }
}

impl AsyncWrite for CountedTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.io).poll_write(cx, data);
        if let (Poll::Ready(Ok(n)), Some(c)) = (&r, &self.stats) {
            c.tx_bytes.fetch_add(*n as u64, Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

impl Connector for MeshConnector {
    type Io = CountedTls;

    fn connect<'a>(
        &'a self,
        target: &'a Upstream,
        ep: EndpointAddr,
        alpn: Alpn,
    ) -> BoxFuture<'a, Result<CountedTls, ConnectError>> {
        Box::pin(async move {
            let snap = self.shared.snapshot();
            let stats = self.shared.metrics.envoy.upstream(target);
            let cluster = stats.map(|s| &*s.cluster);
            match connect_tls(
                &self.shared,
                &snap,
                target,
                ep,
                cluster,
                None,
                Some(alpn.id()),
            )
            .await
            {
                Ok(io) => Ok(CountedTls {
                    io,
                    opened: Instant::now(),
                    stats: stats.map(|s| s.cluster.clone()),
                }),
                Err(e) => {
                    let label = e.classify();
                    self.shared.metrics.endpoint_failure(target.name(), label);
                    if let Some(n) = self.shared.may_warn() {
                        tracing::warn!(upstream = %target.name(), endpoint = %ep, reason = %label, suppressed = n, "HTTP upstream endpoint failed, trying the next: {e}");
                    }
                    Err(ConnectError {
                        label,
                        msg: e.to_string(),
                    })
                }
            }
        })
    }

    fn now_ms(&self) -> u64 {
        self.shared.now_ms()
    }

    fn current(&self) -> Option<Arc<Upstream>> {
        let snap = self.shared.snapshot();
        if let Some(b) = self.bind {
            return snap.routes.upstream_by_bind(b).cloned();
        }
        match route::route(&snap.routes, self.orig?) {
            Ok(Route::Mesh { upstream }) => Some(upstream),
            _ => None,
        }
    }

    fn done(&self, d: &Done<'_>) {
        let ms = d.duration.as_secs_f64() * 1e3;
        if let Some(t) = d.target {
            if let Some(s) = self.shared.metrics.envoy.upstream(t) {
                s.cluster.http().answered(d.status, ms);
            }
        }
        if let Some(r) = d.reason {
            self.shared
                .metrics
                .count("outbound_http_local_replies_total", "reason", r);
        }
        tracing::info!(
            target: "veer::access",
            direction = "outbound",
            peer = %self.peer,
            method = %d.method,
            path = %d.path,
            authority = %d.authority.unwrap_or("-"),
            protocol = if d.downstream_h2 { "HTTP/2" } else { "HTTP/1.1" },
            route = %d.route.unwrap_or("-"),
            cluster = %d.cluster.map_or("-", |c| c.name.as_str()),
            endpoint = %d.endpoint.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            status = d.status,
            reason = %d.reason.unwrap_or("-"),
            attempts = d.attempts,
            duration_ms = d.duration.as_millis() as u64,
            "request"
        );
    }
}

/// Serves an outbound connection whose upstream has HTTP routes until the
/// app closes it.
pub(super) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: ClientAddr,
    orig: Option<OrigDstAddr>,
    upstream: Arc<Upstream>,
) {
    let started = Instant::now();
    let c = Arc::new(MeshConnector {
        shared: shared.clone(),
        peer,
        orig,
        bind: upstream.local_bind,
    });
    let pool = shared.http_pool.clone();
    if let Err(e) = veer_http::outbound::serve(c, pool, tcp, upstream.clone()).await {
        tracing::debug!(peer = %peer, upstream = %upstream.name(), "outbound HTTP connection ended: {e}");
    }
    shared
        .metrics
        .relayed(Direction::Outbound, started.elapsed());
}
