//! Consul's discovery chain, sans IO: `/v1/discovery-chain/:service`
//! (Consul 1.8.7's shape) → the targets an upstream's connections go to,
//! in failover order.
//!
//! A chain starts at a router, a splitter or a resolver node. For the
//! L4 path (and the upstream's primary target) veer follows the router's
//! last route (Consul always appends the catch-all `/` route to the
//! service) and the splitter's heaviest split down to one resolver. An
//! http-like chain's routers and splitters are compiled into HTTP routes
//! and weighted clusters as well ([`http`], [`Compiled::http`]). The
//! resolver gives the primary target (after any
//! redirect, with its default subset), its failover targets in order and
//! the connect timeout. Each target is a (service, subset, namespace,
//! datacenter) with its own SNI, its subset's health filter and its mesh
//! gateway mode.
//!
//! Consul does not validate everything it stores (l7-chain.md §1): an
//! unknown mesh gateway mode, a bad connect timeout or a node that does
//! not exist is refused here with [`Error::Decode`] naming the field.
use crate::Error;
pub use http::{ChainCluster, ChainHttp};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use veer_core::route::Protocol;

pub mod http;

/// How a target in another datacenter is reached (`MeshGateway.Mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GatewayMode {
    /// Unset (`{}`): Consul's default, dial the remote instances directly.
    #[default]
    Default,
    /// `none`: dial the remote instances directly.
    None,
    /// `local`: dial a mesh gateway of the local datacenter.
    Local,
    /// `remote`: dial a mesh gateway of the target's datacenter.
    Remote,
}

impl GatewayMode {
    pub fn parse(s: &str) -> Option<GatewayMode> {
        match s {
            "" => Some(GatewayMode::Default),
            "none" => Some(GatewayMode::None),
            "local" => Some(GatewayMode::Local),
            "remote" => Some(GatewayMode::Remote),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            GatewayMode::Default => "",
            GatewayMode::None => "none",
            GatewayMode::Local => "local",
            GatewayMode::Remote => "remote",
        }
    }

    /// Whether connections dial a gateway rather than the instances.
    pub fn via_gateway(&self) -> bool {
        matches!(self, GatewayMode::Local | GatewayMode::Remote)
    }
}

/// One compiled target.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// `[<subset>.]<service>.<namespace>.<datacenter>`.
    pub id: String,
    pub service: String,
    /// Empty = no subset.
    pub subset: String,
    pub namespace: String,
    pub datacenter: String,
    /// The SNI its sidecars (or a gateway) expect:
    /// `[<subset>.]<svc>.<ns>.<dc>.internal.<trust-domain>`, or the
    /// service's `ExternalSNI`.
    pub sni: String,
    /// The subset's bexpr filter on `/v1/health/connect` (`None` = all).
    pub filter: Option<String>,
    /// Only instances with every check passing are healthy (else warning
    /// counts as healthy, as in Consul).
    pub only_passing: bool,
    pub mesh_gateway: GatewayMode,
}

/// What veer applies of one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// The chain's service (the upstream's name).
    pub service: String,
    /// The datacenter it was compiled in.
    pub datacenter: String,
    pub protocol: String,
    /// The primary target, then its failover targets in order.
    pub targets: Vec<Target>,
    /// The resolver's `ConnectTimeout` (Consul's default 5 s).
    pub connect_timeout: Duration,
    /// No resolver entry: the chain is Consul's default
    /// (`<svc>.default.<dc>`, 5 s).
    pub default: bool,
    /// Parts of the chain veer does not apply, one line each: routers and
    /// splitters of a chain whose protocol is not http-like (Consul refuses
    /// to store them; an `OverrideProtocol` could leave them).
    pub unapplied: Vec<String>,
    /// The HTTP routing when the chain's protocol is http, http2 or grpc
    /// ([`http`]); `None` for tcp (and unknown) protocols.
    pub http: Option<ChainHttp>,
}

impl Compiled {
    /// Every target the chain can send to: [`Compiled::targets`] and those
    /// of every HTTP cluster (with repeats).
    pub fn all_targets(&self) -> impl Iterator<Item = &Target> {
        self.targets
            .iter()
            .chain(self.http.iter().flat_map(|h| h.targets()))
    }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "Chain")]
    chain: RawChain,
}

