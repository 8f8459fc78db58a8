//! The outbound L7 routing decision: [`HttpRoutes`] compiled once per
//! snapshot into an [`HttpTable`] (regexes built, references checked,
//! header names lower-cased), and the pure per-request functions the HTTP
//! engine calls: [`HttpTable::route`] (first matching route),
//! [`CompiledRoute::pick`] (weighted cluster) and
//! [`CompiledRoute::rewrite`] (prefix rewrite).
//!
//! Matching follows Envoy's `RouteMatch` as Consul's routers emit it: the
//! path without its query string (exact, prefix, or a RE2 regex that must
//! match all of it, case-sensitive), headers (a header sent several times
//! is matched against its values joined with `,`), query parameters (raw,
//! not percent-decoded, the first occurrence), and methods.
use crate::l7::{
    HeaderMatchKind, HttpRoutes, PathMatch, QueryMatchKind, RequestMatch, RouteAction, RouteSpec,
};
use crate::route::{Protocol, Upstream};
use crate::snapshot::TargetSpec;
use regex::Regex;
use std::borrow::Cow;

/// Why [`HttpRoutes`] do not compile; the snapshot refuses them with the
/// upstream named (`SnapshotError::Upstream`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum L7Error {
    #[error("route {route:?}: {what} regex {re:?} does not compile: {err}")]
    Regex {
        route: String,
        what: String,
        re: String,
        err: String,
    },
    #[error("route {route:?} sends requests to cluster #{index}, but there are {count} clusters")]
    NoSuchCluster {
        route: String,
        index: usize,
        count: usize,
    },
    #[error("route {0:?} has no cluster with a weight above 0")]
    NoWeight(String),
    #[error("route {0:?}: prefix_rewrite needs a path or prefix match, not a regex (as Envoy)")]
    RewriteWithRegex(String),
    #[error("route {route:?}: {msg}")]
    Route { route: String, msg: String },
    #[error("cluster {0:?} has no target")]
    NoTarget(String),
    #[error("cluster {0:?} is named twice")]
    DuplicateCluster(String),
    #[error("cluster {0:?} has protocol tcp; HTTP routes need http, http2 or grpc")]
    TcpCluster(String),
    #[error("cluster {cluster:?}: {msg}")]
    Target { cluster: String, msg: String },
}

impl L7Error {
    /// Metric label.
    pub fn classify(&self) -> &'static str {
        match self {
            L7Error::Regex { .. } => "regex",
            L7Error::NoSuchCluster { .. } => "no_such_cluster",
            L7Error::NoWeight(_) => "no_weight",
            L7Error::RewriteWithRegex(_) => "rewrite_with_regex",
            L7Error::Route { .. } => "route",
            L7Error::NoTarget(_) => "no_target",
            L7Error::DuplicateCluster(_) => "duplicate_cluster",
            L7Error::TcpCluster(_) => "tcp_cluster",
            L7Error::Target { .. } => "target",
        }
    }
}

/// What the engine needs to know of one request's head. Implemented by
/// the HTTP engine for its request type and by tests for plain data.
pub trait RequestHead {
    /// Upper-case method (`GET`).
    fn method(&self) -> &str;
    /// The path without the query string (`/a/b`).
    fn path(&self) -> &str;
    /// The query string without `?`, if any.
    fn query(&self) -> Option<&str>;
    /// The values of header `name` (lower-case) joined with `,`; `None`
    /// when absent. `:authority`, `:method`, `:path` and `:scheme` are the
    /// pseudo-headers of HTTP/2 (and their HTTP/1.1 equivalents).
    fn header(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// A request head as plain data (tests, and callers without a request).
#[derive(Clone, Debug, Default)]
pub struct PlainRequest {
    pub method: String,
    /// Path and query, as on the request line (`/a?b=c`).
    pub uri: String,
    /// Lower-case names; a name may repeat.
    pub headers: Vec<(String, String)>,
}

impl PlainRequest {
    pub fn new(method: &str, uri: &str) -> PlainRequest {
        PlainRequest {
            method: method.to_string(),
            uri: uri.to_string(),
            headers: Vec::new(),
        }
    }
    pub fn header(mut self, name: &str, value: &str) -> PlainRequest {
        self.headers
            .push((name.to_ascii_lowercase(), value.to_string()));
        self
    }
}

impl RequestHead for PlainRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        self.uri.split_once('?').map_or(&self.uri, |(p, _)| p)
    }
    fn query(&self) -> Option<&str> {
        self.uri.split_once('?').map(|(_, q)| q)
    }
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        if name == ":method" {
            return Some(Cow::Borrowed(&self.method));
        }
        if name == ":path" {
            return Some(Cow::Borrowed(&self.uri));
        }
        let mut it = self.headers.iter().filter(|(n, _)| n == name);
        let first = it.next()?;
        let mut v = Cow::Borrowed(first.1.as_str());
        for (_, more) in it {
            let s = v.to_mut();
            s.push(',');
            s.push_str(more);
        }
        Some(v)
    }
}

