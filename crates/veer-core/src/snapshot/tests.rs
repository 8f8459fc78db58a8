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
        inbound_http: None,
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
    s.upstreams = arcs(vec![up("api", "10.96.0.20")]);
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
    s.upstreams = arcs(vec![a]);
    s.permissive_ports = vec![8080];
    s.inbound_max_connections = Some(12);
    s.rbac = Some(vec![RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            permissions: Vec::new(),
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
            Box::new(|s| Arc::make_mut(&mut s.upstreams[0]).endpoint_weights = vec![1]),
            "upstream",
            "1 endpoint weights for 2 endpoints",
        ),
        (
            Box::new(|s| Arc::make_mut(&mut s.upstreams[0]).endpoint_weights = vec![1, 0]),
            "upstream",
            "weight 0",
        ),
        (
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[0]).san_matchers = vec![StringMatch::regex("(")]
            }),
            "upstream",
            "upstream api: SAN matcher",
        ),
        (
            Box::new(|s| Arc::make_mut(&mut s.upstreams[0]).roots = Some(vec![])),
            "upstream",
            "empty roots",
        ),
        (
            Box::new(|s| Arc::make_mut(&mut s.upstreams[0]).sni = Some("not a name!".into())),
            "upstream",
            "SNI",
        ),
        (
            Box::new(|s| {
                s.rbac = Some(vec![RbacRules {
                    action: Action::Deny,
                    policies: vec![RbacPolicy {
                        permissions: Vec::new(),
                        name: "bad".into(),
                        principals: vec![Principal::spiffe_regex("[")],
                    }],
                }])
            }),
            "rbac",
            "\"bad\"",
        ),
        (
            Box::new(|s| s.upstreams.push(Arc::new(up("db", "10.96.0.20")))),
            "duplicate_vip",
            "10.96.0.20 is claimed by both api and db",
        ),
        (
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[0]).destination_port = Some(80);
                let mut db = up("db", "10.96.0.20");
                db.destination_port = Some(80);
                s.upstreams.push(Arc::new(db));
            }),
            "duplicate_vip",
            "10.96.0.20 port 80 is claimed",
        ),
        (
            Box::new(|s| {
                let vip = s.upstreams[0].virtual_ips[0];
                Arc::make_mut(&mut s.upstreams[0]).virtual_ips.push(vip);
            }),
            "duplicate_vip",
            "10.96.0.20 is claimed by both api and api",
        ),
    ];
    for (i, (change, label, text)) in cases.into_iter().enumerate() {
        let mut s = spec(&ca);
        s.upstreams = arcs(vec![up("api", "10.96.0.20")]);
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
    s.upstreams = arcs(vec![a, b, up("any", "10.96.0.20")]);
    Snapshot::build(s, 1).unwrap();
}

#[test]
fn upstream_tls_configs_are_shared_and_kept_across_snapshots() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    s.upstreams = arcs(vec![up("api", "10.96.0.20"), up("db", "10.96.0.30")]);
    let first = Snapshot::build(s.clone(), 1).unwrap();
    let cfg = |snap: &Snapshot, i: usize| snap.routes.upstreams()[i].tls.as_ref().unwrap().get();
    assert!(!Arc::ptr_eq(&cfg(&first, 0), &cfg(&first, 1)));
    // A catalog change: the same configurations (their verifiers keep the
    // session tickets).
    Arc::make_mut(&mut s.upstreams[1])
        .endpoints
        .push(sa("10.0.0.4:20000"));
    s.upstreams.push(Arc::new(up("cache", "10.96.0.40")));
    let second = Snapshot::build_after(s.clone(), 2, Some(&first)).unwrap();
    assert!(Arc::ptr_eq(&cfg(&first, 0), &cfg(&second, 0)));
    assert!(Arc::ptr_eq(&cfg(&first, 1), &cfg(&second, 1)));
    // New expected SANs: a new configuration for that upstream only.
    Arc::make_mut(&mut s.upstreams[0]).san_matchers = vec![StringMatch::suffix("/svc/api")];
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
        .map(Arc::new)
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
    s.upstreams = arcs(vec![u.clone()]);
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
    s.upstreams = arcs(vec![u.clone()]);
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

