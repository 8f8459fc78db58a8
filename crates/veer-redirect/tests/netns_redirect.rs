//! Real rules in network namespaces made by the tests, checked with real
//! sockets. Needs root (skips loudly otherwise). Every apply passes `-netns`,
//! so the host's own nat table is never touched.
mod common;

use std::ffi::OsString;
use std::process::Command;

use common::*;
use veer_redirect::rules::{rollback_text, NatState};
use veer_testsupport::netns::{veth, Netns};
use veer_testsupport::require_root;

/// App namespace (10.99.0.1) and a peer namespace (10.99.0.7, 10.99.0.70,
/// 10.99.0.53) on one veth link.
fn pair(tag: &str) -> (Netns, Netns) {
    let app = Netns::new(&format!("vrA{tag}")).unwrap();
    let peer = Netns::new(&format!("vrP{tag}")).unwrap();
    veth(
        &app,
        &["10.99.0.1/24", "fd00:99::1/64"],
        &peer,
        &[
            "10.99.0.7/24",
            "10.99.0.70/24",
            "10.99.0.53/24",
            "fd00:99::7/64",
        ],
    )
    .unwrap();
    (app, peer)
}

#[test]
fn outbound_inbound_and_exclusions() {
    if !require_root("veer-redirect outbound_inbound_and_exclusions") {
        return;
    }
    let (app, peer) = pair("io");
    let ns = path(&app);
    let o = veer_ok(&[
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "-exclude-outbound-port",
        "8443",
        "--exclude-outbound-port=9000:9100",
        "-exclude-outbound-cidr",
        "10.99.0.64/26",
        "-exclude-uid",
        "6000",
        "-exclude-inbound-port",
        "8081",
        "-exclude-inbound-port",
        "7000:7100",
        "-netns",
        &ns,
    ]);
    assert!(o.err.contains("using the nft iptables back end"), "{o:?}");
    assert!(
        o.out
            .contains("Successfully applied traffic redirection rules (IPv4"),
        "{o:?}"
    );

    let l = Listeners(vec![
        ("outbound", listen(&app, "127.0.0.1:15001")),
        ("inbound", listen(&app, "0.0.0.0:20000")),
        ("app8081", listen(&app, "0.0.0.0:8081")),
        ("app7050", listen(&app, "0.0.0.0:7050")),
        ("local80", listen(&app, "127.0.0.1:80")),
        ("remote80", listen(&peer, "0.0.0.0:80")),
        ("remote8443", listen(&peer, "0.0.0.0:8443")),
        ("remote9050", listen(&peer, "0.0.0.0:9050")),
    ]);

    // (a) the app's outbound connection lands on 127.0.0.1:15001, original destination kept.
    let (at, s) = l.connect_from(&app, "10.99.0.7:80");
    assert_eq!(at, "outbound");
    assert_eq!(original_dst(&s).to_string(), "10.99.0.7:80");
    // (b) the proxy UID is not redirected; another UID is.
    assert_eq!(l.connect_as(&app, 5995, "10.99.0.7", 80), "remote80");
    assert_eq!(l.connect_as(&app, 6001, "10.99.0.7", 80), "outbound");
    // (c) excluded port, port range, CIDR and UID are not redirected.
    assert_eq!(l.connect_from(&app, "10.99.0.7:8443").0, "remote8443");
    assert_eq!(l.connect_from(&app, "10.99.0.7:9050").0, "remote9050");
    assert_eq!(l.connect_from(&app, "10.99.0.70:80").0, "remote80");
    assert_eq!(l.connect_as(&app, 6000, "10.99.0.7", 80), "remote80");
    // (d) 127.0.0.1 is exempt, 127.0.0.2 is not.
    assert_eq!(l.connect_from(&app, "127.0.0.1:80").0, "local80");
    let (at, s) = l.connect_from(&app, "127.0.0.2:80");
    assert_eq!(at, "outbound");
    assert_eq!(original_dst(&s).to_string(), "127.0.0.2:80");
    // (e) inbound from the other namespace lands on the inbound port,
    // except on excluded inbound ports / ranges.
    let (at, s) = l.connect_from(&peer, "10.99.0.1:8080");
    assert_eq!(at, "inbound");
    assert_eq!(original_dst(&s).to_string(), "10.99.0.1:8080");
    assert_eq!(l.connect_from(&peer, "10.99.0.1:8081").0, "app8081");
    assert_eq!(l.connect_from(&peer, "10.99.0.1:7050").0, "app7050");
    // The peer's own outbound traffic is untouched (rules only in the app namespace).
    assert_eq!(l.connect_from(&peer, "10.99.0.7:80").0, "remote80");
}

