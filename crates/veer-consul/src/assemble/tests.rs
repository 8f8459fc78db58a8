use super::*;
use crate::api;
use crate::watch::WatchKey;
use veer_core::snapshot::Snapshot;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn roots_json(ca: &veer_ca::Ca) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ActiveRootID": "aa:bb", "TrustDomain": TD,
        "Roots": [{"ID": "aa:bb", "Name": "Consul CA Root Cert", "RootCert": ca.cert_pem, "Active": true}]
    }))
    .unwrap()
}

fn leaf_json(ca: &veer_ca::Ca, service: &str) -> Vec<u8> {
    let l = ca.service_leaf("dc1", service).unwrap();
    serde_json::to_vec(&serde_json::json!({
        "SerialNumber": "08", "CertPEM": l.chain_pem, "PrivateKeyPEM": l.key_pem, "Service": service,
        "ServiceURI": veer_ca::service_uri(TD, "default", "dc1", service),
    }))
    .unwrap()
}

fn inst(id: &str, ip: &str, port: u16, passing: bool) -> api::ConnectInstance {
    api::ConnectInstance {
        service: format!("{id}-svc"),
        id: id.into(),
        node: "node-1".into(),
        datacenter: "dc1".into(),
        partition: "default".into(),
        ip: Some(ip.parse().unwrap()),
        port,
        passing,
        critical: !passing,
        weight: 1,
        wan: None,
        vips: api::Vips::default(),
        dialed_directly: false,
    }
}

fn dest(vip: &str) -> Vec<api::CatalogInstance> {
    vec![api::CatalogInstance {
        id: "x".into(),
        kind: String::new(),
        partition: "default".into(),
        vips: api::Vips {
            virtual_ip: Some(vip.parse().unwrap()),
            consul_virtual: None,
        },
        destination: String::new(),
    }]
}