#[test]
fn http_routes_are_compiled_and_bad_ones_refused_with_the_route_named() {
    use crate::l7::{ClusterSpec, HttpRoutes, PathMatch, RequestMatch, RouteAction, RouteSpec};
    let ca = Ca::new_root(TD).unwrap();
    let routes = |re: &str| HttpRoutes {
        clusters: vec![ClusterSpec {
            name: "api".into(),
            targets: vec![TargetSpec {
                endpoints: vec![sa("10.0.0.2:20000")],
                ..TargetSpec::new(id("api"))
            }],
            protocol: Protocol::Http,
        }],
        routes: vec![RouteSpec {
            name: "by-regex".into(),
            matches: RequestMatch {
                path: PathMatch::Regex(re.into()),
                ..Default::default()
            },
            action: RouteAction::to_cluster(0),
        }],
    };
    let mut s = spec(&ca);
    let mut u = up("api", "10.96.0.20");
    u.protocol = Protocol::Http;
    u.http = Some(routes("/v[0-9]+/.*"));
    s.upstreams = arcs(vec![u]);
    let snap = Snapshot::build(s, 1).unwrap();
    let t = snap.routes.upstreams()[0].http.as_ref().expect("compiled");
    assert_eq!(t.clusters[0].target.endpoints.len(), 1);
    assert!(
        t.clusters[0].target.tls.is_some(),
        "cluster targets get TLS"
    );
    assert!(t
        .route(&crate::l7route::PlainRequest::new("GET", "/v1/x"))
        .is_some());

    let mut s = spec(&ca);
    let mut u = up("api", "10.96.0.20");
    u.protocol = Protocol::Http;
    u.http = Some(routes("/v[0-9"));
    s.upstreams = arcs(vec![u]);
    let e = Snapshot::build(s, 1).unwrap_err();
    assert_eq!(e.classify(), "upstream");
    let msg = e.to_string();
    assert!(
        msg.starts_with("upstream api: route \"by-regex\": path regex"),
        "{msg}"
    );

    // Routes on a tcp upstream are a source's mistake: refused.
    let mut s = spec(&ca);
    let mut u = up("api", "10.96.0.20");
    u.http = Some(routes("/"));
    s.upstreams = arcs(vec![u]);
    let e = Snapshot::build(s, 1).unwrap_err();
    assert!(e.to_string().contains("protocol tcp"), "{e}");
}

/// The api sidecar's spec: its own leaf from `ca`, roots `roots`.
fn api_spec(ca: &Ca, roots: &Ca) -> Spec {
    let leaf = ca.service_leaf("dc1", "api").unwrap();
    Spec {
        identity: id("api"),
        roots: parse_certs(roots.cert_pem.as_bytes(), "roots").unwrap(),
        chain: parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap(),
        key: parse_key(leaf.key_pem.as_bytes(), "key").unwrap(),
        ..spec(ca)
    }
}

/// One connection from web's configuration for its first upstream to
/// api's server configuration, in memory, the session tickets delivered:
/// the client's handshake kind and the client leaf the server holds, or
/// the first error either side reports.
fn mesh_handshake(
    web: &Snapshot,
    api: &Snapshot,
) -> Result<(rustls::HandshakeKind, Vec<u8>), rustls::Error> {
    let cfg = web.routes.upstreams()[0].tls.as_ref().unwrap().get();
    let name =
        rustls::pki_types::ServerName::try_from("api.default.dc1.internal.td.consul").unwrap();
    let mut c = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut s = rustls::ServerConnection::new(api.tls.server.clone()).unwrap();
    let mut buf = Vec::new();
    for _ in 0..10 {
        while c.wants_write() {
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
        }
        while s.wants_write() {
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
            let leaf = s.peer_certificates().unwrap()[0].to_vec();
            return Ok((c.handshake_kind().unwrap(), leaf));
        }
    }
    panic!("handshake did not finish");
}