#[derive(Deserialize)]
struct RawChain {
    #[serde(rename = "ServiceName")]
    service_name: String,
    #[serde(rename = "Datacenter", default)]
    datacenter: String,
    #[serde(rename = "Protocol", default)]
    protocol: String,
    #[serde(rename = "StartNode")]
    start_node: String,
    #[serde(rename = "Nodes", default)]
    nodes: BTreeMap<String, RawNode>,
    #[serde(rename = "Targets", default)]
    targets: BTreeMap<String, RawTarget>,
}

#[derive(Deserialize)]
struct RawNode {
    #[serde(rename = "Type")]
    kind: String,
    #[serde(rename = "Routes", default)]
    routes: Option<Vec<RawRoute>>,
    #[serde(rename = "Splits", default)]
    splits: Option<Vec<RawSplit>>,
    #[serde(rename = "Resolver", default)]
    resolver: Option<RawResolver>,
}

#[derive(Deserialize)]
struct RawRoute {
    #[serde(rename = "Definition", default)]
    definition: Option<http::RawDefinition>,
    #[serde(rename = "NextNode")]
    next: String,
}

#[derive(Deserialize)]
struct RawSplit {
    #[serde(rename = "Weight", default)]
    weight: f64,
    #[serde(rename = "NextNode")]
    next: String,
}

#[derive(Deserialize)]
struct RawResolver {
    #[serde(rename = "ConnectTimeout", default)]
    connect_timeout: String,
    #[serde(rename = "Default", default)]
    default: bool,
    #[serde(rename = "Target")]
    target: String,
    #[serde(rename = "Failover", default)]
    failover: Option<RawFailover>,
}

#[derive(Deserialize)]
struct RawFailover {
    #[serde(rename = "Targets", default)]
    targets: Vec<String>,
}

#[derive(Deserialize, Default)]
struct RawGateway {
    #[serde(rename = "Mode", default)]
    mode: String,
}

#[derive(Deserialize, Default)]
struct RawSubset {
    #[serde(rename = "Filter", default)]
    filter: String,
    #[serde(rename = "OnlyPassing", default)]
    only_passing: bool,
}

#[derive(Deserialize)]
struct RawTarget {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Service")]
    service: String,
    #[serde(rename = "ServiceSubset", default)]
    subset: String,
    #[serde(rename = "Namespace", default)]
    namespace: String,
    #[serde(rename = "Datacenter")]
    datacenter: String,
    #[serde(rename = "MeshGateway", default)]
    mesh_gateway: Option<RawGateway>,
    #[serde(rename = "Subset", default)]
    subset_def: Option<RawSubset>,
    #[serde(rename = "SNI")]
    sni: String,
    /// Consul's cluster name (differs from `SNI` with an `ExternalSNI`).
    #[serde(rename = "Name", default)]
    name: String,
}

/// A Go `time.Duration` string as Consul prints it (`5s`, `1m0s`,
/// `1.5s`, `250ms`).
pub fn go_duration(s: &str) -> Result<Duration, String> {
    if let Ok(d) = veer_core::duration::parse(s) {
        return Ok(d);
    }
    // Fractions: `1.5s`, `0.25ms`, `1m1.5s`.
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let v: f64 = rest[..n]
            .parse()
            .map_err(|_| format!("bad duration {s:?}"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("bad duration {s:?}")),
        };
        total += v * secs;
        rest = &rest[u..];
    }
    if !(0.0..=veer_core::duration::MAX.as_secs_f64()).contains(&total) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// How many nodes a chain may pass through before it is taken as a loop.
const MAX_HOPS: usize = 16;

