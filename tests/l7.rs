//! Outbound L7 (issue 13) in real network namespaces: the web sidecar's
//! `api` upstream has protocol http and TOML routes; curl in the client
//! namespace (HTTP/1.1 and HTTP/2 with prior knowledge) is redirected to
//! it; two api sidecars (v1 on :20000, v2 on :20001, both L4 inbound) front
//! HTTP apps that say who answered and how.
//!
//! ```text
//!  ns client 10.77.0.1: curl → web sidecar :15001 ──mTLS h1/h2──▶ ns server 10.77.0.2
//!                                                     :20000 api v1 → app 127.0.0.1:8080
//!                                                     :20001 api v2 → app 127.0.0.1:8081
//!                                                     :20009 closed (refused)
//! ```
use std::path::PathBuf;
use std::time::Duration;
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};
use veer_testsupport::http::{spawn_http_app, HttpApp};
use veer_testsupport::mesh::{self, Sidecar, API_VIP, SERVER_IP};
use veer_testsupport::netns::Netns;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

fn api_keys() -> String {
    format!(
        r#"protocol = "http"
endpoints = ["{SERVER_IP}:20000"]

[[upstreams.clusters]]
name = "api-v2"
subset = "v2"
protocol = "http2"
endpoints = ["{SERVER_IP}:20001"]

[[upstreams.clusters]]
name = "api-down"
endpoints = ["{SERVER_IP}:20009"]

[[upstreams.routes]]
name = "v2-path"
path_prefix = "/v2/"
prefix_rewrite = "/"
cluster = "api-v2"

[[upstreams.routes]]
name = "canary"
headers = [{{ name = "x-canary", exact = "1" }}]
cluster = "api-v2"

[[upstreams.routes]]
name = "down"
path_prefix = "/down"
cluster = "api-down"

[[upstreams.routes]]
name = "retry"
path_prefix = "/status/503"
retries = 2
retry_on_status_codes = [503]
cluster = "api"

[[upstreams.routes]]
name = "quick"
path_prefix = "/slow/"
timeout = "300ms"
cluster = "api"
"#
    )
}

/// The api v2 sidecar: inbound on :20001, its app on :8081.
fn api_v2_config(ca: &TestCa) -> String {
    mesh::api_config(ca, "deny", &mesh::allow("web"))
        .replace("0.0.0.0:20000", "0.0.0.0:20001")
        .replace("127.0.0.1:8080", "127.0.0.1:8081")
        + "\n[outbound]\nbind = \"127.0.0.1:15002\"\nbind_ipv6 = \"\"\n\n[admin]\nbind = \"127.0.0.1:19001\"\n"
}

struct L7Mesh {
    web: Sidecar,
    _api: Sidecar,
    _api2: Sidecar,
    v1: HttpApp,
    v2: HttpApp,
    client: Netns,
    _server: Netns,
    _files: TempDir,
    _ca: TestCa,
}

fn setup() -> L7Mesh {
    let ca = TestCa::new(TRUST_DOMAIN);
    let files = TempDir::new("veer-l7-");
    let (client, server) = mesh::namespaces();
    mesh::redirect(&bin(), &client, &[]);
    mesh::redirect(
        &bin(),
        &server,
        &[
            "-exclude-inbound-port",
            "20001",
            "-exclude-inbound-port",
            "20009",
        ],
    );
    let v1 = spawn_http_app(Some(&server), "127.0.0.1:8080".parse().unwrap(), "v1");
    let v2 = spawn_http_app(Some(&server), "127.0.0.1:8081".parse().unwrap(), "v2");
    let web_cfg = files.write("web.toml", &mesh::web_config_with(&ca, &api_keys(), ""));
    let api_cfg = files.write(
        "api.toml",
        &mesh::api_config(&ca, "deny", &mesh::allow("web")),
    );
    let api2_cfg = files.write("api2.toml", &api_v2_config(&ca));
    let web = Sidecar::start(&bin(), &client, web_cfg, files.join("web.log"), &[]);
    let api = Sidecar::start(&bin(), &server, api_cfg, files.join("api.log"), &[]);
    let api2 = Sidecar::start(&bin(), &server, api2_cfg, files.join("api2.log"), &[]);
    L7Mesh {
        web,
        _api: api,
        _api2: api2,
        v1,
        v2,
        client,
        _server: server,
        _files: files,
        _ca: ca,
    }
}

/// curl in the client namespace; returns (status, x-veer-reason, body).
fn curl(ns: &Netns, args: &str) -> (u16, Option<String>, String) {
    let out = ns
        .sh_ok(&format!(
            "curl -sS --max-time 10 -D /dev/stderr -w '\\n%{{http_code}}' {args} 2>/tmp/veer-l7-head-$$; \
             echo; cat /tmp/veer-l7-head-$$; rm -f /tmp/veer-l7-head-$$"
        ))
        .expect("curl");
    // body \n code \n headers
    let (body_code, head) = out.split_once("\nHTTP/").unwrap_or((&out, ""));
    let (body, code) = body_code
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", body_code.trim()));
    let reason = head
        .lines()
        .find_map(|l| l.strip_prefix("x-veer-reason: "))
        .map(|r| r.trim().to_string());
    (
        code.trim().parse().unwrap_or(0),
        reason,
        body.trim_end().to_string(),
    )
}

