//! Helpers shared by `tests/hostile.rs` and `tests/soak.rs`: process
//! figures from /proc, socket states from `ss`, the admin endpoint's
//! metrics, and the mixed-connection driver of the leak tests.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use veer_testsupport::mesh::{Mesh, Sidecar, API_VIP, PLAIN_IP, PROXY_UID, SERVER_IP};
use veer_testsupport::netns::Netns;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

/// Raises this process's open-file limit, so that the test's clients and
/// the sidecars it starts (which inherit it) can hold thousands of
/// connections: the soft limit to the hard one, and both to `to` when the
/// process may (`CAP_SYS_RESOURCE`).
pub fn raise_nofile(to: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and fill a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        let hard = l.rlim_max;
        l.rlim_cur = l.rlim_cur.max(to as libc::rlim_t);
        l.rlim_max = l.rlim_max.max(to as libc::rlim_t);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            l.rlim_cur = hard;
            l.rlim_max = hard;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Lowers a sidecar's open-file limit (soft and hard) with `prlimit`, run
/// as the sidecar's own user: lowering another process's limit needs no
/// capability when the users match (and root here may lack
/// `CAP_SYS_RESOURCE`).
pub fn lower_nofile_of(pid: u32, n: u64) {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
            "prlimit",
            &format!("--pid={pid}"),
            &format!("--nofile={n}:{n}"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Open file descriptors of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Open sockets and pipes of a process.
pub fn sockets_and_pipes(pid: u32) -> (usize, usize) {
    let (mut sockets, mut pipes) = (0, 0);
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(t) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = t.to_string_lossy();
        if t.starts_with("socket:") {
            sockets += 1;
        } else if t.starts_with("pipe:") {
            pipes += 1;
        }
    }
    (sockets, pipes)
}

/// Resident set size of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process.
pub fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime), counted from 3 after the ')'.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

pub fn pid(s: &Sidecar) -> u32 {
    s.pid().expect("sidecar running")
}

/// What a sidecar holds.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub fds: usize,
    pub sockets: usize,
    pub pipes: usize,
    pub rss_kib: u64,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fds ({} sockets, {} pipes), RSS {} KiB",
            self.fds, self.sockets, self.pipes, self.rss_kib
        )
    }
}

pub fn figures(s: &Sidecar) -> Figures {
    let p = pid(s);
    let (sockets, pipes) = sockets_and_pipes(p);
    Figures {
        fds: fds(p),
        sockets,
        pipes,
        rss_kib: rss_kib(p),
    }
}

