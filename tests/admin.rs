//! End-to-end tests of the admin endpoint and expose paths (issue 5) in
//! real network namespaces: metrics scraped with curl while traffic flows
//! must match the traffic sent; an expose path answers a plain HTTP GET
//! from another namespace (as kubelet's probe would) while the mTLS
//! listener on the same address refuses plaintext.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use veer_testsupport::mesh::{self, Mesh, API_VIP, PLAIN_IP, SERVER_IP};
use veer_testsupport::netns::{veth, Netns};

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

fn connect(ns: &Netns, addr: &str) -> TcpStream {
    let a: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    })
}

/// Sends `E<msg>`, half-closes, returns the echo.
fn echo(ns: &Netns, addr: &str, msg: &str) -> String {
    let mut s = connect(ns, addr);
    s.write_all(format!("E{msg}").as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `GET /stats/prometheus` on the sidecar's default admin address, with curl.
fn scrape(ns: &Netns) -> String {
    ns.sh_ok("curl -sS --fail --max-time 5 http://127.0.0.1:19000/stats/prometheus")
        .unwrap()
}

/// The value of the sample `series` (name and labels exactly as rendered).
fn value(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
        .parse::<f64>()
        .unwrap() as u64
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
fn prometheus_counters_match_the_traffic() {
    need_root!("prometheus_counters_match_the_traffic");
    let m = Mesh::new(&bin());
    let vip = format!("{API_VIP}:80");

    // While a connection is open, both sidecars show it.
    let mut held = connect(&m.client, &vip);
    held.write_all(b"Ehold").unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hold");
    let web = scrape(&m.client);
    let api = scrape(&m.server);
    assert_eq!(
        value(&web, "veer_connections_active{direction=\"outbound\"}"),
        1
    );
    assert_eq!(
        value(
            &web,
            "veer_connections_opened_total{direction=\"outbound\"}"
        ),
        1
    );
    assert_eq!(
        value(&api, "veer_connections_active{direction=\"inbound\"}"),
        1
    );
    assert_eq!(value(&api, "veer_ready"), 1);
    // Bytes are counted as they move: the open connection's are there.
    assert_eq!(
        value(&web, "veer_received_bytes_total{direction=\"outbound\"}"),
        5,
        "{web}"
    );
    assert_eq!(
        value(&web, "veer_sent_bytes_total{direction=\"outbound\"}"),
        4,
        "{web}"
    );
    assert_eq!(
        value(&api, "veer_received_bytes_total{direction=\"inbound\"}"),
        5,
        "{api}"
    );
    // Envoy's metrics with Consul's tags, from the TOML file's identity
    // and upstream (the names Consul's UI queries).
    let envoy = |text: &str, name: &str, labels: &[&str]| -> u64 {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
            .unwrap_or_else(|| panic!("no {name} with {labels:?} in\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let to_api = [
        "consul_destination_service=\"api\"",
        "consul_destination_datacenter=\"dc1\"",
        "consul_source_service=\"web\"",
        "consul_source_datacenter=\"dc1\"",
    ];
    assert_eq!(envoy(&web, "envoy_cluster_upstream_cx_active", &to_api), 1);
    assert_eq!(envoy(&web, "envoy_cluster_upstream_cx_total", &to_api), 1);
    assert_eq!(envoy(&web, "envoy_cluster_membership_healthy", &to_api), 1);
    let up = [
        "envoy_tcp_prefix=\"upstream\"",
        "consul_upstream_service=\"api\"",
    ];
    assert_eq!(
        envoy(&web, "envoy_tcp_downstream_cx_rx_bytes_total", &up),
        5
    );
    assert_eq!(
        envoy(&web, "envoy_tcp_downstream_cx_tx_bytes_total", &up),
        4
    );
    let public = [
        "envoy_tcp_prefix=\"public_listener\"",
        "consul_source_service=\"api\"",
    ];
    assert_eq!(
        envoy(&api, "envoy_tcp_downstream_cx_rx_bytes_total", &public),
        5
    );
    assert_eq!(envoy(&api, "envoy_rbac_allowed", &["connect_authz"]), 1);
    assert_eq!(envoy(&api, "envoy_server_live", &[]), 1);
    assert!(value(&api, "veer_open_fds") >= 4, "{api}");
    assert!(value(&api, "veer_snapshot_age_seconds") < 60);

    // Mesh calls (copied through TLS) and one passthrough call (spliced).
    let sizes = [1usize, 1000, 70_000];
    for (i, n) in sizes.iter().enumerate() {
        let msg: String = std::iter::repeat_n((b'a' + i as u8) as char, *n).collect();
        assert_eq!(echo(&m.client, &vip, &msg).len(), *n);
    }
    let plain: String = "p".repeat(50_000);
    assert_eq!(
        echo(&m.client, &format!("{PLAIN_IP}:9000"), &plain).len(),
        50_000
    );
    held.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    held.read_to_end(&mut rest).unwrap();

    // Wait for the last connection to close, then compare the totals.
    let mut web = String::new();
    let mut api = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            web = scrape(&m.client);
            api = scrape(&m.server);
            value(&web, "veer_connections_active{direction=\"outbound\"}") == 0
                && value(&api, "veer_connections_active{direction=\"inbound\"}") == 0
        }),
        "connections still open:\n{web}\n{api}"
    );
    let mesh_rx: u64 = 5 + sizes.iter().map(|n| 1 + *n as u64).sum::<u64>();
    let mesh_tx: u64 = 4 + sizes.iter().map(|n| *n as u64).sum::<u64>();
    let (plain_rx, plain_tx) = (50_001u64, 50_000u64);

    // web: every call is outbound.
    assert_eq!(
        value(
            &web,
            "veer_connections_opened_total{direction=\"outbound\"}"
        ),
        5
    );
    assert_eq!(
        value(
            &web,
            "veer_connections_closed_total{direction=\"outbound\"}"
        ),
        5
    );
    assert_eq!(
        value(&web, "veer_connections_opened_total{direction=\"inbound\"}"),
        0
    );
    assert_eq!(
        value(&web, "veer_received_bytes_total{direction=\"outbound\"}"),
        mesh_rx + plain_rx
    );
    assert_eq!(
        value(&web, "veer_sent_bytes_total{direction=\"outbound\"}"),
        mesh_tx + plain_tx
    );
    assert_eq!(
        value(&web, "veer_relayed_bytes_total{mode=\"splice\"}"),
        plain_rx + plain_tx
    );
    assert_eq!(
        value(&web, "veer_relayed_bytes_total{mode=\"copy\"}"),
        mesh_rx + mesh_tx
    );
    // api: the mesh calls are inbound.
    assert_eq!(
        value(&api, "veer_connections_opened_total{direction=\"inbound\"}"),
        4
    );
    assert_eq!(
        value(&api, "veer_connections_closed_total{direction=\"inbound\"}"),
        4
    );
    assert_eq!(
        value(&api, "veer_received_bytes_total{direction=\"inbound\"}"),
        mesh_rx
    );
    assert_eq!(
        value(&api, "veer_sent_bytes_total{direction=\"inbound\"}"),
        mesh_tx
    );
    assert_eq!(
        value(&api, "veer_relayed_bytes_total{mode=\"copy\"}"),
        mesh_rx + mesh_tx
    );
    for text in [&web, &api] {
        assert_eq!(
            value(text, "veer_connect_timeouts_total{direction=\"outbound\"}"),
            0
        );
        // Bounded labels only: no ports or addresses anywhere in the output.
        for bad in [SERVER_IP, PLAIN_IP, API_VIP, ":9000", ":20000"] {
            assert!(!text.contains(bad), "{bad} in metrics:\n{text}");
        }
    }
    // The same numbers on the Prometheus text format's own terms: every
    // sample line belongs to a declared family.
    for l in web.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| web.contains(&format!("# TYPE {f} histogram")))
            })
            .unwrap_or(name);
        assert!(web.contains(&format!("# TYPE {family} ")), "{name}");
    }
}

