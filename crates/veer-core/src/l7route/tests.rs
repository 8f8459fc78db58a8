use super::*;
use crate::l7::{ClusterSpec, HeaderMatch, QueryMatch, RetryPolicy, RouteSpec, WeightedCluster};
use crate::spiffe::ServiceId;
use std::time::Duration;

fn id(s: &str) -> ServiceId {
    ServiceId::new("td.consul", "default", "default", "dc1", s)
}

fn cluster(name: &str, protocol: Protocol) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        targets: vec![TargetSpec::new(id(name))],
        protocol,
    }
}

fn route(name: &str, m: RequestMatch, action: RouteAction) -> RouteSpec {
    RouteSpec {
        name: name.into(),
        matches: m,
        action,
    }
}

fn compile(spec: HttpRoutes) -> Result<HttpTable, L7Error> {
    HttpTable::compile(spec, |t| {
        Ok(Upstream::new(t.identity, Duration::from_secs(5)))
    })
}

fn header(name: &str, kind: HeaderMatchKind, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: name.into(),
        kind,
        invert,
    }
}

/// A table of a router as Consul's chain-samples use it: admin paths to
/// v2, a header to canary, a query to v1, a regex path, then the catch-all.
fn table() -> HttpTable {
    let m = |path: PathMatch| RequestMatch {
        path,
        ..Default::default()
    };
    compile(HttpRoutes {
        clusters: vec![
            cluster("v1", Protocol::Http),
            cluster("v2", Protocol::Http),
            cluster("canary", Protocol::Http2),
        ],
        routes: vec![
            route(
                "exact",
                m(PathMatch::Exact("/admin".into())),
                RouteAction::to_cluster(1),
            ),
            route(
                "prefix",
                m(PathMatch::Prefix("/admin/".into())),
                RouteAction::to_cluster(1),
            ),
            route(
                "header",
                RequestMatch {
                    headers: vec![header(
                        "X-Canary",
                        HeaderMatchKind::Exact("yes".into()),
                        false,
                    )],
                    ..Default::default()
                },
                RouteAction::to_cluster(2),
            ),
            route(
                "query",
                RequestMatch {
                    query: vec![QueryMatch {
                        name: "v".into(),
                        kind: QueryMatchKind::Regex("[0-9]+".into()),
                    }],
                    ..Default::default()
                },
                RouteAction::to_cluster(0),
            ),
            route(
                "regex",
                RequestMatch {
                    path: PathMatch::Regex("/items/[a-z]+".into()),
                    methods: vec!["put".into(), "POST".into()],
                    ..Default::default()
                },
                RouteAction::to_cluster(1),
            ),
            route(
                "default",
                RequestMatch::default(),
                RouteAction::to_cluster(0),
            ),
        ],
    })
    .expect("compiles")
}

#[test]
fn first_matching_route_decides() {
    let t = table();
    let cases: &[(PlainRequest, &str)] = &[
        (PlainRequest::new("GET", "/admin"), "exact"),
        (PlainRequest::new("GET", "/admin?x=1"), "exact"),
        (PlainRequest::new("GET", "/admin/users"), "prefix"),
        // A prefix is not a path segment: "/adminx" matches neither.
        (PlainRequest::new("GET", "/adminx"), "default"),
        // Case-sensitive, as Envoy.
        (PlainRequest::new("GET", "/ADMIN"), "default"),
        (
            PlainRequest::new("GET", "/x").header("x-canary", "yes"),
            "header",
        ),
        (
            PlainRequest::new("GET", "/x").header("X-Canary", "no"),
            "default",
        ),
        // The exact route comes first, whatever the header.
        (
            PlainRequest::new("GET", "/admin").header("x-canary", "yes"),
            "exact",
        ),
        (PlainRequest::new("GET", "/x?v=12"), "query"),
        (PlainRequest::new("GET", "/x?a=1&v=12"), "query"),
        (PlainRequest::new("GET", "/x?v=12a"), "default"),
        (PlainRequest::new("GET", "/x?vv=12"), "default"),
        (PlainRequest::new("PUT", "/items/abc"), "regex"),
        (PlainRequest::new("POST", "/items/abc"), "regex"),
        (PlainRequest::new("GET", "/items/abc"), "default"),
        // The regex must match the whole path.
        (PlainRequest::new("PUT", "/items/abc/d"), "default"),
        (PlainRequest::new("PUT", "/x/items/abc"), "default"),
        // The query string is not part of the path.
        (PlainRequest::new("PUT", "/items/abc?q=1"), "regex"),
    ];
    for (req, want) in cases {
        let got = t.route(req).map(|r| r.name.as_str());
        assert_eq!(got, Some(*want), "{} {}", req.method, req.uri);
    }
}

