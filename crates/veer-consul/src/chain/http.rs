//! The L7 part of a discovery chain, sans IO: an http-like chain's router
//! and splitter nodes → routes and weighted clusters
//! ([`veer_core::l7::RouteSpec`]), one cluster per resolver node reached.
//!
//! Consul 1.8.7's xDS server is the reference (`agent/xds/routes.go`,
//! `makeUpstreamRouteForDiscoveryChain`): a router's routes in order (the
//! chain already ends them with Consul's catch-all `PathPrefix "/"`); a
//! chain that starts at a splitter or a resolver gets one catch-all route.
//! Matches: one path matcher (exact, prefix, regex; none = prefix `/`),
//! headers (exact, regex, prefix, suffix, present, in that precedence, with
//! `Invert`; a header condition with none of them is skipped as Consul
//! does), methods, query parameters (exact, regex, present). Actions:
//! `PrefixRewrite`, `RequestTimeout` only when > 0 (else Envoy's 15 s
//! default, [`veer_core::l7::DEFAULT_REQUEST_TIMEOUT`]), a retry policy
//! when any retry feature is set, with Envoy's default of one retry when
//! `NumRetries` is 0 (hashicorp/consul#8516). Split weights are Consul's
//! percentages ×100; veer rounds where Consul truncates (`33.33 × 100` is
//! 3332.99…: Consul sends 3332 and Envoy then refuses a total that is not
//! 10,000).
//!
//! What Consul stores without checking (l7-chain.md §1) is refused here,
//! naming the node, route and field: regexes that do not compile (path,
//! header, query), methods that are not HTTP tokens, header names that are
//! not tokens, `NumRetries` past `i32::MAX` (Consul 1.8 stores `-1` as
//! 4294967295), a negative or unreadable `RequestTimeout`, status codes
//! outside 100..=599, splits whose weights are all 0.
use super::{RawChain, Target, MAX_HOPS};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use veer_core::l7::{
    HeaderMatch, HeaderMatchKind, PathMatch, QueryMatch, QueryMatchKind, RequestMatch, RetryPolicy,
    RouteAction, RouteSpec, WeightedCluster,
};

/// The HTTP routing of an http-like chain, before endpoints are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHttp {
    /// One per resolver node reached, in the order routes first name them.
    pub clusters: Vec<ChainCluster>,
    /// In order; the last is Consul's catch-all.
    pub routes: Vec<RouteSpec>,
}

impl ChainHttp {
    /// Every target of every cluster (with repeats).
    pub fn targets(&self) -> impl Iterator<Item = &Target> {
        self.clusters.iter().flat_map(|c| c.targets.iter())
    }
}

/// One resolver node: a target and its failover targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainCluster {
    /// Consul's cluster name: the primary target's `Name`
    /// (`v1.api.default.dc1.internal.<trust-domain>`; stays internal when
    /// the service has an `ExternalSNI`).
    pub name: String,
    /// The primary target, then its failover targets in order.
    pub targets: Vec<Target>,
    /// The resolver's `ConnectTimeout`.
    pub connect_timeout: Duration,
}

#[derive(Deserialize, Default)]
pub(super) struct RawDefinition {
    #[serde(rename = "Match", default)]
    matches: Option<RawMatch>,
    #[serde(rename = "Destination", default)]
    destination: Option<RawDestination>,
}

#[derive(Deserialize, Default)]
struct RawMatch {
    #[serde(rename = "HTTP", default)]
    http: Option<RawHttpMatch>,
}

#[derive(Deserialize, Default)]
struct RawHttpMatch {
    #[serde(rename = "PathExact", default)]
    path_exact: Option<String>,
    #[serde(rename = "PathPrefix", default)]
    path_prefix: Option<String>,
    #[serde(rename = "PathRegex", default)]
    path_regex: Option<String>,
    #[serde(rename = "Header", default)]
    header: Option<Vec<RawHeader>>,
    #[serde(rename = "QueryParam", default)]
    query: Option<Vec<RawQuery>>,
    #[serde(rename = "Methods", default)]
    methods: Option<Vec<String>>,
}

/// A header condition (a router's `Match.HTTP.Header[]`, an intention
/// permission's `HTTP.Header[]`: the same fields).
#[derive(Deserialize, Default)]
pub(crate) struct RawHeader {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Present", default)]
    present: bool,
    #[serde(rename = "Exact", default)]
    exact: Option<String>,
    #[serde(rename = "Prefix", default)]
    prefix: Option<String>,
    #[serde(rename = "Suffix", default)]
    suffix: Option<String>,
    #[serde(rename = "Regex", default)]
    regex: Option<String>,
    #[serde(rename = "Invert", default)]
    invert: bool,
}