/// web's sidecar (explicit upstream db:9191) in a mesh of web, api, db and
/// a service without sidecars (cache).
fn world(ca: &veer_ca::Ca) -> (State, Settings) {
    let (reg, _) = api::parse_registration(
        "web-sidecar-proxy",
        &fixture("1.8.7-agent-service-web-sidecar.json"),
    )
    .unwrap();
    let (ixns, _) = api::parse_intentions(&fixture("1.8.7-intentions.json")).unwrap();
    let mut s = State {
        registration: Some(reg),
        roots: Some(api::parse_roots(&roots_json(ca)).unwrap()),
        leaf: Some(api::parse_leaf("web", &leaf_json(ca, "web")).unwrap()),
        intentions: Some(ixns),
        default_action: Some(Action::Allow),
        catalog: Some(
            [
                "consul",
                "web",
                "web-sidecar-proxy",
                "api",
                "api-sidecar-proxy",
                "db",
                "db-sidecar-proxy",
                "cache",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        service_defaults: Some(
            api::parse_service_defaults(&fixture("1.8.7-config-service-defaults.json")).unwrap(),
        ),
        proxy_defaults: Some(api::ProxyDefaults::default()),
        mesh: Some(api::Mesh::Unsupported),
        resolvers: Some(BTreeMap::new()),
        ..State::default()
    };
    for k in crate::entries::Kind::ALL {
        s.chain_entries.set(k, Vec::new());
    }
    let k = ServiceKey::local;
    s.connect.insert(
        k("api"),
        vec![inst("api-sidecar-proxy", "10.0.0.2", 21000, true)],
    );
    s.connect.insert(
        k("db"),
        vec![
            inst("db-sidecar-proxy", "10.0.0.3", 21000, false),
            inst("db2-sidecar-proxy", "10.0.0.4", 21000, true),
        ],
    );
    for n in [
        "api-sidecar-proxy",
        "db-sidecar-proxy",
        "web-sidecar-proxy",
        "cache",
    ] {
        s.connect.insert(k(n), Vec::new());
    }
    s.instances.insert(k("api"), dest("10.96.0.20"));
    s.instances.insert(k("db"), dest("10.96.0.30"));
    (
        s,
        Settings {
            transparent: true,
            outbound_port: None,
            source: "consul test".into(),
        },
    )
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn nothing_arrived_is_incomplete() {
    let s = State::default();
    let m = missing(&s, &Settings::default());
    assert_eq!(m.len(), 11, "{m:?}");
    let e = assemble(&s, &Settings::default()).unwrap_err();
    assert_eq!(e.classify(), "incomplete");
    assert!(e.to_string().contains("the proxy registration"), "{e}");
}

#[test]
fn transparent_spec_is_complete_and_builds() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (s, set) = world(&ca);
    let a = assemble(&s, &set).unwrap();
    assert!(a.warnings.is_empty(), "{:?}", a.warnings);
    let spec = a.spec;
    assert_eq!(
        spec.identity.to_string(),
        format!("spiffe://{TD}/ns/default/dc/dc1/svc/web")
    );
    assert_eq!(spec.listen.inbound, sa("0.0.0.0:21000"));
    assert_eq!(
        spec.listen.outbound,
        vec![sa("127.0.0.1:15001"), sa("[::1]:15001")]
    );
    assert_eq!(spec.local_app, sa("127.0.0.1:8080"));
    assert_eq!(spec.intentions.len(), 2);
    assert_eq!(spec.default_action, Action::Allow);
    assert!(!spec.mesh_destinations_only);
    assert_eq!(spec.source, "consul test");
    let names: Vec<&str> = spec
        .upstreams
        .iter()
        .map(|u| u.identity.service.as_str())
        .collect();
    assert_eq!(
        names,
        vec!["api", "db"],
        "services without sidecars, consul and ourselves are not upstreams"
    );
    let api_u = &spec.upstreams[0];
    assert_eq!(api_u.protocol, Protocol::Http, "from service-defaults");
    assert_eq!(
        api_u.virtual_ips,
        vec!["10.96.0.20".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(api_u.endpoints, vec![sa("10.0.0.2:21000")]);
    assert_eq!(api_u.local_bind, None);
    assert_eq!(
        api_u.identity.to_string(),
        format!("spiffe://{TD}/ns/default/dc/dc1/svc/api")
    );
    let db = &spec.upstreams[1];
    assert_eq!(
        db.endpoints,
        vec![sa("10.0.0.4:21000")],
        "only passing sidecars"
    );
    assert_eq!(
        db.virtual_ips,
        vec!["10.96.0.30".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        db.local_bind,
        Some(sa("127.0.0.1:9191")),
        "explicit upstream merged"
    );
    assert_eq!(db.protocol, Protocol::Tcp);
    let snap = Snapshot::build(spec, 1).unwrap();
    assert_eq!(snap.routes.upstreams().len(), 2);
    assert!(snap
        .intentions
        .evaluate(&veer_core::spiffe::ServiceId::new(
            TD, "default", "default", "dc1", "api"
        ))
        .allowed());
}

#[test]
fn direct_mode_has_only_explicit_upstreams_and_no_outbound() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, mut set) = world(&ca);
    set.transparent = false;
    s.catalog = None;
    assert_eq!(
        wanted(&s, &set).into_keys().collect::<Vec<_>>(),
        vec![ServiceKey::local("db")]
    );
    let spec = assemble(&s, &set).unwrap().spec;
    assert!(spec.listen.outbound.is_empty());
    assert_eq!(spec.upstreams.len(), 1);
    assert!(spec.upstreams[0].virtual_ips.is_empty());
    assert_eq!(spec.upstreams[0].local_bind, Some(sa("127.0.0.1:9191")));
}

#[test]
fn mode_precedence() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, mut set) = world(&ca);
    set.transparent = false;
    assert_eq!(transparent(&s, &set), Some(false));
    s.proxy_defaults.as_mut().unwrap().mode = Some(Mode::Transparent);
    assert_eq!(transparent(&s, &set), Some(true), "proxy-defaults");
    s.service_defaults.as_mut().unwrap().insert(
        "web".into(),
        api::ServiceDefaults {
            mode: Some(Mode::Direct),
            outbound_port: Some(15002),
            ..Default::default()
        },
    );
    assert_eq!(
        transparent(&s, &set),
        Some(false),
        "service-defaults beats proxy-defaults"
    );
    s.registration.as_mut().unwrap().mode = Mode::Transparent;
    assert_eq!(transparent(&s, &set), Some(true), "registration beats both");
    let spec = assemble(&s, &set).unwrap().spec;
    assert_eq!(
        spec.listen.outbound[0],
        sa("127.0.0.1:15002"),
        "outbound port from service-defaults"
    );
    s.registration.as_mut().unwrap().outbound_port = Some(15003);
    assert_eq!(
        assemble(&s, &set).unwrap().spec.listen.outbound[1],
        sa("[::1]:15003")
    );
    s.service_defaults = None;
    assert_eq!(
        transparent(&s, &set),
        None,
        "cannot tell before service-defaults arrive"
    );
}

#[test]
fn waits_for_every_wanted_service() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let w = wanted(&s, &set);
    assert_eq!(w.get(&ServiceKey::local("api")), Some(&true));
    assert_eq!(
        w.get(&ServiceKey::local("cache")),
        Some(&false),
        "no sidecars: instances not needed"
    );
    assert!(!w.contains_key(&ServiceKey::local("consul")));
    assert!(!w.contains_key(&ServiceKey::local("web")));
    s.instances.remove(&ServiceKey::local("db"));
    let e = assemble(&s, &set).unwrap_err();
    assert!(e.to_string().contains("db (instances)"), "{e}");
    s.catalog.as_mut().unwrap().insert("new".into());
    let e = assemble(&s, &set).unwrap_err();
    assert!(e.to_string().contains("new (sidecars)"), "{e}");
}

