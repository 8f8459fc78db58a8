//! Moving bytes between the two legs of a connection.
//!
//! - [`splice`]: both legs plain TCP (passthrough): `splice(2)` through a
//!   pooled pipe per direction, zero-copy; falls back to [`copy`] when the
//!   kernel refuses splice before any byte moved.
//! - [`copy`]: at least one TLS leg: one buffer per direction, allocated only
//!   while bytes flow (an idle connection holds none), 64 KiB, filled by
//!   as many reads as the socket has data for and then written at once, so
//!   that a busy stream moves four full TLS records per write and wakes
//!   the other side a quarter as often.
//!
//! Both propagate half-close (EOF on one side becomes `shutdown(SHUT_WR)` /
//! `close_notify` on the other while the other direction keeps flowing),
//! propagate resets (a reset on one side resets the other), close a
//! connection idle for `idle`, and close a half-closed one after
//! `half_close` with no traffic in the open direction.
use crate::sys::{self, Pipe};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{sleep, Instant, Sleep};

/// Copy buffer size: four full TLS records' plaintext, filled by as many
/// reads as the socket has data for, then written at once.
pub const BUF_SIZE: usize = 64 * 1024;

/// A leg of a relayed connection: a stream with a TCP socket underneath.
pub trait Leg: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

/// Either end of a copy relay: a stream that can be aborted. A [`Leg`]
/// aborts by resetting its TCP socket on close; a multiplexed stream
/// ([`crate::mux::MuxStream`]) by resetting the HTTP/2 stream.
pub trait End: AsyncRead + AsyncWrite + Unpin + Send {
    /// Makes the close abrupt (RST) instead of orderly.
    fn reset(&mut self);
}

impl<T: Leg> End for T {
    fn reset(&mut self) {
        crate::net::reset_on_close(self.tcp());
    }
}

impl Leg for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}
impl<T: Leg> Leg for Box<T> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }
}
impl Leg for crate::net::Dialed {
    fn tcp(&self) -> &TcpStream {
        crate::net::Dialed::tcp(self)
    }
}

/// Counters a relay adds to as bytes move (not only when the connection
/// ends), so that a scrape during a long transfer sees its bytes.
#[derive(Clone, Copy)]
pub struct Live<'a> {
    /// Bytes from the downstream leg (a) to the upstream leg (b).
    pub a_to_b: &'a AtomicU64,
    pub b_to_a: &'a AtomicU64,
    /// Bytes moved by userspace copy and by splice (both directions).
    pub copied: &'a AtomicU64,
    pub spliced: &'a AtomicU64,
    /// One more pair (a to b, b to a): the upstream's own counters.
    pub extra: Option<(&'a AtomicU64, &'a AtomicU64)>,
}

impl<'a> Live<'a> {
    /// With the upstream's own pair of counters.
    pub fn with(self, extra: Option<(&'a AtomicU64, &'a AtomicU64)>) -> Live<'a> {
        Live { extra, ..self }
    }
    fn ab(&self, mode: &'a AtomicU64) -> Tally<'a> {
        Tally {
            dir: self.a_to_b,
            mode,
            extra: self.extra.map(|e| e.0),
        }
    }
    fn ba(&self, mode: &'a AtomicU64) -> Tally<'a> {
        Tally {
            dir: self.b_to_a,
            mode,
            extra: self.extra.map(|e| e.1),
        }
    }
}

/// The counters one direction of a relay adds to.
#[derive(Clone, Copy)]
struct Tally<'a> {
    dir: &'a AtomicU64,
    mode: &'a AtomicU64,
    extra: Option<&'a AtomicU64>,
}

impl Tally<'_> {
    fn add(t: Option<Tally<'_>>, n: usize) {
        if let Some(t) = t {
            t.dir.fetch_add(n as u64, Relaxed);
            t.mode.fetch_add(n as u64, Relaxed);
            if let Some(e) = t.extra {
                e.fetch_add(n as u64, Relaxed);
            }
        }
    }
}

/// Timers of one relayed connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub idle: Duration,
    pub half_close: Duration,
}

