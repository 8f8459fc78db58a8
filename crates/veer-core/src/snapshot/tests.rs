use super::*;
use crate::authz::{Peer, RbacPolicy};
use crate::tls::{parse_certs, parse_key};
use veer_ca::Ca;

const TD: &str = "td.consul";

fn id(svc: &str) -> ServiceId {
    ServiceId::new(TD, "default", "default", "dc1", svc)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn spec(ca: &Ca) -> Spec {
    let leaf = ca.service_leaf("dc1", "web").unwrap();
    Spec {
        identity: id("web"),
        roots: parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap(),
        chain: parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap(),
        key: parse_key(leaf.key_pem.as_bytes(), "key").unwrap(),
        local_app: sa("127.0.0.1:8080"),
        intentions: vec![],
        default_action: Action::Allow,
        upstreams: vec![],
        mesh_destinations_only: false,
        listen: ListenSpec {
            inbound: sa("0.0.0.0:20000"),
            outbound: vec![sa("127.0.0.1:15001")],
        },
        timeouts: Timeouts::default(),
        source: "test".into(),
        expose: vec![],
        rbac: None,
        permissive_ports: vec![],
        inbound_max_connections: None,
        unapplied: Vec::new(),
    }
}

fn up(svc: &str, vip: &str) -> UpstreamSpec {
    let mut u = UpstreamSpec::new(id(svc));
    u.virtual_ips = vec![vip.parse().unwrap()];
    u.endpoints = vec![sa("10.0.0.2:20000"), sa("10.0.0.3:20000")];
    u
}

#[test]
fn defaults_keep_todays_behaviour() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    s.upstreams = vec![up("api", "10.96.0.20")];
    let snap = Snapshot::build(s, 1).unwrap();
    let u = &snap.routes.upstreams()[0];
    assert_eq!(u.sni, id("api").sni());
    assert_eq!(u.san_matchers.len(), 1);
    assert!(u.san_matchers[0].matches(&id("api").to_string()));
    assert!(!u.san_matchers[0].matches(&id("api2").to_string()));
    assert!(u.tls.is_some());
    // Made on first use: memory follows the upstreams in use.
    assert!(snap.tls.upstream_configs.is_empty());
    let c = u.tls.as_ref().unwrap().get();
    assert_eq!(snap.tls.upstream_configs.len(), 1);
    assert!(Arc::ptr_eq(&c, &u.tls.as_ref().unwrap().get()));
    assert_eq!(
        u.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
        [1, 1]
    );
    assert!(snap.authz.uses_intentions());
    assert_eq!(
        snap.inbound_max_connections,
        Timeouts::default().max_connections
    );
    assert!(snap.permissive_ports.is_empty());
    assert!(snap.dump()["rbac"].is_null());
}

#[test]
fn xds_fields_reach_the_snapshot_and_the_dump() {
    let ca = Ca::new_root(TD).unwrap();
    let peer_ca = Ca::new_root("peer.consul").unwrap();
    let mut s = spec(&ca);
    let mut a = up("api", "10.96.0.20");
    a.sni = Some("api.default.dc1.internal.td.consul".into());
    a.san_matchers = vec![StringMatch::prefix("spiffe://td.consul/ns/default/")];
    a.roots = Some(parse_certs(peer_ca.cert_pem.as_bytes(), "peer").unwrap());
    a.destination_port = Some(8080);
    a.max_connections = Some(7);
    a.endpoint_weights = vec![3, 1];
    s.upstreams = vec![a];
    s.permissive_ports = vec![8080];
    s.inbound_max_connections = Some(12);
    s.rbac = Some(vec![RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            name: "consul-intentions-layer4".into(),
            principals: vec![Principal::spiffe_regex(
                "^spiffe://td.consul/ns/default/dc/[^/]+/svc/web$",
            )],
        }],
    }]);
    let snap = Snapshot::build(s, 1).unwrap();
    let u = &snap.routes.upstreams()[0];
    assert_eq!(u.sni, "api.default.dc1.internal.td.consul");
    assert!(u.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/x/svc/y"));
    assert_eq!(u.destination_port, Some(8080));
    assert_eq!(u.max_connections, Some(7));
    assert_eq!(
        u.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
        [3, 1]
    );
    assert_eq!(snap.inbound_max_connections, 12);
    assert!(!snap.authz.uses_intentions());
    assert!(snap.authz.evaluate(&Peer::from_id(id("web"))).allowed());
    assert!(!snap.authz.evaluate(&Peer::from_id(id("db"))).allowed());

    let d = snap.dump();
    let du = &d["upstreams"][0];
    assert_eq!(du["endpoint_weights"], serde_json::json!([3, 1]));
    assert_eq!(du["destination_port"], 8080);
    assert_eq!(du["max_connections"], 7);
    assert_eq!(du["sni"], "api.default.dc1.internal.td.consul");
    assert_eq!(
        du["san_matchers"][0],
        "prefix \"spiffe://td.consul/ns/default/\""
    );
    assert_eq!(du["roots"][0]["is_ca"], true);
    assert_eq!(d["permissive_ports"], serde_json::json!([8080]));
    assert_eq!(d["limits"]["inbound_max_connections"], 12);
    assert_eq!(d["rbac"][0]["action"], "allow");
    assert_eq!(
        d["rbac"][0]["policies"][0]["name"],
        "consul-intentions-layer4"
    );
    let text = d.to_string();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
}

