//! veer vs Envoy vs no sidecar, measured in one run on one machine.
//!
//! `cargo bench --bench sidecars` (as root; see `benches/README.md`).
//! Options after `--`: `--concurrency N` (sidecar worker threads, default 1),
//! `--rate R` (fixed offered load, default 5000 req/s), `--only
//! direct,veer,envoy` (also `veer-xds,envoy-xds`: both started by
//! consul-dataplane's command line and configured over Delta xDS), `--idle N` (idle connections, default 10000),
//! `--quick` (short phases, for development), `--perf PHASES` (record both
//! sidecars with `perf` during `keepalive`, `newconn` and/or `bulk`,
//! comma-separated, into `bench-results/perf-<system>-<phase>.data`),
//! `--syscalls` (count the sidecars' syscalls per request / connection / MB
//! with `perf stat`; adds overhead, so not for the headline figures),
//! `--pause-before-idle SECS` (time to attach a heap profiler before the
//! idle-connection step).
mod app;
mod load;
mod report;
mod topo;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use topo::{Kind, System, Tools};

pub struct Settings {
    pub concurrency: usize,
    pub rate: f64,
    pub only: Vec<Kind>,
    pub idle: usize,
    pub warmup: Duration,
    pub phase: Duration,
    pub latency_phase: Duration,
    pub bulk_secs: u32,
    pub perf: Option<String>,
    pub syscalls: bool,
    pub pause_before_idle: Duration,
    pub ka_conns: usize,
    pub rate_conns: usize,
    pub nc_workers: usize,
}

impl Settings {
    fn from_args() -> Settings {
        let args: Vec<String> = std::env::args().collect();
        let val = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1).cloned())
        };
        let quick = args.iter().any(|a| a == "--quick");
        let only = val("--only").map_or_else(
            || vec![Kind::Direct, Kind::Veer, Kind::Envoy],
            |s| {
                s.split(',')
                    .map(|k| {
                        Kind::parse(k).unwrap_or_else(|| {
                            panic!("--only: unknown system {k:?} (direct, veer, envoy, veer-xds, envoy-xds)")
                        })
                    })
                    .collect()
            },
        );
        Settings {
            concurrency: val("--concurrency").map_or(1, |v| v.parse().expect("--concurrency")),
            rate: val("--rate").map_or(5000.0, |v| v.parse().expect("--rate")),
            only,
            idle: val("--idle").map_or(10_000, |v| v.parse().expect("--idle")),
            warmup: Duration::from_secs(1),
            phase: Duration::from_secs(if quick { 2 } else { 5 }),
            latency_phase: Duration::from_secs(if quick { 3 } else { 10 }),
            bulk_secs: if quick { 2 } else { 5 },
            perf: val("--perf"),
            syscalls: args.iter().any(|a| a == "--syscalls"),
            pause_before_idle: Duration::from_secs(
                val("--pause-before-idle").map_or(0, |v| v.parse().expect("--pause-before-idle")),
            ),
            ka_conns: 16,
            rate_conns: 8,
            nc_workers: 16,
        }
    }
}

/// utime + stime of a process, in seconds (includes its exited threads).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// Resident set size in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sidecar CPU seconds, summed over `pids`.
fn cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// One bulk-transfer run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bulk {
    pub gbps: f64,
    pub bytes: f64,
    pub cpu_s: f64,
}

impl Bulk {
    pub fn s_per_gb(&self) -> f64 {
        self.cpu_s / (self.bytes / 1e9)
    }
}

