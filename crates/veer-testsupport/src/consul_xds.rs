//! Consul-shaped xDS resources, built with envoy-types, for veer's xDS
//! tests (translation tables, the ADS client, end-to-end runs in network
//! namespaces).
//!
//! Each builder mirrors one of Consul v1.16.0's golden files (MPL-2.0,
//! `agent/xds/testdata/...` in hashicorp/consul, tag v1.16.0) field for
//! field: names, addresses, stat prefixes, filter order, cluster settings.
//! What is parameterised: the certificates (so that they chain to a test
//! CA; the goldens carry Consul's "Test CA 2" EC material, which expires in
//! 2029), every address (so that a test can serve them in network
//! namespaces), and how TLS material is delivered (inline PEM as v1.16
//! sends it, or SDS secrets `connect-leaf`/`connect-root` as newer Consul
//! versions do).
use envoy_types::pb::envoy::config::cluster::v3::{
    cluster, CircuitBreakers, Cluster, OutlierDetection,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, data_source, socket_address, Address, AggregatedConfigSource,
    ApiVersion, CidrRange, ConfigSource, DataSource, HealthStatus, SocketAddress, TrafficDirection,
    TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter, listener_filter, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac, Permission, Policy, Principal, Rbac,
};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{tcp_proxy, TcpProxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, secret, CertificateValidationContext, CommonTlsContext,
    DownstreamTlsContext, SdsSecretConfig, Secret, SubjectAltNameMatcher, TlsCertificate,
    TlsParameters, UpstreamTlsContext,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    regex_matcher, string_matcher, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value, UInt64Value};
use envoy_types::util::pack_any;
use prost::Name;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

pub mod l7;

/// The TLS material of the sidecar (service `web`): its leaf chain and key,
/// and the CA roots, PEM.
#[derive(Clone, Debug)]
pub struct Certs {
    pub chain_pem: String,
    pub key_pem: String,
    pub roots_pem: String,
}

impl Certs {
    /// A Consul-style leaf for `service` in `datacenter`, signed by `ca`.
    pub fn issue(ca: &veer_ca::Ca, datacenter: &str, service: &str) -> Certs {
        let leaf = ca.service_leaf(datacenter, service).expect("leaf");
        Certs {
            chain_pem: leaf.chain_pem,
            key_pem: leaf.key_pem,
            roots_pem: ca.cert_pem.clone(),
        }
    }
}

/// How TLS material reaches the sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsDelivery {
    /// Inline PEM in every listener and cluster (Consul <= 1.16).
    Inline,
    /// SDS secrets `connect-leaf` and `connect-root` over ADS (newer Consul).
    Sds,
}

/// The SDS secret names newer Consul versions use.
pub const LEAF_SECRET: &str = "connect-leaf";
pub const ROOT_SECRET: &str = "connect-root";

/// What the builders are parameterised by. [`Params::golden`] gives the
/// goldens' values; change any field to serve them elsewhere.
#[derive(Clone, Debug)]
pub struct Params {
    pub trust_domain: String,
    pub datacenter: String,
    pub certs: Certs,
    pub tls: TlsDelivery,
    /// `public_listener` (golden: 0.0.0.0:9999).
    pub public: SocketAddr,
    /// `local_app` (golden: 127.0.0.1:8080).
    pub local_app: SocketAddr,
    /// `outbound_listener` (golden: 127.0.0.1:15001).
    pub outbound: SocketAddr,
    /// Explicit upstream `db` (golden: 127.0.0.1:9191).
    pub db_bind: SocketAddr,
    /// Prepared query `geo-cache` (golden: 127.10.10.10:8181).
    pub geo_cache_bind: SocketAddr,
    /// Virtual IPs by service (golden: google 10.0.0.1 and 240.0.0.1;
    /// mongo 6.6.6.6).
    pub vips: BTreeMap<String, Vec<IpAddr>>,
    /// Dialed-directly instance IPs by service (golden: kafka 9.9.9.9;
    /// mongo 10.10.10.10 and 10.10.10.12).
    pub instances: BTreeMap<String, Vec<IpAddr>>,
    /// Endpoints (sidecar public listeners) by service (golden: db
    /// 10.10.1.1:8080 and 10.10.1.2:8080; geo-cache 10.10.1.1:8080 and
    /// 10.20.1.2:8080; google 9.9.9.9:9090; no-endpoints none).
    pub endpoints: BTreeMap<String, Vec<SocketAddr>>,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn ips(v: &[&str]) -> Vec<IpAddr> {
    v.iter().map(|s| s.parse().expect("ip")).collect()
}

impl Params {
    /// The goldens' trust domain, datacenter and addresses, with `certs`.
    pub fn golden(certs: Certs) -> Params {
        let mut vips = BTreeMap::new();
        vips.insert("google".into(), ips(&["10.0.0.1", "240.0.0.1"]));
        vips.insert("mongo".into(), ips(&["6.6.6.6"]));
        let mut instances = BTreeMap::new();
        instances.insert("kafka".into(), ips(&["9.9.9.9"]));
        instances.insert("mongo".into(), ips(&["10.10.10.10", "10.10.10.12"]));
        let mut endpoints = BTreeMap::new();
        endpoints.insert(
            "db".into(),
            vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
        );
        endpoints.insert(
            "geo-cache".into(),
            vec![sa("10.10.1.1:8080"), sa("10.20.1.2:8080")],
        );
        endpoints.insert("google".into(), vec![sa("9.9.9.9:9090")]);
        endpoints.insert("no-endpoints".into(), vec![]);
        // Not in a v1.16.0 endpoints golden (dial-instances-directly has
        // none); values of the same shape.
        endpoints.insert("kafka".into(), vec![sa("10.10.2.1:8080")]);
        endpoints.insert("mongo".into(), vec![sa("10.10.3.1:8080")]);
        Params {
            trust_domain: crate::ca::TRUST_DOMAIN.to_string(),
            datacenter: "dc1".into(),
            certs,
            tls: TlsDelivery::Inline,
            public: sa("0.0.0.0:9999"),
            local_app: sa("127.0.0.1:8080"),
            outbound: sa("127.0.0.1:15001"),
            db_bind: sa("127.0.0.1:9191"),
            geo_cache_bind: sa("127.10.10.10:8181"),
            vips,
            instances,
            endpoints,
        }
    }

