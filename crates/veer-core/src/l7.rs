//! The L7 (HTTP, HTTP/2, gRPC) part of a [`Spec`](crate::snapshot::Spec):
//! plain data that every control-plane source fills the same way.
//!
//! - **Outbound**: an upstream whose protocol is http-like carries
//!   [`HttpRoutes`]: named clusters (each a target with its failover
//!   targets) and routes in order, the first match wins. Consul's
//!   discovery chain (routers, splitters, resolvers), Envoy's RDS/inline
//!   `route_config` and the TOML file all compile to this. Sources append
//!   Consul's catch-all route themselves; a request no route matches gets a
//!   503 from the data path.
//! - **Inbound**: [`InboundHttp`] turns the public listener into an HTTP
//!   server after mTLS; requests are then authorized one by one by
//!   intentions with [`Permission`]s (agent and TOML) or by HTTP RBAC
//!   filters (xDS), and forwarded to the local app.
//!
//! Nothing here is compiled: regexes and references are checked when the
//! snapshot is built, so a source can refuse (NACK) what does not compile.
//! An upstream without `http` (or with protocol `tcp`) stays on the L4 path.
use crate::authz::{RbacRules, StringMatch};
use crate::intentions::Action;
use crate::route::Protocol;
use crate::snapshot::TargetSpec;
use std::time::Duration;

/// Envoy's route timeout when a route sets none (Consul 1.8 leaves it
/// unset unless `RequestTimeout` > 0: hashicorp/consul#6382).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The L7 routing of one http-like upstream.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HttpRoutes {
    /// What routes send requests to. Index = [`WeightedCluster::cluster`].
    pub clusters: Vec<ClusterSpec>,
    /// In order; the first whose match holds decides.
    pub routes: Vec<RouteSpec>,
}

/// One destination of routes: a target and its failover targets (the
/// same shape as an upstream's primary target and `failover`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Its name for metrics, logs and the 503 reason: Consul's cluster name
    /// (the target's SNI, e.g. `v2.api.default.dc1.internal.<td>.consul`)
    /// or, in TOML, the name the file gives it.
    pub name: String,
    /// Failover order; at least one. A request goes to the first target
    /// with a healthy endpoint.
    pub targets: Vec<TargetSpec>,
    /// The protocol spoken to its endpoints' sidecars (`Http` = HTTP/1.1,
    /// `Http2`/`Grpc` = HTTP/2 over the mTLS connection).
    pub protocol: Protocol,
}

/// One route: a match and what to do with matching requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// For logs and `/config_dump` (Consul: the router's route index).
    pub name: String,
    pub matches: RequestMatch,
    pub action: RouteAction,
}

/// What a request must have for a route to apply; every set part must
/// hold (Consul `ServiceRouteMatch.HTTP`, Envoy `RouteMatch`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RequestMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// Upper-case method names; empty = any method.
    pub methods: Vec<String>,
}

/// How the request path (without the query string) is matched.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum PathMatch {
    /// Any path (Envoy `prefix: "/"`).
    #[default]
    Any,
    Exact(String),
    Prefix(String),
    /// RE2-syntax; must match the whole path (Envoy `safe_regex`).
    Regex(String),
}

/// A header condition. A request header that appears several times is
/// matched against its values joined with `,` (Envoy's behaviour).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower-case header name (`:method`, `:authority` allowed).
    pub name: String,
    pub kind: HeaderMatchKind,
    /// The condition holds when the match does not.
    pub invert: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderMatchKind {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// RE2-syntax; whole value.
    Regex(String),
}

/// A query-parameter condition (Consul `QueryParam`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryMatch {
    pub name: String,
    pub kind: QueryMatchKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryMatchKind {
    Present,
    Exact(String),
    /// RE2-syntax; whole value.
    Regex(String),
}

