//! The command line without root: help, usage errors, validation texts and
//! `--dry-run` when no iptables binary can be found (so nothing is read or run).
mod common;

use common::*;

const NO_PATH: (&str, &str) = ("PATH", "/nonexistent-veer-path");

#[test]
fn help() {
    for h in ["-h", "-help", "--help"] {
        let o = veer(&[h], &[]);
        assert_eq!(o.code, 0);
        assert!(
            o.out.starts_with("Usage: veer redirect-traffic [options]"),
            "{o:?}"
        );
        assert!(o.out.contains("-exclude-outbound-cidr"));
    }
}

#[test]
fn usage_and_validation_errors() {
    for (args, want) in [
        (&["-bogus"][..], "flag provided but not defined: -bogus"),
        (
            &["-proxy-inbound-port", "20000"][..],
            "error: -proxy-uid is required",
        ),
        (
            &["-proxy-uid", "5995"][..],
            "error: either -proxy-id or -proxy-inbound-port are required",
        ),
        (
            &[
                "-proxy-uid",
                "5995",
                "-proxy-inbound-port",
                "1",
                "-exclude-outbound-port",
                "80 -j DROP",
            ][..],
            "error: -exclude-outbound-port: invalid port \"80 -j DROP\"",
        ),
        (
            &[
                "-proxy-uid",
                "5995",
                "-proxy-inbound-port",
                "1",
                "-consul-dns-ip",
                "fd00::53",
            ][..],
            "error: for non dual stack setup ipv4 consulDNSIP required",
        ),
    ] {
        let o = veer(args, &[NO_PATH]);
        assert_eq!(o.code, 1, "{args:?}: {o:?}");
        assert!(o.err.contains(want), "{args:?}: {o:?}");
    }
    let o = veer(
        &[],
        &[
            NO_PATH,
            (
                "CONSUL_REDIRECT_TRAFFIC_CONFIG",
                r#"{"ProxyUserID":"5995"}"#,
            ),
        ],
    );
    assert_eq!(o.code, 1);
    assert!(
        o.err
            .contains("error: ProxyInboundPort is required to set up traffic redirection"),
        "{o:?}"
    );
}

#[test]
fn dry_run_prints_restore_text() {
    let o = veer(
        &[
            "-proxy-uid",
            "5995",
            "-proxy-inbound-port",
            "20000",
            "-exclude-inbound-port",
            "8000:9000",
            "--dry-run",
        ],
        &[NO_PATH],
    );
    assert_eq!(o.code, 0, "{o:?}");
    assert!(o.err.contains("cannot read the current nat table"), "{o:?}");
    assert_eq!(
        o.out,
        "# IPv4: iptables-restore -w 10 --noflush
# veer redirect-traffic: Consul transparent-proxy rules (iptables-restore --noflush)
*nat
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_PROXY_IN_REDIRECT - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
:CONSUL_DNS_REDIRECT - [0:0]
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT
-I CONSUL_PROXY_INBOUND -p tcp --dport 8000:9000 -j RETURN
COMMIT
"
    );
}

#[test]
fn dry_run_dual_stack_from_env() {
    let o = veer(
        &[
            "-proxy-uid",
            "5995",
            "-proxy-inbound-port",
            "20000",
            "-consul-dns-port",
            "8600",
            "-dry-run",
        ],
        &[NO_PATH, ("CONSUL_DUAL_STACK", "true")],
    );
    assert_eq!(o.code, 0, "{o:?}");
    let (v4, v6) = o
        .out
        .split_once("# IPv6: ip6tables-restore")
        .expect("two sections");
    assert!(v4.starts_with("# IPv4: iptables-restore"));
    assert!(
        !v4.contains("--dport 53"),
        "DNS goes to the IPv6 pass in dual stack: {v4}"
    );
    assert!(
        v6.contains("-A CONSUL_PROXY_OUTPUT -d ::1/128 -j RETURN"),
        "{v6}"
    );
    assert!(
        v6.contains(
            "-A CONSUL_DNS_REDIRECT -p udp -d ::1 --dport 53 -j DNAT --to-destination [::1]:8600"
        ),
        "{v6}"
    );
}

#[test]
fn cleanup_without_binaries_says_why() {
    let o = veer(&["cleanup"], &[NO_PATH]);
    assert_eq!(o.code, 1);
    assert!(o.err.contains("no usable iptables nat table"), "{o:?}");
    assert!(o.err.contains("missing binary"), "{o:?}");
}