#[test]
fn desired_watch_set() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (s, set) = world(&ca);
    // Transparent: two lists for the local datacenter, no watch per
    // service; an explicit upstream in another datacenter keeps its own.
    let mut s = s;
    let mut remote = s.registration.as_ref().unwrap().upstreams[0].clone();
    remote.name = "billing".into();
    remote.datacenter = Some("dc2".into());
    s.registration.as_mut().unwrap().upstreams.push(remote);
    let w = crate::desired_watches(&s, &set);
    let remote = WatchKey::Connect(ServiceKey {
        name: "billing".into(),
        datacenter: Some("dc2".into()),
    });
    for k in [
        WatchKey::Registration,
        WatchKey::Roots,
        WatchKey::Leaf("web".into()),
        WatchKey::Intentions,
        WatchKey::Catalog,
        WatchKey::Checks,
        WatchKey::Mesh,
        WatchKey::ChainEntries(crate::entries::Kind::Resolver),
        WatchKey::ChainEntries(crate::entries::Kind::Router),
        WatchKey::ChainEntries(crate::entries::Kind::Splitter),
        remote.clone(),
    ] {
        assert!(w.contains(&k), "{k}");
    }
    assert_eq!(w.len(), 13, "{w:?}");
    // Not transparent: a blocking watch per explicit upstream, no lists.
    let opaque = Settings {
        transparent: false,
        ..set.clone()
    };
    let w = crate::desired_watches(&s, &opaque);
    assert!(w.contains(&WatchKey::Connect(ServiceKey::local("db"))));
    assert!(w.contains(&remote));
    assert!(!w.contains(&WatchKey::Catalog) && !w.contains(&WatchKey::Checks));
    let w0 = crate::desired_watches(&State::default(), &Settings::default());
    assert_eq!(w0.len(), 9, "before the registration: the fixed set only");
}

#[test]
fn duplicate_vip_stays_with_the_first() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    s.instances
        .insert(ServiceKey::local("db"), dest("10.96.0.20"));
    let a = assemble(&s, &set).unwrap();
    assert_eq!(a.warnings.len(), 1, "{:?}", a.warnings);
    assert!(a.warnings[0].contains("10.96.0.20"));
    assert!(a.spec.upstreams[1].virtual_ips.is_empty());
    Snapshot::build(a.spec, 1).unwrap();
}

#[test]
fn consul_virtual_and_partitions() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let c = s.connect.get_mut(&ServiceKey::local("api")).unwrap();
    c[0].vips.consul_virtual = Some("240.0.0.2".parse().unwrap());
    c[0].vips.virtual_ip = Some("10.1.1.1".parse().unwrap());
    c[0].partition = "other".into();
    let spec = assemble(&s, &set).unwrap().spec;
    let v: Vec<String> = spec.upstreams[0]
        .virtual_ips
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        v,
        vec!["10.96.0.20", "240.0.0.2"],
        "`virtual` of another partition is ignored"
    );
}

#[test]
fn dialed_directly_from_service_defaults() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    s.service_defaults.as_mut().unwrap().insert(
        "db".into(),
        api::ServiceDefaults {
            dialed_directly: true,
            ..Default::default()
        },
    );
    let spec = assemble(&s, &set).unwrap().spec;
    let db = &spec.upstreams[1];
    assert!(db.dialed_directly);
    assert_eq!(db.instances, vec!["10.0.0.4".parse::<IpAddr>().unwrap()]);
}

#[test]
fn second_explicit_listener_for_one_service() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let reg = s.registration.as_mut().unwrap();
    let mut again = reg.upstreams[0].clone();
    again.bind = sa("127.0.0.1:9192");
    reg.upstreams.push(again);
    let spec = assemble(&s, &set).unwrap().spec;
    assert_eq!(spec.upstreams.len(), 3);
    assert_eq!(spec.upstreams[2].local_bind, Some(sa("127.0.0.1:9192")));
    assert!(spec.upstreams[2].virtual_ips.is_empty());
    Snapshot::build(spec, 1).unwrap();
}

#[test]
fn leaf_from_another_ca_waits() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let other = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    s.leaf = Some(api::parse_leaf("web", &leaf_json(&other, "web")).unwrap());
    let e = assemble(&s, &set).unwrap_err();
    assert_eq!(e.classify(), "incomplete");
    assert!(e.to_string().contains("chains to the current roots"), "{e}");
    s.leaf = Some(api::parse_leaf("api", &leaf_json(&ca, "api")).unwrap());
    assert!(assemble(&s, &set)
        .unwrap_err()
        .to_string()
        .contains("leaf certificate for web"));
}

#[test]
fn unchanged_update_is_the_same_spec() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let a = assemble(&s, &set).unwrap().spec;
    let b = assemble(&s, &set).unwrap().spec;
    assert!(same_spec(&a, &b));
    // Reordered instances or an unrelated intention change nothing.
    s.connect
        .get_mut(&ServiceKey::local("db"))
        .unwrap()
        .reverse();
    let mut ixns = s.intentions.take().unwrap();
    ixns.push(veer_core::intentions::Intention::new(
        veer_core::intentions::Target::new("default", "default", "x"),
        veer_core::intentions::Target::new("default", "default", "db"),
        Action::Deny,
    ));
    s.intentions = Some(ixns.clone());
    assert!(same_spec(&a, &assemble(&s, &set).unwrap().spec));
    // A deny for us does.
    ixns.push(veer_core::intentions::Intention::new(
        veer_core::intentions::Target::new("default", "default", "api"),
        veer_core::intentions::Target::new("default", "default", "*"),
        Action::Deny,
    ));
    s.intentions = Some(ixns);
    let c = assemble(&s, &set).unwrap().spec;
    assert!(!same_spec(&a, &c));
    assert!(
        describe_change(Some(&a), &c).starts_with("intentions (2 → 3"),
        "{}",
        describe_change(Some(&a), &c)
    );
    // So does a changed endpoint.
    s.connect
        .get_mut(&ServiceKey::local("db"))
        .unwrap()
        .iter_mut()
        .find(|i| i.id == "db-sidecar-proxy")
        .unwrap()
        .passing = true;
    let d = assemble(&s, &set).unwrap().spec;
    assert!(!same_spec(&c, &d));
    assert!(
        describe_change(Some(&c), &d).contains("1 changed"),
        "{}",
        describe_change(Some(&c), &d)
    );
}

