//! Parser tests. `1.8.7-*` fixtures are real answers of a Consul 1.8.7 dev
//! agent (recorded 2026-11-26, see `tests/fixtures/README.md`); answers of
//! newer versions are written out below with their source.
use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn registration_1_8_7_plain_sidecar() {
    let (r, w) = parse_registration(
        "web-sidecar-proxy",
        &fixture("1.8.7-agent-service-web-sidecar.json"),
    )
    .unwrap();
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(r.id, "web-sidecar-proxy");
    assert_eq!(r.service, "web-sidecar-proxy");
    assert_eq!(r.destination_service, "web");
    assert_eq!(r.destination_service_id, "web");
    assert_eq!(
        (r.namespace.as_str(), r.partition.as_str()),
        ("default", "default")
    );
    assert_eq!(r.bind, sa("0.0.0.0:21000"), "empty Address binds 0.0.0.0");
    assert_eq!(r.local_app, sa("127.0.0.1:8080"));
    assert_eq!(r.mode, Mode::Unset, "1.8.7 has no Mode");
    assert_eq!(r.outbound_port, None);
    assert_eq!(
        r.upstreams,
        vec![ExplicitUpstream {
            name: "db".into(),
            namespace: "default".into(),
            partition: "default".into(),
            datacenter: None,
            bind: sa("127.0.0.1:9191"),
            connect_timeout: None,
            protocol: None,
            mesh_gateway: None,
        }]
    );
    assert!(r.expose.is_empty());
}

#[test]
fn registration_1_8_7_with_config_upstreams_and_expose() {
    let (r, w) = parse_registration(
        "billing-1-sidecar-proxy",
        &fixture("1.8.7-agent-service-billing-sidecar.json"),
    )
    .unwrap();
    assert_eq!(
        r.bind,
        sa("10.0.0.7:20000"),
        "bind_address/bind_port win over Address/Port"
    );
    assert_eq!(r.local_app, sa("127.0.0.2:9090"));
    assert_eq!(r.local_connect_timeout, Some(Duration::from_millis(2500)));
    assert_eq!(
        r.handshake_timeout,
        Some(Duration::from_millis(7000)),
        "string numbers are accepted"
    );
    assert_eq!(r.protocol.as_deref(), Some("http"));
    assert_eq!(r.upstreams.len(), 2);
    assert_eq!(r.upstreams[0].name, "db");
    assert_eq!(
        r.upstreams[0].connect_timeout,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(r.upstreams[1].name, "ledger");
    assert_eq!(r.upstreams[1].datacenter.as_deref(), Some("dc2"));
    assert_eq!(r.upstreams[1].bind, sa("127.0.0.9:9292"));
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("prepared_query"), "{w:?}");
    assert!(
        w[1].contains("nobind") && w[1].contains("LocalBindPort"),
        "{w:?}"
    );
    assert_eq!(r.expose.len(), 2);
    assert_eq!(r.expose[0].listener, sa("10.0.0.7:21500"));
    assert_eq!(r.expose[0].path, "/healthz");
    assert_eq!(r.expose[0].local_path_port, 9090);
    assert_eq!(r.expose[0].protocol, Protocol::Http);
    assert_eq!(r.expose[1].protocol, Protocol::Http2);
}

/// The sample response of "Get Service Configuration" in Consul's API docs
/// (website/content/api-docs/agent/service.mdx, Consul 1.10+ era), with
/// `DialedDirectly` added as `api.TransparentProxyConfig` defines it.
#[test]
fn registration_newer_with_mode_and_transparent_proxy() {
    let body = br#"{
      "Kind": "connect-proxy", "ID": "web-sidecar-proxy", "Service": "web-sidecar-proxy",
      "Tags": null, "Meta": null, "Namespace": "default", "Port": 18080, "Address": "",
      "TaggedAddresses": {"lan": {"address": "127.0.0.1", "port": 8000},
                          "wan": {"address": "198.51.100.53", "port": 80}},
      "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": false,
      "Datacenter": "dc1", "ContentHash": "4ecd29c7bc647ca8",
      "Proxy": {
        "DestinationServiceName": "web", "DestinationServiceID": "web",
        "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
        "Mode": "transparent",
        "TransparentProxy": {"OutboundListenerPort": 22500, "DialedDirectly": true},
        "Config": {"foo": "bar"},
        "Upstreams": [{"DestinationType": "service", "DestinationName": "db", "LocalBindPort": 9191}]
      }
    }"#;
    let (r, w) = parse_registration("web-sidecar-proxy", body).unwrap();
    assert!(w.is_empty());
    assert_eq!(r.mode, Mode::Transparent);
    assert_eq!(r.outbound_port, Some(22500));
    assert_eq!(r.bind, sa("0.0.0.0:18080"));
    assert_eq!(r.upstreams.len(), 1);
}

