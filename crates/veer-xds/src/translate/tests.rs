//! Table tests of the translation: Consul-shaped resources (from
//! `veer_testsupport::consul_xds`, mirroring Consul v1.16.0's goldens) in,
//! a `Spec` (or the NACK reason) out.
use super::*;
use envoy_types::pb::envoy::config::cluster::v3::cluster;
use envoy_types::pb::envoy::config::core::v3::{
    data_source, transport_socket, DataSource, HealthStatus, TransportSocket,
};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, LbEndpoint, LocalityLbEndpoints};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, ListenerFilter};
use envoy_types::pb::envoy::config::rbac::v3::{permission, principal, rbac, Permission};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context, tls_parameters, DownstreamTlsContext, UpstreamTlsContext,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;
use prost::Name;
use std::net::SocketAddr;
use std::time::Duration;
use veer_core::authz::{Peer, Principal, Rbac, RbacPolicy, RbacRules, StringMatch};
use veer_core::snapshot::Snapshot;
use veer_testsupport::consul_xds::{self as cx, ConsulXds, Params, TlsDelivery};

const TD: &str = veer_testsupport::ca::TRUST_DOMAIN;

fn params() -> Params {
    let ca = veer_ca::Ca::new_root(TD).expect("ca");
    Params::golden(cx::Certs::issue(&ca, "dc1", "web"))
}

/// Every resource through `decode`, as the ADS client would store them.
fn load(x: &ConsulXds) -> Resources {
    let mut res = Resources::default();
    for (url, name, any) in x.resources() {
        let kind = Kind::from_type_url(&url).expect("kind");
        let d = decode(kind, &name, &any).unwrap_or_else(|e| panic!("{e}"));
        res.insert(name, d);
    }
    res
}

fn spec_of(x: &ConsulXds) -> Spec {
    let spec = translate(&load(x)).unwrap_or_else(|e| panic!("{e}"));
    // The spec is usable: the leaf chains to the roots, no VIP clash.
    Snapshot::build(spec.clone(), 1).unwrap_or_else(|e| panic!("snapshot: {e}"));
    spec
}

fn up<'a>(spec: &'a Spec, svc: &str) -> &'a UpstreamSpec {
    spec.upstreams
        .iter()
        .find(|u| u.identity.service == svc)
        .unwrap_or_else(|| panic!("no upstream {svc} in {:?}", spec.upstreams))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn web(dc: &str, svc: &str) -> String {
    format!("spiffe://{TD}/ns/default/dc/{dc}/svc/{svc}")
}

/// Decodes one listener as sent (for refusal tests).
fn decode_listener(l: &Listener) -> Result<Decoded, TranslateError> {
    decode(Kind::Listener, &l.name, &pack_any(l.clone()))
}

fn decode_cluster(c: &Cluster) -> Result<Decoded, TranslateError> {
    decode(Kind::Cluster, &c.name, &pack_any(c.clone()))
}

