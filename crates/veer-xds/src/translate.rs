//! The translation of Consul's xDS resources into veer's one plain-data
//! [`Spec`] (transparent proxy, L4 and L7), sans IO.
//!
//! - [`decode`] takes one resource as the ADS client receives it, checks it
//!   on its own and returns it decoded, or the reason to NACK it (the
//!   resource and the field path are named).
//! - [`wanted`] names what to subscribe to by name (EDS, RDS, SDS).
//! - [`missing`] says what a first configuration still waits for.
//! - [`translate`] compiles the accepted resources into a [`Spec`].
//!
//! # The mapping (Envoy's semantics, Consul's shapes, v1.16 and newer)
//!
//! - `public_listener:*` (mTLS, client certificate required, else refused):
//!   its address is `listen.inbound`; the `DownstreamTlsContext`'s leaf
//!   (inline, or SDS `connect-leaf`) gives `chain`, `key` and, from its
//!   SPIFFE URI, `identity`; its trusted CA (inline, or SDS `connect-root`)
//!   gives `roots`. Network `rbac` filters become `Spec::rbac` (ALLOW/DENY;
//!   `rules: {}` denies all; no `rules` enforces nothing; shadow rules are
//!   ignored; permissions other than `any` are refused);
//!   `connection_limit` gives `inbound_max_connections`; the `tcp_proxy`
//!   cluster (STATIC, one endpoint) is `local_app`; permissive-mTLS chains
//!   (`destination_port` + plain `tcp_proxy` to the same cluster) give
//!   `permissive_ports`.
//! - `outbound_listener:*` (`original_dst` required): its address joins
//!   `listen.outbound`; each chain's `prefix_ranges` (single addresses only,
//!   /32 or /128) are the virtual IPs of the EDS cluster its `tcp_proxy`
//!   names (with `destination_port` when set), or, for a
//!   `passthrough~<sni>` ORIGINAL_DST cluster with mTLS, the instance IPs of
//!   the upstream with that SNI (`dialed_directly`). A `default_filter_chain`
//!   to a plain ORIGINAL_DST cluster passes everything else through; its
//!   absence means `mesh_destinations_only`.
//! - Any other listener with one `tcp_proxy` chain is an explicit upstream
//!   (`local_bind` = its address); `exposed_path_*` listeners (one plain HCM,
//!   one exact-path route, router only; the one HTTP shape allowed at L4) are
//!   `expose` paths to the route's STATIC cluster on 127.0.0.1.
//! - EDS clusters (mTLS only): `sni`, the URI SAN matchers (old and typed
//!   forms) as `san_matchers` (the first exact SPIFFE ID is the upstream's
//!   `identity`), the trusted CA as per-upstream `roots` when it differs from
//!   the listener's, `connect_timeout`, the default-priority circuit breaker
//!   `max_connections`. Outlier detection is accepted: veer's own endpoint
//!   failure marking does that job. RING_HASH, MAGLEV, LEAST_REQUEST and
//!   RANDOM are accepted and approximated by (weighted) round robin, without
//!   session affinity.
//! - Aggregate clusters (`envoy.clusters.aggregate`, Consul's failover):
//!   one upstream whose targets are its member clusters in order (nested
//!   aggregates flattened), each an EDS or DNS cluster with its own SNI,
//!   SANs, roots and connect timeout; a failover target without an
//!   assignment has no endpoints (Consul sends none for a target it knows
//!   no gateway for). A member that does not exist, a loop, or a member
//!   that is not an upstream cluster is refused, naming the aggregate and
//!   `cluster_type.typed_config.clusters[i]`.
//! - DNS clusters (`STRICT_DNS`, `LOGICAL_DNS`; mTLS only): their hosts'
//!   addresses come from `Resources::dns`, which the ADS client fills
//!   ([`wanted`] names them with their refresh interval); the lookup
//!   family picks among them, `LOGICAL_DNS` takes the first.
//! - Endpoints: of the lowest priority that has any usable, those HEALTHY or
//!   of UNKNOWN health (Consul sets `healthy_panic_threshold` 0), with their
//!   weights; `endpoints: [{}]` is an upstream with no hosts.
//! - L7 (`http` module): an HTTP connection manager as the last filter of
//!   the public listener's mTLS chain makes [`Spec::inbound_http`]: the
//!   protocol (`grpc_stats`/`grpc_http1_bridge` = gRPC, HTTP/2 codec =
//!   http2, else http), HTTP `rbac` filters (ALLOW/DENY; permissions `any`,
//!   `url_path`, `header`, `and_rules`, `or_rules`, `not_rule`; no filter =
//!   every request allowed), XFCC (`SANITIZE`, `APPEND_FORWARD`,
//!   `SANITIZE_SET`), and the one inline catch-all route to `local_app`,
//!   whose timeout is the request timeout. On an outbound chain or an
//!   explicit upstream listener it makes an upstream with
//!   [`UpstreamSpec::http`]: the route configuration (inline or RDS over
//!   ADS) compiles route by route (prefix/path/safe_regex, headers, query
//!   parameters, cluster or weighted_clusters, prefix_rewrite, timeout,
//!   retry_policy) and every cluster it names becomes a `ClusterSpec`
//!   (one target from CDS/EDS; HTTP/2 when its `HttpProtocolOptions` say
//!   so); the upstream's own target is the catch-all route's heaviest
//!   cluster. `header_to_metadata`, `grpc_stats` and `grpc_http1_bridge`
//!   are accepted and listed in `Spec::unapplied`, as are idle timeouts,
//!   header additions, hash policies and gRPC retry conditions.
//!
//! What veer cannot enforce is refused, never skipped: HTTP filters other
//! than rbac/header_to_metadata/grpc_stats/grpc_http1_bridge/router, HTTP
//! RBAC on outbound, `FORWARD_ONLY` XFCC, redirects, direct responses,
//! regex or host rewrites, per-route filter configuration, more than one
//! virtual host or domains other than `*`, `ext_authz`, `jwt_authn`,
//! `lua`, `wasm`, unknown filters and listener filters, transport sockets
//! other than TLS, `tls_inspector`/`sni_cluster` chains, a TLS 1.3 minimum
//! or cipher-suite lists, file data sources.
use crate::resources::{Decoded, Kind, Resources, Wanted};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
pub use http::{Hcm, Note, RouteModel, RouteSource, RoutesModel};
use parse::Fault;
pub use parse::{
    ChainTarget, ClusterKind, ClusterModel, DnsFamily, DnsHost, DnsModel, DownstreamTls,
    EndpointModel, ExposeListener, InboundHcm, InlineRoots, Leaf, LeafSource, ListenerEntry,
    ListenerModel, OutboundChain, OutboundListener, PublicListener, RootsSource, SecretModel,
    UpstreamTls,
};
use prost::Message;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use veer_core::authz::MatchPattern;
use veer_core::intentions::Action;
use veer_core::l7::{
    ClusterSpec, HttpRoutes, InboundHttp, RouteAction, RouteSpec, WeightedCluster,
};
use veer_core::route::Protocol;
use veer_core::snapshot::{
    ExposePath, ListenSpec, Spec, TargetSpec, Timeouts, Unapplied, UpstreamSpec,
};
use veer_core::spiffe::ServiceId;

