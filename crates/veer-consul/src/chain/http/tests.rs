//! HTTP chain compiler tests on real Consul 1.8.7 chains (the fixtures of
//! `tests/fixtures/chain/`, copied from the reference `chain-samples/`).
use super::super::compile as compile_chain;
use super::*;

const TD: &str = "f08cada1-f2ba-9feb-c2ae-6858ba45a30f.consul";

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chain")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn http_of(file: &str) -> ChainHttp {
    let c = compile_chain(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(c.unapplied.is_empty(), "{file}: {:?}", c.unapplied);
    c.http.unwrap_or_else(|| panic!("{file}: no http"))
}

fn edit(file: &str, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&fixture(file)).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

fn cluster_names(h: &ChainHttp) -> Vec<String> {
    h.clusters
        .iter()
        .map(|c| {
            c.name
                .trim_end_matches(&format!(".internal.{TD}"))
                .to_string()
        })
        .collect()
}

fn header(name: &str, kind: HeaderMatchKind, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: name.into(),
        kind,
        invert,
    }
}

/// Sample 05: router (4 routes + Consul's catch-all) → splitter 90/10 →
/// subsets v1/v2 and the service `legacy`; every match kind and action.
#[test]
fn router_splitter_resolver_compiles_route_by_route() {
    let h = http_of("05-router-splitter-resolver.json");
    // Clusters in the order routes first name them: v2 (route 0), v1
    // (route 1), legacy (route 3); the splitter reuses v1 and v2.
    assert_eq!(
        cluster_names(&h),
        [
            "v2.api.default.dc1",
            "v1.api.default.dc1",
            "legacy.default.dc1"
        ]
    );
    let (v2, v1, legacy) = (0, 1, 2);
    assert_eq!(h.clusters[v2].connect_timeout, Duration::from_secs(3));
    assert_eq!(h.clusters[legacy].connect_timeout, Duration::from_secs(5));
    assert_eq!(
        h.clusters[v2].targets[0].filter.as_deref(),
        Some("Service.Meta.version == v2")
    );
    assert!(h.clusters[v2].targets[0].only_passing);
    let names: Vec<&str> = h.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "router:api.default/0",
            "router:api.default/1",
            "router:api.default/2",
            "router:api.default/3",
            "router:api.default/4"
        ]
    );
    let want = vec![
        RouteSpec {
            name: "router:api.default/0".into(),
            matches: RequestMatch {
                path: PathMatch::Prefix("/v2/".into()),
                ..Default::default()
            },
            action: RouteAction {
                clusters: vec![WeightedCluster {
                    cluster: v2,
                    weight: 1,
                }],
                prefix_rewrite: Some("/".into()),
                timeout: Some(Duration::from_secs(2)),
                retry: Some(RetryPolicy {
                    num_retries: 3,
                    on_connect_failure: true,
                    on_reset: false,
                    on_status_codes: vec![503, 502],
                }),
            },
        },
        RouteSpec {
            name: "router:api.default/1".into(),
            matches: RequestMatch {
                path: PathMatch::Exact("/health".into()),
                methods: vec!["GET".into(), "HEAD".into()],
                ..Default::default()
            },
            action: RouteAction::to_cluster(v1),
        },
        RouteSpec {
            name: "router:api.default/2".into(),
            matches: RequestMatch {
                path: PathMatch::Regex("/users/[0-9]+".into()),
                headers: vec![
                    header("x-canary", HeaderMatchKind::Exact("1".into()), false),
                    header("x-debug", HeaderMatchKind::Present, false),
                    header(
                        "user-agent",
                        HeaderMatchKind::Regex(".*curl.*".into()),
                        true,
                    ),
                ],
                query: vec![
                    QueryMatch {
                        name: "beta".into(),
                        kind: QueryMatchKind::Exact("true".into()),
                    },
                    QueryMatch {
                        name: "trace".into(),
                        kind: QueryMatchKind::Present,
                    },
                ],
                methods: vec![],
            },
            action: RouteAction::to_cluster(v2),
        },
        RouteSpec {
            name: "router:api.default/3".into(),
            matches: RequestMatch {
                path: PathMatch::Prefix("/legacy/".into()),
                ..Default::default()
            },
            action: RouteAction::to_cluster(legacy),
        },
        // Consul's catch-all → the splitter, weights ×100.
        RouteSpec {
            name: "router:api.default/4".into(),
            matches: RequestMatch::default(),
            action: RouteAction {
                clusters: vec![
                    WeightedCluster {
                        cluster: v1,
                        weight: 9000,
                    },
                    WeightedCluster {
                        cluster: v2,
                        weight: 1000,
                    },
                ],
                ..RouteAction::to_cluster(0)
            },
        },
    ];
    assert_eq!(h.routes, want);
}