/// Resumption keeps identity checks and ends with the certificates: a
/// resumed session still gives the server the client's leaf, which the
/// current intentions decide on (here: a new snapshot that denies web);
/// a snapshot that keeps the certificates keeps resuming; a new leaf on
/// either side, or new roots, makes a full handshake, and roots that no
/// longer trust the client's CA refuse it even though it holds a ticket
/// the old configuration issued.
#[test]
fn sessions_resume_only_while_the_certificates_stay() {
    use rustls::HandshakeKind::{Full, Resumed};
    let ca = Ca::new_root(TD).unwrap();
    let mut web_spec = spec(&ca);
    web_spec.upstreams = arcs(vec![up("api", "10.96.0.20")]);
    let web = Snapshot::build(web_spec.clone(), 1).unwrap();
    let api_s = api_spec(&ca, &ca);
    let api1 = Snapshot::build(api_s.clone(), 1).unwrap();
    assert_eq!(mesh_handshake(&web, &api1).unwrap().0, Full);
    let (kind, leaf) = mesh_handshake(&web, &api1).unwrap();
    assert_eq!(kind, Resumed);
    assert_eq!(crate::tls::peer_identity(&leaf).unwrap(), id("web"));

    // Intentions change, certificates do not: still resumed, and the new
    // intentions deny the identity the resumed session carries.
    let mut deny = api_s;
    deny.intentions = vec![Intention::new(
        crate::intentions::Target::new("default", "default", "web"),
        crate::intentions::Target::new("default", "default", "api"),
        Action::Deny,
    )];
    let api2 = Snapshot::build_after(deny, 2, Some(&api1)).unwrap();
    let (kind, leaf) = mesh_handshake(&web, &api2).unwrap();
    assert_eq!(kind, Resumed);
    let peer = Peer::from_id(crate::tls::peer_identity(&leaf).unwrap());
    assert!(!api2.authz.evaluate(&peer).allowed());
    assert!(api1.authz.evaluate(&peer).allowed());

    // api gets a new leaf (the old one revoked): web's tickets were
    // sealed with the old configuration's key, so a full handshake.
    let mut releaf = api_spec(&ca, &ca);
    releaf.intentions = vec![];
    let api3 = Snapshot::build_after(releaf.clone(), 3, Some(&api2)).unwrap();
    assert_eq!(mesh_handshake(&web, &api3).unwrap().0, Full);
    assert_eq!(mesh_handshake(&web, &api3).unwrap().0, Resumed);

    // web gets a new leaf: a new session store, a full handshake.
    let mut web2_spec = spec(&ca);
    web2_spec.upstreams = web_spec.upstreams.clone();
    let web2 = Snapshot::build_after(web2_spec.clone(), 2, Some(&web)).unwrap();
    assert_eq!(mesh_handshake(&web2, &api3).unwrap().0, Full);
    assert_eq!(mesh_handshake(&web2, &api3).unwrap().0, Resumed);

    // api adds another CA's root: new roots, a full handshake.
    let other = Ca::new_root(TD).unwrap();
    let both = [
        parse_certs(ca.cert_pem.as_bytes(), "ca").unwrap(),
        parse_certs(other.cert_pem.as_bytes(), "other").unwrap(),
    ]
    .concat();
    let mut rerooted = releaf;
    rerooted.roots = both.clone();
    let api4 = Snapshot::build_after(rerooted.clone(), 4, Some(&api3)).unwrap();
    let mut web3_spec = web2_spec;
    web3_spec.roots = both;
    let web3 = Snapshot::build_after(web3_spec, 3, Some(&web2)).unwrap();
    assert_eq!(mesh_handshake(&web3, &api4).unwrap().0, Full);
    assert_eq!(mesh_handshake(&web3, &api4).unwrap().0, Resumed);

    // Then api moves to the other CA alone (web's CA withdrawn): web holds
    // tickets and trusts api's new leaf, and api refuses it all the same.
    let other_leaf = other.service_leaf("dc1", "api").unwrap();
    rerooted.roots = parse_certs(other.cert_pem.as_bytes(), "other").unwrap();
    rerooted.chain = parse_certs(other_leaf.chain_pem.as_bytes(), "leaf").unwrap();
    rerooted.key = parse_key(other_leaf.key_pem.as_bytes(), "key").unwrap();
    let api5 = Snapshot::build_after(rerooted, 5, Some(&api4)).unwrap();
    let e = mesh_handshake(&web3, &api5).unwrap_err();
    assert_eq!(crate::tls::classify_tls_error(&e), "cert_untrusted", "{e}");
}