#[test]
fn dns_variants() {
    if !require_root("veer-redirect dns_variants") {
        return;
    }
    let (app, peer) = pair("dns");
    let ns = path(&app);
    let a8600 = udp(&app, "127.0.0.1:8600");
    let a53 = udp(&app, "127.0.0.1:53");
    let p53_53 = udp(&peer, "10.99.0.53:53");
    let p7_53 = udp(&peer, "10.99.0.7:53");
    let p7_8600 = udp(&peer, "10.99.0.7:8600");
    let socks = [
        ("app 127.0.0.1:8600", &a8600),
        ("app 127.0.0.1:53", &a53),
        ("peer 10.99.0.53:53", &p53_53),
        ("peer 10.99.0.7:53", &p7_53),
        ("peer 10.99.0.7:8600", &p7_8600),
    ];
    let tcp = Listeners(vec![
        ("outbound", listen(&app, "127.0.0.1:15001")),
        ("peer tcp 10.99.0.53:53", listen(&peer, "10.99.0.53:53")),
        ("peer tcp 10.99.0.7:53", listen(&peer, "10.99.0.7:53")),
    ]);
    let base = [
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "-netns",
        &ns,
    ];
    let apply = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        veer_ok(&a);
    };

    // IP only: all port-53 traffic goes to that IP (UDP and TCP, before the TCP redirect).
    apply(&["-consul-dns-ip", "10.99.0.53"]);
    assert_eq!(
        udp_lands(&app, "10.99.0.7:53", &socks),
        Some("peer 10.99.0.53:53")
    );
    assert_eq!(
        udp_lands(&app, "10.99.0.70:53", &socks),
        Some("peer 10.99.0.53:53")
    );
    assert_eq!(
        tcp.connect_from(&app, "10.99.0.7:53").0,
        "peer tcp 10.99.0.53:53"
    );

    // Port only: only queries to 127.0.0.1:53 go to 127.0.0.1:8600; re-applying
    // replaced the previous variant's hooks.
    apply(&["-consul-dns-port", "8600"]);
    assert_eq!(
        udp_lands(&app, "127.0.0.1:53", &socks),
        Some("app 127.0.0.1:8600")
    );
    assert_eq!(
        udp_lands(&app, "10.99.0.7:53", &socks),
        Some("peer 10.99.0.7:53")
    );
    assert_eq!(tcp.connect_from(&app, "10.99.0.7:53").0, "outbound");

    // IP and port: queries to that IP's port 53 go to IP:port.
    apply(&["-consul-dns-ip", "10.99.0.7", "-consul-dns-port", "8600"]);
    assert_eq!(
        udp_lands(&app, "10.99.0.7:53", &socks),
        Some("peer 10.99.0.7:8600")
    );
    assert_eq!(
        udp_lands(&app, "127.0.0.1:53", &socks),
        Some("app 127.0.0.1:53")
    );

    // Neither: the DNS chain exists but is empty and unreferenced.
    apply(&[]);
    assert_eq!(
        udp_lands(&app, "10.99.0.7:53", &socks),
        Some("peer 10.99.0.7:53")
    );
    assert_eq!(
        udp_lands(&app, "127.0.0.1:53", &socks),
        Some("app 127.0.0.1:53")
    );
    let t = nat(&app, "iptables-nft");
    assert!(t.contains(":CONSUL_DNS_REDIRECT - [0:0]"), "{t}");
    assert!(
        !t.contains("-j CONSUL_DNS_REDIRECT") && !t.contains("-A CONSUL_DNS_REDIRECT"),
        "{t}"
    );
}

