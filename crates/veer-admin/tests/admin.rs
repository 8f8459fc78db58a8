//! The admin endpoint, expose paths and the lifecycle controller, in one
//! process on loopback (no root needed).
use hyper::Method;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use veer_admin::client::{await_ready, request};
use veer_admin::lifecycle::{Exit, Request};
use veer_admin::{AdminAddrs, AdminServer, Lifecycle, ShutdownOpts};
use veer_proxy::accept::Listeners;
use veer_proxy::state::Shared;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn certs() -> Dir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "veer-admin-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", "api").unwrap();
    std::fs::write(dir.join("roots.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &leaf.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    Dir(dir)
}

fn load(dir: &Dir, extra: &str) -> veer_core::config::Loaded {
    let text = format!(
        r#"[service]
name = "api"
datacenter = "dc1"
trust_domain = "{TD}"

[tls]
ca_file = "roots.pem"
cert_file = "leaf.pem"
key_file = "key.pem"

[inbound]
bind = "127.0.0.1:0"
local_app = "127.0.0.1:1"

[outbound]
bind = "127.0.0.1:0"
bind_ipv6 = ""

[timeouts]
handshake = "1s"
{extra}
"#
    );
    let p = dir.0.join("veer.toml");
    std::fs::write(&p, text).unwrap();
    veer_core::config::load(&p).unwrap()
}

fn any() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

/// A blocking HTTP/1 app that answers every request with what it saw.
struct App {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

fn http_app() -> App {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                if c.read(&mut b).unwrap_or(0) == 0 {
                    break;
                }
                head.push(b[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let line = head.lines().next().unwrap_or("").to_string();
            let host = head
                .lines()
                .find_map(|l| l.strip_prefix("host: ").or(l.strip_prefix("Host: ")))
                .unwrap_or("-")
                .to_string();
            s.lock().unwrap().push(head.clone());
            let body = format!("app saw {line} host={host}");
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-App: yes\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    App { port, seen }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn get(rt: &tokio::runtime::Runtime, addr: SocketAddr, path: &str) -> (u16, String) {
    rt.block_on(request(addr, Method::GET, path, Duration::from_secs(5)))
        .unwrap()
}

fn post(rt: &tokio::runtime::Runtime, addr: SocketAddr, path: &str) -> (u16, String) {
    rt.block_on(request(addr, Method::POST, path, Duration::from_secs(5)))
        .unwrap()
}

#[test]
fn ready_stats_config_dump_and_drain() {
    let d = certs();
    let l = load(&d, "");
    let shared = Shared::new(l.spec).unwrap();
    let lc = Lifecycle::new();
    let admin = AdminServer::start(
        AdminAddrs {
            admin: any(),
            prometheus: any(),
        },
        shared.clone(),
        lc.clone(),
    )
    .unwrap();
    let a = admin.admin.unwrap();
    let p = admin.prometheus.unwrap();
    let rt = rt();

    // Nothing bound, no snapshot yet: not ready, saying why.
    let (code, body) = get(&rt, a, "/ready");
    assert_eq!(code, 503);
    assert!(body.starts_with("PRE_INITIALIZING"), "{body}");
    assert!(body.contains("listeners not bound"), "{body}");
    assert!(body.contains("first snapshot not applied"), "{body}");
    lc.set_snapshot_applied();
    let (code, body) = get(&rt, a, "/ready");
    assert_eq!(
        (code, body.trim()),
        (503, "PRE_INITIALIZING: listeners not bound")
    );
    lc.set_listeners_bound();
    assert_eq!(get(&rt, a, "/ready"), (200, "LIVE\n".into()));
    assert_eq!(get(&rt, p, "/ready"), (200, "LIVE\n".into()));

    // Metrics, on both listeners.
    shared
        .metrics
        .opened(veer_proxy::metrics::Direction::Inbound);
    let live = shared.metrics.live(veer_proxy::metrics::Direction::Inbound);
    live.a_to_b
        .fetch_add(100, std::sync::atomic::Ordering::Relaxed);
    live.b_to_a
        .fetch_add(2000, std::sync::atomic::Ordering::Relaxed);
    shared
        .metrics
        .closed(veer_proxy::metrics::Direction::Inbound);
    shared
        .metrics
        .count("intention_denials_total", "reason", "denied_by_default");
    for (addr, path) in [
        (a, "/stats/prometheus"),
        (p, "/stats/prometheus"),
        (p, "/metrics"),
    ] {
        let (code, m) = get(&rt, addr, path);
        assert_eq!(code, 200);
        for want in [
            "veer_connections_opened_total{direction=\"inbound\"} 1\n",
            "veer_connections_active{direction=\"inbound\"} 0\n",
            "veer_received_bytes_total{direction=\"inbound\"} 100\n",
            "veer_sent_bytes_total{direction=\"inbound\"} 2000\n",
            "veer_intention_denials_total{reason=\"denied_by_default\"} 1\n",
            "veer_relayed_bytes_total{mode=\"splice\"} 0\n",
            "veer_connect_timeouts_total{direction=\"outbound\"} 0\n",
            "veer_snapshot_version 1\n",
            "veer_ready 1\n",
            "veer_draining 0\n",
            "# TYPE veer_inbound_handshake_failures_total counter\n",
        ] {
            assert!(m.contains(want), "{want:?} missing from\n{m}");
        }
        let fds: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("veer_open_fds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(fds >= 3.0, "{fds}");
        assert!(m.contains("veer_snapshot_age_seconds "));
        assert!(m.contains("veer_leaf_expiry_seconds "));
    }

    // The snapshot as JSON, without key material.
    let (code, dump) = get(&rt, a, "/config_dump");
    assert_eq!(code, 200);
    assert!(!dump.contains("PRIVATE"), "{dump}");
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(
        v["identity"],
        format!("spiffe://{TD}/ns/default/dc/dc1/svc/api")
    );
    assert_eq!(v["version"], 1);

    // The Prometheus listener is read-only.
    assert_eq!(get(&rt, p, "/config_dump").0, 404);
    assert_eq!(post(&rt, p, "/quitquitquit").0, 404);
    assert_eq!(post(&rt, p, "/drain").0, 404);
    // Mutations are POST only.
    assert_eq!(get(&rt, a, "/drain").0, 405);
    assert_eq!(get(&rt, a, "/quitquitquit").0, 405);
    assert_eq!(post(&rt, a, "/ready").0, 405);
    assert_eq!(get(&rt, a, "/nope").0, 404);
    assert!(get(&rt, a, "/").1.contains("/quitquitquit"));
    assert_eq!(lc.current(), Request::Run);

    // Drain: not ready any more, and it says so.
    assert_eq!(post(&rt, a, "/drain"), (200, "OK\n".into()));
    assert_eq!(lc.current(), Request::Drain);
    let (code, body) = get(&rt, a, "/ready");
    assert_eq!(code, 503);
    assert!(body.starts_with("DRAINING"), "{body}");
    assert!(get(&rt, a, "/stats/prometheus")
        .1
        .contains("veer_draining 1\n"));
    // Requests only escalate.
    assert_eq!(post(&rt, a, "/quitquitquit"), (200, "OK\n".into()));
    assert_eq!(lc.request(Request::Drain), Request::Quit);
    admin.stop();
    assert!(TcpStream::connect(a).is_err(), "admin closed after stop");
}

#[test]
fn expose_forwards_only_its_path_and_follows_the_snapshot() {
    let d = certs();
    let app = http_app();
    let expose = |path: &str, port: u16| {
        format!(
            "[[expose]]\nlistener = \"127.0.0.1:0\"\npath = \"{path}\"\nlocal_path_port = {port}\n"
        )
    };
    let l = load(&d, &expose("/healthz", app.port));
    let shared = Shared::new(l.spec).unwrap();
    let admin =
        AdminServer::start(AdminAddrs::default(), shared.clone(), Lifecycle::new()).unwrap();
    assert_eq!(admin.admin, None, "admin off");
    assert_eq!(admin.expose.len(), 1);
    let e = admin.expose[0];
    let rt = rt();

    let (code, body) = get(&rt, e, "/healthz?probe=1");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body,
        format!("app saw GET /healthz?probe=1 HTTP/1.1 host={e}")
    );
    assert_eq!(app.seen.lock().unwrap().len(), 1);

    // Other paths never reach the app.
    for path in ["/", "/healthz/x", "/Healthz", "/admin"] {
        assert_eq!(get(&rt, e, path).0, 404, "{path}");
    }
    assert_eq!(app.seen.lock().unwrap().len(), 1);

    // Hop-by-hop headers are not forwarded.
    let mut s = TcpStream::connect(e).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nX-Kept: 2\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("x-app: yes"), "{out}");
    let head = app
        .seen
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.contains("x-kept: 2"), "{head}");
    assert!(!head.contains("x-secret"), "{head}");

    // A new snapshot re-routes the same listener.
    let l2 = load(&d, &expose("/live", app.port));
    shared.apply(l2.spec).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while get(&rt, e, "/live").0 != 200 {
        assert!(Instant::now() < end, "expose listener not re-routed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(get(&rt, e, "/healthz").0, 404);

    // The app gone: 503, not a hang.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    shared
        .apply(load(&d, &expose("/live", dead_port)).spec)
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = get(&rt, e, "/live");
        if code == 503 {
            assert!(body.contains("upstream connect error"), "{body}");
            break;
        }
        assert!(Instant::now() < end, "still {code}");
        std::thread::sleep(Duration::from_millis(20));
    }

    // No expose paths any more: the listener closes.
    shared.apply(load(&d, "").spec).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(e).is_ok() {
        assert!(Instant::now() < end, "expose listener still open");
        std::thread::sleep(Duration::from_millis(20));
    }
    admin.stop();
}

#[test]
fn expose_bind_failure_fails_start() {
    let d = certs();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let l = load(
        &d,
        &format!(
            "[[expose]]\nlistener = \"127.0.0.1:{port}\"\npath = \"/h\"\nlocal_path_port = 1\n"
        ),
    );
    let shared = Shared::new(l.spec).unwrap();
    let err = AdminServer::start(AdminAddrs::default(), shared.clone(), Lifecycle::new())
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("expose listener"), "{err}");
    let err = AdminServer::start(
        AdminAddrs {
            admin: Some(taken.local_addr().unwrap()),
            prometheus: None,
        },
        shared,
        Lifecycle::new(),
    )
    .err()
    .expect("must fail");
    assert!(err.to_string().starts_with("admin listener"), "{err}");
}

/// The data-plane listeners plus a controller, without signals.
struct Plane {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    lc: Arc<Lifecycle>,
    listeners: Arc<Listeners>,
    _dir: Dir,
}

fn plane() -> Plane {
    let d = certs();
    let l = load(&d, "");
    let rt = rt();
    let shared = Shared::new(l.spec).unwrap();
    let listeners = Arc::new(rt.block_on(Listeners::start(shared.clone())).unwrap());
    let lc = Lifecycle::new();
    lc.set_snapshot_applied();
    lc.set_listeners_bound();
    Plane {
        rt,
        shared,
        lc,
        listeners,
        _dir: d,
    }
}

impl Plane {
    fn drive(
        &self,
        grace: Duration,
        min_wait: Duration,
    ) -> tokio::task::JoinHandle<(Exit, Duration)> {
        let (shared, lc, listeners) =
            (self.shared.clone(), self.lc.clone(), self.listeners.clone());
        self.rt.spawn(async move {
            let start = Instant::now();
            let opts = ShutdownOpts { grace, min_wait };
            let e = lc.drive(&shared, &listeners, opts, None).await.unwrap();
            (e, start.elapsed())
        })
    }
    fn wait(&self, h: tokio::task::JoinHandle<(Exit, Duration)>) -> (Exit, Duration) {
        self.rt.block_on(h).unwrap()
    }
    fn active(&self) -> u64 {
        self.shared.metrics.active()
    }
}

fn refused(addr: SocketAddr) -> bool {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
            _ if Instant::now() > end => return false,
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

#[test]
fn quit_waits_for_open_connections_inbound_refused_outbound_served() {
    let p = plane();
    // An inbound connection that stays open until its handshake times out (1 s).
    let _held = TcpStream::connect(p.listeners.inbound).unwrap();
    let end = Instant::now() + Duration::from_secs(2);
    while p.active() == 0 {
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(5));
    }
    let h = p.drive(Duration::from_secs(10), Duration::ZERO);
    p.lc.request(Request::Quit);
    assert!(refused(p.listeners.inbound), "inbound still accepting");
    // Outbound still accepts (this one has no original destination and is reset).
    let opened = p
        .shared
        .metrics
        .d(veer_proxy::metrics::Direction::Outbound)
        .opened
        .load(Ordering::Relaxed);
    let c = TcpStream::connect(p.listeners.outbound[0]);
    assert!(c.is_ok(), "outbound refused while draining: {c:?}");
    let end = Instant::now() + Duration::from_secs(2);
    while p
        .shared
        .metrics
        .d(veer_proxy::metrics::Direction::Outbound)
        .opened
        .load(Ordering::Relaxed)
        == opened
    {
        assert!(Instant::now() < end, "outbound connection not accepted");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (exit, took) = p.wait(h);
    assert_eq!(exit, Exit::Idle);
    assert!(
        took >= Duration::from_millis(500),
        "{took:?}: exited before the open connection ended"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert!(refused(p.listeners.outbound[0]), "outbound open after exit");
}

#[test]
fn grace_period_bounds_the_wait() {
    let p = plane();
    let _held = TcpStream::connect(p.listeners.inbound).unwrap();
    while p.active() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let h = p.drive(Duration::from_millis(300), Duration::ZERO);
    p.lc.request(Request::Quit);
    let (exit, took) = p.wait(h);
    assert_eq!(exit, Exit::GraceOver);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(900),
        "{took:?}"
    );
}

#[test]
fn min_wait_keeps_outbound_serving_when_idle() {
    let p = plane();
    let h = p.drive(Duration::from_secs(5), Duration::from_millis(400));
    p.lc.request(Request::Quit);
    std::thread::sleep(Duration::from_millis(150));
    assert!(TcpStream::connect(p.listeners.outbound[0]).is_ok());
    assert!(refused(p.listeners.inbound));
    let (exit, took) = p.wait(h);
    assert_eq!(exit, Exit::Idle);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[test]
fn drain_keeps_running_until_quit_and_now_exits_at_once() {
    let p = plane();
    let _held = TcpStream::connect(p.listeners.inbound).unwrap();
    let h = p.drive(Duration::from_secs(30), Duration::ZERO);
    p.lc.request(Request::Drain);
    assert!(refused(p.listeners.inbound));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!h.is_finished(), "drain must not exit");
    assert!(TcpStream::connect(p.listeners.outbound[0]).is_ok());
    let _held2 = TcpStream::connect(p.listeners.outbound[0]).unwrap();
    p.lc.request(Request::Now);
    let (exit, took) = p.wait(h);
    assert_eq!(exit, Exit::Immediate);
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn await_ready_waits_for_ready_and_times_out() {
    let d = certs();
    let shared = Shared::new(load(&d, "").spec).unwrap();
    let lc = Lifecycle::new();
    let admin = AdminServer::start(
        AdminAddrs {
            admin: any(),
            prometheus: None,
        },
        shared,
        lc.clone(),
    )
    .unwrap();
    let a = admin.admin.unwrap();
    let err = await_ready(
        a,
        None,
        Duration::from_millis(300),
        Duration::from_millis(50),
    )
    .unwrap_err();
    assert!(err.contains("503 PRE_INITIALIZING"), "{err}");
    let lc2 = lc.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        lc2.set_snapshot_applied();
        lc2.set_listeners_bound();
    });
    let took = await_ready(a, None, Duration::from_secs(5), Duration::from_millis(20)).unwrap();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    admin.stop();
    // Nobody listening: the error says so.
    let err = await_ready(
        a,
        None,
        Duration::from_millis(200),
        Duration::from_millis(50),
    )
    .unwrap_err();
    assert!(err.contains("not ready after"), "{err}");
}

/// The calls consul-dataplane makes, with its exact query strings:
/// `POST /drain_listeners?inboundonly&graceful[&skip_exit]` drains inbound
/// (and never exits by itself), `GET /config_dump?include_eds` dumps the
/// snapshot without key material.
#[test]
fn consul_dataplane_admin_calls() {
    let d = certs();
    let l = load(&d, "");
    let shared = Shared::new(l.spec).unwrap();
    let lc = Lifecycle::new();
    lc.set_snapshot_applied();
    lc.set_listeners_bound();
    let admin = AdminServer::start(
        AdminAddrs {
            admin: any(),
            prometheus: None,
        },
        shared.clone(),
        lc.clone(),
    )
    .unwrap();
    let a = admin.admin.unwrap();
    let rt = rt();
    assert_eq!(get(&rt, a, "/ready"), (200, "LIVE\n".into()));
    let (code, dump) = get(&rt, a, "/config_dump?include_eds");
    assert_eq!(code, 200);
    assert!(!dump.contains("PRIVATE"), "{dump}");
    assert!(serde_json::from_str::<serde_json::Value>(&dump).is_ok());
    assert_eq!(get(&rt, a, "/stats/prometheus").0, 200);
    assert_eq!(get(&rt, a, "/drain_listeners?inboundonly&graceful").0, 405);
    assert_eq!(
        post(&rt, a, "/drain_listeners?inboundonly&graceful&skip_exit"),
        (200, "OK\n".into())
    );
    assert_eq!(lc.current(), Request::Drain);
    assert_eq!(get(&rt, a, "/ready").0, 503);
    // A repeat (the tags' form, without skip_exit) changes nothing.
    assert_eq!(post(&rt, a, "/drain_listeners?inboundonly&graceful").0, 200);
    assert_eq!(lc.current(), Request::Drain);
    assert_eq!(post(&rt, a, "/quitquitquit"), (200, "OK\n".into()));
    assert_eq!(lc.current(), Request::Quit);
    admin.stop();
}

/// A control-plane source that reports a fixed view.
struct FixedView(veer_admin::ControlPlane);

impl veer_admin::ControlPlaneStatus for FixedView {
    fn control_plane(&self) -> veer_admin::ControlPlane {
        self.0.clone()
    }
}

/// With a control-plane source registered, `/ready`, `/config_dump` and the
/// metrics say how many upstreams it gave and how old its view is.
#[test]
fn control_plane_view_in_ready_dump_and_metrics() {
    let d = certs();
    let l = load(&d, "");
    let shared = Shared::new(l.spec).unwrap();
    let lc = Lifecycle::new();
    lc.set_control_plane(Arc::new(FixedView(veer_admin::ControlPlane {
        source: "consul",
        upstreams: 2000,
        services: Some(4003),
        view_age: Some(Duration::from_secs(42)),
        max_connections: 19,
        errors: vec![("unreachable", 3), ("closed", 0)],
    })));
    lc.set_snapshot_applied();
    lc.set_listeners_bound();
    let admin = AdminServer::start(
        AdminAddrs {
            admin: any(),
            prometheus: None,
        },
        shared.clone(),
        lc.clone(),
    )
    .unwrap();
    let a = admin.admin.unwrap();
    let rt = rt();
    assert_eq!(
        get(&rt, a, "/ready"),
        (
            200,
            "LIVE\nconsul: 2000 upstreams of 4003 services, last in sync 42s ago\n".into()
        )
    );
    let (code, body) = get(&rt, a, "/config_dump");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cp = &v["control_plane"];
    assert_eq!(cp["upstreams"], 2000);
    assert_eq!(cp["in_sync"], false);
    assert_eq!(cp["view_age_seconds"], 42.0);
    assert_eq!(cp["errors"]["unreachable"], 3);
    let (_, m) = get(&rt, a, "/stats/prometheus");
    for want in [
        "veer_control_plane_upstreams 2000\n",
        "veer_control_plane_services 4003\n",
        "veer_control_plane_view_age_seconds 42\n",
        "veer_control_plane_max_connections 19\n",
        "veer_control_plane_errors_total{source=\"consul\",kind=\"unreachable\"} 3\n",
        "# TYPE veer_control_plane_errors_total counter\n",
    ] {
        assert!(m.contains(want), "{want:?} missing from\n{m}");
    }
}
