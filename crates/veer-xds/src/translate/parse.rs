//! One resource on its own: decoded protobuf -> a small model of what veer
//! uses, or a [`Fault`] naming the field path and why it is refused.
//!
//! Everything veer cannot enforce is refused here, so that the ADS client
//! NACKs it before it can reach a snapshot. The models are what
//! [`super::translate`] joins into a `Spec`.
use super::http::{Hcm, Note, RouteSource, Side};
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, data_source, socket_address, Address, DataSource, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac, Principal as PbPrincipal,
};
use envoy_types::pb::envoy::config::route::v3::{route, route_action, route_match};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, tls_parameters, CommonTlsContext, DownstreamTlsContext, Secret,
    SubjectAltNameMatcher, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::{Message, Name};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use veer_core::authz::{MatchPattern, Principal, RbacPolicy, RbacRules, StringMatch};
use veer_core::intentions::Action;
use veer_core::l7::RbacPermission;
use veer_core::l7::Xfcc;
use veer_core::route::Protocol;

/// Why one field of one resource is refused; the resource is named by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fault {
    /// The field path inside the resource, e.g. `filter_chains[0].filters[1]`.
    pub field: String,
    pub reason: String,
    /// True when the field is well-formed but asks for something veer does
    /// not enforce (refused); false when it is malformed (invalid).
    pub unsupported: bool,
}

impl Fault {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Fault {
        Fault {
            field: field.to_string(),
            reason: reason.into(),
            unsupported: false,
        }
    }
    pub fn refused(field: &str, reason: impl Into<String>) -> Fault {
        Fault {
            field: field.to_string(),
            reason: reason.into(),
            unsupported: true,
        }
    }
    /// Prepends a path segment: `filters[1]` + `typed_config` ->
    /// `filters[1].typed_config`.
    pub fn at(mut self, seg: impl AsRef<str>) -> Fault {
        let seg = seg.as_ref();
        self.field = if self.field.is_empty() {
            seg.to_string()
        } else {
            format!("{seg}.{}", self.field)
        };
        self
    }
}

type R<T> = Result<T, Fault>;

/// Extends results with [`Fault::at`].
pub(crate) trait At<T> {
    fn at(self, seg: impl AsRef<str>) -> R<T>;
}

impl<T> At<T> for R<T> {
    fn at(self, seg: impl AsRef<str>) -> R<T> {
        self.map_err(|f| f.at(seg))
    }
}

// ---------------------------------------------------------------- models
//
// What the ADS client keeps of each accepted resource (see
// `crate::resources::Compact`): a few hundred bytes where the decoded
// protobuf took kilobytes. Certificates and keys given inline (Consul
// repeats the same leaf and roots in every cluster) are shared between
// resources through [`share_leaf`] and [`share_roots`].

/// A leaf certificate chain and its private key.
#[derive(Debug)]
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl PartialEq for Leaf {
    fn eq(&self, o: &Leaf) -> bool {
        self.chain == o.chain && self.key.secret_der() == o.key.secret_der()
    }
}

impl Eq for Leaf {}

/// Trusted roots given inline.
pub type InlineRoots = Arc<Vec<CertificateDer<'static>>>;

/// Where a leaf certificate and key come from.
#[derive(Clone, Debug, PartialEq)]
pub enum LeafSource {
    Inline(Arc<Leaf>),
    /// `tls_certificate_sds_secret_configs[0].name` (Consul: `connect-leaf`).
    Sds(String),
}

/// Where trusted roots come from.
#[derive(Clone, Debug, PartialEq)]
pub enum RootsSource {
    Inline(InlineRoots),
    /// `validation_context_sds_secret_config.name` (Consul: `connect-root`).
    Sds(String),
}

/// The live inline leaves and root sets, by content: equal ones decoded
/// from different resources are one allocation. Weak, so that a rotated
/// leaf is freed with the last resource that held it.
struct Pool<T: ?Sized> {
    live: Mutex<Vec<Weak<T>>>,
}

impl<T: PartialEq> Pool<T> {
    const fn new() -> Pool<T> {
        Pool {
            live: Mutex::new(Vec::new()),
        }
    }

    fn share(&self, v: T) -> Arc<T> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|w| w.strong_count() > 0);
        if let Some(a) = live.iter().filter_map(Weak::upgrade).find(|a| **a == v) {
            return a;
        }
        let a = Arc::new(v);
        live.push(Arc::downgrade(&a));
        a
    }
}

static LEAVES: Pool<Leaf> = Pool::new();
static ROOTS: Pool<Vec<CertificateDer<'static>>> = Pool::new();

/// `leaf`, shared with every equal one held elsewhere.
pub(crate) fn share_leaf(leaf: Leaf) -> Arc<Leaf> {
    LEAVES.share(leaf)
}

/// `roots`, shared with every equal set held elsewhere.
pub(crate) fn share_roots(roots: Vec<CertificateDer<'static>>) -> InlineRoots {
    ROOTS.share(roots)
}

