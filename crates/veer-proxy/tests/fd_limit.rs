//! Out of file descriptors, in process (alone in this test binary, because
//! it lowers the process's own limit): the inbound listener sheds pending
//! connections at once, does not spin, counts them, and serves again when
//! descriptors free up.
mod common;
use common::*;
use socket2::{Domain, Socket, Type};
use std::io::Read;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn nofile() -> libc::rlimit {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    l
}

fn set_soft_nofile(soft: libc::rlim_t) {
    let mut l = nofile();
    l.rlim_cur = soft;
    // SAFETY: setrlimit reads the struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Whether the peer closed the connection (reset or EOF) within `within`.
fn closed_within(s: &Socket, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 16];
    let mut r: &Socket = s;
    match r.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_fds_sheds_without_spinning_and_recovers() {
    let m = Material::new();
    let app = echo_app().await;
    let (shared, l) = m.start(app, "[timeouts]\nhandshake = \"60s\"\n").await;
    let addr: socket2::SockAddr = l.inbound.into();
    let before = nofile();
    // The client sockets are made while descriptors are plentiful; connect
    // needs none, so they can be used once the limit is lowered.
    let mut socks: Vec<Socket> = (0..60)
        .map(|_| Socket::new(Domain::IPV4, Type::STREAM, None).unwrap())
        .collect();
    let open = veer_proxy::sys::open_fds() as libc::rlim_t;
    const ROOM: libc::rlim_t = 6;
    set_soft_nofile(open + ROOM);

    let addr2 = addr.clone();
    let (socks_back, shed, held) = tokio::task::spawn_blocking(move || {
        for s in &socks[..40] {
            s.connect(&addr2).unwrap();
        }
        // A peer is shed at once (reset) or held (waiting in the handshake).
        let (mut shed, mut held) = (0, 0);
        for s in &socks[..40] {
            if closed_within(s, Duration::from_millis(300)) {
                shed += 1;
            } else {
                held += 1;
            }
        }
        (socks, shed, held)
    })
    .await
    .unwrap();
    socks = socks_back;
    // (Give or take the descriptor `open_fds` itself used.)
    assert!(
        held <= ROOM as usize + 2,
        "{held} held with {ROOM} fds free"
    );
    assert!(shed + ROOM as usize + 2 >= 40, "only {shed} shed");
    let opened = || {
        shared
            .metrics
            .d(veer_proxy::metrics::Direction::Inbound)
            .opened
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let counted = shared.metrics.get("connections_shed_total", "inbound");
    assert_eq!(counted, shed as u64, "every shed connection is counted");
    assert_eq!(opened(), held as u64);
    assert!(
        shared
            .metrics
            .accept_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= counted
    );

    // At the limit, with peers trickling in, veer must not spin.
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let addr3 = addr.clone();
    let socks_back = tokio::task::spawn_blocking(move || {
        for s in &socks[40..] {
            s.connect(&addr3).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        socks
    })
    .await
    .unwrap();
    socks = socks_back;
    let wall = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    eprintln!("at the fd limit: {cpu:?} CPU in {wall:?}");
    assert!(
        cpu < wall / 4,
        "{cpu:?} of CPU in {wall:?} at the fd limit: spinning?"
    );
    assert!(
        eventually(5, || shared
            .metrics
            .get("connections_shed_total", "inbound")
            + opened()
            == 60)
        .await
    );
    assert!(opened() <= ROOM + 2);

    // Descriptors free up: the held peers leave and the limit is restored.
    drop(socks);
    set_soft_nofile(before.rlim_cur);
    assert!(eventually(5, || shared.metrics.active() == 0).await);
    let tcp = TcpStream::connect(l.inbound).await.unwrap();
    let mut tls = m.web_connector().connect(server_name(), tcp).await.unwrap();
    tls.write_all(b"back").await.unwrap();
    let mut got = [0u8; 4];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"back", "served again once fds are free");
    l.stop_all();
}