/// Everything measured for one system.
#[derive(Clone, Debug)]
pub struct Results {
    pub kind: Kind,
    pub ka: load::Rate,
    pub ka_cpu: f64,
    pub lat: load::Latency,
    pub lat_cpu: f64,
    pub nc: load::Rate,
    pub nc_cpu: f64,
    pub bulk1: Bulk,
    pub bulk8: Bulk,
    pub pass1: Bulk,
    pub pass8: Bulk,
    /// (sidecar, KiB) after start and a warm-up.
    pub rss_idle: Vec<(String, u64)>,
    /// (sidecar, KiB before, KiB with the idle connections open).
    pub rss_conns: Vec<(String, u64, u64)>,
    pub idle_open: usize,
    pub idle_errors: u64,
    pub cpu_total: f64,
    pub ready_ms: f64,
    pub load_before: String,
    pub load_after: String,
    /// CPU seconds used on the machine by anything but this benchmark and
    /// its children (sidecars, app, iperf3) while this system was measured.
    pub outside_cpu: f64,
    pub wall: f64,
    /// Syscalls per unit of work, per phase (with `--syscalls`).
    pub syscalls: Vec<String>,
}

const SYSCALLS: &[&str] = &[
    "read",
    "recvfrom",
    "readv",
    "recvmsg",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "splice",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
    "accept4",
    "connect",
    "close",
    "setsockopt",
    "getsockopt",
    "shutdown",
];

/// Measures one phase's window: sidecar CPU, and optionally `perf record`
/// (`--perf`) and syscall counts (`--syscalls`).
struct Probe<'a> {
    set: &'a Settings,
    kind: Kind,
    pids: &'a [u32],
    out: &'a std::path::Path,
    phase: &'static str,
    cpu0: f64,
    cpu: f64,
    started: Option<Instant>,
    elapsed: f64,
    children: Vec<Child>,
    stat: Option<PathBuf>,
}

impl<'a> Probe<'a> {
    fn new(
        set: &'a Settings,
        kind: Kind,
        pids: &'a [u32],
        out: &'a std::path::Path,
        phase: &'static str,
    ) -> Probe<'a> {
        Probe {
            set,
            kind,
            pids,
            out,
            phase,
            cpu0: 0.0,
            cpu: 0.0,
            started: None,
            elapsed: 0.0,
            children: Vec::new(),
            stat: None,
        }
    }

    fn perf(&self, args: &[&str], file: &std::path::Path) -> Option<Child> {
        let pids: Vec<String> = self.pids.iter().map(|p| p.to_string()).collect();
        Command::new("perf")
            .args(args)
            .arg("-o")
            .arg(file)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    }

    fn mark(&mut self, start: bool) {
        if !start {
            self.cpu = cpu(self.pids) - self.cpu0;
            self.elapsed = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            for mut c in self.children.drain(..) {
                let _ = Command::new("kill")
                    .args(["-INT", &c.id().to_string()])
                    .status();
                let _ = c.wait();
            }
            return;
        }
        let name = format!("{}-{}", self.kind.name(), self.phase);
        let record = self
            .set
            .perf
            .as_deref()
            .is_some_and(|p| p.split(',').any(|x| x == self.phase));
        if record && !self.pids.is_empty() {
            let file = self.out.join(format!("perf-{name}.data"));
            self.children
                .extend(self.perf(&["record", "-F", "1999"], &file));
        }
        if self.set.syscalls && !self.pids.is_empty() {
            let file = self.out.join(format!("syscalls-{name}.csv"));
            let mut events = vec![
                "raw_syscalls:sys_enter".to_string(),
                "context-switches".to_string(),
            ];
            events.extend(SYSCALLS.iter().map(|s| format!("syscalls:sys_enter_{s}")));
            let events = events.join(",");
            self.children
                .extend(self.perf(&["stat", "-x", ",", "-e", &events], &file));
            self.stat = Some(file);
        }
        if !self.children.is_empty() {
            // Let perf attach before the window's figures are taken.
            std::thread::sleep(Duration::from_millis(100));
        }
        self.cpu0 = cpu(self.pids);
        self.started = Some(Instant::now());
    }

    /// Syscalls and context switches per unit of work (`units_per_sec`).
    fn syscalls(&self, units_per_sec: f64, unit: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.stat.as_ref()?).ok()?;
        let per = |v: f64| v / (self.elapsed * units_per_sec);
        let mut total = None;
        let mut ctx = None;
        let mut each = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split(',').collect();
            let (Some(v), Some(ev)) = (f.first().and_then(|v| v.parse::<f64>().ok()), f.get(2))
            else {
                continue;
            };
            match *ev {
                "raw_syscalls:sys_enter" => total = Some(per(v)),
                "context-switches" => ctx = Some(per(v)),
                e => {
                    let name = e.trim_start_matches("syscalls:sys_enter_");
                    if per(v) >= 0.01 {
                        each.push(format!("{name} {:.2}", per(v)));
                    }
                }
            }
        }
        Some(format!(
            "{}: {:.2} syscalls/{unit} ({}), {:.2} context switches/{unit}",
            self.phase,
            total?,
            each.join(", "),
            ctx.unwrap_or(f64::NAN)
        ))
    }
}