#[derive(Clone, Debug, PartialEq)]
pub struct DownstreamTls {
    pub leaf: LeafSource,
    pub roots: RootsSource,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamTls {
    pub leaf: LeafSource,
    pub roots: RootsSource,
    pub sni: String,
    /// URI SAN matchers (`match_subject_alt_names` and URI-typed
    /// `match_typed_subject_alt_names`); empty = any identity the roots sign.
    pub sans: Vec<StringMatch>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PublicListener {
    pub addr: SocketAddr,
    pub tls: DownstreamTls,
    pub rbac: Vec<RbacRules>,
    pub max_connections: Option<u64>,
    /// The cluster `tcp_proxy` (or the HCM's one route) forwards to
    /// (Consul: `local_app`).
    pub cluster: String,
    /// Permissive mTLS: (destination port, cluster) of plain chains.
    pub permissive: Vec<(u16, String)>,
    /// An HTTP connection manager instead of `tcp_proxy`.
    pub http: Option<InboundHcm>,
}

/// The public listener's HTTP connection manager.
#[derive(Clone, Debug, PartialEq)]
pub struct InboundHcm {
    pub protocol: Protocol,
    pub rbac: Vec<RbacRules>,
    pub xfcc: Xfcc,
    /// The one route's timeout (Consul `local_request_timeout_ms`).
    pub request_timeout: Option<Duration>,
    /// (field path from the listener, detail).
    pub notes: Vec<Note>,
}

/// What an outbound chain runs.
#[derive(Clone, Debug, PartialEq)]
pub enum ChainTarget {
    /// `tcp_proxy` to this cluster.
    Tcp(String),
    /// An HTTP connection manager; `field` is its path in the listener.
    Http { hcm: Box<Hcm>, field: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutboundChain {
    pub index: usize,
    pub ips: Vec<IpAddr>,
    pub port: Option<u16>,
    pub target: ChainTarget,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutboundListener {
    pub addr: SocketAddr,
    pub chains: Vec<OutboundChain>,
    /// `default_filter_chain`'s cluster; `None` = mesh destinations only.
    pub default_cluster: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposeListener {
    pub addr: SocketAddr,
    pub path: String,
    pub cluster: String,
    pub http2: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ListenerModel {
    Public(PublicListener),
    Outbound(OutboundListener),
    /// An explicit upstream's listener: everything to one cluster, or
    /// HTTP routes.
    Upstream {
        addr: SocketAddr,
        target: ChainTarget,
    },
    Expose(ExposeListener),
}

/// An accepted listener as the ADS client keeps it: its model and the RDS
/// route names its HTTP connection managers ask for.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerEntry {
    pub model: ListenerModel,
    pub rds: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ClusterKind {
    /// `STATIC` with exactly one endpoint, no TLS (`local_app`, `exposed_cluster_<port>`).
    Static(SocketAddr),
    /// `EDS` over mTLS; `eds_name` is what EDS is requested by.
    Eds { eds_name: String, tls: UpstreamTls },
    /// `ORIGINAL_DST`: plain (`original-destination`) or with the
    /// upstream's mTLS context (`passthrough~<sni>`).
    OriginalDst(Option<UpstreamTls>),
    /// `envoy.clusters.aggregate`: the clusters it names, in failover
    /// order (Consul's `failover-target~<i>~<name>` clusters).
    Aggregate(Vec<String>),
    /// `STRICT_DNS`/`LOGICAL_DNS` over mTLS (Consul: a mesh gateway or a
    /// peer's gateway known by hostname): its hosts are resolved by the
    /// source and fed in (`Resources::dns`).
    Dns { tls: UpstreamTls, dns: DnsModel },
}

/// The hosts of a DNS cluster and how their addresses are used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsModel {
    pub hosts: Vec<DnsHost>,
    /// `LOGICAL_DNS`: one host, its first address only; `STRICT_DNS`: every
    /// address of every host.
    pub logical: bool,
    pub family: DnsFamily,
    /// `dns_refresh_rate` (Envoy's default 5 s when unset).
    pub refresh: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsHost {
    /// A hostname (or an IP literal, which needs no resolution).
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

/// `dns_lookup_family`: which resolved addresses are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsFamily {
    /// IPv6 when the name has any, else IPv4 (Envoy's `AUTO`).
    Auto,
    V4Only,
    V6Only,
    /// IPv4 when the name has any, else IPv6.
    V4Preferred,
    All,
}

impl DnsFamily {
    /// The addresses of `ips` this family uses, in order.
    pub fn pick(self, ips: &[IpAddr]) -> Vec<IpAddr> {
        let v4 = || {
            ips.iter()
                .copied()
                .filter(IpAddr::is_ipv4)
                .collect::<Vec<_>>()
        };
        let v6 = || {
            ips.iter()
                .copied()
                .filter(IpAddr::is_ipv6)
                .collect::<Vec<_>>()
        };
        match self {
            DnsFamily::All => ips.to_vec(),
            DnsFamily::V4Only => v4(),
            DnsFamily::V6Only => v6(),
            DnsFamily::Auto => Some(v6()).filter(|v| !v.is_empty()).unwrap_or_else(v4),
            DnsFamily::V4Preferred => Some(v4()).filter(|v| !v.is_empty()).unwrap_or_else(v6),
        }
    }
}

/// Envoy's `dns_refresh_rate` default.
pub const DNS_REFRESH_DEFAULT: Duration = Duration::from_secs(5);
/// veer resolves no more often than this, whatever a cluster asks.
pub const DNS_REFRESH_MIN: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterModel {
    pub kind: ClusterKind,
    /// HTTP/2 to its endpoints when routes send requests to it
    /// (`HttpProtocolOptions.explicit_http_config.http2_protocol_options`).
    pub http2: bool,
    pub connect_timeout: Option<Duration>,
    pub max_connections: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    pub addr: SocketAddr,
    pub weight: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SecretModel {
    Leaf(Arc<Leaf>),
    Roots(InlineRoots),
}

// ---------------------------------------------------------------- helpers

pub(crate) fn unpack<T: Message + Name + Default>(any: &Any, field: &str) -> R<T> {
    if any.type_url != T::type_url() {
        return Err(Fault::invalid(
            field,
            format!(
                "type URL {:?} where {} was expected",
                any.type_url,
                T::type_url()
            ),
        ));
    }
    T::decode(any.value.as_slice())
        .map_err(|e| Fault::invalid(field, format!("cannot decode {}: {e}", T::full_name())))
}

pub(crate) fn socket_addr(a: Option<&Address>) -> R<SocketAddr> {
    let Some(a) = a else {
        return Err(Fault::invalid("", "no address"));
    };
    match &a.address {
        Some(address::Address::SocketAddress(sa)) => {
            if sa.protocol != 0 {
                return Err(Fault::refused(
                    "socket_address.protocol",
                    "only TCP socket addresses are supported",
                ));
            }
            if !sa.resolver_name.is_empty() {
                return Err(Fault::refused(
                    "socket_address.resolver_name",
                    "custom resolvers are not supported",
                ));
            }
            let ip: IpAddr = sa.address.parse().map_err(|_| {
                Fault::invalid(
                    "socket_address.address",
                    format!("{:?} is not an IP address", sa.address),
                )
            })?;
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => {
                    u16::try_from(p).map_err(|_| {
                        Fault::invalid("socket_address.port_value", format!("{p} is not a port"))
                    })?
                }
                Some(socket_address::PortSpecifier::NamedPort(_)) => {
                    return Err(Fault::refused(
                        "socket_address.named_port",
                        "named ports are not supported",
                    ))
                }
                None => return Err(Fault::invalid("socket_address.port_value", "no port")),
            };
            Ok(SocketAddr::new(ip, port))
        }
        Some(address::Address::Pipe(_)) => Err(Fault::refused(
            "pipe",
            "unix-socket addresses are not supported here",
        )),
        Some(address::Address::EnvoyInternalAddress(_)) => Err(Fault::refused(
            "envoy_internal_address",
            "Envoy internal addresses are not supported",
        )),
        None => Err(Fault::invalid("", "no address")),
    }
}

fn duration(d: &PbDuration, field: &str) -> R<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Fault::invalid(field, "negative or malformed duration"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn data_bytes(d: Option<&DataSource>, field: &str) -> R<Vec<u8>> {
    match d.and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineString(s)) => Ok(s.as_bytes().to_vec()),
        Some(data_source::Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(data_source::Specifier::Filename(_)) => Err(Fault::refused(
            &format!("{field}.filename"),
            "only inline data sources are supported (Consul sends inline PEM or SDS)",
        )),
        Some(data_source::Specifier::EnvironmentVariable(_)) => Err(Fault::refused(
            &format!("{field}.environment_variable"),
            "only inline data sources are supported (Consul sends inline PEM or SDS)",
        )),
        None => Err(Fault::invalid(field, "empty data source")),
    }
}

fn certs(d: Option<&DataSource>, field: &str) -> R<Vec<CertificateDer<'static>>> {
    let b = data_bytes(d, field)?;
    veer_core::tls::parse_certs(&b, field).map_err(|e| Fault::invalid(field, e.to_string()))
}

fn key(d: Option<&DataSource>, field: &str) -> R<PrivateKeyDer<'static>> {
    let b = data_bytes(d, field)?;
    veer_core::tls::parse_key(&b, field).map_err(|e| Fault::invalid(field, e.to_string()))
}

pub(crate) fn matcher(m: &StringMatcher) -> R<StringMatch> {
    use string_matcher::MatchPattern as P;
    let pattern = match &m.match_pattern {
        Some(P::Exact(s)) => MatchPattern::Exact(s.clone()),
        Some(P::Prefix(s)) => MatchPattern::Prefix(s.clone()),
        Some(P::Suffix(s)) => MatchPattern::Suffix(s.clone()),
        Some(P::Contains(s)) => MatchPattern::Contains(s.clone()),
        Some(P::SafeRegex(r)) => {
            if r.regex.is_empty() {
                return Err(Fault::invalid("safe_regex.regex", "empty regex"));
            }
            MatchPattern::SafeRegex(r.regex.clone())
        }
        Some(P::Custom(c)) => {
            return Err(Fault::refused(
                "custom",
                format!("custom string matcher {:?} is not supported", c.name),
            ))
        }
        None => return Err(Fault::invalid("", "string matcher has no pattern")),
    };
    let sm = StringMatch {
        pattern,
        ignore_case: m.ignore_case,
    };
    // Compiled here only to refuse what veer cannot compile (a bad or huge
    // regex); the snapshot compiles it again for use.
    sm.compile()
        .map_err(|e| Fault::invalid("safe_regex.regex", e.to_string()))?;
    Ok(sm)
}

/// A reason for a filter veer refuses, by its type URL.
fn refused_filter_reason(name: &str, url: &str) -> String {
    let t = url.rsplit('/').next().unwrap_or(url);
    let what = if name.is_empty() { t } else { name };
    if t.contains("http_connection_manager") {
        format!("{what} (HTTP, L7) is not supported here; only as the last filter of a chain")
    } else if t.contains("ext_authz")
        || t.contains("jwt_authn")
        || t.contains(".lua.")
        || t.contains("wasm")
    {
        format!("{what} is not enforced by veer")
    } else if t.contains("tls_inspector")
        || t.contains("sni_cluster")
        || t.contains("http_inspector")
    {
        format!("{what} is used for terminating-gateway destinations, which veer does not support")
    } else {
        format!("{what} ({t}) is not a filter veer knows; refusing it rather than skipping it")
    }
}

fn filter_any<'a>(f: &'a Filter, at: &str) -> R<&'a Any> {
    match &f.config_type {
        Some(filter::ConfigType::TypedConfig(a)) => Ok(a),
        Some(filter::ConfigType::ConfigDiscovery(_)) => Err(Fault::refused(
            at,
            format!("{}: filter config discovery is not supported", f.name),
        )),
        None => Err(Fault::refused(
            at,
            format!("{}: a filter without typed_config is not supported", f.name),
        )),
    }
}

fn transport_tls<'a>(ts: &'a TransportSocket, want: &str) -> R<&'a Any> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    match &ts.config_type {
        Some(ConfigType::TypedConfig(a)) if a.type_url == want => Ok(a),
        Some(ConfigType::TypedConfig(a)) => Err(Fault::refused(
            "transport_socket",
            format!(
                "transport socket {:?} ({}) is not supported; only tls ({want})",
                ts.name, a.type_url
            ),
        )),
        None => Err(Fault::refused(
            "transport_socket",
            format!("transport socket {:?} has no typed_config", ts.name),
        )),
    }
}

