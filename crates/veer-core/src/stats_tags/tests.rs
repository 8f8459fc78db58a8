use super::*;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

/// consul-dataplane's bootstrap `stats_config` (golden
/// `pkg/consuldp/testdata/TestBootstrapConfig/unix-socket-xds-server.golden`,
/// consul-dataplane HEAD 28a963a, MPL-2.0; the copy in veer-xds's fixtures).
fn dataplane_rules() -> TagRules {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../veer-xds/tests/fixtures/bootstrap/dataplane-28a963a/unix-socket-xds-server.json"
    ))
    .unwrap();
    let b: serde_json::Value = serde_json::from_str(&text).unwrap();
    TagRules::from_stats_config(&b["stats_config"]).unwrap()
}

fn web() -> ServiceId {
    ServiceId {
        trust_domain: TD.into(),
        partition: "default".into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        service: "web".into(),
    }
}

fn api(partition: &str) -> ServiceId {
    ServiceId {
        service: "api".into(),
        partition: partition.into(),
        ..web()
    }
}

fn label<'a>(t: &'a Tagged, k: &str) -> Option<&'a str> {
    t.labels
        .iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
}

fn sorted(mut l: Vec<(String, String)>) -> Vec<(String, String)> {
    l.sort();
    l
}

/// What the real Envoy 1.40 rendered at /stats/prometheus for the web
/// sidecar with consul-dataplane's bootstrap and Consul v1.16's resources
/// (tests/xds.rs topology), for cluster `api`, upstream listener `api`, the
/// public listener, the outbound listener and the RBAC filter.
#[test]
fn consul_dataplane_bootstrap_tags_as_envoy_renders_them() {
    let r = dataplane_rules();
    let c = r.tagged(&StatName::cluster(
        &api("default").sni(),
        "upstream_cx_total",
    ));
    assert_eq!(c.name, "envoy_cluster_upstream_cx_total");
    let want: Vec<(String, String)> = [
        ("local_cluster", "web"),
        ("consul_source_service", "web"),
        ("consul_source_namespace", "default"),
        ("consul_source_partition", "default"),
        ("envoy_cluster_name", "api"),
        ("consul_destination_custom_hash", ""),
        ("consul_destination_service_subset", ""),
        ("consul_destination_service", "api"),
        ("consul_destination_namespace", "default"),
        ("consul_destination_partition", ""),
        ("consul_destination_datacenter", "dc1"),
        ("consul_destination_routing_type", "internal"),
        (
            "consul_destination_trust_domain",
            "11111111-2222-3333-4444-555555555555",
        ),
        ("consul_destination_target", "api.default.dc1"),
        (
            "consul_destination_full_target",
            "api.default.dc1.internal.11111111-2222-3333-4444-555555555555",
        ),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(sorted(c.labels.clone()), sorted(want));

    let l = r.tagged(&StatName::cluster("local_app", "upstream_cx_connect_fail"));
    assert_eq!(l.name, "envoy_cluster_upstream_cx_connect_fail");
    assert_eq!(label(&l, "envoy_cluster_name"), Some("local_app"));
    assert_eq!(label(&l, "consul_destination_service"), None);

    let u = r.tagged(&StatName::tcp(
        &upstream_tcp_prefix(&api("default")),
        "downstream_cx_rx_bytes_total",
    ));
    assert_eq!(u.name, "envoy_tcp_downstream_cx_rx_bytes_total");
    assert_eq!(label(&u, "envoy_tcp_prefix"), Some("upstream"));
    assert_eq!(label(&u, "consul_upstream_service"), Some("api"));
    assert_eq!(label(&u, "consul_upstream_datacenter"), Some("dc1"));
    assert_eq!(label(&u, "consul_upstream_namespace"), Some("default"));
    assert_eq!(label(&u, "consul_upstream_partition"), Some("default"));
    assert_eq!(u.labels.len(), 9, "{:?}", u.labels);

    let p = r.tagged(&StatName::tcp("public_listener", "downstream_cx_total"));
    assert_eq!(p.name, "envoy_tcp_downstream_cx_total");
    assert_eq!(label(&p, "envoy_tcp_prefix"), Some("public_listener"));
    assert_eq!(p.labels.len(), 5);

    let li = r.tagged(&StatName::listener(
        "127.0.0.1:15001".parse().unwrap(),
        "downstream_cx_active",
    ));
    assert_eq!(li.name, "envoy_listener_downstream_cx_active");
    assert_eq!(
        label(&li, "envoy_listener_address"),
        Some("127.0.0.1_15001")
    );

    let rb = r.tagged(&StatName::rbac("connect_authz", "denied"));
    assert_eq!(rb.name, "envoy_rbac_denied");
    assert_eq!(label(&rb, "envoy_rbac_prefix"), Some("connect_authz"));

    let s = r.tagged(&StatName::server("live"));
    assert_eq!(s.name, "envoy_server_live");
    assert_eq!(s.labels.len(), 4);
}

/// The TOML and agent sources get Consul's tags without regular
/// expressions: the same labels as the bootstrap's regexes extract, for
/// every kind of name veer produces.
#[test]
fn built_in_consul_tags_equal_the_bootstraps_regexes() {
    let regexes = dataplane_rules();
    let built_in = TagRules::consul(&web());
    let no_fixed = |t: Tagged| Tagged {
        name: t.name,
        labels: sorted(
            t.labels
                .into_iter()
                .filter(|(k, _)| !k.starts_with("consul_source") && k != "local_cluster")
                .collect(),
        ),
    };
    let names = [
        StatName::cluster(&api("default").sni(), "upstream_cx_total"),
        StatName::cluster(&api("ap1").sni(), "upstream_cx_connect_ms"),
        StatName::cluster("local_app", "upstream_cx_total"),
        StatName::cluster("original-destination", "upstream_cx_total"),
        StatName::tcp(&upstream_tcp_prefix(&api("default")), "downstream_cx_total"),
        StatName::tcp(&upstream_tcp_prefix(&api("ap1")), "downstream_cx_total"),
        StatName::tcp("public_listener", "downstream_cx_total"),
        StatName::listener("0.0.0.0:20000".parse().unwrap(), "downstream_cx_total"),
        StatName::listener("[::1]:15001".parse().unwrap(), "downstream_cx_total"),
        StatName::rbac("connect_authz", "allowed"),
        StatName::server("uptime"),
    ];
    for n in &names {
        let a = no_fixed(regexes.tagged(n));
        let b = no_fixed(built_in.tagged(n));
        assert_eq!(a, b, "{}", n.text());
    }
    // The fixed tags: the local service, with the datacenter that
    // `consul connect envoy` adds.
    let s = built_in.tagged(&StatName::server("live"));
    assert_eq!(label(&s, "local_cluster"), Some("web"));
    assert_eq!(label(&s, "consul_source_service"), Some("web"));
    assert_eq!(label(&s, "consul_source_datacenter"), Some("dc1"));
}

/// Without Consul's tags, Envoy's defaults take only the first token of a
/// dotted cluster name or stat prefix; the rest stays in the metric name.
/// (The real Envoy 1.40, a static cluster `api.default.dc1.internal.x.consul`
/// and a TCP proxy with stat prefix `upstream.api.default.default.dc1`,
/// renders `envoy_cluster_default_dc1_internal_x_consul_upstream_cx_total{envoy_cluster_name="api"}`
/// and `envoy_tcp_api_default_default_dc1_downstream_cx_total{envoy_tcp_prefix="upstream"}`.)
#[test]
fn without_consul_tags_only_envoys_defaults() {
    let r = TagRules::default();
    let c = r.tagged(&StatName::cluster(
        "api.default.dc1.internal.x.consul",
        "upstream_cx_total",
    ));
    assert_eq!(
        c.name,
        "envoy_cluster_default_dc1_internal_x_consul_upstream_cx_total"
    );
    let t = r.tagged(&StatName::tcp(
        "upstream.api.default.default.dc1",
        "downstream_cx_total",
    ));
    assert_eq!(
        t.name,
        "envoy_tcp_api_default_default_dc1_downstream_cx_total"
    );
    assert_eq!(
        t.labels,
        vec![("envoy_tcp_prefix".to_string(), "upstream".to_string())]
    );
    assert_eq!(
        c.labels,
        vec![("envoy_cluster_name".to_string(), "api".to_string())]
    );
}

#[test]
fn a_custom_rule_overrides_the_default_tag_and_bad_ones_name_their_index() {
    let v = serde_json::json!({"stats_tags": [
        {"tag_name": "envoy.cluster_name", "regex": "^cluster\\.((.+?)\\.consul\\.)"},
        {"tag_name": "team", "fixed_value": "blue"},
    ]});
    let r = TagRules::from_stats_config(&v).unwrap();
    let c = r.tagged(&StatName::cluster("a.b.consul", "upstream_cx_total"));
    assert_eq!(c.name, "envoy_cluster_upstream_cx_total");
    assert_eq!(label(&c, "envoy_cluster_name"), Some("a.b"));
    assert_eq!(label(&c, "team"), Some("blue"));
    assert_eq!(c.labels.len(), 2);

    let bad = serde_json::json!({"stats_tags": [
        {"tag_name": "x", "fixed_value": "1"},
        {"tag_name": "y", "regex": "(unclosed"},
    ]});
    let e = TagRules::from_stats_config(&bad).unwrap_err();
    assert_eq!(e.index, 1);
    assert!(e.to_string().contains("stats_tags[1]"), "{e}");
    let both =
        serde_json::json!({"stats_tags": [{"tag_name": "x", "fixed_value": "1", "regex": "a"}]});
    assert!(TagRules::from_stats_config(&both).is_err());
}
