//! End-to-end tests of Consul as the control plane (issue 4): a real Consul
//! 1.8.7 agent, sidecars configured only by it (`veer run --proxy-id`), in
//! network namespaces with Consul's redirect rules, traffic through both.
//! The agent serves its API on a Unix socket, which every namespace sees.
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use veer_testsupport::ca::TempDir;
use veer_testsupport::consul::Agent;
use veer_testsupport::echo::{spawn_app, App};
use veer_testsupport::mesh::{redirect, Sidecar, API_VIP, CLIENT_IP, PLAIN_IP, SERVER_IP};
use veer_testsupport::netns::Netns;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

/// Namespaces, apps and sidecars for web (client) and api (server), both
/// configured from `agent`.
struct World {
    web: Sidecar,
    api: Sidecar,
    app: App,
    plain: App,
    client: Netns,
    _server: Netns,
    _files: TempDir,
}

fn world(agent: &Agent) -> World {
    world_with(agent, &[])
}

/// [`world`] with extra environment for both sidecars (e.g. a token).
fn world_with(agent: &Agent, extra_env: &[(&str, &str)]) -> World {
    let files = TempDir::new("veer-consul-e2e-");
    let (client, server) = veer_testsupport::mesh::namespaces();
    redirect(&bin(), &client, &[]);
    redirect(&bin(), &server, &["-exclude-inbound-port", "9000"]);
    let app = spawn_app(Some(&server), "127.0.0.1:8080".parse().unwrap(), "api");
    let plain = spawn_app(
        Some(&server),
        format!("{PLAIN_IP}:9000").parse().unwrap(),
        "plain",
    );
    agent.register("api", SERVER_IP, 8080, 20000, Some(API_VIP));
    agent.register("web", CLIENT_IP, 8080, 20000, None);
    let mut env = vec![("CONSUL_HTTP_ADDR", agent.addr.as_str())];
    env.extend_from_slice(extra_env);
    let args = |id: &str| -> Vec<OsString> {
        vec!["--proxy-id".into(), id.into(), "--transparent".into()]
    };
    let web = Sidecar::start_with(
        &bin(),
        &client,
        &args("web-sidecar-proxy"),
        &env,
        PathBuf::new(),
        files.join("web.log"),
    );
    let api = Sidecar::start_with(
        &bin(),
        &server,
        &args("api-sidecar-proxy"),
        &env,
        PathBuf::new(),
        files.join("api.log"),
    );
    World {
        web,
        api,
        app,
        plain,
        client,
        _server: server,
        _files: files,
    }
}

