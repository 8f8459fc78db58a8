use super::*;

fn base() -> Config {
    Config {
        proxy_user_id: "123".into(),
        proxy_inbound_port: 20000,
        ..Config::default()
    }
}

fn commands(cfg: &Config, family: Family) -> Vec<String> {
    rules(cfg, family)
        .unwrap()
        .iter()
        .map(|r| r.command(family))
        .collect()
}

fn lines(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

const CHAIN_CREATES: &str = "\
iptables -t nat -N CONSUL_PROXY_INBOUND
iptables -t nat -N CONSUL_PROXY_IN_REDIRECT
iptables -t nat -N CONSUL_PROXY_OUTPUT
iptables -t nat -N CONSUL_PROXY_REDIRECT
iptables -t nat -N CONSUL_DNS_REDIRECT";

#[test]
fn basic_ipv4_matches_consul() {
    // Reference §1.2, UID 123 and inbound 20000 as in Consul's iptables_test.go.
    let want = format!(
        "{CHAIN_CREATES}
iptables -t nat -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001
iptables -t nat -A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
iptables -t nat -A CONSUL_PROXY_OUTPUT -m owner --uid-owner 123 -j RETURN
iptables -t nat -A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
iptables -t nat -A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
iptables -t nat -A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000
iptables -t nat -A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
iptables -t nat -A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT"
    );
    assert_eq!(commands(&base(), Family::V4), lines(&want));
}

#[test]
fn custom_outbound_port() {
    let cfg = Config {
        proxy_outbound_port: 21000,
        ..base()
    };
    let c = commands(&cfg, Family::V4);
    assert_eq!(
        c[5],
        "iptables -t nat -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 21000"
    );
}

#[test]
fn exclusions_in_consul_order() {
    // Ports, then CIDRs, then UIDs, each inserted with -I after the base rules;
    // inbound exclusions after the inbound rules.
    let cfg = Config {
        exclude_outbound_ports: vec!["22000".into(), "22500:22600".into()],
        exclude_outbound_cidrs: vec!["1.1.1.1".into(), "2.2.2.0/24".into()],
        exclude_uids: vec!["456".into(), "789".into()],
        exclude_inbound_ports: vec!["22200".into(), "9000:9100".into()],
        ..base()
    };
    let want = format!(
        "{CHAIN_CREATES}
iptables -t nat -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001
iptables -t nat -A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
iptables -t nat -A CONSUL_PROXY_OUTPUT -m owner --uid-owner 123 -j RETURN
iptables -t nat -A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
iptables -t nat -A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
iptables -t nat -I CONSUL_PROXY_OUTPUT -p tcp --dport 22000 -j RETURN
iptables -t nat -I CONSUL_PROXY_OUTPUT -p tcp --dport 22500:22600 -j RETURN
iptables -t nat -I CONSUL_PROXY_OUTPUT -d 1.1.1.1 -j RETURN
iptables -t nat -I CONSUL_PROXY_OUTPUT -d 2.2.2.0/24 -j RETURN
iptables -t nat -I CONSUL_PROXY_OUTPUT -m owner --uid-owner 456 -j RETURN
iptables -t nat -I CONSUL_PROXY_OUTPUT -m owner --uid-owner 789 -j RETURN
iptables -t nat -A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000
iptables -t nat -A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
iptables -t nat -A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT
iptables -t nat -I CONSUL_PROXY_INBOUND -p tcp --dport 22200 -j RETURN
iptables -t nat -I CONSUL_PROXY_INBOUND -p tcp --dport 9000:9100 -j RETURN"
    );
    assert_eq!(commands(&cfg, Family::V4), lines(&want));
}

fn dns_part(cfg: &Config, family: Family) -> Vec<String> {
    // The rules between the outbound REDIRECT and the OUTPUT -> CONSUL_PROXY_OUTPUT jump.
    let c = commands(cfg, family);
    let start = 6;
    let end = c
        .iter()
        .position(|l| l.ends_with("-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT"))
        .unwrap();
    c[start..end].to_vec()
}

#[test]
fn dns_ip_only() {
    let cfg = Config {
        consul_dns_ip: "10.0.34.16".into(),
        ..base()
    };
    assert_eq!(
        dns_part(&cfg, Family::V4),
        lines(
            "iptables -t nat -A CONSUL_DNS_REDIRECT -p udp --dport 53 -j DNAT --to-destination 10.0.34.16
iptables -t nat -A CONSUL_DNS_REDIRECT -p tcp --dport 53 -j DNAT --to-destination 10.0.34.16
iptables -t nat -A OUTPUT -p udp --dport 53 -j CONSUL_DNS_REDIRECT
iptables -t nat -A OUTPUT -p tcp --dport 53 -j CONSUL_DNS_REDIRECT"
        )
    );
}

#[test]
fn dns_port_only_defaults_to_loopback() {
    let cfg = Config {
        consul_dns_port: 8600,
        ..base()
    };
    assert_eq!(
        dns_part(&cfg, Family::V4),
        lines(
            "iptables -t nat -A CONSUL_DNS_REDIRECT -p udp -d 127.0.0.1 --dport 53 -j DNAT --to-destination 127.0.0.1:8600
iptables -t nat -A CONSUL_DNS_REDIRECT -p tcp -d 127.0.0.1 --dport 53 -j DNAT --to-destination 127.0.0.1:8600
iptables -t nat -A OUTPUT -p udp -d 127.0.0.1 --dport 53 -j CONSUL_DNS_REDIRECT
iptables -t nat -A OUTPUT -p tcp -d 127.0.0.1 --dport 53 -j CONSUL_DNS_REDIRECT"
        )
    );
}

#[test]
fn dns_ip_and_port() {
    let cfg = Config {
        consul_dns_ip: "10.0.34.16".into(),
        consul_dns_port: 8600,
        ..base()
    };
    assert_eq!(
        dns_part(&cfg, Family::V4),
        lines(
            "iptables -t nat -A CONSUL_DNS_REDIRECT -p udp -d 10.0.34.16 --dport 53 -j DNAT --to-destination 10.0.34.16:8600
iptables -t nat -A CONSUL_DNS_REDIRECT -p tcp -d 10.0.34.16 --dport 53 -j DNAT --to-destination 10.0.34.16:8600
iptables -t nat -A OUTPUT -p udp -d 10.0.34.16 --dport 53 -j CONSUL_DNS_REDIRECT
iptables -t nat -A OUTPUT -p tcp -d 10.0.34.16 --dport 53 -j CONSUL_DNS_REDIRECT"
        )
    );
}

#[test]
fn dns_neither_creates_empty_chain() {
    let c = commands(&base(), Family::V4);
    assert!(c.contains(&"iptables -t nat -N CONSUL_DNS_REDIRECT".to_string()));
    assert!(!c.iter().any(|l| l.contains("--dport 53")));
}

#[test]
fn ipv6_dual_stack() {
    let cfg = Config {
        consul_dns_port: 8600,
        dual_stack: true,
        exclude_outbound_cidrs: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
        ..base()
    };
    assert_eq!(families(&cfg), vec![Family::V4, Family::V6]);
    // IPv4 pass: no DNS rules in dual stack, only the IPv4 CIDR.
    let v4 = commands(&cfg, Family::V4);
    assert!(!v4.iter().any(|l| l.contains("DNS_REDIRECT -p")));
    assert!(v4.contains(&"iptables -t nat -I CONSUL_PROXY_OUTPUT -d 10.0.0.0/8 -j RETURN".into()));
    assert!(!v4.iter().any(|l| l.contains("fd00::/8")));
    // IPv6 pass: same list with ip6tables, ::1/128, DNS on ::1.
    let want = "\
ip6tables -t nat -N CONSUL_PROXY_INBOUND
ip6tables -t nat -N CONSUL_PROXY_IN_REDIRECT
ip6tables -t nat -N CONSUL_PROXY_OUTPUT
ip6tables -t nat -N CONSUL_PROXY_REDIRECT
ip6tables -t nat -N CONSUL_DNS_REDIRECT
ip6tables -t nat -A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001
ip6tables -t nat -A CONSUL_DNS_REDIRECT -p udp -d ::1 --dport 53 -j DNAT --to-destination [::1]:8600
ip6tables -t nat -A CONSUL_DNS_REDIRECT -p tcp -d ::1 --dport 53 -j DNAT --to-destination [::1]:8600
ip6tables -t nat -A OUTPUT -p udp -d ::1 --dport 53 -j CONSUL_DNS_REDIRECT
ip6tables -t nat -A OUTPUT -p tcp -d ::1 --dport 53 -j CONSUL_DNS_REDIRECT
ip6tables -t nat -A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
ip6tables -t nat -A CONSUL_PROXY_OUTPUT -m owner --uid-owner 123 -j RETURN
ip6tables -t nat -A CONSUL_PROXY_OUTPUT -d ::1/128 -j RETURN
ip6tables -t nat -A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
ip6tables -t nat -I CONSUL_PROXY_OUTPUT -d fd00::/8 -j RETURN
ip6tables -t nat -A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000
ip6tables -t nat -A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
ip6tables -t nat -A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT";
    assert_eq!(commands(&cfg, Family::V6), lines(want));
}

#[test]
fn ipv6_dns_ip_uses_brackets() {
    let cfg = Config {
        consul_dns_ip: "fd00::53".into(),
        consul_dns_port: 8600,
        dual_stack: true,
        ..base()
    };
    let v6 = commands(&cfg, Family::V6);
    assert!(v6.contains(
        &"ip6tables -t nat -A CONSUL_DNS_REDIRECT -p udp -d fd00::53 --dport 53 -j DNAT --to-destination [fd00::53]:8600"
            .to_string()
    ));
}

#[test]
fn rules_validate_first() {
    let e = rules(&Config::default(), Family::V4).unwrap_err();
    assert_eq!(
        e.to_string(),
        "ProxyUserID is required to set up traffic redirection"
    );
}

#[test]
fn restore_text_fresh() {
    let r = rules(&base(), Family::V4).unwrap();
    let t = restore_text(&r, &NatState::default());
    let want = "\
# veer redirect-traffic: Consul transparent-proxy rules (iptables-restore --noflush)
*nat
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_PROXY_IN_REDIRECT - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
:CONSUL_DNS_REDIRECT - [0:0]
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 123 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT
COMMIT
";
    assert_eq!(t, want);
}

const SAVED: &str = r#"# Generated by iptables-save v1.8.9 on Thu Nov 26 22:56:03 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j CONSUL_PROXY_OUTPUT
COMMIT
*nat
:PREROUTING ACCEPT [10:600]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [3:180]
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_DNS_REDIRECT - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
:MINE - [0:0]
-A PREROUTING -p tcp -m tcp --dport 9999 -j REDIRECT --to-ports 9998
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A OUTPUT -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT
-A OUTPUT -m comment --comment "not -j CONSUL_PROXY_OUTPUT \"really\"" -j MINE
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A MINE -g CONSUL_PROXY_REDIRECT
COMMIT
"#;

#[test]
fn parse_save_output() {
    let st = NatState::parse(SAVED);
    assert_eq!(
        st.chains,
        [
            "PREROUTING",
            "INPUT",
            "OUTPUT",
            "POSTROUTING",
            "CONSUL_PROXY_INBOUND",
            "CONSUL_DNS_REDIRECT",
            "CONSUL_PROXY_OUTPUT",
            "CONSUL_PROXY_REDIRECT",
            "MINE"
        ]
    );
    assert_eq!(st.rules.len(), 9); // the *filter rule is not part of nat
    assert_eq!(
        st.consul_chains(),
        [
            "CONSUL_PROXY_INBOUND",
            "CONSUL_PROXY_OUTPUT",
            "CONSUL_PROXY_REDIRECT",
            "CONSUL_DNS_REDIRECT"
        ]
    );
    // The quoted comment mentioning the chain is not a jump.
    assert_eq!(st.rules[3].target.as_deref(), Some("MINE"));
    let builtin: Vec<String> = st
        .consul_jumps(true)
        .map(|r| format!("{} {}", r.chain, r.spec))
        .collect();
    assert_eq!(
        builtin,
        [
            "PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
            "OUTPUT -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT",
            "OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT"
        ]
    );
    assert_eq!(st.consul_jumps(false).count(), 4); // plus MINE -g ...
    assert!(st.has_consul());
    assert!(!NatState::parse("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n").has_consul());
}

#[test]
fn restore_text_deletes_existing_hooks() {
    let r = rules(&base(), Family::V4).unwrap();
    let t = restore_text(&r, &NatState::parse(SAVED));
    let l = lines(&t);
    // Declarations, then the -D lines, then Consul's rules.
    assert_eq!(l[7], "-D PREROUTING -p tcp -j CONSUL_PROXY_INBOUND");
    assert_eq!(
        l[8],
        "-D OUTPUT -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT"
    );
    assert_eq!(l[9], "-D OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT");
    assert_eq!(
        l[10],
        "-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001"
    );
    // A user's own chain jumping to a Consul chain is left alone on apply.
    assert!(!t.contains("-D MINE"));
    assert!(!t.contains("9999"));
}

#[test]
fn cleanup_text_removes_only_consul() {
    let t = cleanup_text(&NatState::parse(SAVED));
    let want = r#"# veer redirect-traffic cleanup: remove Consul's chains and hooks
*nat
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_PROXY_IN_REDIRECT - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
:CONSUL_DNS_REDIRECT - [0:0]
-D PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-D OUTPUT -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT
-D OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-D MINE -g CONSUL_PROXY_REDIRECT
-X CONSUL_PROXY_INBOUND
-X CONSUL_PROXY_IN_REDIRECT
-X CONSUL_PROXY_OUTPUT
-X CONSUL_PROXY_REDIRECT
-X CONSUL_DNS_REDIRECT
COMMIT
"#;
    assert_eq!(t, want);
}

#[test]
fn rollback_text_restores_previous() {
    let previous = NatState::parse(SAVED);
    let current = NatState::parse(
        "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
-A PREROUTING -p tcp -m tcp --dport 9999 -j REDIRECT --to-ports 9998
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A OUTPUT -m comment --comment \"x\" -j MINE
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
COMMIT
",
    );
    let t = rollback_text(&previous, &current);
    let want = r#"# veer redirect-traffic rollback: restore the previous Consul rules
*nat
:CONSUL_PROXY_INBOUND - [0:0]
:CONSUL_PROXY_IN_REDIRECT - [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
:CONSUL_DNS_REDIRECT - [0:0]
-D PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-D OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-X CONSUL_PROXY_IN_REDIRECT
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-I PREROUTING 2 -p tcp -j CONSUL_PROXY_INBOUND
-I OUTPUT 1 -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT
-I OUTPUT 3 -p tcp -j CONSUL_PROXY_OUTPUT
COMMIT
"#;
    assert_eq!(t, want);
}

#[test]
fn tokenize_quotes() {
    assert_eq!(
        tokenize(r#"-m comment --comment "a \"b\" c" -j X"#),
        ["-m", "comment", "--comment", "a \"b\" c", "-j", "X"]
    );
    assert_eq!(tokenize(r#"--comment """#), ["--comment", ""]);
}
