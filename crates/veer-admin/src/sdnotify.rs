//! systemd's readiness protocol (`Type=notify`), without libsystemd: one
//! datagram such as `READY=1` to the unix socket named by `NOTIFY_SOCKET`,
//! either a path (`/run/systemd/notify`) or an abstract address (`@name`).
use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`, `STATUS=...`, `STOPPING=1`; several
/// separated by newlines) to systemd. `Ok(false)` when not started by
/// systemd (`NOTIFY_SOCKET` unset or empty).
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(s) if !s.is_empty() => notify_to(&s, state).map(|_| true),
        _ => Ok(false),
    }
}

/// Like [`notify`], logging a failure instead of returning it.
pub fn notify_logged(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd ({state:?})");
    }
}

/// Sends `state` to the notification socket `socket`.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let addr = parse(socket)?;
    let sock = UnixDatagram::unbound()?;
    let n = sock.send_to_addr(state.as_bytes(), &addr)?;
    if n != state.len() {
        return Err(io::Error::other("short write to NOTIFY_SOCKET"));
    }
    Ok(())
}

fn parse(socket: &OsStr) -> io::Result<SocketAddr> {
    let b = socket.as_bytes();
    match b.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&b[1..]),
        Some(b'/') => SocketAddr::from_pathname(socket),
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("NOTIFY_SOCKET {socket:?}: only unix socket paths and @abstract names are supported"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_socket() {
        let dir = std::env::temp_dir().join(format!("veer-sdn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notify");
        let _ = std::fs::remove_file(&p);
        let rx = UnixDatagram::bind(&p).unwrap();
        notify_to(p.as_os_str(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn abstract_socket() {
        let name = format!("veer-sdn-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "READY=1").unwrap();
        let mut buf = [0u8; 16];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn unsupported_and_missing() {
        assert!(notify_to(OsStr::new("vsock:2:1234"), "READY=1").is_err());
        assert!(notify_to(OsStr::new("/nonexistent/veer/notify"), "READY=1").is_err());
    }
}