fn bulk(
    sys: &System,
    tools: &Tools,
    probe: &mut Probe,
    dst: SocketAddr,
    secs: u32,
    streams: u32,
) -> Bulk {
    probe.mark(true);
    let json = sys.iperf(tools, dst, secs, streams);
    probe.mark(false);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    if let Some(e) = v.get("error") {
        eprintln!("  iperf3 to {dst} ({streams} streams): error {e}");
    }
    let sum = &v["end"]["sum_received"];
    Bulk {
        gbps: sum["bits_per_second"].as_f64().unwrap_or(f64::NAN) / 1e9,
        bytes: sum["bytes"].as_f64().unwrap_or(f64::NAN),
        cpu_s: probe.cpu,
    }
}

fn measure(kind: Kind, tools: &Tools, set: &Settings, out: &std::path::Path) -> Results {
    let load_before = loadavg();
    let started = Instant::now();
    let mut sys = System::start(kind, tools, set.concurrency);
    let ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let procs = sys.sidecars();
    let pids: Vec<u32> = procs.iter().map(|p| p.1).collect();
    let dst = sys.target();
    let mut syscalls = Vec::new();
    eprintln!(
        "{}: up in {ready_ms:.0} ms (topology + sidecars), sidecars {procs:?}",
        kind.name()
    );

    // Warm-up: some new connections (TLS, caches), then let it settle.
    load::new_conns(
        &sys.client,
        dst,
        4,
        Duration::ZERO,
        Duration::from_millis(500),
        &mut |_| {},
    );
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle: Vec<(String, u64)> = procs
        .iter()
        .map(|(n, p)| (n.clone(), rss_kib(*p)))
        .collect();

    // 1. Keep-alive, closed loop.
    let mut probe = Probe::new(set, kind, &pids, out, "keepalive");
    let ka = load::max_rate(
        &sys.client,
        dst,
        set.ka_conns,
        set.warmup,
        set.phase,
        &mut |s| probe.mark(s),
    );
    let ka_cpu = probe.cpu;
    syscalls.extend(probe.syscalls(ka.per_sec, "request"));
    eprintln!(
        "  keep-alive: {:.0} req/s ({} errors)",
        ka.per_sec, ka.errors
    );
    // 2. Fixed rate, open loop.
    let mut probe = Probe::new(set, kind, &pids, out, "fixedrate");
    let lat = load::fixed_rate(
        &sys.client,
        dst,
        set.rate_conns,
        set.rate,
        set.warmup,
        set.latency_phase,
        &mut |s| probe.mark(s),
    );
    let lat_cpu = probe.cpu;
    eprintln!(
        "  fixed {:.0} req/s: p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.3} ms ({} samples, {} errors)",
        lat.offered, lat.p50_ms, lat.p99_ms, lat.p999_ms, lat.max_ms, lat.samples, lat.errors
    );
    // 3. New connections.
    let hs0 = outbound_handshakes(&sys, kind);
    let mut probe = Probe::new(set, kind, &pids, out, "newconn");
    let nc = load::new_conns(
        &sys.client,
        dst,
        set.nc_workers,
        set.warmup,
        set.phase,
        &mut |s| probe.mark(s),
    );
    let nc_cpu = probe.cpu;
    syscalls.extend(probe.syscalls(nc.per_sec, "connection"));
    eprintln!(
        "  new connections: {:.0}/s ({} errors)",
        nc.per_sec, nc.errors
    );
    if let (Some(a), Some(b)) = (hs0, outbound_handshakes(&sys, kind)) {
        let (full, resumed) = (b.0 - a.0, b.1 - a.1);
        eprintln!(
            "  new connections' TLS handshakes: {full} full, {resumed} resumed ({:.1} % full)",
            100.0 * full as f64 / (full + resumed).max(1) as f64
        );
    }
    // 4. Idle connections.
    let (mut rss_conns, mut idle_open, mut idle_errors) = (Vec::new(), 0, 0);
    if kind != Kind::Direct && set.idle > 0 {
        if !set.pause_before_idle.is_zero() {
            eprintln!(
                "  pausing {:?} before the idle step (attach a profiler to {pids:?})",
                set.pause_before_idle
            );
            std::thread::sleep(set.pause_before_idle);
        }
        std::thread::sleep(Duration::from_secs(2));
        let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
        let (held, errs) = load::hold_idle(&sys.client, dst, set.idle, 64, Duration::from_secs(90));
        std::thread::sleep(Duration::from_secs(2));
        for (i, (n, p)) in procs.iter().enumerate() {
            rss_conns.push((n.clone(), before[i], rss_kib(*p)));
        }
        idle_open = held.len();
        idle_errors = errs;
        eprintln!("  idle: {idle_open} connections open ({errs} errors), RSS {rss_conns:?}");
        drop(held);
        std::thread::sleep(Duration::from_secs(2));
    }
    // 5. Bulk: mesh, then passthrough (byte streams: not on the HTTP path).
    if kind.is_http() {
        let cpu_total = cpu(&pids);
        return Results {
            kind,
            ka,
            ka_cpu,
            lat,
            lat_cpu,
            nc,
            nc_cpu,
            bulk1: Bulk::default(),
            bulk8: Bulk::default(),
            pass1: Bulk::default(),
            pass8: Bulk::default(),
            rss_idle,
            rss_conns,
            idle_open,
            idle_errors,
            cpu_total,
            ready_ms,
            load_before,
            load_after: loadavg(),
            outside_cpu: 0.0,
            wall: 0.0,
            syscalls,
        };
    }
    sys.swap_app_for_iperf(tools);
    let mut probe = Probe::new(set, kind, &pids, out, "bulk");
    let b1 = bulk(&sys, tools, &mut probe, dst, set.bulk_secs, 1);
    syscalls.extend(probe.syscalls(b1.gbps * 1e9 / 8.0 / 1e6, "MB"));
    let mut probe = Probe::new(set, kind, &pids, out, "bulk8");
    let b8 = bulk(&sys, tools, &mut probe, dst, set.bulk_secs, 8);
    let plain = sys.plain_target();
    let mut probe = Probe::new(set, kind, &pids, out, "passthrough");
    let p1 = bulk(&sys, tools, &mut probe, plain, set.bulk_secs, 1);
    syscalls.extend(probe.syscalls(p1.gbps * 1e9 / 8.0 / 1e6, "MB"));
    let mut probe = Probe::new(set, kind, &pids, out, "passthrough8");
    let p8 = bulk(&sys, tools, &mut probe, plain, set.bulk_secs, 8);
    eprintln!(
        "  bulk mesh {:.2} / {:.2} Gbit/s, passthrough {:.2} / {:.2} Gbit/s (1 / 8 streams)",
        b1.gbps, b8.gbps, p1.gbps, p8.gbps
    );
    for s in &syscalls {
        eprintln!("  {s}");
    }
    let cpu_total = cpu(&pids);
    Results {
        kind,
        ka,
        ka_cpu,
        lat,
        lat_cpu,
        nc,
        nc_cpu,
        bulk1: b1,
        bulk8: b8,
        pass1: p1,
        pass8: p8,
        rss_idle,
        rss_conns,
        idle_open,
        idle_errors,
        cpu_total,
        ready_ms,
        load_before,
        load_after: loadavg(),
        outside_cpu: 0.0,
        wall: 0.0,
        syscalls,
    }
}