pub(crate) mod http;
pub(crate) mod parse;

/// [`Spec::source`] of every spec built here.
pub const SOURCE: &str = "xds";

/// Why a resource is NACKed or a configuration cannot be compiled.
/// `classify()` gives a metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TranslateError {
    /// The `Any`'s type URL is not the one of the kind it came as.
    #[error("{kind} {name}: type URL {got:?} is not {want}")]
    TypeUrl {
        kind: &'static str,
        name: String,
        got: String,
        want: &'static str,
    },
    /// The bytes are not a valid message of the kind.
    #[error("{kind} {name}: cannot decode: {reason}")]
    Decode {
        kind: &'static str,
        name: String,
        reason: String,
    },
    /// The resource's own name differs from the name it was sent under.
    #[error("{kind} {name}: the resource calls itself {inner:?}")]
    Name {
        kind: &'static str,
        name: String,
        inner: String,
    },
    /// A well-formed field asking for something veer does not enforce.
    #[error("{kind} {name}: {}", with_field(field, reason))]
    Refused {
        kind: &'static str,
        name: String,
        field: String,
        reason: String,
    },
    /// A malformed field.
    #[error("{kind} {name}: {}", with_field(field, reason))]
    Invalid {
        kind: &'static str,
        name: String,
        field: String,
        reason: String,
    },
    /// Resources that do not fit together (each names the resources).
    #[error("{0}")]
    Inconsistent(String),
    /// A first configuration still waits for these (see [`missing`]).
    #[error("incomplete configuration: waiting for {}", .0.join("; "))]
    Incomplete(Vec<String>),
}

fn with_field(field: &str, reason: &str) -> String {
    if field.is_empty() {
        reason.to_string()
    } else {
        format!("{field}: {reason}")
    }
}

impl TranslateError {
    /// A short, bounded label for metrics.
    pub fn classify(&self) -> &'static str {
        match self {
            TranslateError::TypeUrl { .. } => "type_url",
            TranslateError::Decode { .. } => "decode",
            TranslateError::Name { .. } => "name",
            TranslateError::Refused { .. } => "refused",
            TranslateError::Invalid { .. } => "invalid",
            TranslateError::Inconsistent(_) => "inconsistent",
            TranslateError::Incomplete(_) => "incomplete",
        }
    }

    fn from_fault(kind: Kind, name: &str, f: Fault) -> TranslateError {
        let (kind, name) = (noun(kind), name.to_string());
        if f.unsupported {
            TranslateError::Refused {
                kind,
                name,
                field: f.field,
                reason: f.reason,
            }
        } else {
            TranslateError::Invalid {
                kind,
                name,
                field: f.field,
                reason: f.reason,
            }
        }
    }
}

/// How errors name a kind.
fn noun(kind: Kind) -> &'static str {
    match kind {
        Kind::Listener => "listener",
        Kind::Cluster => "cluster",
        Kind::Endpoints => "endpoints",
        Kind::Route => "route",
        Kind::Secret => "secret",
    }
}

fn unpack<T: Message + Default>(kind: Kind, name: &str, any: &Any) -> Result<T, TranslateError> {
    if any.type_url != kind.type_url() {
        return Err(TranslateError::TypeUrl {
            kind: noun(kind),
            name: name.to_string(),
            got: any.type_url.clone(),
            want: kind.type_url(),
        });
    }
    T::decode(any.value.as_slice()).map_err(|e| TranslateError::Decode {
        kind: noun(kind),
        name: name.to_string(),
        reason: e.to_string(),
    })
}

fn same_name(kind: Kind, name: &str, inner: &str) -> Result<(), TranslateError> {
    if inner == name {
        Ok(())
    } else {
        Err(TranslateError::Name {
            kind: noun(kind),
            name: name.to_string(),
            inner: inner.to_string(),
        })
    }
}

/// Decodes one resource of `kind` sent under `name`, checks it on its own
/// and returns the model veer keeps of it (the protobuf is dropped here);
/// `Err` = NACK it (the old one, if any, keeps serving).
pub fn decode(kind: Kind, name: &str, any: &Any) -> Result<Decoded, TranslateError> {
    let fault = |f| TranslateError::from_fault(kind, name, f);
    Ok(match kind {
        Kind::Listener => {
            let l: Listener = unpack(kind, name, any)?;
            same_name(kind, name, &l.name)?;
            let model = parse::listener(&l).map_err(fault)?;
            Decoded::Listener(ListenerEntry {
                model,
                rds: parse::rds_names(&l),
            })
        }
        Kind::Cluster => {
            let c: Cluster = unpack(kind, name, any)?;
            same_name(kind, name, &c.name)?;
            Decoded::Cluster(parse::cluster(&c).map_err(fault)?)
        }
        Kind::Endpoints => {
            let e: ClusterLoadAssignment = unpack(kind, name, any)?;
            same_name(kind, name, &e.cluster_name)?;
            Decoded::Endpoints(parse::endpoints_of(&e).map_err(fault)?.into_boxed_slice())
        }
        Kind::Route => {
            let r: RouteConfiguration = unpack(kind, name, any)?;
            same_name(kind, name, &r.name)?;
            Decoded::Route(http::route_config(&r).map_err(fault)?)
        }
        Kind::Secret => {
            let s: Secret = unpack(kind, name, any)?;
            same_name(kind, name, &s.name)?;
            Decoded::Secret(parse::secret(&s).map_err(fault)?)
        }
    })
}

fn sds_names(leaf: &LeafSource, roots: &RootsSource, out: &mut BTreeSet<String>) {
    if let LeafSource::Sds(n) = leaf {
        out.insert(n.clone());
    }
    if let RootsSource::Sds(n) = roots {
        out.insert(n.clone());
    }
}

fn cluster_tls(m: &ClusterModel) -> Option<&UpstreamTls> {
    match &m.kind {
        ClusterKind::Eds { tls, .. } => Some(tls),
        ClusterKind::OriginalDst(tls) => tls.as_ref(),
        ClusterKind::Dns { tls, .. } => Some(tls),
        ClusterKind::Static(_) | ClusterKind::Aggregate(_) => None,
    }
}

/// The hostnames of a DNS cluster that need resolving (not IP literals).
fn dns_names(dns: &DnsModel) -> impl Iterator<Item = &str> {
    dns.hosts
        .iter()
        .map(|h| h.host.as_str())
        .filter(|h| h.parse::<IpAddr>().is_err())
}

