//! Issue 15, "the first hour", with the real binary on loopback (no root
//! needed): readiness that tells the truth (a listener that cannot bind
//! fails the start or refuses the reload; a taken admin address is an
//! error; an expired leaf says so), `/config_dump` shows what is in force,
//! TCP probes are counted quietly, and the command line's small promises.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use veer_ca::LeafSpec;
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Ports {
    inbound: u16,
    app: u16,
    outbound: u16,
    admin: u16,
}

impl Ports {
    fn new() -> Ports {
        Ports {
            inbound: free_port(),
            app: free_port(),
            outbound: free_port(),
            admin: free_port(),
        }
    }
}

/// A sidecar config for `api` on loopback; `extra` is appended.
fn config(ca: &TestCa, cert: &(PathBuf, PathBuf), p: &Ports, inbound: u16, extra: &str) -> String {
    format!(
        r#"
[service]
name = "api"
datacenter = "dc1"
trust_domain = "{TRUST_DOMAIN}"

[tls]
ca_file = "{}"
cert_file = "{}"
key_file = "{}"

[inbound]
bind = "127.0.0.1:{inbound}"
local_app = "127.0.0.1:{}"

[outbound]
bind = "127.0.0.1:{}"
bind_ipv6 = ""
{extra}"#,
        ca.roots().display(),
        cert.0.display(),
        cert.1.display(),
        p.app,
        p.outbound
    )
}

struct Veer {
    child: Child,
    log: PathBuf,
    admin: u16,
}

impl Veer {
    fn start(config: &Path, log: PathBuf, admin: u16) -> Veer {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(config)
            .args(["--admin-bind", &format!("127.0.0.1:{admin}")])
            .args(["--shutdown-grace-period", "2s"])
            .env("VEER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Veer { child, log, admin }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path).unwrap_or((0, String::new()))
    }
    fn wait_ready(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || self.get("/ready").0 == 200),
            "not ready: {}",
            self.log()
        );
    }
    fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
    fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }
}

impl Drop for Veer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    Ok((code, body.unwrap_or_default()))
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    f()
}

/// The value of a sample, exactly as rendered (`name{labels}`).
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

const LEDGER: &str = "\n[[upstreams]]\nname = \"ledger\"\nlocal_bind = \"127.0.0.1:{PORT}\"\nendpoints = [\"127.0.0.1:9\"]\n";

#[test]
fn a_local_bind_that_is_taken_fails_the_start_and_refuses_the_reload() {
    let ca = TestCa::new(TRUST_DOMAIN);
    let cert = ca.service("api");
    let dir = TempDir::new("veer-i15-");
    let p = Ports::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let ledger = LEDGER.replace("{PORT}", &port.to_string());

    // At start: exits non-zero naming the key and line, the upstream and
    // the address; never "ready".
    let text = config(&ca, &cert, &p, p.inbound, &ledger);
    let cfg = dir.write("veer.toml", &text);
    let line = line_of(&text, &format!("127.0.0.1:{port}\""));
    let mut v = Veer::start(&cfg, dir.join("start.log"), p.admin);
    let st = v
        .wait_exit(Duration::from_secs(10))
        .expect("veer should exit");
    assert!(!st.success());
    let log = v.log();
    assert!(
        log.contains(&format!(
            "{}:{line}: upstreams[0].local_bind: upstream \"ledger\" local_bind 127.0.0.1:{port}: ",
            cfg.display()
        )),
        "{log}"
    );
    assert!(!log.contains("veer ready"), "{log}");
    drop(v);

    // Running without it, a reload that adds it is refused; the old config stays.
    std::fs::write(&cfg, config(&ca, &cert, &p, p.inbound, "")).unwrap();
    let v = Veer::start(&cfg, dir.join("run.log"), p.admin);
    v.wait_ready();
    dir.write("veer.toml", &config(&ca, &cert, &p, p.inbound, &ledger));
    assert!(
        wait_until(Duration::from_secs(5), || v.log().contains("rejected")),
        "{}",
        v.log()
    );
    let log = v.log();
    assert!(
        log.contains(&format!(
            "{}:{line}: upstreams[0].local_bind: upstream \"ledger\" local_bind: cannot listen on 127.0.0.1:{port}",
            cfg.display()
        )),
        "{log}"
    );
    let (code, dump) = v.get("/config_dump");
    assert_eq!(code, 200);
    assert!(!dump.contains("ledger"), "{dump}");
    assert_eq!(v.get("/ready").0, 200);
    let m = v.get("/stats/prometheus").1;
    assert_eq!(sample(&m, "veer_snapshot_errors_total"), 1, "{m}");

    // Once the port is free, SIGHUP applies it and the listener is bound.
    drop(taken);
    v.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || v
            .get("/config_dump")
            .1
            .contains("ledger")),
        "{}",
        v.log()
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());

    // A new inbound address waits for a restart and is shown as such.
    dir.write("veer.toml", &config(&ca, &cert, &p, free_port(), &ledger));
    assert!(
        wait_until(Duration::from_secs(5), || v
            .get("/config_dump")
            .1
            .contains("inbound listener address")),
        "{}",
        v.log()
    );
    let dump: serde_json::Value = serde_json::from_str(&v.get("/config_dump").1).unwrap();
    assert_eq!(
        dump["listen"]["inbound"],
        format!("127.0.0.1:{}", p.inbound),
        "{dump}"
    );
    assert_eq!(dump["unapplied"][0]["kind"], "needs_restart", "{dump}");
    let m = v.get("/stats/prometheus").1;
    assert_eq!(
        sample(&m, "veer_unapplied_settings_total{kind=\"needs_restart\"}"),
        1,
        "{m}"
    );
    assert_eq!(v.log().matches("setting not applied").count(), 1);
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

