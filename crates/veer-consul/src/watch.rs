//! One blocking-query watch: a task that asks the agent again and again,
//! parses each answer and sends news to the source's event loop.
use crate::api::{
    self, CatalogInstance, ConnectInstance, Leaf, Mesh, ProxyDefaults, Registration, Roots,
    ServiceDefaults,
};
use crate::assemble::{ServiceKey, TargetKey};
use crate::blocking::{Backoff, Cursor, Pacer};
use crate::chain::Compiled;
use crate::entries::{self, Entry, Kind};
use crate::feed::{CatalogView, Fetched};
use crate::http::{escape, Client, Response};
use crate::Error;
use api::ChecksView;
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use veer_core::intentions::{Action, Intention};

/// What a watch follows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchKey {
    /// `/v1/agent/service/:id` (hash-based).
    Registration,
    /// `/v1/agent/connect/ca/roots`.
    Roots,
    /// `/v1/agent/connect/ca/leaf/:service`.
    Leaf(String),
    /// `/v1/connect/intentions` (see the crate docs for why not `match`).
    Intentions,
    /// `/v1/catalog/services` (name → tags; the feed's first list).
    Catalog,
    /// `/v1/health/state/any` (every check; the feed's second list).
    Checks,
    /// One non-blocking read of `/v1/health/state/any` (not a watch).
    ChecksNow,
    /// One non-blocking read of a service for the feed (not a watch).
    Fetch(String),
    /// `/v1/health/connect/:service[?dc=]`.
    Connect(ServiceKey),
    /// `/v1/catalog/service/:service`.
    Instances(ServiceKey),
    /// `/v1/config/service-defaults`.
    ServiceDefaults,
    /// `/v1/config/proxy-defaults`.
    ProxyDefaults,
    /// `/v1/config/mesh/mesh`.
    Mesh,
    /// `/v1/config/service-resolver` (`-router`, `-splitter`): every entry
    /// of the kind ([`crate::entries`]).
    ChainEntries(Kind),
    /// One round of non-blocking reads of `/v1/discovery-chain/:service`
    /// for the upstreams with a resolver (not a watch).
    Chains,
    /// `/v1/health/connect/:service?dc=&filter=`: a chain target's instances.
    Target(TargetKey),
    /// `/v1/internal/ui/nodes?dc=&filter=Services.Kind contains "mesh-gateway"`:
    /// a datacenter's mesh gateways, by kind.
    Gateways(String),
    /// The default-decision probe (not a blocking query).
    DefaultProbe,
}

impl std::fmt::Display for WatchKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchKey::Registration => f.write_str("registration"),
            WatchKey::Roots => f.write_str("roots"),
            WatchKey::Leaf(s) => write!(f, "leaf:{s}"),
            WatchKey::Intentions => f.write_str("intentions"),
            WatchKey::Catalog => f.write_str("catalog"),
            WatchKey::Checks => f.write_str("checks"),
            WatchKey::ChecksNow => f.write_str("checks-now"),
            WatchKey::Fetch(s) => write!(f, "fetch:{s}"),
            WatchKey::Connect(k) => write!(f, "connect:{k}"),
            WatchKey::Instances(k) => write!(f, "instances:{k}"),
            WatchKey::ServiceDefaults => f.write_str("service-defaults"),
            WatchKey::ProxyDefaults => f.write_str("proxy-defaults"),
            WatchKey::Mesh => f.write_str("mesh"),
            WatchKey::ChainEntries(k) => f.write_str(k.as_str()),
            WatchKey::Chains => f.write_str("discovery-chains"),
            WatchKey::Target(k) => write!(f, "target:{k}"),
            WatchKey::Gateways(dc) => write!(f, "gateways:{dc}"),
            WatchKey::DefaultProbe => f.write_str("default-decision"),
        }
    }
}

/// How the default decision was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultOutcome {
    Known {
        action: Action,
        via: &'static str,
    },
    /// Neither the authorize probe nor `/v1/agent/self` told.
    Unknown(String),
}