    /// `<svc>.default.<dc>.internal.<td>`: the cluster name and SNI.
    pub fn sni(&self, svc: &str) -> String {
        format!(
            "{svc}.default.{}.internal.{}",
            self.datacenter, self.trust_domain
        )
    }

    /// `spiffe://<td>/ns/default/dc/<dc>/svc/<svc>`.
    pub fn spiffe(&self, dc: &str, svc: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{dc}/svc/{svc}",
            self.trust_domain
        )
    }

    fn query_cluster(&self) -> String {
        format!(
            "geo-cache.default.{}.query.{}",
            self.datacenter, self.trust_domain
        )
    }
}

/// One set of resources, by kind, in Consul's order within each kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsulXds {
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub secrets: Vec<Secret>,
    /// RDS route configurations (see [`l7`]).
    pub routes: Vec<RouteConfiguration>,
}

impl ConsulXds {
    /// Every resource as `(type URL, name, Any)`, in Consul's send order
    /// (SDS, CDS, EDS, LDS, RDS), for an ADS server to serve.
    pub fn resources(&self) -> Vec<(String, String, Any)> {
        let mut out = Vec::new();
        for s in &self.secrets {
            out.push((Secret::type_url(), s.name.clone(), pack_any(s.clone())));
        }
        for c in &self.clusters {
            out.push((Cluster::type_url(), c.name.clone(), pack_any(c.clone())));
        }
        for e in &self.endpoints {
            out.push((
                ClusterLoadAssignment::type_url(),
                e.cluster_name.clone(),
                pack_any(e.clone()),
            ));
        }
        for l in &self.listeners {
            out.push((Listener::type_url(), l.name.clone(), pack_any(l.clone())));
        }
        for r in &self.routes {
            out.push((
                RouteConfiguration::type_url(),
                r.name.clone(),
                pack_any(r.clone()),
            ));
        }
        out
    }

    /// The `public_listener:*` listener.
    pub fn public_listener_mut(&mut self) -> &mut Listener {
        self.listeners
            .iter_mut()
            .find(|l| l.name.starts_with("public_listener:"))
            .expect("a public listener")
    }

    /// Replaces the public listener's network RBAC filter (the first filter
    /// of its mTLS chain) with `f`, e.g. one of the `rbac_*` builders.
    pub fn set_public_rbac(&mut self, f: Filter) {
        let l = self.public_listener_mut();
        l.filter_chains[0].filters[0] = f;
    }

    pub fn listener_mut(&mut self, name: &str) -> &mut Listener {
        self.listeners
            .iter_mut()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no listener {name}"))
    }

    pub fn cluster_mut(&mut self, name: &str) -> &mut Cluster {
        self.clusters
            .iter_mut()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no cluster {name}"))
    }
}

// ---------------------------------------------------------------- pieces

fn socket(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(s.to_string())),
        ..Default::default()
    })
}

fn ads() -> Option<ConfigSource> {
    Some(ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    })
}

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: ads(),
    }
}

fn secs(s: i64) -> Option<Duration> {
    Some(Duration {
        seconds: s,
        nanos: 0,
    })
}

/// `tcp_proxy` with Consul's stat prefix.
pub fn tcp_proxy_filter(stat_prefix: &str, cluster: &str) -> Filter {
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(TcpProxy {
            stat_prefix: stat_prefix.into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }))),
    }
}

fn original_dst() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.original_dst".into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack_any(
            OriginalDst {},
        ))),
        ..Default::default()
    }
}

/// A network RBAC filter as Consul writes it (`statPrefix connect_authz`);
/// `None` = no `rules` field.
pub fn rbac_filter(rules: Option<Rbac>) -> Filter {
    Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(NetworkRbac {
            rules,
            stat_prefix: "connect_authz".into(),
            ..Default::default()
        }))),
    }
}

/// `connection_limit` as Consul writes it for `max_inbound_connections`
/// (golden `listeners/listener-max-inbound-connections`).
pub fn connection_limit_filter(max: u64) -> Filter {
    Filter {
        name: "envoy.filters.network.connection_limit".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(ConnectionLimit {
            stat_prefix: "inbound_connection_limit".into(),
            max_connections: Some(UInt64Value { value: max }),
            ..Default::default()
        }))),
    }
}

// v1.16 writes the deprecated `match_subject_alt_names`.
#[allow(deprecated)]
fn common_tls(p: &Params, sans: Vec<String>) -> CommonTlsContext {
    let matchers: Vec<StringMatcher> = sans
        .into_iter()
        .map(|s| StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(s)),
            ..Default::default()
        })
        .collect();
    match p.tls {
        TlsDelivery::Inline => CommonTlsContext {
            tls_params: Some(TlsParameters::default()),
            tls_certificates: vec![TlsCertificate {
                certificate_chain: inline(&p.certs.chain_pem),
                private_key: inline(&p.certs.key_pem),
                ..Default::default()
            }],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        trusted_ca: inline(&p.certs.roots_pem),
                        // v1.16 uses the deprecated field.
                        match_subject_alt_names: matchers,
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        },
        TlsDelivery::Sds => {
            let validation = if matchers.is_empty() {
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(sds(
                    ROOT_SECRET,
                ))
            } else {
                // Envoy's form for SDS roots plus SAN matching; SAN
                // matchers in the typed form newer Consul versions use.
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_typed_subject_alt_names: matchers
                                .into_iter()
                                .map(|m| SubjectAltNameMatcher {
                                    san_type: 3, // URI
                                    matcher: Some(m),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                        ..Default::default()
                    },
                )
            };
            CommonTlsContext {
                tls_params: Some(TlsParameters::default()),
                tls_certificate_sds_secret_configs: vec![sds(LEAF_SECRET)],
                validation_context_type: Some(validation),
                ..Default::default()
            }
        }
    }
}

fn upstream_tls(p: &Params, sni: &str, sans: Vec<String>) -> TransportSocket {
    TransportSocket {
        name: "tls".into(),
        config_type: Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                pack_any(UpstreamTlsContext {
                    common_tls_context: Some(common_tls(p, sans)),
                    sni: sni.into(),
                    ..Default::default()
                }),
            ),
        ),
    }
}