#[test]
fn missing_services_are_listed_up_to_ten() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    for i in 0..15 {
        s.catalog.as_mut().unwrap().insert(format!("x{i:02}"));
    }
    let m = missing(&s, &set);
    assert_eq!(m.len(), 1, "{m:?}");
    assert!(m[0].starts_with("upstream services: "), "{m:?}");
    assert_eq!(m[0].matches(", ").count(), 10, "{m:?}");
    assert!(m[0].ends_with(" more"), "{m:?}");
}

/// Issue 15: what veer receives and does not apply is named in the spec
/// (then logged once, counted and dumped by the runtime).
#[test]
fn unapplied_settings_are_named() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    // The 1.8.7 registration, with Envoy escape hatches and an unknown key.
    let mut raw: serde_json::Value =
        serde_json::from_slice(&fixture("1.8.7-agent-service-web-sidecar.json")).unwrap();
    raw["Proxy"]["Config"] = serde_json::json!({
        "envoy_tracing_json": "{}",
        "envoy_prometheus_bind_addr": "0.0.0.0:20200",
        "protocol": "tcp",
        "bogus": 1
    });
    raw["Proxy"]["Upstreams"][0]["Config"] = serde_json::json!({"envoy_listener_json": "{}"});
    let (reg, _) =
        api::parse_registration("web-sidecar-proxy", &serde_json::to_vec(&raw).unwrap()).unwrap();
    s.registration = Some(reg);
    let spec = assemble(&s, &set).unwrap().spec;
    let named: Vec<(&str, &str)> = spec
        .unapplied
        .iter()
        .map(|u| (u.setting.as_str(), u.kind))
        .collect();
    assert_eq!(
        named,
        vec![
            ("Proxy.Config.bogus", "unsupported"),
            ("Proxy.Config.envoy_tracing_json", "unsupported"),
            (
                "Proxy.Upstreams[db].Config.envoy_listener_json",
                "unsupported"
            ),
            // The 1.8.7 fixture's service-defaults make api http: its
            // upstream is L7 (routes), not named.
        ],
        "{:#?}",
        spec.unapplied
    );
    assert!(spec.unapplied[1].detail.contains("Envoy escape hatch"));
    assert!(spec.inbound_http.is_none());
    let api = spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "api")
        .unwrap();
    assert!(api.http.is_some());
    // The registration says tcp: service-defaults cannot change that
    // (Consul's agent merges central config only where the registration
    // sets nothing), so the inbound side stays L4 and nothing is named.
    s.service_defaults.as_mut().unwrap().insert(
        "web".into(),
        api::ServiceDefaults {
            protocol: Some("http".into()),
            ..Default::default()
        },
    );
    let spec = assemble(&s, &set).unwrap().spec;
    assert!(spec.inbound_http.is_none());
    assert!(!spec.unapplied.iter().any(|u| u.setting.contains("web")));
    // No protocol in the registration (Consul 1.8 with central config
    // off): inbound stays L4, as Consul's Envoy does, and says why.
    s.registration.as_mut().unwrap().protocol = None;
    let spec = assemble(&s, &set).unwrap().spec;
    assert!(spec.inbound_http.is_none());
    assert!(
        spec.unapplied
            .iter()
            .any(|u| u.setting == "service-defaults web: Protocol = \"http\""
                && u.detail.starts_with("inbound to web stays L4")
                && u.detail.contains("enable_central_service_config")),
        "{:#?}",
        spec.unapplied
    );
}

#[test]
fn outbound_port_flag_wins() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (s, mut set) = world(&ca);
    assert_eq!(
        assemble(&s, &set).unwrap().spec.listen.outbound[0].port(),
        15001
    );
    set.outbound_port = Some(15099);
    let spec = assemble(&s, &set).unwrap().spec;
    assert_eq!(
        spec.listen.outbound,
        vec![sa("127.0.0.1:15099"), sa("[::1]:15099")]
    );
}