/// The clusters traffic for `name` may end at: `name` itself, or for an
/// aggregate its members in failover order (nested aggregates flattened).
/// Unknown members and loops are skipped here (the translation refuses
/// them, see [`flatten`]).
fn leaf_clusters<'a>(res: &'a Resources, name: &'a str) -> Vec<(&'a str, &'a ClusterModel)> {
    fn walk<'a>(
        res: &'a Resources,
        name: &'a str,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<(&'a str, &'a ClusterModel)>,
    ) {
        if !seen.insert(name) {
            return;
        }
        let Some(m) = res.clusters.get(name) else {
            return;
        };
        match &m.kind {
            ClusterKind::Aggregate(members) => {
                for c in members {
                    walk(res, c, seen, out);
                }
            }
            _ => out.push((name, m)),
        }
    }
    let mut out = Vec::new();
    walk(res, name, &mut BTreeSet::new(), &mut out);
    out
}

/// The member clusters of aggregate `name`, in failover order (nested
/// aggregates flattened, a cluster named twice kept at its first place);
/// a member that does not exist or leads back to an aggregate on the way
/// is invalid, named by the aggregate and the field.
fn flatten<'a>(
    clusters: &'a BTreeMap<String, ClusterModel>,
    name: &'a str,
    path: &mut Vec<&'a str>,
    out: &mut Vec<&'a str>,
) -> Result<(), TranslateError> {
    let Some(ClusterKind::Aggregate(members)) = clusters.get(name).map(|m| &m.kind) else {
        if !out.contains(&name) {
            out.push(name);
        }
        return Ok(());
    };
    path.push(name);
    for (i, m) in members.iter().enumerate() {
        let err = |reason: String| TranslateError::Invalid {
            kind: "cluster",
            name: name.to_string(),
            field: format!("cluster_type.typed_config.clusters[{i}]"),
            reason,
        };
        let Some((member, _)) = clusters.get_key_value(m.as_str()) else {
            return Err(err(format!("names cluster {m:?}, which does not exist")));
        };
        let member = member.as_str();
        if path.contains(&member) {
            return Err(err(format!(
                "names cluster {m:?}, which leads back to it (a loop: {} -> {m})",
                path.join(" -> ")
            )));
        }
        flatten(clusters, member, path, out)?;
    }
    path.pop();
    Ok(())
}

/// The names to subscribe to by name: the EDS name of every accepted EDS
/// cluster, every SDS secret a listener or cluster names, every RDS route
/// an HCM names.
pub fn wanted(res: &Resources) -> Wanted {
    let mut w = Wanted::default();
    for l in res.listeners.values() {
        if let ListenerModel::Public(p) = &l.model {
            sds_names(&p.tls.leaf, &p.tls.roots, &mut w.secrets);
        }
        w.routes.extend(l.rds.iter().cloned());
    }
    for m in res.clusters.values() {
        if let ClusterKind::Eds { eds_name, .. } = &m.kind {
            w.endpoints.insert(eds_name.clone());
        }
        if let ClusterKind::Dns { dns, .. } = &m.kind {
            for h in dns_names(dns) {
                let every = w.dns.entry(h.to_string()).or_insert(dns.refresh);
                *every = (*every).min(dns.refresh);
            }
        }
        if let Some(tls) = cluster_tls(m) {
            sds_names(&tls.leaf, &tls.roots, &mut w.secrets);
        }
    }
    w
}

/// The routes of an HCM: inline, or the accepted RDS resource; a
/// refused RDS resource counts as no routes (see `Resources::refused`);
/// `Ok(None)` = not received yet.
fn routes_of<'a>(hcm: &'a Hcm, res: &'a Resources) -> Option<Cow<'a, RoutesModel>> {
    match &hcm.routes {
        RouteSource::Inline(rm) => Some(Cow::Borrowed(rm)),
        RouteSource::Rds(n) => match res.routes.get(n) {
            Some(rm) => Some(Cow::Borrowed(rm)),
            None if res.refused.contains_key(&(Kind::Route, n.clone())) => {
                Some(Cow::Owned(RoutesModel {
                    name: n.clone(),
                    routes: Vec::new(),
                    notes: Vec::new(),
                }))
            }
            None => None,
        },
    }
}

/// The clusters a chain target sends traffic to; a route configuration
/// not received yet goes to `waiting`.
fn target_clusters(
    t: &ChainTarget,
    res: &Resources,
    who: &str,
    waiting: &mut BTreeSet<String>,
) -> Vec<String> {
    match t {
        ChainTarget::Tcp(c) => vec![c.clone()],
        ChainTarget::Http { hcm, .. } => match routes_of(hcm, res) {
            Some(rm) => rm.clusters(),
            None => {
                if let RouteSource::Rds(n) = &hcm.routes {
                    waiting.insert(format!("route {n} (RDS), named by {who}"));
                }
                Vec::new()
            }
        },
    }
}

/// The clusters a listener model sends traffic to.
fn referenced(
    m: &ListenerModel,
    res: &Resources,
    who: &str,
    waiting: &mut BTreeSet<String>,
) -> Vec<String> {
    match m {
        ListenerModel::Public(p) => {
            let mut v = vec![p.cluster.clone()];
            v.extend(p.permissive.iter().map(|(_, c)| c.clone()));
            v
        }
        ListenerModel::Outbound(o) => {
            let mut v: Vec<String> = o
                .chains
                .iter()
                .flat_map(|c| target_clusters(&c.target, res, who, waiting))
                .collect();
            v.extend(o.default_cluster.clone());
            v
        }
        ListenerModel::Upstream { target, .. } => target_clusters(target, res, who, waiting),
        ListenerModel::Expose(e) => vec![e.cluster.clone()],
    }
}

