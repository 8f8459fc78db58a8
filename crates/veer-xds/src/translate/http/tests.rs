//! Table tests of the L7 translation: Consul-shaped HTTP listeners, routes
//! and HTTP RBAC filters (`veer_testsupport::consul_xds::l7`, mirroring
//! Consul v1.16.0's goldens) in, `HttpRoutes` / `InboundHttp` (or the NACK
//! reason) out.
use crate::resources::{Decoded, Kind, Resources};
use crate::translate::{decode, missing, translate, wanted, TranslateError};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, Listener};
use envoy_types::pb::envoy::config::rbac::v3::{permission, rbac, Permission, Policy, Rbac};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, route, route_action, route_match, HeaderMatcher, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher, PathMatcher, RegexMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use envoy_types::util::pack_any;
use prost::{Message, Name};
use std::collections::BTreeSet;
use std::time::Duration;
use veer_core::authz::{MatchPattern, Principal, RbacRules, StringMatch};
use veer_core::intentions::Action;
use veer_core::l7::{
    HeaderMatch, HeaderMatchKind, HttpRoutes, InboundHttp, PathMatch, QueryMatch, QueryMatchKind,
    RbacPermission, RequestMatch, RetryPolicy, WeightedCluster, Xfcc,
};
use veer_core::route::Protocol;
use veer_core::snapshot::{Snapshot, Spec, UpstreamSpec};
use veer_testsupport::consul_xds::{self as cx, l7, ConsulXds, Params};

const TD: &str = veer_testsupport::ca::TRUST_DOMAIN;

fn params() -> Params {
    let ca = veer_ca::Ca::new_root(TD).expect("ca");
    Params::golden(cx::Certs::issue(&ca, "dc1", "web"))
}

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
    Snapshot::build(spec.clone(), 1).unwrap_or_else(|e| panic!("snapshot: {e}"));
    spec
}

fn up<'a>(spec: &'a Spec, svc: &str) -> &'a UpstreamSpec {
    spec.upstreams
        .iter()
        .find(|u| u.identity.service == svc)
        .unwrap_or_else(|| panic!("no upstream {svc} in {:?}", spec.upstreams))
}

fn http(u: &UpstreamSpec) -> &HttpRoutes {
    u.http.as_ref().expect("HTTP routes")
}

fn decode_listener(l: &Listener) -> Result<Decoded, TranslateError> {
    decode(Kind::Listener, &l.name, &pack_any(l.clone()))
}

fn decode_route(r: &RouteConfiguration) -> Result<Decoded, TranslateError> {
    decode(Kind::Route, &r.name, &pack_any(r.clone()))
}

fn err(r: Result<Decoded, TranslateError>) -> (String, &'static str) {
    match r {
        Err(e) => (e.to_string(), e.classify()),
        Ok(_) => panic!("expected a NACK"),
    }
}

/// The HCM of a listener's first chain's `i`th filter, to edit.
fn edit_hcm(l: &mut Listener, i: usize, f: impl FnOnce(&mut HttpConnectionManager)) {
    let Some(filter::ConfigType::TypedConfig(a)) = &mut l.filter_chains[0].filters[i].config_type
    else {
        panic!("typed filter")
    };
    let mut h = HttpConnectionManager::decode(a.value.as_slice()).expect("hcm");
    f(&mut h);
    *a = pack_any(h);
}

fn sm(p: MatchPattern) -> StringMatch {
    StringMatch {
        pattern: p,
        ignore_case: false,
    }
}

// ------------------------------------------------------------ mappings