/// Why a relayed connection ended. `as_str()` gives a log/metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions ended with EOF.
    Complete,
    /// The downstream side (a) reset or failed; the other side was reset.
    ResetByDownstream,
    /// The upstream side (b) reset or failed; the other side was reset.
    ResetByUpstream,
    Idle,
    HalfCloseTimeout,
    /// An intention change denies the source.
    Revoked,
}

impl CloseReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::Complete => "complete",
            CloseReason::ResetByDownstream => "reset_by_downstream",
            CloseReason::ResetByUpstream => "reset_by_upstream",
            CloseReason::Idle => "idle_timeout",
            CloseReason::HalfCloseTimeout => "half_close_timeout",
            CloseReason::Revoked => "revoked",
        }
    }
}

/// What a relay did.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Bytes from the downstream leg (a) to the upstream leg (b).
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub reason: CloseReason,
    pub spliced: bool,
}

/// Which side failed, and how.
enum Fault {
    A,
    B,
}

fn benign_eof(e: &io::Error) -> bool {
    // A TLS peer that closes TCP without close_notify: treat as EOF.
    e.kind() == io::ErrorKind::UnexpectedEof
}

/// The timer shared by both relay kinds: idle while both directions are
/// open, half-close once one is done; re-armed lazily when it fires and
/// bytes moved since it was armed.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    seen: u64,
    limits: Limits,
}

impl Timer {
    fn new(limits: Limits) -> Timer {
        Timer {
            sleep: Box::pin(sleep(limits.idle)),
            seen: 0,
            limits,
        }
    }
    /// `Ready(reason)` when the connection should close now.
    fn poll(&mut self, cx: &mut Context<'_>, moved: u64, half_closed: bool) -> Poll<CloseReason> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if moved == self.seen {
                return Poll::Ready(if half_closed {
                    CloseReason::HalfCloseTimeout
                } else {
                    CloseReason::Idle
                });
            }
            self.seen = moved;
            let d = if half_closed {
                self.limits.half_close
            } else {
                self.limits.idle
            };
            self.sleep.as_mut().reset(Instant::now() + d);
        }
    }
    /// Shortens the timer when the connection becomes half-closed.
    fn half_closed(&mut self, moved: u64) {
        self.seen = moved;
        let at = Instant::now() + self.limits.half_close;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }
}

/// One direction of a copy relay. `buf` holds `buf[pos..]` still to write;
/// it is read into through its spare capacity (never zero-filled) and has
/// no allocation while the direction is idle.
struct Half {
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
    bytes: u64,
}

/// Which side of a direction failed (the error itself only decides the
/// close reason).
enum HalfErr {
    Read,
    Write,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: Vec::new(),
            pos: 0,
            eof: false,
            done: false,
            need_flush: false,
            bytes: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        live: Option<Tally<'_>>,
    ) -> Poll<Result<(), HalfErr>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.pos < self.buf.len() {
                match Pin::new(&mut *w).poll_write(cx, &self.buf[self.pos..]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(HalfErr::Write)),
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(HalfErr::Write)),
                    Poll::Ready(Ok(n)) => {
                        self.pos += n;
                        self.bytes += n as u64;
                        self.need_flush = true;
                        Tally::add(live, n);
                    }
                }
            }
            self.buf.clear();
            self.pos = 0;
            if self.eof {
                if self.need_flush {
                    ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|_| HalfErr::Write)?;
                    self.need_flush = false;
                }
                match ready!(Pin::new(&mut *w).poll_shutdown(cx)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(_) => return Poll::Ready(Err(HalfErr::Write)),
                }
                self.done = true;
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() == 0 {
                self.buf = Vec::with_capacity(BUF_SIZE);
            }
            // Read until the socket would block or the buffer is full, then
            // write it all at once: fewer, larger writes wake the other side
            // less often.
            while self.buf.len() < self.buf.capacity() {
                let before = self.buf.len();
                match std::pin::pin!(r.read_buf(&mut self.buf)).poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) if benign_eof(&e) => {
                        self.eof = true;
                        break;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(HalfErr::Read)),
                    Poll::Ready(Ok(_)) => {
                        if self.buf.len() == before {
                            self.eof = true;
                            break;
                        }
                    }
                }
            }
            if !self.buf.is_empty() || self.eof {
                continue;
            }
            // The reader is pending with nothing read.
            if self.need_flush {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(HalfErr::Write)),
                    Poll::Ready(Ok(())) => self.need_flush = false,
                    Poll::Pending => {}
                }
            }
            // Nothing buffered: an idle direction holds no memory.
            self.buf = Vec::new();
            return Poll::Pending;
        }
    }
}

