//! `ConsulSource` against a real Consul 1.8.7 agent (`consul agent -dev`,
//! one per test, on free ports, killed on drop). Skips loudly when the
//! binary is missing (and fails when `VEER_REQUIRE_ROOT` says the full
//! suite must run). None of these tests needs root.
use serde_json::{json, Value};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use veer_consul::http::Client;
use veer_consul::{AgentAddr, ConsulSource, Flags, Options, ProxyTarget, Spec};
use veer_core::intentions::Action;
use veer_core::snapshot::Snapshot;

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "veer_consul=info".into()))
        .try_init();
}

fn consul_bin(test: &str) -> Option<PathBuf> {
    let bin = veer_testsupport::tool("consul");
    if bin.is_none() {
        veer_testsupport::skip(
            &format!("veer-consul {test}"),
            "consul binary not found (/opt/veer-tools/bin/consul); run .ci/install-deps",
        );
    }
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `consul agent -dev` on its own ports, killed on drop. Dev mode keeps
/// everything in memory, so a restart (same ports) comes back empty, with a
/// new CA and trust domain.
struct Agent {
    bin: PathBuf,
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
    /// How to reach the HTTP API (TCP, or the Unix socket when configured).
    addr: AgentAddr,
    admin: Client,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    /// Starts an agent; `hcl` is extra configuration, `unix_http` serves
    /// the HTTP API on `<dir>/consul.sock` instead of TCP.
    async fn start(bin: PathBuf, hcl: &[String], token: Option<&str>, unix_http: bool) -> Agent {
        let dir = std::env::temp_dir().join(veer_testsupport::unique("veer-consul-agent"));
        std::fs::create_dir_all(&dir).unwrap();
        let http = free_port();
        let mut args: Vec<String> = [
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
            "-grpc-port",
            "-1",
            "-dns-port",
            "-1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (flag, port) in [
            ("-http-port", http),
            ("-serf-lan-port", free_port()),
            ("-serf-wan-port", free_port()),
            ("-server-port", free_port()),
        ] {
            args.push(flag.into());
            args.push(port.to_string());
        }
        args.push("-data-dir".into());
        args.push(dir.display().to_string());
        let addr = if unix_http {
            let sock = dir.join("consul.sock");
            args.push("-hcl".into());
            args.push(format!(
                "addresses {{ http = \"unix://{}\" }}",
                sock.display()
            ));
            AgentAddr::Unix(sock)
        } else {
            AgentAddr::Tcp {
                https: false,
                host: "127.0.0.1".into(),
                port: http,
            }
        };
        for h in hcl {
            args.push("-hcl".into());
            args.push(h.clone());
        }
        let mut opts = Options::new(addr.clone(), ProxyTarget::ProxyId("-".into()));
        opts.token = token.map(str::to_string);
        let mut a = Agent {
            bin,
            child: None,
            dir,
            args,
            addr,
            admin: Client::new(&opts).unwrap(),
        };
        a.run().await;
        a
    }

    async fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = Duration::from_secs(2);
            let leader = self
                .admin
                .get("/v1/status/leader", t)
                .await
                .ok()
                .filter(|r| r.status == 200 && r.body.len() > 2);
            let roots = self
                .admin
                .get("/v1/agent/connect/ca/roots", t)
                .await
                .ok()
                .filter(|r| r.status == 200);
            if leader.is_some()
                && roots.is_some_and(|r| {
                    serde_json::from_slice::<Value>(&r.body).unwrap()["Roots"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                })
            {
                return;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
                panic!("the consul agent did not become ready:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn call(&self, method: &'static str, path: &str, body: Value) -> Value {
        let b = (method != "GET").then(|| body.to_string().into_bytes());
        let r = self
            .admin
            .request(method, path, b, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(
            r.status == 200,
            "{method} {path}: HTTP {}: {}",
            r.status,
            r.text()
        );
        serde_json::from_slice(&r.body).unwrap_or(Value::Null)
    }

    /// Registers a service with a sidecar whose TTL check starts passing.
    async fn register(
        &self,
        name: &str,
        id: &str,
        port: u16,
        sidecar_port: u16,
        vip: Option<&str>,
        proxy: Value,
    ) {
        let mut s = json!({
            "Name": name, "ID": id, "Port": port,
            "Connect": {"SidecarService": {
                "Port": sidecar_port,
                "Checks": [{"Name": "ttl", "TTL": "10m", "Status": "passing"}],
                "Proxy": proxy,
            }}
        });
        if let Some(v) = vip {
            s["TaggedAddresses"] = json!({"virtual": {"Address": v, "Port": port}});
        }
        self.call("PUT", "/v1/agent/service/register", s).await;
    }

    async fn intention(&self, source: &str, dest: &str, action: &str) -> String {
        let v = self
            .call(
                "POST",
                "/v1/connect/intentions",
                json!({"SourceName": source, "DestinationName": dest, "Action": action}),
            )
            .await;
        v["ID"].as_str().unwrap().to_string()
    }

    async fn trust_domain(&self) -> String {
        let v = self
            .call("GET", "/v1/agent/connect/ca/roots", Value::Null)
            .await;
        v["TrustDomain"].as_str().unwrap().to_string()
    }

    fn options(&self, target: ProxyTarget, token: Option<&str>) -> Options {
        let mut o = Options::new(self.addr.clone(), target);
        o.token = token.map(str::to_string);
        o.transparent = true;
        o
    }
}

fn web_proxy() -> ProxyTarget {
    ProxyTarget::ProxyId("web-sidecar-proxy".into())
}

/// `web` (explicit upstream db:9191) with `api` and two `db` instances, the
/// latter two with `virtual` addresses, and `api => web` allowed.
async fn small_mesh(a: &Agent) {
    a.register(
        "web",
        "web",
        8080,
        21000,
        None,
        json!({"Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}]}),
    )
    .await;
    a.register("api", "api", 8081, 21001, Some("10.96.0.20"), json!({}))
        .await;
    a.register("db", "db1", 5432, 21002, Some("10.96.0.30"), json!({}))
        .await;
    a.register("db", "db2", 5433, 21003, Some("10.96.0.30"), json!({}))
        .await;
    a.intention("api", "web", "allow").await;
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn upstream<'a>(spec: &'a Spec, name: &str) -> Option<&'a veer_core::snapshot::UpstreamSpec> {
    spec.upstreams
        .iter()
        .find(|u| u.identity.service == name)
        .map(|u| &**u)
}

/// Runs the source in a task, forwarding every spec it hands out.
fn follow(
    source: ConsulSource,
) -> (
    mpsc::UnboundedReceiver<(Instant, Spec)>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let h = tokio::spawn(source.run(move |s| {
        let _ = tx.send((Instant::now(), s));
    }));
    (rx, h)
}

async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(Instant, Spec)>,
    within: Duration,
    what: &str,
    ok: impl Fn(&Spec) -> bool,
) -> (Instant, Spec) {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((t, s))) if ok(&s) => return (t, s),
            Ok(Some((_, s))) => last = Some(s),
            Ok(None) => panic!("{what}: the source stopped"),
            Err(_) => panic!(
                "{what}: no such spec within {within:?}; the last one was {:#?}",
                last.map(|s| (s.identity.to_string(), s.intentions.len(), s.upstreams))
            ),
        }
    }
}

/// (a) a complete spec with Consul-issued leaf and roots, upstream VIPs and
/// endpoints and intentions; `--sidecar-for`; an unknown proxy ID fails
/// fast; (b) a new deny intention arrives within a second; (d) deregistered
/// instances leave the endpoints, new services join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_and_updates_from_a_real_agent() {
    logs();
    let Some(bin) = consul_bin("spec_and_updates_from_a_real_agent") else {
        return;
    };
    let a = Agent::start(bin, &[], None, false).await;
    small_mesh(&a).await;
    let td = a.trust_domain().await;

    // Unknown proxy: a clear error at once.
    let t0 = Instant::now();
    let e = ConsulSource::new(a.options(ProxyTarget::ProxyId("nope".into()), None))
        .unwrap()
        .first()
        .await
        .unwrap_err();
    assert_eq!(e.classify(), "proxy_not_found", "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let e = ConsulSource::new(a.options(ProxyTarget::ProxyId("web".into()), None))
        .unwrap()
        .first()
        .await
        .unwrap_err();
    assert_eq!(e.classify(), "not_a_proxy", "{e}");
    let e = ConsulSource::new(a.options(ProxyTarget::SidecarFor("nope".into()), None))
        .unwrap()
        .first()
        .await
        .unwrap_err();
    assert_eq!(e.classify(), "no_sidecar", "{e}");

    // --sidecar-for web finds web-sidecar-proxy.
    let mut src =
        ConsulSource::new(a.options(ProxyTarget::SidecarFor("web".into()), None)).unwrap();
    let t0 = Instant::now();
    let spec = tokio::time::timeout(Duration::from_secs(15), src.first())
        .await
        .expect("first spec")
        .unwrap();
    eprintln!("first spec after {:?}", t0.elapsed());
    assert_eq!(src.proxy_id(), Some("web-sidecar-proxy"));

    // Identity, roots and leaf are Consul's.
    assert_eq!(
        spec.identity.to_string(),
        format!("spiffe://{td}/ns/default/dc/dc1/svc/web")
    );
    let roots = a
        .call("GET", "/v1/agent/connect/ca/roots", Value::Null)
        .await;
    let root_der = veer_core::tls::parse_certs(
        roots["Roots"][0]["RootCert"].as_str().unwrap().as_bytes(),
        "root",
    )
    .unwrap();
    assert_eq!(spec.roots, root_der);
    let leaf = veer_core::tls::CertInfo::parse(&spec.chain[0]).unwrap();
    assert_eq!(
        leaf.uri_sans,
        vec![format!("spiffe://{td}/ns/default/dc/dc1/svc/web")]
    );
    assert!(spec.source.contains("web-sidecar-proxy"), "{}", spec.source);

    // Listeners and local app from the registration.
    assert_eq!(spec.listen.inbound, sa("0.0.0.0:21000"));
    assert_eq!(
        spec.listen.outbound,
        vec![sa("127.0.0.1:15001"), sa("[::1]:15001")]
    );
    assert_eq!(spec.local_app, sa("127.0.0.1:8080"));

    // Upstreams: VIPs from the services' own instances (1.8.7 sidecars do
    // not carry them), endpoints = passing sidecars on the node address.
    let names: Vec<&str> = spec
        .upstreams
        .iter()
        .map(|u| u.identity.service.as_str())
        .collect();
    assert_eq!(names, vec!["api", "db"]);
    let api = upstream(&spec, "api").unwrap();
    assert_eq!(
        api.virtual_ips,
        vec!["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(api.endpoints, vec![sa("127.0.0.1:21001")]);
    assert_eq!(
        api.identity.to_string(),
        format!("spiffe://{td}/ns/default/dc/dc1/svc/api")
    );
    let db = upstream(&spec, "db").unwrap();
    assert_eq!(
        db.virtual_ips,
        vec!["10.96.0.30".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        db.endpoints,
        vec![sa("127.0.0.1:21002"), sa("127.0.0.1:21003")]
    );
    assert_eq!(db.local_bind, Some(sa("127.0.0.1:9191")));

    // Intentions, and the default decision probed from the agent (ACLs off).
    assert_eq!(spec.default_action, Action::Allow);
    assert_eq!(spec.intentions.len(), 1);
    assert_eq!(
        spec.intentions[0].to_string(),
        "default/api => default/web (allow, precedence 9)"
    );

    let snap = Snapshot::build(spec, 1).expect("Snapshot::build accepts the Consul spec");
    assert_eq!(snap.routes.upstreams().len(), 2);

    let (mut rx, task) = follow(src);

    // (b) A deny intention is a new spec within a second.
    let before = Instant::now();
    a.intention("db", "web", "deny").await;
    let (at, spec) = wait_for(&mut rx, Duration::from_secs(5), "deny intention", |s| {
        s.intentions.len() == 2
    })
    .await;
    let took = at - before;
    eprintln!("deny intention reached the spec after {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let snap = Snapshot::build(spec, 2).unwrap();
    let db_id = veer_core::spiffe::ServiceId::new(&td, "default", "default", "dc1", "db");
    assert!(!snap.intentions.evaluate(&db_id).allowed());

    // (d) Deregistering db2 (and with it its sidecar) drops its endpoint.
    a.call("PUT", "/v1/agent/service/deregister/db2", Value::Null)
        .await;
    let (_, spec) = wait_for(&mut rx, Duration::from_secs(5), "db2 gone", |s| {
        upstream(s, "db").is_some_and(|u| u.endpoints.len() == 1)
    })
    .await;
    assert_eq!(
        upstream(&spec, "db").unwrap().endpoints,
        vec![sa("127.0.0.1:21002")]
    );
    // A failing sidecar leaves the endpoints too, and comes back.
    a.call(
        "PUT",
        "/v1/agent/check/fail/service:db1-sidecar-proxy",
        Value::Null,
    )
    .await;
    wait_for(&mut rx, Duration::from_secs(5), "db1 failing", |s| {
        upstream(s, "db").is_some_and(|u| u.endpoints.is_empty())
    })
    .await;
    a.call(
        "PUT",
        "/v1/agent/check/pass/service:db1-sidecar-proxy",
        Value::Null,
    )
    .await;
    wait_for(&mut rx, Duration::from_secs(5), "db1 passing", |s| {
        upstream(s, "db").is_some_and(|u| u.endpoints.len() == 1)
    })
    .await;

    // A new mesh service joins; a service without a sidecar does not.
    a.call(
        "PUT",
        "/v1/agent/service/register",
        json!({"Name": "legacy", "Port": 7000}),
    )
    .await;
    a.register(
        "cache",
        "cache1",
        6379,
        21004,
        Some("10.96.0.40"),
        json!({}),
    )
    .await;
    let (_, spec) = wait_for(&mut rx, Duration::from_secs(5), "cache joins", |s| {
        upstream(s, "cache").is_some()
    })
    .await;
    assert!(upstream(&spec, "legacy").is_none());
    let cache = upstream(&spec, "cache").unwrap();
    assert_eq!(
        cache.virtual_ips,
        vec!["10.96.0.40".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(cache.endpoints, vec![sa("127.0.0.1:21004")]);

    // A service-defaults protocol reaches the upstream.
    a.call(
        "PUT",
        "/v1/config",
        json!({"Kind": "service-defaults", "Name": "api", "Protocol": "http"}),
    )
    .await;
    wait_for(&mut rx, Duration::from_secs(5), "api protocol", |s| {
        upstream(s, "api").is_some_and(|u| u.protocol == veer_core::route::Protocol::Http)
    })
    .await;

    // Nothing changes: no new spec.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while rx.try_recv().is_ok() {}
    a.call(
        "PUT",
        "/v1/agent/service/register",
        json!({"Name": "legacy2", "Port": 7001}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        rx.try_recv().is_err(),
        "an update that changes nothing must not produce a spec"
    );
    task.abort();
}

/// (c) Rotating the CA: new roots (old one still trusted) and a new leaf
/// that chains to the new root through the cross-signed certificate; the
/// old leaf still verifies against the new roots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation() {
    logs();
    let Some(bin) = consul_bin("ca_rotation") else {
        return;
    };
    let a = Agent::start(bin, &[], None, false).await;
    a.register("web", "web", 8080, 21000, None, json!({})).await;
    let mut src = ConsulSource::new(a.options(web_proxy(), None)).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(15), src.first())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.roots.len(), 1);
    let (mut rx, task) = follow(src);

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let t0 = Instant::now();
    a.call(
        "PUT",
        "/v1/connect/ca/configuration",
        json!({"Provider": "consul", "Config": {"LeafCertTTL": "72h", "PrivateKey": key.serialize_pem()}}),
    )
    .await;
    // The roots change first; the agent re-issues the leaf within its 30 s jitter window.
    let (_, spec) = wait_for(
        &mut rx,
        Duration::from_secs(45),
        "rotated roots and leaf",
        |s| s.roots.len() == 2 && s.chain != first.chain,
    )
    .await;
    eprintln!("rotation complete in the spec after {:?}", t0.elapsed());
    assert!(
        spec.roots.contains(&first.roots[0]),
        "the old root stays trusted"
    );
    assert_ne!(
        spec.roots[0], first.roots[0],
        "the new (active) root comes first"
    );
    assert_eq!(
        spec.chain.len(),
        2,
        "the new leaf comes with the cross-signed intermediate"
    );
    let cross = veer_core::tls::CertInfo::parse(&spec.chain[1]).unwrap();
    assert!(cross.is_ca);
    assert_eq!(spec.identity, first.identity);
    Snapshot::build(spec.clone(), 2).expect("new leaf + both roots");
    // A peer still holding an old leaf is accepted by the new roots.
    let mut old = spec.clone();
    old.chain = first.chain.clone();
    old.key = first.key.clone_key();
    Snapshot::build(old, 3).expect("old leaf against the new roots");
    task.abort();
}

/// (e) Agent stops: the source keeps its last spec (no new spec, no
/// crash); agent comes back: updates resume. What a restarted `-dev` agent
/// keeps (checked with 1.8.7): the services registered through its API are
/// restored from `-data-dir` (agent-local persistence), their TTL checks
/// come back critical, and the server state — CA, intentions — is new
/// (dev servers keep it in memory), so the trust domain changes. The test
/// passes the TTL checks again (as a live sidecar would) and rewrites the
/// intentions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart() {
    logs();
    let Some(bin) = consul_bin("agent_restart") else {
        return;
    };
    let mut a = Agent::start(bin, &[], None, false).await;
    small_mesh(&a).await;
    let td1 = a.trust_domain().await;
    let mut src = ConsulSource::new(a.options(web_proxy(), None)).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(15), src.first())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.identity.trust_domain, td1);
    let (mut rx, task) = follow(src);

    a.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(rx.try_recv().is_err(), "no spec while the agent is down");
    assert!(!task.is_finished(), "the source keeps running");

    let t0 = Instant::now();
    a.run().await;
    let td2 = a.trust_domain().await;
    assert_ne!(td1, td2, "a dev agent comes back with a new CA");
    for id in ["web", "api", "db1", "db2"] {
        a.call(
            "PUT",
            &format!("/v1/agent/check/pass/service:{id}-sidecar-proxy"),
            Value::Null,
        )
        .await;
    }
    a.intention("api", "web", "allow").await;
    a.intention("db", "web", "deny").await;
    let (at, spec) = wait_for(
        &mut rx,
        Duration::from_secs(30),
        "caught up after restart",
        |s| {
            s.identity.trust_domain == td2
                && s.intentions.len() == 2
                && upstream(s, "api").is_some_and(|u| u.endpoints.len() == 1)
                && upstream(s, "db").is_some_and(|u| u.endpoints.len() == 2)
        },
    )
    .await;
    eprintln!("caught up {:?} after the agent restarted", at - t0);
    assert_eq!(upstream(&spec, "db").unwrap().virtual_ips.len(), 1);
    Snapshot::build(spec, 2).unwrap();
    task.abort();
}

/// (f) ACLs on with default deny: the proxy's token is used, the default
/// decision is deny, intentions still apply; no token: permission denied
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_default_deny() {
    logs();
    let Some(bin) = consul_bin("acl_default_deny") else {
        return;
    };
    let hcl = [
        r#"acl { enabled = true default_policy = "deny" tokens { master = "root" } }"#.to_string(),
    ];
    let a = Agent::start(bin, &hcl, Some("root"), false).await;
    a.call(
        "PUT",
        "/v1/acl/policy",
        json!({"Name": "web-proxy", "Rules": r#"
            service "web" { policy = "write" }
            service "web-sidecar-proxy" { policy = "write" }
            service_prefix "" { policy = "read" }
            node_prefix "" { policy = "read" }"#}),
    )
    .await;
    let token = a
        .call(
            "PUT",
            "/v1/acl/token",
            json!({"Policies": [{"Name": "web-proxy"}]}),
        )
        .await["SecretID"]
        .as_str()
        .unwrap()
        .to_string();
    a.register("web", "web", 8080, 21000, None, json!({})).await;
    a.register("api", "api", 8081, 21001, Some("10.96.0.20"), json!({}))
        .await;
    a.intention("api", "web", "allow").await;

    // No token: the anonymous token may not read the registration.
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        ConsulSource::new(a.options(web_proxy(), None))
            .unwrap()
            .first(),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(e.classify(), "permission_denied", "{e}");

    // The proxy's token, given as a token file through the flags.
    let tf = a.dir.join("token");
    std::fs::write(&tf, format!("{token}\n")).unwrap();
    let flags = Flags {
        proxy_id: Some("web-sidecar-proxy".into()),
        token_file: Some(tf),
        transparent: true,
        ..Flags::default()
    };
    let AgentAddr::Tcp { port, .. } = a.addr else {
        unreachable!()
    };
    let env = |k: &str| (k == "CONSUL_HTTP_ADDR").then(|| format!("127.0.0.1:{port}"));
    let opts = Options::from_lookup(&flags, env).unwrap();
    let mut src = ConsulSource::new(opts).unwrap();
    let spec = tokio::time::timeout(Duration::from_secs(15), src.first())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        spec.default_action,
        Action::Deny,
        "acl.default_policy = deny"
    );
    assert_eq!(spec.intentions.len(), 1);
    assert_eq!(
        upstream(&spec, "api").unwrap().endpoints,
        vec![sa("127.0.0.1:21001")]
    );
    let snap = Snapshot::build(spec, 1).unwrap();
    let td = a.trust_domain().await;
    let id = |s: &str| veer_core::spiffe::ServiceId::new(&td, "default", "default", "dc1", s);
    assert!(snap.intentions.evaluate(&id("api")).allowed());
    assert!(
        !snap.intentions.evaluate(&id("other")).allowed(),
        "default deny"
    );
}

fn env(pairs: Vec<(&'static str, String)>) -> impl Fn(&str) -> Option<String> {
    move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
}

fn write(dir: &Path, name: &str, s: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

/// The agent over a Unix socket and over HTTPS with a client certificate,
/// configured through the `CONSUL_*` environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_and_https_with_client_cert() {
    logs();
    let Some(bin) = consul_bin("unix_socket_and_https_with_client_cert") else {
        return;
    };
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let dir = std::env::temp_dir().join(veer_testsupport::unique("veer-consul-tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, ip: bool| {
        let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(sans).unwrap();
        if ip {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        (p.signed_by(&k, &issuer).unwrap().pem(), k.serialize_pem())
    };
    let (srv_cert, srv_key) = leaf(vec!["localhost".into(), "server.dc1.consul".into()], true);
    let (cli_cert, cli_key) = leaf(vec!["client.veer".into()], false);
    let ca = write(&dir, "ca.pem", &ca_cert.pem());
    let sc = write(&dir, "server.pem", &srv_cert);
    let sk = write(&dir, "server-key.pem", &srv_key);
    let cc = write(&dir, "client.pem", &cli_cert);
    let ck = write(&dir, "client-key.pem", &cli_key);
    let https = free_port();
    let hcl = [format!(
        r#"ports {{ https = {https} }} ca_file = "{}" cert_file = "{}" key_file = "{}" verify_incoming_https = true"#,
        ca.display(),
        sc.display(),
        sk.display()
    )];
    let a = Agent::start(bin, &hcl, None, true).await;
    a.register("web", "web", 8080, 21000, None, json!({})).await;

    // Over the Unix socket.
    let sock = match &a.addr {
        AgentAddr::Unix(p) => p.clone(),
        _ => unreachable!(),
    };
    let flags = Flags {
        proxy_id: Some("web-sidecar-proxy".into()),
        ..Flags::default()
    };
    let opts = Options::from_lookup(
        &flags,
        env(vec![(
            "CONSUL_HTTP_ADDR",
            format!("unix://{}", sock.display()),
        )]),
    )
    .unwrap();
    let spec = tokio::time::timeout(
        Duration::from_secs(15),
        ConsulSource::new(opts).unwrap().first(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(spec.identity.service, "web");
    assert!(
        spec.listen.outbound.is_empty(),
        "not transparent: no outbound listener"
    );

    // Over HTTPS, verifying the agent and presenting a client certificate.
    let tls_env = vec![
        ("CONSUL_HTTP_ADDR", format!("https://127.0.0.1:{https}")),
        ("CONSUL_CACERT", ca.display().to_string()),
        ("CONSUL_CLIENT_CERT", cc.display().to_string()),
        ("CONSUL_CLIENT_KEY", ck.display().to_string()),
        ("CONSUL_TLS_SERVER_NAME", "localhost".into()),
    ];
    let opts = Options::from_lookup(&flags, env(tls_env.clone())).unwrap();
    let spec = tokio::time::timeout(
        Duration::from_secs(15),
        ConsulSource::new(opts).unwrap().first(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(spec.identity.service, "web");

    // Without the client certificate the agent refuses the handshake.
    let opts = Options::from_lookup(&flags, env(tls_env[..2].to_vec())).unwrap();
    let e = Client::new(&opts)
        .unwrap()
        .get("/v1/agent/self", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(e.classify(), "connect" | "transport"), "{e}");
    // A CA that did not sign the agent's certificate fails verification.
    let other = veer_ca::Ca::new_root("x.consul").unwrap();
    let bad_ca = write(&dir, "other-ca.pem", &other.cert_pem);
    let mut bad = tls_env.clone();
    bad[1].1 = bad_ca.display().to_string();
    let opts = Options::from_lookup(&flags, env(bad)).unwrap();
    let e = Client::new(&opts)
        .unwrap()
        .get("/v1/agent/self", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.classify(), "connect", "{e}");
    assert!(e.to_string().contains("TLS"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A catalog-registered service `svc-<i>` on node `k8s-<i % 5>` with a
/// sidecar (a check in `status`, sidecar port `port`) and a `virtual`
/// address on both, as consul-k8s registers them.
fn mesh_service(i: usize, status: &str, port: u16) -> [Value; 2] {
    let node = format!("k8s-{}", i % 5);
    let node_addr = format!("10.20.0.{}", i % 5 + 1);
    let pod = format!("10.21.{}.{}", i / 250, i % 250 + 1);
    let vip =
        json!({"virtual": {"Address": format!("10.97.{}.{}", i / 250, i % 250 + 1), "Port": 80}});
    [
        json!({"Node": node, "Address": node_addr, "Service": {
            "ID": format!("svc-{i}"), "Service": format!("svc-{i}"), "Port": 8080,
            "Address": pod, "TaggedAddresses": vip}}),
        json!({"Node": node, "Address": node_addr, "Service": {
            "ID": format!("svc-{i}-sidecar-proxy"), "Service": format!("svc-{i}-sidecar-proxy"),
            "Kind": "connect-proxy", "Port": port, "Address": pod, "TaggedAddresses": vip,
            "Proxy": {"DestinationServiceName": format!("svc-{i}"), "DestinationServiceID": format!("svc-{i}")}},
            "Check": {"Node": node, "CheckID": format!("svc-{i}-ready"), "Name": "ready",
                      "ServiceID": format!("svc-{i}-sidecar-proxy"), "Status": status}}),
    ]
}

/// Registers `svc-0` … `svc-<n-1>`, eight requests at a time.
async fn register_many(a: &Agent, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(8) {
        let mut set = tokio::task::JoinSet::new();
        for &i in chunk {
            let c = a.admin.clone();
            set.spawn(async move {
                for body in mesh_service(i, "passing", 20000) {
                    let r = c
                        .request(
                            "PUT",
                            "/v1/catalog/register",
                            Some(body.to_string().into_bytes()),
                            Duration::from_secs(10),
                        )
                        .await
                        .unwrap();
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
    }
}

fn mesh_upstreams(spec: &Spec) -> usize {
    spec.upstreams
        .iter()
        .filter(|u| {
            u.identity.service.starts_with("svc-")
                && !u.endpoints.is_empty()
                && !u.virtual_ips.is_empty()
        })
        .count()
}

/// (g) Transparent mode with 300 mesh services on an agent that allows 40
/// connections per client (the old design held one per service): the first
/// spec has every upstream, no connection is refused, a health change, a
/// deregistration, a new service and a port change (a change no check
/// explains) are applied, and after an agent restart the source catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_at_scale() {
    logs();
    let Some(bin) = consul_bin("transparent_mode_at_scale") else {
        return;
    };
    const N: usize = 300;
    let limit = "limits { http_max_conns_per_client = 40 }".to_string();
    let mut a = Agent::start(bin, &[limit], None, false).await;
    small_mesh(&a).await;
    let t = Instant::now();
    register_many(&a, N).await;
    eprintln!("registered {N} services in {:?}", t.elapsed());

    let mut opts = a.options(web_proxy(), None);
    opts.max_reads = 8;
    let mut src = ConsulSource::new(opts).unwrap();
    let status = src.status();
    let t = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(30), src.first())
        .await
        .expect("first spec within 30 s")
        .unwrap();
    eprintln!("first spec after {:?}", t.elapsed());
    assert_eq!(
        mesh_upstreams(&first),
        N,
        "every implicit upstream in the first spec"
    );
    let s7 = upstream(&first, "svc-7").unwrap();
    assert_eq!(s7.endpoints, vec![sa("10.21.0.8:20000")]);
    assert_eq!(
        s7.virtual_ips,
        vec!["10.97.0.8".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(
        upstream(&first, "svc-7-sidecar-proxy").is_none(),
        "a sidecar is no upstream"
    );
    assert!(upstream(&first, "api").is_some() && upstream(&first, "db").is_some());
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        status.closed_errors.load(Relaxed),
        0,
        "the agent refused no connection"
    );
    assert_eq!(status.unreachable_errors.load(Relaxed), 0);
    let max = status.max_connections.load(Relaxed);
    assert!(max > 8 && max <= 25, "at most {max} agent connections");
    assert_eq!(status.catalog_services.load(Relaxed), 2 * N as u64 + 7);
    Snapshot::build(first, 1).unwrap();
    let (mut rx, task) = follow(src);
    assert_eq!(status.upstreams.load(Relaxed), N as u64 + 2);

    // A health change.
    let t0 = Instant::now();
    let [_, side] = mesh_service(7, "critical", 20000);
    a.call(
        "PUT",
        "/v1/catalog/register",
        json!({"Node": side["Node"], "Address": side["Address"], "Check": side["Check"]}),
    )
    .await;
    let (at, spec) = wait_for(&mut rx, Duration::from_secs(10), "svc-7 unhealthy", |s| {
        upstream(s, "svc-7").is_some_and(|u| u.endpoints.is_empty())
    })
    .await;
    eprintln!("health change applied after {:?}", at - t0);
    assert_eq!(mesh_upstreams(&spec), N - 1);

    // A deregistration.
    let t0 = Instant::now();
    for id in ["svc-9-sidecar-proxy", "svc-9"] {
        a.call(
            "PUT",
            "/v1/catalog/deregister",
            json!({"Node": "k8s-4", "ServiceID": id}),
        )
        .await;
    }
    let (at, spec) = wait_for(&mut rx, Duration::from_secs(10), "svc-9 gone", |s| {
        upstream(s, "svc-9").is_none()
    })
    .await;
    eprintln!("deregistration applied after {:?}", at - t0);
    assert_eq!(mesh_upstreams(&spec), N - 2);

    // A new service.
    for body in mesh_service(N, "passing", 20000) {
        a.call("PUT", "/v1/catalog/register", body).await;
    }
    wait_for(&mut rx, Duration::from_secs(10), "new service", |s| {
        upstream(s, &format!("svc-{N}")).is_some_and(|u| u.endpoints.len() == 1)
    })
    .await;

    // A sidecar port change without a check change: only the catalog
    // moves, nothing explains it, every service is read again.
    let [_, mut side] = mesh_service(11, "passing", 20000);
    side["Service"]["Port"] = json!(20011);
    side.as_object_mut().unwrap().remove("Check");
    a.call("PUT", "/v1/catalog/register", side).await;
    wait_for(
        &mut rx,
        Duration::from_secs(10),
        "svc-11 on its new port",
        |s| upstream(s, "svc-11").is_some_and(|u| u.endpoints == vec![sa("10.21.0.12:20011")]),
    )
    .await;
    assert!(status.full_reads.load(Relaxed) >= 1);
    assert_eq!(
        status.closed_errors.load(Relaxed),
        0,
        "the agent refused no connection"
    );

    // The agent restarts (dev mode: the catalog comes back empty but for
    // the agent's own services, with a new CA).
    a.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rx.try_recv().is_err(), "no spec while the agent is down");
    a.run().await;
    let td2 = a.trust_domain().await;
    for id in ["web", "api", "db1", "db2"] {
        a.call(
            "PUT",
            &format!("/v1/agent/check/pass/service:{id}-sidecar-proxy"),
            Value::Null,
        )
        .await;
    }
    register_many(&a, N).await;
    let (_, spec) = wait_for(
        &mut rx,
        Duration::from_secs(30),
        "caught up after the restart",
        |s| s.identity.trust_domain == td2 && mesh_upstreams(s) == N,
    )
    .await;
    assert!(
        upstream(&spec, &format!("svc-{N}")).is_none(),
        "gone with the old catalog"
    );
    Snapshot::build(spec, 2).unwrap();
    task.abort();
}

/// (h) An agent over its per-client connection limit closes new
/// connections before answering: that is `Error::Closed` ("closed"), told
/// apart from an unreachable agent ("connect").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_told_apart() {
    logs();
    let Some(bin) = consul_bin("refused_connections_are_told_apart") else {
        return;
    };
    let limit = "limits { http_max_conns_per_client = 4 }".to_string();
    let a = Agent::start(bin, &[limit], None, false).await;
    let idx = a
        .admin
        .get("/v1/catalog/services", Duration::from_secs(5))
        .await
        .unwrap()
        .index
        .unwrap();
    // Eight long polls at once from one client: the agent takes four.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let c = a.admin.clone();
        set.spawn(async move {
            c.get(
                &format!("/v1/catalog/services?index={idx}&wait=3s"),
                Duration::from_secs(10),
            )
            .await
        });
    }
    let mut kinds = Vec::new();
    while let Some(r) = set.join_next().await {
        kinds.push(match r.unwrap() {
            Ok(r) => format!("http {}", r.status),
            Err(e) => {
                eprintln!("{e:?}");
                e.classify().to_string()
            }
        });
    }
    kinds.sort();
    eprintln!("{kinds:?}");
    assert!(kinds.iter().any(|k| k == "closed"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "http 200"), "{kinds:?}");
    assert!(
        !kinds.iter().any(|k| k == "connect" || k == "transport"),
        "{kinds:?}"
    );

    // An agent that is not there is unreachable, not "closed".
    let mut opts = Options::new(
        AgentAddr::Tcp {
            https: false,
            host: "127.0.0.1".into(),
            port: free_port(),
        },
        web_proxy(),
    );
    opts.token = None;
    let e = Client::new(&opts)
        .unwrap()
        .get("/v1/agent/self", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.classify(), "connect", "{e}");
    assert!(e.is_unreachable() && !e.is_closed());
}

/// Issue 13 (agent mode, no traffic): with central config on and
/// `service-defaults` protocol http, the api upstream carries L7 routes
/// (Consul's default catch-all, then the router's routes once one is
/// written, changed and deleted) and web's inbound listener is HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_and_splitters_become_http_routes() {
    use veer_core::l7::PathMatch;
    logs();
    let Some(bin) = consul_bin("routers_and_splitters_become_http_routes") else {
        return;
    };
    let a = Agent::start(
        bin,
        &["enable_central_service_config = true".to_string()],
        None,
        false,
    )
    .await;
    for svc in ["web", "api"] {
        a.call(
            "PUT",
            "/v1/config",
            json!({"Kind": "service-defaults", "Name": svc, "Protocol": "http"}),
        )
        .await;
    }
    small_mesh(&a).await;
    let mut v2 = json!({
        "Name": "api", "ID": "api-v2", "Port": 8082, "Meta": {"version": "v2"},
        "Connect": {"SidecarService": {"Port": 21004,
            "Checks": [{"Name": "ttl", "TTL": "10m", "Status": "passing"}]}}
    });
    v2["TaggedAddresses"] = json!({"virtual": {"Address": "10.96.0.20", "Port": 8082}});
    a.call("PUT", "/v1/agent/service/register", v2).await;
    let (mut rx, task) = follow(ConsulSource::new(a.options(web_proxy(), None)).unwrap());
    let routes = |s: &Spec| {
        upstream(s, "api")
            .and_then(|u| u.http.as_ref())
            .map(|h| h.routes.clone())
    };
    // Consul's default chain: one catch-all route; web's inbound is L7
    // (the agent merged service-defaults into the registration).
    let (_, spec) = wait_for(&mut rx, Duration::from_secs(15), "default route", |s| {
        routes(s).is_some_and(|r| r.len() == 1)
    })
    .await;
    assert_eq!(
        spec.inbound_http.as_ref().map(|i| i.protocol),
        Some(veer_core::route::Protocol::Http),
        "{:#?}",
        spec.unapplied
    );
    assert!(upstream(&spec, "db").unwrap().http.is_none(), "db is tcp");
    let t0 = Instant::now();
    Snapshot::build(spec, 1).expect("the spec builds");

    // A resolver with subsets and a router to v2: the routes follow.
    a.call(
        "PUT",
        "/v1/config",
        json!({"Kind": "service-resolver", "Name": "api", "DefaultSubset": "v1",
               "Subsets": {"v1": {"Filter": "Service.Meta.version != v2"},
                           "v2": {"Filter": "Service.Meta.version == v2"}}}),
    )
    .await;
    a.call(
        "PUT",
        "/v1/config",
        json!({"Kind": "service-router", "Name": "api", "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/v2/"}},
             "Destination": {"ServiceSubset": "v2", "PrefixRewrite": "/", "NumRetries": 2,
                             "RetryOnStatusCodes": [503], "RequestTimeout": "3s"}}
        ]}),
    )
    .await;
    let (t, spec) = wait_for(&mut rx, Duration::from_secs(15), "router routes", |s| {
        routes(s).is_some_and(|r| r.len() == 2)
    })
    .await;
    eprintln!("router applied after {:?}", t - t0);
    let api = upstream(&spec, "api").unwrap();
    let h = api.http.as_ref().unwrap();
    let r = &h.routes[0];
    assert_eq!(r.matches.path, PathMatch::Prefix("/v2/".into()));
    assert_eq!(r.action.prefix_rewrite.as_deref(), Some("/"));
    assert_eq!(r.action.timeout, Some(Duration::from_secs(3)));
    let retry = r.action.retry.as_ref().unwrap();
    assert_eq!(
        (retry.num_retries, retry.on_status_codes.clone()),
        (2, vec![503])
    );
    let v2c = &h.clusters[r.action.clusters[0].cluster];
    assert!(
        v2c.name.starts_with("v2.api.default.dc1.internal."),
        "{}",
        v2c.name
    );
    assert_eq!(v2c.targets[0].endpoints, vec![sa("127.0.0.1:21004")]);
    let v1c = &h.clusters[h.routes[1].action.clusters[0].cluster];
    assert!(
        v1c.name.starts_with("v1.api.default.dc1.internal."),
        "{}",
        v1c.name
    );
    assert_eq!(v1c.targets[0].endpoints, vec![sa("127.0.0.1:21001")]);
    assert!(
        !spec.unapplied.iter().any(|u| u.setting.contains("router")),
        "{:#?}",
        spec.unapplied
    );
    Snapshot::build(spec, 2).expect("the spec builds");

    // A live change of the router, then its deletion.
    a.call(
        "PUT",
        "/v1/config",
        json!({"Kind": "service-router", "Name": "api", "Routes": [
            {"Match": {"HTTP": {"PathExact": "/health", "Methods": ["GET"]}},
             "Destination": {"ServiceSubset": "v2"}}
        ]}),
    )
    .await;
    let (_, spec) = wait_for(&mut rx, Duration::from_secs(15), "changed router", |s| {
        routes(s).is_some_and(|r| r[0].matches.path == PathMatch::Exact("/health".into()))
    })
    .await;
    assert_eq!(routes(&spec).unwrap()[0].matches.methods, ["GET"]);
    // A regex Consul 1.8.7 stores unchecked: refused by name, the last
    // good routes stay.
    a.call(
        "PUT",
        "/v1/config",
        json!({"Kind": "service-router", "Name": "api", "Routes": [
            {"Match": {"HTTP": {"PathRegex": "(("}}, "Destination": {"ServiceSubset": "v2"}}
        ]}),
    )
    .await;
    let (_, spec) = wait_for(&mut rx, Duration::from_secs(15), "refused router", |s| {
        s.unapplied
            .iter()
            .any(|u| u.setting == "discovery chain api" && u.detail.contains("does not compile"))
    })
    .await;
    let u = spec
        .unapplied
        .iter()
        .find(|u| u.setting == "discovery chain api")
        .unwrap();
    assert!(u.detail.contains("Match.HTTP.PathRegex"), "{}", u.detail);
    assert!(
        u.detail.contains("the last good chain stays"),
        "{}",
        u.detail
    );
    assert_eq!(
        routes(&spec).unwrap()[0].matches.path,
        PathMatch::Exact("/health".into())
    );
    a.call("DELETE", "/v1/config/service-router/api", Value::Null)
        .await;
    wait_for(&mut rx, Duration::from_secs(15), "router deleted", |s| {
        routes(s).is_some_and(|r| r.len() == 1)
            && !s
                .unapplied
                .iter()
                .any(|u| u.setting == "discovery chain api")
    })
    .await;
    task.abort();
}