/// Issue 15: resolver, router and splitter entries of upstreams in use are
/// named; entries of other services (and of our own) are not; the spec is
/// held until every kind has been read.
#[test]
fn chain_entries_of_upstreams_are_named() {
    use crate::entries::{self, Kind};
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let list = |kind: Kind, json: serde_json::Value| {
        entries::parse(kind, &serde_json::to_vec(&json).unwrap()).unwrap()
    };
    s.chain_entries.set(
        Kind::Resolver,
        list(
            Kind::Resolver,
            serde_json::json!([
                {"Kind": "service-resolver", "Name": "db", "ConnectTimeout": "1s", "Failover": {"*": {"Datacenters": ["dc2"]}}},
                {"Kind": "service-resolver", "Name": "cache", "ConnectTimeout": "1s"},
                {"Kind": "service-resolver", "Name": "web", "ConnectTimeout": "1s"}
            ]),
        ),
    );
    s.chain_entries.set(
        Kind::Router,
        list(
            Kind::Router,
            serde_json::json!([{"Kind": "service-router", "Name": "api", "Routes": [{"Match": {"HTTP": {"PathPrefix": "/v2"}}}]}]),
        ),
    );
    // Resolvers, routers and splitters are applied through the discovery
    // chain: every service with one has its chain read (api for its
    // router, though it has no resolver).
    assert!(chain_keys(&s, &set).contains(&ServiceKey::local("api")));
    s.chains_read = Some(chain_keys(&s, &set));
    let spec = assemble(&s, &set).unwrap().spec;
    let named: Vec<&str> = spec
        .unapplied
        .iter()
        .map(|u| u.setting.as_str())
        .filter(|u| u.starts_with("service-r"))
        .collect();
    assert!(named.is_empty(), "{:#?}", spec.unapplied);
    // The entries module still names the router of a service whose chain
    // is not read.
    let up: Vec<_> = spec.upstreams.iter().map(|u| (**u).clone()).collect();
    let named = entries::unapplied(&s.chain_entries, &up, |_| false);
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].setting, "service-router api: Routes");
    // A kind not read yet holds the spec back, and says so.
    let mut t = s.clone();
    t.chain_entries.clear();
    t.chain_entries.set(Kind::Resolver, Vec::new());
    let m = missing(&t, &set);
    assert!(
        m.contains(&"the service-router entries".to_string()),
        "{m:?}"
    );
    assert!(
        m.contains(&"the service-splitter entries".to_string()),
        "{m:?}"
    );
    assert!(assemble(&t, &set).is_err());
    // Deleted: api's chain is no longer read.
    let mut u = s.clone();
    u.chain_entries.set(Kind::Router, Vec::new());
    assert!(!chain_keys(&u, &set).contains(&ServiceKey::local("api")));
}

fn chain_fixture(name: &str) -> Vec<u8> {
    fixture(&format!("chain/{name}"))
}

/// web (dc1) with explicit upstreams `legacy` (resolver: redirect to dc2)
/// and `api` (resolver: subset v1, failover to dc2), from the real 1.8.7
/// chain samples.
fn chain_world(ca: &veer_ca::Ca) -> (State, Settings) {
    let (mut s, mut set) = world(ca);
    set.transparent = false;
    let reg = s.registration.as_mut().unwrap();
    let mut legacy = reg.upstreams[0].clone();
    legacy.name = "legacy".into();
    legacy.bind = sa("127.0.0.1:10100");
    let mut api_up = reg.upstreams[0].clone();
    api_up.name = "api".into();
    api_up.bind = sa("127.0.0.1:10000");
    api_up.connect_timeout = None;
    reg.upstreams = vec![legacy, api_up];
    s.resolvers = Some([("legacy".to_string(), 7), ("api".to_string(), 8)].into());
    s.connect.insert(ServiceKey::local("legacy"), Vec::new());
    s.chains.insert(
        ServiceKey::local("legacy"),
        chain::compile(&chain_fixture("06a-redirect-dc2-legacy.json")).unwrap(),
    );
    s.chains.insert(
        ServiceKey::local("api"),
        chain::compile(&chain_fixture("07-failover.json")).unwrap(),
    );
    s.chains_read = Some(chain_keys(&s, &set));
    (s, set)
}

#[test]
fn chains_wait_for_their_reads_and_their_targets() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = chain_world(&ca);
    assert_eq!(
        chain_keys(&s, &set),
        [ServiceKey::local("api"), ServiceKey::local("legacy")].into()
    );
    let m = missing(&s, &set).join("; ");
    assert!(
        m.contains("chain targets: api@dc1[Service.Meta.version == v1], api@dc1[Service.Meta.version == v2], api@dc2[Service.Meta.version == v1], legacy@dc2"),
        "{m}"
    );
    // One health watch per target, with dc and filter.
    let w = crate::desired_watches(&s, &set);
    let t = TargetKey {
        service: "api".into(),
        datacenter: "dc2".into(),
        filter: Some("Service.Meta.version == v1".into()),
    };
    assert!(w.contains(&WatchKey::Target(t.clone())), "{w:?}");
    assert_eq!(
        crate::watch::path_of(&WatchKey::Target(t), ""),
        "/v1/health/connect/api?dc=dc2&filter=Service.Meta.version%20%3D%3D%20v1"
    );
    s.chains_read = None;
    let m = missing(&s, &set).join("; ");
    assert!(m.contains("the discovery chains of api, legacy"), "{m}");
}