/// The one `tcp_proxy` cluster of a filter.
fn tcp_proxy_cluster(any: &Any) -> R<String> {
    let tp: TcpProxy = unpack(any, "typed_config")?;
    if tp.tunneling_config.is_some() {
        return Err(Fault::refused(
            "typed_config.tunneling_config",
            "tcp_proxy tunneling is not supported",
        ));
    }
    if tp.metadata_match.is_some() {
        return Err(Fault::refused(
            "typed_config.metadata_match",
            "subset load balancing is not supported",
        ));
    }
    match tp.cluster_specifier {
        Some(tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => Ok(c),
        Some(tcp_proxy::ClusterSpecifier::WeightedClusters(_)) => Err(Fault::refused(
            "typed_config.weighted_clusters",
            "weighted tcp_proxy clusters are not supported (discovery-chain splits)",
        )),
        _ => Err(Fault::invalid("typed_config.cluster", "no cluster")),
    }
}

fn common_tls(c: Option<&CommonTlsContext>) -> R<(LeafSource, RootsSource, Vec<StringMatch>)> {
    let Some(c) = c else {
        return Err(Fault::invalid("common_tls_context", "missing"));
    };
    let at = "common_tls_context";
    if let Some(p) = &c.tls_params {
        use tls_parameters::TlsProtocol as V;
        let min = p.tls_minimum_protocol_version;
        if min == V::TlSv13 as i32 {
            return Err(Fault::refused(
                &format!("{at}.tls_params.tls_minimum_protocol_version"),
                "a TLS 1.3 minimum is not enforced by veer (it accepts TLS 1.2 and 1.3)",
            ));
        }
        if !p.cipher_suites.is_empty() {
            return Err(Fault::refused(
                &format!("{at}.tls_params.cipher_suites"),
                "a cipher suite list is not enforced by veer (rustls's defaults apply)",
            ));
        }
        if !p.ecdh_curves.is_empty() || !p.signature_algorithms.is_empty() {
            return Err(Fault::refused(
                &format!("{at}.tls_params"),
                "ECDH curve and signature algorithm lists are not enforced by veer",
            ));
        }
    }
    let leaf = match (
        c.tls_certificates.as_slice(),
        c.tls_certificate_sds_secret_configs.as_slice(),
    ) {
        ([t], []) => LeafSource::Inline(share_leaf(Leaf {
            chain: certs(
                t.certificate_chain.as_ref(),
                &format!("{at}.tls_certificates[0].certificate_chain"),
            )?,
            key: key(
                t.private_key.as_ref(),
                &format!("{at}.tls_certificates[0].private_key"),
            )?,
        })),
        ([], [s]) => {
            if s.name.is_empty() {
                return Err(Fault::invalid(
                    &format!("{at}.tls_certificate_sds_secret_configs[0].name"),
                    "empty secret name",
                ));
            }
            LeafSource::Sds(s.name.clone())
        }
        ([], []) => {
            return Err(Fault::invalid(
                &format!("{at}.tls_certificates"),
                "no certificate (inline or SDS)",
            ))
        }
        _ => {
            return Err(Fault::refused(
                &format!("{at}.tls_certificates"),
                "more than one certificate is not supported",
            ))
        }
    };
    use common_tls_context::ValidationContextType as V;
    let (roots, sans) = match &c.validation_context_type {
        Some(V::ValidationContext(v)) => {
            let vat = format!("{at}.validation_context");
            let roots = RootsSource::Inline(share_roots(certs(
                v.trusted_ca.as_ref(),
                &format!("{vat}.trusted_ca"),
            )?));
            (roots, validation_sans(v, &vat)?)
        }
        Some(V::ValidationContextSdsSecretConfig(s)) => (RootsSource::Sds(s.name.clone()), vec![]),
        Some(V::CombinedValidationContext(cv)) => {
            let vat = format!("{at}.combined_validation_context");
            let Some(sds) = &cv.validation_context_sds_secret_config else {
                return Err(Fault::invalid(
                    &format!("{vat}.validation_context_sds_secret_config"),
                    "missing",
                ));
            };
            let sans = match &cv.default_validation_context {
                Some(v) => {
                    if v.trusted_ca.is_some() {
                        return Err(Fault::refused(
                            &format!("{vat}.default_validation_context.trusted_ca"),
                            "trusted_ca both inline and from SDS is not supported",
                        ));
                    }
                    validation_sans(v, &format!("{vat}.default_validation_context"))?
                }
                None => vec![],
            };
            (RootsSource::Sds(sds.name.clone()), sans)
        }
        Some(_) => {
            return Err(Fault::refused(
                &format!("{at}.validation_context_type"),
                "certificate-provider validation contexts are not supported",
            ))
        }
        None => {
            return Err(Fault::refused(
                &format!("{at}.validation_context"),
                "no validation context: veer always verifies peers against trusted roots",
            ))
        }
    };
    Ok((leaf, roots, sans))
}

#[allow(deprecated)] // Consul v1.16 sends `match_subject_alt_names`.
fn validation_sans(
    v: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CertificateValidationContext,
    at: &str,
) -> R<Vec<StringMatch>> {
    if !v.verify_certificate_spki.is_empty() || !v.verify_certificate_hash.is_empty() {
        return Err(Fault::refused(
            &format!("{at}.verify_certificate_hash"),
            "certificate pinning is not enforced by veer",
        ));
    }
    if v.crl.is_some() {
        return Err(Fault::refused(
            &format!("{at}.crl"),
            "CRLs are not enforced by veer",
        ));
    }
    if v.allow_expired_certificate {
        return Err(Fault::refused(
            &format!("{at}.allow_expired_certificate"),
            "veer never accepts expired certificates",
        ));
    }
    if v.custom_validator_config.is_some() {
        return Err(Fault::refused(
            &format!("{at}.custom_validator_config"),
            "custom certificate validators (SPIFFE bundles) are not supported",
        ));
    }
    let mut sans = Vec::new();
    for (i, m) in v.match_subject_alt_names.iter().enumerate() {
        sans.push(matcher(m).at(format!("{at}.match_subject_alt_names[{i}]"))?);
    }
    for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
        sans.push(typed_san(m).at(format!("{at}.match_typed_subject_alt_names[{i}]"))?);
    }
    Ok(sans)
}