/// Parses and compiles one `/v1/discovery-chain/:service` answer.
pub fn compile(body: &[u8]) -> Result<Compiled, Error> {
    let env: Envelope = serde_json::from_slice(body)
        .map_err(|e| Error::decode("/v1/discovery-chain", format!("unexpected JSON: {e}")))?;
    let c = env.chain;
    let what = format!("discovery chain {}", c.service_name);
    let bad = |msg: String| Error::decode(what.clone(), msg);
    let mut unapplied = Vec::new();
    let mut at = c.start_node.clone();
    let resolver = 'walk: {
        for _ in 0..MAX_HOPS {
            let node = c
                .nodes
                .get(&at)
                .ok_or_else(|| bad(format!("node {at:?} is named but not in Nodes")))?;
            match node.kind.as_str() {
                "router" => {
                    let routes = node.routes.as_deref().unwrap_or_default();
                    let last = routes
                        .last()
                        .ok_or_else(|| bad(format!("{at}: a router with no routes")))?;
                    unapplied.push(format!(
                        "{at}: {} routes (L7 routing is not applied at L4; every connection takes the catch-all route)",
                        routes.len()
                    ));
                    at = last.next.clone();
                }
                "splitter" => {
                    let splits = node.splits.as_deref().unwrap_or_default();
                    let mut best: Option<&RawSplit> = None;
                    for s in splits {
                        if best.is_none_or(|b| s.weight > b.weight) {
                            best = Some(s);
                        }
                    }
                    let best =
                        best.ok_or_else(|| bad(format!("{at}: a splitter with no splits")))?;
                    unapplied.push(format!(
                        "{at}: {} splits (L7 splitting is not applied at L4; every connection takes the heaviest split, {}%)",
                        splits.len(),
                        best.weight
                    ));
                    at = best.next.clone();
                }
                "resolver" => {
                    break 'walk node
                        .resolver
                        .as_ref()
                        .ok_or_else(|| bad(format!("{at}: a resolver node without Resolver")))?;
                }
                k => return Err(bad(format!("{at}: unknown node type {k:?}"))),
            }
        }
        return Err(bad(format!(
            "more than {MAX_HOPS} nodes from {:?}",
            c.start_node
        )));
    };
    let connect_timeout = connect_timeout(resolver).map_err(|e| bad(format!("{at}: {e}")))?;
    let targets = resolver_targets(&c, resolver).map_err(bad)?;
    let protocol = veer_core::route::Protocol::parse(&c.protocol);
    let http = match protocol {
        Some(Protocol::Http | Protocol::Http2 | Protocol::Grpc) => {
            // Routers and splitters apply: they are not "unapplied".
            unapplied.clear();
            Some(http::compile(&c).map_err(bad)?)
        }
        _ => None,
    };
    Ok(Compiled {
        service: c.service_name,
        datacenter: c.datacenter,
        protocol: c.protocol,
        targets,
        connect_timeout,
        default: resolver.default,
        unapplied,
        http,
    })
}

/// A resolver's `ConnectTimeout` (Consul's default 5 s when empty).
fn connect_timeout(r: &RawResolver) -> Result<Duration, String> {
    match r.connect_timeout.as_str() {
        "" => Ok(Duration::from_secs(5)),
        s => go_duration(s).map_err(|e| format!("ConnectTimeout: {e}")),
    }
}

/// A resolver's target, then its failover targets in order.
fn resolver_targets(c: &RawChain, resolver: &RawResolver) -> Result<Vec<Target>, String> {
    let ids = std::iter::once(&resolver.target)
        .chain(resolver.failover.iter().flat_map(|f| f.targets.iter()));
    let mut targets = Vec::new();
    for id in ids {
        let t = c
            .targets
            .get(id)
            .ok_or_else(|| format!("target {id:?} is named but not in Targets"))?;
        let gw = t
            .mesh_gateway
            .as_ref()
            .map(|g| g.mode.as_str())
            .unwrap_or("");
        let mesh_gateway = GatewayMode::parse(gw).ok_or_else(|| {
            format!("target {id}: MeshGateway.Mode {gw:?} is not none, local or remote")
        })?;
        let sub = t.subset_def.as_ref();
        if t.sni.is_empty() {
            return Err(format!("target {id}: no SNI"));
        }
        targets.push(Target {
            id: t.id.clone(),
            service: t.service.clone(),
            subset: t.subset.clone(),
            namespace: if t.namespace.is_empty() {
                "default".into()
            } else {
                t.namespace.clone()
            },
            datacenter: t.datacenter.clone(),
            sni: t.sni.clone(),
            filter: sub
                .map(|s| s.filter.trim().to_string())
                .filter(|f| !f.is_empty()),
            only_passing: sub.is_some_and(|s| s.only_passing),
            mesh_gateway,
        });
    }
    Ok(targets)
}

#[cfg(test)]
mod tests;