/// A parsed answer.
#[derive(Debug)]
pub enum Payload {
    Registration(Box<Registration>),
    Roots(Roots),
    Leaf(Leaf),
    Intentions(Vec<Intention>),
    Catalog(CatalogView),
    Checks(ChecksView),
    Fetched(Fetched),
    Connect(Vec<ConnectInstance>),
    Instances(Vec<CatalogInstance>),
    ServiceDefaults(BTreeMap<String, ServiceDefaults>),
    ProxyDefaults(ProxyDefaults),
    Mesh(Mesh),
    ChainEntries(Vec<Entry>),
    /// The chains read (round number) for these keys: compiled, or why not.
    Chains(
        u64,
        BTreeSet<ServiceKey>,
        BTreeMap<ServiceKey, Result<Compiled, String>>,
    ),
    Default(DefaultOutcome),
}

/// A message from a watch task to the event loop.
#[derive(Debug)]
pub struct Msg {
    pub key: WatchKey,
    pub result: Result<Payload, Error>,
}

/// Endpoints that answer without an index are asked again this often.
const POLL_INTERVAL: Duration = Duration::from_secs(10);

type Parsed = Result<(Payload, Vec<String>), Error>;

/// The request path (with fixed query) and parser of a watch.
pub fn path_of(key: &WatchKey, proxy_id: &str) -> String {
    match key {
        WatchKey::Registration => format!("/v1/agent/service/{}", escape(proxy_id)),
        WatchKey::Roots => "/v1/agent/connect/ca/roots".into(),
        WatchKey::Leaf(s) => format!("/v1/agent/connect/ca/leaf/{}", escape(s)),
        WatchKey::Intentions => "/v1/connect/intentions".into(),
        WatchKey::Catalog => "/v1/catalog/services".into(),
        WatchKey::Checks | WatchKey::ChecksNow => "/v1/health/state/any".into(),
        WatchKey::Fetch(s) => format!("/v1/catalog/service/{}", escape(s)),
        WatchKey::Connect(k) => with_dc(format!("/v1/health/connect/{}", escape(&k.name)), k),
        WatchKey::Instances(k) => with_dc(format!("/v1/catalog/service/{}", escape(&k.name)), k),
        WatchKey::ServiceDefaults => "/v1/config/service-defaults".into(),
        WatchKey::ProxyDefaults => "/v1/config/proxy-defaults".into(),
        WatchKey::Mesh => "/v1/config/mesh/mesh".into(),
        WatchKey::ChainEntries(k) => k.path(),
        WatchKey::Chains => "/v1/discovery-chain".into(),
        WatchKey::Target(k) => {
            let mut p = format!(
                "/v1/health/connect/{}?dc={}",
                escape(&k.service),
                escape(&k.datacenter)
            );
            if let Some(f) = &k.filter {
                p.push_str("&filter=");
                p.push_str(&escape(f));
            }
            p
        }
        WatchKey::Gateways(dc) => format!(
            "/v1/internal/ui/nodes?dc={}&filter={}",
            escape(dc),
            escape(api::GATEWAY_NODES_FILTER)
        ),
        WatchKey::DefaultProbe => "/v1/agent/connect/authorize".into(),
    }
}

fn with_dc(p: String, k: &ServiceKey) -> String {
    match &k.datacenter {
        Some(dc) => format!("{p}?dc={}", escape(dc)),
        None => p,
    }
}