#[test]
fn http_upstream_golden_is_an_http_upstream_with_one_catch_all_route() {
    let p = params();
    let spec = spec_of(&l7::transparent_proxy_http_upstream(&p));
    let g = up(&spec, "google");
    assert_eq!(g.protocol, Protocol::Http);
    assert_eq!(g.virtual_ips, p.vips["google"]);
    assert_eq!(g.sni.as_deref(), Some(p.sni("google").as_str()));
    assert_eq!(g.endpoints, p.endpoints["google"]);
    let h = http(g);
    assert_eq!(h.clusters.len(), 1);
    assert_eq!(h.clusters[0].name, p.sni("google"));
    assert_eq!(h.clusters[0].protocol, Protocol::Http);
    assert_eq!(h.clusters[0].targets[0].endpoints, p.endpoints["google"]);
    assert_eq!(
        h.clusters[0].targets[0].identity.to_string(),
        p.spiffe("dc1", "google")
    );
    assert_eq!(h.routes.len(), 1);
    assert_eq!(h.routes[0].matches, RequestMatch::default());
    assert_eq!(
        h.routes[0].action.clusters,
        vec![WeightedCluster {
            cluster: 0,
            weight: 1
        }]
    );
    assert_eq!(h.routes[0].action.timeout, None);
    // The TCP upstreams and the L4 inbound are as before.
    assert!(up(&spec, "db").http.is_none());
    assert_eq!(up(&spec, "db").protocol, Protocol::Tcp);
    assert_eq!(spec.inbound_http, None);
    assert!(spec.unapplied.is_empty(), "{:?}", spec.unapplied);
}

