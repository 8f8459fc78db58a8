//! L7 through the mesh, for real (issue 13): a Consul 1.8.7 dev agent with
//! `enable_central_service_config = true`, `service-defaults` protocol
//! http, a resolver with subsets, a router using every match kind, a
//! splitter, and veer sidecars in three network namespaces configured only
//! by the agent:
//!
//! ```text
//!  ns web  10.79.0.1  curl → 127.0.0.1:10000 (upstream api)
//!  ns api1 10.79.0.2  api v1: HTTP app 127.0.0.1:8080, sidecar :20000
//!  ns api2 10.79.0.3  api v2: HTTP app 127.0.0.1:8080, sidecar :20000
//! ```
//!
//! Each app (`veer_testsupport::http_app`) answers `<version> <method>
//! <path>` so the test sees which instance a request reached and the path
//! it arrived with; `/slow` answers after 3 s and a path with `flaky` in it
//! fails every other request (the first, the third, …) with a 503.
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use veer_testsupport::ca::TempDir;
use veer_testsupport::consul::Agent;
use veer_testsupport::http_app;
use veer_testsupport::mesh::{redirect, Sidecar};
use veer_testsupport::netns::{star, Netns};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

const WEB_IP: &str = "10.79.0.1";
const API1_IP: &str = "10.79.0.2";
const API2_IP: &str = "10.79.0.3";

fn register(agent: &Agent, id: &str, name: &str, addr: &str, version: &str, upstreams: &str) {
    let body = format!(
        r#"{{"Name":"{name}","ID":"{id}","Address":"{addr}","Port":8080,"Meta":{{"version":"{version}"}},
        "Connect":{{"SidecarService":{{"Port":20000,
          "Checks":[{{"CheckID":"{id}-up","Name":"up","TTL":"24h","Status":"passing"}}],
          "Proxy":{{"LocalServiceAddress":"127.0.0.1","LocalServicePort":8080,"Upstreams":[{upstreams}]}}}}}}}}"#
    );
    agent.call("PUT", "/v1/agent/service/register", Some(&body));
}

fn entry(agent: &Agent, body: &str) {
    agent.call("PUT", "/v1/config", Some(body));
}

/// One curl request from `web`: (status, body, seconds).
fn curl(web: &Netns, args: &str, path: &str) -> (u16, String, f64) {
    let out = web
        .sh(&format!(
            "curl -sS --max-time 10 -o - -w '\\n%{{http_code}} %{{time_total}}' {args} 'http://127.0.0.1:10000{path}'"
        ))
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut t = tail.split_whitespace();
    let code = t.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let secs = t.next().and_then(|c| c.parse().ok()).unwrap_or(0.0);
    (code, body.to_string(), secs)
}

