//! veer's metrics, encoded by prometheus-client in the Prometheus text
//! format: its own `veer_*` families and, beside them, the `envoy_*`
//! families Consul's UI and dashboards read ([`envoy`]).
//!
//! Hot-path counters are plain atomics (and histograms of atomics,
//! [`hist::Hist`]); the encoders read them when `/stats/prometheus` is
//! rendered. Counters keyed by a reason use `&'static str` labels from the
//! `classify()` functions, so their cardinality is bounded by the code,
//! never by traffic. Upstream-labelled counters are keyed by service name
//! (bounded by the mesh's services, and created only for upstreams actually
//! used). No label ever carries a port or a client address.
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod envoy;
pub mod hist;

#[cfg(test)]
mod tests;

use hist::{Hist, LONG_SECONDS, SHORT_SECONDS};

/// Which listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(&self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    fn idx(&self) -> usize {
        *self as usize
    }
}

#[derive(Default)]
pub struct PerDirection {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Bytes from the connection's client to veer (received).
    pub rx_bytes: AtomicU64,
    /// Bytes from veer to the connection's client (sent).
    pub tx_bytes: AtomicU64,
    /// Completed mTLS handshakes with a full exchange (certificates,
    /// signatures) and resumed ones (a session ticket): inbound as the
    /// server, outbound as the client.
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
}

/// veer <-> veer multiplexing of one direction ([`crate::mux`]): the
/// pooled mTLS connections and the streams they carry. Each stream is also
/// one connection of `veer_connections_*` (it is one app connection).
#[derive(Default)]
pub struct MuxStats {
    pub conns_opened: AtomicU64,
    pub conns_closed: AtomicU64,
    pub streams_opened: AtomicU64,
    pub streams_closed: AtomicU64,
    /// Outbound: stream opens refused on a pooled connection (closed,
    /// draining, or the peer's TLS material changed) and retried on a new
    /// connection. Inbound: streams refused that way.
    pub streams_refused: AtomicU64,
    /// Outbound: dials that offered mux and got a peer without it (an
    /// Envoy): one mTLS connection per app connection.
    pub fallbacks: AtomicU64,
}

/// Per-direction histograms (seconds).
#[derive(Debug)]
pub struct DirHists {
    /// Dials: the local app (inbound), upstream endpoints and passthrough
    /// destinations (outbound), until the TCP connection is up.
    pub connect: Hist,
    /// Completed mTLS handshakes.
    pub handshake: Hist,
    /// Relayed connections, accept to close.
    pub duration: Hist,
}

impl Default for DirHists {
    fn default() -> Self {
        DirHists {
            connect: Hist::new(SHORT_SECONDS),
            handshake: Hist::new(SHORT_SECONDS),
            duration: Hist::new(LONG_SECONDS),
        }
    }
}

/// Every counter, gauge and histogram (reached through [`Metrics`]).
#[derive(Default)]
pub struct Core {
    pub dir: [PerDirection; 2],
    pub hist: [DirHists; 2],
    pub splice_bytes: AtomicU64,
    pub copy_bytes: AtomicU64,
    pub snapshot_swaps: AtomicU64,
    pub snapshot_errors: AtomicU64,
    pub revoked: AtomicU64,
    pub accept_errors: AtomicU64,
    /// veer <-> veer multiplexing (`veer_mux_*`).
    pub mux: [MuxStats; 2],
    /// (metric name, labels) -> count.
    labelled: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    /// The `envoy_*` families.
    pub envoy: envoy::EnvoyStats,
}

/// All of veer's metrics, and the prometheus-client registry that encodes
/// them.
pub struct Metrics {
    core: Arc<Core>,
    registry: Registry,
}

impl std::ops::Deref for Metrics {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let core = Arc::new(Core::default());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Veer(core.clone())));
        Metrics { core, registry }
    }
}