fn downstream_tls(p: &Params) -> TransportSocket {
    TransportSocket {
        name: "tls".into(),
        config_type: Some(
            envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(
                pack_any(DownstreamTlsContext {
                    common_tls_context: Some(common_tls(p, vec![])),
                    require_client_certificate: Some(BoolValue { value: true }),
                    ..Default::default()
                }),
            ),
        ),
    }
}

/// The SDS secrets (`connect-leaf`, `connect-root`) for [`TlsDelivery::Sds`].
pub fn secrets(p: &Params) -> Vec<Secret> {
    vec![
        Secret {
            name: LEAF_SECRET.into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&p.certs.chain_pem),
                private_key: inline(&p.certs.key_pem),
                ..Default::default()
            })),
        },
        Secret {
            name: ROOT_SECRET.into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&p.certs.roots_pem),
                    ..Default::default()
                },
            )),
        },
    ]
}

// ---------------------------------------------------------------- listeners

/// `exposed_path_<path>:<ip>:<port>`: one plain HTTP listener forwarding one
/// exact path to `cluster` (Consul's `Expose.Paths`, which consul-k8s fills
/// from the probes it overwrites), the shape of
/// `listeners/expose-paths-local-app-paths.latest.golden` (v1.16.0).
pub fn exposed_path_listener(addr: SocketAddr, path: &str, cluster: &str) -> Listener {
    use envoy_types::pb::envoy::config::route::v3::{
        route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
        VirtualHost,
    };
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager, http_filter, HttpConnectionManager, HttpFilter,
    };
    // Consul strips the non-alphanumerics of the path for the names.
    let clean: String = path.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let filter_name = format!("exposed_path_filter_{clean}_{}", addr.port());
    let hcm = HttpConnectionManager {
        stat_prefix: filter_name.clone(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: filter_name.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: filter_name,
                    domains: vec!["*".into()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Path(path.into())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                cluster.into(),
                            )),
                            ..Default::default()
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        tracing: Some(Default::default()),
        ..Default::default()
    };
    Listener {
        name: format!("exposed_path_{clean}:{}:{}", addr.ip(), addr.port()),
        address: Some(socket(addr)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

/// `public_listener:<addr>`: mTLS, `rbac` with `rules: {}`, `tcp_proxy` to
/// `local_app`.
pub fn public_listener(p: &Params) -> Listener {
    Listener {
        name: format!("public_listener:{}", p.public),
        address: Some(socket(p.public)),
        filter_chains: vec![FilterChain {
            filters: vec![
                rbac_filter(Some(Rbac::default())),
                tcp_proxy_filter("public_listener", "local_app"),
            ],
            transport_socket: Some(downstream_tls(p)),
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

fn explicit_listener(name: String, bind: SocketAddr, stat: &str, cluster: String) -> Listener {
    Listener {
        name,
        address: Some(socket(bind)),
        filter_chains: vec![FilterChain {
            filters: vec![tcp_proxy_filter(stat, &cluster)],
            ..Default::default()
        }],
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

fn db_listener(p: &Params) -> Listener {
    explicit_listener(
        format!("db:{}", p.db_bind),
        p.db_bind,
        &format!("upstream.db.default.default.{}", p.datacenter),
        p.sni("db"),
    )
}

fn geo_cache_listener(p: &Params) -> Listener {
    explicit_listener(
        format!("prepared_query:geo-cache:{}", p.geo_cache_bind),
        p.geo_cache_bind,
        "upstream.prepared_query_geo-cache",
        p.query_cluster(),
    )
}

fn prefix_chain(p: &Params, ips: &[IpAddr], svc: &str, cluster: String) -> FilterChain {
    FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            prefix_ranges: ips
                .iter()
                .map(|ip| CidrRange {
                    address_prefix: ip.to_string(),
                    prefix_len: Some(UInt32Value {
                        value: if ip.is_ipv4() { 32 } else { 128 },
                    }),
                })
                .collect(),
            ..Default::default()
        }),
        filters: vec![tcp_proxy_filter(
            &format!("upstream.{svc}.default.default.{}", p.datacenter),
            &cluster,
        )],
        ..Default::default()
    }
}

fn default_chain() -> FilterChain {
    FilterChain {
        filters: vec![tcp_proxy_filter(
            "upstream.original-destination",
            "original-destination",
        )],
        ..Default::default()
    }
}

fn outbound_listener(p: &Params, chains: Vec<FilterChain>, default: bool) -> Listener {
    Listener {
        name: format!("outbound_listener:{}", p.outbound),
        address: Some(socket(p.outbound)),
        filter_chains: chains,
        default_filter_chain: default.then(default_chain),
        listener_filters: vec![original_dst()],
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

// ---------------------------------------------------------------- clusters

fn eds_cluster(
    p: &Params,
    name: String,
    sans: Vec<String>,
    alt_stat: bool,
    timeout: i64,
) -> Cluster {
    let sni = name.clone();
    eds_cluster_sni(p, name, &sni, sans, alt_stat, timeout)
}

/// An EDS cluster whose SNI differs from its name (failover targets,
/// peers).
fn eds_cluster_sni(
    p: &Params,
    name: String,
    sni: &str,
    sans: Vec<String>,
    alt_stat: bool,
    timeout: i64,
) -> Cluster {
    Cluster {
        alt_stat_name: if alt_stat {
            name.clone()
        } else {
            String::new()
        },
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: ads(),
            ..Default::default()
        }),
        connect_timeout: secs(timeout),
        circuit_breakers: Some(CircuitBreakers::default()),
        outlier_detection: Some(OutlierDetection::default()),
        common_lb_config: alt_stat.then(|| cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Default::default()),
            ..Default::default()
        }),
        transport_socket: Some(upstream_tls(p, sni, sans)),
        name,
        ..Default::default()
    }
}

/// The EDS cluster of a service in the local datacenter.
pub fn service_cluster(p: &Params, svc: &str) -> Cluster {
    eds_cluster(p, p.sni(svc), vec![p.spiffe(&p.datacenter, svc)], true, 5)
}

fn geo_cache_cluster(p: &Params) -> Cluster {
    eds_cluster(
        p,
        p.query_cluster(),
        vec![
            p.spiffe("dc1", "geo-cache-target"),
            p.spiffe("dc2", "geo-cache-target"),
        ],
        false,
        5,
    )
}

/// `local_app`: STATIC, 5 s, one endpoint.
pub fn local_app_cluster(p: &Params) -> Cluster {
    static_cluster("local_app", p.local_app)
}

/// A STATIC cluster with one endpoint (`local_app`, `exposed_cluster_<port>`).
pub fn static_cluster(name: &str, addr: SocketAddr) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: secs(5),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(addr)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn original_dst_cluster(name: String, timeout: i64, tls: Option<TransportSocket>) -> Cluster {
    Cluster {
        name,
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        connect_timeout: secs(timeout),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        transport_socket: tls,
        ..Default::default()
    }
}

/// `original-destination`: ORIGINAL_DST, CLUSTER_PROVIDED, no TLS.
pub fn original_destination_cluster() -> Cluster {
    original_dst_cluster("original-destination".into(), 5, None)
}

fn passthrough_cluster(p: &Params, svc: &str, timeout: i64) -> Cluster {
    original_dst_cluster(
        format!("passthrough~{}", p.sni(svc)),
        timeout,
        Some(upstream_tls(
            p,
            &p.sni(svc),
            vec![p.spiffe(&p.datacenter, svc)],
        )),
    )
}

// ---------------------------------------------------------------- endpoints

/// An assignment as Consul writes it: HEALTHY, weight 1; `endpoints: [{}]`
/// when there are none.
pub fn load_assignment(cluster: &str, eps: &[SocketAddr]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: eps
                .iter()
                .map(|a| LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(socket(*a)),
                        ..Default::default()
                    })),
                    health_status: HealthStatus::Healthy as i32,
                    load_balancing_weight: Some(UInt32Value { value: 1 }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn eps(p: &Params, svc: &str) -> Vec<SocketAddr> {
    p.endpoints.get(svc).cloned().unwrap_or_default()
}

fn vips(p: &Params, svc: &str) -> Vec<IpAddr> {
    p.vips.get(svc).cloned().unwrap_or_default()
}

fn finish(p: &Params, mut x: ConsulXds) -> ConsulXds {
    if p.tls == TlsDelivery::Sds {
        x.secrets = secrets(p);
    }
    x
}

// ---------------------------------------------------------------- goldens

/// Mirrors `agent/xds/testdata/{listeners,clusters,endpoints}/transparent-proxy.latest.golden`
/// (Consul v1.16.0): explicit upstream `db`, prepared query `geo-cache`,
/// implicit upstream `google` on its virtual IPs, `no-endpoints` (a cluster
/// with no hosts and no chain), the default chain to `original-destination`,
/// and the public listener with `rules: {}`.
pub fn transparent_proxy(p: &Params) -> ConsulXds {
    let x = ConsulXds {
        listeners: vec![
            db_listener(p),
            outbound_listener(
                p,
                vec![prefix_chain(
                    p,
                    &vips(p, "google"),
                    "google",
                    p.sni("google"),
                )],
                true,
            ),
            geo_cache_listener(p),
            public_listener(p),
        ],
        clusters: vec![
            service_cluster(p, "db"),
            geo_cache_cluster(p),
            service_cluster(p, "google"),
            local_app_cluster(p),
            service_cluster(p, "no-endpoints"),
            original_destination_cluster(),
        ],
        endpoints: vec![
            load_assignment(&p.sni("db"), &eps(p, "db")),
            load_assignment(&p.query_cluster(), &eps(p, "geo-cache")),
            load_assignment(&p.sni("google"), &eps(p, "google")),
            load_assignment(&p.sni("no-endpoints"), &eps(p, "no-endpoints")),
        ],
        secrets: vec![],
        routes: vec![],
    };
    finish(p, x)
}

/// Mirrors `agent/xds/testdata/{listeners,clusters}/transparent-proxy-catalog-destinations-only.latest.golden`
/// (Consul v1.16.0): as [`transparent_proxy`], but `google` on its first
/// virtual IP only (10.0.0.1 in the golden), no default chain and no
/// `original-destination` cluster (mesh destinations only). Endpoints are
/// those of `transparent-proxy` (that golden has none).
pub fn transparent_proxy_catalog_destinations_only(p: &Params) -> ConsulXds {
    let google: Vec<IpAddr> = vips(p, "google").into_iter().take(1).collect();
    let mut x = transparent_proxy(p);
    x.listeners[1] = outbound_listener(
        p,
        vec![prefix_chain(p, &google, "google", p.sni("google"))],
        false,
    );
    x.clusters.retain(|c| c.name != "original-destination");
    x
}

/// Mirrors `agent/xds/testdata/{listeners,clusters}/transparent-proxy-dial-instances-directly.latest.golden`
/// (Consul v1.16.0): `kafka` dialed directly on its instance IPs only
/// (`passthrough~kafka…`), `mongo` on its virtual IP (EDS cluster, 33 s
/// connect timeout) and on its instance IPs (`passthrough~mongo…`, 33 s),
/// plus `db` and `geo-cache` as in [`transparent_proxy`]. That golden has
/// no endpoints; [`Params::endpoints`] gives kafka's and mongo's.
pub fn transparent_proxy_dial_instances_directly(p: &Params) -> ConsulXds {
    let inst = |s: &str| p.instances.get(s).cloned().unwrap_or_default();
    let mongo_sni = p.sni("mongo");
    let x = ConsulXds {
        listeners: vec![
            db_listener(p),
            outbound_listener(
                p,
                vec![
                    prefix_chain(
                        p,
                        &inst("mongo"),
                        "mongo",
                        format!("passthrough~{mongo_sni}"),
                    ),
                    prefix_chain(p, &vips(p, "mongo"), "mongo", mongo_sni.clone()),
                    prefix_chain(
                        p,
                        &inst("kafka"),
                        "kafka",
                        format!("passthrough~{}", p.sni("kafka")),
                    ),
                ],
                true,
            ),
            geo_cache_listener(p),
            public_listener(p),
        ],
        clusters: vec![
            service_cluster(p, "db"),
            geo_cache_cluster(p),
            service_cluster(p, "kafka"),
            local_app_cluster(p),
            eds_cluster(
                p,
                mongo_sni,
                vec![p.spiffe(&p.datacenter, "mongo")],
                true,
                33,
            ),
            original_destination_cluster(),
            passthrough_cluster(p, "kafka", 5),
            passthrough_cluster(p, "mongo", 33),
        ],
        endpoints: vec![
            load_assignment(&p.sni("db"), &eps(p, "db")),
            load_assignment(&p.query_cluster(), &eps(p, "geo-cache")),
            load_assignment(&p.sni("kafka"), &eps(p, "kafka")),
            load_assignment(&p.sni("mongo"), &eps(p, "mongo")),
        ],
        secrets: vec![],
        routes: vec![],
    };
    finish(p, x)
}

/// Mirrors `agent/xds/testdata/listeners/connect-proxy-with-tproxy-and-permissive-mtls.latest.golden`
/// (Consul v1.16.0): the outbound listener with only the default chain, and
/// the public listener with `original_dst` and a second, plain chain
/// matched on the local app's port (`permissive_public_listener`). Clusters
/// and endpoints (not in that golden) are those of [`transparent_proxy`]
/// for the upstreams it names.
pub fn connect_proxy_with_tproxy_and_permissive_mtls(p: &Params) -> ConsulXds {
    let mut public = public_listener(p);
    public.filter_chains.push(FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            destination_port: Some(UInt32Value {
                value: u32::from(p.local_app.port()),
            }),
            ..Default::default()
        }),
        filters: vec![tcp_proxy_filter("permissive_public_listener", "local_app")],
        ..Default::default()
    });
    public.listener_filters = vec![original_dst()];
    let x = ConsulXds {
        listeners: vec![
            db_listener(p),
            outbound_listener(p, vec![], true),
            geo_cache_listener(p),
            public,
        ],
        clusters: vec![
            service_cluster(p, "db"),
            geo_cache_cluster(p),
            local_app_cluster(p),
            original_destination_cluster(),
        ],
        endpoints: vec![
            load_assignment(&p.sni("db"), &eps(p, "db")),
            load_assignment(&p.query_cluster(), &eps(p, "geo-cache")),
        ],
        secrets: vec![],
        routes: vec![],
    };
    finish(p, x)
}

