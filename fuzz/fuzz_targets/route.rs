//! `route::route` over random routing tables and original destinations,
//! against a model of the documented order (route.rs module docs):
//!
//! 1. the destination is one of veer's own listeners ⇒ `Loop` (same port,
//!    and the same IP or a listener on the unspecified address and a
//!    loopback destination);
//! 2. it is a virtual IP of an upstream (any port; the first upstream that
//!    claims it) ⇒ `Mesh` to that upstream, or `NoEndpoints` if it has none;
//! 3. it is an instance address of a dialed-directly upstream (the first
//!    one) ⇒ `Direct` to exactly the original destination;
//! 4. otherwise `NotInMesh` when `mesh_destinations_only`, else
//!    `Passthrough` to exactly the original destination.
//!
//! Addresses come from a small pool (so that they collide) written as IPv4,
//! as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) or as IPv4-compatible IPv6
//! (`::a.b.c.d`, which is a different address), plus arbitrary ones. The
//! model compares every address after unmapping IPv4-mapped IPv6 (as
//! `addr::canonical` does): `::ffff:10.0.0.1` and `10.0.0.1` are the same
//! destination wherever they appear, in the table or in the destination.
//!
//! Also checked: `pick_order` is a permutation of the endpoints.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use veer_core::addr::OrigDstAddr;
use veer_core::route::{route, Endpoint, Route, RouteError, RouteTable, Upstream};
use veer_core::spiffe::ServiceId;

