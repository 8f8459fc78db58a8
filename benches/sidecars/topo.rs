//! The measured systems, each in a fresh copy of the test topology:
//!
//! ```text
//!  ns client 10.77.0.1                      ns server 10.77.0.2, 10.77.0.4
//!  load generator (this process, root)      app 0.0.0.0:8080 (one thread) / iperf3 -s :8080
//!    --REDIRECT--> web sidecar :15001 --mTLS--> PREROUTING --> api sidecar :20000 --> 127.0.0.1:8080
//!  iperf3 -c 10.77.0.4:5202 (passthrough) --------------------------------> iperf3 -s 10.77.0.4:5202
//! ```
//!
//! `direct` has no redirect rules and no sidecars: the client dials
//! 10.77.0.2:8080 and 10.77.0.4:5202 itself.
//!
//! `veer` and `envoy` are configured statically (veer's TOML, an Envoy
//! bootstrap with static resources); `veer-xds` and `envoy-xds` are both
//! started by consul-dataplane's command line with its bootstrap and get
//! the same Consul-shaped resources (built from Consul v1.16.0's goldens,
//! `veer_testsupport::consul_xds`) from a Delta ADS server on a unix
//! socket in this process, as consul-dataplane would serve them.
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};
use veer_testsupport::consul_xds::{self as cx, Certs, Params, SidecarShape};
use veer_testsupport::envoy::{Bootstrap, Envoy};
use veer_testsupport::mesh::{self, Sidecar, API_VIP, API_VIP6, PLAIN_IP, PROXY_UID, SERVER_IP};
use veer_testsupport::netns::Netns;
use veer_testsupport::xds::XdsServer;

/// The plain (non-mesh) iperf3 server's port; excluded from inbound redirection.
pub const PLAIN_PORT: u16 = 5202;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Veer,
    Envoy,
    /// veer in Envoy's place, configured over Delta xDS.
    VeerXds,
    /// Envoy configured over Delta xDS, as consul-dataplane runs it.
    EnvoyXds,
    /// veer with both services `protocol = "http"`: requests go through
    /// the L7 path (routing, pooled upstream connections) on both sidecars.
    VeerHttp,
    /// Envoy configured as Consul configures an `http` service (HTTP
    /// connection manager on both listeners).
    EnvoyHttp,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Veer => "veer",
            Kind::Envoy => "envoy",
            Kind::VeerXds => "veer-xds",
            Kind::EnvoyXds => "envoy-xds",
            Kind::VeerHttp => "veer-http",
            Kind::EnvoyHttp => "envoy-http",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Direct,
            Kind::Veer,
            Kind::Envoy,
            Kind::VeerXds,
            Kind::EnvoyXds,
            Kind::VeerHttp,
            Kind::EnvoyHttp,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }

    /// veer's metrics (its own names) are there to read.
    pub fn is_veer(self) -> bool {
        matches!(self, Kind::Veer | Kind::VeerXds | Kind::VeerHttp)
    }

    /// Needs the Envoy binary.
    pub fn is_envoy(self) -> bool {
        matches!(self, Kind::Envoy | Kind::EnvoyXds | Kind::EnvoyHttp)
    }

    /// Both sidecars on their HTTP path: the app's requests are parsed and
    /// routed, so the byte-stream phases (iperf3) do not apply.
    pub fn is_http(self) -> bool {
        matches!(self, Kind::VeerHttp | Kind::EnvoyHttp)
    }

    /// The system this one is compared with in the report's ratios.
    pub fn envoy_peer(self) -> Option<Kind> {
        match self {
            Kind::Veer => Some(Kind::Envoy),
            Kind::VeerXds => Some(Kind::EnvoyXds),
            Kind::VeerHttp => Some(Kind::EnvoyHttp),
            _ => None,
        }
    }
}