#[test]
fn chains_without_a_router_get_one_catch_all_route() {
    // A splitter at the start: one route, weighted.
    let h = http_of("04-splitter-90-10.json");
    assert_eq!(
        cluster_names(&h),
        ["v1.api.default.dc1", "v2.api.default.dc1"]
    );
    assert_eq!(h.routes.len(), 1);
    assert_eq!(h.routes[0].name, "splitter:api.default");
    assert_eq!(h.routes[0].matches, RequestMatch::default());
    let w: Vec<(usize, u32)> = h.routes[0]
        .action
        .clusters
        .iter()
        .map(|c| (c.cluster, c.weight))
        .collect();
    assert_eq!(w, [(0, 9000), (1, 1000)]);
    // An http chain with no routing: one route to the one resolver, with
    // Envoy's defaults (15 s timeout, no retries).
    let h = http_of("02-http-no-routing.json");
    assert_eq!(cluster_names(&h), ["api.default.dc1"]);
    assert_eq!(h.routes.len(), 1);
    assert_eq!(h.routes[0].action, RouteAction::to_cluster(0));
    // OverrideProtocol tcp: no routes, the chain is L4.
    let c = compile_chain(&fixture("08a-post-override-protocol-tcp.json")).unwrap();
    assert_eq!(c.http, None);
}

#[test]
fn clusters_keep_failover_and_other_datacenters() {
    // 07: v1 fails over to dc2; v2 to v1 in dc1; /legacy/ goes to dc2.
    let h = http_of("07-failover.json");
    let by_name = |n: &str| {
        h.clusters
            .iter()
            .find(|c| c.name == format!("{n}.internal.{TD}"))
            .unwrap_or_else(|| panic!("{n}: {:?}", cluster_names(&h)))
    };
    let ids = |c: &ChainCluster| c.targets.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(by_name("v1.api.default.dc1")),
        ["v1.api.default.dc1", "v1.api.default.dc2"]
    );
    assert_eq!(
        ids(by_name("v2.api.default.dc1")),
        ["v2.api.default.dc1", "v1.api.default.dc1"]
    );
    let legacy = by_name("legacy.default.dc2");
    assert_eq!(legacy.targets[0].datacenter, "dc2");
    // Every target of every cluster is watched (all_targets).
    let c = compile_chain(&fixture("07-failover.json")).unwrap();
    let mut all: Vec<&str> = c.all_targets().map(|t| t.id.as_str()).collect();
    all.sort();
    all.dedup();
    assert_eq!(
        all,
        [
            "legacy.default.dc2",
            "v1.api.default.dc1",
            "v1.api.default.dc2",
            "v2.api.default.dc1"
        ]
    );
}

#[test]
fn external_sni_keeps_consuls_internal_cluster_name() {
    let body = edit("11-external-sni.json", |v| {
        v["Chain"]["Protocol"] = "http".into();
    });
    let c = compile_chain(&body).unwrap();
    let h = c.http.unwrap();
    assert_eq!(h.clusters[0].targets[0].sni, "ext.example.com");
    assert!(
        h.clusters[0].name.starts_with("ext.default.dc1.internal."),
        "{}",
        h.clusters[0].name
    );
}

fn route0(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    edit("05-router-splitter-resolver.json", |v| {
        f(&mut v["Chain"]["Nodes"]["router:api.default"]["Routes"][0]["Definition"])
    })
}