fn typed_san(m: &SubjectAltNameMatcher) -> R<StringMatch> {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::subject_alt_name_matcher::SanType;
    if m.san_type != SanType::Uri as i32 {
        return Err(Fault::refused(
            "san_type",
            "only URI SAN matchers are supported (Consul identities are SPIFFE URIs)",
        ));
    }
    let Some(sm) = &m.matcher else {
        return Err(Fault::invalid("matcher", "missing"));
    };
    matcher(sm).at("matcher")
}

pub(crate) fn downstream_tls(any: &Any) -> R<DownstreamTls> {
    let d: DownstreamTlsContext = unpack(any, "typed_config")?;
    if d.require_client_certificate.as_ref().map(|b| b.value) != Some(true) {
        return Err(Fault::refused(
            "typed_config.require_client_certificate",
            "the public listener must require a client certificate (mTLS); veer always does and will not serve it otherwise",
        ));
    }
    let (leaf, roots, sans) = common_tls(d.common_tls_context.as_ref()).at("typed_config")?;
    if !sans.is_empty() {
        return Err(Fault::refused(
            "typed_config.common_tls_context.validation_context.match_subject_alt_names",
            "SAN matching on the public listener is not enforced by veer (authorization is by RBAC or intentions)",
        ));
    }
    Ok(DownstreamTls { leaf, roots })
}

pub(crate) fn upstream_tls(ts: &TransportSocket) -> R<UpstreamTls> {
    let any = transport_tls(ts, &UpstreamTlsContext::type_url())?;
    let u: UpstreamTlsContext = unpack(any, "transport_socket.typed_config")?;
    let (leaf, roots, sans) =
        common_tls(u.common_tls_context.as_ref()).at("transport_socket.typed_config")?;
    if u.sni.is_empty() {
        return Err(Fault::invalid(
            "transport_socket.typed_config.sni",
            "empty SNI",
        ));
    }
    Ok(UpstreamTls {
        leaf,
        roots,
        sni: u.sni,
        sans,
    })
}

// ---------------------------------------------------------------- RBAC

#[allow(deprecated)] // `source_ip` is named to refuse it.
pub(crate) fn who(p: &PbPrincipal, depth: usize) -> R<Principal> {
    use principal::Identifier as I;
    if depth > 32 {
        return Err(Fault::invalid("", "principals nested too deeply"));
    }
    let set = |ids: &[PbPrincipal], name: &str| -> R<Vec<Principal>> {
        ids.iter()
            .enumerate()
            .map(|(i, p)| who(p, depth + 1).at(format!("{name}.ids[{i}]")))
            .collect()
    };
    Ok(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::Any(false)) => return Err(Fault::invalid("any", "must be true")),
        Some(I::Authenticated(a)) => Principal::Authenticated {
            principal_name: match &a.principal_name {
                Some(m) => Some(matcher(m).at("authenticated.principal_name")?),
                None => None,
            },
        },
        Some(I::AndIds(s)) => Principal::AndIds(set(&s.ids, "and_ids")?),
        Some(I::OrIds(s)) => Principal::OrIds(set(&s.ids, "or_ids")?),
        Some(I::NotId(n)) => Principal::NotId(Box::new(who(n, depth + 1).at("not_id")?)),
        Some(other) => {
            let what = match other {
                I::SourceIp(_) | I::DirectRemoteIp(_) | I::RemoteIp(_) => "IP",
                I::Header(_) | I::UrlPath(_) => "HTTP (L7)",
                _ => "metadata or custom",
            };
            return Err(Fault::refused(
                "",
                format!("{what} principals are not enforced by veer; only any, authenticated, and_ids, or_ids and not_id"),
            ));
        }
        None => return Err(Fault::invalid("", "principal has no identifier")),
    })
}

/// A network `rbac` filter: `None` when it has no `rules` (enforces nothing).
pub(crate) fn network_rbac(any: &Any) -> R<Option<RbacRules>> {
    let r: NetworkRbac = unpack(any, "typed_config")?;
    if r.matcher.is_some() {
        return Err(Fault::refused(
            "typed_config.matcher",
            "the RBAC matcher API is not supported; only rules",
        ));
    }
    if r.enforcement_type != 0 {
        return Err(Fault::refused(
            "typed_config.enforcement_type",
            "CONTINUOUS enforcement is not supported; veer decides once per connection",
        ));
    }
    // shadow_rules / shadow_matcher only record what would happen: ignored.
    let Some(rules) = r.rules else {
        return Ok(None);
    };
    rbac_rules(&rules, |perm| {
        if matches!(perm.rule, Some(permission::Rule::Any(true))) {
            Ok(RbacPermission::Any)
        } else {
            Err(Fault::refused(
                "",
                "only the permission `any: true` is enforced at L4 (L7 permissions need the HTTP path)",
            ))
        }
    })
    .map(Some)
}

/// The `rules` of a network or HTTP `rbac` filter; `permission` reads one
/// permission (the network filter takes `any` only). A policy whose
/// permissions include `any` is stored with none (= any).
pub(crate) fn rbac_rules(
    rules: &envoy_types::pb::envoy::config::rbac::v3::Rbac,
    permission: impl Fn(&envoy_types::pb::envoy::config::rbac::v3::Permission) -> R<RbacPermission>,
) -> R<RbacRules> {
    let action = match rbac::Action::try_from(rules.action) {
        Ok(rbac::Action::Allow) => Action::Allow,
        Ok(rbac::Action::Deny) => Action::Deny,
        _ => {
            return Err(Fault::refused(
                "typed_config.rules.action",
                "only ALLOW and DENY RBAC actions are supported",
            ))
        }
    };
    let mut names: Vec<&String> = rules.policies.keys().collect();
    names.sort();
    let mut policies = Vec::new();
    for name in names {
        let p = &rules.policies[name];
        let at = format!("typed_config.rules.policies[{name:?}]");
        if p.condition.is_some() || p.checked_condition.is_some() {
            return Err(Fault::refused(
                &format!("{at}.condition"),
                "CEL conditions are not enforced by veer",
            ));
        }
        if p.permissions.is_empty() {
            return Err(Fault::invalid(
                &format!("{at}.permissions"),
                "no permissions",
            ));
        }
        let mut perms = Vec::new();
        for (i, perm) in p.permissions.iter().enumerate() {
            perms.push(permission(perm).at(format!("{at}.permissions[{i}]"))?);
        }
        if perms.contains(&RbacPermission::Any) {
            perms.clear();
        }
        if p.principals.is_empty() {
            return Err(Fault::invalid(&format!("{at}.principals"), "no principals"));
        }
        let mut whos = Vec::new();
        for (i, pr) in p.principals.iter().enumerate() {
            whos.push(who(pr, 0).at(format!("{at}.principals[{i}]"))?);
        }
        policies.push(RbacPolicy {
            name: name.clone(),
            principals: whos,
            permissions: perms,
        });
    }
    Ok(RbacRules { action, policies })
}

// ---------------------------------------------------------------- listeners

