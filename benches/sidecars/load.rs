//! HTTP/1.1 load generation from inside the client namespace.
//!
//! - [`max_rate`]: closed loop, like `wrk -t1 -cN`: N keep-alive
//!   connections on one thread, each sending the next request as soon as
//!   the previous answer is complete.
//! - [`fixed_rate`]: open loop, like `wrk2 -R`: each of N connections has
//!   its own schedule (rate / N per second, staggered); a request's latency
//!   is measured from when it was *due*, not when it was sent, so a stall
//!   counts for every request it delays (no coordinated omission). One
//!   blocking thread per connection with 1 ns timer slack keeps send times
//!   within a few µs of schedule.
//! - [`new_conns`]: closed loop of N workers, each request on a new
//!   connection with `Connection: close` (the app closes first).
//! - [`hold_idle`]: opens connections, makes one request on each and keeps
//!   them open.
use crate::app::head_end;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer_testsupport::netns::Netns;

const REQ: &[u8] = b"GET / HTTP/1.1\r\nHost: api\r\nUser-Agent: veer-bench\r\n\r\n";
const REQ_CLOSE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: api\r\nUser-Agent: veer-bench\r\nConnection: close\r\n\r\n";

fn content_length(head: &[u8]) -> usize {
    let text = String::from_utf8_lossy(head);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// If `buf` starts with a complete response, its length; errors on a non-200.
fn complete(buf: &[u8]) -> io::Result<Option<usize>> {
    let Some(end) = head_end(buf) else {
        return Ok(None);
    };
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(io::Error::other("non-200 answer"));
    }
    let total = end + content_length(&buf[..end]);
    Ok((buf.len() >= total).then_some(total))
}

async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    loop {
        if let Some(n) = complete(buf)? {
            buf.drain(..n);
            return Ok(());
        }
        buf.reserve(4096);
        if s.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn read_response_blocking(s: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(n) = complete(buf)? {
            buf.drain(..n);
            return Ok(());
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A completed-operations count over a measured window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    pub per_sec: f64,
    pub done: u64,
    pub errors: u64,
}

/// Runs `workers` copies of `op` (a loop that bumps `done` per completed
/// operation and `errors` per failure) for `warmup + dur`; counts the
/// window. `mark(true)` / `mark(false)` run on the caller's thread when the
/// measured window starts and ends (CPU sampling, perf).
fn closed_loop<F, Fut>(
    ns: &Netns,
    workers: usize,
    warmup: Duration,
    dur: Duration,
    mark: &mut dyn FnMut(bool),
    op: F,
) -> Rate
where
    F: Fn(Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicBool>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let h = ns.spawn(move || {
        let rt = runtime();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let done = Arc::new(AtomicU64::new(0));
            let errors = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            for _ in 0..workers {
                tokio::task::spawn_local(op(done.clone(), errors.clone(), stop.clone()));
            }
            tokio::time::sleep(warmup).await;
            let (d0, e0, t0) = (done.load(Relaxed), errors.load(Relaxed), Instant::now());
            let _ = tx.send(());
            tokio::time::sleep(dur).await;
            let (d1, e1, secs) = (
                done.load(Relaxed),
                errors.load(Relaxed),
                t0.elapsed().as_secs_f64(),
            );
            let _ = tx.send(());
            stop.store(true, Relaxed);
            Rate {
                per_sec: (d1 - d0) as f64 / secs,
                done: d1 - d0,
                errors: e1 - e0,
            }
        })
    });
    if rx.recv().is_ok() {
        mark(true);
        if rx.recv().is_ok() {
            mark(false);
        }
    }
    h.join().expect("load thread")
}

