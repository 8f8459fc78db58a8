//! Socket plumbing: binding listeners, original destinations, dialing with
//! a deadline, and the socket options every leg gets.
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use veer_core::addr::{EndpointAddr, OrigDstAddr};

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

/// Dials `addr`, giving up after `timeout`.
pub async fn dial(addr: EndpointAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr.0)).await {
        Err(_) => Err(DialError::Timeout(addr, timeout)),
        Ok(Err(e)) => Err(DialError::Io(addr, e)),
        Ok(Ok(s)) => {
            tune(&s);
            Ok(s)
        }
    }
}
