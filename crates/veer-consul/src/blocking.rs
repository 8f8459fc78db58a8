//! Blocking-query bookkeeping, sans IO: the next index to ask for, the
//! retry back-off with jitter, and the pacing of answers that come back
//! early without news.
use std::time::Duration;

/// The `index` to send next after an answer carrying `got`
/// (`X-Consul-Index`), following Consul's rules: no header ⇒ 0 (the next
/// query does not block); an index that went backwards (agent or server
/// restarted, snapshot restored) ⇒ 0, so that the next query returns at
/// once with fresh data instead of blocking for the whole wait; an index
/// of 0 ⇒ 1 (0 would never block).
pub fn next_index(prev: u64, got: Option<u64>) -> u64 {
    match got {
        None => 0,
        Some(i) if i < prev => 0,
        Some(0) => 1,
        Some(i) => i,
    }
}

/// Where a blocking query stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Cursor {
    /// Nothing yet (or reset after an error): the next query returns at once.
    #[default]
    Fresh,
    /// Index-based (`?index=`).
    Index(u64),
    /// Hash-based (`?hash=`), for agent-local endpoints.
    Hash(String),
}

impl Cursor {
    /// The query parameters for the next request: `index=..&wait=..`,
    /// `hash=..&wait=..`, or nothing.
    pub fn query(&self, wait: Duration) -> Option<String> {
        let w = format!("{}s", wait.as_secs().max(1));
        match self {
            Cursor::Fresh | Cursor::Index(0) => None,
            Cursor::Index(i) => Some(format!("index={i}&wait={w}")),
            Cursor::Hash(h) => Some(format!("hash={}&wait={w}", crate::http::escape(h))),
        }
    }

    /// Moves on after an answer; returns whether it is news (the first
    /// answer, or a changed index or hash).
    pub fn advance(&mut self, hash_based: bool, index: Option<u64>, hash: Option<&str>) -> bool {
        let next = if hash_based {
            match hash {
                Some(h) => Cursor::Hash(h.to_string()),
                None => Cursor::Fresh,
            }
        } else {
            let prev = match self {
                Cursor::Index(i) => *i,
                _ => 0,
            };
            match next_index(prev, index) {
                0 => Cursor::Fresh,
                i => Cursor::Index(i),
            }
        };
        let news = matches!(self, Cursor::Fresh) || *self != next || next == Cursor::Fresh;
        *self = next;
        news
    }
}

/// A small xorshift generator for jitter and probe names; no crypto needed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock, the process ID and a counter.
    pub fn new() -> Rng {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = N.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        Rng::seeded(t ^ n ^ ((std::process::id() as u64) << 32))
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Rng {
    fn default() -> Rng {
        Rng::new()
    }
}

/// Retry back-off: `base · 2^(n-1)` capped at `max`, each delay drawn
/// uniformly from its upper half so that many watches failing together
/// (agent restart) do not retry in lock step.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    failures: u32,
    rng: Rng,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(200), Duration::from_secs(30))
    }
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            failures: 0,
            rng: Rng::new(),
        }
    }

    /// Records a failure; returns how long to wait before retrying.
    pub fn failure(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(20);
        let full = self.base.saturating_mul(1u32 << exp).min(self.max);
        full.mul_f64(0.5 + 0.5 * self.rng.unit())
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether the current failure deserves a warning: the 1st, 2nd, 4th,
    /// 8th … so a long outage logs a handful of lines per watch, not one
    /// per retry.
    pub fn should_warn(&self) -> bool {
        self.failures.is_power_of_two()
    }

    /// Forgets the failures (after a success); returns how many there were.
    pub fn reset(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }
}

/// Paces answers that bring nothing new and came back quickly (a
/// misbehaving endpoint, or one that does not block): 100 ms, doubling up
/// to 10 s, reset by any news or any answer that blocked for a while.
#[derive(Clone, Debug, Default)]
pub struct Pacer {
    quick: u32,
}

impl Pacer {
    /// How long to sleep before the next query.
    pub fn after(&mut self, news: bool, took: Duration) -> Duration {
        if news || took >= Duration::from_secs(1) {
            self.quick = 0;
            return Duration::ZERO;
        }
        self.quick = (self.quick + 1).min(8);
        Duration::from_millis(100u64 << (self.quick - 1)).min(Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, Some(5)), 5);
        assert_eq!(next_index(5, Some(9)), 9);
        assert_eq!(next_index(9, Some(9)), 9);
        assert_eq!(next_index(9, Some(3)), 0, "went backwards: reset");
        assert_eq!(next_index(0, Some(0)), 1, "0 never blocks");
        assert_eq!(next_index(7, None), 0);
    }

    #[test]
    fn cursors() {
        let w = Duration::from_secs(300);
        let mut c = Cursor::Fresh;
        assert_eq!(c.query(w), None);
        assert!(c.advance(false, Some(10), None), "first answer is news");
        assert_eq!(c.query(w).as_deref(), Some("index=10&wait=300s"));
        assert!(!c.advance(false, Some(10), None), "same index: no news");
        assert!(c.advance(false, Some(12), None));
        assert!(
            c.advance(false, Some(4), None),
            "backwards: news, and reset"
        );
        assert_eq!(c, Cursor::Fresh);
        assert!(c.advance(false, Some(4), None));
        assert_eq!(c, Cursor::Index(4));

        let mut h = Cursor::Fresh;
        assert!(h.advance(true, None, Some("abc")));
        assert_eq!(h.query(w).as_deref(), Some("hash=abc&wait=300s"));
        assert!(!h.advance(true, None, Some("abc")));
        assert!(h.advance(true, None, Some("def")));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut last_cap = Duration::ZERO;
        for n in 1..=12u32 {
            let d = b.failure();
            let cap = Duration::from_millis(200 * (1u64 << (n - 1))).min(Duration::from_secs(30));
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {n}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= last_cap);
            last_cap = cap;
        }
        assert_eq!(b.failures(), 12);
        let warned: Vec<u32> = {
            let mut b = Backoff::default();
            (1..=20)
                .filter(|_| {
                    b.failure();
                    b.should_warn()
                })
                .collect()
        };
        assert_eq!(warned, vec![1, 2, 4, 8, 16]);
        assert_eq!(b.reset(), 12);
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn pacer() {
        let mut p = Pacer::default();
        let quick = Duration::from_millis(5);
        assert_eq!(p.after(true, quick), Duration::ZERO);
        assert_eq!(p.after(false, quick), Duration::from_millis(100));
        assert_eq!(p.after(false, quick), Duration::from_millis(200));
        for _ in 0..10 {
            p.after(false, quick);
        }
        assert_eq!(p.after(false, quick), Duration::from_secs(10));
        assert_eq!(p.after(false, Duration::from_secs(300)), Duration::ZERO);
    }

    #[test]
    fn rng_unit_range() {
        let mut r = Rng::seeded(42);
        for _ in 0..1000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
