//! End-to-end tests of the L4 data plane (issue 2) in real network
//! namespaces: Consul's redirect rules, two veer sidecars as UID 5995, a
//! test CA, real clients (curl, openssl s_client) where they fit.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use veer_ca::{Ca, LeafSpec};
use veer_testsupport::ca::TRUST_DOMAIN;
use veer_testsupport::echo::{Checksum, Stream};
use veer_testsupport::mesh::{
    self, Mesh, Sidecar, API_VIP, BLACKHOLE_IP, PLAIN_IP, PROXY_UID, SERVER_IP,
};
use veer_testsupport::netns::Netns;

mod support;

/// Open sockets of a process (pooled splice pipes are not counted: the
/// pool keeps a few by design).
fn sockets(pid: u32) -> usize {
    support::sockets_and_pipes(pid).0
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

macro_rules! need_root {
    ($name:expr) => {
        if !veer_testsupport::require_root($name) {
            return;
        }
    };
}

/// Connects from inside `ns` (the socket stays usable from this thread).
fn connect(ns: &Netns, addr: &str) -> std::io::Result<TcpStream> {
    let a: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
        // May fail when the peer already reset the connection; reads will say so.
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        Ok(s)
    })
}

/// Sends `E<msg>`, half-closes, and returns what came back before EOF.
fn echo(ns: &Netns, addr: &str, msg: &str) -> std::io::Result<String> {
    let mut s = connect(ns, addr)?;
    s.write_all(format!("E{msg}").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The sum of every sample labelled `reason="<reason>"`.
fn count_reason(stats: &str, reason: &str) -> u64 {
    let label = format!("reason=\"{reason}\"");
    stats
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn allowed_call_reaches_the_app_through_both_sidecars() {
    need_root!("allowed_call_reaches_the_app_through_both_sidecars");
    let m = Mesh::new(&bin());
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "hello").unwrap(),
        "hello"
    );
    // Any port of a virtual IP goes to the upstream, as in Consul.
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:7777"), "any port").unwrap(),
        "any port"
    );
    assert_eq!(m.app.accepted(), 2);
    assert!(
        m.web.wait_log("upstream=api", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    assert!(
        m.api.wait_log("svc/web", Duration::from_secs(3)),
        "api sees web's SPIFFE identity:\n{}",
        m.api.log_text()
    );
}

#[test]
fn ipv6_original_destination() {
    need_root!("ipv6_original_destination");
    let m = Mesh::new(&bin());
    assert_eq!(
        echo(&m.client, "[fd00::20]:443", "over v6").unwrap(),
        "over v6"
    );
    assert_eq!(m.app.accepted(), 1);
    assert!(
        m.web
            .wait_log("orig_dst=[fd00::20]:443", Duration::from_secs(3)),
        "{}",
        m.web.log_text()
    );
}

#[test]
fn explicit_upstream_listener() {
    need_root!("explicit_upstream_listener");
    let m = Mesh::new(&bin());
    assert_eq!(
        echo(&m.client, "127.0.0.1:9191", "explicit").unwrap(),
        "explicit"
    );
    assert_eq!(m.app.accepted(), 1);
}

#[test]
fn passthrough_to_a_non_mesh_server_with_curl() {
    need_root!("passthrough_to_a_non_mesh_server_with_curl");
    let m = Mesh::new(&bin());
    let out = m
        .client
        .sh_ok(&format!("curl -sS --max-time 10 http://{PLAIN_IP}:9000/"))
        .unwrap();
    assert_eq!(out, "hello from plain\n");
    assert_eq!(m.plain.accepted(), 1);
    assert_eq!(m.app.accepted(), 0);
    assert!(
        m.web
            .wait_log("upstream=passthrough relay=splice", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
}

#[test]
fn dialed_directly_instance_gets_mtls_to_the_original_destination() {
    need_root!("dialed_directly_instance_gets_mtls_to_the_original_destination");
    let api = format!(
        "{}\ndialed_directly = true\ninstances = [\"{SERVER_IP}\"]",
        mesh::api_endpoints()
    );
    let m = Mesh::with_api(&bin(), &api, "", &mesh::allow("web"));
    // The app port of the instance: web dials it with mTLS, the server's
    // PREROUTING rule hands it to the api sidecar, which checks web's identity.
    assert_eq!(
        echo(&m.client, &format!("{SERVER_IP}:8080"), "direct").unwrap(),
        "direct"
    );
    assert_eq!(m.app.accepted(), 1);
    assert!(
        m.api.wait_log("svc/web", Duration::from_secs(3)),
        "{}",
        m.api.log_text()
    );
}

/// Runs `openssl s_client` from the client namespace as the proxy UID (so it
/// is not redirected) against the api sidecar, sending `E<payload>`.
fn s_client(m: &Mesh, cert: Option<(&PathBuf, &PathBuf)>, payload: &str) -> String {
    let mut cmd = m.client.command("setpriv");
    cmd.args([
        &format!("--reuid={PROXY_UID}"),
        &format!("--regid={PROXY_UID}"),
        "--clear-groups",
    ])
    .args(["timeout", "10", "openssl", "s_client", "-quiet", "-connect"])
    .arg(format!("{SERVER_IP}:20000"))
    .arg("-CAfile")
    .arg(m.ca.roots());
    if let Some((c, k)) = cert {
        // -cert sends only the leaf; -cert_chain adds the intermediates.
        cmd.arg("-cert")
            .arg(c)
            .arg("-key")
            .arg(k)
            .arg("-cert_chain")
            .arg(c);
    }
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("E{payload}").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bad_peers_are_refused_and_the_app_sees_nothing() {
    need_root!("bad_peers_are_refused_and_the_app_sees_nothing");
    let m = Mesh::new(&bin());
    // A valid, trusted identity that intentions deny (default deny).
    let evil = m.ca.service("evil");
    // Another trust domain (another CA), claiming to be web.
    let other = Ca::new_root("99999999-2222-3333-4444-555555555555.consul").unwrap();
    let fake = other
        .issue(&LeafSpec::service(TRUST_DOMAIN, "dc1", "web"))
        .unwrap();
    let fake = (
        m.files.write("fake.pem", &fake.chain_pem),
        m.files.write("fake-key.pem", &fake.key_pem),
    );
    let expired = m.ca.write_leaf(
        "expired",
        &LeafSpec::service(TRUST_DOMAIN, "dc1", "web").valid_between(-7200, -3600),
    );
    let future = m.ca.write_leaf(
        "future",
        &LeafSpec::service(TRUST_DOMAIN, "dc1", "web").valid_between(3600, 7200),
    );
    let mut server_only = LeafSpec::service(TRUST_DOMAIN, "dc1", "web");
    server_only.client_auth = false;
    let server_only = m.ca.write_leaf("serveronly", &server_only);

    type Cert<'a> = Option<(&'a PathBuf, &'a PathBuf)>;
    let cases: Vec<(&str, Cert, &str)> = vec![
        (
            "denied identity",
            Some((&evil.0, &evil.1)),
            "denied_by_default",
        ),
        (
            "other trust domain",
            Some((&fake.0, &fake.1)),
            "cert_untrusted",
        ),
        ("expired", Some((&expired.0, &expired.1)), "cert_expired"),
        (
            "not yet valid",
            Some((&future.0, &future.1)),
            "cert_not_yet_valid",
        ),
        (
            "no client-auth usage",
            Some((&server_only.0, &server_only.1)),
            "cert_bad_usage",
        ),
        ("no client certificate", None, "no_client_cert"),
    ];
    for (what, cert, reason) in cases {
        let out = s_client(&m, cert, "secret");
        assert!(
            !out.contains("secret"),
            "{what}: bytes reached the app: {out:?}"
        );
        assert!(
            m.api
                .wait_log(&format!("reason={reason}"), Duration::from_secs(5)),
            "{what}: no '{reason}' in the api log:\n{}",
            m.api.log_text()
        );
    }
    // Plaintext garbage on the inbound port (through web's passthrough).
    let mut s = connect(&m.client, &format!("{SERVER_IP}:20000")).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        m.api.wait_log("reason=not_tls", Duration::from_secs(5)),
        "{}",
        m.api.log_text()
    );
    assert_eq!(
        m.app.accepted(),
        0,
        "no refused peer may reach the local app"
    );

    // Each refusal is counted under its own reason.
    let stats = support::scrape(&m.server);
    for reason in [
        "denied_by_default",
        "cert_untrusted",
        "cert_expired",
        "cert_not_yet_valid",
        "cert_bad_usage",
        "no_client_cert",
        "not_tls",
    ] {
        assert!(
            count_reason(&stats, reason) >= 1,
            "reason {reason} not counted:\n{stats}"
        );
    }

    // Everyone else keeps being served: web with its real cert works.
    let web = (m.ca.dir.join("web.pem"), m.ca.dir.join("web-key.pem"));
    assert_eq!(s_client(&m, Some((&web.0, &web.1)), "fine"), "fine");
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "still ok").unwrap(),
        "still ok"
    );
    assert_eq!(m.app.accepted(), 2);
}

#[test]
fn headless_destination_that_never_answers_fails_after_5s() {
    need_root!("headless_destination_that_never_answers_fails_after_5s");
    let m = Mesh::new(&bin());
    let started = Instant::now();
    let mut s = connect(&m.client, &format!("{BLACKHOLE_IP}:5432")).unwrap();
    let _ = s.write_all(b"Ehello");
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    let took = started.elapsed();
    assert!(buf.is_empty(), "{r:?}");
    assert!(
        took >= Duration::from_secs(5),
        "gave up after {took:?}, before the 5 s connect timeout"
    );
    assert!(
        took < Duration::from_secs(6),
        "gave up after {took:?}, later than 6 s"
    );
    assert!(
        m.web.wait_log("reason=timeout", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
}

#[test]
fn fin_in_each_direction_independently() {
    need_root!("fin_in_each_direction_independently");
    let m = Mesh::new(&bin());
    for dst in [format!("{API_VIP}:80"), format!("{PLAIN_IP}:9000")] {
        // Client FIN first: the server still answers after seeing EOF.
        assert_eq!(echo(&m.client, &dst, "ping").unwrap(), "ping", "{dst}");
        // Server FIN first: the client still sends after seeing EOF.
        let mut s = connect(&m.client, &dst).unwrap();
        s.write_all(b"B").unwrap();
        let mut banner = String::new();
        s.read_to_string(&mut banner).unwrap();
        assert_eq!(banner, "BANNER\n", "{dst}");
        s.write_all(&[7u8; 1000]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let app = if dst.starts_with(PLAIN_IP) {
            &m.plain
        } else {
            &m.app
        };
        assert!(
            wait_until(Duration::from_secs(5), || app
                .banner_received
                .lock()
                .unwrap()
                .last()
                == Some(&1000)),
            "{dst}: server did not receive the bytes sent after its FIN"
        );
    }
}

/// Streams `total` bytes in `S` mode and checks the app's count and checksum.
fn bulk(ns: &Netns, dst: &str, total: usize, pace: Option<Duration>) -> Duration {
    let mut s = connect(ns, dst).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let started = Instant::now();
    s.write_all(b"S").unwrap();
    let mut gen = Stream::new();
    let mut chunk = vec![0u8; 1 << 20];
    let (mut sent, mut sum) = (0usize, Checksum::default());
    while sent < total {
        gen.fill(&mut chunk);
        s.write_all(&chunk).unwrap();
        sum.update(&chunk);
        sent += chunk.len();
        if let Some(p) = pace {
            std::thread::sleep(p);
        }
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let took = started.elapsed();
    assert_eq!(
        answer,
        format!("{total} {}\n", sum.finish()),
        "bytes or content differ"
    );
    took
}

#[test]
fn one_gibibyte_arrives_byte_identical() {
    need_root!("one_gibibyte_arrives_byte_identical");
    let m = Mesh::new(&bin());
    let gib = 1usize << 30;
    let t = bulk(&m.client, &format!("{API_VIP}:80"), gib, None);
    eprintln!(
        "1 GiB through both sidecars (mTLS): {:.0} MiB/s (test build)",
        1024.0 / t.as_secs_f64()
    );
    let t = bulk(&m.client, &format!("{PLAIN_IP}:9000"), gib, None);
    eprintln!(
        "1 GiB passthrough (splice): {:.0} MiB/s (test build)",
        1024.0 / t.as_secs_f64()
    );
    assert!(m.web.wait_log("relay=splice", Duration::from_secs(2)));
}

fn serial_of(pem: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn cert_rotation_keeps_a_long_transfer_alive_and_new_connections_get_the_new_cert() {
    need_root!("cert_rotation_keeps_a_long_transfer_alive_and_new_connections_get_the_new_cert");
    let m = Mesh::new(&bin());
    let old = serial_of(&m.ca.dir.join("api.pem"));
    let ns = m.client.path();
    // ~4 s of paced transfer through both sidecars.
    let long = std::thread::spawn(move || {
        veer_testsupport::netns::enter(&ns).unwrap();
        let tmp = Netns::attach_current();
        bulk(
            &tmp,
            &format!("{API_VIP}:80"),
            200 << 20,
            Some(Duration::from_millis(20)),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    // Rotate: a new leaf (new key, new serial) for api, written in place.
    let before = m.api.log_text().matches("configuration reloaded").count();
    m.ca.service("api");
    let new = serial_of(&m.ca.dir.join("api.pem"));
    assert_ne!(old, new);
    assert!(
        m.api
            .wait_log_count("configuration reloaded", before + 1, Duration::from_secs(5)),
        "{}",
        m.api.log_text()
    );
    // A new connection sees the new certificate.
    let out = m
        .client
        .sh_ok(&format!(
            "setpriv --reuid={PROXY_UID} --regid={PROXY_UID} --clear-groups sh -c 'echo Ex | timeout 10 openssl s_client -connect {SERVER_IP}:20000 -cert {c} -key {k} 2>/dev/null | openssl x509 -noout -serial'",
            c = m.ca.dir.join("web.pem").display(),
            k = m.ca.dir.join("web-key.pem").display()
        ))
        .unwrap();
    assert_eq!(
        out.trim(),
        new,
        "new connections must get the new certificate"
    );
    assert!(
        !long.is_finished(),
        "the transfer should still be running during the rotation"
    );
    long.join()
        .expect("the long transfer survived the rotation byte-identical");
}

#[test]
fn intention_change_closes_open_connections_and_refuses_new_ones() {
    need_root!("intention_change_closes_open_connections_and_refuses_new_ones");
    let m = Mesh::new(&bin());
    let mut open = connect(&m.client, &format!("{API_VIP}:80")).unwrap();
    open.write_all(b"E1").unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).unwrap();
    assert_eq!(m.app.accepted(), 1);
    m.reconfigure_api("deny", &mesh::deny("web"));
    // The open connection is closed by the api sidecar.
    open.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let r = open.read_to_end(&mut rest);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "open connection not closed: {r:?}"
    );
    assert!(
        m.api.log_text().contains("intentions now deny its source"),
        "{}",
        m.api.log_text()
    );
    // New connections are refused before reaching the app.
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "again").unwrap_or_default(),
        ""
    );
    assert_eq!(m.app.accepted(), 1);
    assert!(m
        .api
        .wait_log("reason=denied_by_intention", Duration::from_secs(2)));
}

#[test]
fn connection_to_the_outbound_listener_itself_is_refused_not_looped() {
    need_root!("connection_to_the_outbound_listener_itself_is_refused_not_looped");
    let m = Mesh::new(&bin());
    // Refused at once with a reset (possibly before connect() returns).
    if let Ok(mut s) = connect(&m.client, "127.0.0.1:15001") {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty());
    }
    assert!(
        m.web.wait_log("refusing to loop", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    assert_eq!(
        m.web.log_text().matches("refusing to loop").count(),
        1,
        "exactly one refusal, no loop"
    );
}

#[test]
fn proxy_traffic_redirected_back_is_refused_not_looped() {
    need_root!("proxy_traffic_redirected_back_is_refused_not_looped");
    let m = Mesh::new(&bin());
    let before = m.web.pid().map(sockets).unwrap_or(0);
    // The mistake of a redirect without the proxy UID's exclusion: veer's
    // own dials come back to its outbound listener.
    m.client
        .sh_ok(&format!(
            "iptables -t nat -D CONSUL_PROXY_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN"
        ))
        .expect("drop the proxy UID exclusion");
    for (dst, what) in [
        (format!("{PLAIN_IP}:9000"), "passthrough"),
        (format!("{API_VIP}:80"), "mesh"),
    ] {
        let t = Instant::now();
        let r = echo(&m.client, &dst, "loop?");
        assert!(
            r.as_deref().map_or(true, |o| o.is_empty()),
            "{what}: a looped call got an answer: {r:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{what}: took {:?}",
            t.elapsed()
        );
    }
    assert!(
        m.web
            .wait_log("comes from veer's own dial", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    // Cut after a few turns (net::MAX_TURNS), one refusal per call, not
    // after thousands of dials.
    let loops = count_reason(&support::scrape(&m.client), "loop");
    assert!((1..=6).contains(&loops), "{loops} loop refusals");
    assert_eq!(m.plain.accepted(), 0, "the looped call reached its server");
    // Nothing piles up: descriptors back to where they were.
    let pid = m.web.pid().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || sockets(pid) <= before + 2),
        "web holds {} sockets, {before} before",
        sockets(pid)
    );
}

/// The kernel gives veer's dials and the app's connections the same source
/// ports whenever their destinations differ; none of that is a loop. With
/// the client namespace down to two ephemeral ports, a held passthrough
/// call makes veer's dial take the second port, and of two held mesh calls
/// one gets a source port that one of veer's open dials already uses.
#[test]
fn app_connections_sharing_source_ports_with_veers_dials_are_served() {
    need_root!("app_connections_sharing_source_ports_with_veers_dials_are_served");
    let m = Mesh::new(&bin());
    m.client
        .sh_ok("sysctl -qw net.ipv4.ip_local_port_range='40000 40001' net.ipv4.tcp_tw_reuse=1")
        .expect("port range");
    let vip = format!("{API_VIP}:80");
    let open = |dst: &str| {
        let mut s = None;
        assert!(wait_until(Duration::from_secs(5), || {
            s = connect(&m.client, dst).ok();
            s.is_some()
        }));
        let mut s = s.unwrap();
        s.write_all(b"Eo").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one)
            .unwrap_or_else(|e| panic!("{dst}: {e}\n{}", m.web.log_text()));
        s
    };
    for _ in 0..3 {
        let x = open(&format!("{PLAIN_IP}:9000"));
        let b = open(&vip);
        let c = open(&vip);
        drop((x, b, c));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(count_reason(&support::scrape(&m.client), "loop"), 0);
}

#[test]
fn upstream_presenting_another_identity_or_an_untrusted_chain_is_refused() {
    need_root!("upstream_presenting_another_identity_or_an_untrusted_chain_is_refused");
    let m = Mesh::new(&bin());
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "ok").unwrap(),
        "ok"
    );
    // The api's sidecar is swapped for one that is really db (default
    // allow, so only web's check can stop the call).
    let reload = |text: String, n: usize| {
        m.files.write("api.toml", &text);
        assert!(
            m.api
                .wait_log_count("configuration reloaded", n, Duration::from_secs(5)),
            "{}",
            m.api.log_text()
        );
    };
    m.ca.service("db");
    let db = mesh::api_config(&m.ca, "allow", "")
        .replace("name = \"api\"", "name = \"db\"")
        .replace("api.pem", "db.pem")
        .replace("api-key.pem", "db-key.pem");
    reload(db, 1);
    let app_before = m.app.accepted();
    let log_before = m.api.log_text().len();
    let r = echo(&m.client, &format!("{API_VIP}:80"), "to db?");
    assert!(r.as_deref().map_or(true, |o| o.is_empty()), "{r:?}");
    assert!(
        m.web
            .wait_log("reason=server_identity", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    assert!(m.web.log_text().contains("/svc/db"), "{}", m.web.log_text());
    // The identity is checked inside the handshake: web never sent its
    // certificate, so the impostor could not authenticate web, and its app
    // saw no connection at all.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        m.app.accepted(),
        app_before,
        "the impostor's app got a connection\n{}",
        m.api.log_text()
    );
    let after = m.api.log_text()[log_before..].to_string();
    assert!(
        !after.contains("source=spiffe://"),
        "the impostor authenticated web: {after}"
    );
    assert!(after.contains("reason=alert_received"), "{after}");

    // A leaf for api from a CA web does not trust (the api side trusts it).
    let other = Ca::new_root(TRUST_DOMAIN).unwrap();
    let fake = other
        .issue(&LeafSpec::service(TRUST_DOMAIN, "dc1", "api"))
        .unwrap();
    m.files.write("fake-api.pem", &fake.chain_pem);
    m.files.write("fake-api-key.pem", &fake.key_pem);
    let bundle = format!(
        "{}{}",
        std::fs::read_to_string(m.ca.roots()).unwrap(),
        other.cert_pem
    );
    m.files.write("both-roots.pem", &bundle);
    let (cert, key) = m.ca.service("api");
    let roots = m.ca.roots();
    let untrusted = mesh::api_config(&m.ca, "allow", "")
        .replace(
            &roots.display().to_string(),
            &m.files.join("both-roots.pem").display().to_string(),
        )
        .replace(
            &cert.display().to_string(),
            &m.files.join("fake-api.pem").display().to_string(),
        )
        .replace(
            &key.display().to_string(),
            &m.files.join("fake-api-key.pem").display().to_string(),
        );
    reload(untrusted, 2);
    let r = echo(&m.client, &format!("{API_VIP}:80"), "to an impostor?");
    assert!(r.as_deref().map_or(true, |o| o.is_empty()), "{r:?}");
    assert!(
        m.web
            .wait_log("reason=cert_untrusted", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    let stats = support::scrape(&m.client);
    assert!(count_reason(&stats, "server_identity") >= 1, "{stats}");
    assert!(count_reason(&stats, "cert_untrusted") >= 1, "{stats}");
}

#[test]
fn mesh_destinations_only_and_bad_reloads() {
    need_root!("mesh_destinations_only_and_bad_reloads");
    let m = Mesh::new(&bin());
    assert_eq!(
        echo(&m.client, &format!("{PLAIN_IP}:9000"), "open").unwrap(),
        "open"
    );
    // Turn on mesh_destinations_only by editing web's file: hot reload.
    let cfg = std::fs::read_to_string(&m.web.config).unwrap();
    let before = m.web.log_text().matches("configuration reloaded").count();
    m.files.write(
        "web.toml",
        &cfg.replace(
            "bind = \"127.0.0.1:15001\"",
            "bind = \"127.0.0.1:15001\"\nmesh_destinations_only = true",
        ),
    );
    assert!(m
        .web
        .wait_log_count("configuration reloaded", before + 1, Duration::from_secs(5)));
    assert_eq!(
        echo(&m.client, &format!("{PLAIN_IP}:9000"), "closed").unwrap_or_default(),
        ""
    );
    assert!(m.web.wait_log("reason=not_in_mesh", Duration::from_secs(2)));
    assert_eq!(m.plain.accepted(), 1, "refused before dialing");
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "mesh ok").unwrap(),
        "mesh ok"
    );
    // A broken file is rejected with its line and the current snapshot stays.
    m.files.write(
        "web.toml",
        &cfg.replace(
            "endpoints = [\"10.77.0.2:20000\"]",
            "endpoints = [\"10.77.0.2\"]",
        ),
    );
    assert!(
        m.web.wait_log(
            "rejected, keeping the current snapshot",
            Duration::from_secs(5)
        ),
        "{}",
        m.web.log_text()
    );
    assert!(m.web.log_text().contains("upstreams[0].endpoints"));
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "kept").unwrap(),
        "kept"
    );
}

#[test]
fn validate_names_the_key_and_line() {
    let dir = veer_testsupport::ca::TempDir::new("veer-validate-");
    let ca = veer_testsupport::ca::TestCa::new(TRUST_DOMAIN);
    let good = mesh::api_config(&ca, "deny", &mesh::allow("web"));
    let ok = dir.write("good.toml", &good);
    let out = Command::new(bin())
        .args(["validate", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = dir.write(
        "bad.toml",
        &good.replace(
            "local_app = \"127.0.0.1:8080\"",
            "local_app = \"localhost\"",
        ),
    );
    let out = Command::new(bin())
        .args(["validate", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = good
        .lines()
        .position(|l| l.starts_with("local_app"))
        .unwrap()
        + 1;
    assert!(
        err.contains(&format!("bad.toml:{line}: inbound.local_app:")),
        "{err}"
    );
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "run refuses a bad file too");
}

#[test]
fn several_roots_at_once_and_intermediate_chains_are_trusted() {
    need_root!("several_roots_at_once_and_intermediate_chains_are_trusted");
    let m = Mesh::new(&bin());
    // A second root (as during a Consul CA rotation), and a leaf for web
    // signed by an intermediate of it (as a secondary datacenter's).
    let next = Ca::new_root(TRUST_DOMAIN).unwrap();
    let inter = next.intermediate("pri-1.consul.ca").unwrap();
    let leaf = inter
        .issue(&LeafSpec::service(TRUST_DOMAIN, "dc1", "web"))
        .unwrap();
    let web2 = (
        m.files.write("web2.pem", &leaf.chain_pem),
        m.files.write("web2-key.pem", &leaf.key_pem),
    );
    // Not trusted yet.
    assert_eq!(s_client(&m, Some((&web2.0, &web2.1)), "early"), "");
    assert!(m
        .api
        .wait_log("reason=cert_untrusted", Duration::from_secs(5)));
    // Add the new root to the bundle: both roots are trusted at once.
    let before = m.api.log_text().matches("configuration reloaded").count();
    let bundle = format!("{}{}", m.ca.ca.cert_pem, next.cert_pem);
    m.ca.dir.write("roots.pem", &bundle);
    assert!(m
        .api
        .wait_log_count("configuration reloaded", before + 1, Duration::from_secs(5)));
    assert_eq!(
        s_client(&m, Some((&web2.0, &web2.1)), "new root"),
        "new root"
    );
    let web = (m.ca.dir.join("web.pem"), m.ca.dir.join("web-key.pem"));
    assert_eq!(s_client(&m, Some((&web.0, &web.1)), "old root"), "old root");
    assert_eq!(m.app.accepted(), 2);
}

/// New connections between two sidecars resume their TLS session (as
/// Envoy's do): no certificates or signatures after the first, also with
/// many connections starting at once, and across a reload that does not
/// touch the certificates; both sides count it.
#[test]
fn new_connections_resume_tls_sessions() {
    need_root!("new_connections_resume_tls_sessions");
    // One TLS connection per app connection (as with an Envoy peer): with
    // multiplexing there would be one handshake in all.
    let m = Mesh::with(&bin(), "\n[mux]\nenabled = false\n", &mesh::allow("web"));
    let vip = format!("{API_VIP}:80");
    for i in 0..20 {
        assert_eq!(
            echo(&m.client, &vip, &format!("s{i}")).unwrap(),
            format!("s{i}")
        );
    }
    // 8 at a time.
    for round in 0..10 {
        std::thread::scope(|sc| {
            for k in 0..8 {
                let (c, v) = (&m.client, &vip);
                sc.spawn(move || {
                    let msg = format!("p{round}.{k}");
                    assert_eq!(echo(c, v, &msg).unwrap(), msg);
                });
            }
        });
    }
    let sample = |text: &str, dir: &str, kind: &str| {
        support::sample(
            text,
            &format!("veer_tls_handshakes_total{{direction=\"{dir}\",kind=\"{kind}\"}}"),
        )
    };
    let web = support::scrape(&m.client);
    let api = support::scrape(&m.server);
    let (full, resumed) = (
        sample(&web, "outbound", "full"),
        sample(&web, "outbound", "resumed"),
    );
    eprintln!("outbound handshakes: {full} full, {resumed} resumed");
    assert_eq!(full + resumed, 100, "{web}");
    // The first only: each connection brings back four single-use
    // tickets, and web keeps up to eight, enough for 8 at once.
    assert!(full <= 3, "{full} full handshakes of 100");
    assert_eq!(sample(&api, "inbound", "full"), full, "{api}");
    assert_eq!(sample(&api, "inbound", "resumed"), resumed, "{api}");
    // A reload that changes intentions only (same certificate files)
    // keeps the api's TLS configuration, so the tickets web holds still
    // resume.
    let cfg = std::fs::read_to_string(&m.api.config).unwrap();
    assert!(cfg.contains("default_action = \"deny\""), "{cfg}");
    m.files.write(
        "api.toml",
        &cfg.replace("default_action = \"deny\"", "default_action = \"allow\""),
    );
    assert!(m
        .api
        .wait_log("configuration reloaded", Duration::from_secs(5)));
    for i in 0..10 {
        assert_eq!(
            echo(&m.client, &vip, &format!("r{i}")).unwrap(),
            format!("r{i}")
        );
    }
    let web = support::scrape(&m.client);
    assert_eq!(
        sample(&web, "outbound", "full"),
        full,
        "a reload without new certificates made full handshakes: {web}"
    );
    assert_eq!(sample(&web, "outbound", "resumed"), resumed + 10, "{web}");
}

/// Voluntary and involuntary context switches of every thread of `pid`.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Syscalls counted by `perf stat` (tracepoints) for one process, by
/// name; `None` when perf cannot count them here.
struct SyscallCount(Option<std::process::Child>, PathBuf);

const COUNTED: &[&str] = &[
    "read",
    "recvfrom",
    "write",
    "writev",
    "sendto",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
    "sched_yield",
    "madvise",
    "mprotect",
    "brk",
    "mmap",
    "munmap",
];

impl SyscallCount {
    fn start(pid: u32, out: PathBuf) -> SyscallCount {
        let mut events = vec!["raw_syscalls:sys_enter".to_string()];
        events.extend(COUNTED.iter().map(|s| format!("syscalls:sys_enter_{s}")));
        events.push("page-faults".into());
        let child = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-e",
                &events.join(","),
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok();
        SyscallCount(child, out)
    }

    /// Stops perf; `(name, count)` with the total first.
    fn stop(mut self) -> Option<Vec<(String, u64)>> {
        let mut child = self.0.take()?;
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        child.wait().ok()?;
        let text = std::fs::read_to_string(&self.1).ok()?;
        let counts: Vec<(String, u64)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let v = f.first()?.parse::<u64>().ok()?;
                let name = f.get(2)?.trim_start_matches("syscalls:sys_enter_");
                Some((name.trim_start_matches("raw_syscalls:").to_string(), v))
            })
            .collect();
        (!counts.is_empty()).then_some(counts)
    }
}

/// Syscalls and wake-ups per keep-alive request (issue 14), through both
/// sidecars (default `--concurrency 2`): 16 keep-alive connections making
/// 625 request/answer round trips each (10,000 requests), then one
/// connection with one request in flight (2,000). Context switches come
/// from /proc always; syscalls by name from `perf stat` where perf can
/// count tracepoints (else a note). Per sidecar and request the relay
/// makes one `recvfrom` and one `sendto` per direction (a whole TLS write
/// goes out in one `sendto`, however many records it takes), plus the
/// event loop's `epoll_wait` (fewer than one per request when events come
/// together) and the workers' wake-ups (`futex`, eventfd `write`). The
/// bounds leave headroom over that, so that a change that adds a syscall
/// to every request fails.
#[test]
fn keepalive_syscalls_per_request() {
    need_root!("keepalive_syscalls_per_request");
    const MSG: usize = 100;
    let m = Mesh::new(&bin());
    let vip = format!("{API_VIP}:80");
    let open = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = connect(&m.client, &vip).unwrap();
                s.set_nodelay(true).unwrap();
                s.write_all(b"E").unwrap();
                s
            })
            .collect()
    };
    let round_trips = |conns: &mut [TcpStream], n: usize| {
        std::thread::scope(|sc| {
            for s in conns.iter_mut() {
                sc.spawn(move || {
                    let req = [b'k'; MSG];
                    let mut answer = [0u8; MSG];
                    for _ in 0..n {
                        s.write_all(&req).unwrap();
                        s.read_exact(&mut answer).unwrap();
                        assert_eq!(answer, req);
                    }
                });
            }
        });
    };
    let pids = [support::pid(&m.web), support::pid(&m.api)];
    let mut perf_missing = false;
    // (connections, round trips each, bounds on syscalls and on context
    // switches per request). With one request in flight each direction
    // wakes a sidecar, and the two workers hand work to each other.
    let phases = [(16, 625, 6.0, 2.5), (1, 2000, 8.0, 5.0)];
    for (phase, (n, rounds, bound, cs_bound)) in phases.into_iter().enumerate() {
        let mut conns = open(n);
        round_trips(&mut conns, 50);
        let counts: Vec<SyscallCount> = pids
            .iter()
            .zip(["web", "api"])
            .map(|(p, name)| {
                SyscallCount::start(*p, m.files.join(&format!("syscalls-{name}-{phase}.csv")))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let cs0: Vec<u64> = pids.iter().map(|p| context_switches(*p)).collect();
        round_trips(&mut conns, rounds);
        let cs1: Vec<u64> = pids.iter().map(|p| context_switches(*p)).collect();
        let requests = (n * rounds) as f64;
        for (i, (name, c)) in ["web", "api"].into_iter().zip(counts).enumerate() {
            let cs = (cs1[i] - cs0[i]) as f64 / requests;
            let counted = c.stop();
            let what = format!("{name}, {n} connection(s)");
            eprintln!("{what}: {cs:.2} context switches per request");
            assert!(
                cs < cs_bound,
                "{what}: {cs:.2} context switches per request"
            );
            match counted {
                None => perf_missing = true,
                Some(counts) => {
                    let per = |v: u64| v as f64 / requests;
                    let each: Vec<String> = counts[1..]
                        .iter()
                        .filter(|(_, v)| per(*v) >= 0.01)
                        .map(|(n, v)| format!("{n} {:.2}", per(*v)))
                        .collect();
                    let total = per(counts[0].1);
                    eprintln!(
                        "{what}: {total:.2} syscalls per request ({})",
                        each.join(", ")
                    );
                    assert!(total < bound, "{what}: {total:.2} syscalls per request");
                    // Freeing a quiet connection's buffers does not trim
                    // the heap (sys::keep_free_heap_top).
                    let trims = counts
                        .iter()
                        .find(|(n, _)| n == "madvise")
                        .map_or(0, |c| c.1);
                    assert!(
                        per(trims) < 0.05,
                        "{what}: {:.2} madvise per request",
                        per(trims)
                    );
                }
            }
        }
    }
    if perf_missing {
        eprintln!("keepalive_syscalls_per_request: perf cannot count syscalls here; context switches only");
    }
}

/// `VEER_DISABLE_SPLICE` sends passthrough through the userspace copy relay
/// (the fallback for kernels that refuse splice), bytes intact; and
/// `--log-format json` writes one JSON object per line, the access log
/// included.
#[test]
fn splice_fallback_and_json_logs() {
    need_root!("splice_fallback_and_json_logs");
    let mut m = Mesh::new(&bin());
    m.web.signal("INT");
    assert_eq!(m.web.wait_exit(Duration::from_secs(5)), Some(0));
    let cfg = m.web.config.clone();
    let args: Vec<std::ffi::OsString> = vec![
        "--config".into(),
        cfg.clone().into(),
        "--log-format".into(),
        "json".into(),
    ];
    m.web = mesh::Sidecar::start_with(
        &bin(),
        &m.client,
        &args,
        &[("VEER_DISABLE_SPLICE", "1")],
        cfg,
        m.files.join("web-json.log"),
    );
    // 4 MiB through the passthrough path, checksummed by the server.
    let mut s = connect(&m.client, &format!("{PLAIN_IP}:9000")).unwrap();
    let mut src = Stream::new();
    let mut sum = Checksum::default();
    s.write_all(b"S").unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..64 {
        src.fill(&mut buf);
        sum.update(&buf);
        s.write_all(&buf).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, format!("{} {}\n", 64 * 64 * 1024, sum.finish()));
    assert!(
        m.web.wait_log("\"relay\":\"copy\"", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    let text = m.web.log_text();
    let mut access = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["target"] == "veer::access" {
            access += 1;
            assert_eq!(v["upstream"], "passthrough", "{line}");
            assert_eq!(v["relay"], "copy", "{line}");
            assert_eq!(v["rx_bytes"], 64 * 64 * 1024 + 1, "{line}");
        }
    }
    assert_eq!(access, 1, "{text}");
}

/// Consul's permissive mTLS: plain TCP to a permissive port of the api's
/// pod reaches its app; every other port still needs mTLS.
#[test]
fn permissive_port_is_relayed_as_plain_tcp_and_other_ports_need_mtls() {
    need_root!("permissive_port_is_relayed_as_plain_tcp_and_other_ports_need_mtls");
    let m = Mesh::new(&bin());
    let plain = |port: u16, msg: &str| echo(&m.client, &format!("{SERVER_IP}:{port}"), msg);
    // Not permissive yet: the plain connection meets the TLS listener (at
    // most a TLS alert comes back, never the app's echo).
    let r = plain(8080, "plain?");
    assert!(
        r.as_deref().map_or(true, |o| !o.contains("plain?")),
        "{r:?}"
    );
    let before = m.app.accepted();
    m.files.write(
        "api.toml",
        &mesh::api_config(&m.ca, "deny", &mesh::allow("web")).replace(
            "local_app = \"127.0.0.1:8080\"\n",
            "local_app = \"127.0.0.1:8080\"\npermissive_ports = [8080]\n",
        ),
    );
    assert!(
        m.api
            .wait_log("configuration reloaded", Duration::from_secs(5)),
        "{}",
        m.api.log_text()
    );
    assert_eq!(plain(8080, "plain").unwrap(), "plain");
    assert_eq!(m.app.accepted(), before + 1);
    // Another port is not permissive: refused as not TLS.
    let r = plain(8081, "other port?");
    assert!(r.as_deref().map_or(true, |o| !o.contains("other")), "{r:?}");
    let stats = support::scrape(&m.server);
    assert!(count_reason(&stats, "not_tls") >= 2, "{stats}");
    assert!(
        stats.contains("veer_inbound_permissive_total{port=\"8080\"} 1"),
        "{stats}"
    );
    // Mesh traffic through the VIP still goes over mTLS with intentions.
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "mesh").unwrap(),
        "mesh"
    );
}

/// TLS handshakes a sidecar's inbound listener completed (full and resumed).
fn inbound_handshakes(stats: &str) -> u64 {
    ["full", "resumed"]
        .iter()
        .map(|k| {
            support::sample(
                stats,
                &format!("veer_tls_handshakes_total{{direction=\"inbound\",kind=\"{k}\"}}"),
            )
        })
        .sum()
}

/// veer <-> veer multiplexing through real sidecars: concurrent app
/// connections ride one mTLS connection (api accepted one handshake); when
/// the api sidecar dies the next app connection dials afresh; with
/// `VEER_MUX=0` every app connection has its own TLS connection again.
#[test]
fn mux_concurrent_connections_share_one_tls_connection_and_veer_mux_0_turns_it_off() {
    need_root!("mux_concurrent_connections_share_one_tls_connection_and_veer_mux_0_turns_it_off");
    let mut m = Mesh::new(&bin());
    let n = 40;
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let ns = m.client.path();
            std::thread::spawn(move || {
                veer_testsupport::netns::enter(&ns).unwrap();
                let here = Netns::attach_current();
                echo(&here, &format!("{API_VIP}:80"), &format!("call {i}"))
            })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        assert_eq!(c.join().unwrap().unwrap(), format!("call {i}"));
    }
    assert_eq!(m.app.accepted(), n);
    let stats = support::scrape(&m.server);
    assert_eq!(inbound_handshakes(&stats), 1, "{stats}");
    assert_eq!(
        support::sample(
            &stats,
            "veer_mux_streams_opened_total{direction=\"inbound\"}"
        ),
        n as u64,
        "{stats}"
    );
    // The api sidecar dies and comes back: the next call dials afresh.
    m.api.signal("KILL");
    // (Killed by a signal: no exit code.)
    m.api.wait_exit(Duration::from_secs(5));
    m.api = Sidecar::start(
        &bin(),
        &m.server,
        m.api.config.clone(),
        m.files.join("api2.log"),
        &[],
    );
    assert_eq!(
        echo(&m.client, &format!("{API_VIP}:80"), "after").unwrap(),
        "after"
    );
    let web = support::scrape(&m.client);
    assert_eq!(
        support::sample(
            &web,
            "veer_mux_connections_opened_total{direction=\"outbound\"}"
        ),
        2,
        "{web}"
    );
    // VEER_MUX=0 on web: one TLS connection per app connection.
    m.web.signal("KILL");
    m.web.wait_exit(Duration::from_secs(5));
    let args: Vec<std::ffi::OsString> = vec!["--config".into(), m.web.config.clone().into()];
    m.web = Sidecar::start_with(
        &bin(),
        &m.client,
        &args,
        &[("VEER_MUX", "0")],
        m.web.config.clone(),
        m.files.join("web2.log"),
    );
    let before = inbound_handshakes(&support::scrape(&m.server));
    for i in 0..3 {
        assert_eq!(
            echo(&m.client, &format!("{API_VIP}:80"), &format!("plain {i}")).unwrap(),
            format!("plain {i}")
        );
    }
    let stats = support::scrape(&m.server);
    assert_eq!(inbound_handshakes(&stats), before + 3, "{stats}");
    assert_eq!(
        support::sample(
            &stats,
            "veer_mux_connections_opened_total{direction=\"inbound\"}"
        ),
        1,
        "only the call after the restart was multiplexed:\n{stats}"
    );
}
