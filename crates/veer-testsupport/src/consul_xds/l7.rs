//! Consul-shaped L7 xDS resources: HTTP connection managers on the public
//! listener and on upstream chains, inline and RDS route configurations,
//! HTTP RBAC filters.
//!
//! Each builder mirrors a Consul v1.16.0 golden file (MPL-2.0,
//! `agent/xds/testdata/...` in hashicorp/consul, tag v1.16.0), named on the
//! builder, with the same parameterisation as the parent module (test CA
//! certificates, addresses).
use super::*;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, route, route_action, route_match,
    weighted_cluster::ClusterWeight, HeaderMatcher, QueryParameterMatcher, RetryPolicy, Route,
    RouteAction, RouteMatch, VirtualHost, WeightedCluster,
};
use envoy_types::pb::envoy::extensions::filters::http::grpc_http1_bridge::v3::Config as GrpcHttp1Bridge;
use envoy_types::pb::envoy::extensions::filters::http::grpc_stats::v3::{
    filter_config, FilterConfig as GrpcStats,
};
use envoy_types::pb::envoy::extensions::filters::http::header_to_metadata::v3::{
    config as h2m, Config as HeaderToMetadata,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options, HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use prost::Message;
use std::collections::HashMap;

fn http_filter<T: prost::Message + Name>(name: &str, m: T) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(m))),
        ..Default::default()
    }
}

/// `envoy.filters.http.router`.
pub fn router() -> HttpFilter {
    http_filter("envoy.filters.http.router", Router::default())
}

/// `envoy.filters.http.rbac` with `rules` (`None` = no rules).
pub fn http_rbac(rules: Option<Rbac>) -> HttpFilter {
    http_filter(
        "envoy.filters.http.rbac",
        HttpRbac {
            rules,
            ..Default::default()
        },
    )
}

/// `grpc_stats` (stats for all methods) and `grpc_http1_bridge`, as Consul
/// puts them first for gRPC.
pub fn grpc_filters() -> Vec<HttpFilter> {
    vec![
        http_filter(
            "envoy.filters.http.grpc_stats",
            GrpcStats {
                per_method_stat_specifier: Some(
                    filter_config::PerMethodStatSpecifier::StatsForAllMethods(BoolValue {
                        value: true,
                    }),
                ),
                ..Default::default()
            },
        ),
        http_filter(
            "envoy.filters.http.grpc_http1_bridge",
            GrpcHttp1Bridge::default(),
        ),
    ]
}

/// Consul's five XFCC `header_to_metadata` rules (trust domain, partition,
/// namespace, datacenter, service).
pub fn header_to_metadata() -> HttpFilter {
    let re = ".*URI=spiffe://([^/]+.[^/]+)(?:/ap/([^/]+))?/ns/([^/]+)/dc/([^/]+)/svc/([^/;,]+).*";
    let rule = |key: &str, sub: &str| h2m::Rule {
        header: "x-forwarded-client-cert".into(),
        on_header_present: Some(h2m::KeyValuePair {
            metadata_namespace: "consul".into(),
            key: key.into(),
            regex_value_rewrite: Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: re.into(),
                    ..Default::default()
                }),
                substitution: sub.into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    http_filter(
        "envoy.filters.http.header_to_metadata",
        HeaderToMetadata {
            request_rules: vec![
                rule("trust-domain", "\\1"),
                rule("partition", "\\2"),
                rule("namespace", "\\3"),
                rule("datacenter", "\\4"),
                rule("service", "\\5"),
            ],
            ..Default::default()
        },
    )
}

/// An HCM filter with Consul's stat prefix and tracing.
pub fn hcm(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    http_filters: Vec<HttpFilter>,
    http2: bool,
) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(pack_any(
            HttpConnectionManager {
                stat_prefix: stat_prefix.into(),
                route_specifier: Some(routes),
                http_filters,
                tracing: Some(Default::default()),
                http2_protocol_options: http2.then(Default::default),
                ..Default::default()
            },
        ))),
    }
}

/// RDS over ADS by `name`.
pub fn rds(name: &str) -> http_connection_manager::RouteSpecifier {
    http_connection_manager::RouteSpecifier::Rds(Rds {
        config_source: ads(),
        route_config_name: name.into(),
    })
}

/// One virtual host (`domains: ["*"]`) with `routes`.
pub fn route_config(name: &str, vhost: &str, routes: Vec<Route>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.into(),
        virtual_hosts: vec![VirtualHost {
            name: vhost.into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn prefix(p: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(p.into())),
        ..Default::default()
    }
}

fn to(cluster: String) -> Option<route::Action> {
    Some(route::Action::Route(RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
        ..Default::default()
    }))
}