#[test]
fn bad_upstream_fields_and_rbac_are_refused_with_names() {
    let ca = Ca::new_root(TD).unwrap();
    // (change, expected label, text in the message)
    type Change = Box<dyn Fn(&mut Spec)>;
    let cases: Vec<(Change, &str, &str)> = vec![
        (
            Box::new(|s| s.upstreams[0].endpoint_weights = vec![1]),
            "upstream",
            "1 endpoint weights for 2 endpoints",
        ),
        (
            Box::new(|s| s.upstreams[0].endpoint_weights = vec![1, 0]),
            "upstream",
            "weight 0",
        ),
        (
            Box::new(|s| s.upstreams[0].san_matchers = vec![StringMatch::regex("(")]),
            "upstream",
            "upstream api: SAN matcher",
        ),
        (
            Box::new(|s| s.upstreams[0].roots = Some(vec![])),
            "upstream",
            "empty roots",
        ),
        (
            Box::new(|s| s.upstreams[0].sni = Some("not a name!".into())),
            "upstream",
            "SNI",
        ),
        (
            Box::new(|s| {
                s.rbac = Some(vec![RbacRules {
                    action: Action::Deny,
                    policies: vec![RbacPolicy {
                        name: "bad".into(),
                        principals: vec![Principal::spiffe_regex("[")],
                    }],
                }])
            }),
            "rbac",
            "\"bad\"",
        ),
        (
            Box::new(|s| s.upstreams.push(up("db", "10.96.0.20"))),
            "duplicate_vip",
            "10.96.0.20 is claimed by both api and db",
        ),
        (
            Box::new(|s| {
                s.upstreams[0].destination_port = Some(80);
                let mut db = up("db", "10.96.0.20");
                db.destination_port = Some(80);
                s.upstreams.push(db);
            }),
            "duplicate_vip",
            "10.96.0.20 port 80 is claimed",
        ),
        (
            Box::new(|s| {
                let vip = s.upstreams[0].virtual_ips[0];
                s.upstreams[0].virtual_ips.push(vip);
            }),
            "duplicate_vip",
            "10.96.0.20 is claimed by both api and api",
        ),
    ];
    for (i, (change, label, text)) in cases.into_iter().enumerate() {
        let mut s = spec(&ca);
        s.upstreams = vec![up("api", "10.96.0.20")];
        change(&mut s);
        let e = Snapshot::build(s, 1).unwrap_err();
        assert_eq!(e.classify(), label, "case {i}: {e}");
        assert!(e.to_string().contains(text), "case {i}: {e}");
    }
    // One VIP on two ports, and on any other port, is three destinations.
    let mut s = spec(&ca);
    let mut a = up("api", "10.96.0.20");
    a.destination_port = Some(80);
    let mut b = up("admin", "10.96.0.20");
    b.destination_port = Some(9090);
    s.upstreams = vec![a, b, up("any", "10.96.0.20")];
    Snapshot::build(s, 1).unwrap();
}

