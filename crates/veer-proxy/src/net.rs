//! Socket plumbing: binding listeners, original destinations, dialing with
//! a deadline, and the socket options every leg gets.
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use veer_core::addr::{canonical, ClientAddr, EndpointAddr, OrigDstAddr};

/// Binds a listener with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(false).ok();
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    TcpListener::from_std(s.into())
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

/// veer's own open dials, as (local address, remote address). A connection
/// accepted on the transparent outbound listener whose peer and original
/// destination are one of them is veer's own traffic redirected back to
/// itself (the proxy UID is not excluded from redirection): relaying it
/// would dial again and loop until the process ran out of descriptors.
///
/// Both ends are needed: the kernel gives the same local port to
/// connections with different destinations, so an app's connection can
/// share its source address with one of veer's dials; it can never share
/// the whole 4-tuple.
///
/// A dial is registered between `connect(2)` and its completion, before
/// veer can see the redirected connection in most cases; when the accept
/// side wins that race, the loop is still cut one hop later.
#[derive(Default)]
pub struct OwnDials(Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>);

impl OwnDials {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(SocketAddr, SocketAddr)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a connection from `peer` to `orig` is one of veer's own dials.
    pub fn contains(&self, peer: ClientAddr, orig: OrigDstAddr) -> bool {
        self.lock().contains(&(peer.0, orig.0))
    }

    /// Keeps `local` → `remote` registered while the returned guard lives.
    pub fn register(&self, local: SocketAddr, remote: SocketAddr) -> OwnDial {
        let key = (canonical(local), canonical(remote));
        self.lock().insert(key);
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
    set: Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>,
    key: (SocketAddr, SocketAddr),
}

impl Drop for OwnDial {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Dials `addr`, giving up after `timeout`; the connection stays registered
/// in `own` while the returned [`OwnDial`] lives.
pub async fn dial(
    addr: EndpointAddr,
    timeout: Duration,
    own: &OwnDials,
) -> Result<(TcpStream, OwnDial), DialError> {
    match tokio::time::timeout(timeout, connect(addr.0, own)).await {
        Err(_) => Err(DialError::Timeout(addr, timeout)),
        Ok(Err(e)) => Err(DialError::Io(addr, e)),
        Ok(Ok((s, reg))) => {
            tune(&s);
            Ok((s, reg))
        }
    }
}

/// A non-blocking connect whose local address is registered as soon as the
/// kernel has chosen it (when `connect(2)` returns), before the handshake
/// completes.
async fn connect(addr: SocketAddr, own: &OwnDials) -> io::Result<(TcpStream, OwnDial)> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let local = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("local address is not an IP address"))?;
    let reg = own.register(local, addr);
    let s = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    s.writable().await?;
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    Ok((s, reg))
}

#[cfg(test)]
mod tests;
