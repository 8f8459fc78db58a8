//! The real `veer` binary started as `envoy` (a symlink in a temp dir), the
//! way consul-dataplane and `consul connect envoy` start Envoy: `--version`,
//! `--mode validate` on every fixture bootstrap, an unknown flag, a FIFO
//! config path, and consul-dataplane's exact argv shape serving the
//! bootstrap's admin and ready listener (503 until a configuration comes).
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use veer_testsupport::ca::TempDir;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/veer-xds/tests/fixtures/bootstrap")
}

/// A temp dir with `envoy` -> the veer binary.
fn envoy(dir: &TempDir) -> PathBuf {
    let link = dir.path().join("envoy");
    if !link.exists() {
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_veer"), &link).unwrap();
    }
    link
}

fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("VEER_ENVOY_VERSION")
        .env_remove("VEER_LOG")
        .output()
        .unwrap()
}

#[test]
fn version_is_a_line_consul_accepts() {
    let d = TempDir::new("veer-envoy-version");
    let out = run(&envoy(&d), &["--version"]);
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    // Consul takes the first \d+.\d+.\d+: the Envoy version, 1.26 (in
    // Consul 1.16's 1.23..=1.26 window).
    let v = line.split('/').nth(1).unwrap();
    assert_eq!(v, veer_xds::envoy_cli::DEFAULT_ENVOY_VERSION, "{line}");
    assert!(line.starts_with("veer  version: "), "{line}");
    let out = Command::new(envoy(&d))
        .arg("--version")
        .env("VEER_ENVOY_VERSION", "1.31.2")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("/1.31.2/"));
}

const REFUSED: &[&str] = &[
    "custom-bootstrap.json",
    "extra_-multiple.json",
    "extra_-single.json",
    "prometheus-metrics-tls-ca-file.json",
    "prometheus-metrics-tls-ca-path.json",
];

