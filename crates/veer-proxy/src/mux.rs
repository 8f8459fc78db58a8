//! veer <-> veer multiplexing: when both ends are veer, app connections to
//! an upstream ride as HTTP/2 `CONNECT` streams over one pooled, long-lived
//! mTLS connection per (endpoint, SNI, TLS configuration), so that a new
//! app connection costs a stream (one round trip, no TCP or TLS handshake).
//!
//! - **Negotiation.** The outbound side offers the ALPN protocol [`ALPN`]
//!   (it offers nothing else, as before); the inbound side selects it when
//!   offered. A peer that selects nothing (Envoy) gets what it always got:
//!   that TLS connection carries this one app connection, and the pool
//!   remembers the endpoint so that later dials to it skip the dial lock.
//! - **Inbound** ([`serve`]): each stream is one app connection to the local
//!   app. It is authorized from the connection's verified identity, on the
//!   current snapshot, exactly as a plain connection is (registered first,
//!   so a swap that revokes the source resets the stream: intentions or
//!   RBAC). A stream that arrives after the snapshot's TLS material (leaf or
//!   roots) changed is refused with `REFUSED_STREAM` and the connection is
//!   drained (`GOAWAY`): new app connections then handshake under the new
//!   material, while open streams go on, as open plain connections do.
//!   Refusals answer `403` (intentions or RBAC) or `503` (local app), never
//!   dialing the local app for a denied source.
//! - **Outbound** ([`connect`]): a pooled connection with a free stream is
//!   used first; otherwise one dial at a time per pool key (concurrent app
//!   connections wait for it instead of each dialing; if it fails they fail
//!   over to the next endpoint at once). A connection that fails is removed
//!   and the next app connection dials afresh; an open that fails on a
//!   pooled connection (closed, `GOAWAY`, `REFUSED_STREAM`, no answer) is
//!   retried once on a new connection. Connections carry at most
//!   [`MAX_STREAMS`] streams and close after [`IDLE_EXPIRY`] without one.
//!   A new leaf or roots on the client side means a new TLS configuration,
//!   so a new pool key.
//! - **Flow control.** Each stream's window is [`STREAM_WINDOW`]; the
//!   connection's is that times [`MAX_STREAMS`], so streams whose app does
//!   not read can never exhaust it (no head-of-line blocking), while the
//!   per-stream window bounds what one stream buffers. h2 sends the ready
//!   streams' frames round-robin, a frame at most [`MAX_FRAME`], so one bulk
//!   stream cannot starve the others.
//!
//! - **Bulk gets its own connection.** A multiplexed stream costs more CPU
//!   per byte than a dedicated TLS connection (h2 framing, a copy, a task
//!   hop: about 1.8x per MiB measured). An outbound stream that carries more
//!   than [`BULK_BYTES`] (both directions) marks its upstream bulk for
//!   [`BULK_HOLD`]: meanwhile its new app connections get mTLS connections
//!   of their own (no ALPN offered), and one of those that again carries
//!   bulk renews the mark. Logged when an upstream switches and when it
//!   comes back; `veer_mux_bulk_switches_total{upstream}` and
//!   `veer_mux_bulk_dedicated_total{upstream}` count it.
//!
//! The engine is the `h2` crate directly (no hyper): a CONNECT tunnel needs
//! only streams of bytes, not HTTP semantics, bodies or upgrades, and raw
//! h2 gives the flow-control calls (`reserve_capacity`,
//! `release_capacity`) a byte relay needs.
use crate::inbound::{self, InboundError};
use crate::metrics::envoy::ClusterStats;
use crate::metrics::Direction;
use crate::net::Dialed;
use crate::outbound::{self, OutboundError};
use crate::relay::{End, Leg, Limits};
use crate::state::Shared;
use crate::tls_stream::{ClientTls, ServerTls};
use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::{ClientConfig, ServerConfig};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use veer_core::addr::{ClientAddr, EndpointAddr};
use veer_core::authz::Peer;
use veer_core::route::Upstream;
use veer_core::snapshot::Snapshot;