/// The compiled L7 routing of one upstream.
#[derive(Debug)]
pub struct HttpTable {
    pub clusters: Box<[HttpCluster]>,
    pub routes: Box<[CompiledRoute]>,
}

/// One destination of routes: its name (metrics, logs, the 503 reason),
/// the protocol its endpoints speak, and its targets as a routing-table
/// [`Upstream`] (the primary target; `failover` the others), with
/// endpoints, TLS configuration and endpoint back-off.
#[derive(Debug)]
pub struct HttpCluster {
    pub name: String,
    pub protocol: Protocol,
    pub target: Upstream,
}

impl HttpCluster {
    /// HTTP/2 to its endpoints (`http2`, `grpc`); else HTTP/1.1.
    pub fn is_h2(&self) -> bool {
        matches!(self.protocol, Protocol::Http2 | Protocol::Grpc)
    }
}

/// One route, compiled.
#[derive(Debug)]
pub struct CompiledRoute {
    pub name: String,
    path: CPath,
    headers: Box<[CHeader]>,
    query: Box<[CQuery]>,
    methods: Box<[String]>,
    pub action: RouteAction,
    total_weight: u64,
}

#[derive(Debug)]
enum CPath {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct CHeader {
    name: String,
    kind: CHeaderKind,
    invert: bool,
}

#[derive(Debug)]
enum CHeaderKind {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(Regex),
}

#[derive(Debug)]
struct CQuery {
    name: String,
    kind: CQueryKind,
}

#[derive(Debug)]
enum CQueryKind {
    Present,
    Exact(String),
    Regex(Regex),
}

/// A RE2-syntax regex that must match the whole input (Envoy `safe_regex`).
fn whole(route: &str, what: &str, re: &str) -> Result<Regex, L7Error> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| L7Error::Regex {
        route: route.to_string(),
        what: what.to_string(),
        re: re.to_string(),
        err: e.to_string(),
    })
}

impl HttpTable {
    /// Compiles `spec`; `target` turns one cluster target into a
    /// routing-table [`Upstream`] (the snapshot's TLS and endpoint setup),
    /// its error the message for [`L7Error::Target`].
    pub fn compile(
        spec: HttpRoutes,
        mut target: impl FnMut(TargetSpec) -> Result<Upstream, String>,
    ) -> Result<HttpTable, L7Error> {
        let mut clusters = Vec::with_capacity(spec.clusters.len());
        for c in spec.clusters {
            if clusters.iter().any(|k: &HttpCluster| k.name == c.name) {
                return Err(L7Error::DuplicateCluster(c.name));
            }
            if c.protocol == Protocol::Tcp {
                return Err(L7Error::TcpCluster(c.name));
            }
            let mut targets = c.targets.into_iter();
            let Some(first) = targets.next() else {
                return Err(L7Error::NoTarget(c.name));
            };
            let bad = |msg| L7Error::Target {
                cluster: c.name.clone(),
                msg,
            };
            let mut up = target(first).map_err(bad)?;
            up.protocol = c.protocol;
            up.failover = targets
                .map(&mut target)
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?
                .into_boxed_slice();
            clusters.push(HttpCluster {
                name: c.name,
                protocol: c.protocol,
                target: up,
            });
        }
        let routes = spec
            .routes
            .into_iter()
            .map(|r| CompiledRoute::compile(r, clusters.len()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HttpTable {
            clusters: clusters.into_boxed_slice(),
            routes: routes.into_boxed_slice(),
        })
    }

    /// The first route whose match holds for `req`; `None` = no route
    /// (the engine answers 503 `no_route`).
    pub fn route(&self, req: &impl RequestHead) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.matches(req))
    }
}