#[test]
fn router_golden_maps_route_by_route() {
    let p = params();
    let spec = spec_of(&l7::chain_and_router(&p));
    let db = up(&spec, "db");
    assert_eq!(db.local_bind, Some(p.db_bind));
    assert_eq!(db.protocol, Protocol::Http);
    // The primary target is the catch-all route's cluster.
    assert_eq!(db.sni.as_deref(), Some(p.sni("db").as_str()));
    let h = http(db);
    let names: Vec<String> = h.clusters.iter().map(|c| c.name.clone()).collect();
    let want: Vec<String> = l7::ROUTER_SERVICES.iter().map(|s| p.sni(s)).collect();
    assert_eq!(names, want, "one cluster per service, in first-use order");
    for (i, c) in h.clusters.iter().enumerate() {
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].identity.service, l7::ROUTER_SERVICES[i]);
        assert_eq!(
            c.targets[0].endpoints,
            vec![format!("10.10.9.{}:8080", i + 1).parse().unwrap()]
        );
    }
    let cl = |s: &str| h.clusters.iter().position(|c| c.name == p.sni(s)).unwrap();
    let only = |s: &str| {
        vec![WeightedCluster {
            cluster: cl(s),
            weight: 1,
        }]
    };
    let any = RequestMatch::default;
    let hdr = |name: &str, kind: HeaderMatchKind, invert: bool| RequestMatch {
        headers: vec![HeaderMatch {
            name: name.into(),
            kind,
            invert,
        }],
        ..any()
    };
    let q = |name: &str, kind: QueryMatchKind| RequestMatch {
        query: vec![QueryMatch {
            name: name.into(),
            kind,
        }],
        ..any()
    };
    let path = |p: PathMatch| RequestMatch { path: p, ..any() };
    use HeaderMatchKind as H;
    // (route index, match, target service)
    let rows: Vec<(usize, RequestMatch, &str)> = vec![
        (0, path(PathMatch::Prefix("/prefix".into())), "prefix"),
        (1, path(PathMatch::Exact("/exact".into())), "exact"),
        (2, path(PathMatch::Regex("/regex".into())), "regex"),
        (3, hdr("x-debug", H::Present, false), "hdr-present"),
        (4, hdr("x-debug", H::Present, true), "hdr-not-present"),
        (
            5,
            hdr("x-debug", H::Exact("exact".into()), false),
            "hdr-exact",
        ),
        (
            6,
            hdr("x-debug", H::Prefix("prefix".into()), false),
            "hdr-prefix",
        ),
        (
            7,
            hdr("x-debug", H::Suffix("suffix".into()), false),
            "hdr-suffix",
        ),
        (
            8,
            hdr("x-debug", H::Regex("regex".into()), false),
            "hdr-regex",
        ),
        (
            9,
            hdr(":method", H::Regex("GET|PUT".into()), false),
            "just-methods",
        ),
        (
            10,
            q("secretparam1", QueryMatchKind::Exact("exact".into())),
            "prm-exact",
        ),
        (
            11,
            q("secretparam2", QueryMatchKind::Regex("regex".into())),
            "prm-regex",
        ),
        (
            12,
            q("secretparam3", QueryMatchKind::Present),
            "prm-present",
        ),
        (22, any(), "db"),
    ];
    assert_eq!(h.routes.len(), 23);
    for (i, m, svc) in rows {
        let r = &h.routes[i];
        assert_eq!(r.matches, m, "route {i}");
        assert_eq!(r.action.clusters, only(svc), "route {i}");
        assert_eq!(r.action.prefix_rewrite, None, "route {i}");
        assert_eq!(r.action.retry, None, "route {i}");
        assert_eq!(r.name, i.to_string());
    }
    assert_eq!(h.routes[13].action.prefix_rewrite.as_deref(), Some("/"));
    assert_eq!(h.routes[14].action.timeout, Some(Duration::from_secs(33)));
    assert_eq!(
        h.routes[15].action.timeout, None,
        "idle timeout is not the timeout"
    );
    let retry = |n, c, r, codes: Vec<u16>| {
        Some(RetryPolicy {
            num_retries: n,
            on_connect_failure: c,
            on_reset: r,
            on_status_codes: codes,
        })
    };
    assert_eq!(h.routes[16].action.retry, retry(15, true, false, vec![]));
    assert_eq!(h.routes[17].action.retry, retry(15, false, true, vec![]));
    assert_eq!(
        h.routes[18].action.retry,
        retry(15, false, false, vec![401, 409, 451])
    );
    // retry-all: no count = Envoy's 1; 5xx, gateway-error, retriable-4xx
    // and the listed codes as status codes.
    let mut all: Vec<u16> = vec![401, 409, 451];
    all.extend(500..=599);
    assert_eq!(h.routes[19].action.retry, retry(1, true, true, all));
    assert_eq!(
        h.routes[20].action.clusters,
        vec![
            WeightedCluster {
                cluster: cl("big-side"),
                weight: 9550
            },
            WeightedCluster {
                cluster: cl("goldilocks-side"),
                weight: 400
            },
            WeightedCluster {
                cluster: cl("lil-bit-side"),
                weight: 50
            },
        ]
    );
    assert_eq!(
        h.routes[21].matches,
        path(PathMatch::Exact("/header-manip".into()))
    );
    // What is accepted but not applied is named, by route and field.
    let un: Vec<String> = spec
        .unapplied
        .iter()
        .map(|u| format!("{} => {}", u.setting, u.detail))
        .collect();
    let has = |frag: &str| un.iter().any(|u| u.contains(frag));
    assert!(
        has("route db: virtual_hosts[0].routes[15].route.idle_timeout"),
        "{un:#?}"
    );
    assert!(
        has("route db: virtual_hosts[0].routes[21].request_headers_to_add"),
        "{un:#?}"
    );
    assert!(
        has("cancelled,deadline-exceeded,internal,resource-exhausted,unavailable"),
        "{un:#?}"
    );
    assert_eq!(un.len(), 3, "{un:#?}");
    assert!(spec.unapplied.iter().all(|u| u.kind == "unsupported"));
}

#[test]
fn rds_is_wanted_waited_for_and_applied() {
    let p = params();
    let x = l7::chain_and_router(&p);
    let mut res = load(&x);
    assert_eq!(
        wanted(&res).routes,
        ["db".to_string()].into_iter().collect::<BTreeSet<_>>()
    );
    let rc = res.routes.remove("db").unwrap();
    let m = missing(&res);
    assert!(
        m.iter()
            .any(|w| w == &format!("route db (RDS), named by listener db:{}", p.db_bind)),
        "{m:?}"
    );
    match translate(&res) {
        Err(TranslateError::Incomplete(w)) => assert!(w.iter().any(|w| w.contains("route db"))),
        other => panic!("{other:?}"),
    }
    // The clusters a route names are waited for too.
    res.routes.insert("db".into(), rc);
    res.clusters.remove(&p.sni("big-side"));
    let m = missing(&res);
    assert!(
        m.iter()
            .any(|w| w.starts_with(&format!("cluster {} (CDS)", p.sni("big-side")))),
        "{m:?}"
    );
    // A route configuration refused in every version leaves no route: the
    // upstream cannot be told, so the configuration is refused (NACK, the
    // old one keeps serving).
    let mut res = load(&x);
    res.routes.remove("db");
    res.refused
        .insert((Kind::Route, "db".into()), "bad regex".into());
    assert!(missing(&res).is_empty(), "{:?}", missing(&res));
    let e = translate(&res).unwrap_err();
    assert_eq!(e.classify(), "inconsistent");
    assert!(e.to_string().contains("route db"), "{e}");
}