// ---------------------------------------------------------------- RBAC

/// `authenticated.principal_name.safe_regex` as Consul writes it for a
/// source service in the default namespace: any datacenter.
// Consul writes the deprecated `google_re2: {}` engine.
#[allow(deprecated)]
pub fn spiffe_principal(trust_domain: &str, svc: &str) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                        engine_type: Some(regex_matcher::EngineType::GoogleRe2(Default::default())),
                        regex: format!("^spiffe://{trust_domain}/ns/default/dc/[^/]+/svc/{svc}$"),
                    })),
                    ..Default::default()
                }),
            },
        )),
    }
}

fn not_id(p: Principal) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::NotId(Box::new(p))),
    }
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
    }
}

/// Consul's one L4 policy, `consul-intentions-layer4`, with `permissions: [{any: true}]`.
pub fn layer4_rules(action: rbac::Action, principals: Vec<Principal>) -> Rbac {
    let mut policies = std::collections::HashMap::new();
    policies.insert(
        "consul-intentions-layer4".to_string(),
        Policy {
            permissions: vec![Permission {
                rule: Some(permission::Rule::Any(true)),
            }],
            principals,
            ..Default::default()
        },
    );
    Rbac {
        action: action as i32,
        policies,
        ..Default::default()
    }
}

/// Mirrors `agent/xds/testdata/rbac/default-deny-one-allow.golden` (Consul
/// v1.16.0; trust domain `test.consul` there): ALLOW `web`.
pub fn rbac_default_deny_one_allow(trust_domain: &str) -> Filter {
    rbac_filter(Some(layer4_rules(
        rbac::Action::Allow,
        vec![spiffe_principal(trust_domain, "web")],
    )))
}