fn check_listener_filters(l: &Listener, need_original_dst: bool) -> R<bool> {
    let mut original_dst = false;
    for (i, lf) in l.listener_filters.iter().enumerate() {
        let at = format!("listener_filters[{i}]");
        let url = match &lf.config_type {
            Some(listener_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
            _ => {
                return Err(Fault::refused(
                    &at,
                    format!(
                        "{}: a listener filter without typed_config is not supported",
                        lf.name
                    ),
                ))
            }
        };
        if url == OriginalDst::type_url() {
            if lf.filter_disabled.is_some() {
                return Err(Fault::refused(
                    &format!("{at}.filter_disabled"),
                    "conditionally disabled listener filters are not supported",
                ));
            }
            original_dst = true;
        } else {
            return Err(Fault::refused(&at, refused_filter_reason(&lf.name, url)));
        }
    }
    if need_original_dst && !original_dst {
        return Err(Fault::refused(
            "listener_filters",
            "an outbound listener without envoy.filters.listener.original_dst is not supported",
        ));
    }
    if l.use_original_dst.as_ref().is_some_and(|b| b.value) {
        return Err(Fault::refused(
            "use_original_dst",
            "listener hand-off by original destination is not supported",
        ));
    }
    Ok(original_dst)
}

/// A chain's only filter must be a `tcp_proxy`; returns its cluster.
fn single_tcp_proxy(c: &FilterChain) -> R<String> {
    match c.filters.as_slice() {
        [f] => {
            let any = filter_any(f, "filters[0]")?;
            if any.type_url == TcpProxy::type_url() {
                tcp_proxy_cluster(any).at("filters[0]")
            } else {
                Err(Fault::refused(
                    "filters[0]",
                    refused_filter_reason(&f.name, &any.type_url),
                ))
            }
        }
        [] => Err(Fault::invalid("filters", "no filters")),
        [_, rest @ ..] => {
            for (i, f) in c.filters.iter().enumerate() {
                let any = filter_any(f, &format!("filters[{i}]"))?;
                if any.type_url != TcpProxy::type_url() {
                    return Err(Fault::refused(
                        &format!("filters[{i}]"),
                        refused_filter_reason(&f.name, &any.type_url),
                    ));
                }
            }
            Err(Fault::invalid(
                &format!("filters[{}]", rest.len()),
                "more than one tcp_proxy in a chain",
            ))
        }
    }
}

/// A chain's only filter: a `tcp_proxy` or an HTTP connection manager.
fn chain_target(c: &FilterChain) -> R<ChainTarget> {
    if let [f] = c.filters.as_slice() {
        let any = filter_any(f, "filters[0]")?;
        if any.type_url == HttpConnectionManager::type_url() {
            let hcm = super::http::hcm(any, Side::Outbound).at("filters[0]")?;
            return Ok(ChainTarget::Http {
                hcm: Box::new(hcm),
                field: "filters[0].typed_config".into(),
            });
        }
    }
    single_tcp_proxy(c).map(ChainTarget::Tcp)
}

fn no_match_beyond(m: &FilterChainMatch, allow_prefix: bool, allow_port: bool) -> R<()> {
    let bad = |f: &str, why: &str| Err(Fault::refused(&format!("filter_chain_match.{f}"), why));
    if !allow_prefix && !m.prefix_ranges.is_empty() {
        return bad("prefix_ranges", "not supported on this listener");
    }
    if !allow_port && m.destination_port.is_some() {
        return bad("destination_port", "not supported on this listener");
    }
    if !m.server_names.is_empty() || !m.transport_protocol.is_empty() {
        return bad(
            "server_names",
            "SNI and transport-protocol matching (terminating-gateway destinations, tls_inspector) is not supported",
        );
    }
    if !m.application_protocols.is_empty() {
        return bad(
            "application_protocols",
            "ALPN matching (http_inspector) is not supported",
        );
    }
    if !m.source_prefix_ranges.is_empty()
        || !m.direct_source_prefix_ranges.is_empty()
        || !m.source_ports.is_empty()
        || m.source_type != 0
    {
        return bad(
            "source_prefix_ranges",
            "matching on the source is not supported",
        );
    }
    if !m.address_suffix.is_empty() || m.suffix_len.is_some() {
        return bad("address_suffix", "not supported");
    }
    Ok(())
}

fn public_listener(l: &Listener) -> R<PublicListener> {
    let addr = socket_addr(l.address.as_ref()).at("address")?;
    let original_dst = check_listener_filters(l, false)?;
    type Mtls = (
        DownstreamTls,
        Vec<RbacRules>,
        Option<u64>,
        String,
        Option<InboundHcm>,
    );
    let mut mtls: Option<Mtls> = None;
    let mut permissive = Vec::new();
    if let Some(_d) = &l.default_filter_chain {
        return Err(Fault::refused(
            "default_filter_chain",
            "a default chain on the public listener is not supported",
        ));
    }
    for (ci, c) in l.filter_chains.iter().enumerate() {
        let cat = format!("filter_chains[{ci}]");
        let port = match &c.filter_chain_match {
            Some(m) => {
                no_match_beyond(m, false, true).at(&cat)?;
                m.destination_port.as_ref().map(|p| p.value)
            }
            None => None,
        };
        if let Some(port) = port {
            // Permissive mTLS: plain TCP to the app for this destination port.
            let port = u16::try_from(port).map_err(|_| {
                Fault::invalid(
                    &format!("{cat}.filter_chain_match.destination_port"),
                    "not a port",
                )
            })?;
            if c.transport_socket.is_some() {
                return Err(Fault::refused(
                    &format!("{cat}.transport_socket"),
                    "a TLS chain matched on destination port is not supported",
                ));
            }
            if !original_dst {
                return Err(Fault::invalid(
                    &format!("{cat}.filter_chain_match.destination_port"),
                    "matching the destination port needs envoy.filters.listener.original_dst",
                ));
            }
            permissive.push((port, single_tcp_proxy(c).at(&cat)?));
            continue;
        }
        if mtls.is_some() {
            return Err(Fault::refused(
                &cat,
                "more than one mTLS chain on the public listener",
            ));
        }
        let Some(ts) = &c.transport_socket else {
            return Err(Fault::refused(
                &format!("{cat}.transport_socket"),
                "the public listener's chain must terminate mTLS; a plain chain is not served",
            ));
        };
        let tls = downstream_tls(transport_tls(ts, &DownstreamTlsContext::type_url()).at(&cat)?)
            .at(format!("{cat}.transport_socket"))?;
        let mut rbacs = Vec::new();
        let mut limit = None;
        let mut cluster = None;
        let mut http = None;
        for (fi, f) in c.filters.iter().enumerate() {
            let fat = format!("{cat}.filters[{fi}]");
            let any = filter_any(f, &fat)?;
            if cluster.is_some() {
                return Err(Fault::refused(
                    &fat,
                    "a filter after tcp_proxy or the HTTP connection manager is not supported",
                ));
            }
            if any.type_url == HttpConnectionManager::type_url() {
                let (c, mut h) = inbound_hcm(any).at(&fat)?;
                for (f, _) in &mut h.notes {
                    *f = format!("{fat}.{f}");
                }
                cluster = Some(c);
                http = Some(h);
                continue;
            }
            if any.type_url == NetworkRbac::type_url() {
                rbacs.extend(network_rbac(any).at(&fat)?);
            } else if any.type_url == ConnectionLimit::type_url() {
                let cl: ConnectionLimit = unpack(any, "typed_config").at(&fat)?;
                if cl.delay.is_some() {
                    return Err(Fault::refused(
                        &format!("{fat}.typed_config.delay"),
                        "a delay before closing over-limit connections is not supported",
                    ));
                }
                let Some(max) = cl.max_connections else {
                    return Err(Fault::invalid(
                        &format!("{fat}.typed_config.max_connections"),
                        "missing",
                    ));
                };
                limit = Some(limit.map_or(max.value, |l: u64| l.min(max.value)));
            } else if any.type_url == TcpProxy::type_url() {
                cluster = Some(tcp_proxy_cluster(any).at(&fat)?);
            } else {
                return Err(Fault::refused(
                    &fat,
                    refused_filter_reason(&f.name, &any.type_url),
                ));
            }
        }
        let Some(cluster) = cluster else {
            return Err(Fault::invalid(
                &format!("{cat}.filters"),
                "no tcp_proxy or HTTP connection manager",
            ));
        };
        mtls = Some((tls, rbacs, limit, cluster, http));
    }
    let Some((tls, rbac, max_connections, cluster, http)) = mtls else {
        return Err(Fault::invalid("filter_chains", "no mTLS chain"));
    };
    Ok(PublicListener {
        addr,
        tls,
        rbac,
        max_connections,
        cluster,
        permissive,
        http,
    })
}

/// The public listener's HCM: Consul's shape, one inline route for every
/// request to the local app's cluster. Returns that cluster.
fn inbound_hcm(any: &Any) -> R<(String, InboundHcm)> {
    let hcm = super::http::hcm(any, Side::Inbound)?;
    let shape = |why: &str| {
        Fault::refused(
            "typed_config.route_config",
            format!("the public listener's routes must be one catch-all route to the local app, as Consul sends them: {why}"),
        )
    };
    let rm = match hcm.routes {
        RouteSource::Inline(rm) => rm,
        RouteSource::Rds(_) => return Err(shape("RDS is not supported here")),
    };
    let [r] = rm.routes.as_slice() else {
        return Err(shape(&format!("{} routes", rm.routes.len())));
    };
    if r.matches != veer_core::l7::RequestMatch::default() {
        return Err(shape("the route has a match condition"));
    }
    let [(cluster, _)] = r.clusters.as_slice() else {
        return Err(shape("the route splits between clusters"));
    };
    if r.prefix_rewrite.is_some() || r.retry.is_some() {
        return Err(shape("the route rewrites or retries"));
    }
    let mut notes = hcm.notes;
    notes.extend(
        rm.notes
            .into_iter()
            .map(|(f, d)| (format!("typed_config.route_config.{f}"), d)),
    );
    Ok((
        cluster.clone(),
        InboundHcm {
            protocol: hcm.protocol,
            rbac: hcm.rbac,
            xfcc: hcm.xfcc,
            request_timeout: r.timeout,
            notes,
        },
    ))
}

fn outbound_listener(l: &Listener) -> R<OutboundListener> {
    let addr = socket_addr(l.address.as_ref()).at("address")?;
    check_listener_filters(l, true)?;
    let mut chains = Vec::new();
    for (ci, c) in l.filter_chains.iter().enumerate() {
        let cat = format!("filter_chains[{ci}]");
        if c.transport_socket.is_some() {
            return Err(Fault::refused(
                &format!("{cat}.transport_socket"),
                "TLS termination on the outbound listener is not supported",
            ));
        }
        let Some(m) = &c.filter_chain_match else {
            return Err(Fault::invalid(
                &format!("{cat}.filter_chain_match"),
                "missing",
            ));
        };
        no_match_beyond(m, true, true).at(&cat)?;
        if m.prefix_ranges.is_empty() {
            return Err(Fault::invalid(
                &format!("{cat}.filter_chain_match.prefix_ranges"),
                "an outbound chain must match destination addresses",
            ));
        }
        let mut ips = Vec::new();
        for (ri, r) in m.prefix_ranges.iter().enumerate() {
            let rat = format!("{cat}.filter_chain_match.prefix_ranges[{ri}]");
            let ip: IpAddr = r.address_prefix.parse().map_err(|_| {
                Fault::invalid(&rat, format!("{:?} is not an IP address", r.address_prefix))
            })?;
            let full = if ip.is_ipv4() { 32 } else { 128 };
            let len = r.prefix_len.as_ref().map_or(0, |l| l.value);
            if len != full {
                return Err(Fault::refused(
                    &format!("{rat}.prefix_len"),
                    format!(
                        "only single addresses (/{full}) are supported, not /{len}: veer routes by exact virtual or instance IP"
                    ),
                ));
            }
            ips.push(ip);
        }
        let port = match &m.destination_port {
            Some(p) => Some(u16::try_from(p.value).map_err(|_| {
                Fault::invalid(
                    &format!("{cat}.filter_chain_match.destination_port"),
                    "not a port",
                )
            })?),
            None => None,
        };
        let target = chain_target(c).at(&cat)?;
        chains.push(OutboundChain {
            index: ci,
            ips,
            port,
            target,
        });
    }
    let default_cluster = match &l.default_filter_chain {
        Some(d) => {
            if d.transport_socket.is_some() || d.filter_chain_match.is_some() {
                return Err(Fault::refused(
                    "default_filter_chain",
                    "only a plain tcp_proxy default chain is supported",
                ));
            }
            Some(single_tcp_proxy(d).at("default_filter_chain")?)
        }
        None => None,
    };
    Ok(OutboundListener {
        addr,
        chains,
        default_cluster,
    })
}

fn upstream_listener(l: &Listener) -> R<ListenerModel> {
    let addr = socket_addr(l.address.as_ref()).at("address")?;
    check_listener_filters(l, false)?;
    if !l.listener_filters.is_empty() {
        return Err(Fault::refused(
            "listener_filters",
            "listener filters on an explicit upstream listener are not supported",
        ));
    }
    if l.default_filter_chain.is_some() {
        return Err(Fault::refused(
            "default_filter_chain",
            "not supported on an explicit upstream listener",
        ));
    }
    let [c] = l.filter_chains.as_slice() else {
        return Err(Fault::refused(
            "filter_chains",
            "an explicit upstream listener must have exactly one filter chain",
        ));
    };
    if let Some(m) = &c.filter_chain_match {
        no_match_beyond(m, false, false).at("filter_chains[0]")?;
    }
    if c.transport_socket.is_some() {
        return Err(Fault::refused(
            "filter_chains[0].transport_socket",
            "TLS termination on an upstream listener is not supported",
        ));
    }
    let target = chain_target(c).at("filter_chains[0]")?;
    Ok(ListenerModel::Upstream { addr, target })
}

/// `exposed_path_*`: the one HCM shape veer serves (plain HTTP, one exact
/// path, router only).
fn expose_listener(l: &Listener) -> R<ExposeListener> {
    let addr = socket_addr(l.address.as_ref()).at("address")?;
    if !l.listener_filters.is_empty() || l.default_filter_chain.is_some() {
        return Err(Fault::refused(
            "listener_filters",
            "an exposed-path listener has one plain HTTP chain only",
        ));
    }
    let [c] = l.filter_chains.as_slice() else {
        return Err(Fault::refused(
            "filter_chains",
            "an exposed-path listener has one chain",
        ));
    };
    let cat = "filter_chains[0]";
    if c.transport_socket.is_some() || c.filter_chain_match.is_some() {
        return Err(Fault::refused(
            cat,
            "an exposed-path chain is plain HTTP with no match",
        ));
    }
    let [f] = c.filters.as_slice() else {
        return Err(Fault::refused(
            &format!("{cat}.filters"),
            "an exposed-path chain has one HTTP connection manager",
        ));
    };
    let fat = format!("{cat}.filters[0]");
    let any = filter_any(f, &fat)?;
    if any.type_url != HttpConnectionManager::type_url() {
        return Err(Fault::refused(
            &fat,
            refused_filter_reason(&f.name, &any.type_url),
        ));
    }
    let hcm: HttpConnectionManager = unpack(any, "typed_config").at(&fat)?;
    let hat = format!("{fat}.typed_config");
    use http_connection_manager::CodecType;
    let http2 = match CodecType::try_from(hcm.codec_type) {
        Ok(CodecType::Auto) => hcm.http2_protocol_options.is_some(),
        Ok(CodecType::Http1) => false,
        Ok(CodecType::Http2) => true,
        _ => {
            return Err(Fault::refused(
                &format!("{hat}.codec_type"),
                "only HTTP/1.1 and HTTP/2",
            ));
        }
    };
    for (i, hf) in hcm.http_filters.iter().enumerate() {
        let url = match &hf.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => a.type_url.clone(),
            _ => String::new(),
        };
        if url != Router::type_url() {
            return Err(Fault::refused(
                &format!("{hat}.http_filters[{i}]"),
                refused_filter_reason(&hf.name, &url),
            ));
        }
    }
    let rc = match &hcm.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => rc,
        _ => {
            return Err(Fault::refused(
                &format!("{hat}.route_config"),
                "an exposed path needs an inline route configuration",
            ))
        }
    };
    let shape = || {
        Fault::refused(
            &format!("{hat}.route_config"),
            "an exposed path is one virtual host with one exact-path route to a cluster",
        )
    };
    let [vh] = rc.virtual_hosts.as_slice() else {
        return Err(shape());
    };
    let [r] = vh.routes.as_slice() else {
        return Err(shape());
    };
    let path = match r.r#match.as_ref().and_then(|m| {
        if m.headers.is_empty() && m.query_parameters.is_empty() {
            m.path_specifier.as_ref()
        } else {
            None
        }
    }) {
        Some(route_match::PathSpecifier::Path(p)) => p.clone(),
        _ => return Err(shape()),
    };
    let cluster = match &r.action {
        Some(route::Action::Route(ra)) => match &ra.cluster_specifier {
            Some(route_action::ClusterSpecifier::Cluster(c)) => c.clone(),
            _ => return Err(shape()),
        },
        _ => return Err(shape()),
    };
    Ok(ExposeListener {
        addr,
        path,
        cluster,
        http2,
    })
}

