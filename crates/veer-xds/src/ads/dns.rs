//! Resolution of the hostnames DNS clusters name (Consul: mesh gateways
//! and peers' gateways known by hostname), for the ADS client; the
//! translation stays sans IO and reads the answers from
//! `Resources::dns`.
//!
//! Every wanted name is resolved with the system's resolver
//! (`tokio::net::lookup_host`, getaddrinfo on tokio's blocking pool) when
//! the set of names changes and then every refresh interval: the shortest
//! `dns_refresh_rate` of the clusters naming any (Consul sends 10 s;
//! Envoy's default, 5 s, when a cluster sets none; never more often than
//! once a second). A gateway's address changes rarely, and a new
//! connection to a stale one fails over like any dead endpoint, so the
//! cluster's own rate is enough; no TTL is read (getaddrinfo gives none).
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// One round of answers: a name's addresses, or `None` when its lookup
/// failed.
pub type Answers = BTreeMap<String, Option<Vec<IpAddr>>>;

/// How long one lookup may take before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves the names in `wanted` (name → refresh interval) whenever they
/// change and every interval after, sending each round to `out`. Ends
/// when either channel closes.
pub async fn resolve_loop(
    mut wanted: watch::Receiver<BTreeMap<String, Duration>>,
    out: mpsc::Sender<Answers>,
) {
    loop {
        let names = wanted.borrow_and_update().clone();
        if names.is_empty() {
            if wanted.changed().await.is_err() {
                return;
            }
            continue;
        }
        let every = names
            .values()
            .min()
            .copied()
            .unwrap_or(Duration::from_secs(5));
        let mut answers = Answers::new();
        for name in names.keys() {
            answers.insert(name.clone(), lookup(name).await);
        }
        if out.send(answers).await.is_err() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            r = wanted.changed() => if r.is_err() { return },
        }
    }
}

/// The addresses of `name`, in the resolver's order, without repeats.
async fn lookup(name: &str) -> Option<Vec<IpAddr>> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addrs)) => {
            let mut ips: Vec<IpAddr> = Vec::new();
            for a in addrs {
                if !ips.contains(&a.ip()) {
                    ips.push(a.ip());
                }
            }
            Some(ips)
        }
        Ok(Err(e)) => {
            tracing::warn!(
                name,
                "xDS: DNS lookup failed: {e}; keeping the addresses held"
            );
            None
        }
        Err(_) => {
            tracing::warn!(
                name,
                "xDS: DNS lookup timed out after {LOOKUP_TIMEOUT:?}; keeping the addresses held"
            );
            None
        }
    }
}