/// Mirrors `agent/xds/testdata/rbac/default-deny-mixed-precedence.golden`
/// (Consul v1.16.0), whose network filter is the same as
/// `default-deny-one-allow`'s: ALLOW `web`.
pub fn rbac_default_deny_mixed_precedence(trust_domain: &str) -> Filter {
    rbac_default_deny_one_allow(trust_domain)
}

/// Mirrors `agent/xds/testdata/rbac/default-allow-one-deny.golden` (Consul
/// v1.16.0): DENY `web`.
pub fn rbac_default_allow_one_deny(trust_domain: &str) -> Filter {
    rbac_filter(Some(layer4_rules(
        rbac::Action::Deny,
        vec![spiffe_principal(trust_domain, "web")],
    )))
}

/// Mirrors `agent/xds/testdata/rbac/default-deny-allow-deny.golden` (Consul
/// v1.16.0): ALLOW any service but `web` (`and_ids` of the wildcard and
/// `not_id`).
pub fn rbac_default_deny_allow_deny(trust_domain: &str) -> Filter {
    rbac_filter(Some(layer4_rules(
        rbac::Action::Allow,
        vec![and_ids(vec![
            spiffe_principal(trust_domain, "[^/]+"),
            not_id(spiffe_principal(trust_domain, "web")),
        ])],
    )))
}

/// Mirrors `agent/xds/testdata/rbac/default-deny-kitchen-sink.golden`
/// (Consul v1.16.0): ALLOW `cron`, `web`, and any service but `web`,
/// `unsafe` and `cron`.
pub fn rbac_default_deny_kitchen_sink(trust_domain: &str) -> Filter {
    rbac_filter(Some(layer4_rules(
        rbac::Action::Allow,
        vec![
            spiffe_principal(trust_domain, "cron"),
            spiffe_principal(trust_domain, "web"),
            and_ids(vec![
                spiffe_principal(trust_domain, "[^/]+"),
                not_id(spiffe_principal(trust_domain, "web")),
                not_id(spiffe_principal(trust_domain, "unsafe")),
                not_id(spiffe_principal(trust_domain, "cron")),
            ]),
        ],
    )))
}

// ---------------------------------------------------------------- sidecars

/// What [`sidecar`] builds: one transparent sidecar's resources in the
/// shapes of the `transparent-proxy` goldens above, for any set of
/// upstreams (the end-to-end tests serve these in network namespaces).
#[derive(Clone, Debug, Default)]
pub struct SidecarShape {
    /// Implicit upstreams reached on their virtual IPs (`p.vips`), with
    /// endpoints from `p.endpoints`.
    pub upstreams: Vec<String>,
    /// Upstreams whose instances are dialed directly (`p.instances`):
    /// `passthrough~<sni>` chains and clusters, as in
    /// `transparent-proxy-dial-instances-directly`.
    pub dialed_directly: Vec<String>,
    /// Explicit upstreams: `<svc>:<bind>` listeners.
    pub explicit: Vec<(String, SocketAddr)>,
    /// The default chain to `original-destination` (false: Consul's
    /// `MeshDestinationsOnly`).
    pub passthrough: bool,
    /// The public listener's network RBAC filter (`None`: `rules: {}`,
    /// deny all, as Consul writes it with default deny and no intention).
    pub rbac: Option<Filter>,
}