#[test]
fn upstream_tls_configs_are_shared_and_kept_across_snapshots() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    s.upstreams = vec![up("api", "10.96.0.20"), up("db", "10.96.0.30")];
    let first = Snapshot::build(s.clone(), 1).unwrap();
    let cfg = |snap: &Snapshot, i: usize| snap.routes.upstreams()[i].tls.as_ref().unwrap().get();
    assert!(!Arc::ptr_eq(&cfg(&first, 0), &cfg(&first, 1)));
    // A catalog change: the same configurations (their verifiers keep the
    // session tickets).
    s.upstreams[1].endpoints.push(sa("10.0.0.4:20000"));
    s.upstreams.push(up("cache", "10.96.0.40"));
    let second = Snapshot::build_after(s.clone(), 2, Some(&first)).unwrap();
    assert!(Arc::ptr_eq(&cfg(&first, 0), &cfg(&second, 0)));
    assert!(Arc::ptr_eq(&cfg(&first, 1), &cfg(&second, 1)));
    // New expected SANs: a new configuration for that upstream only.
    s.upstreams[0].san_matchers = vec![StringMatch::suffix("/svc/api")];
    let third = Snapshot::build_after(s.clone(), 3, Some(&second)).unwrap();
    assert!(!Arc::ptr_eq(&cfg(&second, 0), &cfg(&third, 0)));
    assert!(Arc::ptr_eq(&cfg(&second, 1), &cfg(&third, 1)));
    // A new leaf: everything new.
    let rotated = spec(&ca);
    let mut s2 = s.clone();
    s2.chain = rotated.chain;
    s2.key = rotated.key;
    let fourth = Snapshot::build_after(s2, 4, Some(&third)).unwrap();
    assert!(!Arc::ptr_eq(&cfg(&third, 1), &cfg(&fourth, 1)));
}

/// 2,000 upstreams build quickly: one base configuration cloned, no key
/// parsed per upstream.
#[test]
fn two_thousand_upstreams_are_cheap() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    s.upstreams = (0..2000)
        .map(|i| {
            up(
                &format!("svc{i}"),
                &format!("10.96.{}.{}", i / 256, i % 256),
            )
        })
        .collect();
    let t = std::time::Instant::now();
    let snap = Snapshot::build(s, 1).unwrap();
    let took = t.elapsed();
    assert_eq!(snap.routes.upstreams().len(), 2000);
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
}