fn ticks_to_secs(t: f64) -> f64 {
    // SAFETY: sysconf has no preconditions.
    t / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Busy CPU seconds of the whole machine (user + nice + system).
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    ticks_to_secs(f.iter().sum())
}

/// CPU seconds of this process and its reaped children.
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|v| v.parse().ok())
        .collect();
    ticks_to_secs(f.iter().sum())
}

/// Raises RLIMIT_NOFILE (inherited by the sidecars and the app) as far as
/// allowed: to 1<<17, or to the hard limit without CAP_SYS_RESOURCE.
/// Returns the soft limit in force.
fn raise_nofile() -> u64 {
    let want: libc::rlim_t = 1 << 17;
    let mut lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit/getrlimit read/write a valid rlimit struct.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__app") {
        app::main(&args[2]);
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` runs bench targets without `--bench`.
        eprintln!("sidecars: a benchmark, not a test; run `cargo bench --bench sidecars`");
        return;
    }
    if !veer_testsupport::require_root("sidecars bench") {
        return;
    }
    let mut set = Settings::from_args();
    let Some(iperf3) = veer_testsupport::tool("iperf3") else {
        eprintln!("\n*** SKIPPED sidecars bench: no iperf3; run benches/setup.sh ***\n");
        return;
    };
    let envoy = veer_testsupport::tool("envoy");
    if envoy.is_none() {
        eprintln!("\n*** envoy not found (run .ci/install-deps): measuring without it ***\n");
    }
    let tools = Tools {
        veer: PathBuf::from(env!("CARGO_BIN_EXE_veer")),
        envoy,
        iperf3,
        me: std::env::current_exe().expect("current exe"),
    };
    let nofile = raise_nofile();
    // Each sidecar holds two sockets per relayed connection.
    let fit = (nofile.saturating_sub(256) / 2) as usize;
    if set.idle > fit {
        eprintln!(
            "RLIMIT_NOFILE is {nofile} (no CAP_SYS_RESOURCE to raise it): holding {fit} idle connections instead of {}",
            set.idle
        );
        set.idle = fit;
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench-results");
    std::fs::create_dir_all(&out).expect("bench-results");
    let started = Instant::now();
    let mut results = Vec::new();
    for kind in &set.only {
        if kind.is_envoy() && tools.envoy.is_none() {
            continue;
        }
        let (b0, o0, t0) = (machine_busy(), own_cpu(), Instant::now());
        let mut r = measure(*kind, &tools, &set, &out);
        r.wall = t0.elapsed().as_secs_f64();
        r.outside_cpu = ((machine_busy() - b0) - (own_cpu() - o0)).max(0.0);
        eprintln!(
            "  outside load while measuring {}: {:.1} CPU-s in {:.0} s",
            kind.name(),
            r.outside_cpu,
            r.wall
        );
        results.push(r);
    }
    let md = report::markdown(&results, &set, started.elapsed());
    println!("\n{md}");
    let latest = out.join("latest.md");
    std::fs::write(&latest, &md).expect("write results");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let _ = std::fs::write(out.join(format!("run-{stamp}.md")), &md);
    eprintln!("written to {}", latest.display());
}

/// veer's client sidecar's outbound TLS handshakes so far: (full, resumed).
fn outbound_handshakes(sys: &System, kind: Kind) -> Option<(u64, u64)> {
    if !kind.is_veer() {
        return None;
    }
    let text = sys
        .client
        .sh_ok("curl -sS --max-time 5 http://127.0.0.1:19000/stats/prometheus")
        .ok()?;
    let get = |k: &str| {
        let series = format!("veer_tls_handshakes_total{{direction=\"outbound\",kind=\"{k}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((get("full")?, get("resumed")?))
}
