//! Counters and gauges, rendered in the Prometheus text format.
//!
//! Hot-path counters are plain atomics. Counters keyed by a reason use
//! `&'static str` labels from the `classify()` functions, so their
//! cardinality is bounded by the code, never by traffic. Upstream-labelled
//! counters are keyed by service name (bounded by the mesh's services, and
//! created only for upstreams actually used).
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
    /// (metric name, label name, label value) -> count.
    labelled: Mutex<BTreeMap<(&'static str, &'static str, String), u64>>,
}

impl Metrics {
    pub fn d(&self, d: Direction) -> &PerDirection {
        &self.dir[d.idx()]
    }

    pub fn opened(&self, d: Direction) {
        self.d(d).opened.fetch_add(1, Relaxed);
    }

    pub fn closed(&self, d: Direction, rx: u64, tx: u64) {
        let p = self.d(d);
        p.closed.fetch_add(1, Relaxed);
        p.rx_bytes.fetch_add(rx, Relaxed);
        p.tx_bytes.fetch_add(tx, Relaxed);
    }

    /// Counts one event of `name` with `label = value`.
    pub fn count(&self, name: &'static str, label: &'static str, value: &str) {
        let mut m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((name, label, value.to_string())).or_insert(0) += 1;
    }

    /// The current value of a labelled counter (tests and `/stats`).
    pub fn get(&self, name: &str, value: &str) -> u64 {
        let m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .filter(|((n, _, v), _)| *n == name && v == value)
            .map(|(_, c)| *c)
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
        let m = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = "";
        for ((name, label, value), c) in m.iter() {
            if *name != last {
                let _ = writeln!(out, "# TYPE veer_{name} counter");
                last = name;
            }
            let _ = writeln!(out, "veer_{name}{{{label}=\"{value}\"}} {c}");
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
