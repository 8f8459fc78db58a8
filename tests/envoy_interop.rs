//! Interop with real Envoy configured the way Consul configures a
//! transparent sidecar (`veer_testsupport::envoy`): veer on one side, Envoy
//! on the other, in the two-namespace topology of `mesh::Mesh` with Consul's
//! redirect rules and both sidecars as UID 5995.
//!
//! Skipped (loudly) without root or without an `envoy` binary
//! (`.ci/install-deps` puts one in /opt/veer-tools/bin).
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};
use veer_testsupport::envoy::{Bootstrap, Envoy};
use veer_testsupport::mesh::{self, Sidecar, API_VIP, API_VIP6, PLAIN_IP, SERVER_IP};
use veer_testsupport::netns::Netns;

fn veer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

/// The Envoy binary, or `None` after a loud SKIP line (a panic when
/// `VEER_REQUIRE_ROOT` says the full suite must run).
fn envoy_bin(test: &str) -> Option<PathBuf> {
    if !veer_testsupport::require_root(test) {
        return None;
    }
    let bin = veer_testsupport::tool("envoy");
    if bin.is_none() {
        veer_testsupport::skip(test, "no envoy binary; run .ci/install-deps");
    }
    bin
}

/// The local app: echoes what it reads and records what it saw.
#[derive(Clone, Default)]
struct App {
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl App {
    fn spawn(ns: &Netns, addr: &str) -> App {
        let app = App::default();
        let a = app.clone();
        let addr: SocketAddr = addr.parse().unwrap();
        let l = ns.run(move || TcpListener::bind(addr).expect("app bind"));
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                a.accepted.fetch_add(1, Ordering::SeqCst);
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                a.bytes.fetch_add(n, Ordering::SeqCst);
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                });
            }
        });
        app
    }
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn bytes(&self) -> usize {
        self.bytes.load(Ordering::SeqCst)
    }
}

/// Both namespaces with Consul's redirect rules, the server's app on
/// 127.0.0.1:8080 and a plain (non-mesh) echo server on 10.77.0.4:9000.
struct Topo {
    ca: TestCa,
    files: TempDir,
    client: Netns,
    server: Netns,
    app: App,
    plain: App,
}

impl Topo {
    fn new() -> Topo {
        let ca = TestCa::new(TRUST_DOMAIN);
        let files = TempDir::new("veer-envoy-");
        let (client, server) = veer_testsupport::mesh::namespaces();
        mesh::redirect(&veer(), &client, &[]);
        mesh::redirect(&veer(), &server, &["-exclude-inbound-port", "9000"]);
        let app = App::spawn(&server, "127.0.0.1:8080");
        let plain = App::spawn(&server, &format!("{PLAIN_IP}:9000"));
        Topo {
            ca,
            files,
            client,
            server,
            app,
            plain,
        }
    }

    /// A veer sidecar from a TOML text.
    fn veer(&self, ns: &Netns, name: &str, config: &str) -> Sidecar {
        let cfg = self.files.write(&format!("{name}.toml"), config);
        Sidecar::start(
            &veer(),
            ns,
            cfg,
            self.files.join(&format!("{name}.log")),
            &[],
        )
    }

    fn envoy(&self, bin: &Path, ns: &Netns, boot: &Bootstrap) -> Envoy {
        Envoy::start(bin, ns, boot, self.files.path(), 1)
    }

    /// Envoy as the client ("web") sidecar with api's virtual IPs.
    fn envoy_client(&self, bin: &Path, service: &str) -> Envoy {
        let boot = Bootstrap::sidecar(&self.ca, service).upstream(
            "api",
            &[API_VIP.parse().unwrap(), API_VIP6.parse().unwrap()],
            &[format!("{SERVER_IP}:20000").parse().unwrap()],
        );
        self.envoy(bin, &self.client, &boot)
    }
}