/// The ALPN protocol both ends of a multiplexed connection agree on.
pub const ALPN: &[u8] = b"veer-mux/1";
/// What the inbound listener selects from, in its order of preference
/// (see [`Mux::server_config`]).
pub const SERVER_ALPN: [&[u8]; 3] = [ALPN, b"h2", b"http/1.1"];
/// Streams one connection carries at once (the server's
/// `SETTINGS_MAX_CONCURRENT_STREAMS`; the pool dials another past it).
pub const MAX_STREAMS: u32 = 100;
/// Each stream's receive window: what one stream may have in flight, and
/// what veer buffers for it when its app reads slower than the peer sends.
pub const STREAM_WINDOW: u32 = 1 << 20;
/// The connection's receive window: every stream's full window at once.
pub const CONN_WINDOW: u32 = STREAM_WINDOW * MAX_STREAMS;
/// The largest DATA frame either side accepts (a relay writes at most
/// 64 KiB at a time, so a frame carries what the app gave in one read).
pub const MAX_FRAME: u32 = 64 * 1024;
/// Unsent bytes a multiplexed connection's socket holds at most
/// (`TCP_NOTSENT_LOWAT`): the rest waits in h2, which takes the streams in
/// turn, so a small stream's frame is not queued behind megabytes of a bulk
/// stream's in the kernel.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;
/// A pooled connection without streams for this long is closed.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(60);
/// Bytes (both directions) past which one outbound stream counts as bulk.
pub const BULK_BYTES: u64 = 8 << 20;
/// How long an upstream that carried bulk gets dedicated connections.
pub const BULK_HOLD: Duration = Duration::from_secs(60);

/// `VEER_MUX=0` (or `false`, `off`, `no`) turns multiplexing off in every
/// mode, whatever the configuration says (for benchmarks and as a kill
/// switch).
pub fn env_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| env_says_off(std::env::var("VEER_MUX").ok().as_deref()))
}

/// Whether a value of `VEER_MUX` turns multiplexing off.
fn env_says_off(v: Option<&str>) -> bool {
    v.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    })
}

/// Whether `snap` offers and accepts multiplexing.
pub fn enabled(snap: &Snapshot) -> bool {
    snap.timeouts.mux && !env_disabled()
}

/// The multiplexing state of a process: the pool and the ALPN variants of
/// the snapshot's TLS configurations. Lives in [`Shared`].
pub struct Mux {
    server: Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
    clients: Mutex<Vec<(Arc<ClientConfig>, Arc<ClientConfig>)>>,
    pool: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
    /// Set when the inbound listener stops (drain): inbound multiplexed
    /// connections send GOAWAY, so clients open new streams elsewhere.
    drain: tokio::sync::watch::Sender<bool>,
    /// [`IDLE_EXPIRY`] in milliseconds ([`Mux::set_idle_expiry`]).
    idle_expiry_ms: AtomicU64,
    /// Upstreams marked bulk, until (milliseconds of [`Shared::now_ms`]).
    bulk: Mutex<HashMap<String, u64>>,
    /// Whether `bulk` has an entry (the common case reads only this).
    any_bulk: AtomicBool,
    /// [`BULK_BYTES`] and [`BULK_HOLD`] ([`Mux::set_bulk_rule`]).
    bulk_bytes: AtomicU64,
    bulk_hold_ms: AtomicU64,
}

impl Default for Mux {
    fn default() -> Self {
        Mux {
            server: Mutex::new(None),
            clients: Mutex::new(Vec::new()),
            pool: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            drain: tokio::sync::watch::Sender::new(false),
            idle_expiry_ms: AtomicU64::new(IDLE_EXPIRY.as_millis() as u64),
            bulk: Mutex::new(HashMap::new()),
            any_bulk: AtomicBool::new(false),
            bulk_bytes: AtomicU64::new(BULK_BYTES),
            bulk_hold_ms: AtomicU64::new(BULK_HOLD.as_millis() as u64),
        }
    }
}

/// A pool key: the endpoint, the SNI sent, and the TLS configuration (its
/// address; the slot holds the configuration, so the address is not reused
/// while the key exists).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct Key {
    addr: EndpointAddr,
    sni: String,
    config: usize,
}

/// The pooled connections of one key.
struct Slot {
    _config: Arc<ClientConfig>,
    conns: Vec<Arc<Conn>>,
    /// Held while dialing, so that concurrent app connections wait for one
    /// dial instead of each making its own.
    dial: Arc<tokio::sync::Mutex<()>>,
    /// Failed dials, and the last one's error: a caller that waited on the
    /// dial lock while one failed fails the same way.
    failures: u64,
    last_failure: Option<(&'static str, String)>,
    /// The last dial found a peer without multiplexing (an Envoy): dial
    /// without the lock, each app connection its own TLS connection.
    plain_peer: bool,
}

/// One pooled connection (its driver task owns the h2 connection).
struct Conn {
    id: u64,
    /// Taken when the connection is retired: once no handle and no stream
    /// is left, h2 closes the connection with a GOAWAY.
    send: Mutex<Option<h2::client::SendRequest<Bytes>>>,
    streams: AtomicUsize,
    /// Milliseconds (of [`Shared::now_ms`]) when the last stream ended.
    idle_since: AtomicU64,
    closed: AtomicBool,
}

/// Counts a stream of a pooled connection until dropped.
pub struct StreamGuard {
    conn: Arc<Conn>,
    shared: Arc<Shared>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.conn.idle_since.store(self.shared.now_ms(), Relaxed);
        self.conn.streams.fetch_sub(1, Relaxed);
    }
}