/// A transparent sidecar built from the golden shapes: public listener,
/// outbound listener (a VIP chain per upstream, instance chains for
/// dialed-directly ones, the default chain when `passthrough`), explicit
/// upstream listeners, and their clusters and endpoints.
pub fn sidecar(p: &Params, shape: &SidecarShape) -> ConsulXds {
    let mut chains = Vec::new();
    let mut clusters = vec![local_app_cluster(p)];
    let mut endpoints = Vec::new();
    let mut listeners = Vec::new();
    let mut eds = BTreeMap::new();
    for svc in &shape.dialed_directly {
        let inst = p.instances.get(svc).cloned().unwrap_or_default();
        chains.push(prefix_chain(
            p,
            &inst,
            svc,
            format!("passthrough~{}", p.sni(svc)),
        ));
        clusters.push(passthrough_cluster(p, svc, 5));
    }
    for svc in &shape.upstreams {
        chains.push(prefix_chain(p, &vips(p, svc), svc, p.sni(svc)));
        eds.insert(svc.clone(), ());
    }
    for (svc, bind) in &shape.explicit {
        listeners.push(explicit_listener(
            format!("{svc}:{bind}"),
            *bind,
            &format!("upstream.{svc}.default.default.{}", p.datacenter),
            p.sni(svc),
        ));
        eds.insert(svc.clone(), ());
    }
    for svc in eds.keys() {
        clusters.push(service_cluster(p, svc));
        endpoints.push(load_assignment(&p.sni(svc), &eps(p, svc)));
    }
    if shape.passthrough {
        clusters.push(original_destination_cluster());
    }
    listeners.push(outbound_listener(p, chains, shape.passthrough));
    let mut public = public_listener(p);
    if let Some(f) = &shape.rbac {
        public.filter_chains[0].filters[0] = f.clone();
    }
    listeners.push(public);
    finish(
        p,
        ConsulXds {
            listeners,
            clusters,
            endpoints,
            secrets: vec![],
            routes: vec![],
        },
    )
}

/// Consul's network RBAC allowing exactly `sources` (default deny), the
/// shape of `rbac/default-deny-one-allow` with one principal per source.
pub fn rbac_allow(trust_domain: &str, sources: &[&str]) -> Filter {
    rbac_filter(Some(layer4_rules(
        rbac::Action::Allow,
        sources
            .iter()
            .map(|s| spiffe_principal(trust_domain, s))
            .collect(),
    )))
}