/// `match: {prefix: "/"}` to `cluster`.
pub fn catch_all(cluster: String) -> Route {
    Route {
        r#match: Some(prefix("/")),
        action: to(cluster),
        ..Default::default()
    }
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher {
        regex: r.into(),
        ..Default::default()
    }
}

/// The public listener with an HCM, as
/// `agent/xds/testdata/listeners/http-public-listener.latest.golden`
/// (Consul v1.16.0): inline route to `local_app`, HTTP `rbac` with
/// `rules: {}` (replace with [`set_public_http_rbac`]),
/// `header_to_metadata`, router, XFCC `APPEND_FORWARD` with subject, cert,
/// chain, dns and uri.
pub fn http_public_listener(p: &Params) -> Listener {
    let mut l = public_listener(p);
    let mut f = hcm(
        "public_listener",
        http_connection_manager::RouteSpecifier::RouteConfig(route_config(
            "public_listener",
            "public_listener",
            vec![catch_all("local_app".into())],
        )),
        vec![
            http_rbac(Some(Rbac::default())),
            header_to_metadata(),
            router(),
        ],
        false,
    );
    if let Some(filter::ConfigType::TypedConfig(a)) = &mut f.config_type {
        let mut h = HttpConnectionManager::decode(a.value.as_slice()).expect("hcm");
        h.forward_client_cert_details =
            http_connection_manager::ForwardClientCertDetails::AppendForward as i32;
        h.set_current_client_cert_details =
            Some(http_connection_manager::SetCurrentClientCertDetails {
                subject: Some(BoolValue { value: true }),
                cert: true,
                chain: true,
                dns: true,
                uri: true,
                ..Default::default()
            });
        *a = pack_any(h);
    }
    l.filter_chains[0].filters = vec![f];
    l
}

/// As `agent/xds/testdata/listeners/grpc-public-listener.latest.golden`
/// (Consul v1.16.0): gRPC filters, HTTP `rbac` `rules: {}`, router,
/// HTTP/2 codec, no XFCC settings.
pub fn grpc_public_listener(p: &Params) -> Listener {
    let mut l = public_listener(p);
    let mut filters = grpc_filters();
    filters.push(http_rbac(Some(Rbac::default())));
    filters.push(router());
    l.filter_chains[0].filters = vec![hcm(
        "public_listener",
        http_connection_manager::RouteSpecifier::RouteConfig(route_config(
            "public_listener",
            "public_listener",
            vec![catch_all("local_app".into())],
        )),
        filters,
        true,
    )];
    l
}

/// Replaces the HTTP `rbac` filter of an HCM public listener (the first
/// filter named `envoy.filters.http.rbac`) with `rules`.
pub fn set_public_http_rbac(l: &mut Listener, rules: Option<Rbac>) {
    let f = &mut l.filter_chains[0].filters[0];
    let Some(filter::ConfigType::TypedConfig(a)) = &mut f.config_type else {
        panic!("typed HCM");
    };
    let mut h = HttpConnectionManager::decode(a.value.as_slice()).expect("hcm");
    let i = h
        .http_filters
        .iter()
        .position(|f| f.name == "envoy.filters.http.rbac")
        .expect("an HTTP rbac filter");
    h.http_filters[i] = http_rbac(rules);
    *a = pack_any(h);
}

/// Mirrors `agent/xds/testdata/listeners/transparent-proxy-http-upstream.latest.golden`
/// (Consul v1.16.0): as [`transparent_proxy`], but `google` (protocol
/// http) on its virtual IPs is an HCM with an inline route `google` to its
/// cluster and the router.
pub fn transparent_proxy_http_upstream(p: &Params) -> ConsulXds {
    let mut x = transparent_proxy(p);
    let l = x.listener_mut(&format!("outbound_listener:{}", p.outbound));
    l.filter_chains[0].filters = vec![hcm(
        "upstream.google.default.default.dc1",
        http_connection_manager::RouteSpecifier::RouteConfig(route_config(
            "google",
            "google.default.default.dc1",
            vec![catch_all(p.sni("google"))],
        )),
        vec![router()],
        false,
    )];
    x
}

/// The services the router golden's routes go to (each its own cluster).
pub const ROUTER_SERVICES: &[&str] = &[
    "prefix",
    "exact",
    "regex",
    "hdr-present",
    "hdr-not-present",
    "hdr-exact",
    "hdr-prefix",
    "hdr-suffix",
    "hdr-regex",
    "just-methods",
    "prm-exact",
    "prm-regex",
    "prm-present",
    "prefix-rewrite-1",
    "req-timeout",
    "idle-timeout",
    "retry-connect",
    "retry-reset",
    "retry-codes",
    "retry-all",
    "big-side",
    "goldilocks-side",
    "lil-bit-side",
    "header-manip",
    "db",
];

