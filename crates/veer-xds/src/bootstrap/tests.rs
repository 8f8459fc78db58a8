use super::*;
use serde_json::json;

/// The smallest bootstrap Consul could write: node, admin, the xDS cluster
/// and ADS.
fn minimal() -> Value {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}},
        "node": {"cluster": "web", "id": "web-sidecar-proxy", "metadata": {"namespace": "default", "nodeName": "n1"}},
        "static_resources": {"clusters": [{
            "name": "local_agent", "connect_timeout": "1s", "type": "STATIC",
            "http2_protocol_options": {},
            "loadAssignment": {"clusterName": "local_agent", "endpoints": [{"lbEndpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8502}}}}
            ]}]}
        }]},
        "dynamic_resources": {
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "ads_config": {"api_type": "DELTA_GRPC", "transport_api_version": "V3",
                "grpc_services": {"initial_metadata": [{"key": "x-consul-token", "value": "s3cret"}],
                                  "envoy_grpc": {"cluster_name": "local_agent"}}}
        }
    })
}

fn ok(v: Value) -> Bootstrap {
    parse(v, Options::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn err(v: Value) -> BootstrapError {
    match parse(v, Options::default()) {
        Ok(b) => panic!("accepted: {b:?}"),
        Err(e) => e,
    }
}

#[test]
fn minimal_consul_shape() {
    let b = ok(minimal());
    assert_eq!(b.node.id, "web-sidecar-proxy");
    assert_eq!(b.node.cluster, "web");
    // Metadata keys are a Struct's: kept as written, not case-converted.
    assert_eq!(b.node.metadata["nodeName"], "n1");
    assert_eq!(b.admin, Some("127.0.0.1:19000".parse().unwrap()));
    assert_eq!(b.ads.cluster, "local_agent");
    assert_eq!(b.ads.addr, Addr::Tcp("127.0.0.1:8502".parse().unwrap()));
    assert_eq!(b.ads.token(), Some("s3cret"));
    assert_eq!(b.ads.connect_timeout, Some(Duration::from_secs(1)));
    assert!(b.clusters[0].http2);
    assert!(b.listeners.is_empty());
}

#[test]
fn unknown_fields_name_their_path() {
    let mut v = minimal();
    v["static_resources"]["clusters"][0]["foo"] = json!(1);
    let e = err(v);
    assert_eq!(
        e.to_string(),
        "static_resources.clusters[0].foo: unknown field"
    );
    assert_eq!(e.classify(), "unknown_field");

    let mut v = minimal();
    v["dynamic_resources"]["ads_config"]["grpc_services"]["envoy_grpc"]["clusterNam"] = json!("x");
    assert_eq!(
        err(v).to_string(),
        "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_nam: unknown field"
    );

    let mut v = minimal();
    v["custom_field"] = json!("foo");
    assert_eq!(err(v).to_string(), "custom_field: unknown field");
}

#[test]
fn allow_unknown_static_fields_lets_them_through() {
    let mut v = minimal();
    v["static_resources"]["clusters"][0]["foo"] = json!(1);
    let b = parse(
        v,
        Options {
            allow_unknown_fields: true,
        },
    )
    .unwrap();
    assert_eq!(b.unknown, vec!["static_resources.clusters[0].foo"]);
}

#[test]
fn state_of_the_world_grpc_is_refused() {
    let mut v = minimal();
    v["dynamic_resources"]["ads_config"]["api_type"] = json!("GRPC");
    let e = err(v);
    assert_eq!(e.classify(), "unsupported");
    let s = e.to_string();
    assert!(
        s.starts_with("dynamic_resources.ads_config.api_type:"),
        "{s}"
    );
    assert!(s.contains("DELTA_GRPC"), "{s}");
}

#[test]
fn a_list_of_grpc_services_and_camel_case() {
    let mut v = minimal();
    let svc = v["dynamic_resources"]["ads_config"]
        .as_object_mut()
        .unwrap()
        .remove("grpc_services")
        .unwrap();
    v["dynamic_resources"]["ads_config"]["grpcServices"] = json!([svc]);
    v["dynamic_resources"]["ads_config"]["apiType"] =
        v["dynamic_resources"]["ads_config"]["api_type"].take();
    v["dynamic_resources"]["ads_config"]
        .as_object_mut()
        .unwrap()
        .remove("api_type");
    let b = ok(v.clone());
    assert_eq!(b.ads.cluster, "local_agent");
    // The same field twice, in both spellings, is an error.
    v["dynamic_resources"]["ads_config"]["api_type"] = json!("DELTA_GRPC");
    let e = err(v).to_string();
    assert!(
        e.contains("dynamic_resources.ads_config.api_type: given twice"),
        "{e}"
    );
}

#[test]
fn missing_ads_cluster_and_non_ads_sources() {
    let mut v = minimal();
    v["dynamic_resources"]["ads_config"]["grpc_services"]["envoy_grpc"]["cluster_name"] =
        json!("nope");
    let e = err(v).to_string();
    assert!(e.contains("no static cluster named \"nope\""), "{e}");

    let mut v = minimal();
    v["dynamic_resources"]["lds_config"] = json!({"path": "/etc/lds.yaml"});
    assert_eq!(err(v).classify(), "unsupported");

    let mut v = minimal();
    v.as_object_mut().unwrap().remove("dynamic_resources");
    assert_eq!(err(v).to_string(), "dynamic_resources: required");
}

#[test]
fn unix_pipe_and_tls_with_a_ca() {
    let mut v = minimal();
    let c = &mut v["static_resources"]["clusters"][0];
    c["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"] =
        json!({"pipe": {"path": "/run/consul/grpc.sock"}});
    c["transport_socket"] = json!({"name": "tls", "typed_config": {
        "@type": UPSTREAM_TLS,
        "common_tls_context": {"validation_context": {"trusted_ca": {"inline_string": "-----BEGIN CERTIFICATE-----\n"}}}
    }});
    let b = ok(v);
    assert_eq!(b.ads.addr, Addr::Unix("/run/consul/grpc.sock".into()));
    assert_eq!(
        b.ads.tls.as_ref().unwrap().ca,
        CaSource::Inline("-----BEGIN CERTIFICATE-----\n".into())
    );
}

#[test]
fn tls_without_a_ca_or_with_a_client_cert_is_refused() {
    let mut v = minimal();
    v["static_resources"]["clusters"][0]["transport_socket"] = json!({"name": "tls", "typed_config": {
        "@type": UPSTREAM_TLS, "common_tls_context": {}
    }});
    assert_eq!(err(v).classify(), "unsupported");
    let mut v = minimal();
    v["static_resources"]["clusters"][0]["transport_socket"] = json!({"name": "tls", "typed_config": {
        "@type": UPSTREAM_TLS, "common_tls_context": {
            "tls_certificates": [{}],
            "validation_context": {"trusted_ca": {"filename": "/ca.pem"}}}
    }});
    let e = err(v).to_string();
    assert!(e.contains("tls_certificates"), "{e}");
}

fn with_listener(routes: Value) -> Value {
    let mut v = minimal();
    v["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "self_admin", "connect_timeout": "5s", "type": "STATIC", "http_protocol_options": {},
            "loadAssignment": {"clusterName": "self_admin", "endpoints": [{"lbEndpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}}}]}]}
        }));
    v["static_resources"]["listeners"] = json!([{
        "name": "envoy_ready_listener",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 21000}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typedConfig": {"@type": HCM, "stat_prefix": "envoy_ready", "codec_type": "HTTP1",
                "route_config": {"name": "r", "virtual_hosts": [{"name": "self_admin", "domains": ["*"], "routes": routes}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typedConfig": {"@type": ROUTER}}]}
        }]}]
    }]);
    v
}