/// What a first configuration still waits for; empty = [`translate`] can
/// build a spec (or say why the resources do not fit together).
pub fn missing(res: &Resources) -> Vec<String> {
    let mut m = BTreeSet::new();
    let models: Vec<(&String, &ListenerModel)> =
        res.listeners.iter().map(|(n, l)| (n, &l.model)).collect();
    if !models
        .iter()
        .any(|(_, l)| matches!(l, ListenerModel::Public(_)))
    {
        m.insert("the public listener (LDS)".to_string());
    }
    let mut secrets = BTreeSet::new();
    for (name, l) in &models {
        if let ListenerModel::Public(p) = l {
            sds_names(&p.tls.leaf, &p.tls.roots, &mut secrets);
        }
        for c in referenced(l, res, &format!("listener {name}"), &mut m) {
            match res.clusters.get(&c) {
                None => {
                    m.insert(format!("cluster {c} (CDS), named by listener {name}"));
                }
                Some(cm) => {
                    for (li, (lname, lm)) in leaf_clusters(res, &c).into_iter().enumerate() {
                        if let ClusterKind::Dns { dns, .. } = &lm.kind {
                            for h in dns_names(dns) {
                                if !res.dns.contains_key(h) {
                                    m.insert(format!("DNS name {h} (cluster {lname})"));
                                }
                            }
                        }
                        if !matches!(cm.kind, ClusterKind::Aggregate(_)) {
                            continue;
                        }
                        // An aggregate's members: their secrets, and the
                        // primary's endpoints. A failover target's are not
                        // waited for: Consul sends none for a target it
                        // knows no gateway for (endpoints golden
                        // `connect-proxy-with-tcp-chain-double-failover-through-remote-gateway`).
                        if let ClusterKind::Eds { eds_name, .. } = &lm.kind {
                            if li == 0
                                && !res.endpoints.contains_key(eds_name)
                                && !res
                                    .refused
                                    .contains_key(&(Kind::Endpoints, eds_name.clone()))
                            {
                                m.insert(format!("endpoints {eds_name} (EDS)"));
                            }
                        }
                        if let Some(tls) = cluster_tls(lm) {
                            sds_names(&tls.leaf, &tls.roots, &mut secrets);
                        }
                    }
                    // A passthrough cluster takes endpoints from the EDS
                    // cluster of the same SNI, when there is one.
                    let eds = match &cm.kind {
                        ClusterKind::Eds { eds_name, .. } => Some(eds_name.clone()),
                        ClusterKind::OriginalDst(Some(tls)) => {
                            res.clusters.get(&tls.sni).and_then(|m| match &m.kind {
                                ClusterKind::Eds { eds_name, .. } => Some(eds_name.clone()),
                                _ => None,
                            })
                        }
                        _ => None,
                    };
                    if let Some(eds_name) = eds {
                        // Refused endpoints count as none (see
                        // `Resources::refused`).
                        if !res.endpoints.contains_key(&eds_name)
                            && !res
                                .refused
                                .contains_key(&(Kind::Endpoints, eds_name.clone()))
                        {
                            m.insert(format!("endpoints {eds_name} (EDS)"));
                        }
                    }
                    if let Some(tls) = cluster_tls(cm) {
                        sds_names(&tls.leaf, &tls.roots, &mut secrets);
                    }
                }
            }
        }
    }
    for s in secrets {
        if !res.secrets.contains_key(&s) {
            match res.refused.get(&(Kind::Secret, s.clone())) {
                Some(why) => m.insert(format!(
                    "secret {s} (SDS; the one received was refused: {why})"
                )),
                None => m.insert(format!("secret {s} (SDS)")),
            };
        }
    }
    m.into_iter().collect()
}

fn inconsistent(msg: impl Into<String>) -> TranslateError {
    TranslateError::Inconsistent(msg.into())
}

/// What names a secret or has a fault, as errors say it (`cluster <name>`);
/// formatted only when an error is.
#[derive(Clone, Copy)]
struct Who<'a>(&'static str, &'a str);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.1)
    }
}

/// Secrets resolved once per translation.
struct Secrets<'a> {
    res: &'a Resources,
}