/// What a route does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteAction {
    /// One or more clusters with weights (Consul splitter; Envoy
    /// `weighted_clusters`). One entry = all requests. Weights are relative
    /// (Consul's percentages ×100, summing to 10,000); a weight of 0 gets
    /// no requests. At least one weight must be > 0.
    pub clusters: Vec<WeightedCluster>,
    /// Replaces the matched path prefix (or the exact path) before
    /// forwarding (Consul `PrefixRewrite`).
    pub prefix_rewrite: Option<String>,
    /// The whole request, retries included; `None` = [`DEFAULT_REQUEST_TIMEOUT`],
    /// `Some(Duration::ZERO)` = none.
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

impl RouteAction {
    /// All requests to `cluster`, Envoy's defaults otherwise.
    pub fn to_cluster(cluster: usize) -> RouteAction {
        RouteAction {
            clusters: vec![WeightedCluster { cluster, weight: 1 }],
            prefix_rewrite: None,
            timeout: None,
            retry: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightedCluster {
    /// Index into [`HttpRoutes::clusters`].
    pub cluster: usize,
    pub weight: u32,
}

/// When a request is tried again (Consul `NumRetries`,
/// `RetryOnConnectFailure`, `RetryOnStatusCodes`; Envoy `retry_policy`
/// with `retry_on: connect-failure,retriable-status-codes`). A request is
/// retried only when its body has not been streamed past what veer buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt. Envoy's default when a policy is
    /// set without a count is 1 (Consul's `NumRetries: 0` with status codes
    /// means 1, hashicorp/consul#8516): sources write that 1 themselves.
    pub num_retries: u32,
    pub on_connect_failure: bool,
    /// Also retry on a `reset` / refused stream (Envoy `reset`,
    /// `refused-stream`); set by xDS when Consul asks for it.
    pub on_reset: bool,
    pub on_status_codes: Vec<u16>,
}

/// The inbound listener at L7 (the local service's protocol is http-like).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundHttp {
    /// `Http`: HTTP/1.1 and HTTP/2 (by ALPN / preface) from peers, HTTP/1.1
    /// to the app; `Http2`/`Grpc`: HTTP/2 to the app too.
    pub protocol: Protocol,
    /// HTTP RBAC filters (xDS `envoy.filters.http.rbac`), applied per
    /// request after the network-level decision; each must allow. `None`:
    /// the spec's intentions with [`Permission`]s decide per request.
    pub rbac: Option<Vec<RbacRules>>,
    /// What happens to `X-Forwarded-Client-Cert` towards the app.
    pub xfcc: Xfcc,
    /// Timeout for the local app to answer a request; `None` = 15 s.
    pub request_timeout: Option<Duration>,
}

/// `X-Forwarded-Client-Cert` handling (Envoy `forward_client_cert_details`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Xfcc {
    /// Remove any the client sent, add none (Envoy's default; Consul 1.8).
    #[default]
    Sanitize,
    /// Keep the client's and append this hop's (Consul ≥ 1.12 for http:
    /// `By`, `Hash`, `Subject`, `URI`, as Envoy's `set_current_client_cert_details`).
    AppendForward,
    /// Remove the client's, set this hop's.
    SanitizeSet,
}

/// One L7 permission of an intention (Consul `service-intentions`
/// `Sources[].Permissions[]`): the first permission whose match holds
/// decides; when none does, the default action decides (Consul's docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub action: Action,
    pub http: PermissionMatch,
}

/// Consul `IntentionHTTPPermission`: at most one path condition, header
/// conditions, methods; every set part must hold.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PermissionMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    /// Upper-case; empty = any.
    pub methods: Vec<String>,
}

/// One Envoy RBAC permission (the HTTP subset Consul emits): `any`, URL
/// path, a header (Consul writes methods as a `:method` header regex),
/// and their combinations.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RbacPermission {
    Any,
    /// The path without the query string.
    UrlPath(StringMatch),
    Header {
        name: String,
        /// `None` = present.
        value: Option<StringMatch>,
        invert: bool,
    },
    And(Vec<RbacPermission>),
    Or(Vec<RbacPermission>),
    Not(Box<RbacPermission>),
}