/// Parses an answer for `key`; pure.
pub fn parse(key: &WatchKey, proxy_id: &str, r: Response) -> Parsed {
    let path = path_of(key, proxy_id);
    if let WatchKey::Mesh = key {
        return match api::parse_mesh(r.status, &r.body) {
            Ok(m) => Ok((Payload::Mesh(m), Vec::new())),
            Err(Error::PermissionDenied { .. }) => Ok((
                Payload::Mesh(Mesh::Absent),
                vec!["the token may not read the mesh config entry; treating it as absent".into()],
            )),
            Err(e) => Err(e),
        };
    }
    if let (WatchKey::Registration, 404) = (key, r.status) {
        return Err(Error::ProxyNotFound(proxy_id.to_string()));
    }
    let r = r.ok(&path)?;
    let index = r.index.unwrap_or(0);
    let b = &r.body[..];
    Ok(match key {
        WatchKey::Registration => {
            let (reg, w) = api::parse_registration(proxy_id, b)?;
            (Payload::Registration(Box::new(reg)), w)
        }
        WatchKey::Roots => (Payload::Roots(api::parse_roots(b)?), Vec::new()),
        WatchKey::Leaf(s) => (Payload::Leaf(api::parse_leaf(s, b)?), Vec::new()),
        WatchKey::Intentions => {
            let (i, w) = api::parse_intentions(b)?;
            (Payload::Intentions(i), w)
        }
        WatchKey::Catalog => (
            Payload::Catalog(CatalogView {
                index,
                services: api::parse_catalog_tags(b)?,
            }),
            Vec::new(),
        ),
        WatchKey::Checks | WatchKey::ChecksNow => (
            Payload::Checks(api::parse_health_state(index, b)?),
            Vec::new(),
        ),
        WatchKey::Connect(k) => {
            let (c, w) = api::parse_health_connect(&k.name, b)?;
            (Payload::Connect(c), w)
        }
        WatchKey::Target(k) => {
            let (c, w) = api::parse_health_connect(&k.service, b)?;
            (Payload::Connect(c), w)
        }
        WatchKey::Gateways(dc) => {
            let (c, w) = api::parse_gateway_nodes(dc, b)?;
            (Payload::Connect(c), w)
        }
        WatchKey::Instances(k) => (
            Payload::Instances(api::parse_catalog_service(&k.name, b)?),
            Vec::new(),
        ),
        WatchKey::ServiceDefaults => (
            Payload::ServiceDefaults(api::parse_service_defaults(b)?),
            Vec::new(),
        ),
        WatchKey::ProxyDefaults => (
            Payload::ProxyDefaults(api::parse_proxy_defaults(b)?),
            Vec::new(),
        ),
        WatchKey::ChainEntries(k) => (Payload::ChainEntries(entries::parse(*k, b)?), Vec::new()),
        WatchKey::Mesh | WatchKey::DefaultProbe | WatchKey::Fetch(_) | WatchKey::Chains => {
            unreachable!("handled elsewhere")
        }
    })
}