fn echo(ns: &Netns, addr: &str, msg: &str) -> std::io::Result<String> {
    let a: SocketAddr = addr.parse().unwrap();
    let msg = msg.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        s.write_all(format!("E{msg}").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

fn agent_or_skip(name: &str, hcl: &[&str]) -> Option<Agent> {
    agent_with_token_or_skip(name, hcl, None)
}

fn agent_with_token_or_skip(name: &str, hcl: &[&str], token: Option<&str>) -> Option<Agent> {
    if !veer_testsupport::require_root(name) {
        return None;
    }
    match Agent::start(hcl, token) {
        Some(a) => Some(a),
        None => {
            veer_testsupport::skip(name, "consul not installed (run .ci/install-deps)");
            None
        }
    }
}

fn until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn consul_configured_sidecars_carry_traffic_and_follow_intentions_and_endpoints() {
    let Some(agent) = agent_or_skip(
        "consul_configured_sidecars_carry_traffic_and_follow_intentions_and_endpoints",
        &[],
    ) else {
        return;
    };
    let w = world(&agent);
    // (a) web reaches api by its virtual IP through both sidecars, with
    // certificates issued by Consul.
    assert_eq!(
        echo(&w.client, &format!("{API_VIP}:8080"), "hi").unwrap(),
        "hi"
    );
    assert_eq!(w.app.accepted(), 1);
    assert!(
        w.api.wait_log("svc/web", Duration::from_secs(3)),
        "{}",
        w.api.log_text()
    );

    // (b) a deny intention blocks new connections within a second and
    // closes open ones.
    let mut open = w
        .client
        .run(|| TcpStream::connect(format!("{API_VIP}:8080")).unwrap());
    open.write_all(b"E1").unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).unwrap();
    let id = agent.intention("web", "api", "deny");
    let t0 = Instant::now();
    open.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut rest = Vec::new();
    let _ = open.read_to_end(&mut rest);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "open connection not closed after the deny: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        echo(&w.client, &format!("{API_VIP}:8080"), "no").unwrap_or_default(),
        ""
    );
    assert_eq!(w.app.accepted(), 2);
    agent.delete_intention(&id);
    assert!(until(Duration::from_secs(3), || echo(
        &w.client,
        &format!("{API_VIP}:8080"),
        "back"
    )
    .ok()
    .as_deref()
        == Some("back")));

    // (d) a second api instance whose sidecar address is broken (a plain
    // server): web fails over from it; once deregistered it is never tried.
    let bad = format!(
        r#"{{"Name":"api-sidecar-proxy","ID":"api-bad-sidecar-proxy","Kind":"connect-proxy","Address":"{PLAIN_IP}","Port":9000,"Check":{{"TTL":"24h","Status":"passing"}},"Proxy":{{"DestinationServiceName":"api","LocalServicePort":8080}}}}"#
    );
    agent.call("PUT", "/v1/agent/service/register", Some(&bad));
    assert!(
        until(Duration::from_secs(5), || {
            let _ = echo(&w.client, &format!("{API_VIP}:8080"), "x");
            w.plain.accepted() > 0
        }),
        "the new endpoint was never tried"
    );
    for _ in 0..4 {
        assert_eq!(
            echo(&w.client, &format!("{API_VIP}:8080"), "ok").unwrap(),
            "ok",
            "failover to the good endpoint"
        );
    }
    agent.call(
        "PUT",
        "/v1/agent/service/deregister/api-bad-sidecar-proxy",
        None,
    );
    std::thread::sleep(Duration::from_secs(1));
    let tried = w.plain.accepted();
    for _ in 0..6 {
        assert_eq!(
            echo(&w.client, &format!("{API_VIP}:8080"), "ok").unwrap(),
            "ok"
        );
    }
    assert_eq!(
        w.plain.accepted(),
        tried,
        "a deregistered endpoint was still dialled"
    );
    drop(w.web);
}

