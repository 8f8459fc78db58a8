//! The systemd unit's command lines, run for real with the veer binary in a
//! network namespace: `ExecStartPre` installs the redirection rules,
//! `ExecStart` (as the veer user, UID 5995) tells systemd `READY=1` and
//! serves `/ready` and metrics, `ExecReload` reloads, SIGTERM stops with
//! `STOPPING=1` and exit 0, `ExecStopPost` removes the rules. (The static
//! checks of all deployment artifacts are in crates/veer-admin/tests/deploy.rs.)
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use veer_testsupport::ca::{TempDir, TestCa};
use veer_testsupport::netns::Netns;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The value of `Key=` in the unit (the first one).
fn key(unit: &str, k: &str) -> String {
    unit.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{k}=")))
        .unwrap_or_else(|| panic!("{k}= missing"))
        .to_string()
}

/// A unit command line with the real binary in place of the installed one.
fn command_line(unit: &str, k: &str) -> Vec<String> {
    let line = key(unit, k);
    let line = line.trim_start_matches(['+', '!', '-', '@']);
    let mut w: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert_eq!(w[0], "/usr/local/bin/veer");
    w[0] = bin().display().to_string();
    w
}

fn nat(ns: &Netns) -> String {
    ns.sh_ok("iptables-save -t nat 2>/dev/null; iptables-legacy-save -t nat 2>/dev/null || true")
        .unwrap()
}

