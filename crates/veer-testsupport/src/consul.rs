//! A real Consul agent (`consul agent -dev`, 1.8.7 from Debian bullseye as
//! `.ci/install-deps` installs it) for end-to-end tests, reachable by
//! sidecars in any network namespace through a Unix socket (the filesystem
//! is shared across namespaces). Killed on drop.
use crate::ca::TempDir;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Agent {
    child: Option<Child>,
    pub dir: TempDir,
    /// `unix:///…/consul.sock`, for `CONSUL_HTTP_ADDR`.
    pub addr: String,
    sock: PathBuf,
    args: Vec<String>,
    bin: PathBuf,
    token: Option<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Agent {
    /// Starts a dev agent with extra HCL (e.g. ACLs); `None` when the
    /// consul binary is not installed (the caller prints a loud SKIP).
    pub fn start(hcl: &[&str], token: Option<&str>) -> Option<Agent> {
        let bin = crate::tool("consul")?;
        let dir = TempDir::new("veer-consul-");
        let sock = dir.join("consul.sock");
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
        for flag in [
            "-http-port",
            "-serf-lan-port",
            "-serf-wan-port",
            "-server-port",
        ] {
            args.push(flag.into());
            args.push(free_port().to_string());
        }
        args.push("-hcl".into());
        args.push(format!(
            "addresses {{ http = \"unix://{}\" }}",
            sock.display()
        ));
        args.push("-hcl".into());
        args.push("unix_sockets { mode = \"0777\" }".into());
        for h in hcl {
            args.push("-hcl".into());
            args.push(h.to_string());
        }
        let mut a = Agent {
            child: None,
            addr: format!("unix://{}", sock.display()),
            sock,
            dir,
            args,
            bin,
            token: token.map(str::to_string),
        };
        a.run();
        Some(a)
    }

    /// A dev agent as datacenter `dc` (node `<dc>-node`, primary `dc1`).
    /// With `primary`, a secondary datacenter WAN-joined to it: returns
    /// once its CA is an intermediate signed by the primary's root (as in
    /// the reference `chain-samples/reproduce.sh`).
    pub fn start_dc(dc: &str, primary: Option<&Agent>) -> Option<Agent> {
        let mut hcl = vec![
            format!("datacenter = \"{dc}\""),
            format!("node_name = \"{dc}-node\""),
            "primary_datacenter = \"dc1\"".to_string(),
        ];
        if let Some(p) = primary {
            hcl.push(format!(
                "retry_join_wan = [\"127.0.0.1:{}\"]",
                p.flag("-serf-wan-port")
            ));
        }
        let hcl: Vec<&str> = hcl.iter().map(String::as_str).collect();
        let a = Agent::start(&hcl, None)?;
        if primary.is_some() {
            let end = Instant::now() + Duration::from_secs(30);
            loop {
                let r: String = a
                    .try_call("GET", "/v1/agent/connect/ca/roots", None)
                    .unwrap_or_default()
                    .split_whitespace()
                    .collect();
                if r.contains("\"IntermediateCerts\":[\"") {
                    break;
                }
                assert!(
                    Instant::now() < end,
                    "{dc} did not get its intermediate CA: {r}\n{}",
                    std::fs::read_to_string(a.dir.join("agent.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Some(a)
    }

    /// The value of one of its command-line flags.
    fn flag(&self, name: &str) -> &str {
        let i = self.args.iter().position(|a| a == name).expect("flag");
        &self.args[i + 1]
    }

    /// (Re)starts the process and waits until it has a leader and a CA.
    pub fn run(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::File::create(self.dir.join("agent.log")).unwrap();
        self.child = Some(
            Command::new(&self.bin)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start consul"),
        );
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(r) = self.try_call("GET", "/v1/agent/connect/ca/roots", None) {
                if r.contains("RootCert") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "consul agent did not start:\n{}",
            std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
        );
    }

    /// Stops the process (the agent's state is in memory and is lost).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn try_call(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--fail-with-body",
            "--max-time",
            "10",
            "--unix-socket",
        ])
        .arg(&self.sock)
        .args(["-X", method]);
        if let Some(t) = &self.token {
            cmd.args(["-H", &format!("X-Consul-Token: {t}")]);
        }
        if let Some(b) = body {
            cmd.args(["--data-binary", b]);
        }
        let out = cmd
            .arg(format!("http://consul{path}"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{method} {path}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Calls the HTTP API and panics on failure.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> String {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("consul API: {e}"))
    }

    /// Registers a service with a sidecar proxy on `proxy_port` (with a
    /// passing TTL check instead of Consul's default TCP check, which the
    /// agent could not run into the test's namespaces) and,
    /// optionally, a virtual address (consul-k8s's `TaggedAddresses.virtual`).
    pub fn register(
        &self,
        name: &str,
        address: &str,
        app_port: u16,
        proxy_port: u16,
        vip: Option<&str>,
    ) {
        let tagged = vip
            .map(|v| {
                format!(r#","TaggedAddresses":{{"virtual":{{"Address":"{v}","Port":{app_port}}}}}"#)
            })
            .unwrap_or_default();
        let body = format!(
            r#"{{"Name":"{name}","ID":"{name}","Address":"{address}","Port":{app_port}{tagged},"Connect":{{"SidecarService":{{"Port":{proxy_port},"Checks":[{{"Name":"up","TTL":"24h","Status":"passing"}}],"Proxy":{{"LocalServiceAddress":"127.0.0.1","LocalServicePort":{app_port}}}}}}}}}"#
        );
        self.call("PUT", "/v1/agent/service/register", Some(&body));
    }

    /// Creates an intention; returns its ID.
    pub fn intention(&self, source: &str, destination: &str, action: &str) -> String {
        let body = format!(
            r#"{{"SourceName":"{source}","DestinationName":"{destination}","Action":"{action}"}}"#
        );
        let r = self.call("POST", "/v1/connect/intentions", Some(&body));
        r.split('"').nth(3).unwrap_or_default().to_string()
    }

    /// Deletes an intention by ID.
    pub fn delete_intention(&self, id: &str) {
        self.call("DELETE", &format!("/v1/connect/intentions/{id}"), None);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