#[test]
fn registration_refusals() {
    let e = parse_registration("web", &fixture("1.8.7-agent-service-web.json")).unwrap_err();
    assert_eq!(e.classify(), "not_a_proxy", "{e}");
    let e = parse_registration(
        "x",
        b"{\"Kind\":\"connect-proxy\",\"Port\":1,\"Proxy\":{\"DestinationServiceName\":\"a\"}}",
    )
    .unwrap_err();
    assert!(e.to_string().contains("LocalServicePort"), "{e}");
    let e = parse_registration(
        "x",
        br#"{"Kind":"connect-proxy","Port":1,"Address":"my-host","Proxy":{"DestinationServiceName":"a","LocalServicePort":2}}"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not an IP"), "{e}");
    assert_eq!(
        parse_registration("x", b"not json").unwrap_err().classify(),
        "decode"
    );
}

#[test]
fn sidecar_lookup() {
    let b = fixture("1.8.7-agent-services.json");
    assert_eq!(sidecars_for("web", &b).unwrap(), vec!["web-sidecar-proxy"]);
    assert_eq!(
        sidecars_for("billing-1", &b).unwrap(),
        vec!["billing-1-sidecar-proxy"]
    );
    assert!(sidecars_for("nope", &b).unwrap().is_empty());
    assert!(sidecars_for("web-sidecar-proxy", &b).unwrap().is_empty());
}

#[test]
fn roots_after_rotation() {
    let r = parse_roots(&fixture("1.8.7-ca-roots-rotated.json")).unwrap();
    assert!(r.trust_domain.ends_with(".consul"));
    assert_eq!(r.certs.len(), 2, "old root still trusted after rotation");
    assert_eq!(r.ids[0], r.active_id, "active root first");
    for c in &r.certs {
        let info = veer_core::tls::CertInfo::parse(c).unwrap();
        assert!(info.is_ca);
        assert_eq!(info.uri_sans, vec![format!("spiffe://{}", r.trust_domain)]);
    }
    assert_eq!(
        parse_roots(b"{\"Roots\":[]}").unwrap_err().classify(),
        "decode"
    );
}

#[test]
fn intentions_list_and_match_agree() {
    let (all, w) = parse_intentions(&fixture("1.8.7-intentions.json")).unwrap();
    assert!(w.is_empty());
    assert_eq!(all.len(), 2);
    let (m, _) =
        parse_intentions_match("web", &fixture("1.8.7-intentions-match-web.json")).unwrap();
    let web = veer_core::spiffe::ServiceId::new("td.consul", "default", "default", "dc1", "web");
    let a = veer_core::intentions::Intentions::new(&web, all, Action::Allow);
    let b = veer_core::intentions::Intentions::new(&web, m, Action::Allow);
    assert_eq!(a, b, "local filtering of the list = the match endpoint");
    let api = veer_core::spiffe::ServiceId::new("td.consul", "default", "default", "dc1", "api");
    let other =
        veer_core::spiffe::ServiceId::new("td.consul", "default", "default", "dc1", "other");
    assert!(a.evaluate(&api).allowed());
    assert!(!a.evaluate(&other).allowed(), "the * deny matches");
    assert_eq!(
        a.rules()[0].id.as_deref(),
        Some("0bf6e3e8-7434-e335-4b1b-4ed2ae7757c0")
    );
}

/// An L7 intention as the legacy list API of Consul 1.9+ shows it (no
/// `Action`, `Permissions` set; website/content/api-docs/connect/intentions.mdx),
/// and a peered source (1.13+, `SourcePeer`).
#[test]
fn intentions_newer_shapes() {
    let body = br#"[
      {"ID": "", "SourceNS": "default", "SourceName": "web", "DestinationNS": "default",
       "DestinationName": "api", "SourceType": "consul",
       "Permissions": [{"Action": "allow", "HTTP": {"PathPrefix": "/v1"}}],
       "Precedence": 9},
      {"SourceName": "web", "SourcePeer": "cluster-02", "DestinationName": "api", "Action": "allow"},
      {"SourceName": "*", "DestinationName": "api", "Action": "allow", "SourcePartition": "ap1",
       "DestinationPartition": "ap1"}
    ]"#;
    let (i, w) = parse_intentions(body).unwrap();
    assert_eq!(i.len(), 2, "peered source skipped");
    assert_eq!(i[0].action, Action::Deny, "L7 counts as deny at L4");
    assert_eq!(i[0].id, None);
    // Its permissions are kept for the L7 inbound listener.
    assert_eq!(i[0].permissions.len(), 1);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(i[1].source.partition, "ap1");
    assert_eq!(i[1].destination.partition, "ap1");
}