#[test]
fn static_listener_routes() {
    let b = ok(with_listener(json!([
        {"match": {"path": "/ready"}, "route": {"cluster": "self_admin", "prefix_rewrite": "/ready"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "no"}}}
    ])));
    let l = &b.listeners[0];
    assert_eq!(l.addr, "0.0.0.0:21000".parse().unwrap());
    assert_eq!(
        l.routes,
        vec![
            StaticRoute {
                path: PathMatch::Exact("/ready".into()),
                action: RouteAction::Forward {
                    cluster: "self_admin".into(),
                    addr: "127.0.0.1:19000".parse().unwrap(),
                    prefix_rewrite: Some("/ready".into())
                }
            },
            StaticRoute {
                path: PathMatch::Prefix("/".into()),
                action: RouteAction::Direct {
                    status: 404,
                    body: "no".into()
                }
            }
        ]
    );
}

#[test]
fn static_listener_refusals() {
    let e = err(with_listener(
        json!([{"match": {"path": "/ready"}, "route": {"cluster": "ghost"}}]),
    ));
    assert!(
        e.to_string().contains("no static cluster named \"ghost\""),
        "{e}"
    );
    let e = err(with_listener(
        json!([{"match": {"safe_regex": {"regex": ".*"}}, "direct_response": {"status": 404}}]),
    ));
    assert_eq!(e.classify(), "unsupported");
    let mut v = with_listener(json!([]));
    v["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"] = json!({});
    let e = err(v).to_string();
    assert!(
        e.starts_with("static_resources.listeners[0].filter_chains[0].transport_socket:"),
        "{e}"
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
    assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
    assert_eq!(parse_duration("0.25s"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.000000001s"), Some(Duration::new(1, 1)));
    assert_eq!(parse_duration("1"), None);
    assert_eq!(parse_duration("-1s"), None);
    assert_eq!(parse_duration("1ms"), None);
    assert_eq!(parse_duration("s"), None);
    let mut v = minimal();
    v["static_resources"]["clusters"][0]["connect_timeout"] = json!("5");
    let e = err(v).to_string();
    assert!(
        e.starts_with("static_resources.clusters[0].connect_timeout: bad duration"),
        "{e}"
    );
    let mut v = minimal();
    v["static_resources"]["clusters"][0]["connect_timeout"] = json!({"seconds": 3});
    assert_eq!(ok(v).ads.connect_timeout, Some(Duration::from_secs(3)));
}

#[test]
fn numbers_as_strings_and_ports_checked() {
    let mut v = minimal();
    v["admin"]["address"]["socket_address"]["port_value"] = json!("19001");
    assert_eq!(ok(v).admin.unwrap().port(), 19001);
    let mut v = minimal();
    v["admin"]["address"]["socket_address"]["port_value"] = json!(70000);
    assert!(err(v)
        .to_string()
        .starts_with("admin.address.socket_address.port_value:"));
}

#[test]
fn yaml_and_json_documents() {
    let yaml = r#"
node: {id: web-proxy, cluster: web}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 19000}}
static_resources:
  clusters:
  - name: consul-dataplane
    type: STATIC
    connectTimeout: 1s
    http2_protocol_options: {}
    load_assignment:
      cluster_name: consul-dataplane
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {pipe: {path: /tmp/xds.sock}}}
dynamic_resources:
  lds_config: {ads: {}}
  cds_config: {ads: {}}
  ads_config:
    api_type: DELTA_GRPC
    grpc_services:
    - envoy_grpc: {cluster_name: consul-dataplane}
"#;
    let b = ok(parse_document(yaml).unwrap());
    assert_eq!(b.ads.addr, Addr::Unix("/tmp/xds.sock".into()));
    assert_eq!(b.node.id, "web-proxy");
    let json = serde_json::to_string(&minimal()).unwrap();
    assert_eq!(ok(parse_document(&json).unwrap()), ok(minimal()));
    let e = parse_document("{\"node\": ").unwrap_err();
    assert_eq!(e.classify(), "syntax");
    assert!(e.to_string().contains("JSON"), "{e}");
    let e = parse_document("- a\n- b\n").unwrap_err();
    assert!(e.to_string().contains("not a mapping"), "{e}");
}