#[derive(Deserialize, Default)]
struct RawQuery {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Present", default)]
    present: bool,
    #[serde(rename = "Exact", default)]
    exact: Option<String>,
    #[serde(rename = "Regex", default)]
    regex: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawDestination {
    #[serde(rename = "PrefixRewrite", default)]
    prefix_rewrite: Option<String>,
    /// A Go duration string (`"2s"`) or nanoseconds.
    #[serde(rename = "RequestTimeout", default)]
    request_timeout: Option<serde_json::Value>,
    /// Wide on purpose: Consul 1.8 stores `-1` as 4294967295.
    #[serde(rename = "NumRetries", default)]
    num_retries: Option<i64>,
    #[serde(rename = "RetryOnConnectFailure", default)]
    retry_on_connect_failure: bool,
    #[serde(rename = "RetryOnStatusCodes", default)]
    retry_on_status_codes: Option<Vec<i64>>,
}

fn set(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// An RFC 9110 token (method names, header names).
fn token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Checks that `re` compiles (RE2 syntax; the data path anchors it to the
/// whole string as Envoy's `safe_regex` does).
fn regex(re: &str, field: &str) -> Result<String, String> {
    regex::Regex::new(re)
        .map(|_| re.to_string())
        .map_err(|e| format!("{field}: regex {re:?} does not compile: {e}"))
}

/// One path condition from Consul's three fields (the first set wins,
/// Consul's order; `PathPrefix "/"` is any path). `field` = the prefix of
/// the field names in errors (`Match.HTTP.`).
pub(crate) fn path_match(
    exact: &Option<String>,
    prefix: &Option<String>,
    regex_: &Option<String>,
    field: &str,
) -> Result<PathMatch, String> {
    Ok(if let Some(p) = set(exact) {
        if !p.starts_with('/') {
            return Err(format!("{field}PathExact {p:?} does not start with /"));
        }
        PathMatch::Exact(p.to_string())
    } else if let Some(p) = set(prefix) {
        if !p.starts_with('/') {
            return Err(format!("{field}PathPrefix {p:?} does not start with /"));
        }
        if p == "/" {
            PathMatch::Any
        } else {
            PathMatch::Prefix(p.to_string())
        }
    } else if let Some(p) = set(regex_) {
        PathMatch::Regex(regex(p, &format!("{field}PathRegex"))?)
    } else {
        PathMatch::Any
    })
}

/// One header condition; `None` when it sets no kind (Consul's routes
/// skip it). `field` names it in errors (`Match.HTTP.Header[0]`).
pub(crate) fn header_match(hd: &RawHeader, field: &str) -> Result<Option<HeaderMatch>, String> {
    let name = hd.name.trim();
    let bare = name.strip_prefix(':').unwrap_or(name);
    if !token(bare) {
        return Err(format!("{field}.Name {:?} is not a header name", hd.name));
    }
    // Consul's precedence (routes.go, rbac.go): exact, regex, prefix,
    // suffix, present.
    let kind = if let Some(v) = set(&hd.exact) {
        HeaderMatchKind::Exact(v.to_string())
    } else if let Some(v) = set(&hd.regex) {
        HeaderMatchKind::Regex(regex(v, &format!("{field}.Regex"))?)
    } else if let Some(v) = set(&hd.prefix) {
        HeaderMatchKind::Prefix(v.to_string())
    } else if let Some(v) = set(&hd.suffix) {
        HeaderMatchKind::Suffix(v.to_string())
    } else if hd.present {
        HeaderMatchKind::Present
    } else {
        return Ok(None);
    };
    Ok(Some(HeaderMatch {
        name: name.to_ascii_lowercase(),
        kind,
        invert: hd.invert,
    }))
}

/// HTTP methods, verbatim: they are case-sensitive and Consul's Envoy
/// matches them so (`:method` regex `GET|HEAD`). `field` = `…Methods`.
pub(crate) fn methods(ms: &[String], field: &str) -> Result<Vec<String>, String> {
    for (i, m) in ms.iter().enumerate() {
        if !token(m) {
            return Err(format!("{field}[{i}] {m:?} is not an HTTP method"));
        }
    }
    Ok(ms.to_vec())
}

fn request_match(m: Option<&RawMatch>) -> Result<RequestMatch, String> {
    let mut out = RequestMatch::default();
    let Some(h) = m.and_then(|m| m.http.as_ref()) else {
        return Ok(out);
    };
    out.path = path_match(&h.path_exact, &h.path_prefix, &h.path_regex, "Match.HTTP.")?;
    for (i, hd) in h.header.iter().flatten().enumerate() {
        // A condition with no kind is skipped, as Consul does.
        if let Some(m) = header_match(hd, &format!("Match.HTTP.Header[{i}]"))? {
            out.headers.push(m);
        }
    }
    for (i, q) in h.query.iter().flatten().enumerate() {
        let field = format!("Match.HTTP.QueryParam[{i}]");
        if q.name.is_empty() {
            return Err(format!("{field}.Name is empty"));
        }
        let kind = if let Some(v) = set(&q.exact) {
            QueryMatchKind::Exact(v.to_string())
        } else if let Some(v) = set(&q.regex) {
            QueryMatchKind::Regex(regex(v, &format!("{field}.Regex"))?)
        } else if q.present {
            QueryMatchKind::Present
        } else {
            continue;
        };
        out.query.push(QueryMatch {
            name: q.name.clone(),
            kind,
        });
    }
    out.methods = methods(
        h.methods.as_deref().unwrap_or_default(),
        "Match.HTTP.Methods",
    )?;
    Ok(out)
}

/// A `RequestTimeout` as the chain prints it: `None` = unset or 0.
fn request_timeout(v: &serde_json::Value) -> Result<Option<Duration>, String> {
    use serde_json::Value;
    let d = match v {
        Value::Null => return Ok(None),
        Value::String(s) if s.is_empty() => return Ok(None),
        Value::String(s) if s.trim_start().starts_with('-') => {
            return Err(format!(
                "Destination.RequestTimeout {s:?} is negative (Consul 1.8 stores it unchecked)"
            ))
        }
        Value::String(s) => {
            super::go_duration(s).map_err(|e| format!("Destination.RequestTimeout: {e}"))?
        }
        Value::Number(n) => match n.as_i64() {
            Some(ns) if ns < 0 => {
                return Err(format!("Destination.RequestTimeout {ns}ns is negative"))
            }
            Some(ns) => Duration::from_nanos(ns as u64),
            None => return Err(format!("Destination.RequestTimeout {n} is not a duration")),
        },
        v => return Err(format!("Destination.RequestTimeout {v} is not a duration")),
    };
    Ok((!d.is_zero()).then_some(d))
}

fn apply_destination(a: &mut RouteAction, d: &RawDestination) -> Result<(), String> {
    a.prefix_rewrite = set(&d.prefix_rewrite).map(str::to_string);
    if let Some(t) = &d.request_timeout {
        a.timeout = request_timeout(t)?;
    }
    let n = d.num_retries.unwrap_or(0);
    if n < 0 || n > i64::from(i32::MAX) {
        return Err(format!(
            "Destination.NumRetries {n} is out of range (a negative number wrapped to uint32? \
             Consul 1.8 stores -1 as 4294967295)"
        ));
    }
    let mut codes = Vec::new();
    for (i, c) in d.retry_on_status_codes.iter().flatten().enumerate() {
        match u16::try_from(*c) {
            Ok(c @ 100..=599) => codes.push(c),
            _ => {
                return Err(format!(
                    "Destination.RetryOnStatusCodes[{i}] {c} is not an HTTP status code"
                ))
            }
        }
    }
    if n > 0 || d.retry_on_connect_failure || !codes.is_empty() {
        a.retry = Some(RetryPolicy {
            // Consul leaves num_retries unset at 0: Envoy's default is 1.
            num_retries: if n > 0 { n as u32 } else { 1 },
            on_connect_failure: d.retry_on_connect_failure,
            on_reset: false,
            on_status_codes: codes,
        });
    }
    Ok(())
}

/// Builds clusters as routes name resolver nodes.
struct Clusters<'a> {
    chain: &'a RawChain,
    by_node: BTreeMap<String, usize>,
    out: Vec<ChainCluster>,
}

impl Clusters<'_> {
    fn resolver(&mut self, node: &str) -> Result<usize, String> {
        if let Some(i) = self.by_node.get(node) {
            return Ok(*i);
        }
        let n = self
            .chain
            .nodes
            .get(node)
            .ok_or_else(|| format!("node {node:?} is named but not in Nodes"))?;
        if n.kind != "resolver" {
            return Err(format!(
                "{node}: a {} where a resolver is expected (Consul allows router → splitter → resolver only)",
                n.kind
            ));
        }
        let r = n
            .resolver
            .as_ref()
            .ok_or_else(|| format!("{node}: a resolver node without Resolver"))?;
        let connect_timeout = super::connect_timeout(r).map_err(|e| format!("{node}: {e}"))?;
        let targets = super::resolver_targets(self.chain, r)?;
        let first = &self.chain.targets[&r.target];
        let name = if first.name.is_empty() {
            first.sni.clone()
        } else {
            first.name.clone()
        };
        let i = self.out.len();
        self.out.push(ChainCluster {
            name,
            targets,
            connect_timeout,
        });
        self.by_node.insert(node.to_string(), i);
        Ok(i)
    }

    /// The clusters a splitter or resolver node sends requests to.
    fn action(&mut self, node: &str) -> Result<RouteAction, String> {
        let n = self
            .chain
            .nodes
            .get(node)
            .ok_or_else(|| format!("node {node:?} is named but not in Nodes"))?;
        match n.kind.as_str() {
            "resolver" => Ok(RouteAction::to_cluster(self.resolver(node)?)),
            "splitter" => {
                let splits = n.splits.as_deref().unwrap_or_default();
                if splits.is_empty() {
                    return Err(format!("{node}: a splitter with no splits"));
                }
                let mut clusters = Vec::with_capacity(splits.len());
                for (i, s) in splits.iter().enumerate() {
                    if !(0.0..=100.0).contains(&s.weight) {
                        return Err(format!(
                            "{node}: Splits[{i}].Weight {} is not a percentage",
                            s.weight
                        ));
                    }
                    let cluster = self.resolver(&s.next).map_err(|e| format!("{node}: {e}"))?;
                    clusters.push(WeightedCluster {
                        cluster,
                        weight: (s.weight * 100.0).round() as u32,
                    });
                }
                if clusters.iter().all(|c| c.weight == 0) {
                    return Err(format!("{node}: every split has weight 0"));
                }
                let mut a = RouteAction::to_cluster(0);
                a.clusters = clusters;
                Ok(a)
            }
            k => Err(format!(
                "{node}: a {k} where a splitter or resolver is expected"
            )),
        }
    }
}

/// Compiles the routes of `chain` (whose protocol is http-like).
pub(super) fn compile(chain: &RawChain) -> Result<ChainHttp, String> {
    let mut cl = Clusters {
        chain,
        by_node: BTreeMap::new(),
        out: Vec::new(),
    };
    let start = &chain.start_node;
    let node = chain
        .nodes
        .get(start)
        .ok_or_else(|| format!("node {start:?} is named but not in Nodes"))?;
    let mut routes = Vec::new();
    if node.kind == "router" {
        let raw = node.routes.as_deref().unwrap_or_default();
        if raw.is_empty() {
            return Err(format!("{start}: a router with no routes"));
        }
        if raw.len() > 64 * MAX_HOPS {
            return Err(format!("{start}: {} routes is too many", raw.len()));
        }
        for (i, r) in raw.iter().enumerate() {
            let at = |e: String| format!("{start} Routes[{i}]: {e}");
            let def = r.definition.as_ref();
            let matches = request_match(def.and_then(|d| d.matches.as_ref())).map_err(at)?;
            let mut action = cl.action(&r.next).map_err(at)?;
            if let Some(d) = def.and_then(|d| d.destination.as_ref()) {
                apply_destination(&mut action, d).map_err(at)?;
                if action.prefix_rewrite.is_some() && matches!(matches.path, PathMatch::Regex(_)) {
                    return Err(at(
                        "Destination.PrefixRewrite needs Match.HTTP.PathExact or PathPrefix".into(),
                    ));
                }
            }
            routes.push(RouteSpec {
                name: format!("{start}/{i}"),
                matches,
                action,
            });
        }
    } else {
        routes.push(RouteSpec {
            name: start.clone(),
            matches: RequestMatch::default(),
            action: cl.action(start)?,
        });
    }
    Ok(ChainHttp {
        clusters: cl.out,
        routes,
    })
}

#[cfg(test)]
mod tests;