#[test]
fn no_route_when_nothing_matches() {
    let t = compile(HttpRoutes {
        clusters: vec![cluster("v1", Protocol::Http)],
        routes: vec![route(
            "only",
            RequestMatch {
                path: PathMatch::Prefix("/api".into()),
                ..Default::default()
            },
            RouteAction::to_cluster(0),
        )],
    })
    .unwrap();
    assert!(t.route(&PlainRequest::new("GET", "/other")).is_none());
    assert!(t.route(&PlainRequest::new("GET", "/api/x")).is_some());
    // No routes at all: every request is unrouted.
    let empty = compile(HttpRoutes {
        clusters: vec![cluster("v1", Protocol::Http)],
        routes: vec![],
    })
    .unwrap();
    assert!(empty.route(&PlainRequest::new("GET", "/")).is_none());
}

#[test]
fn header_kinds_inversion_and_repeats() {
    let one = |h: HeaderMatch| {
        compile(HttpRoutes {
            clusters: vec![cluster("v1", Protocol::Http)],
            routes: vec![route(
                "r",
                RequestMatch {
                    headers: vec![h],
                    ..Default::default()
                },
                RouteAction::to_cluster(0),
            )],
        })
        .unwrap()
    };
    let req = |v: Option<&[&str]>| {
        let mut r = PlainRequest::new("GET", "/");
        for v in v.unwrap_or(&[]) {
            r = r.header("x-h", v);
        }
        r
    };
    type Case<'a> = (HeaderMatchKind, bool, Option<&'a [&'a str]>, bool);
    let cases: Vec<Case> = vec![
        (HeaderMatchKind::Present, false, Some(&["a"]), true),
        (HeaderMatchKind::Present, false, None, false),
        (HeaderMatchKind::Present, true, None, true),
        (HeaderMatchKind::Present, true, Some(&["a"]), false),
        (
            HeaderMatchKind::Exact("a".into()),
            false,
            Some(&["a"]),
            true,
        ),
        (
            HeaderMatchKind::Exact("a".into()),
            false,
            Some(&["ab"]),
            false,
        ),
        // Repeated values are joined with ",".
        (
            HeaderMatchKind::Exact("a,b".into()),
            false,
            Some(&["a", "b"]),
            true,
        ),
        (
            HeaderMatchKind::Prefix("ab".into()),
            false,
            Some(&["abc"]),
            true,
        ),
        (
            HeaderMatchKind::Prefix("ab".into()),
            false,
            Some(&["xabc"]),
            false,
        ),
        (
            HeaderMatchKind::Suffix("bc".into()),
            false,
            Some(&["abc"]),
            true,
        ),
        (
            HeaderMatchKind::Suffix("bc".into()),
            false,
            Some(&["bcd"]),
            false,
        ),
        (
            HeaderMatchKind::Regex("v[0-9]".into()),
            false,
            Some(&["v1"]),
            true,
        ),
        (
            HeaderMatchKind::Regex("v[0-9]".into()),
            false,
            Some(&["v12"]),
            false,
        ),
        (
            HeaderMatchKind::Regex("v[0-9]".into()),
            true,
            Some(&["v12"]),
            true,
        ),
        // An absent header: the condition holds exactly when inverted (Envoy).
        (HeaderMatchKind::Exact("a".into()), true, None, true),
    ];
    for (kind, invert, values, want) in cases {
        let t = one(header("x-h", kind.clone(), invert));
        assert_eq!(
            t.route(&req(values)).is_some(),
            want,
            "{kind:?} invert={invert} values={values:?}"
        );
    }
}

#[test]
fn pseudo_header_method() {
    let t = compile(HttpRoutes {
        clusters: vec![cluster("v1", Protocol::Grpc)],
        routes: vec![route(
            "m",
            RequestMatch {
                headers: vec![header(
                    ":method",
                    HeaderMatchKind::Regex("GET|HEAD".into()),
                    false,
                )],
                ..Default::default()
            },
            RouteAction::to_cluster(0),
        )],
    })
    .unwrap();
    assert!(t.route(&PlainRequest::new("HEAD", "/")).is_some());
    assert!(t.route(&PlainRequest::new("POST", "/")).is_none());
}

#[test]
fn weighted_pick_follows_weights() {
    let t = compile(HttpRoutes {
        clusters: vec![
            cluster("a", Protocol::Http),
            cluster("b", Protocol::Http),
            cluster("c", Protocol::Http),
        ],
        routes: vec![route(
            "split",
            RequestMatch::default(),
            RouteAction {
                clusters: vec![
                    WeightedCluster {
                        cluster: 0,
                        weight: 9000,
                    },
                    WeightedCluster {
                        cluster: 2,
                        weight: 0,
                    },
                    WeightedCluster {
                        cluster: 1,
                        weight: 1000,
                    },
                ],
                prefix_rewrite: None,
                timeout: None,
                retry: None,
            },
        )],
    })
    .unwrap();
    let r = &t.routes[0];
    // Units 0..9000 are a's, 9000..10000 b's; c (weight 0) gets none.
    assert_eq!(r.pick(0), 0);
    assert_eq!(r.pick(8999), 0);
    assert_eq!(r.pick(9000), 1);
    assert_eq!(r.pick(9999), 1);
    assert_eq!(r.pick(10_000), 0);
    let mut n = [0u32; 3];
    for k in 0..100_000u64 {
        n[r.pick(mix64(k))] += 1;
    }
    assert_eq!(n[2], 0);
    assert!((89_000..91_000).contains(&n[0]), "{n:?}");
    assert!((9_000..11_000).contains(&n[1]), "{n:?}");
}

#[test]
fn prefix_rewrite() {
    let rw = |path: PathMatch, to: &str, uri: &str| {
        let mut action = RouteAction::to_cluster(0);
        action.prefix_rewrite = Some(to.into());
        let t = compile(HttpRoutes {
            clusters: vec![cluster("v1", Protocol::Http)],
            routes: vec![route(
                "r",
                RequestMatch {
                    path,
                    ..Default::default()
                },
                action,
            )],
        })
        .unwrap();
        t.routes[0].rewrite(uri)
    };
    let p = |s: &str| PathMatch::Prefix(s.into());
    assert_eq!(rw(p("/api/"), "/", "/api/users"), Some("/users".into()));
    assert_eq!(
        rw(p("/api"), "/v2", "/api/users?a=1"),
        Some("/v2/users?a=1".into())
    );
    assert_eq!(rw(p("/api"), "", "/api"), Some("/".into()));
    assert_eq!(
        rw(PathMatch::Exact("/old".into()), "/new", "/old?x"),
        Some("/new?x".into())
    );
    assert_eq!(
        rw(PathMatch::Any, "/base/", "/x/y"),
        Some("/base/x/y".into())
    );
    // No rewrite configured: the request's own path.
    let t = table();
    assert_eq!(t.routes[0].rewrite("/admin"), None);
}

#[test]
fn bad_routes_are_refused_naming_the_route() {
    let ok_clusters = || vec![cluster("v1", Protocol::Http)];
    let one = |r: RouteSpec| {
        compile(HttpRoutes {
            clusters: ok_clusters(),
            routes: vec![r],
        })
        .unwrap_err()
    };
    let e = one(route(
        "bad-path",
        RequestMatch {
            path: PathMatch::Regex("/a(".into()),
            ..Default::default()
        },
        RouteAction::to_cluster(0),
    ));
    assert_eq!(e.classify(), "regex");
    assert!(e.to_string().contains("\"bad-path\""), "{e}");
    assert!(e.to_string().contains("path regex \"/a(\""), "{e}");

    let e = one(route(
        "bad-header",
        RequestMatch {
            headers: vec![header("x", HeaderMatchKind::Regex("[".into()), false)],
            ..Default::default()
        },
        RouteAction::to_cluster(0),
    ));
    assert!(e.to_string().contains("header x regex"), "{e}");

    let e = one(route(
        "bad-query",
        RequestMatch {
            query: vec![QueryMatch {
                name: "q".into(),
                kind: QueryMatchKind::Regex("(".into()),
            }],
            ..Default::default()
        },
        RouteAction::to_cluster(0),
    ));
    assert!(e.to_string().contains("query parameter q regex"), "{e}");

    let e = one(route(
        "far",
        RequestMatch::default(),
        RouteAction::to_cluster(3),
    ));
    assert_eq!(
        e,
        L7Error::NoSuchCluster {
            route: "far".into(),
            index: 3,
            count: 1
        }
    );

    let mut zero = RouteAction::to_cluster(0);
    zero.clusters[0].weight = 0;
    assert_eq!(
        one(route("zero", RequestMatch::default(), zero)),
        L7Error::NoWeight("zero".into())
    );
    let mut none = RouteAction::to_cluster(0);
    none.clusters.clear();
    assert_eq!(
        one(route("none", RequestMatch::default(), none)).classify(),
        "no_weight"
    );

    let mut rw = RouteAction::to_cluster(0);
    rw.prefix_rewrite = Some("/".into());
    let e = one(route(
        "rw",
        RequestMatch {
            path: PathMatch::Regex("/a".into()),
            ..Default::default()
        },
        rw,
    ));
    assert_eq!(e, L7Error::RewriteWithRegex("rw".into()));
}

#[test]
fn bad_clusters_are_refused() {
    let no_target = ClusterSpec {
        name: "empty".into(),
        targets: vec![],
        protocol: Protocol::Http,
    };
    let e = compile(HttpRoutes {
        clusters: vec![no_target],
        routes: vec![],
    })
    .unwrap_err();
    assert_eq!(e, L7Error::NoTarget("empty".into()));
    let e = compile(HttpRoutes {
        clusters: vec![cluster("a", Protocol::Http), cluster("a", Protocol::Http2)],
        routes: vec![],
    })
    .unwrap_err();
    assert_eq!(e, L7Error::DuplicateCluster("a".into()));
    let e = compile(HttpRoutes {
        clusters: vec![cluster("t", Protocol::Tcp)],
        routes: vec![],
    })
    .unwrap_err();
    assert_eq!(e.classify(), "tcp_cluster");
    // The target builder's error names the cluster.
    let e = HttpTable::compile(
        HttpRoutes {
            clusters: vec![cluster("x", Protocol::Http)],
            routes: vec![],
        },
        |_| Err("SNI \"bad sni\": invalid".to_string()),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cluster \"x\": SNI"), "{e}");
}

#[test]
fn clusters_keep_their_targets_and_protocol() {
    let mut c = cluster("api", Protocol::Grpc);
    c.targets.push(TargetSpec::new(ServiceId::new(
        "td.consul",
        "default",
        "default",
        "dc2",
        "api",
    )));
    let mut action = RouteAction::to_cluster(0);
    action.retry = Some(RetryPolicy {
        num_retries: 2,
        on_connect_failure: true,
        on_reset: false,
        on_status_codes: vec![503],
    });
    let t = compile(HttpRoutes {
        clusters: vec![c],
        routes: vec![route("r", RequestMatch::default(), action)],
    })
    .unwrap();
    let c = &t.clusters[0];
    assert!(c.is_h2());
    assert_eq!(c.target.protocol, Protocol::Grpc);
    assert_eq!(c.target.failover.len(), 1);
    assert_eq!(c.target.failover[0].identity.datacenter, "dc2");
    assert_eq!(t.routes[0].action.retry.as_ref().unwrap().num_retries, 2);
}
