//! gRPC end to end through veer's L7 path, with a real gRPC client and
//! server (grpcio, `tests/grpc/peer.py`): unary with trailers, a
//! bidirectional stream of 200 messages, and an error status, from the
//! client namespace through the web sidecar (upstream `protocol = "grpc"`)
//! and the api sidecar (`[inbound] protocol = "grpc"`, HTTP/2 to the app),
//! then with Envoy as the api sidecar (configured as Consul configures a
//! `grpc` service).
//!
//! Skipped (loudly) without root or without grpcio (`.ci/install-deps`).
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};
use veer_testsupport::envoy::{Bootstrap, Envoy};
use veer_testsupport::mesh::{self, Sidecar, API_VIP};
use veer_testsupport::netns::Netns;

fn veer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

fn peer() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/grpc/peer.py")
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The gRPC server on 127.0.0.1:8080 in `ns` (h2c).
fn server(py: &PathBuf, ns: &Netns) -> Server {
    let mut child = ns
        .command(py)
        .arg(peer())
        .args(["serve", "127.0.0.1:8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("grpc server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening");
    Server(child)
}

/// Runs the client against the api's virtual IP; its report.
fn call(py: &PathBuf, ns: &Netns) -> String {
    let out = ns
        .command(py)
        .arg(peer())
        .args(["call", &format!("{API_VIP}:80"), "200"])
        .output()
        .expect("grpc client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "gRPC client failed:\n{text}");
    text
}

fn setup(test: &str) -> Option<(PathBuf, TestCa, TempDir, Netns, Netns)> {
    if !veer_testsupport::require_root(test) {
        return None;
    }
    let Some(py) = veer_testsupport::tool("grpc-python") else {
        veer_testsupport::skip(test, "no grpcio; run .ci/install-deps");
        return None;
    };
    let (client, server) = mesh::namespaces();
    mesh::redirect(&veer(), &client, &[]);
    mesh::redirect(&veer(), &server, &[]);
    Some((
        py,
        TestCa::new(TRUST_DOMAIN),
        TempDir::new("veer-grpc-"),
        client,
        server,
    ))
}

fn web(ca: &TestCa, files: &TempDir, ns: &Netns) -> Sidecar {
    let keys = format!("protocol = \"grpc\"\n{}", mesh::api_endpoints());
    let cfg = files.write("web.toml", &mesh::web_config_with(ca, &keys, ""));
    Sidecar::start(&veer(), ns, cfg, files.join("web.log"), &[])
}

#[test]
fn grpc_through_veer_sidecars() {
    let Some((py, ca, files, client, srv)) = setup("grpc_through_veer_sidecars") else {
        return;
    };
    let _app = server(&py, &srv);
    let api_cfg = mesh::api_config(&ca, "deny", &mesh::allow("web")).replace(
        "local_app = \"127.0.0.1:8080\"\n",
        "local_app = \"127.0.0.1:8080\"\nprotocol = \"grpc\"\n",
    );
    let cfg = files.write("api.toml", &api_cfg);
    let _api = Sidecar::start(&veer(), &srv, cfg, files.join("api.log"), &[]);
    let _web = web(&ca, &files, &client);
    let report = call(&py, &client);
    assert!(report.contains("stream ok: 200 messages"), "{report}");
}

#[test]
fn grpc_veer_outbound_to_envoy_inbound() {
    let Some((py, ca, files, client, srv)) = setup("grpc_veer_outbound_to_envoy_inbound") else {
        return;
    };
    let Some(bin) = veer_testsupport::tool("envoy") else {
        veer_testsupport::skip(
            "grpc_veer_outbound_to_envoy_inbound",
            "no envoy binary; run .ci/install-deps",
        );
        return;
    };
    let _app = server(&py, &srv);
    let boot = Bootstrap::sidecar(&ca, "api").allow("web").protocol("grpc");
    let api = Envoy::start(&bin, &srv, &boot, files.path(), 1);
    let _web = web(&ca, &files, &client);
    let report = call(&py, &client);
    assert!(report.contains("status ok"), "{report}");
    assert_eq!(api.stat("http.public_listener.rbac.allowed"), Some(3));
}