fn refused(r: Result<Decoded, TranslateError>) -> String {
    match r {
        Err(e @ TranslateError::Refused { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn invalid(r: Result<Decoded, TranslateError>) -> String {
    match r {
        Err(e @ TranslateError::Invalid { .. }) => e.to_string(),
        other => panic!("expected invalid, got {other:?}"),
    }
}

fn typed(name: &str, type_url: &str) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::TypedConfig(Any {
            type_url: type_url.into(),
            value: vec![],
        })),
    }
}

fn public(x: &mut ConsulXds) -> &mut Listener {
    x.public_listener_mut()
}

// ------------------------------------------------------------ mappings

#[test]
fn transparent_proxy_golden_maps_to_spec() {
    let p = params();
    let spec = spec_of(&cx::transparent_proxy(&p));
    assert_eq!(spec.identity.to_string(), web("dc1", "web"));
    assert_eq!(spec.source, "xds");
    assert_eq!(spec.listen.inbound, sa("0.0.0.0:9999"));
    assert_eq!(spec.listen.outbound, vec![sa("127.0.0.1:15001")]);
    assert_eq!(spec.local_app, sa("127.0.0.1:8080"));
    assert_eq!(spec.timeouts.local_connect, Duration::from_secs(5));
    assert!(!spec.mesh_destinations_only);
    assert_eq!(spec.roots.len(), 1);
    assert_eq!(spec.chain.len(), 1);
    // `rules: {}`: one ALLOW filter with no policy, which denies everything.
    assert_eq!(
        spec.rbac,
        Some(vec![RbacRules {
            action: Action::Allow,
            policies: vec![]
        }])
    );
    assert!(spec.permissive_ports.is_empty());
    assert_eq!(spec.inbound_max_connections, None);

    // db: explicit upstream listener only.
    let db = up(&spec, "db");
    assert_eq!(db.local_bind, Some(sa("127.0.0.1:9191")));
    assert!(db.virtual_ips.is_empty());
    assert_eq!(
        db.endpoints,
        vec![sa("10.10.1.1:8080"), sa("10.10.1.2:8080")]
    );
    assert!(db.endpoint_weights.is_empty(), "all weights 1");
    assert_eq!(db.sni.as_deref(), Some(p.sni("db").as_str()));
    assert_eq!(db.san_matchers, vec![StringMatch::exact(web("dc1", "db"))]);
    assert_eq!(db.roots, None, "same roots as the listener");
    assert_eq!(db.connect_timeout, Some(Duration::from_secs(5)));
    assert_eq!(db.protocol, Protocol::Tcp);

    // google: implicit upstream on its virtual IPs.
    let g = up(&spec, "google");
    assert_eq!(g.virtual_ips, vec![ip("10.0.0.1"), ip("240.0.0.1")]);
    assert_eq!(g.destination_port, None);
    assert_eq!(g.local_bind, None);
    assert_eq!(g.endpoints, vec![sa("9.9.9.9:9090")]);

    // geo-cache: prepared query, two acceptable identities, its own SNI.
    let q = up(&spec, "geo-cache-target");
    assert_eq!(q.local_bind, Some(sa("127.10.10.10:8181")));
    assert_eq!(q.identity.datacenter, "dc1");
    assert_eq!(
        q.sni.as_deref(),
        Some(format!("geo-cache.default.dc1.query.{TD}").as_str())
    );
    assert_eq!(
        q.san_matchers,
        vec![
            StringMatch::exact(web("dc1", "geo-cache-target")),
            StringMatch::exact(web("dc2", "geo-cache-target"))
        ]
    );
    // no-endpoints has no chain and no listener: not an upstream.
    assert_eq!(spec.upstreams.len(), 3);
}

/// Consul repeats the same inline leaf and roots in the public listener and
/// in every upstream cluster: what the ADS client keeps holds them once,
/// and frees them with the last resource that holds them.
#[test]
fn inline_certificates_are_kept_once_and_freed_with_their_resources() {
    let p = params();
    let res = load(&cx::transparent_proxy(&p));
    let mut leaves = Vec::new();
    let mut roots = Vec::new();
    for l in res.listeners.values() {
        if let ListenerModel::Public(pl) = &l.model {
            leaves.push(pl.tls.leaf.clone());
            roots.push(pl.tls.roots.clone());
        }
    }
    for c in res.clusters.values() {
        if let Some(tls) = cluster_tls(c) {
            leaves.push(tls.leaf.clone());
            roots.push(tls.roots.clone());
        }
    }
    assert!(leaves.len() >= 4, "{} leaves", leaves.len());
    let leaf: Vec<Arc<Leaf>> = leaves
        .into_iter()
        .map(|l| match l {
            LeafSource::Inline(a) => a,
            LeafSource::Sds(n) => panic!("SDS leaf {n} in the inline golden"),
        })
        .collect();
    let root: Vec<InlineRoots> = roots
        .into_iter()
        .map(|r| match r {
            RootsSource::Inline(a) => a,
            RootsSource::Sds(n) => panic!("SDS roots {n} in the inline golden"),
        })
        .collect();
    assert!(leaf.iter().all(|l| Arc::ptr_eq(l, &leaf[0])), "leaf copies");
    assert!(
        root.iter().all(|r| Arc::ptr_eq(r, &root[0])),
        "roots copies"
    );
    let (weak_leaf, weak_roots) = (Arc::downgrade(&leaf[0]), Arc::downgrade(&root[0]));
    drop((leaf, root));
    assert!(weak_leaf.upgrade().is_some(), "the resources still hold it");
    drop(res);
    assert!(
        weak_leaf.upgrade().is_none(),
        "the leaf outlived its resources"
    );
    assert!(
        weak_roots.upgrade().is_none(),
        "the roots outlived their resources"
    );
}

#[test]
fn catalog_destinations_only_sets_mesh_destinations_only() {
    let spec = spec_of(&cx::transparent_proxy_catalog_destinations_only(&params()));
    assert!(spec.mesh_destinations_only);
    assert_eq!(up(&spec, "google").virtual_ips, vec![ip("10.0.0.1")]);
}

#[test]
fn dial_instances_directly_maps_passthrough_chains_to_instances() {
    let spec = spec_of(&cx::transparent_proxy_dial_instances_directly(&params()));
    let mongo = up(&spec, "mongo");
    assert_eq!(mongo.virtual_ips, vec![ip("6.6.6.6")]);
    assert!(mongo.dialed_directly);
    assert_eq!(mongo.instances, vec![ip("10.10.10.10"), ip("10.10.10.12")]);
    assert_eq!(mongo.connect_timeout, Some(Duration::from_secs(33)));
    assert_eq!(mongo.endpoints, vec![sa("10.10.3.1:8080")]);
    let kafka = up(&spec, "kafka");
    assert!(kafka.virtual_ips.is_empty());
    assert!(kafka.dialed_directly);
    assert_eq!(kafka.instances, vec![ip("9.9.9.9")]);
    assert_eq!(kafka.endpoints, vec![sa("10.10.2.1:8080")]);
    assert_eq!(spec.upstreams.len(), 4, "{:?}", spec.upstreams);
}

#[test]
fn permissive_mtls_chain_gives_permissive_port() {
    let spec = spec_of(&cx::connect_proxy_with_tproxy_and_permissive_mtls(&params()));
    assert_eq!(spec.permissive_ports, vec![8080]);
    assert!(!spec.mesh_destinations_only);
    assert_eq!(spec.upstreams.len(), 2);
}

#[test]
fn permissive_chain_to_another_cluster_is_inconsistent() {
    let p = params();
    let mut x = cx::connect_proxy_with_tproxy_and_permissive_mtls(&p);
    x.clusters
        .push(cx::static_cluster("other_app", sa("127.0.0.1:8081")));
    public(&mut x).filter_chains[1].filters[0] =
        cx::tcp_proxy_filter("permissive_public_listener", "other_app");
    let e = translate(&load(&x)).unwrap_err();
    assert_eq!(e.classify(), "inconsistent");
    assert!(e.to_string().contains("permissive"), "{e}");
}

#[test]
fn sds_secrets_are_wanted_then_resolved() {
    let mut p = params();
    p.tls = TlsDelivery::Sds;
    let x = cx::transparent_proxy(&p);
    let mut without = x.clone();
    without.secrets.clear();
    let res = load(&without);
    let w = wanted(&res);
    assert_eq!(
        w.secrets.iter().map(String::as_str).collect::<Vec<_>>(),
        vec!["connect-leaf", "connect-root"]
    );
    assert_eq!(
        missing(&res),
        vec![
            "secret connect-leaf (SDS)".to_string(),
            "secret connect-root (SDS)".to_string()
        ]
    );
    assert_eq!(translate(&res).unwrap_err().classify(), "incomplete");
    let spec = spec_of(&x);
    let inline = spec_of(&cx::transparent_proxy(&Params {
        tls: TlsDelivery::Inline,
        ..p.clone()
    }));
    assert_eq!(spec.identity, inline.identity);
    assert_eq!(spec.roots, inline.roots);
    assert_eq!(spec.chain, inline.chain);
    // Typed SAN matchers (combined validation context) map like the old form.
    assert_eq!(
        up(&spec, "db").san_matchers,
        vec![StringMatch::exact(web("dc1", "db"))]
    );
}

#[test]
fn wanted_names_every_eds_cluster_and_no_routes() {
    let p = params();
    let w = wanted(&load(&cx::transparent_proxy(&p)));
    let want: BTreeSet<String> = [
        p.sni("db"),
        format!("geo-cache.default.dc1.query.{TD}"),
        p.sni("google"),
        p.sni("no-endpoints"),
    ]
    .into_iter()
    .collect();
    assert_eq!(w.endpoints, want);
    assert!(w.routes.is_empty());
    assert!(w.secrets.is_empty(), "inline TLS");
}

#[test]
fn eds_service_name_is_what_eds_is_requested_by() {
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    let name = p.sni("google");
    x.cluster_mut(&name)
        .eds_cluster_config
        .as_mut()
        .unwrap()
        .service_name = "google-eds".into();
    for e in &mut x.endpoints {
        if e.cluster_name == name {
            e.cluster_name = "google-eds".into();
        }
    }
    let res = load(&x);
    assert!(wanted(&res).endpoints.contains("google-eds"));
    let spec = translate(&res).unwrap();
    assert_eq!(up(&spec, "google").endpoints, vec![sa("9.9.9.9:9090")]);
}

#[test]
fn missing_says_what_a_first_config_waits_for() {
    let p = params();
    let x = cx::transparent_proxy(&p);
    assert_eq!(
        missing(&Resources::default()),
        vec!["the public listener (LDS)".to_string()]
    );
    let mut only_listeners = x.clone();
    only_listeners.clusters.clear();
    only_listeners.endpoints.clear();
    let m = missing(&load(&only_listeners));
    assert!(
        m.contains(
            &"cluster local_app (CDS), named by listener public_listener:0.0.0.0:9999".into()
        ),
        "{m:?}"
    );
    assert!(m
        .iter()
        .any(|s| s.starts_with(&format!("cluster {} (CDS)", p.sni("google")))));
    let mut no_eds = x.clone();
    no_eds.endpoints.clear();
    let m = missing(&load(&no_eds));
    assert_eq!(
        m,
        vec![
            format!("endpoints {} (EDS)", p.sni("db")),
            format!("endpoints geo-cache.default.dc1.query.{TD} (EDS)"),
            format!("endpoints {} (EDS)", p.sni("google")),
        ],
        "no-endpoints is not referenced, so not waited for"
    );
    match translate(&load(&no_eds)) {
        Err(TranslateError::Incomplete(v)) => assert_eq!(v, m),
        other => panic!("{other:?}"),
    }
    assert!(missing(&load(&x)).is_empty());
}

#[test]
fn refused_endpoints_are_none_not_missing() {
    let p = params();
    let x = cx::transparent_proxy(&p);
    let mut res = load(&x);
    let g = p.sni("google");
    res.endpoints.remove(&g);
    assert_eq!(missing(&res), vec![format!("endpoints {g} (EDS)")]);
    res.refused
        .insert((Kind::Endpoints, g.clone()), "bad address".into());
    assert!(missing(&res).is_empty());
    let spec = translate(&res).unwrap_or_else(|e| panic!("{e}"));
    let up = spec
        .upstreams
        .iter()
        .find(|u| u.sni.as_deref() == Some(g.as_str()))
        .expect("google is still an upstream");
    assert!(up.endpoints.is_empty());
    // A refused secret is still waited for, and says why.
    let mut p = params();
    p.tls = TlsDelivery::Sds;
    let mut res = load(&cx::transparent_proxy(&p));
    let name = res.secrets.keys().next().cloned().expect("SDS secrets");
    res.secrets.remove(&name);
    res.refused
        .insert((Kind::Secret, name.clone()), "bad PEM".into());
    let m = missing(&res);
    assert!(
        m.iter().any(|w| w.contains(&name) && w.contains("bad PEM")),
        "{m:?}"
    );
}

#[test]
fn empty_assignment_is_an_upstream_without_hosts() {
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    // Give no-endpoints (`endpoints: [{}]`) a virtual IP.
    let ol = x.listener_mut("outbound_listener:127.0.0.1:15001");
    let mut chain = ol.filter_chains[0].clone();
    chain
        .filter_chain_match
        .as_mut()
        .unwrap()
        .prefix_ranges
        .truncate(1);
    chain.filter_chain_match.as_mut().unwrap().prefix_ranges[0].address_prefix = "10.0.0.9".into();
    chain.filters[0] = cx::tcp_proxy_filter("upstream.no-endpoints", &p.sni("no-endpoints"));
    ol.filter_chains.push(chain);
    let spec = spec_of(&x);
    let ne = up(&spec, "no-endpoints");
    assert!(ne.endpoints.is_empty());
    assert_eq!(ne.virtual_ips, vec![ip("10.0.0.9")]);
}

fn lbe(addr: &str, health: HealthStatus, weight: Option<u32>) -> LbEndpoint {
    let mut la = cx::load_assignment("x", &[sa(addr)]);
    let mut e = la.endpoints[0].lb_endpoints.remove(0);
    e.health_status = health as i32;
    e.load_balancing_weight = weight.map(|value| UInt32Value { value });
    e
}

#[test]
fn endpoints_use_health_weights_and_priorities() {
    let p = params();
    let name = p.sni("google");
    // (lb endpoints per priority, expected addresses, expected weights)
    type Row = (Vec<(u32, Vec<LbEndpoint>)>, Vec<&'static str>, Vec<u32>);
    let rows: Vec<Row> = vec![
        (
            vec![(
                0,
                vec![
                    lbe("10.1.0.1:1", HealthStatus::Healthy, Some(1)),
                    lbe("10.1.0.2:1", HealthStatus::Unhealthy, Some(1)),
                    lbe("10.1.0.3:1", HealthStatus::Unknown, None),
                    lbe("10.1.0.4:1", HealthStatus::Draining, Some(1)),
                    lbe("10.1.0.5:1", HealthStatus::Degraded, Some(1)),
                ],
            )],
            vec!["10.1.0.1:1", "10.1.0.3:1"],
            vec![],
        ),
        (
            vec![(
                0,
                vec![
                    lbe("10.1.0.1:1", HealthStatus::Healthy, Some(3)),
                    lbe("10.1.0.2:1", HealthStatus::Healthy, Some(1)),
                ],
            )],
            vec!["10.1.0.1:1", "10.1.0.2:1"],
            vec![3, 1],
        ),
        (
            // Priority 0 has no usable host: priority 1 takes over.
            vec![
                (0, vec![lbe("10.1.0.1:1", HealthStatus::Unhealthy, Some(1))]),
                (1, vec![lbe("10.2.0.1:1", HealthStatus::Healthy, Some(1))]),
            ],
            vec!["10.2.0.1:1"],
            vec![],
        ),
        (
            vec![
                (1, vec![lbe("10.2.0.1:1", HealthStatus::Healthy, Some(1))]),
                (0, vec![lbe("10.1.0.1:1", HealthStatus::Healthy, Some(1))]),
            ],
            vec!["10.1.0.1:1"],
            vec![],
        ),
    ];
    for (i, (locs, want, weights)) in rows.into_iter().enumerate() {
        let mut x = cx::transparent_proxy(&p);
        let la = x
            .endpoints
            .iter_mut()
            .find(|e| e.cluster_name == name)
            .unwrap();
        la.endpoints = locs
            .into_iter()
            .map(|(priority, lb_endpoints)| LocalityLbEndpoints {
                priority,
                lb_endpoints,
                ..Default::default()
            })
            .collect();
        let spec = spec_of(&x);
        let g = up(&spec, "google");
        let want: Vec<SocketAddr> = want.iter().map(|s| sa(s)).collect();
        assert_eq!(g.endpoints, want, "row {i}");
        assert_eq!(g.endpoint_weights, weights, "row {i}");
    }
}

#[test]
fn cluster_settings_map_or_are_approximated() {
    let p = params();
    let name = p.sni("google");
    for lb in [
        cluster::LbPolicy::RoundRobin,
        cluster::LbPolicy::RingHash,
        cluster::LbPolicy::LeastRequest,
        cluster::LbPolicy::Maglev,
        cluster::LbPolicy::Random,
    ] {
        let mut x = cx::transparent_proxy(&p);
        let c = x.cluster_mut(&name);
        c.lb_policy = lb as i32;
        c.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 2,
            nanos: 500_000_000,
        });
        c.circuit_breakers = Some(
            envoy_types::pb::envoy::config::cluster::v3::CircuitBreakers {
                thresholds: vec![
                    envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                        max_connections: Some(UInt32Value { value: 77 }),
                        ..Default::default()
                    },
                    envoy_types::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds {
                        priority: 1, // HIGH: not used by tcp_proxy
                        max_connections: Some(UInt32Value { value: 3 }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            },
        );
        let spec = spec_of(&x);
        let g = up(&spec, "google");
        assert_eq!(
            g.connect_timeout,
            Some(Duration::from_millis(2500)),
            "{lb:?}"
        );
        assert_eq!(g.max_connections, Some(77), "{lb:?}");
    }
}

#[test]
fn ipv6_single_address_chain_and_destination_port() {
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    let ol = x.listener_mut("outbound_listener:127.0.0.1:15001");
    let m = ol.filter_chains[0].filter_chain_match.as_mut().unwrap();
    m.prefix_ranges[1].address_prefix = "fd00::1".into();
    m.prefix_ranges[1].prefix_len = Some(UInt32Value { value: 128 });
    m.destination_port = Some(UInt32Value { value: 443 });
    let spec = spec_of(&x);
    let g = up(&spec, "google");
    assert_eq!(g.virtual_ips, vec![ip("10.0.0.1"), ip("fd00::1")]);
    assert_eq!(g.destination_port, Some(443));
}

#[test]
fn connection_limit_sets_inbound_max_connections() {
    let mut x = cx::transparent_proxy(&params());
    // As in listeners/listener-max-inbound-connections.latest.golden: rbac,
    // connection_limit, tcp_proxy.
    public(&mut x).filter_chains[0]
        .filters
        .insert(1, cx::connection_limit_filter(222));
    assert_eq!(spec_of(&x).inbound_max_connections, Some(222));
}

#[test]
fn exposed_path_listener_maps_to_expose() {
    use envoy_types::pb::envoy::config::route::v3::{
        route, route_action, route_match, Route, RouteAction, RouteConfiguration as Rc, RouteMatch,
        VirtualHost,
    };
    use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager, http_filter, HttpFilter,
    };
    let p = params();
    // As in listeners/expose-paths-new-cluster-http2.latest.golden.
    let hcm = |cluster: &str, path: &str, h2: bool| HttpConnectionManager {
        stat_prefix: "exposed_path_filter_x".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(Rc {
            name: "exposed_path_filter_x".into(),
            virtual_hosts: vec![VirtualHost {
                name: "exposed_path_filter_x".into(),
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
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        http2_protocol_options: h2.then(Default::default),
        ..Default::default()
    };
    let listener = |name: &str, addr: &str, h: HttpConnectionManager| Listener {
        name: name.into(),
        address: x_addr(addr),
        filter_chains: vec![envoy_types::pb::envoy::config::listener::v3::FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack_any(h))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut x = cx::transparent_proxy(&p);
    x.listeners.push(listener(
        "exposed_path_health1:1.2.3.4:21500",
        "1.2.3.4:21500",
        hcm("local_app", "/health1", false),
    ));
    x.listeners.push(listener(
        "exposed_path_grpchealthv1HealthCheck:1.2.3.4:21501",
        "1.2.3.4:21501",
        hcm("exposed_cluster_9090", "/grpc.health.v1.Health/Check", true),
    ));
    x.clusters.push(cx::static_cluster(
        "exposed_cluster_9090",
        sa("127.0.0.1:9090"),
    ));
    let spec = spec_of(&x);
    let mut h2 = ExposePath::new(sa("1.2.3.4:21501"), "/grpc.health.v1.Health/Check", 9090);
    h2.protocol = Protocol::Http2;
    assert_eq!(
        spec.expose,
        vec![h2, ExposePath::new(sa("1.2.3.4:21500"), "/health1", 8080),]
    );
    // Any other HCM shape is refused: a second route.
    let mut two = hcm("local_app", "/a", false);
    if let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = &mut two.route_specifier
    {
        let r = rc.virtual_hosts[0].routes[0].clone();
        rc.virtual_hosts[0].routes.push(r);
    }
    let e = refused(decode_listener(&listener(
        "exposed_path_a:1.2.3.4:1",
        "1.2.3.4:1",
        two,
    )));
    assert!(e.contains("one exact-path route"), "{e}");
}

fn x_addr(s: &str) -> Option<envoy_types::pb::envoy::config::core::v3::Address> {
    cx::static_cluster("x", sa(s))
        .load_assignment
        .unwrap()
        .endpoints[0]
        .lb_endpoints[0]
        .host_identifier
        .as_ref()
        .map(|h| match h {
            lb_endpoint::HostIdentifier::Endpoint(e) => e.address.clone().unwrap(),
            _ => unreachable!(),
        })
}

// ------------------------------------------------------------ RBAC

fn rbac_of(f: Filter) -> Option<Vec<RbacRules>> {
    let mut x = cx::transparent_proxy(&params());
    x.set_public_rbac(f);
    spec_of(&x).rbac
}

fn allowed(rules: &[RbacRules], svc: &str) -> bool {
    let rbac = Rbac::compile(rules).unwrap();
    let peer = Peer::from_id(veer_core::spiffe::ServiceId::new(
        TD, "default", "default", "dc2", svc,
    ));
    matches!(
        rbac.evaluate(&peer),
        veer_core::authz::RbacDecision::AllowedByPolicy { .. }
            | veer_core::authz::RbacDecision::NothingDenied
    )
}

#[test]
fn rbac_goldens_map_with_envoy_semantics() {
    let re = |svc: &str| format!("^spiffe://{TD}/ns/default/dc/[^/]+/svc/{svc}$");
    let policy = |principals| RbacPolicy {
        permissions: Vec::new(),
        name: "consul-intentions-layer4".into(),
        principals,
    };
    // (golden builder, expected rules, allowed sources, denied sources)
    type Row = (Filter, Vec<RbacRules>, Vec<&'static str>, Vec<&'static str>);
    let rows: Vec<Row> = vec![
        (
            cx::rbac_default_deny_one_allow(TD),
            vec![RbacRules {
                action: Action::Allow,
                policies: vec![policy(vec![Principal::spiffe_regex(re("web"))])],
            }],
            vec!["web"],
            vec!["api", "webx"],
        ),
        (
            cx::rbac_default_deny_mixed_precedence(TD),
            vec![RbacRules {
                action: Action::Allow,
                policies: vec![policy(vec![Principal::spiffe_regex(re("web"))])],
            }],
            vec!["web"],
            vec!["api"],
        ),
        (
            cx::rbac_default_allow_one_deny(TD),
            vec![RbacRules {
                action: Action::Deny,
                policies: vec![policy(vec![Principal::spiffe_regex(re("web"))])],
            }],
            vec!["api", "cron"],
            vec!["web"],
        ),
        (
            cx::rbac_default_deny_allow_deny(TD),
            vec![RbacRules {
                action: Action::Allow,
                policies: vec![policy(vec![Principal::AndIds(vec![
                    Principal::spiffe_regex(re("[^/]+")),
                    Principal::NotId(Box::new(Principal::spiffe_regex(re("web")))),
                ])])],
            }],
            vec!["api"],
            vec!["web"],
        ),
        (
            cx::rbac_default_deny_kitchen_sink(TD),
            vec![RbacRules {
                action: Action::Allow,
                policies: vec![policy(vec![
                    Principal::spiffe_regex(re("cron")),
                    Principal::spiffe_regex(re("web")),
                    Principal::AndIds(vec![
                        Principal::spiffe_regex(re("[^/]+")),
                        Principal::NotId(Box::new(Principal::spiffe_regex(re("web")))),
                        Principal::NotId(Box::new(Principal::spiffe_regex(re("unsafe")))),
                        Principal::NotId(Box::new(Principal::spiffe_regex(re("cron")))),
                    ]),
                ])],
            }],
            vec!["cron", "web", "api"],
            vec!["unsafe"],
        ),
        // `rules: {}`: deny everything.
        (
            cx::rbac_filter(Some(Default::default())),
            vec![RbacRules {
                action: Action::Allow,
                policies: vec![],
            }],
            vec![],
            vec!["web", "api"],
        ),
        // No `rules`: the filter enforces nothing.
        (cx::rbac_filter(None), vec![], vec!["web", "api"], vec![]),
    ];
    for (i, (f, want, allow, deny)) in rows.into_iter().enumerate() {
        let got = rbac_of(f).expect("rbac, not intentions");
        assert_eq!(got, want, "row {i}");
        for s in allow {
            assert!(allowed(&got, s), "row {i}: {s} should be allowed");
        }
        for s in deny {
            assert!(!allowed(&got, s), "row {i}: {s} should be denied");
        }
    }
}

fn rbac_any(r: NetworkRbac) -> Filter {
    Filter {
        name: "envoy.filters.network.rbac".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(r))),
    }
}

#[test]
fn rbac_shadow_rules_are_ignored_and_exact_principals_map() {
    let exact = envoy_types::pb::envoy::config::rbac::v3::Principal {
        identifier: Some(principal::Identifier::Authenticated(principal::Authenticated {
            principal_name: Some(envoy_types::pb::envoy::r#type::matcher::v3::StringMatcher {
                match_pattern: Some(
                    envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(
                        web("dc1", "api"),
                    ),
                ),
                ..Default::default()
            }),
        })),
    };
    let rules = cx::layer4_rules(rbac::Action::Allow, vec![exact]);
    let got = rbac_of(rbac_any(NetworkRbac {
        rules: Some(rules),
        shadow_rules: Some(cx::layer4_rules(
            rbac::Action::Deny,
            vec![cx::spiffe_principal(TD, "api")],
        )),
        stat_prefix: "connect_authz".into(),
        ..Default::default()
    }))
    .unwrap();
    assert_eq!(
        got[0].policies[0].principals,
        vec![Principal::Authenticated {
            principal_name: Some(StringMatch::exact(web("dc1", "api")))
        }]
    );
}

// ------------------------------------------------------------ refusals

#[test]
fn error_names_resource_and_field_path() {
    let mut x = cx::transparent_proxy(&params());
    let l = public(&mut x);
    l.filter_chains[0].filters.insert(
        1,
        typed(
            "envoy.filters.http.ext_authz",
            "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
        ),
    );
    let e = decode_listener(l).unwrap_err();
    assert_eq!(
        e.to_string(),
        "listener public_listener:0.0.0.0:9999: filter_chains[0].filters[1]: envoy.filters.http.ext_authz is not enforced by veer"
    );
    assert_eq!(e.classify(), "refused");
}

#[test]
fn refused_filters_on_the_public_listener() {
    // (filter name, type URL, reason fragment)
    let rows: [(&str, String, &str); 6] = [
        (
            "envoy.filters.network.ext_authz",
            "type.googleapis.com/envoy.extensions.filters.network.ext_authz.v3.ExtAuthz".into(),
            "not enforced",
        ),
        (
            "envoy.filters.http.jwt_authn",
            "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
                .into(),
            "not enforced",
        ),
        (
            "envoy.filters.network.lua",
            "type.googleapis.com/envoy.extensions.filters.network.lua.v3.Lua".into(),
            "not enforced",
        ),
        (
            "envoy.filters.network.wasm",
            "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm".into(),
            "not enforced",
        ),
        (
            "envoy.filters.network.sni_cluster",
            "type.googleapis.com/envoy.extensions.filters.network.sni_cluster.v3.SniCluster".into(),
            "terminating-gateway",
        ),
        (
            "my.filter",
            "type.googleapis.com/acme.Thing".into(),
            "not a filter veer knows",
        ),
    ];
    for (name, url, why) in rows {
        let mut x = cx::transparent_proxy(&params());
        let l = public(&mut x);
        l.filter_chains[0].filters.insert(1, typed(name, &url));
        let e = refused(decode_listener(l));
        assert!(e.contains("filter_chains[0].filters[1]"), "{e}");
        assert!(e.contains(why), "{name}: {e}");
    }
}

#[test]
fn http_connection_manager_without_router_is_invalid_on_outbound_chain() {
    // The L7 shapes are tested in `translate/http/tests.rs`.
    let mut x = cx::transparent_proxy(&params());
    let l = x.listener_mut("outbound_listener:127.0.0.1:15001");
    l.filter_chains[0].filters[0] = typed(
        "envoy.filters.network.http_connection_manager",
        &HttpConnectionManager::type_url(),
    );
    let e = invalid(decode_listener(l));
    assert!(
        e.contains("filter_chains[0].filters[0].typed_config.http_filters") && e.contains("router"),
        "{e}"
    );
}

fn with_downstream(x: &mut ConsulXds, f: impl FnOnce(&mut DownstreamTlsContext)) -> Listener {
    let l = public(x);
    let ts = l.filter_chains[0].transport_socket.as_mut().unwrap();
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        panic!()
    };
    let mut d = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
    f(&mut d);
    ts.config_type = Some(transport_socket::ConfigType::TypedConfig(pack_any(d)));
    l.clone()
}

#[test]
fn refused_public_listener_without_client_certificate() {
    for v in [None, Some(false)] {
        let mut x = cx::transparent_proxy(&params());
        let l = with_downstream(&mut x, |d| {
            d.require_client_certificate = v.map(|value| BoolValue { value })
        });
        let e = refused(decode_listener(&l));
        assert!(
            e.contains("filter_chains[0].transport_socket.typed_config.require_client_certificate"),
            "{e}"
        );
    }
}

#[test]
fn refused_tls_settings_veer_cannot_enforce() {
    let mut x = cx::transparent_proxy(&params());
    let l = with_downstream(&mut x, |d| {
        let p = d
            .common_tls_context
            .as_mut()
            .unwrap()
            .tls_params
            .as_mut()
            .unwrap();
        p.tls_minimum_protocol_version = tls_parameters::TlsProtocol::TlSv13 as i32;
    });
    assert!(refused(decode_listener(&l)).contains("tls_minimum_protocol_version"));
    let mut x = cx::transparent_proxy(&params());
    let l = with_downstream(&mut x, |d| {
        let p = d
            .common_tls_context
            .as_mut()
            .unwrap()
            .tls_params
            .as_mut()
            .unwrap();
        p.cipher_suites = vec!["ECDHE-ECDSA-AES128-GCM-SHA256".into()];
    });
    assert!(refused(decode_listener(&l)).contains("cipher_suites"));
    // A maximum of TLS 1.2 is fine (Consul's tls-incoming-max-version).
    let mut x = cx::transparent_proxy(&params());
    let l = with_downstream(&mut x, |d| {
        let p = d
            .common_tls_context
            .as_mut()
            .unwrap()
            .tls_params
            .as_mut()
            .unwrap();
        p.tls_maximum_protocol_version = tls_parameters::TlsProtocol::TlSv12 as i32;
    });
    assert!(decode_listener(&l).is_ok());
    // Certificates from files are not read.
    let mut x = cx::transparent_proxy(&params());
    let l = with_downstream(&mut x, |d| {
        d.common_tls_context.as_mut().unwrap().tls_certificates[0].certificate_chain =
            Some(DataSource {
                specifier: Some(data_source::Specifier::Filename("/etc/leaf.pem".into())),
                ..Default::default()
            });
    });
    assert!(refused(decode_listener(&l)).contains("certificate_chain.filename"));
    // No validation context at all: refused.
    let mut x = cx::transparent_proxy(&params());
    let l = with_downstream(&mut x, |d| {
        d.common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type = None;
    });
    assert!(refused(decode_listener(&l)).contains("validation_context"));
    // Bad PEM: invalid.
    let mut x = cx::transparent_proxy(&params());
    let l = with_downstream(&mut x, |d| {
        if let Some(common_tls_context::ValidationContextType::ValidationContext(v)) = &mut d
            .common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type
        {
            v.trusted_ca = Some(DataSource {
                specifier: Some(data_source::Specifier::InlineString("junk".into())),
                ..Default::default()
            });
        }
    });
    assert!(invalid(decode_listener(&l)).contains("trusted_ca"));
}

fn with_rbac(r: NetworkRbac) -> Result<Decoded, TranslateError> {
    let mut x = cx::transparent_proxy(&params());
    x.set_public_rbac(rbac_any(r));
    decode_listener(public(&mut x))
}

#[test]
fn refused_rbac_that_veer_cannot_enforce() {
    let l4 = |perm: Permission, principal| NetworkRbac {
        rules: Some({
            let mut r = cx::layer4_rules(rbac::Action::Allow, vec![principal]);
            r.policies.values_mut().next().unwrap().permissions = vec![perm];
            r
        }),
        ..Default::default()
    };
    let any = Permission {
        rule: Some(permission::Rule::Any(true)),
    };
    let port = Permission {
        rule: Some(permission::Rule::DestinationPort(8080)),
    };
    let e = refused(with_rbac(l4(port, cx::spiffe_principal(TD, "web"))));
    assert!(
        e.contains("filter_chains[0].filters[0].typed_config.rules.policies[\"consul-intentions-layer4\"].permissions[0]"),
        "{e}"
    );
    #[allow(deprecated)]
    let ip = envoy_types::pb::envoy::config::rbac::v3::Principal {
        identifier: Some(principal::Identifier::DirectRemoteIp(Default::default())),
    };
    let e = refused(with_rbac(l4(any.clone(), ip)));
    assert!(
        e.contains("principals[0]") && e.contains("IP principals"),
        "{e}"
    );
    let mut log = l4(any.clone(), cx::spiffe_principal(TD, "web"));
    log.rules.as_mut().unwrap().action = rbac::Action::Log as i32;
    assert!(refused(with_rbac(log)).contains("rules.action"));
    let mut cont = l4(any.clone(), cx::spiffe_principal(TD, "web"));
    cont.enforcement_type = 1;
    assert!(refused(with_rbac(cont)).contains("enforcement_type"));
    // A regex veer cannot compile is invalid, never skipped.
    let e = invalid(with_rbac(l4(any, cx::spiffe_principal(TD, "(web"))));
    assert!(e.contains("safe_regex"), "{e}");
}

#[test]
fn refused_outbound_listener_shapes() {
    let p = params();
    let name = "outbound_listener:127.0.0.1:15001";
    // Prefix lengths other than /32 and /128.
    for (addr, len) in [("10.0.0.0", 24), ("fd00::", 64), ("10.0.0.1", 31)] {
        let mut x = cx::transparent_proxy(&p);
        let l = x.listener_mut(name);
        let r = &mut l.filter_chains[0]
            .filter_chain_match
            .as_mut()
            .unwrap()
            .prefix_ranges[0];
        r.address_prefix = addr.into();
        r.prefix_len = Some(UInt32Value { value: len });
        let e = refused(decode_listener(l));
        assert!(
            e.contains("filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len")
                && e.contains(&format!("/{len}")),
            "{e}"
        );
    }
    // tls_inspector listener filter (terminating-gateway destinations).
    let mut x = cx::transparent_proxy(&p);
    let l = x.listener_mut(name);
    l.listener_filters.push(ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        config_type: Some(
            envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType::TypedConfig(Any {
                type_url: "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector".into(),
                value: vec![],
            }),
        ),
        ..Default::default()
    });
    let e = refused(decode_listener(l));
    assert!(
        e.contains("listener_filters[1]") && e.contains("terminating-gateway"),
        "{e}"
    );
    // SNI-matched chains.
    let mut x = cx::transparent_proxy(&p);
    let l = x.listener_mut(name);
    l.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .server_names = vec!["x".into()];
    assert!(refused(decode_listener(l)).contains("server_names"));
    // No original_dst.
    let mut x = cx::transparent_proxy(&p);
    let l = x.listener_mut(name);
    l.listener_filters.clear();
    assert!(refused(decode_listener(l)).contains("original_dst"));
}

fn with_upstream_tls(c: &mut Cluster, f: impl FnOnce(&mut UpstreamTlsContext)) {
    let ts = c.transport_socket.as_mut().unwrap();
    let Some(transport_socket::ConfigType::TypedConfig(any)) = &ts.config_type else {
        panic!()
    };
    let mut u = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
    f(&mut u);
    ts.config_type = Some(transport_socket::ConfigType::TypedConfig(pack_any(u)));
}

#[test]
fn refused_clusters() {
    let p = params();
    let name = p.sni("google");
    let base = || cx::transparent_proxy(&p).cluster_mut(&name).clone();
    // Custom cluster types other than the aggregate; an aggregate without
    // its config; a DNS cluster without hosts.
    let mut c = base();
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::ClusterType(
        cluster::CustomClusterType {
            name: "envoy.clusters.dynamic_forward_proxy".into(),
            typed_config: None,
        },
    ));
    let e = refused(decode_cluster(&c));
    assert!(e.contains("cluster_type.name"), "{e}");
    let mut c = base();
    c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::ClusterType(
        cluster::CustomClusterType {
            name: "envoy.clusters.aggregate".into(),
            typed_config: None,
        },
    ));
    assert!(invalid(decode_cluster(&c)).contains("cluster_type.typed_config: missing"));
    for t in [
        cluster::DiscoveryType::LogicalDns,
        cluster::DiscoveryType::StrictDns,
    ] {
        let mut c = base();
        c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(t as i32));
        assert!(invalid(decode_cluster(&c)).contains("load_assignment"));
    }
    // Transport sockets other than TLS.
    let mut c = base();
    c.transport_socket = Some(TransportSocket {
        name: "envoy.transport_sockets.alts".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.transport_sockets.alts.v3.Alts".into(),
            value: vec![],
        })),
    });
    let e = refused(decode_cluster(&c));
    assert!(
        e.contains("transport_socket") && e.contains("only tls"),
        "{e}"
    );
    // EDS without mTLS.
    let mut c = base();
    c.transport_socket = None;
    assert!(refused(decode_cluster(&c)).contains("mTLS"));
    // SAN matchers of another type than URI.
    let mut c = base();
    with_upstream_tls(&mut c, |u| {
        if let Some(common_tls_context::ValidationContextType::ValidationContext(v)) = &mut u
            .common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type
        {
            v.match_typed_subject_alt_names.push(
                envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SubjectAltNameMatcher {
                    san_type: 2, // DNS
                    ..Default::default()
                },
            );
        }
    });
    assert!(refused(decode_cluster(&c)).contains("match_typed_subject_alt_names[0].san_type"));
    // Extension load-balancing policies.
    let mut c = base();
    c.lb_policy = cluster::LbPolicy::LoadBalancingPolicyConfig as i32;
    assert!(refused(decode_cluster(&c)).contains("load_balancing_policy"));
}