#[test]
fn retry_and_timeout_quirks() {
    let action = |body: Vec<u8>| {
        compile_chain(&body).unwrap().http.unwrap().routes[0]
            .action
            .clone()
    };
    // NumRetries 0 with status codes: Envoy's default of one retry.
    let a = action(route0(|d| {
        d["Destination"] = serde_json::json!({"ServiceSubset": "v2", "RetryOnStatusCodes": [503]});
    }));
    assert_eq!(
        a.retry,
        Some(RetryPolicy {
            num_retries: 1,
            on_connect_failure: false,
            on_reset: false,
            on_status_codes: vec![503]
        })
    );
    assert_eq!(a.timeout, None);
    assert_eq!(a.prefix_rewrite, None);
    // No retry feature: no policy. RequestTimeout 0 = Envoy's default;
    // nanoseconds are read too.
    let a = action(route0(|d| {
        d["Destination"] = serde_json::json!({"RequestTimeout": "0s"});
    }));
    assert_eq!((a.retry, a.timeout), (None, None));
    let a = action(route0(|d| {
        d["Destination"] = serde_json::json!({"RequestTimeout": 1_500_000_000u64, "NumRetries": 2});
    }));
    assert_eq!(a.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(a.retry.unwrap().num_retries, 2);
    // A condition with no kind is skipped, as Consul does.
    let body = route0(|d| {
        d["Match"]["HTTP"]["Header"] =
            serde_json::json!([{"Name": "x-a"}, {"Name": "X-B", "Suffix": "z"}]);
    });
    let h = compile_chain(&body).unwrap().http.unwrap();
    assert_eq!(
        h.routes[0].matches.headers,
        [header("x-b", HeaderMatchKind::Suffix("z".into()), false)]
    );
}

/// What Consul 1.8.7 stores without checking (l7-chain.md §1) is refused
/// with the node, the route and the field.
#[test]
fn what_consul_stores_unchecked_is_refused_by_route_and_field() {
    use serde_json::json;
    let rows: Vec<(Vec<u8>, &str)> = vec![
        (
            route0(|d| d["Match"]["HTTP"] = json!({"PathRegex": "(("})),
            "router:api.default Routes[0]: Match.HTTP.PathRegex: regex \"((\" does not compile",
        ),
        (
            route0(|d| d["Match"]["HTTP"]["Header"] = json!([{"Name": "x", "Regex": "[z-a]"}])),
            "Routes[0]: Match.HTTP.Header[0].Regex: regex \"[z-a]\"",
        ),
        (
            route0(|d| {
                d["Match"]["HTTP"]["QueryParam"] = json!([{"Name": "q", "Regex": "a{2,1}"}])
            }),
            "Routes[0]: Match.HTTP.QueryParam[0].Regex",
        ),
        (
            route0(|d| {
                d["Match"]["HTTP"]["Header"] = json!([{"Name": "bad name", "Present": true}])
            }),
            "Match.HTTP.Header[0].Name \"bad name\" is not a header name",
        ),
        (
            route0(|d| d["Match"]["HTTP"]["Methods"] = json!(["GET", "G T"])),
            "Match.HTTP.Methods[1] \"G T\" is not an HTTP method",
        ),
        (
            route0(|d| d["Destination"]["NumRetries"] = json!(4294967295u64)),
            "Destination.NumRetries 4294967295 is out of range",
        ),
        (
            route0(|d| d["Destination"]["RequestTimeout"] = json!("-1s")),
            "Destination.RequestTimeout \"-1s\" is negative",
        ),
        (
            route0(|d| d["Destination"]["RequestTimeout"] = json!("soon")),
            "Destination.RequestTimeout: bad duration",
        ),
        (
            route0(|d| d["Destination"]["RetryOnStatusCodes"] = json!([503, 700])),
            "Destination.RetryOnStatusCodes[1] 700 is not an HTTP status code",
        ),
        (
            edit("05-router-splitter-resolver.json", |v| {
                let s = &mut v["Chain"]["Nodes"]["splitter:api.default"]["Splits"];
                s[0]["Weight"] = json!(0);
                s[1]["Weight"] = json!(0);
            }),
            "splitter:api.default: every split has weight 0",
        ),
        (
            edit("05-router-splitter-resolver.json", |v| {
                v["Chain"]["Nodes"]["router:api.default"]["Routes"][1]["NextNode"] =
                    json!("resolver:nope");
            }),
            "Routes[1]: node \"resolver:nope\" is named but not in Nodes",
        ),
        (
            route0(|d| d["Match"]["HTTP"] = json!({"PathRegex": "/a.*"})),
            "PrefixRewrite needs Match.HTTP.PathExact or PathPrefix",
        ),
    ];
    for (body, want) in rows {
        let e = compile_chain(&body).unwrap_err();
        assert!(e.to_string().contains(want), "{e}\n(want {want})");
        assert!(e.to_string().contains("discovery chain api"), "{e}");
        assert_eq!(e.classify(), "decode");
    }
}

#[test]
fn split_weights_round_where_consul_truncates() {
    let body = edit("04-splitter-90-10.json", |v| {
        let s = &mut v["Chain"]["Nodes"]["splitter:api.default"]["Splits"];
        s[0]["Weight"] = serde_json::json!(66.67);
        s[1]["Weight"] = serde_json::json!(33.33);
    });
    let h = compile_chain(&body).unwrap().http.unwrap();
    let w: Vec<u32> = h.routes[0]
        .action
        .clusters
        .iter()
        .map(|c| c.weight)
        .collect();
    assert_eq!(w, [6667, 3333]);
    assert_eq!(w.iter().sum::<u32>(), 10_000);
}