#[allow(deprecated)] // Consul v1.16 writes the deprecated header matchers.
fn hdr(name: &str, m: header_matcher::HeaderMatchSpecifier, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.into(),
        header_match_specifier: Some(m),
        invert_match: invert,
        ..Default::default()
    }
}

/// The route configuration `db` of
/// `agent/xds/testdata/routes/connect-proxy-with-chain-and-router.latest.golden`
/// (Consul v1.16.0), in its order, with cluster names in `p`'s trust
/// domain; the `nil-match`/`empty-match` and second prefix-rewrite routes
/// (unreachable duplicates) are left out.
#[allow(deprecated)]
pub fn router_routes(p: &Params) -> RouteConfiguration {
    use header_matcher::HeaderMatchSpecifier as H;
    let c = |s: &str| p.sni(s);
    let with = |m: RouteMatch, svc: &str| Route {
        r#match: Some(m),
        action: to(c(svc)),
        ..Default::default()
    };
    let heads = |h: Vec<HeaderMatcher>| RouteMatch {
        headers: h,
        ..prefix("/")
    };
    let query = |q: QueryParameterMatcher| RouteMatch {
        query_parameters: vec![q],
        ..prefix("/")
    };
    let action = |svc: &str, f: &dyn Fn(&mut RouteAction)| {
        let mut a = RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(c(svc))),
            ..Default::default()
        };
        f(&mut a);
        Some(route::Action::Route(a))
    };
    let retry = |on: &str, n: Option<u32>, codes: Vec<u32>| {
        Some(RetryPolicy {
            retry_on: on.into(),
            num_retries: n.map(|value| UInt32Value { value }),
            retriable_status_codes: codes,
            ..Default::default()
        })
    };
    let add = |k: &str, v: &str, append: bool| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }),
        append: Some(BoolValue { value: append }),
        ..Default::default()
    };
    let routes = vec![
        with(prefix("/prefix"), "prefix"),
        with(
            RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Path("/exact".into())),
                ..Default::default()
            },
            "exact",
        ),
        with(
            RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::SafeRegex(regex("/regex"))),
                ..Default::default()
            },
            "regex",
        ),
        with(
            heads(vec![hdr("x-debug", H::PresentMatch(true), false)]),
            "hdr-present",
        ),
        with(
            heads(vec![hdr("x-debug", H::PresentMatch(true), true)]),
            "hdr-not-present",
        ),
        with(
            heads(vec![hdr("x-debug", H::ExactMatch("exact".into()), false)]),
            "hdr-exact",
        ),
        with(
            heads(vec![hdr("x-debug", H::PrefixMatch("prefix".into()), false)]),
            "hdr-prefix",
        ),
        with(
            heads(vec![hdr("x-debug", H::SuffixMatch("suffix".into()), false)]),
            "hdr-suffix",
        ),
        with(
            heads(vec![hdr(
                "x-debug",
                H::SafeRegexMatch(regex("regex")),
                false,
            )]),
            "hdr-regex",
        ),
        with(
            heads(vec![hdr(
                ":method",
                H::SafeRegexMatch(regex("GET|PUT")),
                false,
            )]),
            "just-methods",
        ),
        with(
            query(QueryParameterMatcher {
                name: "secretparam1".into(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact(
                                "exact".into(),
                            )),
                            ..Default::default()
                        },
                    ),
                ),
            }),
            "prm-exact",
        ),
        with(
            query(QueryParameterMatcher {
                name: "secretparam2".into(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::SafeRegex(regex(
                                "regex",
                            ))),
                            ..Default::default()
                        },
                    ),
                ),
            }),
            "prm-regex",
        ),
        with(
            query(QueryParameterMatcher {
                name: "secretparam3".into(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(true),
                ),
            }),
            "prm-present",
        ),
        Route {
            r#match: Some(prefix("/prefix")),
            action: action("prefix-rewrite-1", &|a| a.prefix_rewrite = "/".into()),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/timeout")),
            action: action("req-timeout", &|a| a.timeout = secs(33)),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/idle-timeout")),
            action: action("idle-timeout", &|a| a.idle_timeout = secs(33)),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/retry-connect")),
            action: action("retry-connect", &|a| {
                a.retry_policy = retry("connect-failure", Some(15), vec![])
            }),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/retry-reset")),
            action: action("retry-reset", &|a| {
                a.retry_policy = retry("reset", Some(15), vec![])
            }),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/retry-codes")),
            action: action("retry-codes", &|a| {
                a.retry_policy = retry("retriable-status-codes", Some(15), vec![401, 409, 451])
            }),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/retry-all")),
            action: action("retry-all", &|a| {
                a.retry_policy = retry(
                    "5xx,gateway-error,reset,connect-failure,envoy-ratelimited,retriable-4xx,refused-stream,cancelled,deadline-exceeded,internal,resource-exhausted,unavailable,retriable-status-codes",
                    None,
                    vec![401, 409, 451],
                )
            }),
            ..Default::default()
        },
        Route {
            r#match: Some(prefix("/split-3-ways")),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::WeightedClusters(
                    WeightedCluster {
                        clusters: [
                            ("big-side", 9550),
                            ("goldilocks-side", 400),
                            ("lil-bit-side", 50),
                        ]
                        .into_iter()
                        .map(|(s, w)| ClusterWeight {
                            name: c(s),
                            weight: Some(UInt32Value { value: w }),
                            ..Default::default()
                        })
                        .collect(),
                        total_weight: Some(UInt32Value { value: 10000 }),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })),
            ..Default::default()
        },
        Route {
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Path("/header-manip".into())),
                ..Default::default()
            }),
            action: to(c("header-manip")),
            request_headers_to_add: vec![add("request", "bar", true), add("bar", "baz", false)],
            request_headers_to_remove: vec!["qux".into()],
            response_headers_to_add: vec![add("response", "bar", true), add("bar", "baz", false)],
            response_headers_to_remove: vec!["qux".into()],
            ..Default::default()
        },
        catch_all(c("db")),
    ];
    let mut rc = route_config("db", "db", routes);
    rc.validate_clusters = Some(BoolValue { value: true });
    rc
}