impl Mux {
    /// The inbound listener stopped accepting (drain): every inbound
    /// multiplexed connection refuses new streams (GOAWAY); open ones go on.
    pub fn drain_inbound(&self) {
        self.drain.send_replace(true);
    }

    /// How long a pooled connection without streams stays open (default
    /// [`IDLE_EXPIRY`]); applies to connections dialed afterwards.
    pub fn set_idle_expiry(&self, d: Duration) {
        self.idle_expiry_ms.store(d.as_millis() as u64, Relaxed);
    }

    fn idle_expiry(&self) -> Duration {
        Duration::from_millis(self.idle_expiry_ms.load(Relaxed))
    }

    /// The bulk rule: a stream past `bytes` marks its upstream bulk for
    /// `hold` (defaults [`BULK_BYTES`], [`BULK_HOLD`]); `u64::MAX` bytes
    /// turns it off.
    pub fn set_bulk_rule(&self, bytes: u64, hold: Duration) {
        self.bulk_bytes.store(bytes, Relaxed);
        self.bulk_hold_ms.store(hold.as_millis() as u64, Relaxed);
    }

    /// Whether `upstream` is marked bulk now; an expired mark is dropped
    /// (logged: its app connections are multiplexed again).
    pub fn is_bulk(&self, upstream: &str, now_ms: u64) -> bool {
        if !self.any_bulk.load(Relaxed) {
            return false;
        }
        let mut m = self.bulk.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&until) = m.get(upstream) else {
            return false;
        };
        if until > now_ms {
            return true;
        }
        m.remove(upstream);
        self.any_bulk.store(!m.is_empty(), Relaxed);
        tracing::info!(
            upstream,
            "no bulk seen for the hold time: new app connections are multiplexed again"
        );
        false
    }

    /// A stream or dedicated connection of `upstream` carried `bytes`: past
    /// the threshold the upstream is marked bulk (or its mark renewed).
    fn note_bulk(
        &self,
        metrics: &crate::metrics::Metrics,
        upstream: &str,
        bytes: u64,
        now_ms: u64,
    ) {
        if bytes < self.bulk_bytes.load(Relaxed) {
            return;
        }
        let hold = self.bulk_hold_ms.load(Relaxed);
        let mut m = self.bulk.lock().unwrap_or_else(|e| e.into_inner());
        let was = m
            .insert(upstream.to_string(), now_ms + hold)
            .is_some_and(|until| until > now_ms);
        self.any_bulk.store(true, Relaxed);
        drop(m);
        if !was {
            metrics.count("mux_bulk_switches_total", "upstream", upstream);
            tracing::info!(
                upstream,
                mib = bytes >> 20,
                hold_s = hold / 1000,
                "a multiplexed stream carried bulk: new app connections to this upstream get their own mTLS connection for the hold time"
            );
        }
    }

    /// The inbound TLS configuration: `base` with [`ALPN`] selectable.
    ///
    /// rustls refuses a client whose ALPN list shares nothing with a
    /// non-empty server list, so the list also has what a mesh client may
    /// offer today: Envoy offers `h2` to HTTP/2 upstreams, and Consul's own
    /// public listener selects `h2` or `http/1.1` the same way. (A client
    /// offering only other protocols is refused while mux is on; with
    /// `VEER_MUX=0` or `[mux] enabled = false` the server offers no ALPN, as
    /// before.)
    pub fn server_config(&self, base: &Arc<ServerConfig>) -> Arc<ServerConfig> {
        let mut cur = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((b, v)) = &*cur {
            if Arc::ptr_eq(b, base) {
                return v.clone();
            }
        }
        let mut cfg = (**base).clone();
        cfg.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
        let v = Arc::new(cfg);
        *cur = Some((base.clone(), v.clone()));
        v
    }

    /// An upstream's TLS configuration offering [`ALPN`] (a clone: same
    /// verifier, leaf and session store, so tickets are shared).
    pub fn client_config(&self, base: &Arc<ClientConfig>) -> Arc<ClientConfig> {
        let mut all = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, v)) = all.iter().find(|(b, _)| Arc::ptr_eq(b, base)) {
            return v.clone();
        }
        // Configurations no snapshot holds any more.
        all.retain(|(b, _)| Arc::strong_count(b) > 1);
        let mut cfg = (**base).clone();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        let v = Arc::new(cfg);
        all.push((base.clone(), v.clone()));
        v
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pooled connection of `key` with a free stream, counted as taken.
    fn checkout(&self, key: &Key) -> Option<(Arc<Conn>, h2::client::SendRequest<Bytes>)> {
        let pool = self.lock_pool();
        let slot = pool.get(key)?;
        for c in &slot.conns {
            if c.closed.load(Relaxed) || c.streams.load(Relaxed) >= MAX_STREAMS as usize {
                continue;
            }
            let send = c.send.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(send) = send {
                c.streams.fetch_add(1, Relaxed);
                return Some((c.clone(), send));
            }
        }
        None
    }

    /// Removes `conn` from the pool (it failed, closed, or was retired) and
    /// drops the pool's handle on it; empty slots of multiplexing peers go.
    fn retire(&self, key: &Key, conn: &Arc<Conn>) {
        conn.closed.store(true, Relaxed);
        let send = conn.send.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut pool = self.lock_pool();
        if let Some(slot) = pool.get_mut(key) {
            slot.conns.retain(|c| !Arc::ptr_eq(c, conn));
            if slot.conns.is_empty() && !slot.plain_peer && Arc::strong_count(&slot.dial) == 1 {
                pool.remove(key);
            }
        }
        drop(pool);
        drop(send);
    }

    /// Retires `conn` if it has had no stream for `idle_expiry`; true if so.
    fn expire_if_idle(&self, key: &Key, conn: &Arc<Conn>, now_ms: u64) -> bool {
        {
            // Under the pool lock: a checkout either saw the connection
            // before this or does not see it at all.
            let _pool = self.lock_pool();
            let idle = now_ms.saturating_sub(conn.idle_since.load(Relaxed));
            if conn.streams.load(Relaxed) > 0 || idle < self.idle_expiry_ms.load(Relaxed) {
                return false;
            }
            conn.closed.store(true, Relaxed);
        }
        self.retire(key, conn);
        true
    }

    /// The slot's dial lock and failure count, made if need be; `None` when
    /// the peer is known not to multiplex (dial without waiting).
    fn dial_lock(
        &self,
        key: &Key,
        config: &Arc<ClientConfig>,
    ) -> Option<(Arc<tokio::sync::Mutex<()>>, u64)> {
        let mut pool = self.lock_pool();
        if !pool.contains_key(key) {
            // Slots of endpoints that went away (no connection, no dial,
            // not a known plain peer of a configuration still in use).
            pool.retain(|_, s| {
                !s.conns.is_empty()
                    || Arc::strong_count(&s.dial) > 1
                    || (s.plain_peer && Arc::strong_count(&s._config) > 1)
            });
        }
        let slot = pool.entry(key.clone()).or_insert_with(|| Slot {
            _config: config.clone(),
            conns: Vec::new(),
            dial: Arc::new(tokio::sync::Mutex::new(())),
            failures: 0,
            last_failure: None,
            plain_peer: false,
        });
        if slot.plain_peer {
            return None;
        }
        Some((slot.dial.clone(), slot.failures))
    }

    /// A dial failed since `seen` failures: its error.
    fn failed_since(&self, key: &Key, seen: u64) -> Option<(&'static str, String)> {
        let pool = self.lock_pool();
        let slot = pool.get(key)?;
        if slot.failures > seen {
            slot.last_failure.clone()
        } else {
            None
        }
    }

    fn note_failure(&self, key: &Key, e: &OutboundError) {
        if let Some(slot) = self.lock_pool().get_mut(key) {
            slot.failures += 1;
            slot.last_failure = Some((e.classify(), e.to_string()));
        }
    }

    fn set_plain_peer(&self, key: &Key, config: &Arc<ClientConfig>, plain: bool) {
        let mut pool = self.lock_pool();
        match pool.get_mut(key) {
            Some(slot) => slot.plain_peer = plain,
            None if plain => {
                pool.insert(
                    key.clone(),
                    Slot {
                        _config: config.clone(),
                        conns: Vec::new(),
                        dial: Arc::new(tokio::sync::Mutex::new(())),
                        failures: 0,
                        last_failure: None,
                        plain_peer: true,
                    },
                );
            }
            None => {}
        }
    }

    fn insert(&self, key: &Key, conn: Arc<Conn>) {
        if let Some(slot) = self.lock_pool().get_mut(key) {
            slot.plain_peer = false;
            slot.conns.push(conn);
        }
    }

    /// Pooled connections open now (tests and `/stats`).
    pub fn pooled(&self) -> usize {
        self.lock_pool().values().map(|s| s.conns.len()).sum()
    }
}