/// The ADS servers of the xDS systems, on a runtime of their own.
struct Ads {
    _api: XdsServer,
    _web: XdsServer,
    _rt: tokio::runtime::Runtime,
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Tools {
    pub veer: PathBuf,
    pub envoy: Option<PathBuf>,
    pub iperf3: PathBuf,
    pub me: PathBuf,
}

/// One system under test with its namespaces, app and sidecars.
pub struct System {
    pub kind: Kind,
    // Field order is drop order: processes first, then namespaces and files.
    veer: Vec<Sidecar>,
    envoy: Vec<Envoy>,
    xds: Vec<Proc>,
    _ads: Option<Ads>,
    app: Option<Proc>,
    _plain: Proc,
    pub client: Netns,
    pub server: Netns,
    pub files: TempDir,
    _ca: TestCa,
}

fn web_toml(ca: &TestCa, protocol: &str) -> String {
    let (cert, key) = ca.service("web");
    format!(
        r#"[service]
name = "web"
datacenter = "dc1"
trust_domain = "{TRUST_DOMAIN}"

[tls]
ca_file = "{roots}"
cert_file = "{cert}"
key_file = "{key}"

[inbound]
bind = "0.0.0.0:20000"
local_app = "127.0.0.1:8080"

[outbound]
bind = "127.0.0.1:15001"

[intentions]
default_action = "deny"

[[upstreams]]
name = "api"
protocol = "{protocol}"
virtual_ips = ["{API_VIP}", "{API_VIP6}"]
endpoints = ["{SERVER_IP}:20000"]
"#,
        roots = ca.roots().display(),
        cert = cert.display(),
        key = key.display(),
    )
}

fn api_toml(ca: &TestCa, protocol: &str) -> String {
    // mesh::api_config plus the outbound listener every sidecar has.
    mesh::api_config(ca, "deny", &mesh::allow("web"))
        .replace(
            "\n[intentions]",
            "\n[outbound]\nbind = \"127.0.0.1:15001\"\n\n[intentions]",
        )
        .replace(
            "local_app = \"127.0.0.1:8080\"\n",
            &if protocol == "tcp" {
                "local_app = \"127.0.0.1:8080\"\n".to_string()
            } else {
                // XFCC as Consul ≥ 1.12 asks Envoy for (APPEND_FORWARD), so
                // both add the client's details to every request.
                format!(
                    "local_app = \"127.0.0.1:8080\"\nprotocol = \"{protocol}\"\nxfcc = \"append_forward\"\n"
                )
            },
        )
}

/// Starts `program args` in `ns`, reads its first stdout line (or waits for
/// a listening port with `ss` when `port` is given).
fn spawn_in(ns: &Netns, program: &Path, args: &[&str], wait_port: Option<u16>) -> Proc {
    let mut cmd = ns.command(program);
    cmd.args(args).stdin(Stdio::null()).stderr(Stdio::null());
    if wait_port.is_some() {
        cmd.stdout(Stdio::null());
    } else {
        cmd.stdout(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{program:?}: {e}"));
    if let Some(port) = wait_port {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let out = ns
                .sh_ok(&format!("ss -Htln 'sport = :{port}'"))
                .unwrap_or_default();
            if !out.trim().is_empty() {
                return Proc(child);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{program:?} did not listen on :{port}");
    }
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("app stdout");
    assert_eq!(line.trim(), "listening", "{program:?} did not start");
    Proc(child)
}

impl System {
    pub fn start(kind: Kind, tools: &Tools, concurrency: usize) -> System {
        let ca = TestCa::new(TRUST_DOMAIN);
        let files = TempDir::new("veer-bench-");
        let (client, server) = veer_testsupport::mesh::namespaces();
        for ns in [&client, &server] {
            // Room for the connection-rate runs and 10k idle connections.
            ns.sh_ok(
                "sysctl -q -w net.ipv4.ip_local_port_range='10000 65000' \
                 net.ipv4.tcp_tw_reuse=1 net.core.somaxconn=16384",
            )
            .expect("sysctl");
        }
        if kind != Kind::Direct {
            mesh::redirect(&tools.veer, &client, &[]);
            mesh::redirect(
                &tools.veer,
                &server,
                &["-exclude-inbound-port", &PLAIN_PORT.to_string()],
            );
        }
        let app = spawn_in(&server, &tools.me, &["__app", "0.0.0.0:8080"], None);
        let plain = spawn_in(
            &server,
            &tools.iperf3,
            &["-s", "-B", PLAIN_IP, "-p", &PLAIN_PORT.to_string()],
            Some(PLAIN_PORT),
        );
        let mut sys = System {
            kind,
            veer: Vec::new(),
            envoy: Vec::new(),
            xds: Vec::new(),
            _ads: None,
            app: Some(app),
            _plain: plain,
            client,
            server,
            files,
            _ca: ca,
        };
        let conc = concurrency.to_string();
        // Per-connection access logs off: Consul's Envoy has none by default.
        let extra = [
            "--concurrency",
            &conc,
            "--log-level",
            "info,veer::access=off",
        ];
        match kind {
            Kind::Direct => {}
            Kind::Veer | Kind::VeerHttp => {
                let protocol = if kind.is_http() { "http" } else { "tcp" };
                let api = sys.files.write("api.toml", &api_toml(&sys._ca, protocol));
                let web = sys.files.write("web.toml", &web_toml(&sys._ca, protocol));
                sys.veer.push(Sidecar::start(
                    &tools.veer,
                    &sys.server,
                    api,
                    sys.files.join("api.log"),
                    &extra,
                ));
                sys.veer.push(Sidecar::start(
                    &tools.veer,
                    &sys.client,
                    web,
                    sys.files.join("web.log"),
                    &extra,
                ));
            }
            Kind::Envoy | Kind::EnvoyHttp => {
                let bin = tools.envoy.as_deref().expect("envoy binary");
                let protocol = if kind.is_http() { "http" } else { "tcp" };
                // Circuit breakers raised so 10k connections fit (Envoy's
                // default is 1024 per cluster, as Consul leaves it).
                let mut api = Bootstrap::sidecar(&sys._ca, "api")
                    .allow("web")
                    .protocol(protocol);
                api.max_connections = Some(65_536);
                let mut web = Bootstrap::sidecar(&sys._ca, "web")
                    .protocol(protocol)
                    .upstream(
                        "api",
                        &[API_VIP.parse().unwrap(), API_VIP6.parse().unwrap()],
                        &[format!("{SERVER_IP}:20000").parse().unwrap()],
                    );
                web.max_connections = Some(65_536);
                sys.envoy.push(Envoy::start(
                    bin,
                    &sys.server,
                    &api,
                    sys.files.path(),
                    concurrency,
                ));
                sys.envoy.push(Envoy::start(
                    bin,
                    &sys.client,
                    &web,
                    sys.files.path(),
                    concurrency,
                ));
            }
            Kind::VeerXds | Kind::EnvoyXds => sys.start_xds(kind, tools, concurrency),
        }
        sys
    }

    /// Both sidecars started by consul-dataplane's command line, fed by a
    /// Delta ADS server each.
    fn start_xds(&mut self, kind: Kind, tools: &Tools, concurrency: usize) {
        use std::os::unix::fs::PermissionsExt;
        // The proxies run as UID 5995 and must reach the sockets.
        std::fs::set_permissions(self.files.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let params = |service: &str| {
            let mut p = Params::golden(Certs::issue(&self._ca.ca, "dc1", service));
            p.public = "0.0.0.0:20000".parse().unwrap();
            p.local_app = "127.0.0.1:8080".parse().unwrap();
            p.vips.clear();
            p.instances.clear();
            p.endpoints.clear();
            p.vips.insert(
                "api".into(),
                vec![API_VIP.parse().unwrap(), API_VIP6.parse().unwrap()],
            );
            p.endpoints.insert(
                "api".into(),
                vec![format!("{SERVER_IP}:20000").parse().unwrap()],
            );
            p
        };
        let mut api = cx::sidecar(
            &params("api"),
            &SidecarShape {
                rbac: Some(cx::rbac_allow(TRUST_DOMAIN, &["web"])),
                passthrough: true,
                ..Default::default()
            },
        );
        let mut web = cx::sidecar(
            &params("web"),
            &SidecarShape {
                upstreams: vec!["api".into()],
                passthrough: true,
                ..Default::default()
            },
        );
        // Room for 10k idle connections (Envoy's default is 1024 per
        // cluster, as Consul leaves it).
        api.set_max_connections(65_536);
        web.set_max_connections(65_536);
        let serve = |name: &str, x: &cx::ConsulXds| {
            let sock = self.files.join(&format!("{name}-xds.sock"));
            let server = rt
                .block_on(XdsServer::unix(sock.clone()))
                .expect("ADS server");
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod");
            let items = x.resources();
            server.set_all(
                items
                    .iter()
                    .map(|(t, n, a)| (t.as_str(), n.as_str(), a.clone()))
                    .collect(),
            );
            (server, sock)
        };
        let (api_ads, api_sock) = serve("api", &api);
        let (web_ads, web_sock) = serve("web", &web);
        let bin = match kind {
            Kind::VeerXds => {
                // A link named `envoy`, as the dataplane image would carry it.
                let dir = self.files.join("bin");
                std::fs::create_dir_all(&dir).expect("bin dir");
                let link = dir.join("envoy");
                if !link.exists() {
                    std::os::unix::fs::symlink(&tools.veer, &link).expect("link");
                }
                link
            }
            _ => tools.envoy.clone().expect("envoy binary"),
        };
        for (ns, service, sock) in [
            (&self.server, "api", &api_sock),
            (&self.client, "web", &web_sock),
        ] {
            let log =
                std::fs::File::create(self.files.join(&format!("{service}-xds.log"))).expect("log");
            let child = ns
                .command("setpriv")
                .args([
                    &format!("--reuid={PROXY_UID}"),
                    &format!("--regid={PROXY_UID}"),
                    "--clear-groups",
                ])
                .arg(&bin)
                .arg("--config-yaml")
                .arg(cx::dataplane_bootstrap(service, sock, 19000))
                .args(["--log-level", "info", "--disable-hot-restart"])
                .arg(format!("--concurrency {concurrency}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("{bin:?}: {e}"));
            self.xds.push(Proc(child));
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let r = ns
                    .sh_ok("curl -sS --max-time 2 -o /dev/null -w '%{http_code}' http://127.0.0.1:19000/ready")
                    .unwrap_or_default();
                if r.trim() == "200" {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "{} in {service}'s place did not become ready: {}",
                    kind.name(),
                    std::fs::read_to_string(self.files.join(&format!("{service}-xds.log")))
                        .unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self._ads = Some(Ads {
            _api: api_ads,
            _web: web_ads,
            _rt: rt,
        });
    }

    /// Where the client sends HTTP (and the mesh bulk streams).
    pub fn target(&self) -> SocketAddr {
        match self.kind {
            Kind::Direct => format!("{SERVER_IP}:8080").parse().unwrap(),
            _ => format!("{API_VIP}:80").parse().unwrap(),
        }
    }

    /// The non-mesh destination (passthrough through the client sidecar).
    pub fn plain_target(&self) -> SocketAddr {
        format!("{PLAIN_IP}:{PLAIN_PORT}").parse().unwrap()
    }

    /// The sidecar processes: (name, pid), server side first.
    pub fn sidecars(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for (s, name) in self.veer.iter().zip(["api", "web"]) {
            out.push((name.to_string(), s.pid().unwrap()));
        }
        for (e, name) in self.envoy.iter().zip(["api", "web"]) {
            out.push((name.to_string(), e.pid().unwrap()));
        }
        for (p, name) in self.xds.iter().zip(["api", "web"]) {
            out.push((name.to_string(), p.0.id()));
        }
        out
    }

    /// Replaces the HTTP app with `iperf3 -s` on the same port.
    pub fn swap_app_for_iperf(&mut self, tools: &Tools) {
        self.app = None;
        std::thread::sleep(Duration::from_millis(100));
        self.app = Some(spawn_in(
            &self.server,
            &tools.iperf3,
            &["-s", "-p", "8080"],
            Some(8080),
        ));
    }

    /// Runs `iperf3 -c` in the client namespace; the JSON report. Bounded:
    /// a 5 s connect timeout, and killed 15 s after the test should end.
    pub fn iperf(&self, tools: &Tools, dst: SocketAddr, secs: u32, streams: u32) -> String {
        let out = self
            .client
            .command("timeout")
            .args(["-k", "5", &(secs + 15).to_string()])
            .arg(&tools.iperf3)
            .args(["--connect-timeout", "5000"])
            .args(["-c", &dst.ip().to_string(), "-p", &dst.port().to_string()])
            .args(["-t", &secs.to_string(), "-P", &streams.to_string(), "-J"])
            .stdin(Stdio::null())
            .output()
            .expect("iperf3");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