impl ConsulXds {
    /// Sets every cluster's circuit-breaker `max_connections` (Consul's
    /// `limits.max_connections`; benchmarks raise it past Envoy's default
    /// of 1024 so that thousands of idle connections fit).
    pub fn set_max_connections(&mut self, n: u32) {
        use envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds;
        for c in &mut self.clusters {
            c.circuit_breakers = Some(CircuitBreakers {
                thresholds: vec![Thresholds {
                    max_connections: Some(UInt32Value { value: n }),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
}

/// consul-dataplane's bootstrap for `service`: the golden
/// `pkg/consuldp/testdata/TestBootstrapConfig/unix-socket-xds-server.golden`
/// (consul-dataplane HEAD 28a963a, MPL-2.0, copied to
/// `crates/veer-xds/tests/fixtures/bootstrap/`), with the node and cluster
/// of `service` (also in its fixed stats tags), the admin on
/// `127.0.0.1:<admin_port>` and the xDS server on the unix socket `socket`.
pub fn dataplane_bootstrap(service: &str, socket: &std::path::Path, admin_port: u16) -> String {
    let golden = include_str!(
        "../../veer-xds/tests/fixtures/bootstrap/dataplane-28a963a/unix-socket-xds-server.json"
    );
    let mut b: serde_json::Value = serde_json::from_str(golden).expect("golden JSON");
    b["node"]["id"] = format!("{service}-sidecar-proxy").into();
    b["node"]["cluster"] = service.into();
    b["admin"]["address"]["socket_address"]["port_value"] = admin_port.into();
    // Its fixed stats tags name the sidecar's service (the golden's is web).
    for t in b["stats_config"]["stats_tags"]
        .as_array_mut()
        .expect("stats_tags")
    {
        if ["local_cluster", "consul.source.service"]
            .contains(&t["tag_name"].as_str().unwrap_or(""))
        {
            t["fixed_value"] = service.into();
        }
    }
    let ep = &mut b["static_resources"]["clusters"][0]["loadAssignment"]["endpoints"][0]
        ["lbEndpoints"][0]["endpoint"]["address"]["pipe"]["path"];
    *ep = socket.display().to_string().into();
    b.to_string()
}

// ---------------------------------------------------------------- chains

/// `failover-target~<i>~<of>`: the EDS cluster of target `i` of aggregate
/// `of`, with the target's own SNI and SAN (clusters goldens
/// `connect-proxy-with-chain-and-failover*`, Consul v1.16.0).
pub fn failover_target_cluster(
    p: &Params,
    i: usize,
    of: &str,
    sni: &str,
    san: String,
    timeout: i64,
) -> Cluster {
    eds_cluster_sni(
        p,
        format!("failover-target~{i}~{of}"),
        sni,
        vec![san],
        true,
        timeout,
    )
}

/// An `envoy.clusters.aggregate` cluster naming `members` in failover
/// order, as Consul writes it (`altStatName` = its name, CLUSTER_PROVIDED,
/// the chain's connect timeout).
pub fn aggregate_cluster(name: &str, members: &[String], timeout: i64) -> Cluster {
    use envoy_types::pb::envoy::extensions::clusters::aggregate::v3::ClusterConfig;
    Cluster {
        name: name.into(),
        alt_stat_name: name.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::ClusterType(
            cluster::CustomClusterType {
                name: "envoy.clusters.aggregate".into(),
                typed_config: Some(pack_any(ClusterConfig {
                    clusters: members.to_vec(),
                })),
            },
        )),
        connect_timeout: secs(timeout),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    }
}

/// An assignment whose endpoints all have `health` (the `-triggered`
/// goldens mark a failed target's instances UNHEALTHY).
pub fn load_assignment_with(
    cluster: &str,
    eps: &[SocketAddr],
    health: HealthStatus,
) -> ClusterLoadAssignment {
    let mut la = load_assignment(cluster, eps);
    for loc in &mut la.endpoints {
        for e in &mut loc.lb_endpoints {
            e.health_status = health as i32;
        }
    }
    la
}

/// `db` with an aggregate failover cluster over `targets` (datacenter,
/// service, endpoints), with the explicit `db` listener and `local_app`;
/// the common shape of the chain-failover goldens below.
fn db_failover(p: &Params, targets: &[(&str, &str, Vec<SocketAddr>)]) -> ConsulXds {
    let db = p.sni("db");
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    let mut members = Vec::new();
    for (i, (dc, svc, eps)) in targets.iter().enumerate() {
        let sni = format!("{svc}.default.{dc}.internal.{}", p.trust_domain);
        let c = failover_target_cluster(p, i, &db, &sni, p.spiffe(dc, svc), 33);
        members.push(c.name.clone());
        endpoints.push(load_assignment(&c.name, eps));
        clusters.push(c);
    }
    clusters.insert(0, aggregate_cluster(&db, &members, 33));
    clusters.push(local_app_cluster(p));
    finish(
        p,
        ConsulXds {
            listeners: vec![db_listener(p), public_listener(p)],
            clusters,
            endpoints,
            routes: vec![],
            secrets: vec![],
        },
    )
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints}/connect-proxy-with-chain-and-failover.latest.golden`
/// (Consul v1.16.0): `db`'s chain fails over to service `fail` in the same
/// datacenter: aggregate `db.default.dc1…` over `failover-target~0~` (db,
/// 10.10.1.1-2:8080) and `failover-target~1~` (fail, 10.20.1.1-2:8080),
/// 33 s. (The golden's `geo-cache` query cluster is left out: it is
/// covered by [`transparent_proxy`].)
pub fn connect_proxy_with_chain_and_failover(p: &Params) -> ConsulXds {
    db_failover(
        p,
        &[
            (
                "dc1",
                "db",
                vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
            ),
            (
                "dc1",
                "fail",
                vec![sa("10.20.1.1:8080"), sa("10.20.1.2:8080")],
            ),
        ],
    )
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints}/connect-proxy-with-tcp-chain-failover-through-remote-gateway.latest.golden`
/// (Consul v1.16.0): `db` fails over to `db` in dc2 through dc2's mesh
/// gateways (198.18.1.1-2:443) with dc2's SNI and identity.
pub fn connect_proxy_with_tcp_chain_failover_through_remote_gateway(p: &Params) -> ConsulXds {
    db_failover(
        p,
        &[
            (
                "dc1",
                "db",
                vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
            ),
            (
                "dc2",
                "db",
                vec![sa("198.18.1.1:443"), sa("198.18.1.2:443")],
            ),
        ],
    )
}

/// Mirrors `agent/xds/testdata/endpoints/connect-proxy-with-tcp-chain-failover-through-remote-gateway-triggered.latest.golden`
/// (Consul v1.16.0): as [`connect_proxy_with_tcp_chain_failover_through_remote_gateway`],
/// with dc1's instances UNHEALTHY.
pub fn connect_proxy_with_tcp_chain_failover_through_remote_gateway_triggered(
    p: &Params,
) -> ConsulXds {
    let mut x = connect_proxy_with_tcp_chain_failover_through_remote_gateway(p);
    let first = x.endpoints[0].cluster_name.clone();
    x.endpoints[0] = load_assignment_with(
        &first,
        &[sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
        HealthStatus::Unhealthy,
    );
    x
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints}/connect-proxy-with-tcp-chain-failover-through-local-gateway.latest.golden`
/// (Consul v1.16.0): `db` fails over to dc2 through the local datacenter's
/// mesh gateways (10.10.1.1-2:8443) with dc2's SNI and identity.
pub fn connect_proxy_with_tcp_chain_failover_through_local_gateway(p: &Params) -> ConsulXds {
    db_failover(
        p,
        &[
            (
                "dc1",
                "db",
                vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
            ),
            (
                "dc2",
                "db",
                vec![sa("10.10.1.1:8443"), sa("10.10.1.2:8443")],
            ),
        ],
    )
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints}/connect-proxy-with-tcp-chain-double-failover-through-remote-gateway.latest.golden`
/// (Consul v1.16.0): three targets (dc1, dc2, dc3); that endpoints golden
/// has no assignment for `failover-target~1~` (dc2): Consul leaves a
/// target out when it knows no gateway for it.
pub fn connect_proxy_with_tcp_chain_double_failover_through_remote_gateway(
    p: &Params,
) -> ConsulXds {
    let mut x = db_failover(
        p,
        &[
            (
                "dc1",
                "db",
                vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
            ),
            ("dc2", "db", vec![]),
            (
                "dc3",
                "db",
                vec![sa("198.38.1.1:443"), sa("198.38.1.2:443")],
            ),
        ],
    );
    x.endpoints.remove(1);
    x
}

/// The peer's trust domain in the peering goldens.
pub const PEER_TRUST_DOMAIN: &str = "1c053652-8512-4373-90cf-5a7f6263a994.consul";

/// An EDS or DNS cluster to a peer's service, with the peer's roots
/// (inline, whatever `p.tls` says: they are not the local CA's).
fn peer_tls_params(p: &Params, peer_roots_pem: &str) -> Params {
    let mut pp = p.clone();
    pp.certs.roots_pem = peer_roots_pem.to_string();
    pp.tls = TlsDelivery::Inline;
    pp
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints,listeners}/connect-proxy-with-chain-and-redirect-to-cluster-peer.latest.golden`
/// (Consul v1.16.0): `db` redirected to peer `cluster-01`: one EDS cluster
/// `db.default.cluster-01.external.peer1.domain` with the peer's SNI,
/// SPIFFE ID (its dc2) and roots (`peer_roots_pem`), endpoint
/// 10.40.1.1:8080.
pub fn connect_proxy_with_chain_and_redirect_to_cluster_peer(
    p: &Params,
    peer_roots_pem: &str,
) -> ConsulXds {
    let pp = peer_tls_params(p, peer_roots_pem);
    let name = "db.default.cluster-01.external.peer1.domain".to_string();
    let sni = format!("db.default.default.cluster-01.external.{PEER_TRUST_DOMAIN}");
    let san = format!("spiffe://{PEER_TRUST_DOMAIN}/ns/default/dc/dc2/svc/db");
    let listener = explicit_listener(
        format!("db:{}", p.db_bind),
        p.db_bind,
        &format!("upstream.db.default.default.{}", p.datacenter),
        name.clone(),
    );
    finish(
        p,
        ConsulXds {
            listeners: vec![listener, public_listener(p)],
            clusters: vec![
                eds_cluster_sni(&pp, name.clone(), &sni, vec![san], true, 33),
                local_app_cluster(p),
            ],
            endpoints: vec![load_assignment(&name, &[sa("10.40.1.1:8080")])],
            routes: vec![],
            secrets: vec![],
        },
    )
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints}/connect-proxy-with-chain-and-failover-to-cluster-peer.latest.golden`
/// (Consul v1.16.0): `db` (10.10.1.1-2:8080) fails over to `db` of peer
/// `cluster-01` (10.40.1.1:8080, the peer's SNI, SPIFFE ID and roots).
pub fn connect_proxy_with_chain_and_failover_to_cluster_peer(
    p: &Params,
    peer_roots_pem: &str,
) -> ConsulXds {
    let mut x = db_failover(
        p,
        &[
            (
                "dc1",
                "db",
                vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")],
            ),
            ("dc1", "db", vec![sa("10.40.1.1:8080")]),
        ],
    );
    let pp = peer_tls_params(p, peer_roots_pem);
    let sni = format!("db.default.default.cluster-01.external.{PEER_TRUST_DOMAIN}");
    let san = format!("spiffe://{PEER_TRUST_DOMAIN}/ns/default/dc/dc2/svc/db");
    x.clusters[2] = failover_target_cluster(&pp, 1, &p.sni("db"), &sni, san, 33);
    x
}

/// A `LOGICAL_DNS` cluster to a peer's service behind a gateway known by
/// hostname, as in `clusters/connect-proxy-with-peered-upstreams.latest.golden`
/// (Consul v1.16.0): one HEALTHY host, `dnsRefreshRate` 10 s, `V4_ONLY`.
pub fn peer_dns_cluster(
    p: &Params,
    peer_roots_pem: &str,
    svc: &str,
    host: &str,
    port: u16,
) -> Cluster {
    use envoy_types::pb::envoy::config::core::v3::SocketAddress;
    let pp = peer_tls_params(p, peer_roots_pem);
    let name = format!("{svc}.default.cloud.external.{PEER_TRUST_DOMAIN}");
    let sni = format!("{svc}.default.default.cloud.external.{PEER_TRUST_DOMAIN}");
    let san = format!("spiffe://{PEER_TRUST_DOMAIN}/ns/default/dc/cloud-dc/svc/{svc}");
    let mut la = load_assignment(&name, &[]);
    la.endpoints[0].lb_endpoints = vec![LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: host.into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        health_status: HealthStatus::Healthy as i32,
        load_balancing_weight: Some(UInt32Value { value: 1 }),
        ..Default::default()
    }];
    #[allow(deprecated)] // Consul v1.16 writes these fields.
    Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::LogicalDns as i32,
        )),
        connect_timeout: secs(5),
        load_assignment: Some(la),
        circuit_breakers: Some(CircuitBreakers::default()),
        dns_refresh_rate: secs(10),
        dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
        outlier_detection: Some(OutlierDetection::default()),
        common_lb_config: Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Default::default()),
            ..Default::default()
        }),
        transport_socket: Some(upstream_tls(&pp, &sni, vec![san])),
        ..Default::default()
    }
}