/// What an outbound connection to a mesh upstream rides on.
pub enum UpConn {
    /// Its own mTLS connection (a peer without multiplexing, or mux off).
    Tls(Box<ClientTls<Dialed>>),
    /// A stream of a pooled multiplexed connection.
    Stream(MuxStream),
    /// Its own mTLS connection because the upstream (named) carries bulk;
    /// report its bytes with [`bulk_done`] when it ends.
    Dedicated(Box<ClientTls<Dialed>>, String),
}

/// A [`UpConn::Dedicated`] connection of `upstream` ended after carrying
/// `bytes`: bulk again renews the upstream's mark.
pub fn bulk_done(shared: &Shared, upstream: &str, bytes: u64) {
    shared
        .mux
        .note_bulk(&shared.metrics, upstream, bytes, shared.now_ms());
}

/// Why opening a stream failed.
enum OpenError {
    /// The connection could not carry it (closed, draining, refused, no
    /// answer in time): try a new connection.
    Retry(String),
    /// The peer answered with this status: final for this app connection.
    Status(StatusCode),
}

/// Opens a CONNECT stream on `send` and waits for the peer's answer.
async fn open(
    mut send: h2::client::SendRequest<Bytes>,
    authority: &str,
    timeout: Duration,
) -> Result<(SendStream<Bytes>, RecvStream), OpenError> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(())
        .map_err(|e| OpenError::Retry(e.to_string()))?;
    let fut = async move {
        std::future::poll_fn(|cx| send.poll_ready(cx)).await?;
        let (resp, stream) = send.send_request(req, false)?;
        Ok::<_, h2::Error>((resp.await?, stream))
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(OpenError::Retry("no answer to CONNECT in time".into())),
        Ok(Err(e)) => Err(OpenError::Retry(e.to_string())),
        Ok(Ok((resp, stream))) if resp.status() == StatusCode::OK => Ok((stream, resp.into_body())),
        Ok(Ok((resp, _))) => Err(OpenError::Status(resp.status())),
    }
}

