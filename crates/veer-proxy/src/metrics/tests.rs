use super::*;

#[test]
fn labelled_counters_render_with_help_and_escaping() {
    let m = Metrics::default();
    m.count("intention_denials_total", "reason", "denied_by_default");
    m.count("intention_denials_total", "reason", "denied_by_default");
    m.endpoint_failure("api", "timeout");
    m.endpoint_failure("we\"ird", "refused");
    m.count("outbound_failures_total", "reason", "timeout");
    m.count("local_app_connect_failures_total", "reason", "refused");
    m.count("something_new_total", "reason", "x");
    let out = m.render(&[("open_fds", "Open fds.", 7.0)]);
    assert!(out.contains("veer_intention_denials_total{reason=\"denied_by_default\"} 2\n"));
    assert!(out.contains(
        "veer_upstream_endpoint_failures_total{upstream=\"api\",reason=\"timeout\"} 1\n"
    ));
    assert!(out.contains("upstream=\"we\\\"ird\""), "{out}");
    assert!(out.contains("veer_connect_timeouts_total{direction=\"outbound\"} 2\n"));
    assert!(out.contains("veer_connect_timeouts_total{direction=\"inbound\"} 0\n"));
    assert!(out.contains("# HELP veer_inbound_handshake_failures_total "));
    assert!(out.contains(
        "# TYPE veer_something_new_total counter\nveer_something_new_total{reason=\"x\"} 1\n"
    ));
    assert!(out.contains("# TYPE veer_open_fds gauge\nveer_open_fds 7\n"));
    assert_eq!(m.get("upstream_endpoint_failures_total", "api"), 1);
    assert_eq!(m.connect_timeouts(Direction::Outbound), 2);
    // Every sample line belongs to a family declared just before it.
    let mut families = std::collections::HashSet::new();
    for l in out.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            assert!(
                families.insert(rest.split(' ').next().unwrap().to_string()),
                "{l}"
            );
        } else if !l.starts_with('#') {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
                .unwrap_or(name);
            assert!(families.contains(family), "{name} has no TYPE line");
        }
    }
}

#[test]
fn active_counts_both_directions() {
    let m = Metrics::default();
    m.opened(Direction::Inbound);
    m.opened(Direction::Outbound);
    m.opened(Direction::Outbound);
    m.closed(Direction::Outbound);
    assert_eq!(m.active(), 2);
}

#[test]
fn process_fds_are_read() {
    assert!(open_fds().unwrap() >= 3);
    assert!(max_fds().unwrap() >= 64);
}