#[test]
fn upstream_without_a_spiffe_identity_is_inconsistent() {
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    with_upstream_tls(x.cluster_mut(&p.sni("google")), |u| {
        if let Some(common_tls_context::ValidationContextType::ValidationContext(v)) = &mut u
            .common_tls_context
            .as_mut()
            .unwrap()
            .validation_context_type
        {
            #[allow(deprecated)]
            v.match_subject_alt_names.clear();
        }
    });
    let e = translate(&load(&x)).unwrap_err();
    assert_eq!(e.classify(), "inconsistent");
    assert!(e.to_string().contains(&p.sni("google")), "{e}");
}

#[test]
fn upstream_with_another_client_certificate_waits() {
    let p = params();
    let ca2 = veer_ca::Ca::new_root(TD).unwrap();
    let other = Params::golden(cx::Certs::issue(&ca2, "dc1", "web"));
    let mut x = cx::transparent_proxy(&p);
    let g = p.sni("google");
    *x.cluster_mut(&g) = cx::service_cluster(&other, "google");
    let e = translate(&load(&x)).unwrap_err();
    assert_eq!(e.classify(), "incomplete", "a leaf rotation in progress");
    assert!(e.to_string().contains("client certificate differs"), "{e}");
    // The ADS client hears it as "still waiting", never as a refusal (a
    // NACK would make Consul drop the update and veer would stay behind).
    use crate::ads::{Changed, Check, Compiled};
    let Compiled::Waiting(waiting) = Translator::new().compile(&load(&x), &Changed::Anything)
    else {
        panic!("a rotation in progress must wait")
    };
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert!(
        waiting[0].contains("client certificate differs"),
        "{waiting:?}"
    );
    assert!(matches!(
        Translator::new().compile(&load(&cx::transparent_proxy(&p)), &Changed::Anything),
        Compiled::Ready(_)
    ));
}

