//! Sidecar CPU with veer <-> veer multiplexing on and off (issue 14): the
//! two sidecars of `mesh::Mesh` (real namespaces, Consul's redirect rules)
//! are counted with `perf stat` (task-clock, context switches, syscalls;
//! this machine's perf has no hardware counters) while the test drives
//! new connections, keep-alive requests and one bulk transfer through them.
//!
//! Not part of the suite (`#[ignore]`); run it on a release build:
//! ```text
//! cargo build --release --bin veer
//! VEER_BIN=target/release/veer cargo test --test mux_perf -- --ignored --nocapture
//! ```
//! The load generator's own CPU is not counted: only the sidecars'.
//!
//! 2026-12-07, release build, machine shared (load average 8-9 on 2 cores,
//! so absolute figures are inflated; compare on and off), both sidecars'
//! task-clock per unit, mux on / mux off:
//! - new connections, 1 client: 347 / 794 us (0.44x), 2,000 in 2.66 / 3.91 s
//! - new connections, 8 clients: 250 / 658 us (0.38x)
//! - keep-alive, 8 connections: 55.3 / 56.2 us per request (same)
//! - bulk, one connection, 1 GiB: 3,296 / 1,850 us per MiB (1.78x: worse),
//!   5.6 / 6.1 s; without TCP_NOTSENT_LOWAT (debug build) 3,160 vs 2,030:
//!   the cost is the h2 framing, the extra copy and the task hop.
//!
//! 2026-12-07 03:47-03:49 UTC, after the bulk rule (branch i14r, release
//! build, three runs, the machine shared with another helper's release
//! build), both sidecars' task-clock per MiB, mux on / mux off:
//! - bulk, first transfer (mux on: a stream, which marks the upstream bulk
//!   after 8 MiB): 2,642 / 1,647; 2,369 / 1,727; 2,517 / 1,697 us
//!   (1.46-1.60x: the stream that reveals bulk still pays the stream cost)
//! - bulk, next transfer (mux on: its own TLS connection, by the rule):
//!   1,836 / 1,634; 1,726 / 1,659; 1,655 / 1,919 us (0.86-1.12x: the same
//!   path as mux off)
//! - new connections, 1 client: 408 / 708; 337 / 815; 386 / 670 us
//!   (0.41-0.58x); keep-alive, 8 connections: 69.9 / 60.4; 57.2 / 57.1;
//!   56.4 / 53.6 us per request (the same within noise)
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use veer_testsupport::mesh::{Mesh, Sidecar, API_VIP};
use veer_testsupport::netns::{self, Netns};

fn bin() -> PathBuf {
    std::env::var_os("VEER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_veer")))
}

/// `perf stat` on one process until stopped.
struct Stat {
    child: Child,
    file: PathBuf,
}

const EVENTS: &str = "task-clock,context-switches,raw_syscalls:sys_enter";

impl Stat {
    fn start(pid: u32, file: PathBuf) -> Stat {
        let child = Command::new("perf")
            .args(["stat", "-x", ",", "-e", EVENTS, "-o"])
            .arg(&file)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("perf");
        Stat { child, file }
    }

    /// (task-clock ms, context switches, syscalls).
    fn stop(mut self) -> (f64, f64, f64) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let get = |ev: &str| {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    let f: Vec<&str> = l.split(',').collect();
                    (f.get(2) == Some(&ev)).then(|| f[0].parse::<f64>().ok())?
                })
                .unwrap_or(f64::NAN)
        };
        (
            get("task-clock"),
            get("context-switches"),
            get("raw_syscalls:sys_enter"),
        )
    }
}

