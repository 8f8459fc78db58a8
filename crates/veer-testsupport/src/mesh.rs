//! A two-sidecar mesh in network namespaces, as Consul's transparent proxy
//! builds it:
//!
//! ```text
//!  ns "client" 10.77.0.1 fd77::1          ns "server" 10.77.0.2 (+10.77.0.4) fd77::2
//!  app (test code, root) --redirect-->     PREROUTING redirect --> api sidecar :20000
//!  web sidecar :15001 (UID 5995) --mTLS-->                          --> app 127.0.0.1:8080
//! ```
//!
//! Both namespaces get `veer redirect-traffic` (IPv4 and IPv6); both sidecars
//! run as UID 5995 from the real `veer` binary. The api service has virtual
//! IPs 10.96.0.20 and fd00::20. A plain (non-mesh) server listens on
//! 10.77.0.4:9000 in the server namespace (inbound port 9000 excluded).
use crate::ca::{TempDir, TestCa, TRUST_DOMAIN};
use crate::echo::{spawn_app, App};
use crate::netns::{veth, Netns};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PROXY_UID: u32 = 5995;
pub const CLIENT_IP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "10.77.0.2";
pub const PLAIN_IP: &str = "10.77.0.4";
pub const API_VIP: &str = "10.96.0.20";
pub const API_VIP6: &str = "fd00::20";
/// A dialed-directly instance that never answers (packets dropped).
pub const BLACKHOLE_IP: &str = "10.77.0.9";

/// A veer process inside a namespace, killed on drop.
pub struct Sidecar {
    child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub name: String,
}

impl Sidecar {
    /// Starts `veer run --config <config>` in `ns` as UID 5995 (stderr to
    /// `log`) and waits for "veer ready".
    pub fn start(bin: &Path, ns: &Netns, config: PathBuf, log: PathBuf, extra: &[&str]) -> Sidecar {
        let mut args: Vec<std::ffi::OsString> = vec!["--config".into(), config.clone().into()];
        args.extend(extra.iter().map(Into::into));
        Sidecar::start_with(bin, ns, &args, &[], config, log)
    }