/// Checks one listener on its own.
pub(crate) fn listener(l: &Listener) -> R<ListenerModel> {
    let n = l.name.as_str();
    if l.api_listener.is_some() || l.listener_specifier.is_some() {
        return Err(Fault::refused(
            "api_listener",
            "API and internal listeners are not supported",
        ));
    }
    if n.starts_with("public_listener:") {
        Ok(ListenerModel::Public(public_listener(l)?))
    } else if n.starts_with("outbound_listener:") {
        Ok(ListenerModel::Outbound(outbound_listener(l)?))
    } else if n.starts_with("exposed_path_") {
        Ok(ListenerModel::Expose(expose_listener(l)?))
    } else {
        upstream_listener(l)
    }
}

// ---------------------------------------------------------------- clusters

/// Checks one cluster on its own.
pub(crate) fn cluster(c: &Cluster) -> R<ClusterModel> {
    use cluster::{DiscoveryType, LbPolicy};
    let ty = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(*t)
            .map_err(|_| Fault::invalid("type", format!("unknown discovery type {t}")))?,
        None => DiscoveryType::Static,
        Some(cluster::ClusterDiscoveryType::ClusterType(ct)) => {
            return aggregate(c, ct);
        }
    };
    if !c.transport_socket_matches.is_empty() || c.transport_socket_matcher.is_some() {
        return Err(Fault::refused(
            "transport_socket_matches",
            "per-endpoint transport sockets are not supported",
        ));
    }
    let lb = LbPolicy::try_from(c.lb_policy)
        .map_err(|_| Fault::invalid("lb_policy", format!("unknown {}", c.lb_policy)))?;
    // ROUND_ROBIN is veer's policy; RING_HASH, MAGLEV, LEAST_REQUEST and
    // RANDOM are approximated by round robin (no session affinity).
    if lb == LbPolicy::LoadBalancingPolicyConfig || c.load_balancing_policy.is_some() {
        return Err(Fault::refused(
            "load_balancing_policy",
            "extension load-balancing policies are not supported",
        ));
    }
    let connect_timeout = match &c.connect_timeout {
        Some(d) => Some(duration(d, "connect_timeout")?),
        None => None,
    };
    let max_connections = match &c.circuit_breakers {
        Some(cb) => cb
            .thresholds
            .iter()
            .filter(|t| t.priority == 0)
            .filter_map(|t| t.max_connections.as_ref().map(|m| m.value))
            .min(),
        None => None,
    };
    let kind = match ty {
        DiscoveryType::Static => {
            if c.transport_socket.is_some() {
                return Err(Fault::refused(
                    "transport_socket",
                    "TLS to a static cluster (the local app) is not supported",
                ));
            }
            let Some(la) = &c.load_assignment else {
                return Err(Fault::invalid(
                    "load_assignment",
                    "a static cluster needs endpoints",
                ));
            };
            let eps = endpoints_of(la).at("load_assignment")?;
            let [ep] = eps.as_slice() else {
                return Err(Fault::refused(
                    "load_assignment",
                    "a static cluster must have exactly one endpoint (the local app)",
                ));
            };
            ClusterKind::Static(ep.addr)
        }
        DiscoveryType::Eds => {
            let Some(ts) = &c.transport_socket else {
                return Err(Fault::refused(
                    "transport_socket",
                    "an EDS cluster without mTLS is not supported: veer reaches mesh upstreams over mTLS only",
                ));
            };
            let tls = upstream_tls(ts)?;
            let eds_name = match &c.eds_cluster_config {
                Some(e) if !e.service_name.is_empty() => e.service_name.clone(),
                _ => c.name.clone(),
            };
            ClusterKind::Eds { eds_name, tls }
        }
        DiscoveryType::OriginalDst => {
            if lb != LbPolicy::ClusterProvided {
                return Err(Fault::invalid(
                    "lb_policy",
                    "an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED",
                ));
            }
            let tls = match &c.transport_socket {
                Some(ts) => Some(upstream_tls(ts)?),
                None => None,
            };
            ClusterKind::OriginalDst(tls)
        }
        DiscoveryType::LogicalDns | DiscoveryType::StrictDns => {
            let Some(ts) = &c.transport_socket else {
                return Err(Fault::refused(
                    "transport_socket",
                    "a DNS cluster without mTLS is not supported: veer reaches mesh upstreams (and gateways) over mTLS only",
                ));
            };
            let tls = upstream_tls(ts)?;
            let dns = dns_model(c, ty == DiscoveryType::LogicalDns)?;
            ClusterKind::Dns { tls, dns }
        }
    };
    if lb == LbPolicy::ClusterProvided && !matches!(kind, ClusterKind::OriginalDst(_)) {
        return Err(Fault::invalid(
            "lb_policy",
            "CLUSTER_PROVIDED is for ORIGINAL_DST clusters",
        ));
    }
    let http2 = super::http::cluster_http2(&c.typed_extension_protocol_options)?;
    Ok(ClusterModel {
        kind,
        http2,
        connect_timeout,
        max_connections,
    })
}