/// Sends `msg` from the client namespace (as root: redirected), half-closes
/// and returns what came back before EOF, or the error.
fn echo(ns: &Netns, addr: &str, msg: &str) -> std::io::Result<String> {
    let a: SocketAddr = addr.parse().unwrap();
    let msg = msg.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(msg.as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

/// A large transfer both ways through the sidecars: sends `n` bytes and
/// reads the echo concurrently; true when every byte came back in order.
fn bulk_echo(ns: &Netns, addr: &str, n: usize) -> bool {
    let a: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let mut sent = 0;
            while sent < n {
                let k = chunk.len().min(n - sent);
                w.write_all(&chunk[..k]).unwrap();
                sent += k;
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut r = s;
        let mut got = 0usize;
        let mut ok = true;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    for (j, b) in buf[..k].iter().enumerate() {
                        ok &= *b == (((got + j) % (64 * 1024)) % 251) as u8;
                    }
                    got += k;
                }
                Err(_) => return false,
            }
        }
        writer.join().unwrap();
        ok && got == n
    })
}

/// The veer sidecar's metrics in `ns` (its admin endpoint, 127.0.0.1:19000).
fn veer_stats(ns: &Netns) -> String {
    ns.sh_ok("curl -sS --max-time 5 http://127.0.0.1:19000/stats/prometheus")
        .expect("veer's admin endpoint answers")
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
fn veer_outbound_to_envoy_inbound() {
    let Some(bin) = envoy_bin("veer_outbound_to_envoy_inbound") else {
        return;
    };
    let t = Topo::new();
    let api = t.envoy(
        &bin,
        &t.server,
        &Bootstrap::sidecar(&t.ca, "api").allow("web"),
    );
    let web = t.veer(&t.client, "web", &mesh::web_config(&t.ca, ""));
    assert_eq!(
        echo(&t.client, &format!("{API_VIP}:80"), "hello envoy").unwrap(),
        "hello envoy"
    );
    assert_eq!(
        echo(&t.client, &format!("[{API_VIP6}]:443"), "over v6").unwrap(),
        "over v6"
    );
    assert!(bulk_echo(&t.client, &format!("{API_VIP}:80"), 8 << 20));
    assert_eq!(t.app.accepted(), 3);
    // veer checked Envoy's certificate (api's SPIFFE ID) and Envoy's RBAC
    // saw web's.
    assert!(web.wait_log("upstream=api", Duration::from_secs(2)));
    assert_eq!(api.stat("connect_authz.rbac.allowed"), Some(3));
    assert_eq!(api.stat("connect_authz.rbac.denied"), Some(0));
    // veer offered multiplexing (ALPN veer-mux/1); Envoy did not select
    // it, so each app connection had its own mTLS connection.
    let stats = veer_stats(&t.client);
    assert!(
        stats.contains("veer_mux_fallbacks_total{direction=\"outbound\"} 3")
            && stats.contains("veer_mux_connections_opened_total{direction=\"outbound\"} 0"),
        "{stats}"
    );
    // Passthrough from veer still reaches a non-mesh server.
    assert_eq!(
        echo(&t.client, &format!("{PLAIN_IP}:9000"), "plain").unwrap(),
        "plain"
    );
    assert_eq!(t.plain.accepted(), 1);
}

#[test]
fn envoy_outbound_to_veer_inbound() {
    let Some(bin) = envoy_bin("envoy_outbound_to_veer_inbound") else {
        return;
    };
    let t = Topo::new();
    let api = t.veer(
        &t.server,
        "api",
        &mesh::api_config(&t.ca, "deny", &mesh::allow("web")),
    );
    let web = t.envoy_client(&bin, "web");
    assert_eq!(
        echo(&t.client, &format!("{API_VIP}:80"), "hello veer").unwrap(),
        "hello veer"
    );
    // (Consul's Envoy outbound listener is IPv4 only: 127.0.0.1:15001.)
    assert!(bulk_echo(&t.client, &format!("{API_VIP}:80"), 8 << 20));
    assert_eq!(t.app.accepted(), 2);
    // veer saw Envoy's client certificate as web's identity; Envoy checked
    // veer's certificate against api's SPIFFE ID (the chain's SAN match).
    assert!(
        api.wait_log("svc/web", Duration::from_secs(3)),
        "{}",
        api.log_text()
    );
    let cluster = format!("api.default.dc1.internal.{TRUST_DOMAIN}");
    assert_eq!(
        web.stat(&format!("cluster.{cluster}.ssl.handshake")),
        Some(2)
    );
    // veer's inbound (multiplexing on) served Envoy's connections as plain ones.
    let stats = veer_stats(&t.server);
    assert!(
        stats.contains("veer_mux_connections_opened_total{direction=\"inbound\"} 0"),
        "{stats}"
    );
    // Envoy's passthrough (original-destination) reaches a non-mesh server.
    assert_eq!(
        echo(&t.client, &format!("{PLAIN_IP}:9000"), "plain").unwrap(),
        "plain"
    );
    assert_eq!(t.plain.accepted(), 1);
}

#[test]
fn denied_identities_are_refused_both_ways() {
    let Some(bin) = envoy_bin("denied_identities_are_refused_both_ways") else {
        return;
    };
    // Envoy (web) → veer (api) whose intentions deny web.
    {
        let t = Topo::new();
        let api = t.veer(
            &t.server,
            "api",
            &mesh::api_config(&t.ca, "allow", &mesh::deny("web")),
        );
        let _web = t.envoy_client(&bin, "web");
        assert_eq!(
            echo(&t.client, &format!("{API_VIP}:80"), "secret").unwrap_or_default(),
            ""
        );
        assert!(
            api.wait_log("reason=denied_by_intention", Duration::from_secs(5)),
            "{}",
            api.log_text()
        );
        assert_eq!(t.app.accepted(), 0, "veer dials the app only when allowed");
    }
    // Envoy presenting another valid identity (evil) → veer allowing only web.
    {
        let t = Topo::new();
        let api = t.veer(
            &t.server,
            "api",
            &mesh::api_config(&t.ca, "deny", &mesh::allow("web")),
        );
        let _evil = t.envoy_client(&bin, "evil");
        assert_eq!(
            echo(&t.client, &format!("{API_VIP}:80"), "secret").unwrap_or_default(),
            ""
        );
        assert!(
            api.wait_log("reason=denied_by_default", Duration::from_secs(5)),
            "{}",
            api.log_text()
        );
        assert!(api.log_text().contains("svc/evil"), "{}", api.log_text());
        assert_eq!(t.app.accepted(), 0);
    }
    // veer (web) → Envoy (api) whose RBAC allows only `admin`.
    {
        let t = Topo::new();
        let api = t.envoy(
            &bin,
            &t.server,
            &Bootstrap::sidecar(&t.ca, "api").allow("admin"),
        );
        let _web = t.veer(&t.client, "web", &mesh::web_config(&t.ca, ""));
        assert_eq!(
            echo(&t.client, &format!("{API_VIP}:80"), "secret").unwrap_or_default(),
            ""
        );
        assert!(wait_until(Duration::from_secs(5), || api
            .stat("connect_authz.rbac.denied")
            == Some(1)));
        assert_eq!(api.stat("connect_authz.rbac.allowed"), Some(0));
        // Envoy's tcp_proxy dials local_app when the connection is accepted
        // and its RBAC acts on the first byte, so the app may see a TCP
        // connection (Consul's configuration has no delayed connect), but
        // never a byte of it.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(t.app.bytes(), 0, "no byte of a denied peer reaches the app");
        eprintln!(
            "envoy inbound, denied peer: the app accepted {} connection(s), 0 bytes",
            t.app.accepted()
        );
    }
}

/// The L7 bootstraps (`Bootstrap::protocol`) are ones the real Envoy accepts:
/// `envoy --mode validate` on both sidecars for every protocol.
#[test]
fn envoy_accepts_the_http_bootstraps() {
    let Some(bin) = veer_testsupport::tool("envoy") else {
        veer_testsupport::skip(
            "envoy_accepts_the_http_bootstraps",
            "no envoy binary; run .ci/install-deps",
        );
        return;
    };
    let ca = TestCa::new(TRUST_DOMAIN);
    let files = TempDir::new("veer-envoy-validate-");
    for protocol in ["tcp", "http", "http2", "grpc"] {
        let boots = [
            Bootstrap::sidecar(&ca, "api")
                .allow("web")
                .protocol(protocol),
            Bootstrap::sidecar(&ca, "web").protocol(protocol).upstream(
                "api",
                &[API_VIP.parse().unwrap()],
                &[format!("{SERVER_IP}:20000").parse().unwrap()],
            ),
        ];
        for boot in boots {
            let json = boot.to_json();
            assert_eq!(
                json.contains("http_connection_manager"),
                protocol != "tcp",
                "{protocol}: {json}"
            );
            let path = files.write(&format!("{}-{protocol}.json", boot.service), &json);
            let out = std::process::Command::new(&bin)
                .args(["--mode", "validate", "-c"])
                .arg(&path)
                .output()
                .expect("run envoy");
            assert!(
                out.status.success(),
                "{protocol} {}: {}{}",
                boot.service,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Both namespaces with Consul's redirect rules and the server's HTTP app
/// (`http_app`, answering `api <method> <path>`) on 127.0.0.1:8080.
struct HttpTopo {
    ca: TestCa,
    files: TempDir,
    client: Netns,
    server: Netns,
    app: veer_testsupport::http_app::HttpApp,
}

impl HttpTopo {
    fn new() -> HttpTopo {
        let ca = TestCa::new(TRUST_DOMAIN);
        let files = TempDir::new("veer-envoy-http-");
        let (client, server) = veer_testsupport::mesh::namespaces();
        mesh::redirect(&veer(), &client, &[]);
        mesh::redirect(&veer(), &server, &[]);
        let app = veer_testsupport::http_app::spawn(
            Some(&server),
            "127.0.0.1:8080".parse().unwrap(),
            "api",
        );
        HttpTopo {
            ca,
            files,
            client,
            server,
            app,
        }
    }

    fn veer(&self, ns: &Netns, name: &str, config: &str) -> Sidecar {
        let cfg = self.files.write(&format!("{name}.toml"), config);
        Sidecar::start(
            &veer(),
            ns,
            cfg,
            self.files.join(&format!("{name}.log")),
            &[],
        )
    }

    /// veer as api with `[inbound] protocol = "http"`, allowing `allowed`.
    fn veer_api(&self, allowed: &str) -> Sidecar {
        let cfg = mesh::api_config(&self.ca, "deny", &mesh::allow(allowed)).replace(
            "local_app = \"127.0.0.1:8080\"\n",
            "local_app = \"127.0.0.1:8080\"\nprotocol = \"http\"\n",
        );
        self.veer(&self.server, "api", &cfg)
    }

    /// veer as web with its `api` upstream `protocol = "http"`.
    fn veer_web(&self) -> Sidecar {
        let keys = format!("protocol = \"http\"\n{}", mesh::api_endpoints());
        self.veer(
            &self.client,
            "web",
            &mesh::web_config_with(&self.ca, &keys, ""),
        )
    }

    fn envoy(&self, bin: &Path, ns: &Netns, boot: &Bootstrap) -> Envoy {
        Envoy::start(bin, ns, boot, self.files.path(), 1)
    }
}

/// One curl request from `ns` (redirected): (status, body).
fn curl(ns: &Netns, args: &str, url: &str) -> (u16, String) {
    let out = ns
        .sh(&format!(
            "curl -sS --max-time 10 -o - -w '\\n%{{http_code}}' {args} '{url}'"
        ))
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// veer's L7 outbound (HTTP/1.1 and h2c from the app) to Envoy's HTTP
/// public listener as Consul configures an `http` service: Envoy's HTTP
/// RBAC allows web by veer's certificate, and its `APPEND_FORWARD` XFCC
/// names web's SPIFFE ID to the app; a source Envoy does not allow gets
/// Envoy's 403, passed through.
#[test]
fn http_veer_outbound_to_envoy_inbound() {
    let Some(bin) = envoy_bin("http_veer_outbound_to_envoy_inbound") else {
        return;
    };
    let t = HttpTopo::new();
    let api = t.envoy(
        &bin,
        &t.server,
        &Bootstrap::sidecar(&t.ca, "api")
            .allow("web")
            .protocol("http"),
    );
    let _web = t.veer_web();
    let url = format!("http://{API_VIP}/hello?x=1");
    assert_eq!(
        curl(&t.client, "", &url),
        (200, "api GET /hello?x=1".into())
    );
    let xfcc = t.app.last_xfcc().unwrap_or_default();
    assert!(
        xfcc.contains(&format!(
            "URI=spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/web"
        )),
        "XFCC from Envoy: {xfcc:?}"
    );
    assert_eq!(
        curl(&t.client, "--http2-prior-knowledge", &url),
        (200, "api GET /hello?x=1".into())
    );
    assert_eq!(
        curl(
            &t.client,
            "-X POST --data-binary 0123456789",
            &format!("http://{API_VIP}/post")
        ),
        (200, "api POST /post".into())
    );
    assert_eq!(api.stat("http.public_listener.rbac.allowed"), Some(3));

    // Envoy allowing only `admin`: its 403 reaches the client.
    let t = HttpTopo::new();
    let _api = t.envoy(
        &bin,
        &t.server,
        &Bootstrap::sidecar(&t.ca, "api")
            .allow("admin")
            .protocol("http"),
    );
    let _web = t.veer_web();
    let (code, _) = curl(&t.client, "", &format!("http://{API_VIP}/secret"));
    assert_eq!(code, 403);
    assert_eq!(t.app.requests(), 0);
}

/// Envoy's HTTP outbound (as Consul configures an `http` upstream) to
/// veer's L7 inbound: requests are served after mTLS and authorized one by
/// one; Envoy presenting an identity veer does not allow gets a 403 per
/// request and the app sees nothing.
#[test]
fn http_envoy_outbound_to_veer_inbound() {
    let Some(bin) = envoy_bin("http_envoy_outbound_to_veer_inbound") else {
        return;
    };
    let web_boot = |t: &HttpTopo, service: &str| {
        Bootstrap::sidecar(&t.ca, service)
            .protocol("http")
            .upstream(
                "api",
                &[API_VIP.parse().unwrap(), API_VIP6.parse().unwrap()],
                &[format!("{SERVER_IP}:20000").parse().unwrap()],
            )
    };
    let t = HttpTopo::new();
    let api = t.veer_api("web");
    let web = t.envoy(&bin, &t.client, &web_boot(&t, "web"));
    for i in 0..3 {
        assert_eq!(
            curl(&t.client, "", &format!("http://{API_VIP}/r{i}")),
            (200, format!("api GET /r{i}"))
        );
    }
    assert!(
        api.wait_log("svc/web", Duration::from_secs(3)),
        "{}",
        api.log_text()
    );
    let cluster = format!("api.default.dc1.internal.{TRUST_DOMAIN}");
    assert_eq!(
        web.stat(&format!("cluster.{cluster}.upstream_rq_200")),
        Some(3)
    );

    // Another valid identity (evil): 403 per request, the app sees none.
    let t = HttpTopo::new();
    let _api = t.veer_api("web");
    let _evil = t.envoy(&bin, &t.client, &web_boot(&t, "evil"));
    for _ in 0..2 {
        let (code, _) = curl(&t.client, "", &format!("http://{API_VIP}/secret"));
        assert_eq!(code, 403);
    }
    assert_eq!(t.app.requests(), 0);
}