fn status_error(addr: EndpointAddr, status: StatusCode) -> OutboundError {
    OutboundError::Stream {
        addr,
        status: status.as_u16(),
    }
}

/// Connects one app connection to `addr` of `upstream`: a stream of a
/// pooled connection, a stream of a new one, or (a peer without
/// multiplexing) a TLS connection of its own.
pub async fn connect(
    shared: &Arc<Shared>,
    snap: &Snapshot,
    upstream: &Upstream,
    addr: EndpointAddr,
    cluster: Option<&Arc<ClusterStats>>,
) -> Result<UpConn, OutboundError> {
    let Some(base) = upstream.tls.as_ref().map(|t| t.get()) else {
        return Err(OutboundError::Handshake(
            addr,
            "tls_setup",
            "the upstream has no TLS configuration".into(),
        ));
    };
    let key = Key {
        addr,
        sni: upstream.sni.clone(),
        config: Arc::as_ptr(&base) as usize,
    };
    let mux = &shared.mux;
    if mux.is_bulk(upstream.name(), shared.now_ms()) {
        shared
            .metrics
            .count("mux_bulk_dedicated_total", "upstream", upstream.name());
        let tls = outbound::connect_tls(
            shared,
            snap,
            upstream,
            addr,
            cluster.map(|c| &**c),
            None,
            None,
        )
        .await?;
        return Ok(UpConn::Dedicated(tls, upstream.name().to_string()));
    }
    let authority = addr.0.to_string();
    let timeout = upstream.connect_timeout;
    let stats = shared.metrics.mux(Direction::Outbound);
    let pooled = |taken: (Arc<Conn>, _)| {
        let (conn, send) = taken;
        let guard = StreamGuard {
            conn,
            shared: shared.clone(),
        };
        (guard, send)
    };
    // A pooled connection first.
    if let Some((guard, send)) = mux.checkout(&key).map(pooled) {
        match open(send, &authority, timeout).await {
            Ok((s, r)) => return Ok(stream(shared, upstream, s, r, Some(guard))),
            Err(OpenError::Status(st)) => return Err(status_error(addr, st)),
            Err(OpenError::Retry(why)) => {
                stats.streams_refused.fetch_add(1, Relaxed);
                tracing::debug!(endpoint = %addr, "pooled connection could not open a stream, dialing a new one: {why}");
                mux.retire(&key, &guard.conn);
            }
        }
    }
    // One dial at a time per key; those that waited take its connection.
    let lock = mux.dial_lock(&key, &base);
    let _held = match &lock {
        Some((l, seen)) => {
            let held = l.clone().lock_owned().await;
            if let Some((guard, send)) = mux.checkout(&key).map(pooled) {
                drop(held);
                return match open(send, &authority, timeout).await {
                    Ok((s, r)) => Ok(stream(shared, upstream, s, r, Some(guard))),
                    Err(OpenError::Status(st)) => Err(status_error(addr, st)),
                    Err(OpenError::Retry(why)) => {
                        mux.retire(&key, &guard.conn);
                        Err(OutboundError::Mux(addr, why))
                    }
                };
            }
            if let Some((label, msg)) = mux.failed_since(&key, *seen) {
                return Err(OutboundError::Handshake(addr, label, msg));
            }
            Some(held)
        }
        None => None,
    };
    let config = mux.client_config(&base);
    let tls = match outbound::connect_tls(
        shared,
        snap,
        upstream,
        addr,
        cluster.map(|c| &**c),
        Some(config),
        None,
    )
    .await
    {
        Ok(t) => t,
        Err(e) => {
            mux.note_failure(&key, &e);
            return Err(e);
        }
    };
    if tls.conn().alpn_protocol() != Some(ALPN) {
        stats.fallbacks.fetch_add(1, Relaxed);
        mux.set_plain_peer(&key, &base, true);
        return Ok(UpConn::Tls(tls));
    }
    short_send_queue(tls.tcp());
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .initial_max_send_streams(MAX_STREAMS as usize)
        .enable_push(false);
    let (send, conn) = match b.handshake::<_, Bytes>(tls).await {
        Ok(x) => x,
        Err(e) => {
            if let Some(c) = cluster {
                c.closed(0.0);
            }
            let e = OutboundError::Mux(addr, e.to_string());
            mux.note_failure(&key, &e);
            return Err(e);
        }
    };
    let entry = Arc::new(Conn {
        id: mux.next_id.fetch_add(1, Relaxed),
        send: Mutex::new(Some(send.clone())),
        streams: AtomicUsize::new(1),
        idle_since: AtomicU64::new(shared.now_ms()),
        closed: AtomicBool::new(false),
    });
    stats.conns_opened.fetch_add(1, Relaxed);
    tokio::spawn(drive(
        shared.clone(),
        conn,
        key.clone(),
        entry.clone(),
        cluster.cloned(),
    ));
    mux.insert(&key, entry.clone());
    drop(_held);
    let guard = StreamGuard {
        conn: entry,
        shared: shared.clone(),
    };
    match open(send, &authority, timeout).await {
        Ok((s, r)) => Ok(stream(shared, upstream, s, r, Some(guard))),
        Err(OpenError::Status(st)) => Err(status_error(addr, st)),
        Err(OpenError::Retry(why)) => {
            mux.retire(&key, &guard.conn);
            Err(OutboundError::Mux(addr, why))
        }
    }
}