/// Every listener the file configures that cannot bind at start is named by
/// its key and line (and the admin address by its flag, when given there).
#[test]
fn a_taken_listener_at_start_is_named_by_its_key_and_line() {
    let ca = TestCa::new(TRUST_DOMAIN);
    let cert = ca.service("api");
    let dir = TempDir::new("veer-i15-");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let t = taken.local_addr().unwrap().port();
    let p = Ports::new();
    // (config, admin port, where the taken address is named)
    let cases: Vec<(String, u16, &str)> = vec![
        (
            config(&ca, &cert, &p, p.inbound, &LEDGER.replace("{PORT}", &t.to_string())),
            p.admin,
            "upstreams[0].local_bind",
        ),
        (
            config(&ca, &cert, &p, p.inbound, &format!(
                "\n[[expose]]\nlistener = \"127.0.0.1:{t}\"\npath = \"/healthz\"\nlocal_path_port = {}\n",
                p.app
            )),
            p.admin,
            "expose[0].listener",
        ),
        (
            config(&ca, &cert, &p, p.inbound, &format!("\n[admin]\nprometheus_bind = \"127.0.0.1:{t}\"\n")),
            p.admin,
            "admin.prometheus_bind",
        ),
        (config(&ca, &cert, &p, t, ""), p.admin, "inbound.bind"),
        (config(&ca, &cert, &p, p.inbound, ""), t, "--admin-bind"),
    ];
    for (i, (text, admin, key)) in cases.into_iter().enumerate() {
        let cfg = dir.write(&format!("veer{i}.toml"), &text);
        let mut v = Veer::start(&cfg, dir.join(&format!("{i}.log")), admin);
        let st = v
            .wait_exit(Duration::from_secs(10))
            .expect("veer should exit");
        assert!(!st.success(), "{key}");
        let log = v.log();
        let want = if key.starts_with("--") {
            format!("veer: {key}: admin listener 127.0.0.1:{t}: ")
        } else {
            let line = line_of(&text, &format!("127.0.0.1:{t}\""));
            format!("veer: {}:{line}: {key}: ", cfg.display())
        };
        assert!(log.contains(&want), "want {want:?} in:\n{log}");
        assert!(log.contains(&format!("127.0.0.1:{t}: ")), "{log}");
        assert!(!log.contains("veer ready"), "{log}");
    }
}