#[test]
fn http_public_listener_golden_is_inbound_http() {
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    *x.public_listener_mut() = l7::http_public_listener(&p);
    let spec = spec_of(&x);
    assert_eq!(spec.local_app, p.local_app);
    // No network RBAC filter: the connection is admitted; requests are
    // decided by the HTTP RBAC filter, `rules: {}` = deny all.
    assert_eq!(spec.rbac, Some(vec![]));
    assert_eq!(
        spec.inbound_http,
        Some(InboundHttp {
            protocol: Protocol::Http,
            rbac: Some(vec![RbacRules {
                action: Action::Allow,
                policies: vec![]
            }]),
            xfcc: Xfcc::AppendForward,
            request_timeout: None,
        })
    );
    let un: Vec<String> = spec.unapplied.iter().map(|u| u.setting.clone()).collect();
    assert_eq!(
        un,
        vec![
            format!("listener public_listener:{}: filter_chains[0].filters[0].typed_config.http_filters[1]", p.public),
            format!("listener public_listener:{}: filter_chains[0].filters[0].typed_config.set_current_client_cert_details", p.public),
        ]
    );
    assert!(spec.unapplied[0].detail.contains("header_to_metadata"));

    // No rbac filter at all: every request allowed (Envoy), not the
    // intentions' default (there are none in xDS mode).
    let mut l = l7::http_public_listener(&p);
    edit_hcm(&mut l, 0, |h| h.http_filters.remove(0).name.clear());
    *x.public_listener_mut() = l;
    let spec = spec_of(&x);
    assert_eq!(spec.inbound_http.unwrap().rbac, Some(vec![]));
}

#[test]
fn http_listener_with_timeouts_sets_the_request_timeout() {
    // agent/xds/testdata/listeners/http-listener-with-timeouts.latest.golden
    // (Consul v1.16.0): the local route's timeout 2.345s, idle 3.456s.
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    let mut l = l7::http_public_listener(&p);
    edit_hcm(&mut l, 0, |h| {
        let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = &mut h.route_specifier
        else {
            panic!()
        };
        let Some(route::Action::Route(a)) = &mut rc.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        a.timeout = Some(PbDuration {
            seconds: 2,
            nanos: 345_000_000,
        });
        a.idle_timeout = Some(PbDuration {
            seconds: 3,
            nanos: 456_000_000,
        });
    });
    *x.public_listener_mut() = l;
    let spec = spec_of(&x);
    assert_eq!(
        spec.inbound_http.unwrap().request_timeout,
        Some(Duration::from_millis(2345))
    );
    assert!(spec.unapplied.iter().any(|u| u
        .setting
        .ends_with("route_config.virtual_hosts[0].routes[0].route.idle_timeout")));
}

#[test]
fn grpc_chain_and_public_listener_are_grpc() {
    let p = params();
    let spec = spec_of(&l7::grpc_chain(&p));
    let db = up(&spec, "db");
    assert_eq!(db.protocol, Protocol::Grpc);
    assert_eq!(db.local_bind, Some(p.db_bind));
    assert_eq!(http(db).clusters[0].protocol, Protocol::Grpc);
    let ib = spec.inbound_http.as_ref().unwrap();
    assert_eq!(ib.protocol, Protocol::Grpc);
    assert_eq!(ib.xfcc, Xfcc::Sanitize);
    // grpc_stats and grpc_http1_bridge, on both sides, are named.
    assert_eq!(spec.unapplied.len(), 4, "{:?}", spec.unapplied);

    // An http2 chain (no gRPC filters) to an HTTP/2 cluster.
    let mut x = l7::grpc_chain(&p);
    let name = format!("db:{}", p.db_bind);
    edit_hcm(x.listener_mut(&name), 0, |h| {
        h.http_filters.drain(..2);
    });
    let spec = spec_of(&x);
    assert_eq!(up(&spec, "db").protocol, Protocol::Http2);
    assert_eq!(http(up(&spec, "db")).clusters[0].protocol, Protocol::Http2);
}