/// Runs `work` (which returns its unit count) in the client namespace on
/// `threads` threads while both sidecars are counted; prints per-unit
/// figures.
fn measure(
    m: &Mesh,
    label: &str,
    unit: &str,
    threads: usize,
    work: impl Fn(&Netns) -> u64 + Send + Sync + Clone + 'static,
) {
    let dir = std::env::temp_dir();
    let pids = [m.web.pid().unwrap(), m.api.pid().unwrap()];
    let stats: Vec<Stat> = pids
        .iter()
        .enumerate()
        .map(|(i, p)| Stat::start(*p, dir.join(format!("veer-mux-perf-{i}.csv"))))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let ns = m.client.path();
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (ns, work) = (ns.clone(), work.clone());
            std::thread::spawn(move || {
                netns::enter(&ns).unwrap();
                work(&Netns::attach_current())
            })
        })
        .collect();
    let units: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    let wall = t0.elapsed();
    let mut total = (0.0, 0.0, 0.0);
    let mut each = Vec::new();
    for (s, name) in stats.into_iter().zip(["web", "api"]) {
        let (ms, cs, sc) = s.stop();
        total = (total.0 + ms, total.1 + cs, total.2 + sc);
        each.push(format!("{name} {:.1} us", ms * 1e3 / units as f64));
    }
    let u = units as f64;
    println!(
        "MUXPERF {label}: {units} {unit} in {wall:.2?}: both sidecars {:.1} us CPU/{unit} ({}), {:.2} context switches/{unit}, {:.1} syscalls/{unit}",
        total.0 * 1e3 / u,
        each.join(", "),
        total.1 / u,
        total.2 / u,
    );
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn target() -> SocketAddr {
    format!("{API_VIP}:80").parse().unwrap()
}

/// New connections: connect, one small exchange, close (both directions).
fn new_conns(n: u64) -> impl Fn(&Netns) -> u64 + Send + Sync + Clone + 'static {
    move |_| {
        for _ in 0..n {
            let mut s = connect(target());
            s.write_all(b"Eping").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            assert_eq!(out, b"ping");
        }
        n
    }
}

/// Keep-alive: `n` request/response exchanges of 100 bytes on one connection.
fn keepalive(n: u64) -> impl Fn(&Netns) -> u64 + Send + Sync + Clone + 'static {
    move |_| {
        let mut s = connect(target());
        s.write_all(b"E").unwrap();
        let msg = [7u8; 100];
        let mut got = [0u8; 100];
        for _ in 0..n {
            s.write_all(&msg).unwrap();
            s.read_exact(&mut got).unwrap();
        }
        n
    }
}

/// Bulk: `mib` MiB one way (the app counts and answers a checksum line).
fn bulk(mib: u64) -> impl Fn(&Netns) -> u64 + Send + Sync + Clone + 'static {
    move |_| {
        let mut s = connect(target());
        s.write_all(b"S").unwrap();
        let chunk = vec![3u8; 1 << 20];
        for _ in 0..mib {
            s.write_all(&chunk).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with(&format!("{} ", mib << 20)), "{out}");
        mib
    }
}

fn restart(m: &mut Mesh, env: &[(&str, &str)], tag: &str) {
    for web in [true, false] {
        let (sc, ns, name) = if web {
            (&mut m.web, &m.client, "web")
        } else {
            (&mut m.api, &m.server, "api")
        };
        sc.signal("KILL");
        sc.wait_exit(Duration::from_secs(5));
        let cfg = sc.config.clone();
        let args: Vec<std::ffi::OsString> = vec!["--config".into(), cfg.clone().into()];
        let log = m.files.join(&format!("{name}-{tag}.log"));
        *sc = Sidecar::start_with(&bin(), ns, &args, env, cfg, log);
    }
}

#[test]
#[ignore]
fn mux_on_vs_off_sidecar_cpu() {
    if !veer_testsupport::require_root("mux_on_vs_off_sidecar_cpu") {
        return;
    }
    let nc: u64 = std::env::var("MUXPERF_CONNS").map_or(2000, |v| v.parse().unwrap());
    let mut m = Mesh::new(&bin());
    for (mode, env) in [("mux on", &[][..]), ("mux off", &[("VEER_MUX", "0")][..])] {
        restart(&mut m, env, mode.split(' ').nth(1).unwrap());
        // Warm: the pool (mux) and the session tickets (both).
        measure(&m, &format!("{mode} warm-up"), "conn", 1, new_conns(20));
        measure(
            &m,
            &format!("{mode} new connections, 1 client"),
            "conn",
            1,
            new_conns(nc),
        );
        measure(
            &m,
            &format!("{mode} new connections, 8 clients"),
            "conn",
            8,
            new_conns(nc / 8),
        );
        measure(
            &m,
            &format!("{mode} keep-alive, 8 connections"),
            "req",
            8,
            keepalive(nc),
        );
        // The first bulk transfer rides a stream (with mux on) and marks
        // the upstream bulk; the next, within the hold, gets its own TLS
        // connection.
        measure(
            &m,
            &format!("{mode} bulk, 1 connection, first"),
            "MiB",
            1,
            bulk(1024),
        );
        measure(
            &m,
            &format!("{mode} bulk, 1 connection, next"),
            "MiB",
            1,
            bulk(1024),
        );
    }
}