/// See [`NOTSENT_LOWAT`].
fn short_send_queue(tcp: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set: {e}");
    }
}

fn stream(
    shared: &Arc<Shared>,
    upstream: &Upstream,
    send: SendStream<Bytes>,
    recv: RecvStream,
    guard: Option<StreamGuard>,
) -> UpConn {
    shared
        .metrics
        .mux(Direction::Outbound)
        .streams_opened
        .fetch_add(1, Relaxed);
    let mut s = MuxStream::new(send, recv, guard);
    let threshold = shared.mux.bulk_bytes.load(Relaxed);
    if threshold != u64::MAX {
        s.watch = Some(Box::new(BulkWatch {
            shared: shared.clone(),
            upstream: upstream.name().to_string(),
            left: threshold,
        }));
    }
    UpConn::Stream(s)
}

/// Drives one pooled outbound connection until it ends or, idle for
/// [`Mux::set_idle_expiry`], is retired; then takes it out of the pool.
async fn drive(
    shared: Arc<Shared>,
    conn: h2::client::Connection<Box<ClientTls<Dialed>>, Bytes>,
    key: Key,
    entry: Arc<Conn>,
    cluster: Option<Arc<ClusterStats>>,
) {
    let started = Instant::now();
    let mut conn = std::pin::pin!(conn);
    let check = (shared.mux.idle_expiry() / 4).max(Duration::from_millis(10));
    let mut retired = false;
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(endpoint = %key.addr, conn = entry.id, "multiplexed connection ended: {e}");
                }
                break;
            }
            _ = tokio::time::sleep(check), if !retired => {
                if shared.mux.expire_if_idle(&key, &entry, shared.now_ms()) {
                    tracing::debug!(endpoint = %key.addr, conn = entry.id, "multiplexed connection idle; closing it");
                    // h2 closes it (GOAWAY) now that no handle is left.
                    retired = true;
                }
            }
        }
    }
    shared.mux.retire(&key, &entry);
    shared
        .metrics
        .mux(Direction::Outbound)
        .conns_closed
        .fetch_add(1, Relaxed);
    if let Some(c) = cluster {
        c.closed(started.elapsed().as_secs_f64() * 1e3);
    }
}

/// One stream of a multiplexed connection as a byte stream: what is
/// written goes out as DATA frames within the stream's send window, what
/// arrives is read (its window released as it is taken); shutdown ends the
/// stream's sending half; [`End::reset`] resets the stream.
pub struct MuxStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    rest: Bytes,
    eos_sent: bool,
    _guard: Option<StreamGuard>,
    /// Outbound: counts the stream's bytes until it is bulk.
    watch: Option<Box<BulkWatch>>,
}

/// What an outbound stream may still carry before it marks its upstream
/// bulk.
struct BulkWatch {
    shared: Arc<Shared>,
    upstream: String,
    left: u64,
}

/// Plaintext taken per write: one relay read.
const MAX_WRITE: usize = 64 * 1024;

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, e)
}