impl<'a> Secrets<'a> {
    fn secret(&self, name: &str, who: Who) -> Result<&'a SecretModel, TranslateError> {
        self.res.secrets.get(name).ok_or_else(|| {
            TranslateError::Incomplete(vec![format!("secret {name} (SDS), named by {who}")])
        })
    }

    fn leaf(&self, src: &'a LeafSource, who: Who) -> Result<&'a Arc<Leaf>, TranslateError> {
        match src {
            LeafSource::Inline(leaf) => Ok(leaf),
            LeafSource::Sds(n) => match self.secret(n, who)? {
                SecretModel::Leaf(leaf) => Ok(leaf),
                SecretModel::Roots(_) => Err(inconsistent(format!(
                    "{who}: secret {n} holds a validation context where a certificate is needed"
                ))),
            },
        }
    }

    fn roots(&self, src: &'a RootsSource, who: Who) -> Result<&'a InlineRoots, TranslateError> {
        match src {
            RootsSource::Inline(r) => Ok(r),
            RootsSource::Sds(n) => match self.secret(n, who)? {
                SecretModel::Roots(r) => Ok(r),
                SecretModel::Leaf(_) => Err(inconsistent(format!(
                    "{who}: secret {n} holds a certificate where a validation context is needed"
                ))),
            },
        }
    }
}

/// Where a target's endpoints come from.
#[derive(Clone, Copy)]
enum Hosts<'a> {
    /// The assignment of this EDS name.
    Eds(&'a str),
    /// A DNS cluster's hosts, with the addresses the source resolved.
    Dns(&'a DnsModel),
    /// None (a passthrough cluster without an EDS sibling).
    None,
}

/// A DNS cluster's endpoints: each host's resolved addresses of its
/// lookup family (`LOGICAL_DNS`: the first one only) on the host's port,
/// with its weight. An IP literal is its own address.
fn dns_endpoints(
    res: &Resources,
    cname: &str,
    dns: &DnsModel,
) -> Result<Vec<(SocketAddr, u32)>, TranslateError> {
    let mut out: Vec<(SocketAddr, u32)> = Vec::new();
    for h in &dns.hosts {
        let ips = match h.host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => match res.dns.get(&h.host) {
                Some(ips) => dns.family.pick(ips),
                None => {
                    return Err(TranslateError::Incomplete(vec![format!(
                        "DNS name {} (cluster {cname})",
                        h.host
                    )]))
                }
            },
        };
        let ips = if dns.logical {
            ips.into_iter().take(1).collect()
        } else {
            ips
        };
        for ip in ips {
            let a = SocketAddr::new(ip, h.port);
            if !out.iter().any(|(o, _)| *o == a) {
                out.push((a, h.weight));
            }
        }
    }
    Ok(out)
}

/// The upstream being built for one EDS (or passthrough-only) cluster.
struct Building {
    spec: UpstreamSpec,
    /// The EDS cluster name (or the passthrough cluster's SNI).
    cluster: String,
    /// Which EDS assignment gives the endpoints of each target (see
    /// [`Slot`]): what an endpoint-only change replaces.
    feeds: Vec<(Slot, String)>,
    /// EDS assignments read by an HTTP upstream's route clusters: a change
    /// to one of them is translated in full.
    pinned: Vec<String>,
}

/// One target of an upstream: 0 = the primary, i = `failover[i - 1]`.
type Slot = usize;

/// An EDS assignment's endpoints as a spec takes them: addresses, and
/// weights when any is not 1.
fn endpoint_lists(eps: &[EndpointModel]) -> (Vec<SocketAddr>, Vec<u32>) {
    let addrs = eps.iter().map(|e| e.addr).collect();
    let weights = if eps.iter().any(|e| e.weight != 1) {
        eps.iter().map(|e| e.weight).collect()
    } else {
        Vec::new()
    };
    (addrs, weights)
}

/// Where each EDS assignment's endpoints went in a translated [`Spec`].
#[derive(Debug, Default)]
struct Feeds {
    /// EDS name -> (upstream index, target slot).
    targets: HashMap<String, Vec<(usize, Slot)>>,
    /// EDS names read where only a full translation places them.
    pinned: BTreeSet<String>,
}

/// Compiles the accepted resources into a [`Spec`]. `Incomplete` when a
/// part is still missing (see [`missing`]), or, even when `missing` is
/// empty, while a leaf rotates (clusters and the public listener carry
/// different leaves until both have arrived); `Inconsistent` when the
/// resources do not fit together; `Refused`/`Invalid` for a resource that
/// should not have been accepted.
pub fn translate(res: &Resources) -> Result<Spec, TranslateError> {
    translate_fed(res).map(|(spec, _)| spec)
}

/// [`translate`], telling where each EDS assignment's endpoints went.
fn translate_fed(res: &Resources) -> Result<(Spec, Feeds), TranslateError> {
    let m = missing(res);
    if !m.is_empty() {
        return Err(TranslateError::Incomplete(m));
    }
    let secrets = Secrets { res };
    let mut public = None;
    let mut outbound = Vec::new();
    let mut explicit = Vec::new();
    let mut exposes = Vec::new();
    for (name, l) in &res.listeners {
        match &l.model {
            ListenerModel::Public(p) => {
                if let Some((first, _)) = &public {
                    return Err(inconsistent(format!(
                        "listeners {first} and {name}: more than one public listener"
                    )));
                }
                public = Some((name.clone(), p));
            }
            ListenerModel::Outbound(o) => outbound.push((name.clone(), o)),
            ListenerModel::Upstream { addr, target } => {
                explicit.push((name.clone(), *addr, target))
            }
            ListenerModel::Expose(e) => exposes.push((name.clone(), e)),
        }
    }
    let Some((pname, public)) = public else {
        return Err(TranslateError::Incomplete(vec![
            "the public listener (LDS)".into(),
        ]));
    };
    let who = Who("listener", &pname);
    let leaf = secrets.leaf(&public.tls.leaf, who)?;
    let roots = secrets.roots(&public.tls.roots, who)?;
    let chain = &leaf.chain;
    let identity =
        veer_core::tls::peer_identity(&chain[0]).map_err(|e| TranslateError::Invalid {
            kind: "listener",
            name: pname.clone(),
            field: "filter_chains.transport_socket.common_tls_context.tls_certificates[0]".into(),
            reason: format!("the leaf certificate has no usable SPIFFE service identity: {e}"),
        })?;

    // Clusters by name (every referenced one is present: `missing`).
    let clusters = &res.clusters;
    let cluster = |name: &str| {
        clusters
            .get(name)
            .expect("missing() checked referenced clusters")
    };

    // The local app.
    let (local_app, local_connect) = match &cluster(&public.cluster).kind {
        ClusterKind::Static(a) => (*a, cluster(&public.cluster).connect_timeout),
        _ => {
            return Err(inconsistent(format!(
                "listener {pname}: tcp_proxy cluster {} is not a STATIC cluster with the local app's address",
                public.cluster
            )))
        }
    };
    let mut permissive_ports = Vec::new();
    for (port, c) in &public.permissive {
        if *c != public.cluster {
            return Err(inconsistent(format!(
                "listener {pname}: the permissive chain for port {port} goes to cluster {c}, not to the local app's {}; veer relays permissive connections to the local app only",
                public.cluster
            )));
        }
        permissive_ports.push(*port);
    }

    // The inbound listener at L7: requests are authorized by the HTTP RBAC
    // filters (none = all allowed, as in Envoy) after the network ones.
    let inbound_http = public.http.as_ref().map(|h| InboundHttp {
        protocol: h.protocol,
        rbac: Some(h.rbac.clone()),
        xfcc: h.xfcc,
        request_timeout: h.request_timeout,
    });

    // Every aggregate names existing clusters without a loop (checked for
    // all, so that a bad one is refused when it comes, not when a listener
    // first names it).
    for name in res.clusters.keys() {
        let name = name.as_str();
        if matches!(cluster(name).kind, ClusterKind::Aggregate(_)) {
            flatten(clusters, name, &mut Vec::new(), &mut Vec::new())?;
        }
    }

    // Upstreams.
    let no_endpoints: &[EndpointModel] = &[];
    let mut unapplied: Vec<Unapplied> = Vec::new();
    if let Some(h) = &public.http {
        for (f, d) in &h.notes {
            unapplied.push(Unapplied::unsupported(
                format!("listener {pname}: {f}"),
                d.clone(),
            ));
        }
    }
    let mut ups: Vec<Building> = Vec::new();
    let mut by_key: HashMap<(String, Option<u16>), usize> = HashMap::new();
    // One target: an EDS, DNS or passthrough cluster.
    let target = |cname: &str,
                  tls: &UpstreamTls,
                  model: &ClusterModel,
                  hosts: Hosts|
     -> Result<TargetSpec, TranslateError> {
        let who = Who("cluster", cname);
        let identity = tls
            .sans
            .iter()
            .find_map(|s| match &s.pattern {
                MatchPattern::Exact(u) if !s.ignore_case => ServiceId::parse(u).ok(),
                _ => None,
            })
            .ok_or_else(|| {
                inconsistent(format!(
                    "{who}: no exact SPIFFE service ID among its subject-alt-name matchers, so veer cannot tell whom it reaches"
                ))
            })?;
        let uleaf = secrets.leaf(&tls.leaf, who)?;
        if !Arc::ptr_eq(uleaf, leaf) && uleaf.chain != *chain {
            // Expected for a moment while a leaf rotates with inline PEM
            // (Consul sends clusters before listeners): wait for both.
            return Err(TranslateError::Incomplete(vec![format!(
                "{who} and listener {pname} to carry the same leaf certificate (its client certificate differs from the public listener's; veer has one identity)"
            )]));
        }
        let uroots = secrets.roots(&tls.roots, who)?;
        let mut t = TargetSpec::new(identity);
        t.sni = Some(tls.sni.clone());
        t.san_matchers = tls.sans.clone();
        t.roots = (!Arc::ptr_eq(uroots, roots) && uroots != roots).then(|| uroots.as_ref().clone());
        t.connect_timeout = model.connect_timeout;
        let (endpoints, weights) = match hosts {
            Hosts::None => (Vec::new(), Vec::new()),
            Hosts::Eds(eds) => {
                let eps: &[EndpointModel] = match res.endpoints.get(eds) {
                    Some(eps) => eps,
                    // Refused: no endpoints until a good version arrives.
                    None if res
                        .refused
                        .contains_key(&(Kind::Endpoints, eds.to_string())) =>
                    {
                        no_endpoints
                    }
                    None => {
                        return Err(TranslateError::Incomplete(vec![format!(
                            "endpoints {eds} (EDS)"
                        )]))
                    }
                };
                endpoint_lists(eps)
            }
            Hosts::Dns(dns) => {
                let eps = dns_endpoints(res, cname, dns)?;
                let weights = if eps.iter().any(|e| e.1 != 1) {
                    eps.iter().map(|e| e.1).collect()
                } else {
                    Vec::new()
                };
                (eps.iter().map(|e| e.0).collect(), weights)
            }
        };
        t.endpoints = endpoints;
        t.endpoint_weights = weights;
        Ok(t)
    };
    // The targets of an EDS, DNS or aggregate cluster in failover order
    // (an aggregate's members, the first one primary), and the first
    // member's model (its circuit breaker and protocol options).
    type Targets<'m> = (Vec<TargetSpec>, Vec<(Slot, String)>, &'m ClusterModel);
    let targets_of = |cname: &str| -> Result<Targets, TranslateError> {
        let leaves = match &cluster(cname).kind {
            ClusterKind::Aggregate(_) => {
                let mut out = Vec::new();
                flatten(clusters, cname, &mut Vec::new(), &mut out)?;
                out
            }
            _ => vec![cname],
        };
        let mut targets = Vec::new();
        let mut feeds = Vec::new();
        for (i, leaf) in leaves.iter().enumerate() {
            let m = cluster(leaf);
            if let ClusterKind::Eds { eds_name, .. } = &m.kind {
                if res.endpoints.contains_key(eds_name.as_str()) {
                    feeds.push((i, eds_name.clone()));
                }
            }
            let t = match &m.kind {
                // A failover target without an assignment has no
                // endpoints (see `missing`).
                ClusterKind::Eds { eds_name, tls }
                    if i > 0
                        && !res.endpoints.contains_key(eds_name.as_str())
                        && !res
                            .refused
                            .contains_key(&(Kind::Endpoints, eds_name.clone())) =>
                {
                    target(leaf, tls, m, Hosts::None)?
                }
                ClusterKind::Eds { eds_name, tls } => target(leaf, tls, m, Hosts::Eds(eds_name))?,
                ClusterKind::Dns { tls, dns } => target(leaf, tls, m, Hosts::Dns(dns))?,
                _ => {
                    return Err(TranslateError::Refused {
                        kind: "cluster",
                        name: cname.to_string(),
                        field: format!("cluster_type.typed_config.clusters[{i}]"),
                        reason: format!(
                            "cluster {leaf} is not an EDS or DNS upstream cluster; an aggregate's members must be"
                        ),
                    })
                }
            };
            targets.push(t);
        }
        Ok((targets, feeds, cluster(leaves[0])))
    };
    let upstream_of = |targets: Vec<TargetSpec>, model: &ClusterModel| -> UpstreamSpec {
        let mut targets = targets.into_iter();
        let primary = targets
            .next()
            .expect("an aggregate names at least one cluster");
        let mut spec = UpstreamSpec::new(primary.identity.clone());
        spec.set_primary(primary);
        spec.failover = targets.collect();
        spec.protocol = Protocol::Tcp;
        spec.max_connections = model.max_connections;
        spec
    };
    // The upstream of an EDS, DNS or aggregate cluster.
    let new_upstream = |ups: &mut Vec<Building>, cname: &str| -> Result<usize, TranslateError> {
        let (targets, feeds, model) = targets_of(cname)?;
        let spec = upstream_of(targets, model);
        ups.push(Building {
            spec,
            cluster: cname.to_string(),
            feeds,
            pinned: Vec::new(),
        });
        Ok(ups.len() - 1)
    };
    // An HTTP upstream: its routes' clusters become `HttpRoutes`; the
    // upstream's own (primary) target is the catch-all route's heaviest
    // cluster. Keyed `route:<name>` so that a VIP chain and an explicit
    // listener with the same routes share one upstream.
    let new_http_upstream = |ups: &mut Vec<Building>,
                             unapplied: &mut Vec<Unapplied>,
                             hcm: &Hcm,
                             who: &str|
     -> Result<usize, TranslateError> {
        let rm = routes_of(hcm, res).ok_or_else(|| {
            TranslateError::Incomplete(vec![format!("the routes named by {who} (RDS)")])
        })?;
        let rwho = match &hcm.routes {
            RouteSource::Rds(n) => format!("route {n}"),
            RouteSource::Inline(_) => format!("{who} route_config"),
        };
        for (f, d) in &rm.notes {
            unapplied.push(Unapplied::unsupported(format!("{rwho}: {f}"), d.clone()));
        }
        let names = rm.clusters();
        let mut clusters = Vec::new();
        let mut pinned = Vec::new();
        for n in &names {
            let cm = cluster(n);
            if !matches!(
                cm.kind,
                ClusterKind::Eds { .. } | ClusterKind::Dns { .. } | ClusterKind::Aggregate(_)
            ) {
                return Err(inconsistent(format!(
                    "{rwho}: routes to cluster {n}, which is not an EDS, DNS or aggregate upstream cluster"
                )));
            }
            let (targets, feeds, cm) = targets_of(n)?;
            pinned.extend(feeds.into_iter().map(|(_, eds)| eds));
            let protocol = match (cm.http2, hcm.protocol) {
                (true, Protocol::Grpc) => Protocol::Grpc,
                (true, _) => Protocol::Http2,
                (false, _) => Protocol::Http,
            };
            clusters.push((
                ClusterSpec {
                    name: n.clone(),
                    targets,
                    protocol,
                },
                cm,
            ));
        }
        let index = |n: &str| names.iter().position(|x| x == n).expect("listed");
        let routes: Vec<RouteSpec> = rm
            .routes
            .iter()
            .map(|r| RouteSpec {
                name: r.name.clone(),
                matches: r.matches.clone(),
                action: RouteAction {
                    clusters: r
                        .clusters
                        .iter()
                        .map(|(c, w)| WeightedCluster {
                            cluster: index(c),
                            weight: *w,
                        })
                        .collect(),
                    prefix_rewrite: r.prefix_rewrite.clone(),
                    timeout: r.timeout,
                    retry: r.retry.clone(),
                },
            })
            .collect();
        let catch_all = routes
            .iter()
            .rev()
            .find(|r| r.matches == Default::default())
            .or(routes.last());
        let primary = catch_all
            .and_then(|r| r.action.clusters.iter().max_by_key(|w| w.weight))
            .map_or(0, |w| w.cluster);
        if clusters.is_empty() {
            return Err(inconsistent(format!(
                "{rwho} (for {who}): no route sends requests anywhere, so veer cannot tell which service the upstream is"
            )));
        }
        let mut spec = upstream_of(clusters[primary].0.targets.clone(), clusters[primary].1);
        spec.protocol = hcm.protocol;
        spec.http = Some(HttpRoutes {
            clusters: clusters.into_iter().map(|(c, _)| c).collect(),
            routes,
        });
        ups.push(Building {
            spec,
            cluster: format!("route:{}", rm.name),
            feeds: Vec::new(),
            pinned,
        });
        Ok(ups.len() - 1)
    };
    let hcm_notes = |unapplied: &mut Vec<Unapplied>, who: &str, field: &str, hcm: &Hcm| {
        for (f, d) in &hcm.notes {
            unapplied.push(Unapplied::unsupported(
                format!("{who}: {field}.{f}"),
                d.clone(),
            ));
        }
    };
    let route_key = |hcm: &Hcm| -> String {
        match &hcm.routes {
            RouteSource::Rds(n) => format!("route:{n}"),
            RouteSource::Inline(rm) => format!("route:{}", rm.name),
        }
    };

    let mut outbound_addrs = Vec::new();
    let mut mesh_only: Option<bool> = None;
    // Passthrough chains are applied after the VIP chains, so that they find
    // the EDS upstream of the same SNI when there is one.
    let mut passthrough: Vec<(String, usize, Vec<IpAddr>, String)> = Vec::new();
    for (lname, o) in &outbound {
        outbound_addrs.push(o.addr);
        let only = match &o.default_cluster {
            None => true,
            Some(c) => match &cluster(c).kind {
                ClusterKind::OriginalDst(None) => false,
                _ => {
                    return Err(inconsistent(format!(
                        "listener {lname}: default_filter_chain goes to cluster {c}; only a plain ORIGINAL_DST (passthrough) cluster is supported there"
                    )))
                }
            },
        };
        if mesh_only.is_some_and(|m| m != only) {
            return Err(inconsistent(format!(
                "listener {lname}: outbound listeners disagree on whether non-mesh destinations pass through"
            )));
        }
        mesh_only = Some(only);
        for ch in &o.chains {
            let chname = match &ch.target {
                ChainTarget::Tcp(c) => c,
                ChainTarget::Http { hcm, field } => {
                    let who = format!("listener {lname}");
                    hcm_notes(
                        &mut unapplied,
                        &who,
                        &format!("filter_chains[{}].{field}", ch.index),
                        hcm,
                    );
                    let key = (route_key(hcm), ch.port);
                    let i = match by_key.get(&key) {
                        Some(i) => *i,
                        None => {
                            let i = new_http_upstream(&mut ups, &mut unapplied, hcm, &who)?;
                            ups[i].spec.destination_port = ch.port;
                            by_key.insert(key, i);
                            i
                        }
                    };
                    ups[i].spec.virtual_ips.extend(ch.ips.iter().copied());
                    continue;
                }
            };
            let cm = cluster(chname);
            match &cm.kind {
                ClusterKind::Eds { .. } | ClusterKind::Dns { .. } | ClusterKind::Aggregate(_) => {
                    let key = (chname.clone(), ch.port);
                    let i = match by_key.get(&key) {
                        Some(i) => *i,
                        None => {
                            let i = new_upstream(&mut ups, chname)?;
                            ups[i].spec.destination_port = ch.port;
                            by_key.insert(key, i);
                            i
                        }
                    };
                    ups[i].spec.virtual_ips.extend(ch.ips.iter().copied());
                }
                ClusterKind::OriginalDst(Some(tls)) => {
                    if ch.port.is_some() {
                        return Err(inconsistent(format!(
                            "listener {lname}: filter_chains[{}]: a dialed-directly chain matched on destination_port is not supported; veer matches instance IPs on any port",
                            ch.index
                        )));
                    }
                    passthrough.push((chname.clone(), ch.index, ch.ips.clone(), tls.sni.clone()));
                }
                ClusterKind::OriginalDst(None) => {
                    if only {
                        return Err(inconsistent(format!(
                            "listener {lname}: filter_chains[{}] passes {:?} through in plain TCP while the listener is for mesh destinations only; not supported",
                            ch.index, ch.ips
                        )));
                    }
                    // Same as the default chain: nothing to add.
                }
                ClusterKind::Static(_) => {
                    return Err(inconsistent(format!(
                        "listener {lname}: filter_chains[{}] goes to STATIC cluster {}; outbound chains go to upstreams",
                        ch.index, chname
                    )))
                }
            }
        }
    }
    for (cname, _index, ips, sni) in passthrough {
        let existing = ups.iter().position(|b| {
            b.spec.sni.as_deref() == Some(sni.as_str())
                && b.spec.local_bind.is_none()
                && b.spec.http.is_none()
        });
        let i = match existing {
            Some(i) => i,
            None => {
                let cm = cluster(&cname);
                let ClusterKind::OriginalDst(Some(tls)) = &cm.kind else {
                    unreachable!("collected from an ORIGINAL_DST cluster with TLS");
                };
                // The EDS cluster of the same name gives endpoints, when there is one.
                let eds = clusters.get(sni.as_str()).and_then(|m| match &m.kind {
                    ClusterKind::Eds { eds_name, .. } => Some(eds_name.as_str()),
                    _ => None,
                });
                let hosts = eds.map_or(Hosts::None, Hosts::Eds);
                let feeds = eds
                    .filter(|e| res.endpoints.contains_key(*e))
                    .map(|e| (0, e.to_string()))
                    .into_iter()
                    .collect();
                let t = target(&cname, tls, cm, hosts)?;
                let mut spec = UpstreamSpec::new(t.identity.clone());
                spec.set_primary(t);
                spec.protocol = Protocol::Tcp;
                spec.max_connections = cm.max_connections;
                ups.push(Building {
                    spec,
                    cluster: cname.clone(),
                    feeds,
                    pinned: Vec::new(),
                });
                ups.len() - 1
            }
        };
        ups[i].spec.dialed_directly = true;
        ups[i].spec.instances.extend(ips);
    }
    for (lname, addr, target) in &explicit {
        let who = format!("listener {lname}");
        let i = match target {
            ChainTarget::Tcp(cname) => {
                if !matches!(
                    cluster(cname).kind,
                    ClusterKind::Eds { .. } | ClusterKind::Dns { .. } | ClusterKind::Aggregate(_)
                ) {
                    return Err(inconsistent(format!(
                        "listener {lname}: tcp_proxy cluster {cname} is not an EDS, DNS or aggregate upstream cluster"
                    )));
                }
                let existing = ups
                    .iter()
                    .position(|b| b.cluster == *cname && b.spec.local_bind.is_none());
                match existing {
                    Some(i) => i,
                    None => new_upstream(&mut ups, cname)?,
                }
            }
            ChainTarget::Http { hcm, field } => {
                hcm_notes(
                    &mut unapplied,
                    &who,
                    &format!("filter_chains[0].{field}"),
                    hcm,
                );
                let key = route_key(hcm);
                let existing = ups
                    .iter()
                    .position(|b| b.cluster == key && b.spec.local_bind.is_none());
                match existing {
                    Some(i) => i,
                    None => new_http_upstream(&mut ups, &mut unapplied, hcm, &who)?,
                }
            }
        };
        ups[i].spec.local_bind = Some(*addr);
    }
    ups.sort_by(|a, b| {
        let (a, b) = (&a.spec, &b.spec);
        (
            &a.identity.service,
            &a.sni,
            a.destination_port,
            a.local_bind,
        )
            .cmp(&(
                &b.identity.service,
                &b.sni,
                b.destination_port,
                b.local_bind,
            ))
    });
    let mut feeds = Feeds::default();
    let mut upstreams = Vec::with_capacity(ups.len());
    for (i, b) in ups.into_iter().enumerate() {
        for (slot, eds) in b.feeds {
            feeds.targets.entry(eds).or_default().push((i, slot));
        }
        feeds.pinned.extend(b.pinned);
        upstreams.push(std::sync::Arc::new(b.spec));
    }

    // Exposed paths.
    let mut expose = Vec::new();
    for (lname, e) in &exposes {
        let ClusterKind::Static(a) = &cluster(&e.cluster).kind else {
            return Err(inconsistent(format!(
                "listener {lname}: route cluster {} is not a STATIC cluster",
                e.cluster
            )));
        };
        if a.ip() != IpAddr::from([127, 0, 0, 1]) {
            return Err(inconsistent(format!(
                "listener {lname}: route cluster {} is at {a}; veer serves exposed paths to 127.0.0.1 only",
                e.cluster
            )));
        }
        let mut p = ExposePath::new(e.addr, e.path.clone(), a.port());
        if e.http2 {
            p.protocol = Protocol::Http2;
        }
        expose.push(p);
    }

    let timeouts = Timeouts {
        local_connect: local_connect.unwrap_or(Timeouts::default().local_connect),
        ..Timeouts::default()
    };
    let spec = Spec {
        identity,
        roots: roots.as_ref().clone(),
        chain: chain.clone(),
        key: leaf.key.clone_key(),
        local_app,
        intentions: Vec::new(),
        default_action: Action::Deny,
        upstreams,
        mesh_destinations_only: mesh_only.unwrap_or(false),
        listen: ListenSpec {
            inbound: public.addr,
            outbound: outbound_addrs,
        },
        timeouts,
        source: SOURCE.to_string(),
        expose,
        rbac: Some(public.rbac.clone()),
        permissive_ports,
        inbound_max_connections: public
            .max_connections
            .map(|m| u32::try_from(m).unwrap_or(u32::MAX)),
        unapplied,
        inbound_http,
    };
    Ok((spec, feeds))
}