/// TCP sockets of a namespace in a state (`close-wait`, `fin-wait-2`...).
pub fn sockets_in_state(ns: &Netns, state: &str) -> Vec<String> {
    ns.sh_ok(&format!("ss -tanH state {state}"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The sidecar's metrics from its admin endpoint (127.0.0.1:19000 in its
/// namespace).
pub fn scrape(ns: &Netns) -> String {
    ns.sh_ok("curl -sS --max-time 5 http://127.0.0.1:19000/stats/prometheus")
        .expect("admin endpoint answers")
}

/// The value of one sample, e.g. `veer_connections_overflow_total{listener="inbound"}`;
/// 0 when absent.
pub fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// Connects from inside `ns` (the socket stays usable from this thread).
pub fn connect(ns: &Netns, addr: &str) -> std::io::Result<TcpStream> {
    let a: SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let s = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        Ok(s)
    })
}

/// Sends `E<msg>`, half-closes, and returns what came back before EOF.
pub fn echo(ns: &Netns, addr: &str, msg: &str) -> std::io::Result<String> {
    let mut s = connect(ns, addr)?;
    s.write_all(format!("E{msg}").as_bytes())?;
    s.shutdown(Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Runs `openssl s_client` from the client namespace as the proxy UID (not
/// redirected) against the api sidecar with a certificate, sending
/// `E<payload>`; returns what came back.
pub fn s_client(m: &Mesh, cert: &(PathBuf, PathBuf), payload: &str) -> String {
    let mut cmd = m.client.command("setpriv");
    cmd.args([
        &format!("--reuid={PROXY_UID}"),
        &format!("--regid={PROXY_UID}"),
        "--clear-groups",
    ])
    .args(["timeout", "10", "openssl", "s_client", "-quiet", "-connect"])
    .arg(format!("{SERVER_IP}:20000"))
    .arg("-CAfile")
    .arg(m.ca.roots())
    .arg("-cert")
    .arg(&cert.0)
    .arg("-key")
    .arg(&cert.1)
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("E{payload}").as_bytes());
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The kinds of connection the leak tests mix, through both sidecars
/// unless said otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Echo, client FIN first.
    Echo,
    /// The server sends a banner and FIN first; the client answers, then FIN.
    ServerFinFirst,
    /// The client resets mid-stream.
    ClientReset,
    /// Passthrough (splice) echo to the plain server.
    Passthrough,
    /// The client reads the server's FIN and then stays silent, half-closed:
    /// the half-close timer ends it.
    HalfOpen,
    /// The client sends one byte and goes silent: the idle timer ends it.
    Idle,
    /// A silent peer on the api's inbound port (through web's passthrough):
    /// the api's handshake timeout ends it.
    Silent,
    /// Not TLS on the api's inbound port: refused at once.
    NotTls,
    /// A trusted identity that intentions deny (openssl s_client).
    Denied,
}

/// How often each kind comes up, per 100 connections.
pub const MIX: &[(Kind, usize)] = &[
    (Kind::Echo, 50),
    (Kind::ServerFinFirst, 12),
    (Kind::ClientReset, 12),
    (Kind::Passthrough, 12),
    (Kind::HalfOpen, 3),
    (Kind::Idle, 3),
    (Kind::Silent, 3),
    (Kind::NotTls, 4),
    (Kind::Denied, 1),
];

pub fn kind_of(i: usize) -> Kind {
    let mut n = i % 100;
    for (k, w) in MIX {
        if n < *w {
            return *k;
        }
        n -= w;
    }
    Kind::Echo
}

/// What a mix run did.
#[derive(Debug, Default)]
pub struct MixReport {
    pub done: usize,
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

/// Closes with a reset (`SO_LINGER` 0) instead of a FIN.
pub fn reset_close(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a struct we own.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Runs one connection of `kind`; sockets that must outlive the call (for
/// a timer to end them) go to `held`.
type Held = Mutex<Vec<(Instant, TcpStream)>>;

fn hold(held: &Held, s: TcpStream) {
    held.lock().unwrap().push((Instant::now(), s));
}

fn one(ns_mesh: &Mesh, kind: Kind, i: usize, held: &Held) -> Result<(), String> {
    let vip = format!("{API_VIP}:80");
    let e = |what: &str, err: std::io::Error| format!("{kind:?} #{i}: {what}: {err}");
    let dial = |addr: &str| -> Result<TcpStream, String> {
        let a: SocketAddr = addr.parse().unwrap();
        let s =
            TcpStream::connect_timeout(&a, Duration::from_secs(10)).map_err(|x| e("connect", x))?;
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Ok(s)
    };
    match kind {
        Kind::Echo | Kind::Passthrough => {
            let addr = if kind == Kind::Echo {
                vip
            } else {
                format!("{PLAIN_IP}:9000")
            };
            let mut s = dial(&addr)?;
            let msg = vec![b'x'; 1 + i % 4096];
            s.write_all(b"E").map_err(|x| e("write", x))?;
            s.write_all(&msg).map_err(|x| e("write", x))?;
            s.shutdown(Shutdown::Write).map_err(|x| e("shutdown", x))?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).map_err(|x| e("read", x))?;
            if back != msg {
                return Err(format!(
                    "{kind:?} #{i}: {} bytes back of {}",
                    back.len(),
                    msg.len()
                ));
            }
        }
        Kind::ServerFinFirst => {
            let mut s = dial(&vip)?;
            s.write_all(b"B").map_err(|x| e("write", x))?;
            let mut banner = [0u8; 7];
            s.read_exact(&mut banner).map_err(|x| e("read", x))?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).map_err(|x| e("read to EOF", x))?;
            s.write_all(&[1u8; 100])
                .map_err(|x| e("write after FIN", x))?;
            s.shutdown(Shutdown::Write).map_err(|x| e("shutdown", x))?;
        }
        Kind::ClientReset => {
            let mut s = dial(&vip)?;
            s.write_all(b"E0123456789").map_err(|x| e("write", x))?;
            let mut got = [0u8; 10];
            s.read_exact(&mut got).map_err(|x| e("read", x))?;
            s.write_all(&[2u8; 2000]).map_err(|x| e("write", x))?;
            reset_close(s);
        }
        Kind::HalfOpen => {
            let mut s = dial(&vip)?;
            s.write_all(b"B").map_err(|x| e("write", x))?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).map_err(|x| e("read to EOF", x))?;
            hold(held, s);
        }
        Kind::Idle => {
            let mut s = dial(&vip)?;
            s.write_all(b"E1").map_err(|x| e("write", x))?;
            let mut one = [0u8; 1];
            s.read_exact(&mut one).map_err(|x| e("read", x))?;
            hold(held, s);
        }
        Kind::Silent => {
            hold(held, dial(&format!("{SERVER_IP}:20000"))?);
        }
        Kind::NotTls => {
            let mut s = dial(&format!("{SERVER_IP}:20000"))?;
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        }
        Kind::Denied => {
            let evil = (
                ns_mesh.ca.dir.join("evil.pem"),
                ns_mesh.ca.dir.join("evil-key.pem"),
            );
            let out = s_client(ns_mesh, &evil, "secret");
            if out.contains("secret") {
                return Err(format!("Denied #{i}: bytes reached the app"));
            }
        }
    }
    Ok(())
}

/// Runs `total` connections of the mix with `workers` threads in the client
/// namespace. Held sockets are closed at the end (the timers will have
/// ended them on veer's side).
pub fn run_mix(m: &Arc<Mesh>, total: usize, workers: usize) -> MixReport {
    m.ca.service("evil");
    let next = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (m, next, held, errors) = (m.clone(), next.clone(), held.clone(), errors.clone());
            let ns = m.client.path();
            std::thread::spawn(move || {
                veer_testsupport::netns::enter(&ns).unwrap();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    if let Err(e) = one(&m, kind_of(i), i, &held) {
                        errors.lock().unwrap().push(e);
                    }
                    // Close held sockets once they are past every timer.
                    if i % 50 == 0 {
                        held.lock().unwrap().retain(|(t, _)| t.elapsed() < HOLD_FOR);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = started.elapsed();
    // Every held socket has been ended by veer's timers by now, or will be
    // within them; the test's side closes them (no CLOSE_WAIT left here).
    std::thread::sleep(Duration::from_secs(3));
    held.lock().unwrap().clear();
    let errors = std::mem::take(&mut *errors.lock().unwrap());
    MixReport {
        done: total,
        errors,
        elapsed,
    }
}

/// How long the test keeps a socket it holds for a timer: longer than
/// every timer of [`TIMERS`].
pub const HOLD_FOR: Duration = Duration::from_secs(5);

/// The mesh the leak tests use: short timers everywhere, so that every
/// kind of connection ends within a few seconds.
pub const TIMERS: &str = "\n[timeouts]\nidle = \"3s\"\nhalf_close = \"2s\"\nhandshake = \"2s\"\n";

/// Waits until neither sidecar has a connection open.
pub fn quiesce(m: &Mesh) {
    for ns in [&m.client, &m.server] {
        assert!(
            wait_until(Duration::from_secs(10), || {
                let t = scrape(ns);
                sample(&t, "veer_connections_active{direction=\"inbound\"}") == 0
                    && sample(&t, "veer_connections_active{direction=\"outbound\"}") == 0
            }),
            "connections still open in {}",
            ns.name()
        );
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Both sidecars back to (near) their figures before the load, nothing
/// open, nothing left half-closed in either namespace. Returns the
/// figures once settled.
pub fn check_no_leaks(m: &Mesh, web0: Figures, api0: Figures) -> (Figures, Figures) {
    for (s, ns, before) in [(&m.web, &m.client, web0), (&m.api, &m.server, api0)] {
        let p = pid(s);
        // Everything but pipes back to where it was; pipes only in the
        // splice pools (two fds each, a few per worker thread, two threads).
        let pooled = 2 * 2 * veer_proxy::sys::POOL_MAX;
        // Multiplexed veer <-> veer connections stay pooled for 60 s after
        // their last stream, one socket each: allowed beyond `before`, as
        // many as veer reports open (a socket it does not count is a leak).
        let settled = || {
            let now = figures(s);
            let text = scrape(ns);
            let mux: usize = ["inbound", "outbound"]
                .iter()
                .map(|d| {
                    let series = format!("veer_mux_connections_active{{direction=\"{d}\"}}");
                    sample(&text, &series) as usize
                })
                .sum();
            now.fds - now.pipes <= before.fds - before.pipes + 2 + mux && now.pipes <= pooled
        };
        assert!(
            wait_until(Duration::from_secs(10), settled),
            "{}: {}; before: {before}; veer_mux_connections_active:\n{}",
            s.name,
            figures(s),
            scrape(ns)
                .lines()
                .filter(|l| l.starts_with("veer_mux_connections_active"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let rss = rss_kib(p);
        assert!(
            rss <= before.rss_kib + before.rss_kib / 2 + 8 * 1024,
            "{}: RSS {rss} KiB; before: {before}",
            s.name
        );
        let text = scrape(ns);
        for d in ["inbound", "outbound"] {
            assert_eq!(
                sample(
                    &text,
                    &format!("veer_connections_active{{direction=\"{d}\"}}")
                ),
                0,
                "{}: {d} connections still open",
                s.name
            );
        }
        for state in ["close-wait", "fin-wait-2"] {
            let left = sockets_in_state(ns, state);
            assert!(left.is_empty(), "{}: {state}:\n{}", s.name, left.join("\n"));
        }
        eprintln!(
            "{}: {} sockets in TIME_WAIT (kernel timer, 60 s)",
            ns.name(),
            sockets_in_state(ns, "time-wait").len()
        );
    }
    (figures(&m.web), figures(&m.api))
}
