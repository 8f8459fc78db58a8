//! End-to-end tests of veer's lifecycle (issue 5) with the real binary:
//! SIGTERM drains inbound and keeps outbound serving while open
//! connections finish; `/ready` flips at start, on drain and on quit;
//! `veer await-ready`; a second SIGTERM or a SIGINT exits at once;
//! systemd's `READY=1` / `STOPPING=1`.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};
use veer_testsupport::echo::{Checksum, Stream};
use veer_testsupport::mesh::{self, Mesh, Sidecar, API_VIP, PLAIN_IP};
use veer_testsupport::netns::Netns;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

macro_rules! need_root {
    ($name:expr) => {
        if !veer_testsupport::require_root($name) {
            return;
        }
    };
}

fn connect(ns: &Netns, addr: &str) -> std::io::Result<TcpStream> {
    let a: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(s)
    })
}

/// `curl` in `ns` against the admin endpoint: "<status> <body>".
fn admin(ns: &Netns, method: &str, path: &str) -> String {
    ns.sh_ok(&format!(
        "curl -sS --max-time 5 -X {method} -w ' %{{http_code}}' http://127.0.0.1:19000{path}"
    ))
    .unwrap()
    .trim()
    .to_string()
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
fn sigterm_lets_a_long_transfer_finish_refuses_new_inbound_keeps_outbound() {
    need_root!("sigterm_lets_a_long_transfer_finish_refuses_new_inbound_keeps_outbound");
    let mut m = Mesh::new(&bin());
    let vip = format!("{API_VIP}:80");
    assert_eq!(admin(&m.server, "GET", "/ready"), "LIVE\n 200");

    // A 2 s upload through web -> api -> app.
    const CHUNKS: usize = 40;
    const CHUNK: usize = 32 * 1024;
    let mut up = connect(&m.client, &vip).unwrap();
    let transfer = std::thread::spawn(move || {
        let mut src = Stream::new();
        let mut sum = Checksum::default();
        up.write_all(b"S").unwrap();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..CHUNKS {
            src.fill(&mut buf);
            sum.update(&buf);
            up.write_all(&buf).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        up.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        up.read_to_string(&mut answer).unwrap();
        (answer, format!("{} {}\n", CHUNKS * CHUNK, sum.finish()))
    });
    std::thread::sleep(Duration::from_millis(300));
    let accepted = m.app.accepted();
    assert_eq!(accepted, 1);
    let sent_term = Instant::now();
    m.api.signal("TERM");

    // Not ready any more; new inbound connections are refused and never
    // reach the app.
    assert!(
        wait_until(Duration::from_secs(3), || admin(&m.server, "GET", "/ready")
            .ends_with(" 503")),
        "api still ready after SIGTERM"
    );
    assert!(admin(&m.server, "GET", "/ready").starts_with("DRAINING"));
    // (web accepts, cannot reach api, resets: maybe before connect() returns.)
    let mut out = Vec::new();
    if let Ok(mut s) = connect(&m.client, &vip) {
        let _ = s.write_all(b"Elate");
        let _ = s.shutdown(Shutdown::Write);
        let _ = s.read_to_end(&mut out);
    }
    assert!(
        out.is_empty(),
        "a new inbound call was served while draining"
    );
    assert!(
        m.web
            .wait_log("all_endpoints_failed", Duration::from_secs(3)),
        "{}",
        m.web.log_text()
    );

    // The app's outbound calls still work through the draining sidecar.
    let plain_before = m.plain.accepted();
    let call = || -> std::io::Result<String> {
        let mut s = connect(&m.server, &format!("{PLAIN_IP}:9000"))?;
        s.write_all(b"Eoutbound still works")?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    match call() {
        Ok(out) => assert_eq!(out, "outbound still works"),
        Err(e) => panic!(
            "outbound call through the draining sidecar failed: {e}\n{}\n{}",
            m.server
                .sh("ss -tanpi; conntrack -L 2>&1 | head -20")
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default(),
            m.api.log_text()
        ),
    }
    assert_eq!(m.plain.accepted(), plain_before + 1);
    assert!(
        m.api
            .wait_log("upstream=passthrough", Duration::from_secs(3)),
        "{}",
        m.api.log_text()
    );

    // The transfer that was open finishes, byte-exact; then veer exits 0.
    let (answer, want) = transfer.join().unwrap();
    assert_eq!(answer, want);
    let done = Instant::now();
    assert_eq!(m.api.wait_exit(Duration::from_secs(5)), Some(0));
    let exit_after = done.elapsed();
    assert!(
        exit_after < Duration::from_secs(2),
        "exit took {exit_after:?} after the last connection"
    );
    assert!(sent_term.elapsed() < Duration::from_secs(10));
    assert_eq!(m.app.accepted(), accepted);
    let log = m.api.log_text();
    assert!(log.contains("all connections finished"), "{log}");
}

/// A sidecar in its own namespace (no redirection), for lifecycle checks.
struct Solo {
    ns: Netns,
    _ca: TestCa,
    files: TempDir,
}

fn solo() -> Solo {
    let ca = TestCa::new(TRUST_DOMAIN);
    let files = TempDir::new("veer-life-");
    files.write("api.toml", &mesh::api_config(&ca, "deny", ""));
    Solo {
        ns: Netns::new("vl").unwrap(),
        _ca: ca,
        files,
    }
}

impl Solo {
    fn start(&self, extra: &[&str]) -> Sidecar {
        Sidecar::start(
            &bin(),
            &self.ns,
            self.files.join("api.toml"),
            self.files
                .join(&format!("api-{}.log", veer_testsupport::unique("l"))),
            extra,
        )
    }
    /// Opens a connection to the inbound listener that stays open (no TLS
    /// hello) until the handshake timeout.
    fn hold_inbound(&self) -> TcpStream {
        connect(&self.ns, "127.0.0.1:20000").unwrap()
    }
    fn refused(&self, addr: &str) -> bool {
        matches!(connect(&self.ns, addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    }
}

#[test]
fn ready_flips_at_start_drain_and_quit() {
    need_root!("ready_flips_at_start_drain_and_quit");
    let s = solo();
    // An app entrypoint waiting for its sidecar, started before it.
    let started = Instant::now();
    let mut waiter =
        s.ns.command(bin())
            .args(["await-ready", "--timeout", "10s", "--interval", "20ms"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "await-ready returned before veer started"
    );
    let mut v = s.start(&["--shutdown-grace-period", "20s"]);
    let st = waiter.wait().unwrap();
    let mut err = String::new();
    waiter
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(st.success(), "await-ready: {err}");
    assert!(err.contains("veer: ready"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(admin(&s.ns, "GET", "/ready"), "LIVE\n 200");

    // Drain: not ready, inbound refused, outbound still accepting, still running.
    assert_eq!(admin(&s.ns, "POST", "/drain"), "OK\n 200");
    assert_eq!(admin(&s.ns, "GET", "/ready"), "DRAINING: draining\n 503");
    assert!(wait_until(Duration::from_secs(2), || s.refused("127.0.0.1:20000")));
    // Outbound still accepts (this connection, not redirected, has no
    // original destination and is reset at once, maybe before connect()
    // returns).
    let c = connect(&s.ns, "127.0.0.1:15001");
    assert!(
        !matches!(&c, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{c:?}"
    );
    assert!(v.wait_log("reason=no_orig_dst", Duration::from_secs(3)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(v.wait_exit(Duration::ZERO), None, "drain must not exit");
    let out =
        s.ns.command(bin())
            .args(["await-ready", "--timeout", "300ms"])
            .output()
            .unwrap();
    assert!(
        !out.status.success(),
        "await-ready succeeded while draining"
    );

    // Quit: graceful exit, at once when nothing is open.
    assert_eq!(admin(&s.ns, "POST", "/quitquitquit"), "OK\n 200");
    assert_eq!(v.wait_exit(Duration::from_secs(3)), Some(0));
    assert!(v.log_text().contains("admin: graceful exit requested"));
}

#[test]
fn second_sigterm_and_sigint_exit_at_once() {
    need_root!("second_sigterm_and_sigint_exit_at_once");
    let s = solo();
    let mut v = s.start(&["--shutdown-grace-period", "30s"]);
    let _held = s.hold_inbound();
    std::thread::sleep(Duration::from_millis(100));
    v.signal("TERM");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        v.wait_exit(Duration::ZERO),
        None,
        "must wait for the open connection"
    );
    let t = Instant::now();
    v.signal("TERM");
    assert_eq!(v.wait_exit(Duration::from_secs(2)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    drop(v);

    let mut v = s.start(&["--shutdown-grace-period", "30s"]);
    let _held = s.hold_inbound();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    v.signal("INT");
    assert_eq!(v.wait_exit(Duration::from_secs(2)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn grace_period_ends_the_wait() {
    need_root!("grace_period_ends_the_wait");
    let s = solo();
    let mut v = s.start(&["--shutdown-grace-period", "600ms"]);
    let _held = s.hold_inbound();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    v.signal("TERM");
    assert_eq!(v.wait_exit(Duration::from_secs(3)), Some(0));
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert!(
        v.log_text().contains("grace period over"),
        "{}",
        v.log_text()
    );
}

/// systemd's notification protocol, on an abstract socket as systemd uses
/// for `NOTIFY_SOCKET`; no root needed (host namespace, ephemeral ports).
#[test]
fn sd_notify_ready_then_stopping() {
    let ca = TestCa::new(TRUST_DOMAIN);
    let files = TempDir::new("veer-sdn-");
    let cfg = mesh::api_config(&ca, "deny", "")
        .replace("bind = \"0.0.0.0:20000\"", "bind = \"127.0.0.1:0\"")
        + "\n[outbound]\nbind = \"127.0.0.1:0\"\nbind_ipv6 = \"\"\n";
    let cfg_path = files.write("api.toml", &cfg);
    let name = veer_testsupport::unique("veer-notify-");
    let sock = UnixDatagram::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap(),
    )
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--admin-bind", "", "--config"])
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", format!("@{name}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("no READY=1 from veer");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(
        msg.starts_with("READY=1\nSTATUS=serving as spiffe://"),
        "{msg}"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut got = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        let m = String::from_utf8_lossy(&buf[..n]).to_string();
        let stop = m.contains("STOPPING=1");
        got.push(m);
        if stop {
            break;
        }
    }
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "veer did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

/// Issue 15: a taken admin address is fatal, the default one too (a second
/// sidecar on the same host): running on without an admin endpoint let
/// `veer await-ready` and probes reach the other sidecar's.
#[test]
fn a_taken_admin_address_is_fatal_the_default_one_too() {
    need_root!("a_taken_admin_address_is_fatal_the_default_one_too");
    let s = solo();
    // Something else (another proxy) already has 127.0.0.1:19000.
    let taken =
        s.ns.run(|| std::net::TcpListener::bind("127.0.0.1:19000"))
            .unwrap();
    let cfg = s.files.join("api.toml");
    for extra in [&[][..], &["--admin-bind", "127.0.0.1:19000"][..]] {
        let out =
            s.ns.command(bin())
                .arg("run")
                .args(extra)
                .arg("--config")
                .arg(&cfg)
                .output()
                .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("admin listener 127.0.0.1:19000"), "{err}");
        assert!(err.contains("--admin-bind"), "{err}");
        assert!(!err.contains("veer ready"), "{err}");
    }
    drop(taken);
}

#[test]
fn before_the_first_consul_configuration_ready_says_so_and_sigterm_exits() {
    need_root!("before_the_first_consul_configuration_ready_says_so_and_sigterm_exits");
    let ns = Netns::new("vp").unwrap();
    let files = TempDir::new("veer-preinit-");
    let log = files.join("veer.log");
    // An agent address where nothing listens: veer keeps retrying.
    let mut child = ns
        .command(bin())
        .args([
            "run",
            "--proxy-id",
            "web-sidecar-proxy",
            "--transparent",
            "--http-addr",
            "http://127.0.0.1:1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let ready = || {
        ns.sh_ok("curl -sS --max-time 2 -w ' %{http_code}' http://127.0.0.1:19000/ready")
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(5), || ready().ends_with(" 503")),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let r = ready();
    assert!(
        r.starts_with("PRE_INITIALIZING: waiting for the first complete configuration"),
        "{r}"
    );
    // await-ready keeps waiting, and says why when it gives up.
    let out = ns
        .command(bin())
        .args(["await-ready", "--timeout", "300ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // SIGTERM before any configuration: a clean, quick exit.
    let t = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "SIGTERM ignored while waiting for Consul"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("stopped before the first configuration arrived"),
        "{text}"
    );
}