#[cfg(test)]
mod tests;

/// The translation as the ADS client's [`crate::ads::Check`]: one resource
/// is decoded and checked on its own, the whole store compiles into a
/// `Spec`; every refusal's text is what the NACK says.
///
/// It keeps the last spec it made, with where each EDS assignment's
/// endpoints went: when only endpoint assignments changed since (and each
/// feeds only TCP upstreams it placed), it replaces those targets'
/// endpoints in a copy of that spec instead of translating everything
/// again.
#[derive(Debug, Default)]
pub struct Translator {
    last: Option<(Spec, Feeds)>,
    counts: Counts,
}

/// What a [`Translator`] did, counted from its start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Whole translations (every upstream built).
    pub full: u64,
    /// Compiles that only replaced endpoints in the last spec.
    pub patched: u64,
    /// Targets whose endpoints those replaced.
    pub targets_patched: u64,
}

impl Translator {
    pub fn new() -> Translator {
        Translator::default()
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// The last spec with the endpoints of `names` replaced, when every
    /// one of them is held and feeds only targets the last translation
    /// placed; `None` = translate in full.
    fn patch(&mut self, res: &Resources, names: &BTreeSet<String>) -> Option<Spec> {
        let (spec, feeds) = self.last.as_mut()?;
        let placed = |n: &String| {
            res.endpoints.contains_key(n)
                && feeds.targets.contains_key(n)
                && !feeds.pinned.contains(n)
        };
        if !names.iter().all(placed) {
            return None;
        }
        for n in names {
            let (addrs, weights) = endpoint_lists(&res.endpoints[n]);
            for &(i, slot) in &feeds.targets[n] {
                let u = std::sync::Arc::make_mut(&mut spec.upstreams[i]);
                if slot == 0 {
                    u.endpoints = addrs.clone();
                    u.endpoint_weights = weights.clone();
                } else {
                    let t = &mut u.failover[slot - 1];
                    t.endpoints = addrs.clone();
                    t.endpoint_weights = weights.clone();
                }
                self.counts.targets_patched += 1;
            }
        }
        self.counts.patched += 1;
        Some(spec.clone())
    }
}

impl crate::ads::Check for Translator {
    type Models = crate::resources::Compact;
    fn check(&self, kind: Kind, name: &str, any: &Any) -> Result<Decoded, String> {
        decode(kind, name, any).map_err(|e| e.to_string())
    }
    fn wanted(&self, res: &Resources) -> Wanted {
        wanted(res)
    }
    fn shapes_wanted(&self, kind: Kind) -> bool {
        // (`wanted` reads listeners and clusters only.)
        matches!(kind, Kind::Listener | Kind::Cluster)
    }
    fn missing(&self, res: &Resources) -> Vec<String> {
        missing(res)
    }
    fn compile(&mut self, res: &Resources, since: &crate::ads::Changed) -> crate::ads::Compiled {
        use crate::ads::{Changed, Compiled};
        if let Changed::Endpoints(names) = since {
            if let Some(spec) = self.patch(res, names) {
                return Compiled::Ready(spec);
            }
        }
        let last = self.last.take();
        self.counts.full += 1;
        match translate_fed(res) {
            Ok((mut spec, feeds)) => {
                // Unchanged upstreams stay the ones the runtime's snapshot
                // was built from (known without comparing, not copied).
                if let Some((last, _)) = &last {
                    spec.share_upstreams_of(last);
                }
                self.last = Some((spec.clone(), feeds));
                Compiled::Ready(spec)
            }
            // Also what only the whole translation sees: a leaf in the
            // middle of a rotation (Consul sends the clusters before the
            // listeners) waits for the rest instead of being refused; a
            // NACK would make Consul drop the update.
            Err(TranslateError::Incomplete(waiting)) => Compiled::Waiting(waiting),
            Err(e) => Compiled::Refused(e.to_string()),
        }
    }
}