/// Closed-loop keep-alive requests on `conns` connections.
pub fn max_rate(
    ns: &Netns,
    dst: SocketAddr,
    conns: usize,
    warmup: Duration,
    dur: Duration,
    mark: &mut dyn FnMut(bool),
) -> Rate {
    closed_loop(
        ns,
        conns,
        warmup,
        dur,
        mark,
        move |done, errors, stop| async move {
            let mut buf = Vec::with_capacity(4096);
            while !stop.load(Relaxed) {
                let Ok(mut s) = TcpStream::connect(dst).await else {
                    errors.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                buf.clear();
                while !stop.load(Relaxed) {
                    let r = async {
                        s.write_all(REQ).await?;
                        read_response(&mut s, &mut buf).await
                    };
                    if r.await.is_err() {
                        errors.fetch_add(1, Relaxed);
                        break;
                    }
                    done.fetch_add(1, Relaxed);
                }
            }
        },
    )
}

/// One request per new connection, `workers` at a time.
pub fn new_conns(
    ns: &Netns,
    dst: SocketAddr,
    workers: usize,
    warmup: Duration,
    dur: Duration,
    mark: &mut dyn FnMut(bool),
) -> Rate {
    closed_loop(
        ns,
        workers,
        warmup,
        dur,
        mark,
        move |done, errors, stop| async move {
            let mut buf = Vec::with_capacity(4096);
            while !stop.load(Relaxed) {
                buf.clear();
                let one = async {
                    let mut s = TcpStream::connect(dst).await?;
                    s.set_nodelay(true)?;
                    s.write_all(REQ_CLOSE).await?;
                    s.read_to_end(&mut buf).await?;
                    match complete(&buf)? {
                        Some(_) => Ok::<_, io::Error>(()),
                        None => Err(io::ErrorKind::UnexpectedEof.into()),
                    }
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => {
                        done.fetch_add(1, Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
        },
    )
}

/// Latencies of a fixed-rate run.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    pub offered: f64,
    pub achieved: f64,
    pub samples: usize,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e6
}

fn set_timer_slack_1ns() {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Open-loop keep-alive requests at `rate` per second over `conns` connections.
pub fn fixed_rate(
    ns: &Netns,
    dst: SocketAddr,
    conns: usize,
    rate: f64,
    warmup: Duration,
    dur: Duration,
    mark: &mut dyn FnMut(bool),
) -> Latency {
    let ready = Arc::new(Barrier::new(conns + 1));
    let go = Arc::new(Barrier::new(conns + 1));
    let t0: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let errors = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let (ready, go, t0, errors) = (ready.clone(), go.clone(), t0.clone(), errors.clone());
            ns.spawn(move || {
                set_timer_slack_1ns();
                let connect = || {
                    let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    Ok::<_, io::Error>(s)
                };
                let mut s = connect().ok();
                ready.wait();
                go.wait();
                let t0 = *t0.get().unwrap();
                let start = t0 + interval.mul_f64(c as f64 / conns as f64);
                let measure_from = t0 + warmup;
                let end = t0 + warmup + dur;
                let mut lat =
                    Vec::with_capacity((dur.as_secs_f64() / interval.as_secs_f64()) as usize + 16);
                let mut buf = Vec::with_capacity(4096);
                // A stalled sidecar cannot stretch the step: give up 5 s
                // after the scheduled end whatever is left.
                let give_up = end + Duration::from_secs(5);
                for k in 0u32.. {
                    let due = start + interval * k;
                    if due >= end || Instant::now() >= give_up {
                        break;
                    }
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    let ok = match s.as_mut() {
                        Some(st) => st
                            .write_all(REQ)
                            .and_then(|_| read_response_blocking(st, &mut buf))
                            .is_ok(),
                        None => false,
                    };
                    let took = due.elapsed();
                    if !ok {
                        errors.fetch_add(1, Relaxed);
                        buf.clear();
                        s = connect().ok();
                        continue;
                    }
                    if due >= measure_from {
                        lat.push(took.as_nanos() as u64);
                    }
                }
                lat
            })
        })
        .collect();
    ready.wait();
    let start = Instant::now() + Duration::from_millis(5);
    t0.set(start).unwrap();
    go.wait();
    std::thread::sleep((start + warmup).saturating_duration_since(Instant::now()));
    mark(true);
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("load thread"))
        .collect();
    mark(false);
    all.sort_unstable();
    Latency {
        offered: rate,
        achieved: all.len() as f64 / dur.as_secs_f64(),
        samples: all.len(),
        errors: errors.load(Relaxed),
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        p999_ms: percentile(&all, 0.999),
        max_ms: all.last().map_or(f64::NAN, |v| *v as f64 / 1e6),
    }
}

/// One keep-alive connection, one request in flight (closed loop, like
/// `wrk -t1 -c1`): each request is sent as soon as the previous answer is
/// complete, and its round trip is a sample.
pub fn one_conn(
    ns: &Netns,
    dst: SocketAddr,
    warmup: Duration,
    dur: Duration,
    mark: &mut dyn FnMut(bool),
) -> Latency {
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    let errors = Arc::new(AtomicU64::new(0));
    let errs = errors.clone();
    let t = ns.spawn(move || {
        let connect = || {
            let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok::<_, io::Error>(s)
        };
        let mut s = connect().ok();
        let mut buf = Vec::with_capacity(4096);
        let mut lat = Vec::with_capacity(1 << 16);
        let t0 = Instant::now();
        let (measure_from, end) = (t0 + warmup, t0 + warmup + dur);
        let mut marked = false;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if !marked && now >= measure_from {
                marked = true;
                let _ = tx.send(true);
            }
            let ok = match s.as_mut() {
                Some(st) => st
                    .write_all(REQ)
                    .and_then(|_| read_response_blocking(st, &mut buf))
                    .is_ok(),
                None => false,
            };
            if !ok {
                errs.fetch_add(1, Relaxed);
                buf.clear();
                s = connect().ok();
                continue;
            }
            if marked {
                lat.push(now.elapsed().as_nanos() as u64);
            }
        }
        let _ = tx.send(false);
        lat
    });
    for start in rx.iter().take(2) {
        mark(start);
    }
    let mut all = t.join().expect("load thread");
    all.sort_unstable();
    Latency {
        offered: f64::NAN,
        achieved: all.len() as f64 / dur.as_secs_f64(),
        samples: all.len(),
        errors: errors.load(Relaxed),
        p50_ms: percentile(&all, 0.50),
        p99_ms: percentile(&all, 0.99),
        p999_ms: percentile(&all, 0.999),
        max_ms: all.last().map_or(f64::NAN, |v| *v as f64 / 1e6),
    }
}

/// Opens `n` connections (`par` at a time), one request on each, and
/// returns them open. Gives up after `limit`.
pub fn hold_idle(
    ns: &Netns,
    dst: SocketAddr,
    n: usize,
    par: usize,
    limit: Duration,
) -> (Vec<std::net::TcpStream>, u64) {
    ns.run(move || {
        let rt = runtime();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let held = Arc::new(Mutex::new(Vec::with_capacity(n)));
            let errors = Arc::new(AtomicU64::new(0));
            let next = Arc::new(AtomicU64::new(0));
            let mut tasks = Vec::new();
            for _ in 0..par {
                let (held, errors, next) = (held.clone(), errors.clone(), next.clone());
                tasks.push(tokio::task::spawn_local(async move {
                    let mut buf = Vec::with_capacity(512);
                    while next.fetch_add(1, Relaxed) < n as u64 {
                        buf.clear();
                        let one = async {
                            let mut s = TcpStream::connect(dst).await?;
                            s.write_all(REQ).await?;
                            read_response(&mut s, &mut buf).await?;
                            s.into_std()
                        };
                        match tokio::time::timeout(Duration::from_secs(10), one).await {
                            Ok(Ok(s)) => held.lock().unwrap().push(s),
                            _ => {
                                errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                }));
            }
            let _ = tokio::time::timeout(limit, async {
                for t in tasks {
                    let _ = t.await;
                }
            })
            .await;
            let v = std::mem::take(&mut *held.lock().unwrap());
            (v, errors.load(Relaxed))
        })
    })
}