/// `envoy.clusters.aggregate` (the only custom cluster type veer knows):
/// the member names, checked on their own (not empty, no duplicate, not
/// itself); whether they exist and do not loop is checked with the other
/// clusters (`translate`).
fn aggregate(c: &Cluster, ct: &cluster::CustomClusterType) -> R<ClusterModel> {
    use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
    if ct.name != "envoy.clusters.aggregate" {
        return Err(Fault::refused(
            "cluster_type.name",
            format!(
                "custom cluster type {:?} is not supported; only envoy.clusters.aggregate",
                ct.name
            ),
        ));
    }
    let Some(any) = &ct.typed_config else {
        return Err(Fault::invalid("cluster_type.typed_config", "missing"));
    };
    let cfg: ClusterConfig = unpack(any, "cluster_type.typed_config")?;
    if cfg.clusters.is_empty() {
        return Err(Fault::invalid(
            "cluster_type.typed_config.clusters",
            "an aggregate cluster names at least one cluster",
        ));
    }
    for (i, m) in cfg.clusters.iter().enumerate() {
        let at = format!("cluster_type.typed_config.clusters[{i}]");
        if m.is_empty() {
            return Err(Fault::invalid(&at, "empty cluster name"));
        }
        if *m == c.name {
            return Err(Fault::invalid(&at, "the aggregate names itself (a loop)"));
        }
        if cfg.clusters[..i].contains(m) {
            return Err(Fault::invalid(&at, format!("{m:?} is named twice")));
        }
    }
    if c.lb_policy != cluster::LbPolicy::ClusterProvided as i32 {
        return Err(Fault::invalid(
            "lb_policy",
            "an aggregate cluster needs lb_policy CLUSTER_PROVIDED",
        ));
    }
    if c.transport_socket.is_some() {
        return Err(Fault::refused(
            "transport_socket",
            "an aggregate cluster's transport socket is never used (its members' are); refusing it rather than ignoring it",
        ));
    }
    if c.load_assignment.is_some() || c.eds_cluster_config.is_some() {
        return Err(Fault::invalid(
            "load_assignment",
            "an aggregate cluster has no endpoints of its own",
        ));
    }
    let connect_timeout = match &c.connect_timeout {
        Some(d) => Some(duration(d, "connect_timeout")?),
        None => None,
    };
    Ok(ClusterModel {
        kind: ClusterKind::Aggregate(cfg.clusters),
        connect_timeout,
        max_connections: None,
        // An aggregate's members carry their own protocol options.
        http2: false,
    })
}