/// The `envoy_*` families as the real Envoy 1.40 renders them with
/// consul-dataplane's bootstrap: counters keep Envoy's names (with or
/// without `_total`) and are typed `counter`, gauges `gauge`, the `_ms`
/// histograms have Envoy's buckets; series exist only for what was used.
#[test]
fn envoy_families_have_envoys_names_types_and_buckets() {
    use veer_core::route::Upstream;
    use veer_core::spiffe::ServiceId;
    let m = Metrics::default();
    let id = |svc: &str| ServiceId {
        trust_domain: "11111111-2222-3333-4444-555555555555.consul".into(),
        partition: "default".into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        service: svc.into(),
    };
    m.envoy
        .set_rules(veer_core::stats_tags::TagRules::consul(&id("web")));
    let api = Upstream::new(id("api"), Duration::from_secs(1));
    let idle = Upstream::new(id("idle"), Duration::from_secs(1));
    let s = m.envoy.upstream(&api).unwrap();
    // The handles are made once and kept in the upstream.
    assert!(std::ptr::eq(s, m.envoy.upstream(&api).unwrap()));
    s.cluster.attempt();
    s.cluster.connect_ms.observe(3.0);
    s.cluster.attempt();
    s.cluster.failed(true);
    s.tcp.cx_total.fetch_add(1, Relaxed);
    let (rx, tx) = s.tcp.bytes();
    rx.fetch_add(10, Relaxed);
    tx.fetch_add(7, Relaxed);
    let i = m.envoy.inbound();
    i.rbac.denied.fetch_add(1, Relaxed);
    let l = m.envoy.listener("127.0.0.1:15001".parse().unwrap());
    l.cx_total.fetch_add(1, Relaxed);
    m.envoy.live.store(1, Relaxed);
    let out = m.render(&[]);
    let sel = "envoy_cluster_name=\"api\"";
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(sel))
            .unwrap_or_else(|| panic!("no {name} for api in\n{out}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(line("envoy_cluster_upstream_cx_total"), "2");
    assert_eq!(line("envoy_cluster_upstream_cx_active"), "1");
    assert_eq!(line("envoy_cluster_upstream_cx_connect_fail"), "1");
    assert_eq!(line("envoy_cluster_upstream_cx_connect_timeout"), "1");
    assert_eq!(line("envoy_cluster_upstream_cx_tx_bytes_total"), "10");
    assert_eq!(line("envoy_cluster_upstream_cx_rx_bytes_total"), "7");
    assert_eq!(line("envoy_cluster_upstream_cx_connect_ms_count"), "1");
    for (family, ty) in [
        ("envoy_cluster_upstream_cx_total", "counter"),
        ("envoy_cluster_upstream_cx_connect_fail", "counter"),
        ("envoy_cluster_upstream_cx_connect_timeout", "counter"),
        ("envoy_cluster_upstream_cx_rx_bytes_total", "counter"),
        ("envoy_cluster_upstream_cx_active", "gauge"),
        ("envoy_cluster_membership_healthy", "gauge"),
        ("envoy_cluster_membership_total", "gauge"),
        ("envoy_cluster_upstream_cx_connect_ms", "histogram"),
        ("envoy_cluster_upstream_cx_length_ms", "histogram"),
        ("envoy_tcp_downstream_cx_total", "counter"),
        ("envoy_tcp_downstream_cx_no_route", "counter"),
        ("envoy_tcp_downstream_cx_rx_bytes_total", "counter"),
        ("envoy_tcp_downstream_cx_tx_bytes_total", "counter"),
        ("envoy_listener_downstream_cx_total", "counter"),
        ("envoy_listener_downstream_cx_active", "gauge"),
        ("envoy_listener_downstream_cx_length_ms", "histogram"),
        ("envoy_rbac_allowed", "counter"),
        ("envoy_rbac_denied", "counter"),
        ("envoy_server_live", "gauge"),
        ("envoy_server_uptime", "gauge"),
    ] {
        assert!(
            out.contains(&format!("\n# TYPE {family} {ty}\n")),
            "{family} {ty} in\n{out}"
        );
    }
    assert!(!out.contains("untyped"), "{out}");
    // Envoy's bucket bounds (prometheus-client prints the two largest the
    // way Go's client does, `1.8e+06`, where Envoy prints `1800000`: the
    // same number to Prometheus, which parses `le`).
    let les: Vec<f64> = out
        .lines()
        .filter(|l| {
            l.starts_with("envoy_cluster_upstream_cx_connect_ms_bucket{") && l.contains(sel)
        })
        .map(|l| {
            let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            le.replace("+Inf", "inf").parse().unwrap()
        })
        .collect();
    let envoy = [
        "0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000", "10000",
        "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf",
    ];
    let envoy: Vec<f64> = envoy
        .iter()
        .map(|e| e.replace("+Inf", "inf").parse().unwrap())
        .collect();
    assert_eq!(les, envoy);
    assert!(out.contains("le=\"0.5\"") && out.contains("le=\"1\"") && out.contains("le=\"+Inf\""));
    assert!(out.contains("consul_destination_service=\"api\""));
    assert!(out.contains("consul_upstream_service=\"api\""));
    assert!(out.contains("envoy_rbac_denied{"));
    assert!(out.contains("envoy_listener_address=\"127.0.0.1_15001\""));
    // Nothing for the upstream never used.
    assert!(!out.contains("\"idle\""), "{out}");
    drop(idle);
}

#[test]
fn histograms_count_each_observation_in_its_bucket() {
    let h = Hist::new(hist::ENVOY_BUCKETS);
    h.observe(0.2);
    h.observe(7.0);
    h.observe(1e9);
    assert_eq!(h.count(), 3);
    assert!((h.sum() - (1e9 + 7.2)).abs() < 1e-3);
    let m = Metrics::default();
    m.handshake(Direction::Inbound, None, Duration::from_millis(3));
    let out = m.render(&[]);
    assert!(
        out.contains("veer_tls_handshake_seconds_bucket{direction=\"inbound\",le=\"0.0025\"} 0\n"),
        "{out}"
    );
    assert!(
        out.contains("veer_tls_handshake_seconds_bucket{direction=\"inbound\",le=\"0.005\"} 1\n")
    );
    assert!(out.contains("veer_tls_handshake_seconds_count{direction=\"inbound\"} 1\n"));
}
