//! Helpers shared by this crate's integration tests.
#![allow(dead_code)]

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use veer_testsupport::netns::Netns;

/// What one in-process `veer redirect-traffic` run did.
pub struct Outcome {
    pub code: i32,
    pub out: String,
    pub err: String,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.out, self.err
        )
    }
}

/// Runs `veer redirect-traffic ARGS` in-process with exactly the environment
/// `env` (plus this process's PATH unless `env` sets one).
pub fn veer(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let args: Vec<OsString> = args.iter().map(OsString::from).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = |k: &str| {
        env.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                if k == "PATH" {
                    std::env::var("PATH").ok()
                } else {
                    None
                }
            })
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = veer_redirect::run(&args, &lookup, &mut out, &mut err);
    Outcome {
        code,
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

/// Like [`veer`] but asserts exit 0.
pub fn veer_ok(args: &[&str]) -> Outcome {
    let o = veer(args, &[]);
    assert_eq!(o.code, 0, "veer {args:?} failed: {o:?}");
    o
}

/// `iptables-save -t nat` output without comments and counters.
pub fn normalize(save: &str) -> String {
    let mut s = String::new();
    for line in save.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let line = match (line.starts_with(':'), line.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &line[..i]),
            _ => line.to_string(),
        };
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// Normalised nat table of `ns` as seen by `cmd` (e.g. `iptables-nft`, `ip6tables-legacy`).
pub fn nat(ns: &Netns, cmd: &str) -> String {
    normalize(&ns.sh_ok(&format!("{cmd}-save -t nat")).unwrap())
}

/// Binds a TCP listener inside `ns`.
pub fn listen(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    let l = ns
        .run(move || TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    l.set_nonblocking(true).unwrap();
    l
}

/// Binds a UDP socket inside `ns`.
pub fn udp(ns: &Netns, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = ns
        .run(move || UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    s.set_nonblocking(true).unwrap();
    s
}

/// Named listeners; [`Listeners::landed`] says which one got a connection.
pub struct Listeners(pub Vec<(&'static str, TcpListener)>);

impl Listeners {
    /// Waits up to 3 s for a connection on any listener.
    pub fn landed(&self) -> Option<(&'static str, TcpStream)> {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            for (name, l) in &self.0 {
                match l.accept() {
                    Ok((s, _)) => return Some((name, s)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept on {name}: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Connects from a thread in `ns` to `to` and returns where it landed
    /// (and the accepted stream).
    pub fn connect_from(&self, ns: &Netns, to: &str) -> (&'static str, TcpStream) {
        let addr: SocketAddr = to.parse().unwrap();
        let client = ns
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        let landed = self
            .landed()
            .unwrap_or_else(|| panic!("connection to {to} landed nowhere"));
        drop(client);
        landed
    }

    /// Connects from a process running as `uid` in `ns` (setpriv + bash /dev/tcp).
    pub fn connect_as(&self, ns: &Netns, uid: u32, ip: &str, port: u16) -> &'static str {
        let status = ns
            .command("setpriv")
            .args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{ip}/{port}"),
            ])
            .status()
            .unwrap();
        assert!(
            status.success(),
            "connect as uid {uid} to {ip}:{port} failed"
        );
        self.landed()
            .unwrap_or_else(|| panic!("connection as uid {uid} to {ip}:{port} landed nowhere"))
            .0
    }
}

/// Sends one datagram from a new socket in `ns` to `to` and returns which of
/// `socks` received it (from where it was received).
pub fn udp_lands(
    ns: &Netns,
    to: &str,
    socks: &[(&'static str, &UdpSocket)],
) -> Option<&'static str> {
    let to: SocketAddr = to.parse().unwrap();
    ns.run(move || {
        let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
            .parse()
            .unwrap();
        let s = UdpSocket::bind(bind)?;
        s.send_to(b"query", to)
    })
    .unwrap_or_else(|e| panic!("send to {to}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        for (name, s) in socks {
            match s.recv_from(&mut buf) {
                Ok(_) => return Some(name),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("recv on {name}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// `getsockopt(SO_ORIGINAL_DST)` (IPv4, SOL_IP/80) or
/// `IP6T_SO_ORIGINAL_DST` (IPv6, SOL_IPV6/80) on an accepted stream.
pub fn original_dst(s: &TcpStream) -> SocketAddr {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = s.as_raw_fd();
    if s.local_addr().unwrap().is_ipv4() {
        // SAFETY: fd is a valid socket; the buffer is a sockaddr_in of the length passed.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                &mut sa as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_ORIGINAL_DST: {}", io::Error::last_os_error());
        SocketAddr::from((
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        ))
    } else {
        // SAFETY: as above with a sockaddr_in6.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                &mut sa as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(
            rc,
            0,
            "IP6T_SO_ORIGINAL_DST: {}",
            io::Error::last_os_error()
        );
        SocketAddr::from((
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
        ))
    }
}

/// The netns path as a `String` for `-netns`.
pub fn path(ns: &Netns) -> String {
    ns.path().display().to_string()
}