/// The labels of one labelled counter, in a fixed order.
type Labels = Vec<(&'static str, String)>;

/// Labelled counters the code counts, with their help text. They are
/// rendered (without samples) even before their first event, so dashboards
/// and alerts can name them from the start.
const LABELLED: &[(&str, &str)] = &[
    (
        "inbound_handshake_failures_total",
        "Inbound TLS handshakes that failed or timed out, by reason.",
    ),
    (
        "inbound_identity_failures_total",
        "Inbound peers whose certificate carries no usable service identity, by reason.",
    ),
    (
        "intention_denials_total",
        "Inbound connections denied by intentions or network RBAC, by reason (denied_by_intention, denied_by_default, denied_no_identity, denied_by_policy, denied_no_policy).",
    ),
    (
        "inbound_permissive_total",
        "Inbound connections relayed as plain TCP because their original destination port is permissive, by port.",
    ),
    (
        "local_app_connect_failures_total",
        "Inbound connections whose dial to the local app failed, by reason.",
    ),
    (
        "outbound_failures_total",
        "Outbound connections refused or failed before relaying, by reason.",
    ),
    (
        "connections_overflow_total",
        "Connections reset at once because their listener had max_connections open, by listener.",
    ),
    (
        "connections_shed_total",
        "Connections reset at once because the process was out of file descriptors, by listener.",
    ),
    (
        "upstream_endpoint_failures_total",
        "Upstream endpoints that could not be connected (the next one is tried), by upstream service.",
    ),
    (
        "inbound_probes_total",
        "Inbound connections closed before sending a byte (TCP health checks such as Consul's \"Connect Sidecar Listening\").",
    ),
    (
        "unapplied_settings_total",
        "Settings received but not applied (each counted once, when it first appears), by kind: unsupported or needs_restart.",
    ),
    (
        "listener_bind_failures_total",
        "Listeners that could not bind after start (the snapshot wanting them was refused, or a race), by listener.",
    ),
    (
        "mux_bulk_switches_total",
        "Upstreams switched to dedicated mTLS connections because one of their multiplexed streams carried bulk (more than the threshold), by upstream.",
    ),
    (
        "mux_bulk_dedicated_total",
        "Outbound app connections given their own mTLS connection instead of a multiplexed stream while their upstream is marked bulk, by upstream.",
    ),
    (
        "leaf_expired_total",
        "Leaf certificates that expired while in use (veer is not ready until a new one arrives).",
    ),
];

/// Which labelled counters record failed dials, by direction; their
/// `reason="timeout"` series add up to `veer_connect_timeouts_total`.
const DIAL_FAILURES: &[(&str, Direction)] = &[
    ("local_app_connect_failures_total", Direction::Inbound),
    ("outbound_failures_total", Direction::Outbound),
    ("upstream_endpoint_failures_total", Direction::Outbound),
];

/// The `reason` label value of a dial that timed out (`DialError::classify`).
const TIMEOUT: &str = "timeout";

impl Core {
    pub fn d(&self, d: Direction) -> &PerDirection {
        &self.dir[d.idx()]
    }

    pub fn h(&self, d: Direction) -> &DirHists {
        &self.hist[d.idx()]
    }

    pub fn mux(&self, d: Direction) -> &MuxStats {
        &self.mux[d.idx()]
    }

    pub fn opened(&self, d: Direction) {
        self.d(d).opened.fetch_add(1, Relaxed);
    }

    /// A connection of direction `d` ended (its bytes were counted while
    /// they moved, through [`Core::live`]).
    pub fn closed(&self, d: Direction) {
        self.d(d).closed.fetch_add(1, Relaxed);
    }

    /// A relayed connection of direction `d` ended after `t`.
    pub fn relayed(&self, d: Direction, t: Duration) {
        self.closed(d);
        self.h(d).duration.observe(t.as_secs_f64());
    }

    /// The counters a relay of direction `d` adds its bytes to as they
    /// move: received from / sent to the downstream client, and by mode.
    pub fn live(&self, d: Direction) -> crate::relay::Live<'_> {
        let p = self.d(d);
        crate::relay::Live {
            a_to_b: &p.rx_bytes,
            b_to_a: &p.tx_bytes,
            copied: &self.copy_bytes,
            spliced: &self.splice_bytes,
            extra: None,
        }
    }

    /// Counts a completed handshake of direction `d` that took `t`.
    pub fn handshake(&self, d: Direction, kind: Option<rustls::HandshakeKind>, t: Duration) {
        let p = self.d(d);
        match kind {
            Some(rustls::HandshakeKind::Resumed) => p.tls_resumed.fetch_add(1, Relaxed),
            _ => p.tls_full.fetch_add(1, Relaxed),
        };
        self.h(d).handshake.observe(t.as_secs_f64());
    }

    /// Counts one event of `name` with `label = value`.
    pub fn count(&self, name: &'static str, label: &'static str, value: &str) {
        self.count_labels(name, &[(label, value)]);
    }

    /// Counts one event of `name` with several labels (keep them bounded:
    /// service names and `classify()` reasons, never ports or addresses).
    pub fn count_labels(&self, name: &'static str, labels: &[(&'static str, &str)]) {
        let key: Labels = labels.iter().map(|(l, v)| (*l, v.to_string())).collect();
        let mut m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((name, key)).or_insert(0) += 1;
    }

    /// One endpoint of `upstream` could not be connected (`reason` from
    /// `classify()`); the caller tries the next endpoint.
    pub fn endpoint_failure(&self, upstream: &str, reason: &'static str) {
        self.count_labels(
            "upstream_endpoint_failures_total",
            &[("upstream", upstream), ("reason", reason)],
        );
    }

    /// The sum of the series of a labelled counter that have any label
    /// equal to `value` (tests and `/stats`).
    pub fn get(&self, name: &str, value: &str) -> u64 {
        let m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|((n, l), _)| *n == name && l.iter().any(|(_, v)| v == value))
            .map(|(_, c)| *c)
            .sum()
    }

    /// Dials (to the local app, an upstream endpoint or a passthrough
    /// destination) that timed out, for connections of direction `d`.
    pub fn connect_timeouts(&self, d: Direction) -> u64 {
        let m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|((n, l), _)| {
                DIAL_FAILURES.iter().any(|(f, fd)| f == n && *fd == d)
                    && l.iter().any(|(k, v)| *k == "reason" && v == TIMEOUT)
            })
            .map(|(_, c)| *c)
            .sum()
    }

    /// Connections open now, both directions.
    pub fn active(&self) -> u64 {
        [Direction::Inbound, Direction::Outbound]
            .iter()
            .map(|d| self.active_of(*d))
            .sum()
    }

    /// Connections of direction `d` open now.
    pub fn active_of(&self, d: Direction) -> u64 {
        let p = self.d(d);
        p.opened
            .load(Relaxed)
            .saturating_sub(p.closed.load(Relaxed))
    }
}