/// Runs one watch until the receiver is gone (or the task is aborted).
pub async fn run(
    client: Client,
    key: WatchKey,
    proxy_id: String,
    wait: Duration,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let hash_based = key == WatchKey::Registration;
    let base = path_of(&key, &proxy_id);
    let mut cursor = Cursor::Fresh;
    let mut backoff = Backoff::default();
    let mut pacer = Pacer::default();
    let mut last_warnings: Vec<String> = Vec::new();
    loop {
        let q = cursor.query(wait);
        let blocking = q.is_some();
        let url = match q {
            Some(q) if base.contains('?') => format!("{base}&{q}"),
            Some(q) => format!("{base}?{q}"),
            None => base.clone(),
        };
        let deadline = if blocking {
            wait + wait / 16 + Duration::from_secs(15)
        } else {
            Duration::from_secs(30)
        };
        let started = Instant::now();
        let answer = client.get(&url, deadline).await.and_then(|r| {
            let (index, hash) = (r.index, r.hash.clone());
            parse(&key, &proxy_id, r).map(|p| (p, index, hash))
        });
        match answer {
            Ok(((payload, warnings), index, hash)) => {
                let failures = backoff.reset();
                if failures > 0 {
                    tracing::debug!(watch = %key, failures, "Consul watch recovered");
                }
                if warnings != last_warnings {
                    for w in &warnings {
                        tracing::warn!(watch = %key, "{w}");
                    }
                    last_warnings = warnings;
                }
                let no_cursor = if hash_based {
                    hash.is_none()
                } else {
                    index.is_none()
                };
                let news = cursor.advance(hash_based, index, hash.as_deref());
                let mut pause = pacer.after(news, started.elapsed());
                if let Payload::Mesh(Mesh::Unsupported) = payload {
                    // Consul < 1.10: look again now and then, in case the agent is upgraded.
                    pause = pause.max(wait);
                } else if no_cursor {
                    pause = pause.max(POLL_INTERVAL);
                }
                if news
                    && tx
                        .send(Msg {
                            key: key.clone(),
                            result: Ok(payload),
                        })
                        .is_err()
                {
                    return;
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Err(e) => {
                cursor = Cursor::Fresh;
                let retry = backoff.failure();
                // Trouble reaching the agent is the same for every watch:
                // the source logs it once; other failures are per watch.
                if backoff.should_warn() && !e.is_unreachable() && !e.is_closed() {
                    tracing::warn!(watch = %key, failures = backoff.failures(), retry_in = ?retry, error = %e, kind = e.classify(), "Consul watch failed; keeping the last good state");
                } else {
                    tracing::debug!(watch = %key, failures = backoff.failures(), retry_in = ?retry, error = %e, "Consul watch failed");
                }
                if tx
                    .send(Msg {
                        key: key.clone(),
                        result: Err(e),
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// Request deadline of the feed's non-blocking reads.
const READ_DEADLINE: Duration = Duration::from_secs(30);

/// Reads the check list once (no index): the answer to
/// [`crate::feed::CatalogOutcome::need_checks`]. One message.
pub async fn checks_now(client: Client, tx: mpsc::UnboundedSender<Msg>) {
    let key = WatchKey::ChecksNow;
    let result = async {
        let r = client.get(&path_of(&key, ""), READ_DEADLINE).await?;
        parse(&key, "", r).map(|(p, _)| p)
    }
    .await;
    let _ = tx.send(Msg { key, result });
}

/// Reads one service for the feed: its catalog instances, then (unless
/// every instance is a `connect-proxy`) its Connect instances. One message.
pub async fn fetch(client: Client, name: String, tx: mpsc::UnboundedSender<Msg>) {
    let result = fetch_once(&client, &name).await.map(Payload::Fetched);
    let _ = tx.send(Msg {
        key: WatchKey::Fetch(name),
        result,
    });
}

async fn fetch_once(client: &Client, name: &str) -> Result<Fetched, Error> {
    let path = format!("/v1/catalog/service/{}", escape(name));
    let r = client.get(&path, READ_DEADLINE).await?.ok(&path)?;
    let instances = api::parse_catalog_service(name, &r.body)?;
    if !instances.is_empty() && instances.iter().all(|i| i.kind == "connect-proxy") {
        return Ok(Fetched::Proxy {
            ids: instances.iter().map(|i| i.id.clone()).collect(),
            destinations: instances
                .into_iter()
                .map(|i| i.destination)
                .filter(|d| !d.is_empty())
                .collect(),
        });
    }
    let path = format!("/v1/health/connect/{}", escape(name));
    let r = client.get(&path, READ_DEADLINE).await?.ok(&path)?;
    let (connect, warnings) = api::parse_health_connect(name, &r.body)?;
    for w in warnings {
        tracing::warn!(service = %name, "{w}");
    }
    Ok(Fetched::Service { instances, connect })
}

/// The path of one chain read: `/v1/discovery-chain/:service`, compiled in
/// the key's datacenter when it names one.
pub fn chain_path(k: &ServiceKey) -> String {
    let p = format!("/v1/discovery-chain/{}", escape(&k.name));
    match &k.datacenter {
        Some(dc) => format!("{p}?compile-dc={}", escape(dc)),
        None => p,
    }
}

/// Reads the discovery chains of `keys`, one after the other (one agent
/// connection whatever their number), and sends one message with each
/// compiled or the reason it is not (`round` tells a superseded read's
/// answer from the current one). Agent trouble and 5xx answers are
/// retried with back-off; a refusal or an unusable chain is reported for
/// that key.
pub async fn read_chains(
    client: Client,
    round: u64,
    keys: BTreeSet<ServiceKey>,
    tx: mpsc::UnboundedSender<Msg>,
) {
    let mut out = BTreeMap::new();
    for k in &keys {
        let path = chain_path(k);
        let mut backoff = Backoff::default();
        let r = loop {
            let r = async {
                let r = client.get(&path, READ_DEADLINE).await?.ok(&path)?;
                crate::chain::compile(&r.body)
            }
            .await;
            match r {
                Err(e)
                    if e.is_unreachable()
                        || e.is_closed()
                        || matches!(e, Error::Status { status, .. } if status >= 500) =>
                {
                    let d = backoff.failure();
                    if backoff.should_warn() {
                        tracing::warn!(chain = %k, error = %e, retry_in = ?d, "cannot read the discovery chain yet");
                    }
                    tokio::time::sleep(d).await;
                }
                r => break r.map_err(|e| e.to_string()),
            }
        };
        out.insert(k.clone(), r);
    }
    let _ = tx.send(Msg {
        key: WatchKey::Chains,
        result: Ok(Payload::Chains(round, keys, out)),
    });
}

/// Where the default-decision probe asks.
#[derive(Clone, Debug)]
pub struct ProbeTarget {
    /// Our service (the authorize `Target`).
    pub service: String,
    pub trust_domain: String,
    pub datacenter: String,
    pub namespace: String,
    pub partition: String,
}

/// The SPIFFE ID of a made-up source that no intention can name exactly.
pub fn probe_source_uri(t: &ProbeTarget, nonce: u64) -> String {
    let ap = if t.partition == "default" {
        String::new()
    } else {
        format!("/ap/{}", t.partition)
    };
    format!(
        "spiffe://{}{ap}/ns/{}/dc/{}/svc/veer-default-probe-{nonce:016x}",
        t.trust_domain, t.namespace, t.datacenter
    )
}

/// Finds the default intention decision (see the crate docs); retries with
/// back-off until the agent answers, then sends one message.
pub async fn probe_default(client: Client, t: ProbeTarget, tx: mpsc::UnboundedSender<Msg>) {
    let mut backoff = Backoff::default();
    let mut rng = crate::blocking::Rng::new();
    loop {
        match probe_once(&client, &t, rng.next_u64()).await {
            Ok(outcome) => {
                let _ = tx.send(Msg {
                    key: WatchKey::DefaultProbe,
                    result: Ok(Payload::Default(outcome)),
                });
                return;
            }
            Err(e) => {
                let retry = backoff.failure();
                if backoff.should_warn() && !e.is_unreachable() && !e.is_closed() {
                    tracing::warn!(watch = "default-decision", error = %e, retry_in = ?retry, "cannot learn the default intention decision yet");
                }
                if tx
                    .send(Msg {
                        key: WatchKey::DefaultProbe,
                        result: Err(e),
                    })
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(retry).await;
            }
        }
    }
}

async fn probe_once(client: &Client, t: &ProbeTarget, nonce: u64) -> Result<DefaultOutcome, Error> {
    let path = "/v1/agent/connect/authorize";
    let body = serde_json::json!({
        "Target": t.service,
        "ClientCertURI": probe_source_uri(t, nonce),
        "ClientCertSerial": "00",
    });
    let r = client
        .request(
            "POST",
            path,
            Some(body.to_string().into_bytes()),
            Duration::from_secs(30),
        )
        .await?
        .ok(path)?;
    let reason = match api::parse_authorize(&r.body)? {
        api::DefaultProbe::Default(action) => {
            return Ok(DefaultOutcome::Known {
                action,
                via: "agent/connect/authorize",
            })
        }
        api::DefaultProbe::Inconclusive(reason) => reason,
    };
    // A wildcard intention decided; ask the agent's configuration instead.
    let r = client
        .get("/v1/agent/self", Duration::from_secs(30))
        .await?;
    if r.status == 200 {
        if let Some(action) = api::default_from_agent_self(&r.body)? {
            return Ok(DefaultOutcome::Known {
                action,
                via: "agent/self",
            });
        }
    }
    Ok(DefaultOutcome::Unknown(format!(
        "an intention decided the probe ({reason}) and /v1/agent/self answered HTTP {}",
        r.status
    )))
}