#[test]
fn default_decision_answers() {
    assert_eq!(
        parse_authorize(&fixture("1.8.7-authorize-default-acls-off.json")).unwrap(),
        DefaultProbe::Default(Action::Allow)
    );
    assert!(matches!(
        parse_authorize(&fixture("1.8.7-authorize-matched.json")).unwrap(),
        DefaultProbe::Inconclusive(r) if r.starts_with("Matched intention")
    ));
    // Consul 1.8.7 with acl { enabled = true, default_policy = "deny" } (observed).
    assert_eq!(
        parse_authorize(
            br#"{"Authorized": false, "Reason": "Default behavior configured by ACLs"}"#
        )
        .unwrap(),
        DefaultProbe::Default(Action::Deny)
    );
    // Consul 1.9+ wording for a matched L4 intention.
    assert!(matches!(
        parse_authorize(br#"{"Authorized": true, "Reason": "Matched L4 intention: ..."}"#).unwrap(),
        DefaultProbe::Inconclusive(_)
    ));
    assert_eq!(
        default_from_agent_self(&fixture("1.8.7-agent-self-excerpt.json")).unwrap(),
        Some(Action::Allow)
    );
    assert_eq!(
        default_from_agent_self(
            br#"{"DebugConfig":{"ACLsEnabled":true,"ACLDefaultPolicy":"deny"}}"#
        )
        .unwrap(),
        Some(Action::Deny)
    );
    assert_eq!(
        default_from_agent_self(br#"{"DebugConfig":{"ACLsEnabled":true,"ACLResolverSettings":{"ACLDefaultPolicy":"allow"}}}"#)
            .unwrap(),
        Some(Action::Allow)
    );
    assert_eq!(default_from_agent_self(br#"{"Config":{}}"#).unwrap(), None);
}

#[test]
fn health_connect_1_8_7() {
    let (c, w) = parse_health_connect("db", &fixture("1.8.7-health-connect-db.json")).unwrap();
    assert!(w.is_empty());
    assert_eq!(c.len(), 2);
    let by_id: HashMap<&str, &ConnectInstance> = c.iter().map(|i| (i.id.as_str(), i)).collect();
    let failing = by_id["db-sidecar-proxy"];
    assert!(!failing.passing, "its TCP check is critical");
    assert_eq!(
        failing.endpoint(),
        Some(sa("127.0.0.1:21002")),
        "empty Service.Address falls back to Node.Address"
    );
    assert_eq!(failing.datacenter, "dc1");
    assert_eq!(
        failing.vips,
        Vips::default(),
        "1.8.7 sidecars do not inherit `virtual`"
    );
    let ok = by_id["db2-sidecar-proxy"];
    assert!(ok.passing);
    assert_eq!(ok.endpoint(), Some(sa("127.0.0.1:21005")));
}

/// A sidecar instance carrying `consul-virtual` (Consul 1.11+; the tagged
/// address shape as in Consul's agent/txn_endpoint_test.go) and `virtual`
/// (consul-k8s), in a health entry shaped like the sample of
/// website/content/api-docs/health.mdx.
#[test]
fn health_connect_newer_vips() {
    let body = br#"[{
      "Node": {"ID": "40e4a748", "Node": "node-1", "Address": "192.168.10.10", "Datacenter": "dc1",
               "Partition": "default", "TaggedAddresses": {"lan": "192.168.10.10"}},
      "Service": {"Kind": "connect-proxy", "ID": "db-1-sidecar-proxy", "Service": "db-sidecar-proxy",
                  "Address": "10.244.0.7", "Port": 20000,
                  "TaggedAddresses": {"consul-virtual": {"Address": "240.0.0.3", "Port": 20000},
                                      "virtual": {"Address": "10.96.0.30", "Port": 5432}},
                  "Proxy": {"DestinationServiceName": "db", "Mode": "transparent",
                            "TransparentProxy": {"DialedDirectly": true}}},
      "Checks": [{"Status": "passing"}, {"Status": "passing"}]
    }]"#;
    let (c, _) = parse_health_connect("db", body).unwrap();
    assert_eq!(c[0].vips.consul_virtual, Some("240.0.0.3".parse().unwrap()));
    assert_eq!(c[0].vips.virtual_ip, Some("10.96.0.30".parse().unwrap()));
    assert!(c[0].dialed_directly);
    assert_eq!(c[0].endpoint(), Some(sa("10.244.0.7:20000")));
}

#[test]
fn catalog_1_8_7() {
    let names = parse_catalog_services(&fixture("1.8.7-catalog-services.json")).unwrap();
    assert!(
        names.contains("consul") && names.contains("db") && names.contains("web-sidecar-proxy")
    );
    let db = parse_catalog_service("db", &fixture("1.8.7-catalog-service-db.json")).unwrap();
    assert!(!db.is_empty());
    assert!(db
        .iter()
        .all(|i| i.vips.virtual_ip == Some("10.96.0.30".parse().unwrap())));
}

#[test]
fn config_entries() {
    let sd = parse_service_defaults(&fixture("1.8.7-config-service-defaults.json")).unwrap();
    assert_eq!(sd["api"].protocol.as_deref(), Some("http"));
    assert!(!sd["api"].dialed_directly);
    // service-defaults with TransparentProxy (1.10+), as in the
    // service-defaults configuration reference (docs, v1.16.x).
    let sd = parse_service_defaults(
        br#"[{"Kind":"service-defaults","Name":"db","Protocol":"tcp","Mode":"transparent",
              "TransparentProxy":{"OutboundListenerPort":15002,"DialedDirectly":true}}]"#,
    )
    .unwrap();
    assert_eq!(
        sd["db"],
        ServiceDefaults {
            protocol: Some("tcp".into()),
            mode: Some(Mode::Transparent),
            outbound_port: Some(15002),
            dialed_directly: true
        }
    );
    let pd = parse_proxy_defaults(b"[]").unwrap();
    assert_eq!(pd, ProxyDefaults::default());
    let pd = parse_proxy_defaults(
        br#"[{"Kind":"proxy-defaults","Name":"global","Config":{"protocol":"http"},"Mode":"transparent"}]"#,
    )
    .unwrap();
    assert_eq!(pd.protocol.as_deref(), Some("http"));
    assert_eq!(pd.mode, Some(Mode::Transparent));
}