impl Metrics {
    /// Renders everything in the Prometheus text format: the `veer_*`
    /// families, the `extra` gauges of the caller (open fds, snapshot
    /// age...), then the `envoy_*` families.
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(8192);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        let mut gauges = Registry::default();
        for (name, help, v) in extra {
            let (name, help) = (
                format!("veer_{name}"),
                help.strip_suffix('.').unwrap_or(help),
            );
            // Whole numbers as integers (`veer_ready 1`), the rest as floats.
            if v.is_finite() && v.fract() == 0.0 && v.abs() < 9e15 {
                let g = Gauge::<i64>::default();
                g.set(*v as i64);
                gauges.register(name, help, g);
            } else {
                let g = Gauge::<f64, AtomicU64>::default();
                g.set(*v);
                gauges.register(name, help, g);
            }
        }
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &gauges);
        let mut envoy = Registry::default();
        envoy.register_collector(Box::new(EnvoyOf(self.core.clone())));
        let mut text = String::with_capacity(4096);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &envoy);
        // Envoy's counters without `_total` were encoded untyped (see
        // `envoy::ENVOY_COUNTER_HELP`): give them back their type.
        let help = envoy::ENVOY_COUNTER_HELP;
        let mut untyped = false;
        for line in text.lines() {
            if line.starts_with("# HELP ") {
                untyped = line.ends_with(help);
            }
            match line.strip_suffix(" untyped") {
                Some(t) if untyped && t.starts_with("# TYPE ") => {
                    out.push_str(t);
                    out.push_str(" counter\n");
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

/// Encodes the `veer_*` families.
#[derive(Debug)]
struct Veer(Arc<Core>);

/// Encodes the `envoy_*` families.
#[derive(Debug)]
struct EnvoyOf(Arc<Core>);

impl Collector for EnvoyOf {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.0.envoy.encode(enc)
    }
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("metrics::Core")
    }
}

const DIRS: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

/// A counter family's name for prometheus-client, which appends `_total`.
fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Collector for Veer {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let per = |enc: &mut DescriptorEncoder,
                   name: &str,
                   help: &str,
                   f: &dyn Fn(&PerDirection) -> u64|
         -> Result<(), std::fmt::Error> {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for d in DIRS {
                e.encode_family(&[("direction", d.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&f(m.d(d)), None)?;
            }
            Ok(())
        };
        per(
            &mut enc,
            "veer_connections_opened",
            "Connections accepted.",
            &|p| p.opened.load(Relaxed),
        )?;
        per(
            &mut enc,
            "veer_connections_closed",
            "Connections closed.",
            &|p| p.closed.load(Relaxed),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "veer_connections_active",
                "Connections open now.",
                None,
                MetricType::Gauge,
            )?;
            for d in DIRS {
                e.encode_family(&[("direction", d.as_str())])?
                    .encode_gauge(&(m.active_of(d) as i64))?;
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "veer_tls_handshakes",
                "Completed mTLS handshakes, full or resumed from a session ticket.",
                None,
                MetricType::Counter,
            )?;
            for d in DIRS {
                let p = m.d(d);
                for (kind, n) in [("full", &p.tls_full), ("resumed", &p.tls_resumed)] {
                    e.encode_family(&[("direction", d.as_str()), ("kind", kind)])?
                        .encode_counter::<NoLabelSet, _, u64>(&n.load(Relaxed), None)?;
                }
            }
        }
        per(
            &mut enc,
            "veer_received_bytes",
            "Bytes received from the downstream client.",
            &|p| p.rx_bytes.load(Relaxed),
        )?;
        per(
            &mut enc,
            "veer_sent_bytes",
            "Bytes sent to the downstream client.",
            &|p| p.tx_bytes.load(Relaxed),
        )?;
        {
            let mut e = enc.encode_descriptor(
                "veer_relayed_bytes",
                "Bytes relayed, by mechanism.",
                None,
                MetricType::Counter,
            )?;
            for (mode, v) in [("splice", &m.splice_bytes), ("copy", &m.copy_bytes)] {
                e.encode_family(&[("mode", mode)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
            }
        }
        for (name, help, v) in [
            (
                "veer_snapshot_swaps",
                "Snapshots applied.",
                &m.snapshot_swaps,
            ),
            (
                "veer_snapshot_errors",
                "Snapshots rejected (the previous one stays).",
                &m.snapshot_errors,
            ),
            (
                "veer_connections_revoked",
                "Open inbound connections closed because an intention change denies them.",
                &m.revoked,
            ),
            (
                "veer_accept_errors",
                "Errors accepting connections (e.g. out of file descriptors).",
                &m.accept_errors,
            ),
        ] {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v.load(Relaxed), None)?;
        }
        for (name, help, f) in [
            (
                "veer_mux_connections_opened",
                "Multiplexed mTLS connections (veer <-> veer) opened.",
                (|x: &MuxStats| x.conns_opened.load(Relaxed)) as fn(&MuxStats) -> u64,
            ),
            (
                "veer_mux_connections_closed",
                "Multiplexed mTLS connections closed.",
                |x: &MuxStats| x.conns_closed.load(Relaxed),
            ),
            (
                "veer_mux_streams_opened",
                "App connections carried as streams of a multiplexed connection.",
                |x: &MuxStats| x.streams_opened.load(Relaxed),
            ),
            (
                "veer_mux_streams_closed",
                "Streams of multiplexed connections closed.",
                |x: &MuxStats| x.streams_closed.load(Relaxed),
            ),
            (
                "veer_mux_streams_refused",
                "Streams refused on a pooled connection that was closing or whose TLS material changed (outbound: retried on a new connection).",
                |x: &MuxStats| x.streams_refused.load(Relaxed),
            ),
            (
                "veer_mux_fallbacks",
                "Outbound dials whose peer did not negotiate multiplexing (one mTLS connection per app connection, as with Envoy).",
                |x: &MuxStats| x.fallbacks.load(Relaxed),
            ),
        ] {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for d in DIRS {
                e.encode_family(&[("direction", d.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&f(m.mux(d)), None)?;
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "veer_mux_connections_active",
                "Multiplexed mTLS connections open now.",
                None,
                MetricType::Gauge,
            )?;
            for d in DIRS {
                let x = m.mux(d);
                let n = x
                    .conns_opened
                    .load(Relaxed)
                    .saturating_sub(x.conns_closed.load(Relaxed));
                e.encode_family(&[("direction", d.as_str())])?
                    .encode_gauge(&(n as i64))?;
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "veer_connect_timeouts",
                "Dials that timed out (local app, upstream endpoints, passthrough destinations).",
                None,
                MetricType::Counter,
            )?;
            for d in DIRS {
                e.encode_family(&[("direction", d.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&m.connect_timeouts(d), None)?;
            }
        }
        for (name, help, f) in [
            (
                "veer_connect_seconds",
                "Time to connect a dial (local app inbound; upstream endpoints and passthrough destinations outbound).",
                (|h: &DirHists| &h.connect) as fn(&DirHists) -> &Hist,
            ),
            (
                "veer_tls_handshake_seconds",
                "Time of completed mTLS handshakes.",
                |h: &DirHists| &h.handshake,
            ),
            (
                "veer_connection_duration_seconds",
                "How long relayed connections lasted, accept to close.",
                |h: &DirHists| &h.duration,
            ),
        ] {
            let mut e = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for d in DIRS {
                let labels = [("direction", d.as_str())];
                let mut s = e.encode_family(&labels)?;
                f(m.h(d)).encode_into(&mut s)?;
            }
        }
        let map = m.labelled.lock().unwrap_or_else(|e| e.into_inner());
        for (name, help) in LABELLED {
            let full = format!("veer_{}", counter_name(name));
            let mut e = enc.encode_descriptor(&full, help, None, MetricType::Counter)?;
            for ((_, labels), c) in map
                .range((*name, Labels::new())..)
                .take_while(|((n, _), _)| n == name)
            {
                e.encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(c, None)?;
            }
        }
        let mut rest: BTreeMap<&str, Vec<(&Labels, u64)>> = BTreeMap::new();
        for ((name, labels), c) in map.iter() {
            if !LABELLED.iter().any(|(n, _)| n == name) {
                rest.entry(name).or_default().push((labels, *c));
            }
        }
        for (name, series) in rest {
            let full = format!("veer_{}", counter_name(name));
            let mut e = enc.encode_descriptor(&full, "", None, MetricType::Counter)?;
            for (labels, c) in series {
                e.encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&c, None)?;
            }
        }
        Ok(())
    }
}

/// Open file descriptors of this process (`/proc/self/fd`).
pub fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    // The directory handle being read is one of them.
    Some(n.saturating_sub(1))
}

/// The soft limit on open file descriptors (`/proc/self/limits`).
pub fn max_fds() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