impl MuxStream {
    fn new(send: SendStream<Bytes>, recv: RecvStream, guard: Option<StreamGuard>) -> MuxStream {
        MuxStream {
            send,
            recv,
            rest: Bytes::new(),
            eos_sent: false,
            _guard: guard,
            watch: None,
        }
    }

    /// `n` bytes went through the stream (either way).
    fn moved(&mut self, n: usize) {
        let Some(w) = &mut self.watch else {
            return;
        };
        w.left = w.left.saturating_sub(n as u64);
        if w.left == 0 {
            if let Some(w) = self.watch.take() {
                let bytes = w.shared.mux.bulk_bytes.load(Relaxed);
                w.shared
                    .mux
                    .note_bulk(&w.shared.metrics, &w.upstream, bytes, w.shared.now_ms());
            }
        }
    }

    /// The error the stream was reset with, once sending fails.
    fn poll_reset_error(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR) => Poll::Ready(io::ErrorKind::BrokenPipe.into()),
            Ok(r) => Poll::Ready(h2_io(r.into())),
            Err(e) => Poll::Ready(h2_io(e)),
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.rest.is_empty() {
                let n = this.rest.len().min(buf.remaining());
                buf.put_slice(&this.rest.split_to(n));
                this.moved(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => {
                    let _ = this.recv.flow_control().release_capacity(b.len());
                    this.rest = b;
                }
                // The peer ended its side with NO_ERROR: end of stream.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            }
        }
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = data.len().min(MAX_WRITE);
        this.send.reserve_capacity(want);
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(want);
                    return match this
                        .send
                        .send_data(Bytes::copy_from_slice(&data[..n]), false)
                    {
                        Ok(()) => {
                            this.moved(n);
                            Poll::Ready(Ok(n))
                        }
                        Err(_) => this.poll_reset_error(cx).map(Err),
                    };
                }
                Some(Err(_)) | None => return this.poll_reset_error(cx).map(Err),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.eos_sent {
            return Poll::Ready(Ok(()));
        }
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                this.eos_sent = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => this.poll_reset_error(cx).map(Err),
        }
    }
}

impl End for MuxStream {
    fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }
}

/// Serves an inbound multiplexed connection from `source` (verified by
/// the handshake): each stream is one app connection, authorized and
/// relayed like a plain one.
pub async fn serve(
    shared: Arc<Shared>,
    tls: Box<ServerTls<TcpStream>>,
    peer: ClientAddr,
    source: Arc<Peer>,
    xfcc: String,
) {
    short_send_queue(tls.tcp());
    let snap = shared.snapshot();
    // The material the connection was accepted under.
    let material = snap.tls.server.clone();
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS);
    let hs = tokio::time::timeout(snap.timeouts.handshake, b.handshake::<_, Bytes>(tls)).await;
    drop(snap);
    let mut conn = match hs {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, source = %source, "multiplexed connection failed before its first stream: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %peer, source = %source, "no HTTP/2 preface in time on a multiplexed connection");
            return;
        }
    };
    let stats = shared.metrics.mux(Direction::Inbound);
    stats.conns_opened.fetch_add(1, Relaxed);
    let mut draining = false;
    let mut drain = shared.mux.drain.subscribe();
    loop {
        let next = tokio::select! {
            next = conn.accept() => Some(next),
            _ = drain.wait_for(|d| *d), if !draining => None,
        };
        let (req, mut respond) = match next {
            None => {
                draining = true;
                tracing::debug!(peer = %peer, source = %source, "draining: the multiplexed connection takes no new streams");
                conn.graceful_shutdown();
                continue;
            }
            Some(None) => break,
            Some(Some(Ok(x))) => x,
            Some(Some(Err(e))) => {
                tracing::debug!(peer = %peer, source = %source, "multiplexed connection failed: {e}");
                break;
            }
        };
        if !Arc::ptr_eq(&shared.snapshot().tls.server, &material) {
            // New leaf or roots: this connection's handshake no longer
            // speaks for new app connections.
            stats.streams_refused.fetch_add(1, Relaxed);
            respond.send_reset(Reason::REFUSED_STREAM);
            if !draining {
                draining = true;
                tracing::debug!(peer = %peer, "TLS material changed: draining the multiplexed connection (its open streams go on)");
                conn.graceful_shutdown();
            }
            continue;
        }
        tokio::spawn(serve_stream(
            shared.clone(),
            req,
            respond,
            source.clone(),
            xfcc.clone(),
            peer,
        ));
    }
    // Open streams go on until they end.
    let _ = std::future::poll_fn(|cx| conn.poll_closed(cx)).await;
    stats.conns_closed.fetch_add(1, Relaxed);
}