#[test]
fn decode_checks_type_url_bytes_and_name() {
    let p = params();
    let x = cx::transparent_proxy(&p);
    let l = x.listeners[0].clone();
    // A cluster's type URL on the listener kind.
    let mut any = pack_any(l.clone());
    any.type_url = Kind::Cluster.type_url().into();
    let e = decode(Kind::Listener, &l.name, &any).unwrap_err();
    assert_eq!(e.classify(), "type_url");
    // Garbage bytes.
    let any = Any {
        type_url: Kind::Listener.type_url().into(),
        value: vec![0xff, 0xff, 0xff],
    };
    assert_eq!(
        decode(Kind::Listener, "x", &any).unwrap_err().classify(),
        "decode"
    );
    // Sent under another name.
    let e = decode(Kind::Listener, "other", &pack_any(l)).unwrap_err();
    assert_eq!(e.classify(), "name");
    // A zero weight is invalid.
    let mut la = x.endpoints[0].clone();
    la.endpoints[0].lb_endpoints[0].load_balancing_weight = Some(UInt32Value { value: 0 });
    let e = decode(Kind::Endpoints, &la.cluster_name.clone(), &pack_any(la)).unwrap_err();
    assert!(
        e.to_string()
            .contains("lb_endpoints[0].load_balancing_weight"),
        "{e}"
    );
}