#[test]
fn validate_every_fixture() {
    let d = TempDir::new("veer-envoy-validate");
    let bin = envoy(&d);
    let mut n = 0;
    for sub in [
        "dataplane-28a963a",
        "dataplane-v1.1.0",
        "dataplane-releases",
        "consul-v1.16.0",
    ] {
        for e in std::fs::read_dir(fixtures().join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            // `consul connect envoy`'s shape.
            let out = run(
                &bin,
                &[
                    "--mode",
                    "validate",
                    "--config-path",
                    p.to_str().unwrap(),
                    "--disable-hot-restart",
                ],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            if REFUSED.contains(&name.as_str()) {
                assert_eq!(out.status.code(), Some(1), "{sub}/{name} accepted");
                assert!(stderr.contains(&name), "{stderr}");
            } else {
                assert!(out.status.success(), "{sub}/{name}: {stderr}");
                assert!(
                    String::from_utf8_lossy(&out.stdout).contains(": ok ("),
                    "{sub}/{name}"
                );
            }
            n += 1;
        }
    }
    assert!(n >= 55, "{n}");
}

#[test]
fn unknown_flag_and_bad_bootstrap_are_clear_errors() {
    let d = TempDir::new("veer-envoy-errors");
    let bin = envoy(&d);
    let out = run(&bin, &["--config-yaml", "{}", "--frobnicate", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("unknown flag --frobnicate"), "{e}");

    let mut doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("dataplane-28a963a/basic.json")).unwrap(),
    )
    .unwrap();
    doc["dynamic_resources"]["ads_config"]["api_type"] = "GRPC".into();
    let out = run(
        &bin,
        &["--mode", "validate", "--config-yaml", &doc.to_string()],
    );
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("dynamic_resources.ads_config.api_type") && e.contains("DELTA_GRPC"),
        "{e}"
    );
    // `veer envoy …` is the same as `envoy …`.
    let out = run(
        Path::new(env!("CARGO_BIN_EXE_veer")),
        &["envoy", "--mode", "validate", "--config-yaml", "{"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}

/// `consul connect envoy` passes a FIFO that its helper writes once.
#[test]
fn config_path_may_be_a_fifo() {
    let d = TempDir::new("veer-envoy-fifo");
    let fifo = d.path().join("envoy-0123abcd-bootstrap.json");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let body = std::fs::read(fixtures().join("consul-v1.16.0/token-arg.json")).unwrap();
    let f2 = fifo.clone();
    let writer = std::thread::spawn(move || {
        // Blocks until veer opens the FIFO for reading, like pipe-bootstrap.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f2)
            .unwrap()
            .write_all(&body)
            .unwrap();
    });
    let out = run(
        &envoy(&d),
        &[
            "--mode",
            "validate",
            "--config-path",
            fifo.to_str().unwrap(),
            "--disable-hot-restart",
        ],
    );
    writer.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(port: u16, path: &str) -> Option<(u16, String)> {
    call(port, "GET", path)
}

fn call(port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let a: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let status = r.split(' ').nth(1)?.parse().ok()?;
    let body = r.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// consul-dataplane's ready-listener bootstrap with free ports.
fn dataplane_bootstrap(admin: u16, ready: u16) -> String {
    dataplane_bootstrap_of("dataplane-28a963a", admin, ready)
}

/// The ready-listener golden of one consul-dataplane version, free ports.
fn dataplane_bootstrap_of(version_dir: &str, admin: u16, ready: u16) -> String {
    let mut doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join(version_dir).join("ready-listener.json")).unwrap(),
    )
    .unwrap();
    doc["admin"]["address"]["socket_address"]["port_value"] = admin.into();
    let self_admin = &mut doc["static_resources"]["clusters"][1];
    assert_eq!(self_admin["name"], "self_admin");
    self_admin["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
        ["socket_address"]["port_value"] = admin.into();
    doc["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] =
        ready.into();
    doc.to_string()
}

/// The argv of consul-dataplane (HEAD `buildCommand` + `envoyProxyConfig`).
fn dataplane_argv(bootstrap: &str) -> Vec<String> {
    [
        "--config-yaml",
        bootstrap,
        "--log-format",
        "%Y-%m-%dT%T.%eZ%z [%l] envoy.%n(%t) %v",
        "--log-level",
        "info",
        "--disable-hot-restart",
        "--drain-strategy immediate",
        "--concurrency 2",
        "--drain-time-s 30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn serves_admin_and_static_listeners_as_consul_dataplane_starts_it() {
    let d = TempDir::new("veer-envoy-serve");
    let (admin, ready) = (free_port(), free_port());
    let child = Command::new(envoy(&d))
        .args(dataplane_argv(&dataplane_bootstrap(admin, ready)))
        .env_remove("VEER_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let end = Instant::now() + Duration::from_secs(20);
    let r = loop {
        if let Some(r) = get(ready, "/ready") {
            break r;
        }
        assert!(Instant::now() < end, "ready listener never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    // No configuration yet: the ready route forwards the admin's 503.
    assert_eq!(r.0, 503, "{r:?}");
    assert!(r.1.contains("PRE_INITIALIZING"), "{r:?}");
    assert_eq!(get(admin, "/ready").unwrap().0, 503);
    // Anything else on the ready listener: the direct 404.
    assert_eq!(get(ready, "/stats").unwrap().0, 404);
    // SIGTERM before the first configuration: a clean, quick exit.
    let pid = child.0.id() as i32;
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("waiting for the first configuration"), "{err}");
}

#[test]
fn a_taken_admin_address_is_an_error() {
    let d = TempDir::new("veer-envoy-taken");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().port();
    let out = Command::new(envoy(&d))
        .args(dataplane_argv(&dataplane_bootstrap(admin, free_port())))
        .env_remove("VEER_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("admin") && e.contains(&admin.to_string()), "{e}");
}

/// consul-dataplane ends Envoy with `POST /quitquitquit`, also when no
/// configuration ever came.
#[test]
fn quitquitquit_before_the_first_configuration_exits() {
    let d = TempDir::new("veer-envoy-quit");
    let (admin, ready) = (free_port(), free_port());
    let child = Command::new(envoy(&d))
        .args(dataplane_argv(&dataplane_bootstrap(admin, ready)))
        .env_remove("VEER_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Kill(child);
    let end = Instant::now() + Duration::from_secs(20);
    while get(admin, "/ready").is_none() {
        assert!(Instant::now() < end, "admin never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(call(admin, "POST", "/quitquitquit").unwrap().0, 200);
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "no exit after /quitquitquit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// The log patterns consul-dataplane passes (`pkg/envoy/proxy.go`, the same
/// from v1.0.0 to HEAD).
const DP_PLAIN: &str = "%Y-%m-%dT%T.%eZ%z [%l] envoy.%n(%t) %v";
const DP_JSON: &str = r#"{"@timestamp":"%Y-%m-%dT%T.%fZ%z","@module":"envoy.%n","@level":"%l","@message":"%j","thread":%t}"#;

/// How each consul-dataplane release line builds Envoy's argv
/// (`pkg/envoy/proxy.go` buildCommand, `pkg/consuldp/consul_dataplane.go`
/// envoyProxyConfig; read at tags v1.0.0, v1.1.0, v1.2.0, v1.3.0 … v2.0.1
/// and HEAD 28a963a), with consul-k8s' `-- --base-id 1` for a multi-port
/// pod's second service as the extra arguments.
#[derive(Clone, Copy, Debug)]
enum DpEra {
    /// v1.0.0–v1.2.x (before 45453c1): the bootstrap in a FIFO made in
    /// TMPDIR, `--config-path`; only `--concurrency` appended.
    Fifo,
    /// v1.3.0 onwards: `--config-yaml <json>`; `--concurrency`,
    /// `--drain-time-s`, `--drain-strategy` appended (Go map order).
    ConfigYaml,
    /// HEAD: as ConfigYaml, and a `--log-level` among the extra arguments
    /// is taken out of them and replaces the logger's level.
    ConfigYamlLogLevelFromExtra,
}

#[test]
fn every_consul_dataplane_release_line_starts_veer() {
    for (era, version_dir, json_logs) in [
        (DpEra::Fifo, "dataplane-v1.1.0", true),
        (DpEra::ConfigYaml, "dataplane-v1.1.0", false),
        (DpEra::ConfigYaml, "dataplane-28a963a", true),
        (
            DpEra::ConfigYamlLogLevelFromExtra,
            "dataplane-28a963a",
            false,
        ),
    ] {
        let d = TempDir::new("veer-envoy-era");
        let (admin, ready) = (free_port(), free_port());
        let boot = dataplane_bootstrap_of(version_dir, admin, ready);
        let log_format = if json_logs { DP_JSON } else { DP_PLAIN };
        let mut extra = vec!["--base-id".to_string(), "1".to_string()];
        let level = match era {
            DpEra::ConfigYamlLogLevelFromExtra => "debug",
            _ => "info",
        };
        let mut argv: Vec<String> = Vec::new();
        let mut writer = None;
        match era {
            DpEra::Fifo => {
                let fifo = d.path().join("envoy-17e5a2b4c3d2e1f0-bootstrap.json");
                assert!(Command::new("mkfifo")
                    .arg(&fifo)
                    .status()
                    .unwrap()
                    .success());
                let f = fifo.clone();
                writer = Some(std::thread::spawn(move || std::fs::write(&f, boot)));
                argv.extend(["--config-path".into(), fifo.display().to_string()]);
                extra.push("--concurrency 2".into());
            }
            _ => {
                argv.extend(["--config-yaml".into(), boot]);
                extra.extend([
                    "--drain-strategy immediate".into(),
                    "--concurrency 2".into(),
                    "--drain-time-s 30".into(),
                ]);
            }
        }
        argv.extend([
            "--log-format".into(),
            log_format.into(),
            "--log-level".into(),
            level.into(),
            "--disable-hot-restart".into(),
        ]);
        argv.extend(extra);
        let child = Command::new(envoy(&d))
            .args(&argv)
            .env_remove("VEER_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = Kill(child);
        let end = Instant::now() + Duration::from_secs(20);
        let r = loop {
            if let Some(r) = get(ready, "/ready") {
                break r;
            }
            assert!(
                Instant::now() < end,
                "{era:?}: ready listener never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(r.0, 503, "{era:?}: {r:?}");
        assert!(r.1.contains("PRE_INITIALIZING"), "{era:?}: {r:?}");
        if let Some(w) = writer {
            w.join().unwrap().expect("veer read the FIFO");
        }
        let st = Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let end = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "{era:?}: no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{era:?}: {status:?}\n{err}");
        // The log format followed the pattern's kind, and no flag was
        // refused or repeated.
        if json_logs {
            assert!(
                err.lines().any(|l| l.starts_with('{')),
                "{era:?}: JSON logs expected:\n{err}"
            );
        } else {
            assert!(!err.lines().any(|l| l.starts_with('{')), "{era:?}:\n{err}");
        }
        assert!(!err.contains("more than once"), "{era:?}:\n{err}");
    }
}