/// The upstream specs of a test spec, each in its own `Arc`.
fn arcs(v: Vec<UpstreamSpec>) -> Vec<Arc<UpstreamSpec>> {
    v.into_iter().map(Arc::new).collect()
}

thread_local! {
    /// How many upstream specs `Reuse::find` compared field by field.
    pub(super) static COMPARED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A source that keeps its spec and patches it (the xDS translator) hands
/// over the very upstream specs it did not touch: those are kept without a
/// comparison, only the patched one is compared (and rebuilt). A spec only
/// the snapshot would hold is not kept; a new default connect timeout
/// rebuilds even the same spec.
#[test]
fn upstream_specs_the_source_keeps_are_known_unchanged_without_comparing() {
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    s.upstreams = (0..50)
        .map(|i| up(&format!("svc{i}"), &format!("10.96.1.{i}")))
        .map(Arc::new)
        .collect();
    let ups = |snap: &Snapshot| snap.routes.upstreams().to_vec();
    let compared = || COMPARED.with(|c| c.replace(0));

    // The source keeps `s`: the snapshot shares its upstream specs.
    let first = Snapshot::build(s.clone(), 1).unwrap();
    for (u, kept) in ups(&first).iter().zip(&s.upstreams) {
        assert!(u.built_from.as_ref().is_some_and(|f| Arc::ptr_eq(f, kept)));
    }
    compared();
    Arc::make_mut(&mut s.upstreams[7]).endpoints = vec![sa("10.0.7.7:20000")];
    let second = Snapshot::build_after(s.clone(), 2, Some(&first)).unwrap();
    assert_eq!(compared(), 1, "only the patched upstream is compared");
    let (a, b) = (ups(&first), ups(&second));
    for i in 0..50 {
        assert_eq!(Arc::ptr_eq(&a[i], &b[i]), i != 7, "upstream {i}");
    }
    assert_eq!(b[7].endpoints.len(), 1);
    assert!(second.routes.shares_index_with(&first.routes));

    // A new default connect timeout: every upstream built again.
    let mut t = s.clone();
    t.timeouts.connect = Duration::from_millis(1234);
    let third = Snapshot::build_after(t, 3, Some(&second)).unwrap();
    assert!(ups(&third).iter().zip(&b).all(|(x, y)| !Arc::ptr_eq(x, y)));
    assert!(ups(&third)
        .iter()
        .all(|u| u.connect_timeout == Duration::from_millis(1234)));

    // A spec no source keeps: not held by the snapshot (no memory for it).
    let mut alone = spec(&ca);
    alone.upstreams = vec![Arc::new(up("api", "10.96.0.20"))];
    let snap = Snapshot::build(alone, 4).unwrap();
    assert!(ups(&snap)[0].built_from.is_none());
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
    s.upstreams = arcs(vec![up("api", "10.96.0.20"), up("db", "10.96.0.30"), cache]);
    let first = Snapshot::build(s.clone(), 1).unwrap();
    let ups = |snap: &Snapshot| snap.routes.upstreams().to_vec();
    let slot = ups(&first)[0].try_open().unwrap();

    Arc::make_mut(&mut s.upstreams[1])
        .endpoints
        .push(sa("10.0.0.4:20000"));
    let second = Snapshot::build_after(s.clone(), 2, Some(&first)).unwrap();
    let (a, b) = (ups(&first), ups(&second));
    assert!(Arc::ptr_eq(&a[0], &b[0]), "api rebuilt");
    assert!(Arc::ptr_eq(&a[2], &b[2]), "cache rebuilt");
    assert!(!Arc::ptr_eq(&a[1], &b[1]), "db kept its old endpoints");
    assert_eq!(b[1].endpoints.len(), 3);
    assert_eq!(b[0].open_connections(), 1, "api's open connection");
    assert!(
        second.routes.shares_index_with(&first.routes),
        "the route index was built again for an endpoint change"
    );
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
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2]).sni = Some("x.internal.td.consul".into())
            }),
        ),
        (
            "sans",
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2]).san_matchers = vec![StringMatch::suffix("/x")]
            }),
        ),
        (
            "sans default",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).san_matchers.clear()),
        ),
        (
            "roots",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).roots = None),
        ),
        (
            "connect",
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2]).connect_timeout = Some(Duration::from_secs(1))
            }),
        ),
        (
            "default connect",
            Box::new(|s| s.timeouts.connect = Duration::from_secs(2)),
        ),
        (
            "max",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).max_connections = Some(5)),
        ),
        (
            "protocol",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).protocol = Protocol::Http),
        ),
        (
            "vips",
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2])
                    .virtual_ips
                    .push("10.96.0.41".parse().unwrap())
            }),
        ),
        (
            "instances",
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2])
                    .instances
                    .push("10.0.9.9".parse().unwrap())
            }),
        ),
        (
            "dialed",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).dialed_directly = true),
        ),
        (
            "weights",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).endpoint_weights = vec![1, 2]),
        ),
        (
            "no weights",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).endpoint_weights.clear()),
        ),
        (
            "endpoint",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).endpoints[1] = sa("10.0.0.9:20000")),
        ),
        (
            "identity",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).identity.namespace = "other".into()),
        ),
        (
            "failover",
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2]).failover[0]
                    .endpoints
                    .clear()
            }),
        ),
        (
            "failover sni",
            Box::new(|s| {
                Arc::make_mut(&mut s.upstreams[2]).failover[0].sni = Some("y.td.consul".into())
            }),
        ),
        (
            "no failover",
            Box::new(|s| Arc::make_mut(&mut s.upstreams[2]).failover.clear()),
        ),
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
        // The route index is kept unless an address it reads changed.
        let routing = matches!(what, "vips" | "instances" | "dialed");
        assert_eq!(
            next.routes.shares_index_with(&second.routes),
            !routing,
            "{what}"
        );
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