impl CompiledRoute {
    fn compile(r: RouteSpec, clusters: usize) -> Result<CompiledRoute, L7Error> {
        let RouteSpec {
            name,
            matches,
            action,
        } = r;
        let RequestMatch {
            path,
            headers,
            query,
            methods,
        } = matches;
        let path = match path {
            PathMatch::Any => CPath::Any,
            PathMatch::Exact(p) => CPath::Exact(p),
            PathMatch::Prefix(p) if p.is_empty() || p == "/" => CPath::Any,
            PathMatch::Prefix(p) => CPath::Prefix(p),
            PathMatch::Regex(re) => CPath::Regex(whole(&name, "path", &re)?),
        };
        let headers = headers
            .into_iter()
            .map(|h| {
                let name_l = h.name.to_ascii_lowercase();
                if name_l.is_empty() {
                    return Err(L7Error::Route {
                        route: name.clone(),
                        msg: "a header match without a header name".into(),
                    });
                }
                let kind = match h.kind {
                    HeaderMatchKind::Present => CHeaderKind::Present,
                    HeaderMatchKind::Exact(v) => CHeaderKind::Exact(v),
                    HeaderMatchKind::Prefix(v) => CHeaderKind::Prefix(v),
                    HeaderMatchKind::Suffix(v) => CHeaderKind::Suffix(v),
                    HeaderMatchKind::Regex(re) => {
                        CHeaderKind::Regex(whole(&name, &format!("header {name_l}"), &re)?)
                    }
                };
                Ok(CHeader {
                    name: name_l,
                    kind,
                    invert: h.invert,
                })
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_boxed_slice();
        let query = query
            .into_iter()
            .map(|q| {
                if q.name.is_empty() {
                    return Err(L7Error::Route {
                        route: name.clone(),
                        msg: "a query parameter match without a name".into(),
                    });
                }
                let kind = match q.kind {
                    QueryMatchKind::Present => CQueryKind::Present,
                    QueryMatchKind::Exact(v) => CQueryKind::Exact(v),
                    QueryMatchKind::Regex(re) => CQueryKind::Regex(whole(
                        &name,
                        &format!("query parameter {}", q.name),
                        &re,
                    )?),
                };
                Ok(CQuery { name: q.name, kind })
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_boxed_slice();
        let methods = methods
            .into_iter()
            .map(|m| m.to_ascii_uppercase())
            .collect::<Vec<_>>()
            .into_boxed_slice();
        if action.clusters.is_empty() {
            return Err(L7Error::NoWeight(name));
        }
        if let Some(w) = action.clusters.iter().find(|w| w.cluster >= clusters) {
            return Err(L7Error::NoSuchCluster {
                route: name,
                index: w.cluster,
                count: clusters,
            });
        }
        let total_weight: u64 = action.clusters.iter().map(|w| u64::from(w.weight)).sum();
        if total_weight == 0 {
            return Err(L7Error::NoWeight(name));
        }
        if action.prefix_rewrite.is_some() && matches!(path, CPath::Regex(_)) {
            return Err(L7Error::RewriteWithRegex(name));
        }
        Ok(CompiledRoute {
            name,
            path,
            headers,
            query,
            methods,
            action,
            total_weight,
        })
    }

    /// Whether every set part of its match holds for `req`.
    pub fn matches(&self, req: &impl RequestHead) -> bool {
        let path = req.path();
        let path_ok = match &self.path {
            CPath::Any => true,
            CPath::Exact(p) => path == p,
            CPath::Prefix(p) => path.starts_with(p.as_str()),
            CPath::Regex(re) => re.is_match(path),
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == req.method()) {
            return false;
        }
        for h in self.headers.iter() {
            let v = req.header(&h.name);
            let hit = match (&h.kind, v.as_deref()) {
                (_, None) => false,
                (CHeaderKind::Present, Some(_)) => true,
                (CHeaderKind::Exact(want), Some(v)) => v == want,
                (CHeaderKind::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
                (CHeaderKind::Suffix(s), Some(v)) => v.ends_with(s.as_str()),
                (CHeaderKind::Regex(re), Some(v)) => re.is_match(v),
            };
            if hit == h.invert {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = req.query().unwrap_or("");
            for m in self.query.iter() {
                let v = query_param(q, &m.name);
                let hit = match (&m.kind, v) {
                    (_, None) => false,
                    (CQueryKind::Present, Some(_)) => true,
                    (CQueryKind::Exact(want), Some(v)) => v == want,
                    (CQueryKind::Regex(re), Some(v)) => re.is_match(v),
                };
                if !hit {
                    return false;
                }
            }
        }
        true
    }

    /// The cluster (index into [`HttpTable::clusters`]) for a request with
    /// the random number `r` (any u64; reduced modulo the total weight):
    /// cluster `i` gets `weight_i / total` of the requests.
    pub fn pick(&self, r: u64) -> usize {
        let mut unit = r % self.total_weight;
        for w in &self.action.clusters {
            let w64 = u64::from(w.weight);
            if unit < w64 {
                return w.cluster;
            }
            unit -= w64;
        }
        // Unreachable: the weights sum to `total_weight`.
        self.action.clusters[0].cluster
    }

    /// The path and query to send upstream when the route rewrites
    /// (`prefix_rewrite`): the matched prefix (a prefix match; `/` for a
    /// route matching any path) or the whole path (an exact match) replaced,
    /// the query kept. `None` = send the request's own.
    pub fn rewrite(&self, path_and_query: &str) -> Option<String> {
        let to = self.action.prefix_rewrite.as_deref()?;
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let rest = match &self.path {
            CPath::Any => path.strip_prefix('/').unwrap_or(path),
            CPath::Prefix(p) => path.strip_prefix(p.as_str()).unwrap_or(path),
            CPath::Exact(_) => "",
            CPath::Regex(_) => return None,
        };
        let mut out = String::with_capacity(to.len() + rest.len() + 1);
        out.push_str(to);
        out.push_str(rest);
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        Some(out)
    }
}

/// The raw value of the first `name` parameter of a query string (`a=1&b`:
/// `b` is present with an empty value).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// A well-mixed 64-bit number from a counter (SplitMix64): the engine's
/// random number for [`CompiledRoute::pick`], without a random-number crate.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