fn idempotent_then_cleanup(backend: &str) {
    let app = Netns::new(&format!("vrG{backend}")).unwrap();
    let ns = path(&app);
    let ipt = format!("iptables-{backend}");
    // A user's own rules that must survive.
    app.sh_ok(&format!(
        "{ipt} -t nat -A OUTPUT -p tcp --dport 9999 -j REDIRECT --to-ports 9998 && \
         {ipt} -t nat -N MYCHAIN && {ipt} -t nat -A MYCHAIN -d 192.0.2.1 -j RETURN && \
         {ipt} -t nat -A PREROUTING -p tcp -m comment --comment 'user: keep -j CONSUL_PROXY_INBOUND' -j MYCHAIN && \
         {ipt} -t nat -A POSTROUTING -o lo -j ACCEPT"
    ))
    .unwrap();
    let before = nat(&app, &ipt);
    let auto_args = [
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "-exclude-uid",
        "0",
        "-consul-dns-port",
        "8600",
        "-exclude-outbound-cidr",
        "10.0.0.0/8",
        "-netns",
        &ns,
    ];
    let mut args = auto_args.to_vec();
    args.extend(["-iptables-backend", backend]);
    let first = veer_ok(&args);
    assert!(
        first
            .err
            .contains(&format!("using the {backend} iptables back end")),
        "{first:?}"
    );
    let once = nat(&app, &ipt);
    // A restarted init container: the second run exits 0 and changes nothing.
    veer_ok(&args);
    let twice = nat(&app, &ipt);
    assert_eq!(once, twice);
    assert_eq!(
        twice.matches("-j CONSUL_PROXY_OUTPUT").count(),
        1,
        "{twice}"
    );
    // (The user's comment mentions the chain; only real jumps count.)
    assert_eq!(
        twice
            .matches("-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND")
            .count(),
        1,
        "{twice}"
    );
    assert_eq!(
        twice.matches("-j CONSUL_DNS_REDIRECT").count(),
        2,
        "{twice}"
    ); // udp + tcp
    assert_eq!(twice.matches("--uid-owner 5995").count(), 1, "{twice}");
    for user_rule in [
        "--dport 9999",
        "-A MYCHAIN -d 192.0.2.1/32 -j RETURN",
        "-o lo -j ACCEPT",
    ] {
        assert!(twice.contains(user_rule), "{user_rule} lost:\n{twice}");
    }
    // Auto mode finds the back end that holds the chains.
    let auto = veer_ok(&auto_args);
    if backend == "legacy" {
        assert!(
            auto.err.contains("using the legacy iptables back end")
                && auto.err.contains("already holds"),
            "{auto:?}"
        );
        assert!(!nat(&app, "iptables-nft").contains("CONSUL"));
    }
    assert_eq!(nat(&app, &ipt), twice);

    let c = veer_ok(&["cleanup", "-netns", &ns]);
    assert!(
        c.out.contains("Removed Consul traffic redirection rules"),
        "{c:?}"
    );
    assert_eq!(nat(&app, &ipt), before, "cleanup did not restore the table");
    let again = veer_ok(&["--cleanup", "-netns", &ns]);
    assert!(again.out.contains("nothing to clean up"), "{again:?}");
    assert_eq!(nat(&app, &ipt), before);
}

#[test]
fn idempotent_and_cleanup_nft() {
    if require_root("veer-redirect idempotent_and_cleanup_nft") {
        idempotent_then_cleanup("nft");
    }
}

#[test]
fn idempotent_and_cleanup_legacy() {
    if require_root("veer-redirect idempotent_and_cleanup_legacy") {
        idempotent_then_cleanup("legacy");
    }
}

#[test]
fn ipv6_dual_stack() {
    if !require_root("veer-redirect ipv6_dual_stack") {
        return;
    }
    let (app, peer) = pair("v6");
    let ns = path(&app);
    let before4 = nat(&app, "iptables-nft");
    let before6 = nat(&app, "ip6tables-nft");
    let args = [
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "-ipv6",
        "-consul-dns-port",
        "8600",
        "-exclude-outbound-cidr",
        "fd00:99::70/128",
        "-exclude-outbound-cidr",
        "10.99.0.70",
        "-netns",
        &ns,
    ];
    let o = veer_ok(&args);
    assert!(o.out.contains("(IPv4 and IPv6"), "{o:?}");
    veer_ok(&args); // idempotent for both families
    let t6 = nat(&app, "ip6tables-nft");
    assert!(
        t6.contains("-A CONSUL_PROXY_OUTPUT -d ::1/128 -j RETURN"),
        "{t6}"
    );
    assert_eq!(t6.matches("-j CONSUL_PROXY_OUTPUT").count(), 1, "{t6}");

    let link = veer_testsupport::netns::first_link(&peer).unwrap();
    peer.ip(&["addr", "add", "fd00:99::70/64", "dev", &link, "nodad"])
        .unwrap();
    let l = Listeners(vec![
        ("outbound6", listen(&app, "[::1]:15001")),
        ("outbound4", listen(&app, "127.0.0.1:15001")),
        ("inbound", listen(&app, "[::]:20000")),
        ("local6", listen(&app, "[::1]:80")),
        ("remote80", listen(&peer, "[::]:80")),
    ]);
    let (at, s) = l.connect_from(&app, "[fd00:99::7]:80");
    assert_eq!(at, "outbound6");
    assert_eq!(original_dst(&s).to_string(), "[fd00:99::7]:80");
    assert_eq!(l.connect_from(&app, "[::1]:80").0, "local6");
    assert_eq!(l.connect_as(&app, 5995, "fd00:99::7", 80), "remote80");
    assert_eq!(l.connect_from(&app, "[fd00:99::70]:80").0, "remote80"); // excluded CIDR
    let (at, s) = l.connect_from(&peer, "[fd00:99::1]:8080");
    assert_eq!(at, "inbound");
    assert_eq!(original_dst(&s).to_string(), "[fd00:99::1]:8080");
    // IPv4 is still redirected.
    let (at, s) = l.connect_from(&app, "10.99.0.7:80");
    assert_eq!(at, "outbound4");
    assert_eq!(original_dst(&s).to_string(), "10.99.0.7:80");
    assert_eq!(l.connect_from(&app, "10.99.0.70:80").0, "remote80");
    // DNS (dual stack: IPv6 pass only, port only => [::1]:8600).
    let d = udp(&app, "[::1]:8600");
    assert_eq!(udp_lands(&app, "[::1]:53", &[("dns6", &d)]), Some("dns6"));

    veer_ok(&["cleanup", "-ipv6", "-netns", &ns]);
    assert_eq!(nat(&app, "iptables-nft"), before4);
    assert_eq!(nat(&app, "ip6tables-nft"), before6);
}