    /// Starts `veer run <args>` in `ns` as UID 5995 with extra environment
    /// variables, and waits for "veer ready".
    pub fn start_with(
        bin: &Path,
        ns: &Netns,
        args: &[std::ffi::OsString],
        env: &[(&str, &str)],
        config: PathBuf,
        log: PathBuf,
    ) -> Sidecar {
        let out = std::fs::File::create(&log).expect("log file");
        let mut cmd = ns.command("setpriv");
        cmd.args([
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
        ])
        .arg(bin)
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .env(
            "VEER_LOG",
            std::env::var("VEER_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(out);
        let child = cmd.spawn().expect("start veer");
        let mut s = Sidecar {
            child: Some(child),
            config,
            log,
            name: ns.name().to_string(),
        };
        if !s.wait_log("veer ready", Duration::from_secs(30)) {
            let log = s.log_text();
            if let Some(c) = s.child.as_mut() {
                let _ = c.kill();
            }
            panic!("veer did not become ready in {}:\n{log}", s.name);
        }
        s
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle` (checked every 20 ms).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.log_text().matches(needle).count() >= n {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal to the process (via `kill`, as an operator would).
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            // setpriv execs veer, so the child's pid is veer's.
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status();
        }
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() || std::env::var_os("VEER_SHOW_LOGS").is_some() {
            eprintln!("---- veer log ({}) ----\n{}", self.name, self.log_text());
        }
    }
}

/// Runs `veer redirect-traffic` for a namespace.
pub fn redirect(bin: &Path, ns: &Netns, extra: &[&str]) {
    let out = Command::new(bin)
        .arg("redirect-traffic")
        .arg("-netns")
        .arg(ns.path())
        .args([
            "-proxy-uid",
            &PROXY_UID.to_string(),
            "-proxy-inbound-port",
            "20000",
            "-ipv6",
        ])
        .args(extra)
        .output()
        .expect("run veer redirect-traffic");
    assert!(
        out.status.success(),
        "redirect-traffic failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The keys of the web sidecar's `api` upstream besides its name, virtual
/// IPs and listener: the api sidecar as its one endpoint.
pub fn api_endpoints() -> String {
    format!("endpoints = [\"{SERVER_IP}:20000\"]")
}

/// The web (client) sidecar's configuration.
pub fn web_config(ca: &TestCa, extra: &str) -> String {
    web_config_with(ca, &api_endpoints(), extra)
}

/// The web (client) sidecar's configuration, with `api_keys` for its one
/// `api` upstream entry (reached by virtual IP and on 127.0.0.1:9191):
/// [`api_endpoints`] by default; its endpoints, `connect_timeout`,
/// `dialed_directly` and `instances` go there (one entry per service).
pub fn web_config_with(ca: &TestCa, api_keys: &str, extra: &str) -> String {
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
virtual_ips = ["{API_VIP}", "{API_VIP6}"]
local_bind = "127.0.0.1:9191"
{api_keys}

[[upstreams]]
name = "db"
dialed_directly = true
instances = ["{BLACKHOLE_IP}"]
{extra}"#,
        roots = ca.roots().display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// The api (server) sidecar's configuration; `rules` are TOML intention rules.
pub fn api_config(ca: &TestCa, default_action: &str, rules: &str) -> String {
    let (cert, key) = ca.service("api");
    format!(
        r#"[service]
name = "api"
datacenter = "dc1"
trust_domain = "{TRUST_DOMAIN}"

[tls]
ca_file = "{roots}"
cert_file = "{cert}"
key_file = "{key}"

[inbound]
bind = "0.0.0.0:20000"
local_app = "127.0.0.1:8080"

[intentions]
default_action = "{default_action}"
{rules}
"#,
        roots = ca.roots().display(),
        cert = cert.display(),
        key = key.display(),
    )
}

/// An intention rule allowing `source`.
pub fn allow(source: &str) -> String {
    format!("[[intentions.rules]]\nsource = \"{source}\"\naction = \"allow\"\n")
}

/// An intention rule denying `source`.
pub fn deny(source: &str) -> String {
    format!("[[intentions.rules]]\nsource = \"{source}\"\naction = \"deny\"\n")
}

/// The two namespaces of the topology, linked by a veth pair, with their
/// addresses and the client's default routes (IPv4 and IPv6) via the server;
/// no rules, no processes. Used by [`Mesh`], the Envoy interop tests and the
/// benchmarks.
pub fn namespaces() -> (Netns, Netns) {
    let client = Netns::new("vc").expect("client netns");
    let server = Netns::new("vs").expect("server netns");
    veth(
        &client,
        &[&format!("{CLIENT_IP}/24"), "fd77::1/64"],
        &server,
        &[
            &format!("{SERVER_IP}/24"),
            &format!("{PLAIN_IP}/24"),
            "fd77::2/64",
        ],
    )
    .expect("veth");
    client
        .ip(&["route", "add", "default", "via", SERVER_IP])
        .expect("v4 route");
    client
        .ip(&["-6", "route", "add", "default", "via", "fd77::2"])
        .expect("v6 route");
    (client, server)
}

/// The whole topology. Fields drop in order: sidecars first (so their logs
/// can still be printed), namespaces, then files.
pub struct Mesh {
    pub web: Sidecar,
    pub api: Sidecar,
    /// The api's local app (127.0.0.1:8080 in the server namespace).
    pub app: App,
    /// A non-mesh server on 10.77.0.4:9000 in the server namespace.
    pub plain: App,
    pub client: Netns,
    pub server: Netns,
    pub bin: PathBuf,
    pub ca: TestCa,
    pub files: TempDir,
}

impl Mesh {
    /// Builds everything with the default configurations: api allows web,
    /// default deny.
    pub fn new(bin: &Path) -> Mesh {
        Mesh::with(bin, "", &allow("web"))
    }

    /// `web_extra` is appended to the web config; `api_rules` are the api's
    /// intention rules (default deny).
    pub fn with(bin: &Path, web_extra: &str, api_rules: &str) -> Mesh {
        Mesh::with_api(bin, &api_endpoints(), web_extra, api_rules)
    }

    /// [`Mesh::with`], with the keys of web's `api` upstream entry
    /// ([`web_config_with`]).
    pub fn with_api(bin: &Path, api_keys: &str, web_extra: &str, api_rules: &str) -> Mesh {
        let ca = TestCa::new(TRUST_DOMAIN);
        let files = TempDir::new("veer-mesh-");
        let (client, server) = namespaces();
        // The dialed-directly instance that never answers: packets dropped.
        client
            .sh_ok(&format!("iptables -A OUTPUT -d {BLACKHOLE_IP} -j DROP"))
            .expect("blackhole");
        redirect(bin, &client, &[]);
        redirect(bin, &server, &["-exclude-inbound-port", "9000"]);
        let app = spawn_app(Some(&server), "127.0.0.1:8080".parse().unwrap(), "api");
        let plain = spawn_app(
            Some(&server),
            format!("{PLAIN_IP}:9000").parse().unwrap(),
            "plain",
        );
        let web_cfg = files.write("web.toml", &web_config_with(&ca, api_keys, web_extra));
        let api_cfg = files.write("api.toml", &api_config(&ca, "deny", api_rules));
        let web = Sidecar::start(bin, &client, web_cfg, files.join("web.log"), &[]);
        let api = Sidecar::start(bin, &server, api_cfg, files.join("api.log"), &[]);
        Mesh {
            bin: bin.to_path_buf(),
            ca,
            files,
            client,
            server,
            app,
            plain,
            web,
            api,
        }
    }

    /// Rewrites the api sidecar's configuration and waits for the reload.
    pub fn reconfigure_api(&self, default_action: &str, rules: &str) {
        let before = self
            .api
            .log_text()
            .matches("configuration reloaded")
            .count();
        self.files
            .write("api.toml", &api_config(&self.ca, default_action, rules));
        assert!(
            self.api
                .wait_log_count("configuration reloaded", before + 1, Duration::from_secs(5)),
            "api did not reload:\n{}",
            self.api.log_text()
        );
    }
}
