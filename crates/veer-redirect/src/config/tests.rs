use super::*;

#[test]
fn parses_consul_k8s_json() {
    // As consul-k8s marshals iptables.Config (no JSON tags, nil slices as null).
    let json = r#"{"ConsulDNSIP":"","ConsulDNSPort":0,"ProxyUserID":"5995","ProxyInboundPort":20000,
        "ProxyOutboundPort":15001,"ExcludeInboundPorts":["20200","21000"],"ExcludeOutboundPorts":null,
        "ExcludeOutboundCIDRs":["10.0.0.0/8"],"ExcludeUIDs":["5996"],"NetNS":"/var/run/netns/pod",
        "IptablesProvider":null}"#;
    let c = Config::from_json(json).unwrap();
    assert_eq!(
        c,
        Config {
            consul_dns_ip: String::new(),
            consul_dns_port: 0,
            proxy_user_id: "5995".into(),
            proxy_inbound_port: 20000,
            proxy_outbound_port: 15001,
            exclude_inbound_ports: vec!["20200".into(), "21000".into()],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec!["10.0.0.0/8".into()],
            exclude_uids: vec!["5996".into()],
            netns: "/var/run/netns/pod".into(),
            dual_stack: false,
        }
    );
    c.validate().unwrap();
}

#[test]
fn json_keys_case_insensitive_and_unknown_ignored() {
    let c = Config::from_json(
        r#"{"proxyuserid":"1","PROXYINBOUNDPORT":2,"consulDnsPort":8600,"Future":{"x":1},
            "ExcludeInboundPorts":[20200]}"#,
    )
    .unwrap();
    assert_eq!(c.proxy_user_id, "1");
    assert_eq!(c.proxy_inbound_port, 2);
    assert_eq!(c.consul_dns_port, 8600);
    assert_eq!(c.exclude_inbound_ports, ["20200"]);
    assert_eq!(c.outbound_port(), 15001);
}

#[test]
fn json_errors() {
    for (json, want) in [
        ("nope", "not JSON"),
        ("[]", "expected a JSON object"),
        (
            r#"{"ProxyInboundPort":"20000"}"#,
            "ProxyInboundPort: expected a number",
        ),
        (
            r#"{"ProxyInboundPort":70000}"#,
            "ProxyInboundPort: 70000 is not a port",
        ),
        (r#"{"ProxyInboundPort":-1}"#, "is not a port"),
        (r#"{"ProxyUserID":5995}"#, "ProxyUserID: expected a string"),
        (r#"{"ExcludeUIDs":"5996"}"#, "ExcludeUIDs: expected a list"),
        (r#"{"ExcludeUIDs":[true]}"#, "ExcludeUIDs: expected strings"),
    ] {
        let e = Config::from_json(json).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid CONSUL_REDIRECT_TRAFFIC_CONFIG: "),
            "{e}"
        );
        assert!(e.contains(want), "{json}: {e}");
    }
}

fn ok() -> Config {
    Config {
        proxy_user_id: "5995".into(),
        proxy_inbound_port: 20000,
        ..Config::default()
    }
}

fn invalid(c: Config) -> String {
    c.validate().unwrap_err().to_string()
}

#[test]
fn consul_validation_texts() {
    assert_eq!(
        invalid(Config {
            proxy_user_id: String::new(),
            ..ok()
        }),
        "ProxyUserID is required to set up traffic redirection"
    );
    assert_eq!(
        invalid(Config {
            proxy_inbound_port: 0,
            ..ok()
        }),
        "ProxyInboundPort is required to set up traffic redirection"
    );
    assert_eq!(
        invalid(Config {
            consul_dns_ip: "not-an-ip".into(),
            ..ok()
        }),
        "unable to parse consulDNSIP"
    );
    assert_eq!(
        invalid(Config {
            consul_dns_ip: "fd00::53".into(),
            ..ok()
        }),
        "for non dual stack setup ipv4 consulDNSIP required"
    );
    assert_eq!(
        invalid(Config {
            consul_dns_ip: "10.0.0.53".into(),
            dual_stack: true,
            ..ok()
        }),
        "for dual stack ipv6 consulDNSIP required"
    );
}

#[test]
fn value_checks() {
    for p in ["1", "65535", "8000:9000", "80:80"] {
        check_port_spec(p, "x").unwrap();
    }
    for p in [
        "0",
        "65536",
        "9000:8000",
        "a",
        "80-90",
        "80 -j ACCEPT",
        "",
        ":80",
        "80:",
    ] {
        assert!(check_port_spec(p, "x").is_err(), "{p:?}");
    }
    for u in ["0", "5995", "1000-2000", "envoy", "_svc", "a.b-c"] {
        check_user(u, "x").unwrap();
    }
    for u in [
        "",
        "2000-1000",
        "-1",
        "a b",
        "x\nCOMMIT",
        "9999999999999",
        "1a\"",
    ] {
        assert!(check_user(u, "x").is_err(), "{u:?}");
    }
    for c in ["10.0.0.0/8", "1.2.3.4", "1.2.3.4/32", "fd00::/8", "::1"] {
        parse_cidr(c).unwrap();
    }
    for c in [
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0.0/",
        "x",
        "1.2.3.4/+1",
        "1.2.3.4 -j DROP",
    ] {
        assert!(parse_cidr(c).is_err(), "{c:?}");
    }
    assert!(invalid(Config {
        exclude_outbound_cidrs: vec!["fd00::/8".into()],
        ..ok()
    })
    .contains("use -ipv6"));
    assert!(invalid(Config {
        exclude_inbound_ports: vec!["x".into()],
        ..ok()
    })
    .starts_with("ExcludeInboundPorts: invalid port"));
    assert!(invalid(Config {
        proxy_user_id: "a b".into(),
        ..ok()
    })
    .starts_with("ProxyUserID: invalid user"));
}