#[test]
fn failure_changes_nothing_and_shows_the_command() {
    if !require_root("veer-redirect failure_changes_nothing_and_shows_the_command") {
        return;
    }
    let app = Netns::new("vrF").unwrap();
    let ns = path(&app);
    veer_ok(&[
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "-netns",
        &ns,
    ]);
    let good = nat(&app, "iptables-nft");
    // A user name iptables cannot resolve passes our validation but fails in
    // the kernel transaction.
    let o = veer(
        &[
            "-proxy-uid",
            "5995",
            "-proxy-inbound-port",
            "21000",
            "-exclude-uid",
            "no-such-user-veer",
            "-netns",
            &ns,
        ],
        &[],
    );
    assert_eq!(o.code, 1, "{o:?}");
    assert!(o.err.contains("failed to run command: "), "{o:?}");
    assert!(o.err.contains(&format!("--net={ns} -- ")), "{o:?}");
    assert!(
        o.err.contains("-restore -w 10 --noflush, err: exit status"),
        "{o:?}"
    );
    assert!(o.err.contains("no-such-user-veer"), "{o:?}");
    assert!(o.err.contains("input line"), "{o:?}");
    assert!(o.err.contains("nothing was changed"), "{o:?}");
    assert_eq!(nat(&app, "iptables-nft"), good);
}

#[test]
fn rollback_text_puts_the_table_back() {
    if !require_root("veer-redirect rollback_text_puts_the_table_back") {
        return;
    }
    let app = Netns::new("vrR").unwrap();
    let ns = path(&app);
    app.sh_ok("iptables-nft -t nat -A OUTPUT -p tcp --dport 9999 -j REDIRECT --to-ports 9998")
        .unwrap();
    for previous_args in [
        // From a table without Consul rules...
        None,
        // ...and from one with an older Consul configuration.
        Some(vec![
            "-proxy-uid",
            "1",
            "-proxy-inbound-port",
            "21000",
            "-consul-dns-ip",
            "10.0.0.53",
        ]),
    ] {
        if let Some(a) = &previous_args {
            let mut a = a.clone();
            a.extend(["-netns", &ns]);
            veer_ok(&a);
            app.sh_ok("iptables-nft -t nat -A OUTPUT -p udp --dport 5353 -j RETURN")
                .unwrap();
        }
        let raw_before = app.sh_ok("iptables-nft-save -t nat").unwrap();
        veer_ok(&[
            "-proxy-uid",
            "5995",
            "-proxy-inbound-port",
            "20000",
            "-exclude-inbound-port",
            "1:100",
            "-netns",
            &ns,
        ]);
        let raw_now = app.sh_ok("iptables-nft-save -t nat").unwrap();
        assert_ne!(normalize(&raw_now), normalize(&raw_before));
        let text = rollback_text(&NatState::parse(&raw_before), &NatState::parse(&raw_now));
        let mut child = app
            .command("iptables-nft-restore")
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "rollback failed:\n{text}");
        assert_eq!(
            nat(&app, "iptables-nft"),
            normalize(&raw_before),
            "rollback text:\n{text}"
        );
    }
}