#[test]
fn mesh_entry() {
    // Consul 1.8.7: HTTP 500 "invalid config entry kind: mesh" (recorded).
    let raw = fixture("1.8.7-config-mesh.http");
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 500"));
    assert_eq!(parse_mesh(500, body.as_bytes()).unwrap(), Mesh::Unsupported);
    assert_eq!(
        parse_mesh(404, b"Config entry not found for \"mesh\" / \"mesh\"").unwrap(),
        Mesh::Absent
    );
    // The mesh configuration entry reference (Consul 1.10+ docs).
    let m = parse_mesh(
        200,
        br#"{"Kind":"mesh","TransparentProxy":{"MeshDestinationsOnly":true}}"#,
    )
    .unwrap();
    assert!(m.mesh_destinations_only());
    assert!(!parse_mesh(200, br#"{"Kind":"mesh"}"#)
        .unwrap()
        .mesh_destinations_only());
    assert_eq!(
        parse_mesh(403, b"Permission denied")
            .unwrap_err()
            .classify(),
        "permission_denied"
    );
    assert_eq!(parse_mesh(502, b"x").unwrap_err().classify(), "http_5xx");
}

#[test]
fn weak_numbers() {
    assert_eq!(weak_u64(Some(&serde_json::json!(5))).unwrap(), Some(5));
    assert_eq!(weak_u64(Some(&serde_json::json!(5.0))).unwrap(), Some(5));
    assert_eq!(weak_u64(Some(&serde_json::json!(" 7 "))).unwrap(), Some(7));
    assert_eq!(weak_u64(Some(&serde_json::json!(""))).unwrap(), None);
    assert!(weak_u64(Some(&serde_json::json!(-1))).is_err());
    assert!(weak_port(Some(&serde_json::json!(70000))).is_err());
    assert_eq!(weak_port(Some(&serde_json::json!(0))).unwrap(), None);
}

#[test]
fn registration_prometheus_bind_from_proxy_config() {
    let with = |v: &str| {
        let mut j: Value =
            serde_json::from_slice(&fixture("1.8.7-agent-service-web-sidecar.json")).unwrap();
        j["Proxy"]["Config"] = serde_json::json!({ "envoy_prometheus_bind_addr": v });
        parse_registration("web-sidecar-proxy", &serde_json::to_vec(&j).unwrap()).unwrap()
    };
    let (r, w) = with("0.0.0.0:20200");
    assert_eq!(r.prometheus_bind, Some(sa("0.0.0.0:20200")));
    assert!(w.is_empty(), "{w:?}");
    // A bad address is a warning, not a refused registration.
    let (r, w) = with("somewhere:20200");
    assert_eq!(r.prometheus_bind, None);
    assert!(
        w.iter().any(|w| w.contains("envoy_prometheus_bind_addr")),
        "{w:?}"
    );
    let (r, _) = parse_registration(
        "web-sidecar-proxy",
        &fixture("1.8.7-agent-service-web-sidecar.json"),
    )
    .unwrap();
    assert_eq!(r.prometheus_bind, None);
}

/// `Service.Weights` (the 1.8.7 fixture's shape, `{"Passing": 1,
/// "Warning": 1}` there) as Consul gives them to Envoy: Passing, Warning
/// while a check warns, clamped to 128, below 1 = not used (0).
#[test]
fn health_connect_weights() {
    let mut body: Vec<serde_json::Value> =
        serde_json::from_slice(&fixture("1.8.7-health-connect-db.json")).unwrap();
    let base = body[1].clone();
    let entry = |id: &str, w: serde_json::Value, checks: &[&str]| {
        let mut e = base.clone();
        e["Service"]["ID"] = id.into();
        e["Service"]["Weights"] = w;
        e["Checks"] = checks
            .iter()
            .map(|s| serde_json::json!({"Status": s}))
            .collect();
        e
    };
    use serde_json::json;
    body = vec![
        entry(
            "a-fixture",
            base["Service"]["Weights"].clone(),
            &["passing"],
        ),
        entry(
            "b-passing",
            json!({"Passing": 10, "Warning": 1}),
            &["passing"],
        ),
        entry(
            "c-warning",
            json!({"Passing": 10, "Warning": 3}),
            &["passing", "warning"],
        ),
        entry(
            "d-clamped",
            json!({"Passing": 1000, "Warning": 1}),
            &["passing"],
        ),
        entry("e-zero", json!({"Passing": 5, "Warning": 0}), &["warning"]),
        entry("f-none", serde_json::Value::Null, &["passing"]),
    ];
    let (c, _) = parse_health_connect("db", &serde_json::to_vec(&body).unwrap()).unwrap();
    let w: Vec<(&str, u32)> = c.iter().map(|i| (i.id.as_str(), i.weight)).collect();
    assert_eq!(
        w,
        vec![
            ("a-fixture", 1),
            ("b-passing", 10),
            ("c-warning", 3),
            ("d-clamped", 128),
            ("e-zero", 0),
            ("f-none", 1),
        ]
    );
}

/// Mesh gateways found by kind, whatever their name, from the nodes the
/// real 1.8.7 agent gives for `Services.Kind contains "mesh-gateway"`.
#[test]
fn gateway_nodes_1_8_7() {
    let (g, w) = parse_gateway_nodes(
        "dc1",
        &fixture("1.8.7-internal-ui-nodes-mesh-gateways.json"),
    )
    .unwrap();
    assert!(w.is_empty(), "{w:?}");
    let by_id: HashMap<&str, &ConnectInstance> = g.iter().map(|i| (i.id.as_str(), i)).collect();
    let mut ids: Vec<&str> = by_id.keys().copied().collect();
    ids.sort();
    assert_eq!(
        ids,
        vec!["gw-east", "gw-west-1", "mesh-gateway"],
        "by kind: not the plain service tagged mesh-gateway, not consul"
    );
    let east = by_id["gw-east"];
    assert!(
        east.passing && !east.critical,
        "only the node's serfHealth, passing"
    );
    assert_eq!(east.endpoint(), Some(sa("10.1.2.3:8443")));
    assert_eq!(east.wan, Some(sa("198.18.0.1:443")));
    assert_eq!(
        east.datacenter, "dc1",
        "from the watch: the node dump has none"
    );
    let west = by_id["gw-west-1"];
    assert!(
        west.critical && !west.passing,
        "its own TTL check is critical"
    );
    assert_eq!(west.weight, 3);
    assert_eq!(west.service, "gw-west");
}