/// Polls until `path` (with curl `args`) reaches `want` (a body prefix).
fn until(web: &Netns, args: &str, path: &str, want: &str, what: &str) -> Duration {
    let t0 = Instant::now();
    let mut last = (0, String::new(), 0.0);
    while t0.elapsed() < Duration::from_secs(20) {
        last = curl(web, args, path);
        if last.0 == 200 && last.1.starts_with(want) {
            eprintln!(
                "l7 test: {what}: {path} reaches {want:?} after {:?}",
                t0.elapsed()
            );
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: {path} {args} answered {last:?}, not {want:?}");
}

fn expect(web: &Netns, args: &str, path: &str, want: &str) {
    let got = curl(web, args, path);
    assert_eq!((got.0, got.1.as_str()), (200, want), "curl {args} {path}");
}

const ROUTER: &str = r#"{"Kind":"service-router","Name":"api","Routes":[
  {"Match":{"HTTP":{"PathExact":"/exact"}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"PathPrefix":"/v2/"}},"Destination":{"ServiceSubset":"v2","PrefixRewrite":"/"}},
  {"Match":{"HTTP":{"PathRegex":"/re/[0-9]+"}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"Header":[{"Name":"x-canary","Exact":"1"}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"Header":[{"Name":"x-pre","Prefix":"ab"}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"Header":[{"Name":"x-suf","Suffix":"yz"}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"Header":[{"Name":"x-rx","Regex":"[a-c]+"}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"Header":[{"Name":"x-present","Present":true}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"PathPrefix":"/inv","Header":[{"Name":"x-mode","Exact":"a","Invert":true}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"QueryParam":[{"Name":"q","Exact":"2"}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"QueryParam":[{"Name":"qr","Regex":"[0-9]+"}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"QueryParam":[{"Name":"qp","Present":true}]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"PathPrefix":"/method","Methods":["PUT"]}},"Destination":{"ServiceSubset":"v2"}},
  {"Match":{"HTTP":{"PathPrefix":"/slow"}},"Destination":{"RequestTimeout":"1s"}},
  {"Match":{"HTTP":{"PathPrefix":"/flaky"}},"Destination":{"NumRetries":2,"RetryOnStatusCodes":[503]}},
  {"Match":{"HTTP":{"PathPrefix":"/noretry"}},"Destination":{}},
  {"Match":{"HTTP":{"PathPrefix":"/split"}},"Destination":{"Service":"api-split"}}
]}"#;

#[test]
fn l7_routing_splitting_retries_and_timeouts_from_consul() {
    let name = "l7_routing_splitting_retries_and_timeouts_from_consul";
    if !veer_testsupport::require_root(name) {
        return;
    }
    let Some(agent) = Agent::start(&["enable_central_service_config = true"], None) else {
        veer_testsupport::skip(name, "consul not installed (run .ci/install-deps)");
        return;
    };
    let files = TempDir::new("veer-l7-");
    let web = Netns::new("lw").unwrap();
    let api1 = Netns::new("l1").unwrap();
    let api2 = Netns::new("l2").unwrap();
    let _hub = star(&[
        (&web, &[&format!("{WEB_IP}/24")]),
        (&api1, &[&format!("{API1_IP}/24")]),
        (&api2, &[&format!("{API2_IP}/24")]),
    ])
    .unwrap();
    for ns in [&web, &api1, &api2] {
        redirect(&bin(), ns, &[]);
    }
    let app_addr = "127.0.0.1:8080".parse().unwrap();
    let v1 = http_app::spawn(Some(&api1), app_addr, "v1");
    let _v2 = http_app::spawn(Some(&api2), app_addr, "v2");

    // Config entries first, as an operator would: protocol http for every
    // service in the chains, subsets by version, the router, the splitter.
    for svc in ["api", "api-split", "web"] {
        entry(
            &agent,
            &format!(r#"{{"Kind":"service-defaults","Name":"{svc}","Protocol":"http"}}"#),
        );
    }
    entry(
        &agent,
        r#"{"Kind":"service-resolver","Name":"api","DefaultSubset":"v1","Subsets":{
             "v1":{"Filter":"Service.Meta.version == v1"},"v2":{"Filter":"Service.Meta.version == v2"}}}"#,
    );
    entry(
        &agent,
        r#"{"Kind":"service-splitter","Name":"api-split","Splits":[
             {"Weight":50,"Service":"api","ServiceSubset":"v1"},
             {"Weight":50,"Service":"api","ServiceSubset":"v2"}]}"#,
    );
    entry(&agent, ROUTER);
    register(&agent, "api1", "api", API1_IP, "v1", "");
    register(&agent, "api2", "api", API2_IP, "v2", "");
    register(
        &agent,
        "web",
        "web",
        WEB_IP,
        "v1",
        r#"{"DestinationName":"api","LocalBindPort":10000}"#,
    );
    let start = |ns: &Netns, id: &str| {
        let args: Vec<OsString> = vec!["--proxy-id".into(), id.into()];
        Sidecar::start_with(
            &bin(),
            ns,
            &args,
            &[("CONSUL_HTTP_ADDR", agent.addr.as_str())],
            PathBuf::new(),
            files.join(&format!("{id}.log")),
        )
    };
    let web_sc = start(&web, "web-sidecar-proxy");
    let api1_sc = start(&api1, "api1-sidecar-proxy");
    let _api2_sc = start(&api2, "api2-sidecar-proxy");

    // The catch-all: the default subset v1.
    until(&web, "", "/", "v1 GET /", "catch-all route");
    // Every match kind sends to v2; a near miss stays on v1.
    expect(&web, "", "/exact", "v2 GET /exact");
    expect(&web, "", "/exact/no", "v1 GET /exact/no");
    expect(&web, "", "/v2/items", "v2 GET /items"); // prefix rewrite seen by the app
    expect(&web, "", "/re/42", "v2 GET /re/42");
    expect(&web, "", "/re/4x", "v1 GET /re/4x");
    expect(&web, "-H 'x-canary: 1'", "/h", "v2 GET /h");
    expect(&web, "-H 'x-canary: 2'", "/h", "v1 GET /h");
    expect(&web, "-H 'x-pre: abc'", "/h", "v2 GET /h");
    expect(&web, "-H 'x-suf: xyz'", "/h", "v2 GET /h");
    expect(&web, "-H 'x-rx: abca'", "/h", "v2 GET /h");
    expect(&web, "-H 'x-rx: abcd'", "/h", "v1 GET /h");
    expect(&web, "-H 'x-present: anything'", "/h", "v2 GET /h");
    expect(&web, "", "/inv", "v2 GET /inv");
    expect(&web, "-H 'x-mode: a'", "/inv", "v1 GET /inv");
    expect(&web, "", "/q?q=2", "v2 GET /q?q=2");
    expect(&web, "", "/q?q=3", "v1 GET /q?q=3");
    expect(&web, "", "/q?qr=123", "v2 GET /q?qr=123");
    expect(&web, "", "/q?qp", "v2 GET /q?qp");
    expect(&web, "-X PUT", "/method", "v2 PUT /method");
    expect(&web, "", "/method", "v1 GET /method");
    // HTTP/2 from the app (h2c prior knowledge) is routed the same way.
    expect(&web, "--http2-prior-knowledge", "/exact", "v2 GET /exact");

    // The request timeout: a 504 after 1 s, not the app's 3 s.
    let (code, _, secs) = curl(&web, "", "/slow");
    assert_eq!(code, 504, "timeout status");
    assert!((0.9..2.5).contains(&secs), "timed out after {secs} s");

    // Retries on 503: the app fails the first attempt, the client sees 200.
    let before = v1.flaky.load(Ordering::SeqCst);
    expect(&web, "", "/flaky", "v1 GET /flaky");
    assert_eq!(v1.flaky.load(Ordering::SeqCst) - before, 2, "one retry");
    // Without a retry policy the 503 reaches the client.
    v1.flaky.store(0, Ordering::SeqCst);
    let (code, _, _) = curl(&web, "", "/noretry/flaky");
    assert_eq!(code, 503, "no retry policy: no retry");
    assert_eq!(v1.flaky.load(Ordering::SeqCst), 1, "one attempt");

    // The 50/50 split, within tolerance over 200 requests.
    let mut n2 = 0;
    let n = 200;
    for _ in 0..n {
        let (code, body, _) = curl(&web, "", "/split");
        assert_eq!(code, 200, "{body}");
        if body.starts_with("v2") {
            n2 += 1;
        }
    }
    eprintln!("l7 test: split 50/50: {n2} of {n} to v2");
    assert!((70..=130).contains(&n2), "{n2} of {n} to v2");

    // A live change of the router: /exact no longer has a route of its own.
    let changed = ROUTER.replace(
        r#"{"Match":{"HTTP":{"PathExact":"/exact"}},"Destination":{"ServiceSubset":"v2"}},"#,
        "",
    );
    entry(&agent, &changed);
    until(&web, "", "/exact", "v1 GET /exact", "router change");
    expect(&web, "", "/v2/x", "v2 GET /x");

    // The api sidecar served the requests at L7 (central config).
    assert!(v1.requests() > 20, "v1 saw {}", v1.requests());
    drop(web_sc);
    drop(api1_sc);
}