#[test]
fn env_json_config_and_netns_field() {
    if !require_root("veer-redirect env_json_config_and_netns_field") {
        return;
    }
    let app = Netns::new("vrJ").unwrap();
    let json = format!(
        r#"{{"ConsulDNSIP":"","ConsulDNSPort":0,"ProxyUserID":"5995","ProxyInboundPort":20000,
            "ProxyOutboundPort":15001,"ExcludeInboundPorts":["20200"],"ExcludeOutboundPorts":null,
            "ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"{}","IptablesProvider":null}}"#,
        path(&app)
    );
    let o = veer(
        &["-exclude-outbound-port", "443"],
        &[("CONSUL_REDIRECT_TRAFFIC_CONFIG", &json)],
    );
    assert_eq!(o.code, 0, "{o:?}");
    let t = nat(&app, "iptables-nft");
    for rule in [
        "-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport 20200 -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5996 -j RETURN",
        "-A CONSUL_PROXY_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
        "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000",
        "-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(t.contains(rule), "missing {rule}:\n{t}");
    }
}

/// Entry point for [`unusable_nat_table_is_explained`]'s child process.
#[test]
fn child_process_entry() {
    let Ok(args) = std::env::var("VEER_REDIRECT_CHILD_ARGS") else {
        return;
    };
    let args: Vec<OsString> = args.split('\u{1f}').map(OsString::from).collect();
    std::process::exit(veer_redirect::main(&args));
}

#[test]
fn unusable_nat_table_is_explained() {
    if !require_root("veer-redirect unusable_nat_table_is_explained") {
        return;
    }
    let app = Netns::new("vrU").unwrap();
    let args = [
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "-netns",
        &path(&app),
    ]
    .join("\u{1f}");
    // Without root/NET_ADMIN (setpriv drops the capabilities with the UID).
    let out = Command::new("setpriv")
        .args(["--reuid", "5995", "--regid", "5995", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VEER_REDIRECT_CHILD_ARGS", &args)
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_default() + ":/usr/sbin:/sbin",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no usable iptables nat table"), "{err}");
    assert!(
        err.contains("nft (IPv4): permission denied (needs root or the NET_ADMIN capability)"),
        "{err}"
    );
    assert!(err.contains("legacy (IPv4): permission denied"), "{err}");

    // The same without -netns: iptables itself is refused (reading only; the
    // host table cannot be changed without the capability).
    let no_ns = ["-proxy-uid", "5995", "-proxy-inbound-port", "20000"].join("\u{1f}");
    let out = Command::new("setpriv")
        .args(["--reuid", "5995", "--regid", "5995", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VEER_REDIRECT_CHILD_ARGS", &no_ns)
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_default() + ":/usr/sbin:/sbin",
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("nft (IPv4): permission denied") && err.contains("you must be root"),
        "{err}"
    );

    // Missing binaries.
    let o = veer(
        &args.split('\u{1f}').collect::<Vec<_>>(),
        &[("PATH", "/nonexistent-veer")],
    );
    assert_eq!(o.code, 1);
    assert!(
        o.err
            .contains("nft (IPv4): missing binary: iptables-nft-restore not found"),
        "{o:?}"
    );
    assert!(
        o.err
            .contains("legacy (IPv4): missing binary: iptables-legacy-restore not found"),
        "{o:?}"
    );
}

#[test]
fn dry_run_shows_real_deletes_and_changes_nothing() {
    if !require_root("veer-redirect dry_run_shows_real_deletes_and_changes_nothing") {
        return;
    }
    let app = Netns::new("vrD").unwrap();
    let ns = path(&app);
    veer_ok(&[
        "-proxy-uid",
        "1",
        "-proxy-inbound-port",
        "21000",
        "-consul-dns-port",
        "8600",
        "-netns",
        &ns,
    ]);
    let before = nat(&app, "iptables-nft");
    let o = veer_ok(&[
        "-proxy-uid",
        "5995",
        "-proxy-inbound-port",
        "20000",
        "--dry-run",
        "-netns",
        &ns,
    ]);
    assert!(
        o.err
            .contains("dry run; would use the nft iptables back end"),
        "{o:?}"
    );
    assert!(
        o.out.starts_with(&format!(
            "# IPv4: /usr/sbin/iptables-nft-restore -w 10 --noflush in network namespace {ns}\n"
        )),
        "{o:?}"
    );
    for line in [
        "-D OUTPUT -d 127.0.0.1/32 -p udp -m udp --dport 53 -j CONSUL_DNS_REDIRECT",
        "-D OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT",
        "-D PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
        "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000",
    ] {
        assert!(o.out.lines().any(|l| l == line), "missing {line}: {o:?}");
    }
    assert_eq!(nat(&app, "iptables-nft"), before);
}