#[test]
fn redirect_and_failover_become_targets() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = chain_world(&ca);
    let (dc2_legacy, _) = api::parse_health_connect(
        "legacy",
        &chain_fixture("17-health-connect-legacy-dc2.json"),
    )
    .unwrap();
    let (mut v1, _) = api::parse_health_connect(
        "api",
        &chain_fixture("16-health-connect-api-subset-v1.json"),
    )
    .unwrap();
    // Recorded with the sidecar not running: its TCP check is critical.
    assert!(v1[0].critical);
    v1[0].critical = false;
    v1[0].passing = true;
    let key = |svc: &str, dc: &str, f: Option<&str>| TargetKey {
        service: svc.into(),
        datacenter: dc.into(),
        filter: f.map(str::to_string),
    };
    let f = Some("Service.Meta.version == v1");
    s.targets
        .insert(key("legacy", "dc2", None), dc2_legacy.clone());
    s.targets.insert(key("api", "dc1", f), v1.clone());
    let mut dc2_api = dc2_legacy.clone();
    dc2_api[0].port = 21101;
    dc2_api[0].wan = Some(sa("127.0.0.1:21101"));
    s.targets.insert(key("api", "dc2", f), dc2_api);
    // The v2 subset (behind /v2/ and 10 % of the catch-all): none.
    s.targets.insert(
        key("api", "dc1", Some("Service.Meta.version == v2")),
        Vec::new(),
    );
    let a = assemble(&s, &set).unwrap();
    let up = |n: &str| {
        a.spec
            .upstreams
            .iter()
            .find(|u| u.identity.service == n)
            .unwrap()
    };
    // Redirect to dc2: dc2's identity and SNI, its instance at the WAN address.
    let l = up("legacy");
    assert_eq!(l.identity.datacenter, "dc2");
    assert_eq!(
        l.sni.as_deref(),
        Some("legacy.default.dc2.internal.f08cada1-f2ba-9feb-c2ae-6858ba45a30f.consul")
    );
    assert_eq!(l.endpoints, vec![sa("127.0.0.1:21102")]);
    assert!(l.failover.is_empty());
    assert_eq!(l.connect_timeout, Some(std::time::Duration::from_secs(5)));
    assert_eq!(l.local_bind, Some(sa("127.0.0.1:10100")));
    // Subset v1 in dc1, failover to v1 in dc2, 3 s from the resolver.
    let p = up("api");
    assert_eq!(p.identity.datacenter, "dc1");
    assert_eq!(p.endpoints, vec![sa("127.0.0.1:21001")]);
    assert_eq!(p.connect_timeout, Some(std::time::Duration::from_secs(3)));
    assert_eq!(p.failover.len(), 1);
    assert_eq!(p.failover[0].identity.datacenter, "dc2");
    assert_eq!(p.failover[0].endpoints, vec![sa("127.0.0.1:21101")]);
    assert_eq!(
        p.failover[0].connect_timeout,
        Some(std::time::Duration::from_secs(3))
    );
    // The L7 parts of the api chain are applied: routes and clusters
    // (the chain's own tests check them route by route), each cluster's
    // targets dialed like the upstream's.
    assert!(!a
        .spec
        .unapplied
        .iter()
        .any(|u| u.setting.contains("discovery chain")));
    let h = p.http.as_ref().expect("api is http");
    assert_eq!(h.routes.len(), 5);
    let v1_cluster = h
        .clusters
        .iter()
        .find(|c| c.name.starts_with("v1.api.default.dc1.internal."))
        .unwrap();
    assert_eq!(v1_cluster.protocol, veer_core::route::Protocol::Http);
    assert_eq!(v1_cluster.targets[0], p.primary());
    assert_eq!(v1_cluster.targets[1..], p.failover[..]);
    let legacy = h
        .clusters
        .iter()
        .find(|c| c.name.starts_with("legacy.default.dc2.internal."))
        .unwrap();
    assert_eq!(legacy.targets[0].endpoints, vec![sa("127.0.0.1:21102")]);
    // legacy is tcp (no service-defaults): L4, no routes.
    assert!(l.http.is_none());
    // dc1's v1 instance turns critical: its endpoint goes, dc2 stays.
    let mut crit = v1.clone();
    crit[0].critical = true;
    crit[0].passing = false;
    s.targets.insert(key("api", "dc1", f), crit.clone());
    let b = assemble(&s, &set).unwrap();
    let p = b
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "api")
        .unwrap();
    assert!(p.endpoints.is_empty());
    assert_eq!(p.failover[0].endpoints, vec![sa("127.0.0.1:21101")]);
    // A warning is healthy unless the subset is OnlyPassing.
    crit[0].critical = false;
    s.targets.insert(key("api", "dc1", f), crit);
    let c = assemble(&s, &set).unwrap();
    let p = c
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "api")
        .unwrap();
    assert_eq!(p.endpoints, vec![sa("127.0.0.1:21001")]);
    // The spec builds: every target has its TLS identity check.
    let snap = Snapshot::build(c.spec, 1).unwrap();
    let api_up = snap
        .routes
        .upstreams()
        .iter()
        .find(|u| u.name() == "api")
        .unwrap();
    assert!(api_up.failover[0].san_matchers[0]
        .matches(&veer_ca::service_uri(TD, "default", "dc2", "api")));
}

