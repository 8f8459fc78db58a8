use super::*;

fn p(args: &[&str]) -> Result<Cli, Error> {
    let a: Vec<OsString> = args.iter().map(OsString::from).collect();
    parse(&a)
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn flag_forms() {
    let c = p(&[
        "-proxy-uid",
        "5995",
        "--proxy-inbound-port=20000",
        "-proxy-outbound-port=15002",
        "-exclude-inbound-port",
        "8080",
        "--exclude-inbound-port",
        "9000:9100",
        "-exclude-outbound-port=443",
        "-exclude-outbound-cidr",
        "10.0.0.0/8",
        "-exclude-uid=5996",
        "-consul-dns-ip",
        "10.0.0.53",
        "-consul-dns-port=8600",
        "-netns",
        "/var/run/netns/x",
        "-ipv6=false",
        "--dry-run",
        "-iptables-backend=legacy",
    ])
    .unwrap();
    assert_eq!(c.proxy_uid.as_deref(), Some("5995"));
    assert_eq!(c.proxy_inbound_port, Some(20000));
    assert_eq!(c.proxy_outbound_port, Some(15002));
    assert_eq!(c.exclude_inbound_ports, ["8080", "9000:9100"]);
    assert_eq!(c.exclude_outbound_ports, ["443"]);
    assert_eq!(c.exclude_outbound_cidrs, ["10.0.0.0/8"]);
    assert_eq!(c.exclude_uids, ["5996"]);
    assert_eq!(c.consul_dns_ip.as_deref(), Some("10.0.0.53"));
    assert_eq!(c.consul_dns_port, Some(8600));
    assert_eq!(c.netns.as_deref(), Some("/var/run/netns/x"));
    assert!(!c.ipv6);
    assert!(c.dry_run);
    assert!(!c.cleanup);
    assert_eq!(c.backend, BackendChoice::Fixed(Backend::Legacy));
}

#[test]
fn cleanup_and_help() {
    let c = p(&["cleanup", "-netns", "/x"]).unwrap();
    assert!(c.cleanup);
    assert!(p(&["--cleanup"]).unwrap().cleanup);
    assert!(p(&["-h"]).unwrap().help);
    assert!(p(&["--help"]).unwrap().help);
    assert!(p(&["-ipv6"]).unwrap().ipv6);
    assert_eq!(
        p(&["-iptables-backend", "auto"]).unwrap().backend,
        BackendChoice::Auto
    );
}

#[test]
fn parse_errors_like_go_flag() {
    for (args, want) in [
        (&["-nope"][..], "flag provided but not defined: -nope"),
        (&["-proxy-uid"][..], "flag needs an argument: -proxy-uid"),
        (
            &["-proxy-inbound-port", "x"][..],
            "invalid value \"x\" for flag -proxy-inbound-port: parse error (want a port 0-65535)",
        ),
        (
            &["-consul-dns-port=70000"][..],
            "invalid value \"70000\" for flag -consul-dns-port: parse error (want a port 0-65535)",
        ),
        (
            &["-ipv6=maybe"][..],
            "invalid boolean value \"maybe\" for -ipv6: parse error",
        ),
        (&["extra"][..], "unexpected argument: extra"),
        (&["---x"][..], "unexpected argument: ---x"),
        (&["-proxy-uid=1", "--", "x"][..], "unexpected argument: x"),
        (
            &["-iptables-backend", "iptables"][..],
            "invalid value \"iptables\" for flag -iptables-backend: want nft, legacy or auto",
        ),
    ] {
        assert_eq!(p(args).unwrap_err().to_string(), want, "{args:?}");
    }
}

#[test]
fn consul_cli_required_texts() {
    let e = build_config(&p(&["-proxy-inbound-port", "1"]).unwrap(), &no_env).unwrap_err();
    assert_eq!(e.to_string(), "-proxy-uid is required");
    let e = build_config(&p(&["-proxy-uid", "1"]).unwrap(), &no_env).unwrap_err();
    assert_eq!(
        e.to_string(),
        "either -proxy-id or -proxy-inbound-port are required"
    );
    let e = build_config(
        &p(&[
            "-proxy-uid",
            "1",
            "-proxy-id",
            "x",
            "-proxy-inbound-port",
            "2",
        ])
        .unwrap(),
        &no_env,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot be provided together with -proxy-id"),
        "{e}"
    );
    let e = build_config(
        &p(&[
            "-proxy-uid",
            "1",
            "-proxy-id",
            "x",
            "-proxy-outbound-port",
            "16000",
        ])
        .unwrap(),
        &no_env,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot be provided together with -proxy-id"),
        "{e}"
    );
}

#[test]
fn env_json_is_base_flags_override_and_append() {
    let env = |k: &str| match k {
        "CONSUL_REDIRECT_TRAFFIC_CONFIG" => Some(
            r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ExcludeInboundPorts":["20200"],
                "ExcludeUIDs":["5996"],"NetNS":"/var/run/netns/a","ConsulDNSPort":8600}"#
                .to_string(),
        ),
        _ => None,
    };
    // JSON alone is enough.
    let c = build_config(&p(&[]).unwrap(), &env).unwrap();
    assert_eq!(c.proxy_user_id, "5995");
    assert_eq!(c.netns, "/var/run/netns/a");
    // Flags: scalars override, lists append.
    let c = build_config(
        &p(&[
            "-proxy-inbound-port=21000",
            "-exclude-inbound-port=8080",
            "-exclude-uid",
            "0",
            "-netns",
            "/var/run/netns/b",
            "-consul-dns-port",
            "8601",
        ])
        .unwrap(),
        &env,
    )
    .unwrap();
    assert_eq!(c.proxy_inbound_port, 21000);
    assert_eq!(c.exclude_inbound_ports, ["20200", "8080"]);
    assert_eq!(c.exclude_uids, ["5996", "0"]);
    assert_eq!(c.netns, "/var/run/netns/b");
    assert_eq!(c.consul_dns_port, 8601);
    assert!(!c.dual_stack);
}