#[test]
fn failover_targets_get_their_own_sni_identity_timeout_and_tls() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    let mut u = up("api", "10.96.0.20");
    u.endpoints.clear();
    u.sni = Some("v1.api.default.dc1.internal.td.consul".into());
    u.connect_timeout = Some(Duration::from_secs(1));
    let mut t = TargetSpec::new(ServiceId::new(TD, "default", "default", "dc2", "api"));
    t.endpoints = vec![sa("10.0.2.1:21000"), sa("10.0.2.2:21000")];
    t.endpoint_weights = vec![1, 3];
    t.sni = Some("v1.api.default.dc2.internal.td.consul".into());
    u.failover = vec![t.clone()];
    s.upstreams = vec![u.clone()];
    let snap = Snapshot::build(s.clone(), 1).unwrap();
    let a = &snap.routes.upstreams()[0];
    assert_eq!(a.connect_timeout, Duration::from_secs(1));
    let f = &a.failover[0];
    assert_eq!(f.sni, "v1.api.default.dc2.internal.td.consul");
    assert_eq!(f.connect_timeout, Timeouts::default().connect);
    assert_eq!(
        f.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
        [1, 3]
    );
    assert!(f.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/dc2/svc/api"));
    assert!(!f.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/dc1/svc/api"));
    assert!(f.tls.is_some());
    // No endpoint in dc1: new connections go to dc2.
    assert_eq!(a.target().unwrap().identity.datacenter, "dc2");
    let d = snap.dump();
    assert_eq!(
        d["upstreams"][0]["failover"][0]["identity"],
        "spiffe://td.consul/ns/default/dc/dc2/svc/api"
    );
    // A bad failover target is refused like a bad primary, naming the upstream.
    let mut bad = t.clone();
    bad.endpoint_weights = vec![1];
    u.failover = vec![bad];
    s.upstreams = vec![u.clone()];
    let e = Snapshot::build(s.clone(), 2).unwrap_err();
    assert!(
        e.to_string()
            .contains("upstream api: 1 endpoint weights for 2 endpoints"),
        "{e}"
    );
    // primary() / set_primary() round-trip.
    let mut v = u.clone();
    v.set_primary(t.clone());
    assert_eq!(v.primary(), t);
    assert_eq!(v.identity.datacenter, "dc2");
}

/// An endpoint change rebuilds only its upstream: the others are the
/// previous snapshot's (with their open connections and TLS
/// configuration); any change to an upstream's own fields, the default
/// connect timeout or the leaf rebuilds it.
#[test]
fn unchanged_upstreams_are_kept_from_the_previous_snapshot() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    let mut cache = up("cache", "10.96.0.40");
    cache.san_matchers = vec![StringMatch::suffix("/svc/cache")];
    cache.roots = Some(s.roots.clone());
    cache.endpoint_weights = vec![2, 1];
    let mut t = TargetSpec::new(ServiceId::new(TD, "default", "default", "dc2", "cache"));
    t.endpoints = vec![sa("10.0.2.1:21000")];
    cache.failover = vec![t];
    s.upstreams = vec![up("api", "10.96.0.20"), up("db", "10.96.0.30"), cache];
    let first = Snapshot::build(s.clone(), 1).unwrap();
    let ups = |snap: &Snapshot| snap.routes.upstreams().to_vec();
    let slot = ups(&first)[0].try_open().unwrap();

    s.upstreams[1].endpoints.push(sa("10.0.0.4:20000"));
    let second = Snapshot::build_after(s.clone(), 2, Some(&first)).unwrap();
    let (a, b) = (ups(&first), ups(&second));
    assert!(Arc::ptr_eq(&a[0], &b[0]), "api rebuilt");
    assert!(Arc::ptr_eq(&a[2], &b[2]), "cache rebuilt");
    assert!(!Arc::ptr_eq(&a[1], &b[1]), "db kept its old endpoints");
    assert_eq!(b[1].endpoints.len(), 3);
    assert_eq!(b[0].open_connections(), 1, "api's open connection");
    drop(slot);
    // Nothing changed: everything kept.
    let again = Snapshot::build_after(s.clone(), 3, Some(&second)).unwrap();
    assert!(ups(&again)
        .iter()
        .zip(ups(&second))
        .all(|(x, y)| Arc::ptr_eq(x, &y)));

    // Each change of the cache upstream's own fields rebuilds it (and only it).
    type Change = Box<dyn Fn(&mut Spec)>;
    let changes: Vec<(&str, Change)> = vec![
        (
            "sni",
            Box::new(|s| s.upstreams[2].sni = Some("x.internal.td.consul".into())),
        ),
        (
            "sans",
            Box::new(|s| s.upstreams[2].san_matchers = vec![StringMatch::suffix("/x")]),
        ),
        (
            "sans default",
            Box::new(|s| s.upstreams[2].san_matchers.clear()),
        ),
        ("roots", Box::new(|s| s.upstreams[2].roots = None)),
        (
            "connect",
            Box::new(|s| s.upstreams[2].connect_timeout = Some(Duration::from_secs(1))),
        ),
        (
            "default connect",
            Box::new(|s| s.timeouts.connect = Duration::from_secs(2)),
        ),
        (
            "max",
            Box::new(|s| s.upstreams[2].max_connections = Some(5)),
        ),
        (
            "protocol",
            Box::new(|s| s.upstreams[2].protocol = Protocol::Http),
        ),
        (
            "vips",
            Box::new(|s| {
                s.upstreams[2]
                    .virtual_ips
                    .push("10.96.0.41".parse().unwrap())
            }),
        ),
        (
            "instances",
            Box::new(|s| s.upstreams[2].instances.push("10.0.9.9".parse().unwrap())),
        ),
        (
            "dialed",
            Box::new(|s| s.upstreams[2].dialed_directly = true),
        ),
        (
            "weights",
            Box::new(|s| s.upstreams[2].endpoint_weights = vec![1, 2]),
        ),
        (
            "no weights",
            Box::new(|s| s.upstreams[2].endpoint_weights.clear()),
        ),
        (
            "endpoint",
            Box::new(|s| s.upstreams[2].endpoints[1] = sa("10.0.0.9:20000")),
        ),
        (
            "identity",
            Box::new(|s| s.upstreams[2].identity.namespace = "other".into()),
        ),
        (
            "failover",
            Box::new(|s| s.upstreams[2].failover[0].endpoints.clear()),
        ),
        (
            "failover sni",
            Box::new(|s| s.upstreams[2].failover[0].sni = Some("y.td.consul".into())),
        ),
        ("no failover", Box::new(|s| s.upstreams[2].failover.clear())),
    ];
    for (what, change) in changes {
        let mut c = s.clone();
        change(&mut c);
        let next = Snapshot::build_after(c, 4, Some(&second)).unwrap();
        let n = ups(&next);
        assert!(
            !Arc::ptr_eq(&n[2], &b[2]),
            "{what}: the old upstream was kept"
        );
        if what != "default connect" {
            assert!(Arc::ptr_eq(&n[0], &b[0]), "{what}: api rebuilt");
        }
    }
    // A new leaf: everything rebuilt.
    let rotated = spec(&ca);
    let mut c = s.clone();
    c.chain = rotated.chain;
    c.key = rotated.key;
    let next = Snapshot::build_after(c, 5, Some(&second)).unwrap();
    assert!(ups(&next)
        .iter()
        .zip(ups(&second))
        .all(|(x, y)| !Arc::ptr_eq(x, &y)));
}