async fn revoked(n: Option<Arc<Notify>>) {
    match n {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

fn finish<A: End, B: End>(a: &mut A, b: &mut B, fault: Option<Fault>) -> CloseReason {
    match fault {
        None => CloseReason::Complete,
        Some(Fault::A) => {
            b.reset();
            a.reset();
            CloseReason::ResetByDownstream
        }
        Some(Fault::B) => {
            a.reset();
            b.reset();
            CloseReason::ResetByUpstream
        }
    }
}

/// Relays between `a` (downstream) and `b` (upstream) with userspace buffers.
pub async fn copy<A: End, B: End>(
    mut a: A,
    mut b: B,
    limits: Limits,
    revoke: Option<Arc<Notify>>,
    live: Option<Live<'_>>,
) -> Outcome {
    let mut ab = Half::new();
    let mut ba = Half::new();
    let mut timer = Timer::new(limits);
    let mut was_half = false;
    let revoke = revoked(revoke);
    tokio::pin!(revoke);
    let end = std::future::poll_fn(|cx| {
        if revoke.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(CloseReason::Revoked));
        }
        if !ab.done {
            match ab.poll_copy(cx, &mut a, &mut b, live.map(|l| l.ab(l.copied))) {
                Poll::Ready(Err(HalfErr::Read)) => return Poll::Ready(Ok(Some(Fault::A))),
                Poll::Ready(Err(HalfErr::Write)) => return Poll::Ready(Ok(Some(Fault::B))),
                _ => {}
            }
        }
        if !ba.done {
            match ba.poll_copy(cx, &mut b, &mut a, live.map(|l| l.ba(l.copied))) {
                Poll::Ready(Err(HalfErr::Read)) => return Poll::Ready(Ok(Some(Fault::B))),
                Poll::Ready(Err(HalfErr::Write)) => return Poll::Ready(Ok(Some(Fault::A))),
                _ => {}
            }
        }
        if ab.done && ba.done {
            return Poll::Ready(Ok(None));
        }
        let moved = ab.bytes + ba.bytes;
        let half = ab.done || ba.done;
        if half && !was_half {
            was_half = true;
            timer.half_closed(moved);
        }
        timer.poll(cx, moved, half).map(Err)
    })
    .await;
    let reason = match end {
        Ok(fault) => finish(&mut a, &mut b, fault),
        Err(r) => {
            if r != CloseReason::Idle {
                // Timeouts and revocations end abruptly: reset both sides.
                a.reset();
                b.reset();
            }
            r
        }
    };
    Outcome {
        a_to_b: ab.bytes,
        b_to_a: ba.bytes,
        reason,
        spliced: false,
    }
}

/// One direction of a splice relay. `Err(Fault)` names the failing side:
/// `true` for the reading side.
async fn splice_half(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    started: &AtomicU64,
    live: Option<Tally<'_>>,
) -> Result<(), (bool, io::Error)> {
    loop {
        // Wait for data before taking a pipe: idle directions hold none.
        src.readable().await.map_err(|e| (true, e))?;
        let pipe = Pipe::take().map_err(|e| (true, e))?;
        let n = loop {
            match src.try_io(Interest::READABLE, || {
                sys::splice(src.as_raw_fd(), pipe.write.as_raw_fd(), pipe.capacity)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(|e| (true, e))?;
                }
                Err(e) => {
                    // The pipe is still empty here.
                    pipe.give_back();
                    return Err((true, e));
                }
            }
        };
        if n == 0 {
            pipe.give_back();
            return match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                Err(e) => Err((false, e)),
            };
        }
        started.store(1, Relaxed);
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                sys::splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(m) => {
                    left -= m;
                    moved.fetch_add(m as u64, Relaxed);
                    Tally::add(live, m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(|e| (false, e))?;
                }
                // The pipe still holds bytes: drop it rather than pool it.
                Err(e) => return Err((false, e)),
            }
        }
        pipe.give_back();
    }
}

