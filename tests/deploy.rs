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