/// Runs `iptables <args>` in `ns`, with the legacy back end when the
/// default one does not hold Consul's chains.
fn iptables(ns: &Netns, args: &str) {
    let ok = ns.sh(&format!("iptables {args}")).unwrap().status.success()
        || ns
            .sh(&format!("iptables-legacy {args}"))
            .unwrap()
            .status
            .success();
    assert!(ok, "iptables {args} failed in {}", ns.name());
}

#[test]
fn expose_path_answers_plain_http_while_mtls_refuses_plaintext() {
    need_root!("expose_path_answers_plain_http_while_mtls_refuses_plaintext");
    let api_extra = format!(
        "{}\n[[expose]]\nlistener = \"0.0.0.0:20300\"\npath = \"/healthz\"\nlocal_path_port = 8080\n",
        mesh::allow("web")
    );
    let m = Mesh::with(&bin(), "", &api_extra);
    // As consul-k8s does for rewritten probes: the expose port is excluded
    // from inbound redirection.
    iptables(
        &m.server,
        "-t nat -I CONSUL_PROXY_INBOUND -p tcp --dport 20300 -j RETURN",
    );
    // A third namespace plays kubelet: it reaches the pod directly.
    let kubelet = Netns::new("vk").unwrap();
    veth(&kubelet, &["10.78.0.1/24"], &m.server, &["10.78.0.2/24"]).unwrap();

    let before = m.app.accepted();
    let out = kubelet
        .sh_ok("curl -sS --max-time 5 -w ' %{http_code}' http://10.78.0.2:20300/healthz")
        .unwrap();
    assert_eq!(out, "hello from api\n 200");
    assert_eq!(m.app.accepted(), before + 1);
    let out = kubelet
        .sh_ok("curl -sS --max-time 5 -o /dev/null -w '%{http_code}' http://10.78.0.2:20300/admin")
        .unwrap();
    assert_eq!(out, "404");
    assert_eq!(
        m.app.accepted(),
        before + 1,
        "other paths never reach the app"
    );

    // The mTLS listener (20000, and any redirected port) refuses plaintext
    // and the app sees nothing.
    let api0 = scrape(&m.server);
    let failures = |t: &str| -> u64 {
        t.lines()
            .filter(|l| l.starts_with("veer_inbound_handshake_failures_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    for port in [20000, 8080] {
        let out = kubelet
            .sh(&format!(
                "curl -sS --max-time 5 http://10.78.0.2:{port}/healthz"
            ))
            .unwrap();
        assert!(!out.status.success(), "plaintext got an answer on {port}");
        assert!(
            out.stdout.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(m.app.accepted(), before + 1);
    let api1 = scrape(&m.server);
    assert_eq!(failures(&api1), failures(&api0) + 2, "{api1}");

    // A valid mesh certificate the intentions do not allow is denied, and
    // counted by reason.
    let (cert, key) = m.ca.service("db");
    let out = kubelet
        .sh(&format!(
            "curl -sS -k --max-time 5 --cert {} --key {} https://10.78.0.2:20000/",
            cert.display(),
            key.display()
        ))
        .unwrap();
    assert!(!out.status.success());
    let api2 = scrape(&m.server);
    assert_eq!(
        value(
            &api2,
            "veer_intention_denials_total{reason=\"denied_by_default\"}"
        ),
        1,
        "{api2}"
    );
    assert_eq!(m.app.accepted(), before + 1);

    // /config_dump shows the expose path and no key material.
    let dump = m
        .server
        .sh_ok("curl -sS --fail --max-time 5 http://127.0.0.1:19000/config_dump")
        .unwrap();
    assert!(!dump.contains("PRIVATE"));
    assert!(dump.contains("\"path\": \"/healthz\""), "{dump}");
    assert!(dump.contains("\"listener\": \"0.0.0.0:20300\""), "{dump}");
}