/// Answers a stream's CONNECT with 200; `None` (counted closed) when the
/// stream ended first.
fn accept(
    shared: &Shared,
    respond: &mut h2::server::SendResponse<Bytes>,
    peer: ClientAddr,
) -> Option<SendStream<Bytes>> {
    let ok = Response::builder()
        .status(StatusCode::OK)
        .body(())
        .unwrap_or_default();
    match respond.send_response(ok, false) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(peer = %peer, "stream ended before its answer: {e}");
            shared
                .metrics
                .mux(Direction::Inbound)
                .streams_closed
                .fetch_add(1, Relaxed);
            shared.metrics.closed(Direction::Inbound);
            None
        }
    }
}

/// One stream of an inbound multiplexed connection: authorize, dial the
/// local app, answer, relay; or, when the inbound is L7, answer and serve
/// the stream's bytes with the L7 engine exactly as a plain connection's
/// ([`inbound::l7_serve`]: every request authorized, XFCC from this
/// connection's verified peer certificate).
async fn serve_stream(
    shared: Arc<Shared>,
    req: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    source: Arc<Peer>,
    xfcc: String,
    peer: ClientAddr,
) {
    let started = Instant::now();
    let stats = shared.metrics.mux(Direction::Inbound);
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let resp = Response::builder()
            .status(status)
            .body(())
            .unwrap_or_default();
        let _ = respond.send_response(resp, true);
    };
    // The inbound listener's connection limit holds for app connections,
    // streams or not.
    let max = shared.max_connections_of("inbound");
    if shared.metrics.active_of(Direction::Inbound) >= max as u64 {
        answer(&mut respond, StatusCode::TOO_MANY_REQUESTS);
        stats.streams_refused.fetch_add(1, Relaxed);
        shared
            .metrics
            .count("connections_overflow_total", "listener", "inbound");
        if let Some(quiet) = shared.may_warn() {
            tracing::warn!(listener = "inbound", max_connections = max, also_refused = quiet, peer = %peer, "stream refused: the listener has max_connections open");
        }
        return;
    }
    stats.streams_opened.fetch_add(1, Relaxed);
    shared.metrics.opened(Direction::Inbound);
    let envoy = shared.metrics.envoy.inbound();
    envoy.tcp.cx_total.fetch_add(1, Relaxed);
    if req.method() != Method::CONNECT {
        answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        stats.streams_closed.fetch_add(1, Relaxed);
        shared.metrics.closed(Direction::Inbound);
        return;
    }
    // Registered as an L4 relay first: a swap that turns the inbound L7
    // either sees it (and resets the stream) or is seen here.
    let reg = shared.register_l4(source.clone());
    let snap = shared.snapshot();
    if snap.inbound_http.is_some() {
        drop(reg);
        drop(snap);
        let reg = match inbound::l7_admit(&shared, &source) {
            Ok(r) => r,
            Err(e) => {
                answer(&mut respond, StatusCode::FORBIDDEN);
                stats.streams_closed.fetch_add(1, Relaxed);
                return inbound::refuse(&shared, peer, Some(&source.display_name()), e);
            }
        };
        let Some(send) = accept(&shared, &mut respond, peer) else {
            return;
        };
        let s = MuxStream::new(send, req.into_body(), None);
        inbound::l7_serve(&shared, s, source, xfcc, reg, peer, started, true).await;
        stats.streams_closed.fetch_add(1, Relaxed);
        return;
    }
    drop(xfcc);
    let decision = snap.authz.evaluate(&source);
    if !decision.allowed() {
        envoy.rbac.denied.fetch_add(1, Relaxed);
        answer(&mut respond, StatusCode::FORBIDDEN);
        stats.streams_closed.fetch_add(1, Relaxed);
        let why = snap.authz.explain(&decision);
        return inbound::refuse(
            &shared,
            peer,
            Some(&source.display_name()),
            InboundError::Denied(decision, why),
        );
    }
    envoy.rbac.allowed.fetch_add(1, Relaxed);
    let app = match inbound::dial_app(&shared, &snap, Some(&envoy.cluster)).await {
        Ok(s) => s,
        Err(e) => {
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            stats.streams_closed.fetch_add(1, Relaxed);
            return inbound::refuse(&shared, peer, Some(&source.to_string()), e.into());
        }
    };
    let Some(send) = accept(&shared, &mut respond, peer) else {
        envoy.cluster.closed(0.0);
        return;
    };
    let to = inbound::AppLeg {
        app,
        local_app: snap.local_app,
        limits: Limits {
            idle: snap.timeouts.idle,
            half_close: snap.timeouts.half_close,
        },
    };
    drop(snap);
    let s = MuxStream::new(send, req.into_body(), None);
    inbound::relay_l4(&shared, s, to, reg, &source, peer, started, true).await;
    stats.streams_closed.fetch_add(1, Relaxed);
}

#[cfg(test)]
mod tests;