const V4: [Ipv4Addr; 6] = [
    Ipv4Addr::new(10, 0, 0, 1),
    Ipv4Addr::new(10, 0, 0, 2),
    Ipv4Addr::new(127, 0, 0, 1),
    Ipv4Addr::new(127, 0, 0, 2),
    Ipv4Addr::new(0, 0, 0, 0),
    Ipv4Addr::new(240, 0, 0, 1),
];
const V6: [Ipv6Addr; 4] = [
    Ipv6Addr::LOCALHOST,
    Ipv6Addr::UNSPECIFIED,
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
];
const PORTS: [u16; 4] = [80, 15001, 20000, 0];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum V4Form {
    Plain,
    Mapped,
    Compatible,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum IpIn {
    V4(u8, V4Form),
    V6(u8),
    RawV4(u32, V4Form),
    RawV6(u128),
}

fn v4_as(a: Ipv4Addr, f: V4Form) -> IpAddr {
    match f {
        V4Form::Plain => IpAddr::V4(a),
        V4Form::Mapped => IpAddr::V6(a.to_ipv6_mapped()),
        V4Form::Compatible => IpAddr::V6(a.to_ipv6_compatible()),
    }
}

impl IpIn {
    fn ip(self) -> IpAddr {
        match self {
            IpIn::V4(i, f) => v4_as(V4[i as usize % V4.len()], f),
            IpIn::V6(i) => IpAddr::V6(V6[i as usize % V6.len()]),
            IpIn::RawV4(a, f) => v4_as(Ipv4Addr::from(a), f),
            IpIn::RawV6(a) => IpAddr::V6(Ipv6Addr::from(a)),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum PortIn {
    Pool(u8),
    Raw(u16),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct AddrIn {
    ip: IpIn,
    port: PortIn,
}
impl AddrIn {
    fn addr(self) -> SocketAddr {
        let port = match self.port {
            PortIn::Pool(i) => PORTS[i as usize % PORTS.len()],
            PortIn::Raw(p) => p,
        };
        SocketAddr::new(self.ip.ip(), port)
    }
}

#[derive(Arbitrary, Debug)]
struct UpIn {
    virtual_ips: Vec<IpIn>,
    instances: Vec<IpIn>,
    dialed_directly: bool,
    endpoints: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    mesh_destinations_only: bool,
    own_listeners: Vec<AddrIn>,
    upstreams: Vec<UpIn>,
    destinations: Vec<AddrIn>,
}

/// `::ffff:a.b.c.d` ⇒ `a.b.c.d`; everything else unchanged.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

#[derive(Debug, PartialEq)]
enum Want {
    Loop,
    Mesh(usize),
    NoEndpoints(usize),
    Direct(usize),
    NotInMesh,
    Passthrough,
}

struct Model {
    listeners: Vec<SocketAddr>,
    /// (virtual IPs, dialed-directly instances, has endpoints), unmapped.
    upstreams: Vec<(Vec<IpAddr>, Vec<IpAddr>, bool)>,
    mesh_destinations_only: bool,
}

impl Model {
    fn route(&self, dst: SocketAddr) -> Want {
        let ip = unmap(dst.ip());
        let port = dst.port();
        let own = self.listeners.iter().any(|l| {
            let lip = unmap(l.ip());
            l.port() == port && (lip == ip || (lip.is_unspecified() && ip.is_loopback()))
        });
        if own {
            return Want::Loop;
        }
        if let Some(i) = self.upstreams.iter().position(|u| u.0.contains(&ip)) {
            return if self.upstreams[i].2 {
                Want::Mesh(i)
            } else {
                Want::NoEndpoints(i)
            };
        }
        if let Some(i) = self.upstreams.iter().position(|u| u.1.contains(&ip)) {
            return Want::Direct(i);
        }
        if self.mesh_destinations_only {
            Want::NotInMesh
        } else {
            Want::Passthrough
        }
    }
}

fn name(i: usize) -> String {
    format!("u{i}")
}

fuzz_target!(|input: Input| {
    let mut input = input;
    input.own_listeners.truncate(4);
    input.upstreams.truncate(6);
    input.destinations.truncate(8);

    let listeners: Vec<SocketAddr> = input.own_listeners.iter().map(|a| a.addr()).collect();
    let mut model = Model {
        listeners: listeners.clone(),
        upstreams: Vec::new(),
        mesh_destinations_only: input.mesh_destinations_only,
    };
    let mut ups = Vec::new();
    for (i, u) in input.upstreams.iter_mut().enumerate() {
        u.virtual_ips.truncate(4);
        u.instances.truncate(4);
        let n_ep = usize::from(u.endpoints % 3);
        let mut up = Upstream::new(
            ServiceId::new("td.consul", "default", "default", "dc1", &name(i)),
            Duration::from_secs(5),
        );
        up.virtual_ips = u.virtual_ips.iter().map(|a| a.ip()).collect();
        up.instances = u.instances.iter().map(|a| a.ip()).collect();
        up.dialed_directly = u.dialed_directly;
        up.endpoints = (0..n_ep)
            .map(|k| {
                Endpoint::new(SocketAddr::new(
                    Ipv4Addr::new(10, 77, i as u8, k as u8).into(),
                    20000,
                ))
            })
            .collect();
        model.upstreams.push((
            up.virtual_ips.iter().copied().map(unmap).collect(),
            if u.dialed_directly {
                up.instances.iter().copied().map(unmap).collect()
            } else {
                Vec::new()
            },
            n_ep > 0,
        ));
        ups.push(up);
    }
    let table = RouteTable::new(ups, input.mesh_destinations_only, listeners);
    assert_eq!(table.upstreams().len(), model.upstreams.len());
    assert_eq!(table.mesh_destinations_only(), input.mesh_destinations_only);

    for d in &input.destinations {
        let raw = d.addr();
        let orig = OrigDstAddr::from(raw);
        let canon = SocketAddr::new(unmap(raw.ip()), raw.port());
        assert_eq!(orig.0, canon, "OrigDstAddr::from does not unmap {raw}");
        let want = model.route(raw);
        let got = route(&table, orig);
        let ctx = || {
            format!(
                "destination {raw}: veer {got:?}, model {want:?}\nlisteners {:?}\nupstreams (vips, instances, has endpoints) {:?}\nmesh_destinations_only {}",
                model.listeners, table.upstreams().iter().map(|u| (&u.virtual_ips, u.dialed_directly, &u.instances, u.endpoints.len())).collect::<Vec<_>>(), model.mesh_destinations_only
            )
        };
        let ok = match (&got, &want) {
            (Err(RouteError::Loop(a)), Want::Loop) => *a == orig,
            (Ok(Route::Mesh { upstream }), Want::Mesh(i)) => {
                Arc::ptr_eq(upstream, &table.upstreams()[*i])
            }
            (Err(RouteError::NoEndpoints(n)), Want::NoEndpoints(i)) => *n == name(*i),
            (Ok(Route::Direct { upstream, addr }), Want::Direct(i)) => {
                Arc::ptr_eq(upstream, &table.upstreams()[*i]) && addr.0 == canon
            }
            (Err(RouteError::NotInMesh(a)), Want::NotInMesh) => *a == orig,
            (Ok(Route::Passthrough { addr }), Want::Passthrough) => addr.0 == canon,
            _ => false,
        };
        assert!(ok, "{}", ctx());
        match &got {
            Ok(r) => assert!(!r.kind().is_empty()),
            Err(e) => {
                assert!(!e.classify().is_empty());
                assert!(!e.to_string().is_empty());
            }
        }
    }

    // pick_order: every endpoint exactly once, whatever the rotation.
    for u in table.upstreams() {
        for now in [0u64, 5] {
            let order = u.pick_order(now);
            assert_eq!(order.len(), u.endpoints.len());
            for e in &u.endpoints {
                assert_eq!(order.iter().filter(|o| std::ptr::eq(**o, e)).count(), 1);
            }
        }
    }
});