/// Mirrors `agent/xds/testdata/{clusters,endpoints,listeners}/connect-proxy-with-peered-upstreams.latest.golden`
/// (Consul v1.16.0): `payments` of peer `cloud` behind a gateway known by
/// hostname (`LOGICAL_DNS` 123.us-east-1.elb.notaws.com:8443) and `refunds`
/// (EDS, 106.96.90.233:443), both with the peer's roots. The golden binds
/// both listeners to 127.0.0.1:9090; here `refunds` is on 127.0.0.1:9091
/// (one address, one listener).
pub fn connect_proxy_with_peered_upstreams(p: &Params, peer_roots_pem: &str) -> ConsulXds {
    let pp = peer_tls_params(p, peer_roots_pem);
    let payments = peer_dns_cluster(
        p,
        peer_roots_pem,
        "payments",
        "123.us-east-1.elb.notaws.com",
        8443,
    );
    let refunds = format!("refunds.default.cloud.external.{PEER_TRUST_DOMAIN}");
    let refunds_sni = format!("refunds.default.default.cloud.external.{PEER_TRUST_DOMAIN}");
    let refunds_san = format!("spiffe://{PEER_TRUST_DOMAIN}/ns/default/dc/cloud-dc/svc/refunds");
    let mut refunds_cluster = eds_cluster_sni(
        &pp,
        refunds.clone(),
        &refunds_sni,
        vec![refunds_san],
        false,
        5,
    );
    refunds_cluster.common_lb_config = Some(cluster::CommonLbConfig {
        healthy_panic_threshold: Some(Default::default()),
        ..Default::default()
    });
    let listeners = vec![
        explicit_listener(
            "payments?peer=cloud:127.0.0.1:9090".into(),
            sa("127.0.0.1:9090"),
            "upstream_peered.payments.default.cloud",
            payments.name.clone(),
        ),
        explicit_listener(
            "refunds?peer=cloud:127.0.0.1:9091".into(),
            sa("127.0.0.1:9091"),
            "upstream_peered.refunds.default.cloud",
            refunds.clone(),
        ),
        public_listener(p),
    ];
    finish(
        p,
        ConsulXds {
            listeners,
            clusters: vec![local_app_cluster(p), payments, refunds_cluster],
            endpoints: vec![load_assignment(&refunds, &[sa("106.96.90.233:443")])],
            routes: vec![],
            secrets: vec![],
        },
    )
}