fn kitchen_sink_perms_rbac() -> Rbac {
    // agent/xds/testdata/rbac/default-deny-single-intention-with-kitchen-sink-perms--httpfilter.golden
    // (Consul v1.16.0), its first two permissions.
    use header_matcher::HeaderMatchSpecifier as H;
    let url = |p: string_matcher::MatchPattern| Permission {
        rule: Some(permission::Rule::UrlPath(PathMatcher {
            rule: Some(path_matcher::Rule::Path(StringMatcher {
                match_pattern: Some(p),
                ..Default::default()
            })),
        })),
    };
    let and = |rules: Vec<Permission>| Permission {
        rule: Some(permission::Rule::AndRules(permission::Set { rules })),
    };
    let not = |p: Permission| Permission {
        rule: Some(permission::Rule::NotRule(Box::new(p))),
    };
    #[allow(deprecated)]
    let method = Permission {
        rule: Some(permission::Rule::Header(HeaderMatcher {
            name: ":method".into(),
            header_match_specifier: Some(H::SafeRegexMatch(RegexMatcher {
                regex: "GET|HEAD|OPTIONS".into(),
                ..Default::default()
            })),
            ..Default::default()
        })),
    };
    use string_matcher::MatchPattern as P;
    let regex = |r: &str| {
        P::SafeRegex(RegexMatcher {
            regex: r.into(),
            ..Default::default()
        })
    };
    Rbac {
        action: rbac::Action::Allow as i32,
        policies: [(
            "consul-intentions-layer7-0".to_string(),
            Policy {
                permissions: vec![
                    and(vec![
                        url(P::Prefix("/v1".into())),
                        not(url(P::Exact("/v1/secret".into()))),
                    ]),
                    and(vec![
                        and(vec![url(regex("/v[123]")), method]),
                        not(url(P::Prefix("/v1".into()))),
                        not(url(P::Exact("/v1/secret".into()))),
                    ]),
                ],
                principals: vec![cx::spiffe_principal(TD, "web")],
                ..Default::default()
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

#[test]
fn http_rbac_golden_permissions_map() {
    let p = params();
    let mut x = cx::transparent_proxy(&p);
    let mut l = l7::http_public_listener(&p);
    l7::set_public_http_rbac(&mut l, Some(kitchen_sink_perms_rbac()));
    *x.public_listener_mut() = l;
    let spec = spec_of(&x);
    let rules = spec.inbound_http.unwrap().rbac.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].action, Action::Allow);
    let pol = &rules[0].policies[0];
    assert_eq!(pol.name, "consul-intentions-layer7-0");
    assert!(matches!(pol.principals[0], Principal::Authenticated { .. }));
    let url = |p: MatchPattern| RbacPermission::UrlPath(sm(p));
    let not = |p| RbacPermission::Not(Box::new(p));
    assert_eq!(
        pol.permissions,
        vec![
            RbacPermission::And(vec![
                url(MatchPattern::Prefix("/v1".into())),
                not(url(MatchPattern::Exact("/v1/secret".into())))
            ]),
            RbacPermission::And(vec![
                RbacPermission::And(vec![
                    url(MatchPattern::SafeRegex("/v[123]".into())),
                    RbacPermission::Header {
                        name: ":method".into(),
                        value: Some(sm(MatchPattern::SafeRegex("GET|HEAD|OPTIONS".into()))),
                        invert: false
                    }
                ]),
                not(url(MatchPattern::Prefix("/v1".into()))),
                not(url(MatchPattern::Exact("/v1/secret".into()))),
            ]),
        ]
    );
    // `any` is stored as no condition (the network form).
    let mut r = kitchen_sink_perms_rbac();
    r.action = rbac::Action::Deny as i32;
    for pol in r.policies.values_mut() {
        pol.permissions = vec![Permission {
            rule: Some(permission::Rule::Any(true)),
        }];
    }
    let mut l = l7::http_public_listener(&p);
    l7::set_public_http_rbac(&mut l, Some(r));
    *x.public_listener_mut() = l;
    let rules = spec_of(&x).inbound_http.unwrap().rbac.unwrap();
    assert_eq!(rules[0].action, Action::Deny);
    assert!(rules[0].policies[0].permissions.is_empty());
}

// ------------------------------------------------------------ refusals

fn typed_http(name: &str, url: &str) -> HttpFilter {
    HttpFilter {
        name: name.into(),
        config_type: Some(
            envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType::TypedConfig(Any {
                type_url: url.into(),
                value: vec![],
            }),
        ),
        ..Default::default()
    }
}

#[test]
fn refused_hcm_settings_name_the_field() {
    let p = params();
    let x = l7::transparent_proxy_http_upstream(&p);
    let ob = format!("outbound_listener:{}", p.outbound);
    let base = || x.listeners.iter().find(|l| l.name == ob).unwrap().clone();
    let at = "filter_chains[0].filters[0].typed_config";
    type Edit = Box<dyn Fn(&mut HttpConnectionManager)>;
    // (edit, field fragment, reason fragment, classify)
    let rows: Vec<(Edit, String, &str, &str)> = vec![
        (
            Box::new(|h| {
                h.http_filters.insert(
                    0,
                    typed_http(
                        "envoy.filters.http.ext_authz",
                        "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                    ),
                )
            }),
            format!("{at}.http_filters[0]"),
            "not enforced",
            "refused",
        ),
        (
            Box::new(|h| {
                h.http_filters.insert(
                    0,
                    typed_http("acme.fault", "type.googleapis.com/acme.Fault"),
                )
            }),
            format!("{at}.http_filters[0]"),
            "not supported",
            "refused",
        ),
        (
            Box::new(|h| {
                h.http_filters
                    .insert(0, l7::http_rbac(Some(Rbac::default())))
            }),
            format!("{at}.http_filters[0]"),
            "outbound",
            "refused",
        ),
        (
            Box::new(|h| h.http_filters.push(l7::router())),
            format!("{at}.http_filters[1]"),
            "after the router",
            "refused",
        ),
        (
            Box::new(|h| h.http_filters.clear()),
            format!("{at}.http_filters"),
            "router",
            "invalid",
        ),
        (
            Box::new(|h| {
                h.forward_client_cert_details =
                    http_connection_manager::ForwardClientCertDetails::ForwardOnly as i32
            }),
            format!("{at}.forward_client_cert_details"),
            "forge",
            "refused",
        ),
        (
            Box::new(|h| {
                h.route_specifier = Some(http_connection_manager::RouteSpecifier::Rds(
                    envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds {
                        config_source: None,
                        route_config_name: "db".into(),
                    },
                ))
            }),
            format!("{at}.rds.config_source"),
            "ADS",
            "refused",
        ),
        (
            Box::new(|h| {
                let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) =
                    &mut h.route_specifier
                else {
                    panic!()
                };
                rc.virtual_hosts[0].domains = vec!["google.example".into()];
            }),
            format!("{at}.route_config.virtual_hosts[0].domains"),
            "domains",
            "refused",
        ),
    ];
    for (edit, field, why, class) in rows {
        let mut l = base();
        edit_hcm(&mut l, 0, |h| edit(h));
        let (e, c) = err(decode_listener(&l));
        assert!(e.contains(&field), "{field}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert_eq!(c, class, "{e}");
    }
}

#[test]
fn refused_routes_name_the_field() {
    let p = params();
    let base = || l7::router_routes(&p);
    type Edit = Box<dyn Fn(&mut RouteConfiguration)>;
    let r0 = "virtual_hosts[0].routes[0]";
    let rows: Vec<(Edit, String, &str, &str)> = vec![
        (
            Box::new(|rc| {
                let v = rc.virtual_hosts[0].clone();
                rc.virtual_hosts.push(v);
            }),
            "virtual_hosts".into(),
            "exactly one virtual host",
            "refused",
        ),
        (
            Box::new(|rc| {
                rc.virtual_hosts[0].routes[0].action =
                    Some(route::Action::Redirect(Default::default()))
            }),
            format!("{r0}.redirect"),
            "redirect",
            "refused",
        ),
        (
            Box::new(|rc| {
                let Some(route::Action::Route(a)) = &mut rc.virtual_hosts[0].routes[0].action
                else {
                    panic!()
                };
                a.cluster_specifier = Some(route_action::ClusterSpecifier::ClusterHeader(
                    "x-cluster".into(),
                ));
            }),
            format!("{r0}.route.cluster_header"),
            "only cluster and weighted_clusters",
            "refused",
        ),
        (
            Box::new(|rc| {
                let Some(route::Action::Route(a)) = &mut rc.virtual_hosts[0].routes[0].action
                else {
                    panic!()
                };
                a.regex_rewrite = Some(Default::default());
            }),
            format!("{r0}.route.regex_rewrite"),
            "prefix_rewrite",
            "refused",
        ),
        (
            Box::new(|rc| {
                rc.virtual_hosts[0].routes[0]
                    .typed_per_filter_config
                    .insert("envoy.filters.http.rbac".into(), Any::default());
            }),
            format!("{r0}.typed_per_filter_config"),
            "RBAC",
            "refused",
        ),
        (
            Box::new(|rc| {
                rc.virtual_hosts[0].routes[2].r#match =
                    Some(envoy_types::pb::envoy::config::route::v3::RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
                            regex: "(unclosed".into(),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
            }),
            "virtual_hosts[0].routes[2].match.safe_regex.regex".into(),
            "regex",
            "invalid",
        ),
        (
            Box::new(|rc| {
                let Some(route::Action::Route(a)) = &mut rc.virtual_hosts[0].routes[20].action
                else {
                    panic!()
                };
                let Some(route_action::ClusterSpecifier::WeightedClusters(w)) =
                    &mut a.cluster_specifier
                else {
                    panic!()
                };
                for c in &mut w.clusters {
                    c.weight = None;
                }
            }),
            "virtual_hosts[0].routes[20].route.weighted_clusters.clusters".into(),
            "weight above 0",
            "invalid",
        ),
        (
            Box::new(|rc| {
                rc.virtual_hosts[0].routes[0]
                    .r#match
                    .as_mut()
                    .unwrap()
                    .case_sensitive = Some(Default::default());
            }),
            format!("{r0}.match.case_sensitive"),
            "case-insensitive",
            "refused",
        ),
    ];
    for (edit, field, why, class) in rows {
        let mut rc = base();
        edit(&mut rc);
        let (e, c) = err(decode_route(&rc));
        assert!(e.starts_with("route db: "), "{e}");
        assert!(e.contains(&field), "{field}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert_eq!(c, class, "{e}");
    }
    // The golden itself decodes.
    decode_route(&base()).unwrap();
}

#[test]
fn refused_public_hcm_shapes_and_http_rbac() {
    let p = params();
    let base = || l7::http_public_listener(&p);
    let at = "filter_chains[0].filters[0]";
    // Two routes on the public listener.
    let mut l = base();
    edit_hcm(&mut l, 0, |h| {
        let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = &mut h.route_specifier
        else {
            panic!()
        };
        let r = rc.virtual_hosts[0].routes[0].clone();
        rc.virtual_hosts[0].routes.push(r);
    });
    let (e, c) = err(decode_listener(&l));
    assert!(
        e.contains(&format!("{at}.typed_config.route_config")),
        "{e}"
    );
    assert!(e.contains("one catch-all route"), "{e}");
    assert_eq!(c, "refused");
    // RBAC permissions veer cannot enforce.
    let rows: Vec<(permission::Rule, &str)> = vec![
        (
            permission::Rule::DestinationPort(8080),
            "only any, url_path",
        ),
        (
            permission::Rule::RequestedServerName(Default::default()),
            "only any, url_path",
        ),
    ];
    for (rule, why) in rows {
        let mut r = kitchen_sink_perms_rbac();
        for pol in r.policies.values_mut() {
            pol.permissions = vec![Permission {
                rule: Some(rule.clone()),
            }];
        }
        let mut l = base();
        l7::set_public_http_rbac(&mut l, Some(r));
        let (e, c) = err(decode_listener(&l));
        assert!(
            e.contains(&format!(
                "{at}.typed_config.http_filters[0].typed_config.rules.policies[\"consul-intentions-layer7-0\"].permissions[0]"
            )),
            "{e}"
        );
        assert!(e.contains(why), "{e}");
        assert_eq!(c, "refused");
    }
    // A network filter after the HCM.
    let mut l = base();
    l.filter_chains[0]
        .filters
        .push(cx::tcp_proxy_filter("public_listener", "local_app"));
    let (e, _) = err(decode_listener(&l));
    assert!(
        e.contains("filter_chains[0].filters[1]") && e.contains("after"),
        "{e}"
    );
}

#[test]
fn route_to_a_non_eds_cluster_is_inconsistent() {
    let p = params();
    let mut x = l7::chain_and_router(&p);
    let mut rc = l7::router_routes(&p);
    rc.virtual_hosts[0]
        .routes
        .insert(0, l7::catch_all("local_app".into()));
    x.routes = vec![rc];
    let e = translate(&load(&x)).unwrap_err();
    assert_eq!(e.classify(), "inconsistent");
    assert!(
        e.to_string()
            .contains("route db: routes to cluster local_app"),
        "{e}"
    );
}

#[test]
fn hcm_filter_without_config_is_refused_with_its_name() {
    let p = params();
    let mut l = l7::http_public_listener(&p);
    l.filter_chains[0].filters[0] = Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: None,
    };
    let (e, c) = err(decode_listener(&l));
    assert!(e.contains("filter_chains[0].filters[0]"), "{e}");
    assert_eq!(c, "refused");
    let _ = HttpConnectionManager::type_url();
}

#[test]
fn vip_chain_and_explicit_listener_with_the_same_rds_share_one_upstream() {
    // Consul sends an HCM with RDS on the outbound chain of an upstream
    // whose discovery chain is not the default one
    // (agent/xds/testdata/listeners/transparent-proxy*.golden, v1.16.0);
    // here `db` is reachable both on a virtual IP and on its explicit
    // listener, by the same route configuration.
    let p = params();
    let mut x = l7::chain_and_router(&p);
    let vip: std::net::IpAddr = "10.0.0.9".parse().unwrap();
    let db_hcm = x.listeners[0].filter_chains[0].filters[0].clone();
    let mut ob = cx::transparent_proxy(&p)
        .listeners
        .into_iter()
        .find(|l| l.name.starts_with("outbound_listener:"))
        .unwrap();
    ob.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .prefix_ranges[0]
        .address_prefix = vip.to_string();
    ob.filter_chains[0]
        .filter_chain_match
        .as_mut()
        .unwrap()
        .prefix_ranges
        .truncate(1);
    ob.filter_chains[0].filters = vec![db_hcm];
    x.listeners.push(ob);
    x.clusters.push(cx::original_destination_cluster());
    let spec = spec_of(&x);
    let dbs: Vec<&UpstreamSpec> = spec
        .upstreams
        .iter()
        .filter(|u| u.identity.service == "db")
        .map(|u| &**u)
        .collect();
    assert_eq!(dbs.len(), 1, "{:?}", spec.upstreams);
    assert_eq!(dbs[0].virtual_ips, vec![vip]);
    assert_eq!(dbs[0].local_bind, Some(p.db_bind));
    assert_eq!(http(dbs[0]).routes.len(), 23);
    assert_eq!(wanted(&load(&x)).routes.len(), 1);
}
