//! Socket plumbing: binding listeners, original destinations, dialing with
//! a deadline, and the socket options every leg gets.
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use veer_core::addr::{canonical, ClientAddr, EndpointAddr, OrigDstAddr};

/// A listener that cannot bind, with what it is for and where: the payload
/// of the `io::Error` start-up returns ([`BindError::wrap`]), so that the
/// caller can name the address's source (a TOML key, a flag) through
/// [`BindError::of`].
#[derive(Debug)]
pub struct BindError {
    /// What the listener is for: `inbound listener`, `upstream "db"
    /// local_bind`, `admin listener`, `expose listener`.
    pub what: String,
    pub addr: SocketAddr,
    pub error: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.what, self.addr, self.error)
    }
}

impl std::error::Error for BindError {}

impl BindError {
    /// `error` (binding `addr`) as an `io::Error` of the same kind that
    /// reads `<what> <addr>: <error>` and carries the [`BindError`].
    pub fn wrap(error: io::Error, what: impl Into<String>, addr: SocketAddr) -> io::Error {
        io::Error::new(
            error.kind(),
            BindError {
                what: what.into(),
                addr,
                error,
            },
        )
    }

    /// The [`BindError`] inside `e`, if it is one.
    pub fn of(e: &io::Error) -> Option<&BindError> {
        e.get_ref()?.downcast_ref::<BindError>()
    }
}

/// Binds a listener with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr)?)
}

/// Like [`bind`], without a runtime: a non-blocking std listener, for
/// binding ahead of a snapshot swap ([`crate::state::Shared::apply`]).
pub fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

/// Keepalive, `TCP_USER_TIMEOUT` and no Nagle, on every leg: dead peers are
/// found in about a minute even when a connection is idle or half-closed.
pub fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let sock = SockRef::from(s);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(60)));
}

/// Makes the next close of this socket send RST instead of FIN.
pub fn reset_on_close(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// The destination the client dialled before iptables `REDIRECT`.
///
/// The socket option's family follows the family of the *connection*: an
/// IPv4 client accepted on a dual-stack `[::]` socket (peer `::ffff:a.b.c.d`)
/// must be asked with `SO_ORIGINAL_DST`, not the IPv6 option.
pub fn orig_dst(s: &TcpStream) -> io::Result<OrigDstAddr> {
    let sock = SockRef::from(s);
    let peer = s.peer_addr()?;
    let v4 = match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .map(OrigDstAddr::from)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// Why a dial failed; `classify()` gives a metric label.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect to {0} timed out after {1:?}")]
    Timeout(EndpointAddr, Duration),
    #[error("connect to {0}: {1}")]
    Io(EndpointAddr, io::Error),
}

impl DialError {
    pub fn classify(&self) -> &'static str {
        match self {
            DialError::Timeout(..) => "timeout",
            DialError::Io(_, e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => "refused",
                io::ErrorKind::ConnectionReset => "reset",
                _ if e.raw_os_error() == Some(libc::EHOSTUNREACH) => "unreachable",
                _ if e.raw_os_error() == Some(libc::ENETUNREACH) => "unreachable",
                _ if e.raw_os_error() == Some(libc::EMFILE) => "fd_limit",
                _ => "other",
            },
        }
    }
}