/// Is this splice error "the kernel cannot splice these fds", or "no fd
/// left for a pipe" (fall back to copying, which needs no fds)?
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL)
            | Some(libc::ENOSYS)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::EMFILE)
            | Some(libc::ENFILE)
    )
}

/// Relays two plain TCP legs with `splice(2)`; falls back to [`copy`] when
/// splice is refused (or no pipe can be made) before any byte moved, or
/// when `VEER_DISABLE_SPLICE` is set.
pub async fn splice<B: Leg>(
    mut a: TcpStream,
    mut b: B,
    limits: Limits,
    revoke: Option<Arc<Notify>>,
    live: Option<Live<'_>>,
) -> Outcome {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *DISABLED.get_or_init(|| std::env::var_os("VEER_DISABLE_SPLICE").is_some()) {
        return copy(a, b, limits, revoke, live).await;
    }
    let ab = AtomicU64::new(0);
    let ba = AtomicU64::new(0);
    let started = AtomicU64::new(0);
    let mut timer = Timer::new(limits);
    let mut done_ab = false;
    let mut done_ba = false;
    let mut was_half = false;
    enum End {
        Done,
        Fault(Fault),
        Fallback,
        Timer(CloseReason),
    }
    let end = {
        let f_ab = splice_half(&a, b.tcp(), &ab, &started, live.map(|l| l.ab(l.spliced)));
        let f_ba = splice_half(b.tcp(), &a, &ba, &started, live.map(|l| l.ba(l.spliced)));
        let rv = revoked(revoke.clone());
        tokio::pin!(f_ab, f_ba, rv);
        std::future::poll_fn(|cx| {
            if rv.as_mut().poll(cx).is_ready() {
                return Poll::Ready(End::Timer(CloseReason::Revoked));
            }
            // Polls one direction unless it already finished (never poll a done future).
            macro_rules! direction {
                ($done:ident, $fut:ident, $a_reads:expr) => {
                    if !$done {
                        match $fut.as_mut().poll(cx) {
                            Poll::Pending => {}
                            Poll::Ready(Ok(())) => $done = true,
                            Poll::Ready(Err((_, e)))
                                if unsupported(&e) && started.load(Relaxed) == 0 =>
                            {
                                return Poll::Ready(End::Fallback)
                            }
                            Poll::Ready(Err((reader, _))) => {
                                // The failing side: the reader of this direction, or its writer.
                                let a_failed = reader == $a_reads;
                                return Poll::Ready(End::Fault(if a_failed {
                                    Fault::A
                                } else {
                                    Fault::B
                                }));
                            }
                        }
                    }
                };
            }
            direction!(done_ab, f_ab, true);
            direction!(done_ba, f_ba, false);
            if done_ab && done_ba {
                return Poll::Ready(End::Done);
            }
            let moved = ab.load(Relaxed) + ba.load(Relaxed);
            let half = done_ab || done_ba;
            if half && !was_half {
                was_half = true;
                timer.half_closed(moved);
            }
            timer.poll(cx, moved, half).map(End::Timer)
        })
        .await
    };
    let (a_to_b, b_to_a) = (ab.load(Relaxed), ba.load(Relaxed));
    let reason = match end {
        End::Fallback => {
            tracing::debug!("splice refused by the kernel; relaying with copies");
            return copy(a, b, limits, revoke, live).await;
        }
        End::Done => CloseReason::Complete,
        End::Fault(f) => finish(&mut a, &mut b, Some(f)),
        End::Timer(r) => {
            if r != CloseReason::Idle {
                crate::net::reset_on_close(&a);
                crate::net::reset_on_close(b.tcp());
            }
            r
        }
    };
    Outcome {
        a_to_b,
        b_to_a,
        reason,
        spliced: true,
    }
}

#[cfg(test)]
mod tests;