#[test]
fn outbound_http_routes_through_the_mesh() {
    if !veer_testsupport::require_root("outbound_http_routes_through_the_mesh") {
        return;
    }
    if veer_testsupport::tool("curl").is_none() {
        veer_testsupport::skip("outbound_http_routes_through_the_mesh", "no curl");
        return;
    }
    let m = setup();
    let vip = API_VIP;

    // HTTP/1.1 by virtual IP: the catch-all route to api v1, HTTP/1.1.
    let (s, r, body) = curl(&m.client, &format!("http://{vip}/hello?x=1"));
    assert_eq!((s, r), (200, None), "{body}\n{}", m.web.log_text());
    assert_eq!(body, format!("v1 HTTP/1.1 GET /hello?x=1 host={vip}"));

    // A path route with a prefix rewrite to api-v2, spoken as HTTP/2.
    let (s, _, body) = curl(&m.client, &format!("http://{vip}/v2/items"));
    assert_eq!(s, 200, "{body}");
    assert_eq!(body, format!("v2 HTTP/2.0 GET /items host={vip}"));

    // HTTP/2 with prior knowledge from the app; a header route.
    let (s, _, body) = curl(
        &m.client,
        &format!("--http2-prior-knowledge -H 'x-canary: 1' http://{vip}/c"),
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body, format!("v2 HTTP/2.0 GET /c host={vip}"));
    let (s, _, body) = curl(
        &m.client,
        &format!("--http2-prior-knowledge http://{vip}/d"),
    );
    assert_eq!(
        (s, body.as_str()),
        (200, format!("v1 HTTP/1.1 GET /d host={vip}").as_str())
    );

    // The explicit upstream listener serves the same routes.
    let (s, _, body) = curl(&m.client, "http://127.0.0.1:9191/v2/x");
    assert_eq!(
        (s, body.as_str()),
        (200, "v2 HTTP/2.0 GET /x host=127.0.0.1:9191")
    );

    // A cluster whose only endpoint refuses: 503 with the reason.
    let (s, r, _) = curl(&m.client, &format!("http://{vip}/down"));
    assert_eq!((s, r.as_deref()), (503, Some("connect_failure")));

    // Retries on 503: three attempts reach v1, the app gets its 503.
    let before = m.v1.requests.load(std::sync::atomic::Ordering::SeqCst);
    let (s, r, _) = curl(&m.client, &format!("http://{vip}/status/503"));
    assert_eq!((s, r), (503, None));
    let after = m.v1.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - before, 3, "1 attempt + 2 retries");

    // The route's timeout: 504.
    let (s, r, _) = curl(&m.client, &format!("http://{vip}/slow/3000"));
    assert_eq!((s, r.as_deref()), (504, Some("timeout")));

    // gRPC's shape: trailers reach the app over HTTP/2.
    let (s, body, trailers) = veer_testsupport::http::h2_request(
        Some(&m.client),
        format!("{vip}:80").parse().unwrap(),
        "POST",
        "/trailers",
        &[("x-canary", "1"), ("content-type", "application/grpc")],
    )
    .unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(body.starts_with("v2 HTTP/2.0 POST /trailers"), "{body}");
    assert!(
        trailers.contains(&"grpc-status: 0".to_string()),
        "{trailers:?}"
    );
    assert!(trailers.contains(&"x-app: v2".to_string()), "{trailers:?}");

    // Upstream connections are kept alive and reused: every request to v1
    // above (separate curls, separate app connections) shared one mTLS
    // connection, except the one the timeout abandoned.
    let v1_conns = m.v1.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(v1_conns <= 2, "v1 saw {v1_conns} connections");
    let v2_conns = m.v2.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(v2_conns, 1, "HTTP/2 to v2 is one shared connection");

    // Envoy's request stats for the clusters, by response class.
    let stats = m
        .client
        .sh_ok("curl -sS --max-time 5 http://127.0.0.1:19000/stats/prometheus")
        .unwrap();
    // The v2 cluster (its SNI's labels, as Consul's stats tags extract them).
    let v2 = "consul_destination_target=\"v2.api.default.dc1\"";
    let class2 = |l: &&str| {
        l.starts_with("envoy_cluster_upstream_rq_xx{")
            && l.contains("envoy_response_code_class=\"2\"")
    };
    assert!(
        stats
            .lines()
            .filter(class2)
            .any(|l| l.contains(v2) && l.ends_with("} 4")),
        "{stats}"
    );
    assert!(stats.contains("envoy_cluster_upstream_rq_total"), "{stats}");
    assert!(
        stats.contains("envoy_cluster_upstream_rq_time_bucket"),
        "{stats}"
    );
    assert!(
        stats.contains("veer_outbound_http_local_replies_total{reason=\"connect_failure\"} 1"),
        "{stats}"
    );

    // One access-log line per request, naming route and cluster.
    assert!(
        m.web.wait_log("route=v2-path", Duration::from_secs(2)),
        "{}",
        m.web.log_text()
    );
    let log = m.web.log_text();
    assert!(log.contains("cluster=api-v2"), "{log}");
    assert!(log.contains("reason=connect_failure"), "{log}");
}