#[test]
fn env_json_errors_use_consul_texts() {
    let env = |k: &str| {
        (k == "CONSUL_REDIRECT_TRAFFIC_CONFIG").then(|| r#"{"ProxyInboundPort":1}"#.to_string())
    };
    let e = build_config(&p(&[]).unwrap(), &env).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ProxyUserID is required to set up traffic redirection"
    );
    let bad = |k: &str| (k == "CONSUL_REDIRECT_TRAFFIC_CONFIG").then(|| "{".to_string());
    let e = build_config(&p(&[]).unwrap(), &bad).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("invalid CONSUL_REDIRECT_TRAFFIC_CONFIG: not JSON"),
        "{e}"
    );
}

#[test]
fn dual_stack_from_flag_or_env() {
    let args = p(&["-proxy-uid=1", "-proxy-inbound-port=2"]).unwrap();
    assert!(!build_config(&args, &no_env).unwrap().dual_stack);
    let env = |k: &str| (k == "CONSUL_DUAL_STACK").then(|| "true".to_string());
    assert!(build_config(&args, &env).unwrap().dual_stack);
    let args = p(&["-proxy-uid=1", "-proxy-inbound-port=2", "-ipv6"]).unwrap();
    assert!(build_config(&args, &no_env).unwrap().dual_stack);
}

#[test]
fn https_and_node_name_not_supported() {
    let args = p(&[
        "-proxy-uid=1",
        "-proxy-id=x",
        "-http-addr=https://127.0.0.1:8501",
    ])
    .unwrap();
    let e = build_config(&args, &no_env).unwrap_err();
    assert!(e.to_string().contains("not supported yet"), "{e}");
    let env = |k: &str| (k == "CONSUL_HTTP_SSL").then(|| "true".to_string());
    let args = p(&["-proxy-uid=1", "-proxy-id=x"]).unwrap();
    let e = build_config(&args, &env).unwrap_err();
    assert!(e.to_string().contains("not supported yet"), "{e}");
    let args = p(&["-proxy-uid=1", "-proxy-id=x", "-node-name=n"]).unwrap();
    assert!(build_config(&args, &no_env)
        .unwrap_err()
        .to_string()
        .contains("not supported yet"));
}

#[test]
fn bad_flag_values_name_the_flag_not_the_json_field() {
    for (flag, value) in [
        ("-exclude-inbound-port", "70000"),
        ("-exclude-outbound-port", "x"),
        ("-exclude-outbound-cidr", "10.0.0.0/99"),
        ("-exclude-uid", "root;"),
    ] {
        let c = p(&[
            "-proxy-uid",
            "5995",
            "-proxy-inbound-port",
            "20000",
            flag,
            value,
        ])
        .unwrap();
        let e = build_config(&c, &no_env).unwrap_err().to_string();
        assert!(e.contains(flag), "{flag}: {e}");
        assert!(!e.contains("Exclude"), "{flag}: {e}");
    }
}
