//! Typed socket addresses, so that a peer, an original destination and an
//! upstream endpoint can never be mixed up.
use std::fmt;
use std::net::{IpAddr, SocketAddr};

macro_rules! addr_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub SocketAddr);

        impl $name {
            pub fn ip(&self) -> IpAddr {
                self.0.ip()
            }
            pub fn port(&self) -> u16 {
                self.0.port()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<SocketAddr> for $name {
            fn from(a: SocketAddr) -> Self {
                $name(canonical(a))
            }
        }
    };
}

addr_newtype!(
    /// The remote address of an accepted connection (the app on outbound, the
    /// peer sidecar on inbound).
    ClientAddr
);
addr_newtype!(
    /// The destination the client dialled before iptables redirected it
    /// (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`).
    OrigDstAddr
);
addr_newtype!(
    /// An address veer dials: an upstream sidecar, a dialed-directly instance,
    /// a passthrough destination or the local app.
    EndpointAddr
);

/// Unmaps IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1` → `10.0.0.1`), so
/// that a v4 client accepted on a dual-stack socket routes like a v4 one.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}
