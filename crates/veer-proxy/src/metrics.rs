//! Counters and gauges, rendered in the Prometheus text format.
//!
//! Hot-path counters are plain atomics. Counters keyed by a reason use
//! `&'static str` labels from the `classify()` functions, so their
//! cardinality is bounded by the code, never by traffic. Upstream-labelled
//! counters are keyed by service name (bounded by the mesh's services, and
//! created only for upstreams actually used). No label ever carries a port
//! or a client address.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

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

/// All of veer's metrics.
#[derive(Default)]
pub struct Metrics {
    pub dir: [PerDirection; 2],
    pub splice_bytes: AtomicU64,
    pub copy_bytes: AtomicU64,
    pub snapshot_swaps: AtomicU64,
    pub snapshot_errors: AtomicU64,
    pub revoked: AtomicU64,
    pub accept_errors: AtomicU64,
    /// (metric name, labels) -> count.
    labelled: Mutex<BTreeMap<(&'static str, Labels), u64>>,
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

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

impl Metrics {
    pub fn d(&self, d: Direction) -> &PerDirection {
        &self.dir[d.idx()]
    }

    pub fn opened(&self, d: Direction) {
        self.d(d).opened.fetch_add(1, Relaxed);
    }

    /// A connection of direction `d` ended (its bytes were counted while
    /// they moved, through [`Metrics::live`]).
    pub fn closed(&self, d: Direction) {
        self.d(d).closed.fetch_add(1, Relaxed);
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
        }
    }

    /// Counts a completed handshake of direction `d`.
    pub fn handshake(&self, d: Direction, kind: Option<rustls::HandshakeKind>) {
        let p = self.d(d);
        match kind {
            Some(rustls::HandshakeKind::Resumed) => p.tls_resumed.fetch_add(1, Relaxed),
            _ => p.tls_full.fetch_add(1, Relaxed),
        };
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
            .map(|d| {
                let p = self.d(*d);
                p.opened
                    .load(Relaxed)
                    .saturating_sub(p.closed.load(Relaxed))
            })
            .sum()
    }

    /// Renders everything in the Prometheus text format. `extra` gauges
    /// (open fds, snapshot age...) are appended by the caller.
    pub fn render(&self, extra: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        let per = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&PerDirection) -> u64| {
            let _ = writeln!(out, "# HELP veer_{name} {help}\n# TYPE veer_{name} counter");
            for d in [Direction::Inbound, Direction::Outbound] {
                let _ = writeln!(
                    out,
                    "veer_{name}{{direction=\"{}\"}} {}",
                    d.as_str(),
                    f(self.d(d))
                );
            }
        };
        per(
            &mut out,
            "connections_opened_total",
            "Connections accepted.",
            &|p| p.opened.load(Relaxed),
        );
        per(
            &mut out,
            "connections_closed_total",
            "Connections closed.",
            &|p| p.closed.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP veer_connections_active Connections open now.\n# TYPE veer_connections_active gauge");
        for d in [Direction::Inbound, Direction::Outbound] {
            let p = self.d(d);
            let active = p
                .opened
                .load(Relaxed)
                .saturating_sub(p.closed.load(Relaxed));
            let _ = writeln!(
                out,
                "veer_connections_active{{direction=\"{}\"}} {active}",
                d.as_str()
            );
        }
        let _ = writeln!(out, "# HELP veer_tls_handshakes_total Completed mTLS handshakes, full or resumed from a session ticket.\n# TYPE veer_tls_handshakes_total counter");
        for d in [Direction::Inbound, Direction::Outbound] {
            let p = self.d(d);
            for (kind, n) in [("full", &p.tls_full), ("resumed", &p.tls_resumed)] {
                let _ = writeln!(
                    out,
                    "veer_tls_handshakes_total{{direction=\"{}\",kind=\"{kind}\"}} {}",
                    d.as_str(),
                    n.load(Relaxed)
                );
            }
        }
        per(
            &mut out,
            "received_bytes_total",
            "Bytes received from the downstream client.",
            &|p| p.rx_bytes.load(Relaxed),
        );
        per(
            &mut out,
            "sent_bytes_total",
            "Bytes sent to the downstream client.",
            &|p| p.tx_bytes.load(Relaxed),
        );
        let _ = writeln!(out, "# HELP veer_relayed_bytes_total Bytes relayed, by mechanism.\n# TYPE veer_relayed_bytes_total counter");
        let _ = writeln!(
            out,
            "veer_relayed_bytes_total{{mode=\"splice\"}} {}",
            self.splice_bytes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "veer_relayed_bytes_total{{mode=\"copy\"}} {}",
            self.copy_bytes.load(Relaxed)
        );
        for (name, help, v) in [
            (
                "snapshot_swaps_total",
                "Snapshots applied.",
                &self.snapshot_swaps,
            ),
            (
                "snapshot_errors_total",
                "Snapshots rejected (the previous one stays).",
                &self.snapshot_errors,
            ),
            (
                "connections_revoked_total",
                "Open inbound connections closed because an intention change denies them.",
                &self.revoked,
            ),
            (
                "accept_errors_total",
                "Errors accepting connections (e.g. out of file descriptors).",
                &self.accept_errors,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP veer_{name} {help}\n# TYPE veer_{name} counter\nveer_{name} {}",
                v.load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP veer_connect_timeouts_total Dials that timed out (local app, upstream endpoints, passthrough destinations).\n# TYPE veer_connect_timeouts_total counter");
        for d in [Direction::Inbound, Direction::Outbound] {
            let _ = writeln!(
                out,
                "veer_connect_timeouts_total{{direction=\"{}\"}} {}",
                d.as_str(),
                self.connect_timeouts(d)
            );
        }
        let m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        for (name, help) in LABELLED {
            let _ = writeln!(out, "# HELP veer_{name} {help}\n# TYPE veer_{name} counter");
            for ((_, labels), c) in m
                .range((*name, Labels::new())..)
                .take_while(|((n, _), _)| n == name)
            {
                write_sample(&mut out, name, labels, *c);
            }
        }
        let mut last = "";
        for ((name, labels), c) in m.iter() {
            if LABELLED.iter().any(|(n, _)| n == name) {
                continue;
            }
            if *name != last {
                let _ = writeln!(out, "# TYPE veer_{name} counter");
                last = name;
            }
            write_sample(&mut out, name, labels, *c);
        }
        drop(m);
        for (name, help, v) in extra {
            let _ = writeln!(
                out,
                "# HELP veer_{name} {help}\n# TYPE veer_{name} gauge\nveer_{name} {v}"
            );
        }
        out
    }
}

fn write_sample(out: &mut String, name: &str, labels: &Labels, v: u64) {
    let _ = write!(out, "veer_{name}");
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {v}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_render_with_help_and_escaping() {
        let m = Metrics::default();
        m.count("intention_denials_total", "reason", "denied_by_default");
        m.count("intention_denials_total", "reason", "denied_by_default");
        m.endpoint_failure("api", "timeout");
        m.endpoint_failure("we\"ird", "refused");
        m.count("outbound_failures_total", "reason", "timeout");
        m.count("local_app_connect_failures_total", "reason", "refused");
        m.count("something_new_total", "reason", "x");
        let out = m.render(&[("open_fds", "Open fds.", 7.0)]);
        assert!(out.contains("veer_intention_denials_total{reason=\"denied_by_default\"} 2\n"));
        assert!(out.contains(
            "veer_upstream_endpoint_failures_total{upstream=\"api\",reason=\"timeout\"} 1\n"
        ));
        assert!(out.contains("upstream=\"we\\\"ird\""), "{out}");
        assert!(out.contains("veer_connect_timeouts_total{direction=\"outbound\"} 2\n"));
        assert!(out.contains("veer_connect_timeouts_total{direction=\"inbound\"} 0\n"));
        assert!(out.contains("# HELP veer_inbound_handshake_failures_total "));
        assert!(out.contains(
            "# TYPE veer_something_new_total counter\nveer_something_new_total{reason=\"x\"} 1\n"
        ));
        assert!(out.contains("# TYPE veer_open_fds gauge\nveer_open_fds 7\n"));
        assert_eq!(m.get("upstream_endpoint_failures_total", "api"), 1);
        assert_eq!(m.connect_timeouts(Direction::Outbound), 2);
        // Every sample line belongs to a family declared just before it.
        let mut families = std::collections::HashSet::new();
        for l in out.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                assert!(
                    families.insert(rest.split(' ').next().unwrap().to_string()),
                    "{l}"
                );
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap();
                assert!(families.contains(name), "{name} has no TYPE line");
            }
        }
    }

    #[test]
    fn active_counts_both_directions() {
        let m = Metrics::default();
        m.opened(Direction::Inbound);
        m.opened(Direction::Outbound);
        m.opened(Direction::Outbound);
        m.closed(Direction::Outbound);
        assert_eq!(m.active(), 2);
    }

    #[test]
    fn process_fds_are_read() {
        assert!(open_fds().unwrap() >= 3);
        assert!(max_fds().unwrap() >= 64);
    }
}