#[test]
fn gateway_modes_dial_the_gateways_with_the_targets_sni() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    for (file, mode_dc, want) in [
        // local: a gateway of dc1, at its LAN address
        ("10-meshgw-local.json", "dc1", "10.0.1.5:8443"),
        // remote: a gateway of dc2, at its WAN address
        (
            "08b-post-override-timeout-meshgw.json",
            "dc2",
            "192.0.2.7:9443",
        ),
    ] {
        let (mut s, set) = chain_world(&ca);
        s.chains.insert(
            ServiceKey::local("legacy"),
            chain::compile(&chain_fixture(file)).unwrap(),
        );
        assert_eq!(
            gateway_keys(&s, &set),
            [mode_dc.to_string()].into(),
            "{file}"
        );
        assert!(missing(&s, &set)
            .join(";")
            .contains(&format!("the mesh gateways of {mode_dc}")));
        let w = crate::desired_watches(&s, &set);
        assert!(w.contains(&WatchKey::Gateways(mode_dc.into())), "{file}");
        let mut gw = inst("gw", "10.0.1.5", 8443, true);
        gw.wan = Some(sa("192.0.2.7:9443"));
        s.gateways.insert(mode_dc.into(), vec![gw]);
        let (dc2_legacy, _) = api::parse_health_connect(
            "legacy",
            &chain_fixture("17-health-connect-legacy-dc2.json"),
        )
        .unwrap();
        let k = TargetKey {
            service: "legacy".into(),
            datacenter: "dc2".into(),
            filter: None,
        };
        s.targets.insert(k.clone(), dc2_legacy);
        for (dc, v) in [("dc1", "v1"), ("dc2", "v1"), ("dc1", "v2")] {
            s.targets
                .entry(TargetKey {
                    service: "api".into(),
                    datacenter: dc.into(),
                    filter: Some(format!("Service.Meta.version == {v}")),
                })
                .or_default();
        }
        let a = assemble(&s, &set).unwrap();
        let l = a
            .spec
            .upstreams
            .iter()
            .find(|u| u.identity.service == "legacy")
            .unwrap();
        assert_eq!(l.endpoints, vec![sa(want)], "{file}");
        assert_eq!(l.identity.datacenter, "dc2");
        assert!(l
            .sni
            .as_deref()
            .unwrap()
            .starts_with("legacy.default.dc2.internal."));
        // No healthy instance behind the gateway: no endpoint (Consul gives
        // gateway endpoints the backends' health).
        s.targets.insert(k.clone(), Vec::new());
        let a = assemble(&s, &set).unwrap();
        let l = a
            .spec
            .upstreams
            .iter()
            .find(|u| u.identity.service == "legacy")
            .unwrap();
        assert!(l.endpoints.is_empty(), "{file}");
    }
}

#[test]
fn transparent_upstreams_follow_their_chain_too() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    // Only services with a resolver have a chain read; the others keep
    // Consul's default chain without any read.
    s.resolvers = Some([("api".to_string(), 3), ("nope".to_string(), 4)].into());
    assert_eq!(chain_keys(&s, &set), [ServiceKey::local("api")].into());
    // chain_keys is computed from the resolvers, not the catalog; it is
    // exactly the wanted upstreams with a resolver or a datacenter.
    let by_wanted: BTreeSet<ServiceKey> = wanted(&s, &set)
        .into_keys()
        .filter(|k| s.resolvers.as_ref().unwrap().contains_key(&k.name) || k.datacenter.is_some())
        .collect();
    assert_eq!(chain_keys(&s, &set), by_wanted);
    let before = assemble(&s, &set);
    assert!(before.is_err(), "waits for the api chain");
    // api (reached by its virtual IP) redirected to dc2.
    let mut c = chain::compile(&chain_fixture("06a-redirect-dc2-legacy.json")).unwrap();
    c.service = "api".into();
    let http_targets = c.http.iter_mut().flat_map(|h| h.clusters.iter_mut());
    for t in c
        .targets
        .iter_mut()
        .chain(http_targets.flat_map(|c| c.targets.iter_mut()))
    {
        t.service = "api".into();
        t.sni = t.sni.replacen("legacy", "api", 1);
    }
    s.chains.insert(ServiceKey::local("api"), c);
    s.chains_read = Some(chain_keys(&s, &set));
    let mut remote = inst("api-dc2", "10.1.0.2", 21000, true);
    remote.wan = Some(sa("10.1.0.2:21000"));
    s.targets.insert(
        TargetKey {
            service: "api".into(),
            datacenter: "dc2".into(),
            filter: None,
        },
        vec![remote],
    );
    let a = assemble(&s, &set).unwrap();
    let api = a
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "api")
        .unwrap();
    assert_eq!(
        api.virtual_ips,
        vec!["10.96.0.20".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(api.identity.datacenter, "dc2");
    assert_eq!(api.endpoints, vec![sa("10.1.0.2:21000")]);
    let db = a
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "db")
        .unwrap();
    assert_eq!(db.identity.datacenter, "dc1");
    assert!(db.failover.is_empty() && db.sni.is_none());
}

#[test]
fn the_registrations_gateway_mode_overrides_the_entries() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = chain_world(&ca);
    // An explicit upstream in another datacenter has its chain read even
    // without a resolver (for the entries' gateway mode).
    let mut remote = s.registration.as_ref().unwrap().upstreams[0].clone();
    remote.name = "billing".into();
    remote.datacenter = Some("dc2".into());
    remote.bind = sa("127.0.0.1:10200");
    s.registration.as_mut().unwrap().upstreams.push(remote);
    assert!(chain_keys(&s, &set).contains(&ServiceKey {
        name: "billing".into(),
        datacenter: Some("dc2".into())
    }));
    s.registration.as_mut().unwrap().upstreams.pop();
    // legacy's chain says mode unset; the upstream says local.
    assert!(gateway_keys(&s, &set).is_empty());
    s.registration.as_mut().unwrap().upstreams[0].mesh_gateway = Some("local".into());
    assert_eq!(gateway_keys(&s, &set), ["dc1".to_string()].into());
    s.registration.as_mut().unwrap().mesh_gateway = Some("remote".into());
    // legacy keeps its upstream's local; api's dc2 failover target takes
    // the proxy's remote.
    assert_eq!(
        gateway_keys(&s, &set),
        ["dc1".to_string(), "dc2".to_string()].into(),
        "the upstream's wins over the proxy's"
    );
    s.registration.as_mut().unwrap().upstreams[0].mesh_gateway = None;
    assert_eq!(
        gateway_keys(&s, &set),
        ["dc2".to_string()].into(),
        "then the proxy's"
    );
}