/// The route index is kept only while every upstream routes as the one
/// before it at its position: a reordered or longer list indexes again
/// (and routes each address to its own upstream), and an address claimed
/// twice is still refused after a snapshot whose index was kept.
#[test]
fn the_route_index_follows_positions_and_addresses() {
    use crate::addr::OrigDstAddr;
    use crate::route::{route, Route};
    let ca = Ca::new_root(TD).unwrap();
    let mut s = spec(&ca);
    s.upstreams = arcs(vec![up("api", "10.96.0.20"), up("db", "10.96.0.30")]);
    let first = Snapshot::build(s.clone(), 1).unwrap();
    let to = |snap: &Snapshot, dst: &str| match route(&snap.routes, OrigDstAddr(sa(dst))) {
        Ok(Route::Mesh { upstream }) => upstream.name().to_string(),
        other => panic!("{dst}: {other:?}"),
    };
    Arc::make_mut(&mut s.upstreams[0]).endpoints.pop();
    let second = Snapshot::build_after(s.clone(), 2, Some(&first)).unwrap();
    assert!(second.routes.shares_index_with(&first.routes));
    assert_eq!(to(&second, "10.96.0.20:80"), "api");
    assert_eq!(second.routes.upstreams()[0].endpoints.len(), 1);
    // Reordered: the upstreams are kept (found by key), the index is new.
    s.upstreams.swap(0, 1);
    let third = Snapshot::build_after(s.clone(), 3, Some(&second)).unwrap();
    assert!(!third.routes.shares_index_with(&second.routes));
    assert!(Arc::ptr_eq(
        &third.routes.upstreams()[1],
        &second.routes.upstreams()[0]
    ));
    assert_eq!(to(&third, "10.96.0.20:80"), "api");
    assert_eq!(to(&third, "10.96.0.30:80"), "db");
    // One more upstream: indexed again.
    s.upstreams.push(Arc::new(up("cache", "10.96.0.40")));
    let fourth = Snapshot::build_after(s.clone(), 4, Some(&third)).unwrap();
    assert!(!fourth.routes.shares_index_with(&third.routes));
    assert_eq!(to(&fourth, "10.96.0.40:80"), "cache");
    // An address claimed twice is refused.
    Arc::make_mut(&mut s.upstreams[2]).virtual_ips = s.upstreams[0].virtual_ips.clone();
    let e = Snapshot::build_after(s.clone(), 5, Some(&fourth)).unwrap_err();
    assert!(matches!(e, SnapshotError::DuplicateVip { .. }), "{e}");
}