#[test]
fn ca_rotation_keeps_traffic_flowing() {
    let Some(agent) = agent_or_skip("ca_rotation_keeps_traffic_flowing", &[]) else {
        return;
    };
    let w = world(&agent);
    assert_eq!(
        echo(&w.client, &format!("{API_VIP}:8080"), "before").unwrap(),
        "before"
    );
    let before_web = w.web.log_text().matches("snapshot applied").count();
    let before_api = w.api.log_text().matches("snapshot applied").count();
    let serial_before = last_leaf_serial(&w.api.log_text());
    assert!(!serial_before.is_empty(), "{}", w.api.log_text());
    // A connection open across the whole rotation (echoed every 100 ms).
    let a: SocketAddr = format!("{API_VIP}:8080").parse().unwrap();
    let mut held = w
        .client
        .run(move || {
            let s = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap();
    held.write_all(b"E").unwrap();
    let mut ping = |i: usize| {
        let msg = format!("[{i}]");
        held.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        held.read_exact(&mut back)?;
        assert_eq!(back, msg.as_bytes());
        Ok::<_, std::io::Error>(())
    };
    ping(0).unwrap();
    // A new root key forces a rotation with cross-signing.
    let key = std::process::Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        .output()
        .unwrap();
    let key = String::from_utf8(key.stdout).unwrap().replace('\n', "\\n");
    agent.call(
        "PUT",
        "/v1/connect/ca/configuration",
        Some(&format!(r#"{{"Provider":"consul","Config":{{"LeafCertTTL":"72h","PrivateKey":"{key}","RotationPeriod":"2160h"}}}}"#)),
    );
    // Traffic keeps flowing, connection after connection, until both
    // sidecars have new roots and new leaves (Consul re-issues leaves within
    // its 30 s jitter window).
    let (mut ok, mut failed) = (0, 0);
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        match echo(&w.client, &format!("{API_VIP}:8080"), "during") {
            Ok(s) if s == "during" => ok += 1,
            other => {
                failed += 1;
                eprintln!("failed during rotation: {other:?}");
            }
        }
        ping(ok + failed).expect("the connection opened before the rotation broke");
        let web_n = w.web.log_text().matches("snapshot applied").count();
        let api_n = w.api.log_text().matches("snapshot applied").count();
        // Roots first, then the leaf: at least two swaps each.
        if web_n >= before_web + 2 && api_n >= before_api + 2 && ok > 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(failed, 0, "{ok} ok, {failed} failed during the rotation");
    assert!(
        w.web.log_text().matches("snapshot applied").count() >= before_web + 2,
        "web did not get the new CA:\n{}",
        w.web.log_text()
    );
    assert!(
        w.api.log_text().matches("snapshot applied").count() >= before_api + 2,
        "api did not get the new CA:\n{}",
        w.api.log_text()
    );
    assert_eq!(
        echo(&w.client, &format!("{API_VIP}:8080"), "after").unwrap(),
        "after"
    );
    ping(100_000).expect("the connection opened before the rotation broke");
    let serial_after = last_leaf_serial(&w.api.log_text());
    assert_ne!(serial_before, serial_after, "api still serves its old leaf");
}

/// The `leaf_serial` of the last "veer ready" or "snapshot applied" line.
fn last_leaf_serial(log: &str) -> String {
    log.lines()
        .rev()
        .find_map(|l| {
            let rest = l.split("leaf_serial=").nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        })
        .unwrap_or_default()
}

#[test]
fn agent_down_does_not_interrupt_traffic_and_updates_resume() {
    let Some(mut agent) = agent_or_skip(
        "agent_down_does_not_interrupt_traffic_and_updates_resume",
        &[],
    ) else {
        return;
    };
    let w = world(&agent);
    assert_eq!(
        echo(&w.client, &format!("{API_VIP}:8080"), "up").unwrap(),
        "up"
    );
    agent.stop();
    for _ in 0..10 {
        assert_eq!(
            echo(&w.client, &format!("{API_VIP}:8080"), "down").unwrap(),
            "down"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A dev agent comes back empty (new CA, no services): register again.
    agent.run();
    agent.register("api", SERVER_IP, 8080, 20000, Some(API_VIP));
    agent.register("web", CLIENT_IP, 8080, 20000, None);
    // Both sidecars catch up with the new CA, then follow a new intention.
    assert!(until(Duration::from_secs(60), || echo(
        &w.client,
        &format!("{API_VIP}:8080"),
        "again"
    )
    .ok()
    .as_deref()
        == Some("again")));
    agent.intention("web", "api", "deny");
    assert!(
        until(Duration::from_secs(5), || echo(
            &w.client,
            &format!("{API_VIP}:8080"),
            "deny"
        )
        .unwrap_or_default()
        .is_empty()),
        "the deny intention written after the restart was not applied:\n{}",
        w.api.log_text()
    );
}

/// (f) An agent with ACLs on and `default_policy = "deny"`: the sidecars,
/// given a token, find out the default decision from the agent (deny), so
/// web cannot call api until an intention allows it, which then applies
/// without a restart.
#[test]
fn acl_default_deny_is_honoured_with_a_token() {
    let Some(agent) = agent_with_token_or_skip(
        "acl_default_deny_is_honoured_with_a_token",
        &[r#"acl { enabled = true default_policy = "deny" tokens { master = "root" } }"#],
        Some("root"),
    ) else {
        return;
    };
    let w = world_with(&agent, &[("CONSUL_HTTP_TOKEN", "root")]);
    let vip = format!("{API_VIP}:80");
    // No intention: the agent's default (deny) applies at api's sidecar.
    let r = echo(&w.client, &vip, "no");
    assert!(r.as_deref().map_or(true, |o| o.is_empty()), "{r:?}");
    assert!(
        w.api
            .wait_log("reason=denied_by_default", Duration::from_secs(5)),
        "{}",
        w.api.log_text()
    );
    assert_eq!(w.app.accepted(), 0);
    // An allow intention opens the way, no restart.
    agent.intention("web", "api", "allow");
    assert!(
        until(Duration::from_secs(5), || echo(&w.client, &vip, "yes")
            .is_ok_and(|o| o == "yes")),
        "{}",
        w.api.log_text()
    );
    assert!(w.app.accepted() >= 1);
    let _ = &w.plain;
}

/// `GET path` on 127.0.0.1:`port`: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        code,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

/// Issue 15, with the agent's own TCP checker (as Consul's default
/// "Connect Sidecar Listening" check, every second instead of ten) against
/// a sidecar on loopback: probes are counted apart and logged at debug;
/// the registration's Envoy escape hatch and HTTP protocol are named once
/// (log, metric, /config_dump); SIGHUP refetches and says so.
#[test]
fn consul_tcp_check_is_a_quiet_probe_and_unapplied_settings_are_named() {
    let Some(agent) = agent_or_skip(
        "consul_tcp_check_is_a_quiet_probe_and_unapplied_settings_are_named",
        &[],
    ) else {
        return;
    };
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (inbound, app, admin) = (port(), port(), port());
    let body = format!(
        r#"{{"Name":"probe","ID":"probe","Address":"127.0.0.1","Port":{app},"Connect":{{"SidecarService":{{"Port":{inbound},"Checks":[{{"Name":"Connect Sidecar Listening","TCP":"127.0.0.1:{inbound}","Interval":"1s"}}],"Proxy":{{"LocalServiceAddress":"127.0.0.1","LocalServicePort":{app},"Config":{{"protocol":"http","envoy_tracing_json":"{{}}"}}}}}}}}}}"#
    );
    agent.call("PUT", "/v1/agent/service/register", Some(&body));
    let files = TempDir::new("veer-consul-probe-");
    let log = files.join("veer.log");
    let child = std::process::Command::new(bin())
        .args(["run", "--proxy-id", "probe-sidecar-proxy"])
        .args(["--admin-bind", &format!("127.0.0.1:{admin}")])
        .env("CONSUL_HTTP_ADDR", &agent.addr)
        .env("VEER_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    {
        let k = Kill(child);
        let text = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            until(Duration::from_secs(20), || get(admin, "/ready").0 == 200),
            "{}",
            text()
        );
        // Three probes from the agent's TCP checker, and the check passes.
        assert!(
            until(Duration::from_secs(10), || sample(
                &get(admin, "/stats/prometheus").1,
                "veer_inbound_probes_total"
            ) >= 3),
            "{}",
            get(admin, "/stats/prometheus").1
        );
        let checks = agent.call("GET", "/v1/agent/checks", None);
        assert!(
            checks.replace(' ', "").contains("\"Status\":\"passing\""),
            "{checks}"
        );
        let m = get(admin, "/stats/prometheus").1;
        assert!(!m.contains("veer_inbound_handshake_failures_total{"), "{m}");
        assert!(!text().contains("inbound connection refused"), "{}", text());

        // Named once each: log, metric, dump. (`protocol = "http"` is
        // applied since issue 13: the inbound listener is HTTP.)
        assert_eq!(
            sample(&m, "veer_unapplied_settings_total{kind=\"unsupported\"}"),
            1,
            "{m}"
        );
        let log_text = text();
        assert!(
            !log_text.contains("setting not applied: Proxy.Config.protocol"),
            "{log_text}"
        );
        assert_eq!(
            log_text
                .matches("setting not applied: Proxy.Config.envoy_tracing_json")
                .count(),
            1,
            "{log_text}"
        );
        let dump = get(admin, "/config_dump").1;
        assert!(dump.contains("Proxy.Config.envoy_tracing_json"), "{dump}");

        // SIGHUP: refetches everything, says so, warns nothing again.
        unsafe {
            libc::kill(k.0.id() as i32, libc::SIGHUP);
        }
        assert!(
            until(Duration::from_secs(5), || text()
                .contains("SIGHUP: refetching")),
            "{}",
            text()
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(get(admin, "/ready").0, 200);
        assert_eq!(
            text().matches("setting not applied").count(),
            1,
            "{}",
            text()
        );
    }
}

/// Issue 15, then 13: `service-resolver`, `service-router` (and
/// `service-splitter`) entries of an upstream in use apply through its
/// discovery chain (nothing named); a router Consul stores unchecked but
/// veer refuses (a regex that does not compile) is named — one warning,
/// the metric, `/config_dump` `unapplied` — as it is written, without a
/// restart; deleting it clears it.
#[test]
fn consul_resolver_and_router_entries_are_named_until_deleted() {
    let Some(agent) = agent_or_skip(
        "consul_resolver_and_router_entries_are_named_until_deleted",
        &[],
    ) else {
        return;
    };
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (inbound, app, admin, bind) = (port(), port(), port(), port());
    agent.register("api", "127.0.0.1", port(), port(), None);
    let body = format!(
        r#"{{"Name":"shop","ID":"shop","Address":"127.0.0.1","Port":{app},"Connect":{{"SidecarService":{{"Port":{inbound},"Checks":[{{"Name":"up","TTL":"24h","Status":"passing"}}],"Proxy":{{"LocalServiceAddress":"127.0.0.1","LocalServicePort":{app},"Upstreams":[{{"DestinationName":"api","LocalBindAddress":"127.0.0.1","LocalBindPort":{bind}}}]}}}}}}}}"#
    );
    agent.call("PUT", "/v1/agent/service/register", Some(&body));
    let files = TempDir::new("veer-consul-chain-");
    let log = files.join("veer.log");
    let child = std::process::Command::new(bin())
        .args(["run", "--proxy-id", "shop-sidecar-proxy"])
        .args(["--admin-bind", &format!("127.0.0.1:{admin}")])
        .env("CONSUL_HTTP_ADDR", &agent.addr)
        .env("VEER_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut k = Kill(child);
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        until(Duration::from_secs(20), || get(admin, "/ready").0 == 200),
        "{}",
        text()
    );
    let unsupported = || {
        sample(
            &get(admin, "/stats/prometheus").1,
            "veer_unapplied_settings_total{kind=\"unsupported\"}",
        )
    };
    let named = || -> Vec<String> {
        let dump: serde_json::Value =
            serde_json::from_str(&get(admin, "/config_dump").1).unwrap_or_default();
        dump["unapplied"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u["setting"].as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(named(), Vec::<String>::new());
    assert_eq!(unsupported(), 0);

    // A router needs an HTTP protocol (Consul refuses it on tcp).
    for entry in [
        r#"{"Kind":"service-defaults","Name":"api","Protocol":"http"}"#,
        r#"{"Kind":"service-resolver","Name":"api","ConnectTimeout":"1s"}"#,
        r#"{"Kind":"service-router","Name":"api","Routes":[{"Match":{"HTTP":{"PathPrefix":"/v2"}},"Destination":{"PrefixRewrite":"/"}}]}"#,
        // Another service's entry: not an upstream of shop, not named.
        r#"{"Kind":"service-resolver","Name":"billing","ConnectTimeout":"2s"}"#,
    ] {
        assert_eq!(
            agent.call("PUT", "/v1/config", Some(entry)).trim(),
            "true",
            "{entry}"
        );
    }
    // The resolver and the router apply (the discovery chain, HTTP routes).
    assert!(
        until(Duration::from_secs(10), || text()
            .contains("discovery chain")),
        "{}",
        text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(named(), Vec::<String>::new());
    assert_eq!(unsupported(), 0);
    // A regex Consul 1.8.7 stores without checking: refused and named.
    let bad = r#"{"Kind":"service-router","Name":"api","Routes":[{"Match":{"HTTP":{"PathRegex":"(("}}}]}"#;
    assert_eq!(agent.call("PUT", "/v1/config", Some(bad)).trim(), "true");
    let want = ["discovery chain api"];
    assert!(
        until(Duration::from_secs(10), || named() == want),
        "{:?}\n{}",
        named(),
        text()
    );
    assert_eq!(unsupported(), 1);
    let log_text = text();
    assert_eq!(
        log_text
            .matches(&format!("setting not applied: {}", want[0]))
            .count(),
        1,
        "{log_text}"
    );
    assert!(!log_text.contains("billing"), "{log_text}");

    // Deleted (the router first: Consul keeps the chain consistent).
    agent.call("DELETE", "/v1/config/service-router/api", None);
    agent.call("DELETE", "/v1/config/service-resolver/api", None);
    assert!(
        until(Duration::from_secs(10), || named().is_empty()),
        "{:?}\n{}",
        named(),
        text()
    );
    // Same process all along, still ready; the counter counts what was named.
    assert!(k.0.try_wait().unwrap().is_none());
    assert_eq!(get(admin, "/ready").0, 200);
    assert_eq!(unsupported(), 1);
}