/// A sidecar whose explicit upstream `db` (at `p.db_bind`) is an HCM with
/// RDS `db` ([`router_routes`]), as the `db` listener of
/// `agent/xds/testdata/listeners/connect-proxy-with-chain-and-router.latest.golden`
/// (Consul v1.16.0); one EDS cluster per [`ROUTER_SERVICES`] entry with
/// one endpoint each (10.10.9.<i+1>:8080, not from a golden), `local_app`.
pub fn chain_and_router(p: &Params) -> ConsulXds {
    let db = Listener {
        filter_chains: vec![FilterChain {
            filters: vec![hcm(
                "upstream.db.default.default.dc1",
                rds("db"),
                vec![router()],
                false,
            )],
            ..Default::default()
        }],
        ..db_listener(p)
    };
    let mut clusters = vec![local_app_cluster(p)];
    let mut endpoints = vec![];
    for (i, s) in ROUTER_SERVICES.iter().enumerate() {
        clusters.push(service_cluster(p, s));
        let ep: SocketAddr = format!("10.10.9.{}:8080", i + 1).parse().expect("addr");
        endpoints.push(load_assignment(&p.sni(s), &[ep]));
    }
    let x = ConsulXds {
        listeners: vec![db, public_listener(p)],
        clusters,
        endpoints,
        secrets: vec![],
        routes: vec![router_routes(p)],
    };
    finish(p, x)
}

/// Marks a cluster HTTP/2 towards its endpoints, as Consul does for
/// http2 and grpc services (`typed_extension_protocol_options`
/// `HttpProtocolOptions.explicit_http_config.http2_protocol_options`,
/// e.g. `agent/xds/testdata/clusters/connect-proxy-with-chain-and-overrides.latest.golden`).
pub fn set_http2(c: &mut Cluster) {
    let o = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Default::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    let mut m: HashMap<String, Any> = HashMap::new();
    m.insert(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
        pack_any(o),
    );
    c.typed_extension_protocol_options = m;
}

/// The `db` upstream of
/// `agent/xds/testdata/listeners/connect-proxy-with-grpc-chain.latest.golden`
/// (Consul v1.16.0): an HCM with RDS `db`, gRPC filters, router, HTTP/2;
/// the route configuration is the default chain's one catch-all route and
/// the `db` cluster speaks HTTP/2.
pub fn grpc_chain(p: &Params) -> ConsulXds {
    let mut filters = grpc_filters();
    filters.push(router());
    let db = Listener {
        filter_chains: vec![FilterChain {
            filters: vec![hcm(
                "upstream.db.default.default.dc1",
                rds("db"),
                filters,
                true,
            )],
            ..Default::default()
        }],
        ..db_listener(p)
    };
    let mut dbc = service_cluster(p, "db");
    set_http2(&mut dbc);
    let x = ConsulXds {
        listeners: vec![db, grpc_public_listener(p)],
        clusters: vec![dbc, local_app_cluster(p)],
        endpoints: vec![load_assignment(&p.sni("db"), &eps(p, "db"))],
        secrets: vec![],
        routes: vec![route_config("db", "db", vec![catch_all(p.sni("db"))])],
    };
    finish(p, x)
}