#[test]
fn systemd_unit_commands_work_for_real() {
    if !veer_testsupport::require_root("systemd_unit_commands_work_for_real") {
        return;
    }
    let unit = read("deploy/systemd/veer.service");
    let ns = Netns::new("vd").unwrap();

    // ExecStartPre, in the namespace.
    let mut pre = command_line(&unit, "ExecStartPre");
    pre.extend(["-netns".into(), ns.path().display().to_string()]);
    let out = Command::new(&pre[0]).args(&pre[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{pre:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = nat(&ns);
    assert!(rules.contains("--dport 22 -j RETURN"), "{rules}");
    assert!(rules.contains("--to-ports 20000"), "{rules}");
    assert!(rules.contains("--uid-owner 5995 -j RETURN"), "{rules}");

    // ExecStart, as the veer user, with the shipped example configuration
    // (certificates made for the identity it declares).
    let cfg_text = read("deploy/systemd/veer.toml");
    let td = cfg_text
        .lines()
        .find_map(|l| l.strip_prefix("trust_domain = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let ca = TestCa::new(&td);
    let (cert, key_file) = ca.service("billing");
    let files = TempDir::new("veer-unit-");
    let cfg = files.write(
        "veer.toml",
        &cfg_text
            .replace("/etc/veer/tls/roots.pem", &ca.roots().display().to_string())
            .replace("/etc/veer/tls/leaf.pem", &cert.display().to_string())
            .replace(
                "/etc/veer/tls/leaf-key.pem",
                &key_file.display().to_string(),
            ),
    );
    let mut start = command_line(&unit, "ExecStart");
    let at = start.iter().position(|w| w == "--config").unwrap();
    assert_eq!(start[at + 1], "/etc/veer/veer.toml");
    start[at + 1] = cfg.display().to_string();
    // systemd's notification socket: abstract, in the namespace veer runs in.
    let name = veer_testsupport::unique("veer-unit-notify-");
    let sock = ns
        .run({
            let name = name.clone();
            move || {
                UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            }
        })
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let log = files.join("veer.log");
    let mut cmd = ns.command("setpriv");
    cmd.args(["--reuid=5995", "--regid=5995", "--clear-groups"])
        .args(&start)
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for env in unit.lines().filter_map(|l| l.strip_prefix("Environment=")) {
        let (k, v) = env.split_once('=').unwrap();
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", log_text()));
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    let ready = ns
        .sh_ok("curl -sS --fail http://127.0.0.1:19000/ready && curl -sS --fail http://127.0.0.1:20200/stats/prometheus | grep -c '^veer_'")
        .unwrap();
    assert!(ready.starts_with("LIVE\n"), "{ready}");

    // ExecReload: SIGHUP reloads.
    let pid = child.id().to_string();
    assert_eq!(key(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    Command::new("/bin/kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !log_text().contains("configuration reloaded (SIGHUP)") {
        assert!(Instant::now() < end, "no reload:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // systemctl stop: SIGTERM (KillSignal), STOPPING=1, exit 0 well within
    // TimeoutStopSec.
    assert_eq!(key(&unit, "KillSignal"), "SIGTERM");
    Command::new("/bin/kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1:\n{}", log_text());
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "veer did not exit:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", log_text());

    // ExecStopPost: the rules are gone.
    let mut post = command_line(&unit, "ExecStopPost");
    post.extend(["-netns".into(), ns.path().display().to_string()]);
    let out = Command::new(&post[0]).args(&post[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{post:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = nat(&ns);
    assert!(!rules.contains("CONSUL_PROXY"), "{rules}");
}

/// The Consul-mode unit (issue 15): its command lines are ones this veer
/// accepts (every flag known: `--help` after them exits 0), and it is the
/// same kind of unit as the TOML one (notify, unprivileged, SIGHUP reload).
#[test]
fn consul_mode_systemd_unit_command_lines_are_accepted() {
    let unit = read("deploy/systemd/veer-consul.service");
    assert_eq!(key(&unit, "Type"), "notify");
    assert_eq!(key(&unit, "User"), "veer");
    assert_eq!(key(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
    for k in ["ExecStartPre", "ExecStart"] {
        let argv = command_line(&unit, k);
        let out = Command::new(bin())
            .args(&argv[1..])
            .arg(if argv[1] == "redirect-traffic" {
                "-h"
            } else {
                "--help"
            })
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{k}: {argv:?}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let start = command_line(&unit, "ExecStart");
    assert!(start.contains(&"--sidecar-for".to_string()), "{start:?}");
}

/// The `consul connect envoy` unit (issue 11), its command lines run for
/// real in two steps, because Consul 1.8.7 (the only Consul here) predates
/// the Delta xDS and v3 bootstrap veer speaks:
///
/// 1. With the real Consul 1.8.7 agent: `ExecStartPre` reads the sidecar's
///    ports from its registration and installs the rules; `ExecStart` is
///    run as written (Consul's and veer's paths swapped for the ones here):
///    Consul makes the bootstrap FIFO and execs veer with Envoy's command
///    line, veer reads the FIFO and refuses that 1.8-era bootstrap (API v2
///    fields, State-of-the-World ADS) with an error naming it.
/// 2. The exact argv Consul passed in step 1, with the FIFO now carrying the
///    bootstrap `consul connect envoy` writes from Consul 1.10 on (v1.16.0
///    golden `token-file-env`: Delta ADS to the agent's gRPC port
///    127.0.0.1:8502 with the ACL token), served by veer's test Delta ADS
///    server on that port (as tests/xds.rs does): veer runs as the veer
///    user, tells systemd `READY=1`, serves `/ready`, stops on SIGTERM with
///    `STOPPING=1` and exit 0; `ExecStopPost` removes the rules.
#[test]
fn consul_connect_envoy_unit_runs_for_real() {
    use veer_testsupport::consul_xds::{self as cx, Certs, Params, SidecarShape};
    use veer_testsupport::xds::XdsServer;
    if !veer_testsupport::require_root("consul_connect_envoy_unit_runs_for_real") {
        return;
    }
    let unit = read("deploy/systemd/veer-connect-envoy.service");
    assert_eq!(key(&unit, "Type"), "notify");
    assert_eq!(key(&unit, "User"), "veer");
    let Some(consul) = veer_testsupport::tool("consul") else {
        veer_testsupport::skip(
            "consul_connect_envoy_unit_runs_for_real",
            "consul not installed (.ci/install-deps)",
        );
        return;
    };
    let Some(agent) = veer_testsupport::consul::Agent::start(&[], None) else {
        return;
    };
    agent.register("web", "127.0.0.1", 8080, 20000, None);
    let files = TempDir::new("veer-connect-envoy-");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let token = "c9a52720-bf6c-4aa6-b8bc-66881a5ade95";
    let token_file = files.write("web.token", token);
    // The unit's environment, pointed at this agent and token file.
    let mut envs: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    for (k, v) in envs.iter_mut() {
        match k.as_str() {
            "CONSUL_HTTP_ADDR" => *v = agent.addr.clone(),
            "CONSUL_HTTP_TOKEN_FILE" => *v = token_file.display().to_string(),
            _ => {}
        }
    }
    let grpc = envs
        .iter()
        .find(|(k, _)| k == "CONSUL_GRPC_ADDR")
        .map(|(_, v)| v.clone())
        .expect("CONSUL_GRPC_ADDR");
    assert_eq!(grpc, "127.0.0.1:8502", "the address the bootstrap names");

    // ExecStartPre: ports from the registration on the real agent.
    let ns = Netns::new("vce").unwrap();
    let mut pre = command_line(&unit, "ExecStartPre");
    pre.extend(["-netns".into(), ns.path().display().to_string()]);
    let out = Command::new(&pre[0])
        .args(&pre[1..])
        .envs(envs.iter().cloned())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{pre:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = nat(&ns);
    assert!(rules.contains("--to-ports 20000"), "{rules}");
    assert!(rules.contains("--dport 22 -j RETURN"), "{rules}");
    assert!(rules.contains("--uid-owner 5995 -j RETURN"), "{rules}");

    // ExecStart, step 1: the real `consul connect envoy`. The veer it execs
    // is behind a two-line wrapper that records the argv it was given.
    let line = key(&unit, "ExecStart");
    let mut start: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert_eq!(start[0], "/usr/bin/consul");
    assert_eq!(start[1..4], ["connect", "envoy", "-sidecar-for"]);
    start[0] = consul.display().to_string();
    let at = start.iter().position(|w| w == "-envoy-binary").unwrap();
    assert_eq!(start[at + 1], "/usr/local/bin/veer");
    let argv_file = files.join("argv");
    let wrapper = files.write(
        "veer-wrapper",
        &format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\nexec {} \"$@\"\n",
            argv_file.display(),
            bin().display()
        ),
    );
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    start[at + 1] = wrapper.display().to_string();
    let out = Command::new(&start[0])
        .args(&start[1..])
        .envs(envs.iter().cloned())
        .env("TMPDIR", files.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let argv: Vec<String> = std::fs::read_to_string(&argv_file)
        .unwrap_or_else(|_| panic!("consul did not exec veer: {err}"))
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(argv[0], "--config-path", "{argv:?}");
    let fifo = &argv[1];
    assert!(fifo.ends_with("-bootstrap.json"), "{argv:?}");
    let after_dashes = &start[start.iter().position(|w| w == "--").unwrap() + 1..];
    assert!(argv.ends_with(after_dashes), "{argv:?}");
    // In between, only what Consul adds itself: `--disable-hot-restart`
    // (left out when the user's args include a hot-restart option such as
    // --drain-time-s) and, in 1.8, `--max-obj-name-len 256`.
    let middle = &argv[2..argv.len() - after_dashes.len()];
    assert!(
        middle
            .iter()
            .all(|a| ["--disable-hot-restart", "--max-obj-name-len", "256"].contains(&a.as_str())),
        "{argv:?}"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{fifo}: ")) && err.contains("static_resources"),
        "veer must refuse the v2 bootstrap by name: {err}"
    );

    // Step 2: the same argv, the bootstrap Consul >= 1.10 writes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let l = ns.run(|| std::net::TcpListener::bind("127.0.0.1:8502").expect("bind 8502"));
    let ads = {
        let _g = rt.enter();
        XdsServer::tcp_listener(l).unwrap()
    };
    ads.require_token(Some(token));
    let ca = TestCa::new(veer_testsupport::ca::TRUST_DOMAIN);
    let mut p = Params::golden(Certs::issue(&ca.ca, "dc1", "web"));
    p.public = "0.0.0.0:20000".parse().unwrap();
    p.vips.clear();
    p.instances.clear();
    p.endpoints.clear();
    let x = cx::sidecar(
        &p,
        &SidecarShape {
            passthrough: true,
            ..Default::default()
        },
    );
    let items = x.resources();
    ads.set_all(
        items
            .iter()
            .map(|(t, n, a)| (t.as_str(), n.as_str(), a.clone()))
            .collect(),
    );
    let mut b: serde_json::Value = serde_json::from_str(&read(
        "crates/veer-xds/tests/fixtures/bootstrap/consul-v1.16.0/token-file-env.json",
    ))
    .unwrap();
    b["node"]["id"] = "web-sidecar-proxy".into();
    b["node"]["cluster"] = "web".into();
    let boot = b.to_string();
    let fifo2 = files.join("envoy-0123abcd-bootstrap.json");
    let c = std::ffi::CString::new(fifo2.display().to_string()).unwrap();
    // SAFETY: mkfifo and chown read a NUL-terminated path we own.
    unsafe {
        assert_eq!(libc::mkfifo(c.as_ptr(), 0o600), 0);
        assert_eq!(libc::chown(c.as_ptr(), 5995, 5995), 0);
    }
    let writer = {
        let f = fifo2.clone();
        std::thread::spawn(move || std::fs::write(&f, boot))
    };
    let mut argv2 = argv.clone();
    argv2[1] = fifo2.display().to_string();
    let name = veer_testsupport::unique("veer-ce-notify-");
    let sock = ns
        .run({
            let name = name.clone();
            move || {
                UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            }
        })
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let log = files.join("veer.log");
    let mut child = ns
        .command("setpriv")
        .args(["--reuid=5995", "--regid=5995", "--clear-groups"])
        .arg(bin())
        .args(&argv2)
        .envs(envs.iter().cloned())
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    writer.join().unwrap().expect("veer read the FIFO");
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", log_text()));
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    let ready = ns
        .sh_ok("curl -sS --fail http://127.0.0.1:19000/ready")
        .unwrap();
    assert!(ready.starts_with("LIVE"), "{ready}");
    assert!(ads.requests().iter().any(|r| r.is_ack()));

    assert_eq!(key(&unit, "KillSignal"), "SIGTERM");
    Command::new("/bin/kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1:\n{}", log_text());
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "veer did not exit:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}\n{}", log_text());

    let mut post = command_line(&unit, "ExecStopPost");
    post.extend(["-netns".into(), ns.path().display().to_string()]);
    let out = Command::new(&post[0]).args(&post[1..]).output().unwrap();
    assert!(out.status.success());
    assert!(!nat(&ns).contains("CONSUL_PROXY"));

    // systemd's own checker (paths swapped for executables that exist).
    if let Some(analyze) = veer_testsupport::tool("systemd-analyze") {
        let u = files.join("veer-connect-envoy.service");
        std::fs::write(
            &u,
            unit.replace("/usr/local/bin/veer", &bin().display().to_string())
                .replace("/usr/bin/consul", &consul.display().to_string()),
        )
        .unwrap();
        let out = Command::new(analyze)
            .arg("verify")
            .arg(&u)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success()
                && !err
                    .lines()
                    .any(|l| l.contains("veer-connect-envoy.service")),
            "systemd-analyze verify:\n{err}"
        );
    }
    drop(agent);
}