#[test]
fn secrets_of_the_wrong_type_are_refused() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{secret, Secret as S};
    let s = S {
        name: "connect-leaf".into(),
        r#type: Some(secret::Type::GenericSecret(Default::default())),
    };
    let e = decode(Kind::Secret, "connect-leaf", &pack_any(s)).unwrap_err();
    assert_eq!(e.classify(), "refused");
}

#[test]
fn dialed_directly_upstream_waits_for_its_eds_sibling() {
    let p = params();
    let mut x = cx::transparent_proxy_dial_instances_directly(&p);
    x.endpoints.retain(|e| e.cluster_name != p.sni("kafka"));
    assert_eq!(
        missing(&load(&x)),
        vec![format!("endpoints {} (EDS)", p.sni("kafka"))]
    );
}

// ------------------------------------------------------------ through the core

fn snapshot(x: &ConsulXds) -> Snapshot {
    Snapshot::build(translate(&load(x)).unwrap(), 1).unwrap()
}

fn route_kind(s: &Snapshot, dst: &str) -> Result<(&'static str, String), &'static str> {
    use veer_core::addr::OrigDstAddr;
    use veer_core::route::{route, Route};
    match route(&s.routes, OrigDstAddr(sa(dst))) {
        Ok(Route::Mesh { upstream }) => Ok(("mesh", upstream.name().to_string())),
        Ok(Route::Direct { upstream, .. }) => Ok(("direct", upstream.name().to_string())),
        Ok(Route::Passthrough { .. }) => Ok(("passthrough", String::new())),
        Err(e) => Err(e.classify()),
    }
}

#[test]
fn translated_goldens_route_and_authorize_as_envoy_would() {
    let p = params();
    let s = snapshot(&cx::transparent_proxy_dial_instances_directly(&p));
    assert_eq!(
        route_kind(&s, "6.6.6.6:27017"),
        Ok(("mesh", "mongo".into()))
    );
    assert_eq!(
        route_kind(&s, "10.10.10.12:27017"),
        Ok(("direct", "mongo".into()))
    );
    assert_eq!(
        route_kind(&s, "9.9.9.9:9092"),
        Ok(("direct", "kafka".into()))
    );
    assert_eq!(
        route_kind(&s, "1.2.3.4:443"),
        Ok(("passthrough", String::new()))
    );
    let s = snapshot(&cx::transparent_proxy_catalog_destinations_only(&p));
    assert_eq!(route_kind(&s, "10.0.0.1:80"), Ok(("mesh", "google".into())));
    assert_eq!(route_kind(&s, "240.0.0.1:80"), Err("not_in_mesh"));
    // `rules: {}` denies every peer; the one-allow golden allows web only.
    let peer = |svc: &str| {
        Peer::from_id(veer_core::spiffe::ServiceId::new(
            TD, "default", "default", "dc1", svc,
        ))
    };
    let s = snapshot(&cx::transparent_proxy(&p));
    assert!(!s.authz.evaluate(&peer("web")).allowed());
    let mut x = cx::transparent_proxy(&p);
    x.set_public_rbac(cx::rbac_default_deny_one_allow(TD));
    let s = snapshot(&x);
    assert!(s.authz.evaluate(&peer("web")).allowed());
    assert!(!s.authz.evaluate(&peer("api")).allowed());
}

// ------------------------------------------------------------ chains (issue 12)

fn peer_roots() -> String {
    veer_ca::Ca::new_root(cx::PEER_TRUST_DOMAIN)
        .expect("peer ca")
        .cert_pem
}

/// (SPIFFE ID, SNI, endpoints) of a target.
fn tgt(t: &TargetSpec) -> (String, String, Vec<SocketAddr>) {
    (
        t.identity.to_string(),
        t.sni.clone().unwrap_or_default(),
        t.endpoints.clone(),
    )
}

fn sas(v: &[&str]) -> Vec<SocketAddr> {
    v.iter().map(|s| sa(s)).collect()
}

#[test]
fn aggregate_failover_goldens_map_to_targets_in_order() {
    let p = params();
    let peer = peer_roots();
    let peer_id = format!(
        "spiffe://{}/ns/default/dc/dc2/svc/db",
        cx::PEER_TRUST_DOMAIN
    );
    let peer_sni = format!(
        "db.default.default.cluster-01.external.{}",
        cx::PEER_TRUST_DOMAIN
    );
    let sni = |dc: &str, svc: &str| format!("{svc}.default.{dc}.internal.{TD}");
    let local = sas(&["10.10.1.1:8080", "10.10.1.2:8080"]);
    type Case = (
        &'static str,
        ConsulXds,
        Vec<(String, String, Vec<SocketAddr>)>,
    );
    let cases: Vec<Case> = vec![
        (
            "connect-proxy-with-chain-and-failover",
            cx::connect_proxy_with_chain_and_failover(&p),
            vec![
                (web("dc1", "db"), sni("dc1", "db"), local.clone()),
                (
                    web("dc1", "fail"),
                    sni("dc1", "fail"),
                    sas(&["10.20.1.1:8080", "10.20.1.2:8080"]),
                ),
            ],
        ),
        (
            "connect-proxy-with-tcp-chain-failover-through-remote-gateway",
            cx::connect_proxy_with_tcp_chain_failover_through_remote_gateway(&p),
            vec![
                (web("dc1", "db"), sni("dc1", "db"), local.clone()),
                (
                    web("dc2", "db"),
                    sni("dc2", "db"),
                    sas(&["198.18.1.1:443", "198.18.1.2:443"]),
                ),
            ],
        ),
        (
            "connect-proxy-with-tcp-chain-failover-through-remote-gateway-triggered",
            cx::connect_proxy_with_tcp_chain_failover_through_remote_gateway_triggered(&p),
            vec![
                (web("dc1", "db"), sni("dc1", "db"), vec![]),
                (
                    web("dc2", "db"),
                    sni("dc2", "db"),
                    sas(&["198.18.1.1:443", "198.18.1.2:443"]),
                ),
            ],
        ),
        (
            "connect-proxy-with-tcp-chain-failover-through-local-gateway",
            cx::connect_proxy_with_tcp_chain_failover_through_local_gateway(&p),
            vec![
                (web("dc1", "db"), sni("dc1", "db"), local.clone()),
                (
                    web("dc2", "db"),
                    sni("dc2", "db"),
                    sas(&["10.10.1.1:8443", "10.10.1.2:8443"]),
                ),
            ],
        ),
        (
            "connect-proxy-with-tcp-chain-double-failover-through-remote-gateway",
            cx::connect_proxy_with_tcp_chain_double_failover_through_remote_gateway(&p),
            vec![
                (web("dc1", "db"), sni("dc1", "db"), local.clone()),
                // No assignment sent: a target without endpoints, not a wait.
                (web("dc2", "db"), sni("dc2", "db"), vec![]),
                (
                    web("dc3", "db"),
                    sni("dc3", "db"),
                    sas(&["198.38.1.1:443", "198.38.1.2:443"]),
                ),
            ],
        ),
        (
            "connect-proxy-with-chain-and-failover-to-cluster-peer",
            cx::connect_proxy_with_chain_and_failover_to_cluster_peer(&p, &peer),
            vec![
                (web("dc1", "db"), sni("dc1", "db"), local.clone()),
                (peer_id.clone(), peer_sni.clone(), sas(&["10.40.1.1:8080"])),
            ],
        ),
        (
            "connect-proxy-with-chain-and-redirect-to-cluster-peer",
            cx::connect_proxy_with_chain_and_redirect_to_cluster_peer(&p, &peer),
            vec![(peer_id.clone(), peer_sni.clone(), sas(&["10.40.1.1:8080"]))],
        ),
    ];
    for (golden, x, want) in cases {
        let spec = spec_of(&x);
        assert_eq!(spec.upstreams.len(), 1, "{golden}: {:?}", spec.upstreams);
        let u = &spec.upstreams[0];
        assert_eq!(u.local_bind, Some(sa("127.0.0.1:9191")), "{golden}");
        let got: Vec<_> = std::iter::once(u.primary())
            .chain(u.failover.iter().cloned())
            .collect();
        assert_eq!(
            got.iter().map(tgt).collect::<Vec<_>>(),
            want,
            "{golden}: targets in failover order"
        );
        for t in &got {
            assert_eq!(t.connect_timeout, Some(Duration::from_secs(33)), "{golden}");
            assert_eq!(
                t.san_matchers,
                vec![StringMatch::exact(t.identity.to_string())],
                "{golden}"
            );
            // A peer's target carries the peer's roots; local ones the spec's.
            let is_peer = t.identity.trust_domain == cx::PEER_TRUST_DOMAIN;
            assert_eq!(
                t.roots.is_some(),
                is_peer,
                "{golden}: roots of {}",
                t.identity
            );
        }
    }
}

#[test]
fn failover_is_taken_by_the_snapshot_when_the_primary_has_no_healthy_endpoint() {
    let p = params();
    let pick = |x: &ConsulXds| {
        let s = snapshot(x);
        let u = s
            .routes
            .upstreams()
            .iter()
            .find(|u| u.local_bind.is_some())
            .expect("db")
            .clone();
        u.target().map(|t| t.identity.datacenter.clone())
    };
    assert_eq!(
        pick(&cx::connect_proxy_with_tcp_chain_failover_through_remote_gateway(&p)),
        Some("dc1".into())
    );
    assert_eq!(
        pick(&cx::connect_proxy_with_tcp_chain_failover_through_remote_gateway_triggered(&p)),
        Some("dc2".into())
    );
}

#[test]
fn aggregate_members_are_wanted_and_the_primarys_endpoints_awaited() {
    let p = params();
    let x = cx::connect_proxy_with_tcp_chain_double_failover_through_remote_gateway(&p);
    let mut res = load(&x);
    let w = wanted(&res);
    assert_eq!(w.endpoints.len(), 3, "{:?}", w.endpoints);
    assert!(missing(&res).is_empty(), "{:?}", missing(&res));
    // The primary's assignment is waited for; a failover target's is not.
    let first = x.endpoints[0].cluster_name.clone();
    res.endpoints.remove(&first);
    assert_eq!(missing(&res), vec![format!("endpoints {first} (EDS)")]);
}

fn agg_err(x: &ConsulXds) -> TranslateError {
    translate(&load(x)).expect_err("refused")
}

#[test]
fn bad_aggregates_are_refused_naming_resource_and_field() {
    let p = params();
    let db = p.sni("db");
    let t0 = format!("failover-target~0~{db}");
    let t1 = format!("failover-target~1~{db}");
    // On its own: itself, twice, empty, another custom type, lb policy.
    let e = invalid(decode_cluster(&cx::aggregate_cluster(
        &db,
        &[t0.clone(), db.clone()],
        33,
    )));
    assert!(e.contains(&format!("cluster {db}")), "{e}");
    assert!(
        e.contains("cluster_type.typed_config.clusters[1]: the aggregate names itself"),
        "{e}"
    );
    let e = invalid(decode_cluster(&cx::aggregate_cluster(
        &db,
        &[t0.clone(), t0.clone()],
        33,
    )));
    assert!(
        e.contains("clusters[1]") && e.contains("named twice"),
        "{e}"
    );
    let e = invalid(decode_cluster(&cx::aggregate_cluster(&db, &[], 33)));
    assert!(e.contains("cluster_type.typed_config.clusters: "), "{e}");
    let mut c = cx::aggregate_cluster(&db, std::slice::from_ref(&t0), 33);
    if let Some(cluster::ClusterDiscoveryType::ClusterType(ct)) = &mut c.cluster_discovery_type {
        ct.name = "envoy.clusters.redis".into();
    }
    let e = refused(decode_cluster(&c));
    assert!(
        e.contains("cluster_type.name") && e.contains("envoy.clusters.redis"),
        "{e}"
    );
    let mut c = cx::aggregate_cluster(&db, std::slice::from_ref(&t0), 33);
    c.lb_policy = cluster::LbPolicy::RoundRobin as i32;
    assert!(invalid(decode_cluster(&c)).contains("lb_policy"));

    // With the others: a member that does not exist.
    let mut x = cx::connect_proxy_with_chain_and_failover(&p);
    x.clusters[0] = cx::aggregate_cluster(&db, &[t0.clone(), "nope".into()], 33);
    let e = agg_err(&x);
    assert!(matches!(e, TranslateError::Invalid { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("cluster {db}: cluster_type.typed_config.clusters[1]: names cluster \"nope\", which does not exist")
    );
    // A loop through a second aggregate (not named by any listener: still refused).
    let mut x = cx::connect_proxy_with_chain_and_failover(&p);
    x.clusters
        .push(cx::aggregate_cluster("a", &["b".into()], 5));
    x.clusters
        .push(cx::aggregate_cluster("b", &["a".into()], 5));
    let e = agg_err(&x).to_string();
    assert!(
        e.contains("cluster_type.typed_config.clusters[0]") && e.contains("a loop: a -> b -> a"),
        "{e}"
    );
    // A member that is not an upstream cluster.
    let mut x = cx::connect_proxy_with_chain_and_failover(&p);
    x.clusters[0] = cx::aggregate_cluster(&db, &[t0.clone(), "local_app".into()], 33);
    let e = agg_err(&x);
    assert!(matches!(e, TranslateError::Refused { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("clusters[1]: cluster local_app is not an EDS or DNS"),
        "{e}"
    );
    // Nested aggregates are flattened in order.
    let mut x = cx::connect_proxy_with_chain_and_failover(&p);
    x.clusters[0] = cx::aggregate_cluster(&db, &[t0.clone(), "inner".into()], 33);
    x.clusters.push(cx::aggregate_cluster(
        "inner",
        &[t1.clone(), t0.clone()],
        33,
    ));
    let spec = spec_of(&x);
    let u = &spec.upstreams[0];
    assert_eq!(u.identity.service, "db");
    assert_eq!(u.failover.len(), 1, "t0 once, at its first place");
    assert_eq!(u.failover[0].identity.service, "fail");
}

#[test]
fn dns_cluster_waits_for_its_name_then_uses_the_answers() {
    let p = params();
    let peer = peer_roots();
    let host = "123.us-east-1.elb.notaws.com";
    let x = cx::connect_proxy_with_peered_upstreams(&p, &peer);
    let mut res = load(&x);
    let payments = format!("payments.default.cloud.external.{}", cx::PEER_TRUST_DOMAIN);
    // Named to resolve, every 10 s (Consul's dnsRefreshRate).
    assert_eq!(
        wanted(&res).dns.into_iter().collect::<Vec<_>>(),
        vec![(host.to_string(), Duration::from_secs(10))]
    );
    assert_eq!(
        missing(&res),
        vec![format!("DNS name {host} (cluster {payments})")]
    );
    assert!(matches!(
        translate(&res),
        Err(TranslateError::Incomplete(_))
    ));

    // LOGICAL_DNS, V4_ONLY: the first IPv4 address, on the host's port.
    res.dns.insert(
        host.into(),
        vec![ip("2001:db8::1"), ip("192.0.2.7"), ip("192.0.2.8")],
    );
    let spec = translate(&res).unwrap_or_else(|e| panic!("{e}"));
    Snapshot::build(spec.clone(), 1).unwrap();
    let pay = up(&spec, "payments");
    assert_eq!(pay.endpoints, vec![sa("192.0.2.7:8443")]);
    assert_eq!(pay.local_bind, Some(sa("127.0.0.1:9090")));
    assert_eq!(
        pay.sni.as_deref(),
        Some(
            format!(
                "payments.default.default.cloud.external.{}",
                cx::PEER_TRUST_DOMAIN
            )
            .as_str()
        )
    );
    assert!(pay.roots.is_some(), "the peer's roots");
    assert_eq!(pay.identity.datacenter, "cloud-dc");
    assert_eq!(
        up(&spec, "refunds").endpoints,
        vec![sa("106.96.90.233:443")]
    );

    // STRICT_DNS: every address of the family.
    let mut x2 = x.clone();
    x2.cluster_mut(&payments).cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(
        cluster::DiscoveryType::StrictDns as i32,
    ));
    let mut res2 = load(&x2);
    res2.dns = res.dns.clone();
    let spec = translate(&res2).unwrap();
    assert_eq!(
        up(&spec, "payments").endpoints,
        vec![sa("192.0.2.7:8443"), sa("192.0.2.8:8443")]
    );
    // A name that resolved to nothing: no hosts, not a wait.
    res.dns.insert(host.into(), vec![]);
    assert!(up(&translate(&res).unwrap(), "payments")
        .endpoints
        .is_empty());
    // An IP literal needs no resolution.
    let mut x3 = x.clone();
    *x3.cluster_mut(&payments) = cx::peer_dns_cluster(&p, &peer, "payments", "192.0.2.9", 8443);
    let res3 = load(&x3);
    assert!(wanted(&res3).dns.is_empty());
    assert_eq!(
        up(&translate(&res3).unwrap(), "payments").endpoints,
        vec![sa("192.0.2.9:8443")]
    );
}

#[test]
fn dns_clusters_veer_cannot_serve_are_refused() {
    let p = params();
    let peer = peer_roots();
    let base = cx::peer_dns_cluster(&p, &peer, "payments", "gw.example", 8443);
    let mut c = base.clone();
    c.transport_socket = None;
    assert!(refused(decode_cluster(&c)).contains("transport_socket"));
    let mut c = base.clone();
    c.typed_dns_resolver_config = Some(Default::default());
    assert!(refused(decode_cluster(&c)).contains("custom DNS resolvers"));
    let mut c = base.clone();
    let la = c.load_assignment.as_mut().unwrap();
    let e = la.endpoints[0].lb_endpoints[0].clone();
    la.endpoints[0].lb_endpoints.push(e);
    assert!(invalid(decode_cluster(&c)).contains("exactly one host"));
    let mut c = base;
    c.load_assignment = None;
    assert!(invalid(decode_cluster(&c)).contains("load_assignment"));
}

/// Responses as Consul sends them, one per kind, to an ADS state with the
/// real translation; then DNS answers as the client's resolver feeds them.
#[test]
fn ads_state_resolves_dns_names_and_applies_their_answers() {
    use crate::ads::{AdsState, Reply};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    let p = params();
    let host = "123.us-east-1.elb.notaws.com";
    let x = cx::connect_proxy_with_peered_upstreams(&p, &peer_roots());
    let mut state = AdsState::new(Translator::new(), Node::default());
    state.start();
    let mut applied: Vec<Spec> = Vec::new();
    let mut apply = |s: Spec| {
        applied.push(s);
        Ok(())
    };
    for (i, kind) in [Kind::Cluster, Kind::Endpoints, Kind::Listener]
        .into_iter()
        .enumerate()
    {
        let resources = x
            .resources()
            .into_iter()
            .filter(|(url, _, _)| url == kind.type_url())
            .map(|(_, name, any)| Resource {
                version: "1".into(),
                name,
                resource: Some(any),
                ..Default::default()
            })
            .collect();
        let out = state.on_response(
            DeltaDiscoveryResponse {
                type_url: kind.type_url().into(),
                nonce: format!("{i}"),
                resources,
                ..Default::default()
            },
            &mut apply,
        );
        assert_eq!(out.reply, Reply::Ack, "{kind:?}");
        assert!(!out.delivered, "waits for the name");
    }
    assert_eq!(
        state.dns_wanted().iter().collect::<Vec<_>>(),
        vec![(&host.to_string(), &Duration::from_secs(10))]
    );
    let answer = |ips: Option<Vec<IpAddr>>| {
        let mut a = std::collections::BTreeMap::new();
        a.insert(host.to_string(), ips);
        a.insert(
            "not.wanted.example".to_string(),
            Some(vec![ip("192.0.2.99")]),
        );
        a
    };
    let payments = |s: &Spec| up(s, "payments").endpoints.clone();
    // First answer: the configuration is complete and applied.
    let out = state.on_dns(answer(Some(vec![ip("192.0.2.7")])), &mut apply);
    assert!(out.changed && out.delivered, "{out:?}");
    assert!(!state.resources().dns.contains_key("not.wanted.example"));
    // A failed refresh keeps the addresses held: nothing changes.
    let out = state.on_dns(answer(None), &mut apply);
    assert!(!out.changed && !out.delivered, "{out:?}");
    // The same answer again: nothing to apply.
    let out = state.on_dns(answer(Some(vec![ip("192.0.2.7")])), &mut apply);
    assert!(!out.changed, "{out:?}");
    // The gateway moved: applied.
    let out = state.on_dns(answer(Some(vec![ip("192.0.2.8")])), &mut apply);
    assert!(out.delivered, "{out:?}");
    assert_eq!(
        applied.iter().map(payments).collect::<Vec<_>>(),
        vec![vec![sa("192.0.2.7:8443")], vec![sa("192.0.2.8:8443")]]
    );
}

/// The client's resolver with the system's: `localhost` resolves, an
/// invalid name fails (`None`), and a new set of names is resolved at once.
#[test]
fn resolver_loop_answers_the_wanted_names() {
    use std::collections::BTreeMap;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (names_tx, names_rx) = tokio::sync::watch::channel(BTreeMap::new());
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let task = tokio::spawn(crate::ads::dns::resolve_loop(names_rx, tx));
        let mut want = BTreeMap::new();
        want.insert("localhost".to_string(), Duration::from_secs(60));
        want.insert("no-such-host.invalid".to_string(), Duration::from_secs(60));
        names_tx.send(want.clone()).unwrap();
        let a = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("answers in time")
            .expect("answers");
        let local = a["localhost"].clone().expect("localhost resolves");
        assert!(
            local.iter().all(|i| i.is_loopback()) && !local.is_empty(),
            "{local:?}"
        );
        assert_eq!(a["no-such-host.invalid"], None);
        // A new set is resolved without waiting for the 60 s interval.
        want.remove("no-such-host.invalid");
        names_tx.send(want).unwrap();
        let a = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("answers in time")
            .expect("answers");
        assert_eq!(a.keys().collect::<Vec<_>>(), vec!["localhost"]);
        task.abort();
    });
}

/// Each endpoint assignment changed on its own: the translator replaces
/// the endpoints of the targets it feeds in its last spec (no full
/// translation: the counters say so) and the result is what a full
/// translation of the same resources makes, for plain upstreams,
/// passthrough and failover targets (goldens with aggregate clusters).
#[test]
fn an_endpoint_change_patches_only_the_targets_it_feeds() {
    use crate::ads::{Changed, Check, Compiled};
    let p = params();
    for (name, x) in [
        ("transparent-proxy", cx::transparent_proxy(&p)),
        (
            "connect-proxy-with-chain-and-failover",
            cx::connect_proxy_with_chain_and_failover(&p),
        ),
        (
            "connect-proxy-with-tcp-chain-double-failover-through-remote-gateway",
            cx::connect_proxy_with_tcp_chain_double_failover_through_remote_gateway(&p),
        ),
    ] {
        let mut res = load(&x);
        let mut t = Translator::new();
        let Compiled::Ready(_) = t.compile(&res, &Changed::Anything) else {
            panic!("{name}: not ready")
        };
        assert_eq!(t.counts().full, 1);
        let names: Vec<String> = res.endpoints.keys().cloned().collect();
        assert!(!names.is_empty(), "{name}");
        let mut patched = 0;
        for (k, eds) in names.iter().enumerate() {
            let mut eps = res.endpoints[eds].to_vec();
            eps.push(EndpointModel {
                addr: sa(&format!("10.99.0.{}:21000", k + 1)),
                weight: 3,
            });
            res.endpoints.insert(eds.clone(), eps.into_boxed_slice());
            let before = t.counts();
            let Compiled::Ready(spec) = t.compile(&res, &Changed::Endpoints([eds.clone()].into()))
            else {
                panic!("{name} {eds}: not ready")
            };
            let after = t.counts();
            if after.full == before.full {
                patched += 1;
                assert_eq!(after.patched, before.patched + 1, "{name} {eds}");
                assert!(
                    after.targets_patched > before.targets_patched,
                    "{name} {eds}"
                );
            }
            let full = translate(&res).unwrap();
            assert_eq!(spec.upstreams, full.upstreams, "{name} {eds}");
        }
        assert!(patched > 0, "{name}: every change translated in full");
        // Anything else: a full translation.
        let full = t.counts().full;
        t.compile(&res, &Changed::Anything);
        assert_eq!(t.counts().full, full + 1);
    }
}

/// Through the ADS state: an EDS-only response reaches the translator as
/// an endpoint change (the other upstreams are not translated again), the
/// spec delivered is the full translation's, and the snapshot built after
/// the previous one keeps every other upstream (the same `Arc`).
#[test]
fn an_eds_response_rebuilds_only_its_upstream() {
    use crate::ads::{AdsState, Reply};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    let p = params();
    let x = cx::transparent_proxy(&p);
    let mut state = AdsState::new(Translator::new(), Node::default());
    state.start();
    let applied: std::cell::RefCell<Vec<Spec>> = Default::default();
    let mut apply = |s: Spec| {
        applied.borrow_mut().push(s);
        Ok(())
    };
    let respond = |state: &mut AdsState<Translator>,
                   apply: &mut dyn FnMut(Spec) -> Result<(), String>,
                   kind: Kind,
                   nonce: &str,
                   resources: Vec<Resource>| {
        let out = state.on_response(
            DeltaDiscoveryResponse {
                type_url: kind.type_url().into(),
                nonce: nonce.into(),
                resources,
                ..Default::default()
            },
            apply,
        );
        assert_eq!(out.reply, Reply::Ack, "{kind:?}");
        out.delivered
    };
    let of_kind = |kind: Kind| -> Vec<Resource> {
        x.resources()
            .into_iter()
            .filter(|(url, _, _)| url == kind.type_url())
            .map(|(_, name, any)| Resource {
                version: "1".into(),
                name,
                resource: Some(any),
                ..Default::default()
            })
            .collect()
    };
    for (i, kind) in [Kind::Cluster, Kind::Endpoints, Kind::Listener, Kind::Secret]
        .into_iter()
        .enumerate()
    {
        let r = of_kind(kind);
        if !r.is_empty() {
            respond(&mut state, &mut apply, kind, &i.to_string(), r);
        }
    }
    assert!(state.delivered());
    // (Each response compiled: the first two waited for the rest.)
    let full = state.check().counts().full;
    assert_eq!(state.check().counts().patched, 0);
    let first = Snapshot::build(applied.borrow().last().unwrap().clone(), 1).unwrap();

    // One assignment gets a new endpoint.
    let mut eds = of_kind(Kind::Endpoints);
    let mut la =
        ClusterLoadAssignment::decode(eds[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    let mut e = la.endpoints[0].lb_endpoints[0].clone();
    let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &mut e.host_identifier else {
        panic!("an endpoint")
    };
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    let Some(address::Address::SocketAddress(a)) =
        ep.address.as_mut().and_then(|a| a.address.as_mut())
    else {
        panic!("a socket address")
    };
    a.address = "10.99.0.1".into();
    a.port_specifier = Some(socket_address::PortSpecifier::PortValue(21000));
    la.endpoints[0].lb_endpoints.push(e);
    eds.truncate(1);
    eds[0].version = "2".into();
    eds[0].resource = Some(pack_any(la));
    assert!(respond(
        &mut state,
        &mut apply,
        Kind::Endpoints,
        "eds2",
        eds
    ));
    let c = state.check().counts();
    assert_eq!(
        (c.full, c.patched, c.targets_patched),
        (full, 1, 1),
        "{c:?}"
    );
    let spec = applied.borrow().last().unwrap().clone();
    assert_eq!(
        spec.upstreams,
        translate(state.resources()).unwrap().upstreams
    );
    let second = Snapshot::build_after(spec, 2, Some(&first)).unwrap();
    let (a, b) = (first.routes.upstreams(), second.routes.upstreams());
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 1);
    for (o, n) in a.iter().zip(b) {
        let fed = n
            .endpoints
            .iter()
            .any(|e| e.addr.0 == sa("10.99.0.1:21000"));
        assert_eq!(!Arc::ptr_eq(o, n), fed, "upstream {}", n.identity);
    }
    assert!(
        b.iter().any(|n| n
            .endpoints
            .iter()
            .any(|e| e.addr.0 == sa("10.99.0.1:21000"))),
        "the new endpoint is nowhere"
    );

    // A cluster response: translated in full.
    let cds = of_kind(Kind::Cluster)
        .into_iter()
        .map(|mut r| {
            r.version = "2".into();
            let mut c = Cluster::decode(r.resource.as_ref().unwrap().value.as_slice()).unwrap();
            c.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
                seconds: 7,
                nanos: 0,
            });
            r.resource = Some(pack_any(c));
            r
        })
        .collect();
    assert!(respond(&mut state, &mut apply, Kind::Cluster, "cds2", cds));
    assert_eq!(state.check().counts().full, full + 1);
}