/// Inbound L7: the registration's protocol switches the public listener
/// to HTTP; L7 intentions to this service then carry their permissions
/// into the spec; on an L4 listener they are named (enforced as deny).
#[test]
fn inbound_l7_follows_the_registration_and_carries_permissions() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let body = serde_json::json!([{
        "ID": "l7-1", "SourceName": "api", "DestinationName": "web",
        "Permissions": [
            {"Action": "allow", "HTTP": {"PathPrefix": "/public/", "Methods": ["GET"]}}
        ]
    }]);
    let (mut ixns, w) = api::parse_intentions(&serde_json::to_vec(&body).unwrap()).unwrap();
    assert!(w.is_empty(), "{w:?}");
    s.intentions.as_mut().unwrap().append(&mut ixns);
    let spec = assemble(&s, &set).unwrap().spec;
    assert!(spec.inbound_http.is_none());
    let l7 = spec
        .unapplied
        .iter()
        .find(|u| u.setting == "intention l7-1 (default/api => default/web): Permissions")
        .unwrap_or_else(|| panic!("{:#?}", spec.unapplied));
    assert!(l7.detail.contains("enforced as deny"));
    s.registration.as_mut().unwrap().protocol = Some("http".into());
    let spec = assemble(&s, &set).unwrap().spec;
    let inbound = spec.inbound_http.as_ref().expect("inbound L7");
    assert_eq!(inbound.protocol, veer_core::route::Protocol::Http);
    assert!(!spec.unapplied.iter().any(|u| u.setting.contains("l7-1")));
    let rule = spec
        .intentions
        .iter()
        .find(|i| i.id.as_deref() == Some("l7-1"))
        .unwrap();
    assert_eq!(rule.permissions.len(), 1);
    assert_eq!(rule.action, Action::Deny);
    veer_core::snapshot::Snapshot::build(spec, 1).expect("builds");
}

/// A chain the last read refused is named in the spec, with what stays
/// in force; an error for a chain no longer read is not.
#[test]
fn refused_chains_are_named_with_what_stays() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = chain_world(&ca);
    for (svc, dc, f) in [
        ("legacy", "dc2", None),
        ("api", "dc1", Some("v1")),
        ("api", "dc2", Some("v1")),
        ("api", "dc1", Some("v2")),
    ] {
        s.targets.insert(
            TargetKey {
                service: svc.into(),
                datacenter: dc.into(),
                filter: f.map(|v| format!("Service.Meta.version == {v}")),
            },
            Vec::new(),
        );
    }
    s.chain_errors.insert(
        ServiceKey::local("api"),
        "regex \"((\" does not compile".into(),
    );
    s.chain_errors
        .insert(ServiceKey::local("gone"), "whatever".into());
    let spec = assemble(&s, &set).unwrap().spec;
    let named: Vec<(&str, &str)> = spec
        .unapplied
        .iter()
        .filter(|u| u.setting.starts_with("discovery chain"))
        .map(|u| (u.setting.as_str(), u.detail.as_str()))
        .collect();
    assert_eq!(
        named,
        [(
            "discovery chain api",
            "refused: regex \"((\" does not compile; the last good chain stays in force"
        )]
    );
    s.chains.remove(&ServiceKey::local("api"));
    let spec = assemble(&s, &set).unwrap().spec;
    assert!(spec
        .unapplied
        .iter()
        .any(|u| u.detail.ends_with("Consul's default chain stays in force")));
}

/// Instance weights reach the upstream (and a chain's targets) as
/// `endpoint_weights`; a weight of 0 takes the instance out; all 1 = none.
#[test]
fn instance_weights_become_endpoint_weights() {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let (mut s, set) = world(&ca);
    let k = ServiceKey::local;
    let w = |id: &str, ip: &str, weight: u32| {
        let mut i = inst(id, ip, 21000, true);
        i.weight = weight;
        i
    };
    s.connect.insert(
        k("db"),
        vec![
            w("db-1", "10.0.0.5", 3),
            w("db-2", "10.0.0.4", 1),
            w("db-3", "10.0.0.6", 0),
        ],
    );
    let a = assemble(&s, &set).unwrap();
    let db = a
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "db")
        .unwrap();
    assert_eq!(
        db.endpoints,
        vec![sa("10.0.0.4:21000"), sa("10.0.0.5:21000")]
    );
    assert_eq!(db.endpoint_weights, vec![1, 3]);
    let api = a
        .spec
        .upstreams
        .iter()
        .find(|u| u.identity.service == "api")
        .unwrap();
    assert!(api.endpoint_weights.is_empty(), "all 1");
    // The data path uses them: 3 of every 4 new connections start at db-1.
    let snap = veer_core::snapshot::Snapshot::build(a.spec.clone(), 1).unwrap();
    let up = snap
        .routes
        .upstreams()
        .iter()
        .find(|u| u.name() == "db")
        .unwrap()
        .clone();
    let first: Vec<SocketAddr> = (0..400).map(|_| up.pick_order(0)[0].addr.0).collect();
    let heavy = first.iter().filter(|a| **a == sa("10.0.0.5:21000")).count();
    assert_eq!(heavy, 300, "weighted 3:1");
}
