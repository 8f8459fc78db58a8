//! A histogram whose observations are atomic adds (no lock on the data
//! path), encoded by prometheus-client like its own histograms.
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Envoy's default histogram buckets (milliseconds for `*_ms` stats), as
/// the real Envoy 1.40 renders them at `/stats/prometheus`.
pub const ENVOY_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Seconds, for dials and handshakes.
pub const SHORT_SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Seconds, for how long connections last.
pub const LONG_SECONDS: &[f64] = &[
    0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0,
];

/// Fixed buckets, a count and a sum, all atomics. Cloning shares them.
#[derive(Clone, Debug)]
pub struct Hist(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); above the last bound
    /// only `count` has them (`+Inf`).
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum in millionths of the unit.
    sum_micro: AtomicU64,
}

impl Hist {
    pub fn new(bounds: &'static [f64]) -> Hist {
        Hist(Arc::new(Inner {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, v: f64) {
        let i = &self.0;
        if let Some(b) = i.bounds.iter().position(|b| v <= *b) {
            i.buckets[b].fetch_add(1, Relaxed);
        }
        i.count.fetch_add(1, Relaxed);
        i.sum_micro.fetch_add((v.max(0.0) * 1e6) as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Relaxed)
    }

    pub fn sum(&self) -> f64 {
        self.0.sum_micro.load(Relaxed) as f64 / 1e6
    }

    /// Encodes the histogram's samples (the encoder adds `+Inf`).
    pub fn encode_into(&self, e: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        let i = &self.0;
        let buckets: Vec<(f64, u64)> = i
            .bounds
            .iter()
            .zip(i.buckets.iter())
            .map(|(b, c)| (*b, c.load(Relaxed)))
            .collect();
        e.encode_histogram::<NoLabelSet>(self.sum(), self.count(), &buckets, None)
    }
}

impl EncodeMetric for Hist {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.encode_into(&mut encoder)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
