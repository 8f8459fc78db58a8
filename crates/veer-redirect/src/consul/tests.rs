use super::*;

/// `GET /v1/agent/service/web-sidecar-proxy` from a Consul 1.8.7 dev agent.
const SIDECAR_187: &str = r#"{
    "Kind": "connect-proxy",
    "ID": "web-sidecar-proxy",
    "Service": "web-sidecar-proxy",
    "Tags": [],
    "Meta": {},
    "Port": 21000,
    "Address": "",
    "Weights": {"Passing": 1, "Warning": 1},
    "EnableTagOverride": false,
    "ContentHash": "dcae27c5ecd48e1b",
    "Proxy": {
        "DestinationServiceName": "web",
        "DestinationServiceID": "web",
        "LocalServiceAddress": "127.0.0.1",
        "LocalServicePort": 8080,
        "Config": {
            "bind_port": "21001",
            "envoy_prometheus_bind_addr": "0.0.0.0:20200",
            "envoy_stats_bind_addr": "0.0.0.0:9102"
        },
        "MeshGateway": {},
        "Expose": {
            "Checks": true,
            "Paths": [{"ListenerPort": 21500, "Path": "/metrics", "LocalPathPort": 8080, "ParsedFromCheck": false}]
        }
    }
}"#;

#[test]
fn derive_from_187_registration() {
    let svc: Value = serde_json::from_str(SIDECAR_187).unwrap();
    let d = derive("web-sidecar-proxy", &svc).unwrap();
    assert_eq!(
        d,
        Derived {
            inbound_port: 21001, // bind_port (a string, decoded weakly) wins over Port
            outbound_port: None,
            exclude_inbound_ports: vec!["20200".into(), "9102".into(), "21500".into()],
            destination_service_name: "web".into(),
            expose_checks: true,
        }
    );
}

#[test]
fn derive_newer_fields_and_defaults() {
    let svc = serde_json::json!({
        "Kind": "connect-proxy", "Port": 20000,
        "Proxy": {"DestinationServiceName": "api", "Mode": "transparent",
                  "TransparentProxy": {"OutboundListenerPort": 15002},
                  "Config": {"bind_port": 0, "envoy_stats_bind_addr": "[::]:9103"}}
    });
    let d = derive("api-sidecar-proxy", &svc).unwrap();
    assert_eq!(d.inbound_port, 20000);
    assert_eq!(d.outbound_port, Some(15002));
    assert_eq!(d.exclude_inbound_ports, ["9103"]);
    assert!(!d.expose_checks);
}

#[test]
fn derive_errors() {
    let svc = serde_json::json!({"Kind": "", "Port": 8080, "Proxy": null});
    assert_eq!(
        derive("web", &svc).unwrap_err().to_string(),
        "service web is not a proxy service"
    );
    let svc =
        serde_json::json!({"Port": 1, "Proxy": {"Config": {"envoy_prometheus_bind_addr": "nope"}}});
    assert!(derive("p", &svc)
        .unwrap_err()
        .to_string()
        .contains("failed parsing host and port from envoy_prometheus_bind_addr"));
    let svc = serde_json::json!({"Port": 1, "Proxy": {"Config": {"bind_port": "x"}}});
    assert!(derive("p", &svc)
        .unwrap_err()
        .to_string()
        .contains("bind_port"));
}

#[test]
fn exposed_checks() {
    let checks = serde_json::json!({
        "service:web:2": {"ServiceName": "web", "ExposedPort": 21501},
        "service:web:1": {"ServiceName": "web", "ExposedPort": 21500},
        "service:web:3": {"ServiceName": "web"},
        "service:db": {"ServiceName": "db", "ExposedPort": 21502}
    });
    assert_eq!(exposed_check_ports(&checks, "web"), ["21500", "21501"]);
    assert!(exposed_check_ports(&Value::Null, "web").is_empty());
}

#[test]
fn addresses() {
    assert_eq!(
        parse_addr("127.0.0.1:8500").unwrap(),
        AgentAddr::Tcp("127.0.0.1:8500".into())
    );
    assert_eq!(
        parse_addr("http://consul:8500/").unwrap(),
        AgentAddr::Tcp("consul:8500".into())
    );
    assert_eq!(
        parse_addr("localhost").unwrap(),
        AgentAddr::Tcp("localhost:8500".into())
    );
    assert_eq!(
        parse_addr("[::1]").unwrap(),
        AgentAddr::Tcp("[::1]:8500".into())
    );
    assert_eq!(
        parse_addr("[::1]:1").unwrap(),
        AgentAddr::Tcp("[::1]:1".into())
    );
    assert_eq!(
        parse_addr("unix:///run/consul.sock").unwrap(),
        AgentAddr::Unix("/run/consul.sock".into())
    );
    assert!(parse_addr("https://x:8501")
        .unwrap_err()
        .to_string()
        .contains("not supported yet"));
    assert!(parse_addr("http://x/y").is_err());
    assert_eq!(
        escape_path("web-sidecar proxy/1"),
        "web-sidecar%20proxy%2F1"
    );
}

#[test]
fn http_responses() {
    let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}xx").unwrap();
    assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
    let (s, b) = parse_response(
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nunkno\r\n3;x=y\r\nwn \r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!((s, b.as_slice()), (404, &b"unknown "[..]));
    assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
    assert!(parse_response(b"garbage\r\n\r\n").is_err());
}

#[test]
fn token_without_line_breaks() {
    assert!(Agent::new(AgentAddr::Tcp("x:1".into()), Some("a\r\nX: y".into())).is_err());
}