/// Metrics of the sidecar whose admin listens on 127.0.0.1:19000 in `ns`.
fn scrape(ns: &Netns) -> String {
    ns.sh_ok("curl -sS --max-time 5 http://127.0.0.1:19000/stats/prometheus")
        .expect("admin endpoint answers")
}

/// The value of one sample; 0 when absent.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// veer <-> veer multiplexing into an L7 inbound: web's `api` upstream is
/// L4 (so its app connections ride HTTP/2 CONNECT streams of one pooled
/// mTLS connection), api's inbound is http with an intention whose
/// permissions deny `DELETE /admin*`. Each stream is served by api's L7
/// engine as a plain TLS connection would be: the denied request gets 403
/// and never reaches the app, others 200 with XFCC (`sanitize_set`) from
/// web's certificate replacing a forged one.
#[test]
fn mux_streams_to_an_l7_inbound_are_authorized_per_request() {
    if !veer_testsupport::require_root("mux_streams_to_an_l7_inbound_are_authorized_per_request") {
        return;
    }
    if veer_testsupport::tool("curl").is_none() {
        eprintln!("SKIPPED mux_streams_to_an_l7_inbound_are_authorized_per_request: no curl");
        return;
    }
    let ca = TestCa::new(TRUST_DOMAIN);
    let files = TempDir::new("veer-l7-mux-");
    let (client, server) = mesh::namespaces();
    mesh::redirect(&bin(), &client, &[]);
    mesh::redirect(&bin(), &server, &[]);
    let app = spawn_http_app(Some(&server), "127.0.0.1:8080".parse().unwrap(), "api");
    let web_cfg = files.write("web.toml", &mesh::web_config(&ca, ""));
    let rules = r#"[[intentions.rules]]
source = "web"

[[intentions.rules.permissions]]
action = "deny"
path_prefix = "/admin"
methods = ["DELETE"]

[[intentions.rules.permissions]]
action = "allow"
path_prefix = "/"
"#;
    let api_cfg = files.write(
        "api.toml",
        &mesh::api_config(&ca, "deny", rules).replace(
            "local_app = \"127.0.0.1:8080\"",
            "local_app = \"127.0.0.1:8080\"\nprotocol = \"http\"\nxfcc = \"sanitize_set\"",
        ),
    );
    let _web = Sidecar::start(&bin(), &client, web_cfg, files.join("web.log"), &[]);
    let api = Sidecar::start(&bin(), &server, api_cfg, files.join("api.log"), &[]);
    let url = format!("http://{API_VIP}");

    let (code, _, body) = curl(&client, &format!("-X DELETE {url}/admin/users"));
    assert_eq!((code, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    let (code, _, body) = curl(
        &client,
        &format!("-H 'x-forwarded-client-cert: URI=spiffe://forged' {url}/admin/users"),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("api HTTP/1.1 GET /admin/users"), "{body}");
    let head = app.heads.lock().unwrap().last().cloned().unwrap();
    let xfcc = head
        .lines()
        .find_map(|l| l.strip_prefix("x-forwarded-client-cert: "))
        .unwrap_or_else(|| panic!("no XFCC at the app: {head}"));
    let web_id = format!("spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/web");
    let api_id = format!("spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/api");
    assert!(xfcc.starts_with(&format!("By={api_id};Hash=")), "{xfcc}");
    assert!(xfcc.ends_with(&format!(";URI={web_id}")), "{xfcc}");
    assert!(!head.contains("forged"), "{head}");
    let (code, _, _) = curl(&client, &format!("-X DELETE {url}/other"));
    assert_eq!(code, 200);
    assert_eq!(app.requests.load(std::sync::atomic::Ordering::SeqCst), 2);

    // Three app connections, one TLS connection: all three were streams.
    let stats = scrape(&server);
    let handshakes: u64 = ["full", "resumed"]
        .iter()
        .map(|k| {
            sample(
                &stats,
                &format!("veer_tls_handshakes_total{{direction=\"inbound\",kind=\"{k}\"}}"),
            )
        })
        .sum();
    assert_eq!(handshakes, 1, "{stats}");
    assert_eq!(
        sample(
            &stats,
            "veer_mux_streams_opened_total{direction=\"inbound\"}"
        ),
        3,
        "{stats}"
    );
    assert_eq!(
        sample(
            &stats,
            "veer_http_denials_total{reason=\"denied_by_permission\"}"
        ),
        1,
        "{stats}"
    );
    assert!(
        api.log_text().contains("mux=true"),
        "api's access log marks the streams"
    );
}