/// veer's own open dials, as (local address, remote address) → hops. A
/// connection accepted on the transparent outbound listener whose peer and
/// original destination are one of them is veer's own traffic redirected
/// back to itself. That happens for two reasons:
///
/// - the kernel reused a NAT entry: an app's earlier connection with the
///   same 4-tuple was redirected, its conntrack entry is still there (after
///   a reset or in TIME_WAIT) and a new SYN with the same addresses takes
///   its mapping, whoever sends it. Relaying the connection once more, to
///   its original destination, from a new source port, gets it through;
/// - the proxy UID is not excluded from redirection: then that dial comes
///   back too, and relaying again would loop until the process ran out of
///   descriptors.
///
/// Each dial records how many times the traffic it carries has already
/// come back (its hops); one that comes back with [`MAX_TURNS`] hops is
/// refused. The kernel case needs a stale NAT entry on every turn, which a
/// busy host does see twice in a row (the soak test did, 12 times in
/// 100,000 connections, with a limit of one turn); eight in a row it does
/// not, while a real loop is still cut after eight cheap turns.
///
/// Both ends are needed: the kernel gives the same local port to
/// connections with different destinations, so an app's connection can
/// share its source address with one of veer's dials, never the whole
/// 4-tuple while veer's is open.
/// How many times veer relays its own traffic back to its destination
/// before it calls it a loop (see [`OwnDials`]).
pub const MAX_TURNS: u8 = 8;

#[derive(Default, Clone)]
pub struct OwnDials(Arc<Mutex<HashMap<(SocketAddr, SocketAddr), u8>>>);

impl OwnDials {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SocketAddr), u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If a connection from `peer` to `orig` is one of veer's own dials:
    /// how many times its traffic had already come back.
    pub fn hops(&self, peer: ClientAddr, orig: OrigDstAddr) -> Option<u8> {
        self.lock().get(&(peer.0, orig.0)).copied()
    }

    /// Keeps `local` → `remote` registered while the returned guard lives.
    pub fn register(&self, local: SocketAddr, remote: SocketAddr, hops: u8) -> OwnDial {
        let key = (canonical(local), canonical(remote));
        self.lock().insert(key, hops);
        OwnDial {
            set: self.0.clone(),
            key,
        }
    }

    /// How many dials are registered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Keeps one dial in [`OwnDials`] while it lives.
pub struct OwnDial {
    set: Arc<Mutex<HashMap<(SocketAddr, SocketAddr), u8>>>,
    key: (SocketAddr, SocketAddr),
}

impl Drop for OwnDial {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.key);
        // Give memory back after a burst: the set follows the open dials.
        if set.capacity() > 64 && set.len() < set.capacity() / 4 {
            let keep = set.len() * 2;
            set.shrink_to(keep);
        }
    }
}

/// A connection veer dialed, registered in [`OwnDials`] for exactly as long
/// as its socket is open: the registration (the first field) is dropped
/// before the socket closes, so a later connection that reuses the freed
/// 4-tuple (after a reset, there is no TIME_WAIT) is never taken for veer's.
pub struct Dialed {
    _own: OwnDial,
    tcp: TcpStream,
}

impl Dialed {
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl AsyncRead for Dialed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dialed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Dials `addr`, giving up after `timeout`; the connection is registered in
/// `own` (with `hops`, see [`OwnDials`]) while it is open.
pub async fn dial(
    addr: EndpointAddr,
    timeout: Duration,
    own: &OwnDials,
    hops: u8,
) -> Result<Dialed, DialError> {
    match tokio::time::timeout(timeout, connect(addr.0, own, hops)).await {
        Err(_) => Err(DialError::Timeout(addr, timeout)),
        Ok(Err(e)) => Err(DialError::Io(addr, e)),
        Ok(Ok(d)) => {
            tune(&d.tcp);
            Ok(d)
        }
    }
}

/// A non-blocking connect whose 4-tuple is registered as soon as the kernel
/// has chosen the local address (when `connect(2)` returns), before the
/// handshake completes.
async fn connect(addr: SocketAddr, own: &OwnDials, hops: u8) -> io::Result<Dialed> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("local address is not an IP address"))?;
    // Registered now; from here on a failure, a timeout or a cancel drops
    // the `Dialed`, which ends the registration before closing the socket.
    let d = Dialed {
        _own: own.register(local, addr, hops),
        tcp: TcpStream::from_std(std::net::TcpStream::from(sock))?,
    };
    d.tcp.writable().await?;
    if let Some(e) = d.tcp.take_error()? {
        return Err(e);
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