#[test]
fn a_taken_admin_address_fails_the_start_and_await_ready_checks_the_service() {
    let ca = TestCa::new(TRUST_DOMAIN);
    let cert = ca.service("api");
    let dir = TempDir::new("veer-i15-");
    let p = Ports::new();
    let cfg = dir.write("veer.toml", &config(&ca, &cert, &p, p.inbound, ""));
    let first = Veer::start(&cfg, dir.join("first.log"), p.admin);
    first.wait_ready();

    // A second sidecar on the same admin address (other listeners free).
    let p2 = Ports::new();
    let cfg2 = dir.write("second.toml", &config(&ca, &cert, &p2, p2.inbound, ""));
    let mut second = Veer::start(&cfg2, dir.join("second.log"), p.admin);
    let st = second
        .wait_exit(Duration::from_secs(10))
        .expect("should exit");
    assert!(!st.success());
    let log = second.log();
    assert!(log.contains(&format!("127.0.0.1:{}", p.admin)), "{log}");
    assert!(log.contains("--admin-bind"), "{log}");

    // await-ready: a name for the host works; --service tells sidecars apart.
    let await_ready = |svc: &str| {
        Command::new(bin())
            .args(["await-ready", "--admin", &format!("localhost:{}", p.admin)])
            .args(["--timeout", "500ms", "--service", svc])
            .output()
            .unwrap()
    };
    let ok = await_ready("api");
    assert!(ok.status.success(), "{ok:?}");
    let other = await_ready("web");
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("not of \"web\""), "{err}");
}

#[test]
fn probes_are_quiet_and_exit_is_prompt() {
    let ca = TestCa::new(TRUST_DOMAIN);
    let cert = ca.service("api");
    let dir = TempDir::new("veer-i15-");
    let p = Ports::new();
    let cfg = dir.write("veer.toml", &config(&ca, &cert, &p, p.inbound, ""));
    let mut v = Veer::start(&cfg, dir.join("run.log"), p.admin);
    v.wait_ready();
    // Consul's "Connect Sidecar Listening": connect, close, no byte.
    for _ in 0..3 {
        drop(TcpStream::connect(("127.0.0.1", p.inbound)).unwrap());
    }
    // And one that does send a (non-TLS) byte, which stays a failure.
    let mut s = TcpStream::connect(("127.0.0.1", p.inbound)).unwrap();
    s.write_all(b"x").unwrap();
    drop(s);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let m = v.get("/stats/prometheus").1;
            sample(&m, "veer_inbound_probes_total") == 3
                && m.contains("veer_inbound_handshake_failures_total{")
        }),
        "{}",
        v.get("/stats/prometheus").1
    );
    let m = v.get("/stats/prometheus").1;
    assert_eq!(
        sample(
            &m,
            "veer_inbound_handshake_failures_total{reason=\"eof_during_handshake\"}"
        ),
        0,
        "{m}"
    );
    assert_eq!(v.log().matches("inbound connection refused").count(), 1);

    // SIGTERM with nothing open: exits at once, not a second later.
    let t = Instant::now();
    v.signal(libc::SIGTERM);
    let st = v.wait_exit(Duration::from_secs(5)).expect("exit");
    assert!(st.success());
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(700),
        "took {took:?}\n{}",
        v.log()
    );
}

#[test]
fn an_expired_leaf_says_so() {
    let ca = TestCa::new(TRUST_DOMAIN);
    // Valid for two more seconds.
    let cert = ca.write_leaf(
        "short",
        &LeafSpec::service(TRUST_DOMAIN, "dc1", "api").valid_between(-60, 2),
    );
    let dir = TempDir::new("veer-i15-");
    let p = Ports::new();
    let cfg = dir.write("veer.toml", &config(&ca, &cert, &p, p.inbound, ""));
    let v = Veer::start(&cfg, dir.join("run.log"), p.admin);
    v.wait_ready();
    assert!(
        wait_until(Duration::from_secs(6), || v.get("/ready").0 == 503),
        "{}",
        v.log()
    );
    let (_, body) = v.get("/ready");
    assert!(body.starts_with("LEAF_EXPIRED: leaf certificate"), "{body}");
    assert!(wait_until(Duration::from_secs(2), || {
        sample(&v.get("/stats/prometheus").1, "veer_leaf_expired_total") == 1
    }));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        v.log().matches("the leaf certificate expired").count(),
        1,
        "{}",
        v.log()
    );
}

#[test]
fn the_command_line_names_what_is_missing() {
    let out = Command::new(bin()).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["--config", "--proxy-id", "--sidecar-for", "--config-path"] {
        assert!(err.contains(want), "{err}");
    }
    let out = Command::new(bin())
        .args(["run", "--config", "/nonexistent", "--concurrency", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--concurrency"), "{err}");
    let out = Command::new(bin())
        .args(["validate", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("The TOML configuration file to check"),
        "{help}"
    );
}