/// `--config-yaml` merged over `--config-path`: objects merge, lists append.
#[test]
fn config_yaml_merges_over_the_file() {
    let dir = std::env::temp_dir().join(format!("veer-bootstrap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("b.json");
    std::fs::write(&f, serde_json::to_string(&minimal()).unwrap()).unwrap();
    let v = read_config(
        Some(&f),
        Some("admin: {address: {socket_address: {port_value: 19100}}}"),
    )
    .unwrap();
    let b = ok(v);
    assert_eq!(b.admin, Some("127.0.0.1:19100".parse().unwrap()));
    let e = read_config(Some(&dir.join("missing.json")), None).unwrap_err();
    assert!(e.to_string().contains("missing.json"), "{e}");
    assert_eq!(read_config(None, None).unwrap_err().classify(), "missing");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Stats, tracing and runtime are accepted and reported as not applied.
#[test]
fn ignored_sections_are_listed() {
    let mut v = minimal();
    v["stats_sinks"] = json!([{"name": "envoy.stat_sinks.statsd"}]);
    v["tracing"] = json!({"http": {"name": "envoy.zipkin"}});
    v["layered_runtime"] = json!({"layers": []});
    let b = ok(v);
    for p in ["stats_sinks", "tracing", "layered_runtime"] {
        assert!(b.ignored.iter().any(|i| i == p), "{p} in {:?}", b.ignored);
    }
}