/// The hosts of a `STRICT_DNS`/`LOGICAL_DNS` cluster (its
/// `load_assignment`, lowest priority with a usable host) and its lookup
/// settings. Custom resolvers are refused: veer uses the system's.
// `dns_refresh_rate` and `dns_lookup_family` are what Consul (v1.16) sends;
// newer Envoys also take them inside a DNS cluster extension.
#[allow(deprecated)]
fn dns_model(c: &Cluster, logical: bool) -> R<DnsModel> {
    use cluster::DnsLookupFamily as F;
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    if !c.dns_resolvers.is_empty()
        || c.use_tcp_for_dns_lookups
        || c.dns_resolution_config.is_some()
        || c.typed_dns_resolver_config.is_some()
    {
        return Err(Fault::refused(
            "typed_dns_resolver_config",
            "custom DNS resolvers are not supported; veer resolves with the system's resolver",
        ));
    }
    let family = match F::try_from(c.dns_lookup_family) {
        Ok(F::Auto) => DnsFamily::Auto,
        Ok(F::V4Only) => DnsFamily::V4Only,
        Ok(F::V6Only) => DnsFamily::V6Only,
        Ok(F::V4Preferred) => DnsFamily::V4Preferred,
        Ok(F::All) => DnsFamily::All,
        Err(_) => {
            return Err(Fault::invalid(
                "dns_lookup_family",
                format!("unknown {}", c.dns_lookup_family),
            ))
        }
    };
    let refresh = match &c.dns_refresh_rate {
        Some(d) => duration(d, "dns_refresh_rate")?.max(DNS_REFRESH_MIN),
        None => DNS_REFRESH_DEFAULT,
    };
    let Some(la) = &c.load_assignment else {
        return Err(Fault::invalid(
            "load_assignment",
            "a DNS cluster needs its hosts in load_assignment",
        ));
    };
    let mut by_prio: std::collections::BTreeMap<u32, Vec<DnsHost>> = Default::default();
    for (li, loc) in la.endpoints.iter().enumerate() {
        let lat = format!("load_assignment.endpoints[{li}]");
        for (ei, lbe) in loc.lb_endpoints.iter().enumerate() {
            let eat = format!("{lat}.lb_endpoints[{ei}]");
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lbe.host_identifier else {
                return Err(Fault::invalid(&format!("{eat}.endpoint"), "missing"));
            };
            let (host, port) =
                host_port(ep.address.as_ref()).at(format!("{eat}.endpoint.address"))?;
            let weight = lbe.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(Fault::invalid(
                    &format!("{eat}.load_balancing_weight"),
                    "must be at least 1",
                ));
            }
            let list = by_prio.entry(loc.priority).or_default();
            if matches!(
                HealthStatus::try_from(lbe.health_status),
                Ok(HealthStatus::Unknown) | Ok(HealthStatus::Healthy)
            ) {
                list.push(DnsHost { host, port, weight });
            }
        }
    }
    let hosts = by_prio
        .into_values()
        .find(|v| !v.is_empty())
        .unwrap_or_default();
    if logical && hosts.len() > 1 {
        return Err(Fault::invalid(
            "load_assignment",
            "a LOGICAL_DNS cluster has exactly one host",
        ));
    }
    Ok(DnsModel {
        hosts,
        logical,
        family,
        refresh,
    })
}

/// A socket address whose address may be a hostname (DNS clusters).
fn host_port(a: Option<&Address>) -> R<(String, u16)> {
    let Some(Address {
        address: Some(address::Address::SocketAddress(sa)),
    }) = a
    else {
        return Err(Fault::invalid(
            "socket_address",
            "a DNS host needs a socket address",
        ));
    };
    if sa.protocol != 0 || !sa.resolver_name.is_empty() {
        return Err(Fault::refused(
            "socket_address",
            "only TCP addresses resolved by the system's resolver are supported",
        ));
    }
    let host = sa.address.trim();
    if host.is_empty() || host.len() > 253 || host.contains(char::is_whitespace) {
        return Err(Fault::invalid(
            "socket_address.address",
            format!("{:?} is not a hostname", sa.address),
        ));
    }
    let port = match sa.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
            Fault::invalid("socket_address.port_value", format!("{p} is not a port"))
        })?,
        _ => return Err(Fault::invalid("socket_address.port_value", "no port")),
    };
    Ok((host.to_string(), port))
}

// ---------------------------------------------------------------- endpoints

/// The usable endpoints of an assignment: those of the lowest priority
/// that has any, healthy or of unknown health (Consul sets
/// `healthy_panic_threshold` 0, so unhealthy ones never get traffic).
pub(crate) fn endpoints_of(la: &ClusterLoadAssignment) -> R<Vec<EndpointModel>> {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    if !la.named_endpoints.is_empty() {
        return Err(Fault::refused(
            "named_endpoints",
            "named endpoints are not supported",
        ));
    }
    let mut by_prio: std::collections::BTreeMap<u32, Vec<EndpointModel>> = Default::default();
    for (li, loc) in la.endpoints.iter().enumerate() {
        let lat = format!("endpoints[{li}]");
        if loc.lb_config.is_some() {
            return Err(Fault::refused(
                &format!("{lat}.leds_cluster_locality_config"),
                "LEDS is not supported",
            ));
        }
        for (ei, lbe) in loc.lb_endpoints.iter().enumerate() {
            let eat = format!("{lat}.lb_endpoints[{ei}]");
            let ep = match &lbe.host_identifier {
                Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
                Some(lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    return Err(Fault::refused(
                        &format!("{eat}.endpoint_name"),
                        "named endpoints are not supported",
                    ))
                }
                None => return Err(Fault::invalid(&format!("{eat}.endpoint"), "missing")),
            };
            let addr = socket_addr(ep.address.as_ref()).at(format!("{eat}.endpoint.address"))?;
            let weight = lbe.load_balancing_weight.as_ref().map_or(1, |w| w.value);
            if weight == 0 {
                return Err(Fault::invalid(
                    &format!("{eat}.load_balancing_weight"),
                    "must be at least 1",
                ));
            }
            let usable = matches!(
                HealthStatus::try_from(lbe.health_status),
                Ok(HealthStatus::Unknown) | Ok(HealthStatus::Healthy)
            );
            let list = by_prio.entry(loc.priority).or_default();
            if usable {
                list.push(EndpointModel { addr, weight });
            }
        }
    }
    Ok(by_prio
        .into_values()
        .find(|v| !v.is_empty())
        .unwrap_or_default())
}

// ---------------------------------------------------------------- secrets

pub(crate) fn secret(s: &Secret) -> R<SecretModel> {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => Ok(SecretModel::Leaf(share_leaf(Leaf {
            chain: certs(
                t.certificate_chain.as_ref(),
                "tls_certificate.certificate_chain",
            )?,
            key: key(t.private_key.as_ref(), "tls_certificate.private_key")?,
        }))),
        Some(secret::Type::ValidationContext(v)) => {
            let at = "validation_context";
            let roots = certs(v.trusted_ca.as_ref(), &format!("{at}.trusted_ca"))?;
            let sans = validation_sans(v, at)?;
            if !sans.is_empty() {
                return Err(Fault::refused(
                    &format!("{at}.match_subject_alt_names"),
                    "SAN matchers in a root secret are not supported; they belong in the cluster's combined validation context",
                ));
            }
            Ok(SecretModel::Roots(share_roots(roots)))
        }
        Some(_) => Err(Fault::refused(
            "type",
            "only tls_certificate and validation_context secrets are supported",
        )),
        None => Err(Fault::invalid("type", "empty secret")),
    }
}

/// HCM RDS route names a listener refers to (subscribed by name).
pub(crate) fn rds_names(l: &Listener) -> Vec<String> {
    let mut out = Vec::new();
    for c in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        for f in &c.filters {
            if let Some(filter::ConfigType::TypedConfig(a)) = &f.config_type {
                if a.type_url == HttpConnectionManager::type_url() {
                    if let Ok(h) = HttpConnectionManager::decode(a.value.as_slice()) {
                        if let Some(http_connection_manager::RouteSpecifier::Rds(r)) =
                            h.route_specifier
                        {
                            out.push(r.route_config_name);
                        }
                    }
                }
            }
        }
    }
    out
}
