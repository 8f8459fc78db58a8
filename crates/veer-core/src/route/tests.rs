use super::*;
use std::time::Duration;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
fn dst(s: &str) -> OrigDstAddr {
    OrigDstAddr::from(sa(s))
}

fn upstream(name: &str) -> Upstream {
    Upstream::new(
        ServiceId::new("td.consul", "default", "default", "dc1", name),
        Duration::from_secs(5),
    )
}

fn table(mesh_only: bool) -> RouteTable {
    let mut billing = upstream("billing");
    billing.virtual_ips = vec!["10.96.0.20".parse().unwrap(), "fd00::20".parse().unwrap()];
    billing.endpoints = vec![
        Endpoint::new(sa("10.77.0.2:20000")),
        Endpoint::new(sa("10.77.0.3:20000")),
    ];
    let mut db = upstream("db");
    db.dialed_directly = true;
    db.instances = vec!["10.77.0.5".parse().unwrap(), "10.77.0.6".parse().unwrap()];
    let mut empty = upstream("empty");
    empty.virtual_ips = vec!["10.96.0.99".parse().unwrap()];
    let mut ledger = upstream("ledger");
    ledger.local_bind = Some(sa("127.0.0.1:9191"));
    ledger.endpoints = vec![Endpoint::new(sa("10.77.0.3:20000"))];
    RouteTable::new(
        vec![billing, db, empty, ledger],
        mesh_only,
        vec![
            sa("127.0.0.1:15001"),
            sa("[::1]:15001"),
            sa("0.0.0.0:20000"),
        ],
    )
}

#[test]
fn table_of_routes() {
    let t = table(false);
    // (original destination, expected kind, expected upstream or address)
    let cases = [
        ("10.96.0.20:80", "mesh", "billing"),
        ("10.96.0.20:9999", "mesh", "billing"), // any port on a VIP
        ("[fd00::20]:443", "mesh", "billing"),  // IPv6 VIP
        ("[::ffff:10.96.0.20]:80", "mesh", "billing"), // v4-mapped on a [::] socket
        ("10.77.0.5:5432", "direct", "10.77.0.5:5432"),
        ("10.77.0.6:7000", "direct", "10.77.0.6:7000"),
        ("93.184.216.34:443", "passthrough", "93.184.216.34:443"),
        ("[2001:db8::1]:80", "passthrough", "[2001:db8::1]:80"),
    ];
    for (d, kind, what) in cases {
        let r = route(&t, dst(d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(r.kind(), kind, "{d}");
        match r {
            Route::Mesh { upstream } => assert_eq!(upstream.name(), what, "{d}"),
            Route::Direct { upstream, addr } => {
                assert_eq!(upstream.name(), "db");
                assert_eq!(addr.to_string(), what);
            }
            Route::Passthrough { addr } => assert_eq!(addr.to_string(), what),
        }
    }
}

#[test]
fn mesh_destinations_only_refuses_unknown() {
    let t = table(true);
    let e = route(&t, dst("93.184.216.34:443")).unwrap_err();
    assert_eq!(e.classify(), "not_in_mesh");
    // Mesh destinations still route.
    assert_eq!(route(&t, dst("10.96.0.20:80")).unwrap().kind(), "mesh");
    assert_eq!(route(&t, dst("10.77.0.5:1")).unwrap().kind(), "direct");
}

#[test]
fn own_listener_is_a_loop() {
    let t = table(false);
    for d in ["127.0.0.1:15001", "[::1]:15001", "127.0.0.1:20000"] {
        assert_eq!(route(&t, dst(d)).unwrap_err().classify(), "loop", "{d}");
    }
    // Another port on loopback is ordinary passthrough.
    assert_eq!(
        route(&t, dst("127.0.0.2:15002")).unwrap().kind(),
        "passthrough"
    );
}

#[test]
fn vip_without_endpoints_is_an_error() {
    let t = table(false);
    assert_eq!(
        route(&t, dst("10.96.0.99:80")).unwrap_err().classify(),
        "no_endpoints"
    );
}

#[test]
fn explicit_upstream_routes_to_its_upstream() {
    let t = table(false);
    let u = t.upstream_by_bind(sa("127.0.0.1:9191")).unwrap();
    match route_explicit(u).unwrap() {
        Route::Mesh { upstream } => assert_eq!(upstream.name(), "ledger"),
        r => panic!("{r:?}"),
    }
}

#[test]
fn round_robin_and_failed_endpoints_last() {
    let t = table(false);
    let b = &t.upstreams()[0];
    let first: Vec<String> = b.pick_order(0).iter().map(|e| e.addr.to_string()).collect();
    let second: Vec<String> = b.pick_order(0).iter().map(|e| e.addr.to_string()).collect();
    assert_ne!(first[0], second[0], "start rotates");
    // Mark .2 failed until t=1000: it comes last while failed, and is back after.
    let ep2 = b
        .endpoints
        .iter()
        .find(|e| e.addr.to_string() == "10.77.0.2:20000")
        .unwrap();
    b.mark_failed(ep2, 1000);
    for _ in 0..4 {
        assert_eq!(b.pick_order(500)[0].addr.to_string(), "10.77.0.3:20000");
    }
    let after: Vec<String> = (0..2)
        .map(|_| b.pick_order(1500)[0].addr.to_string())
        .collect();
    assert!(after.contains(&"10.77.0.2:20000".to_string()));
}

/// Found by fuzzing: addresses given in IPv4-mapped IPv6 form in the table
/// (instances, listeners) must match their IPv4 form and vice versa.
#[test]
fn v4_mapped_forms_are_one_address() {
    let mut db = upstream("db");
    db.dialed_directly = true;
    db.instances = vec!["::ffff:10.77.0.5".parse().unwrap()];
    let mut vip = upstream("vip");
    vip.virtual_ips = vec!["::ffff:10.96.0.1".parse().unwrap()];
    vip.endpoints = vec![Endpoint::new(sa("10.77.0.2:20000"))];
    let t = RouteTable::new(
        vec![db, vip],
        false,
        vec![sa("[::ffff:127.0.0.1]:15001"), sa("[::]:15002")],
    );
    assert_eq!(route(&t, dst("10.77.0.5:1")).unwrap().kind(), "direct");
    assert_eq!(
        route(&t, OrigDstAddr(sa("[::ffff:10.77.0.5]:1")))
            .unwrap()
            .kind(),
        "direct"
    );
    assert_eq!(route(&t, dst("10.96.0.1:80")).unwrap().kind(), "mesh");
    assert_eq!(
        route(&t, dst("127.0.0.1:15001")).unwrap_err().classify(),
        "loop"
    );
    assert_eq!(
        route(&t, OrigDstAddr(sa("[::ffff:127.0.0.1]:15002")))
            .unwrap_err()
            .classify(),
        "loop"
    );
    assert_eq!(
        route(&t, dst("[::1]:15002")).unwrap_err().classify(),
        "loop"
    );
}

#[test]
fn destination_port_vips_match_that_port_first() {
    let vip: IpAddr = "240.0.0.1".parse().unwrap();
    let mut web = upstream("web");
    web.virtual_ips = vec![vip];
    web.destination_port = Some(8080);
    web.endpoints = vec![Endpoint::new(sa("10.77.0.2:20000"))];
    let mut admin = upstream("admin");
    admin.virtual_ips = vec![vip];
    admin.destination_port = Some(9090);
    admin.endpoints = vec![Endpoint::new(sa("10.77.0.3:20000"))];
    let mut any = upstream("any");
    any.virtual_ips = vec![vip];
    any.endpoints = vec![Endpoint::new(sa("10.77.0.4:20000"))];
    let t = RouteTable::new(vec![web, admin, any], true, vec![]);
    let cases = [
        ("240.0.0.1:8080", Some("web")),
        ("240.0.0.1:9090", Some("admin")),
        ("[::ffff:240.0.0.1]:9090", Some("admin")),
        ("240.0.0.1:80", Some("any")), // no port match: the ip-only entry
    ];
    for (d, want) in cases {
        let got = match route(&t, dst(d)) {
            Ok(Route::Mesh { upstream }) => Some(upstream.name().to_string()),
            _ => None,
        };
        assert_eq!(got.as_deref(), want, "{d}");
    }
    // Without an ip-only upstream, another port is not a mesh destination.
    let mut only = upstream("only");
    only.virtual_ips = vec![vip];
    only.destination_port = Some(8080);
    only.endpoints = vec![Endpoint::new(sa("10.77.0.2:20000"))];
    let t = RouteTable::new(vec![only], true, vec![]);
    assert_eq!(
        route(&t, dst("240.0.0.1:80")).unwrap_err().classify(),
        "not_in_mesh"
    );
}

#[test]
fn weighted_round_robin_follows_the_weights_and_interleaves() {
    let mut u = upstream("w");
    u.endpoints = vec![
        Endpoint::weighted(sa("10.0.0.1:1"), 3),
        Endpoint::weighted(sa("10.0.0.2:1"), 1),
        Endpoint::weighted(sa("10.0.0.3:1"), 0), // 0 is taken as 1
        Endpoint::weighted(sa("10.0.0.4:1"), 1_000_000_000),
    ];
    let mut counts = std::collections::HashMap::<SocketAddr, u64>::new();
    // Weights 3:1:4; each run of 8 picks visits every weight unit once.
    let mut small = upstream("s");
    small.endpoints = vec![
        Endpoint::weighted(sa("10.0.0.1:1"), 3),
        Endpoint::weighted(sa("10.0.0.2:1"), 1),
        Endpoint::weighted(sa("10.0.0.3:1"), 4),
    ];
    let mut firsts = Vec::new();
    for _ in 0..800 {
        let order = small.pick_order(0);
        assert_eq!(order.len(), 3, "every endpoint stays in the order");
        *counts.entry(order[0].addr.0).or_default() += 1;
        firsts.push(order[0].addr.0);
    }
    assert_eq!(counts[&sa("10.0.0.1:1")], 300);
    assert_eq!(counts[&sa("10.0.0.2:1")], 100);
    assert_eq!(counts[&sa("10.0.0.3:1")], 400);
    // Interleaved: the heaviest endpoint is never first 4 times in a row.
    assert!(
        firsts.windows(5).all(|w| w.iter().any(|a| *a != w[0])),
        "{firsts:?}"
    );
    // A huge weight costs nothing more than a small one: it just wins.
    let mut big = 0;
    for _ in 0..1000 {
        if u.pick_order(0)[0].addr.0 == sa("10.0.0.4:1") {
            big += 1;
        }
    }
    assert!(big >= 990, "{big}");
}

#[test]
fn max_connections_counts_open_connections_and_frees_on_drop() {
    let mut u = upstream("limited");
    u.max_connections = Some(2);
    let u = Arc::new(u);
    let a = u.try_open().expect("first");
    let b = u.try_open().expect("second");
    assert!(u.try_open().is_none(), "third overflows");
    assert_eq!(u.open_connections(), 2);
    drop(a);
    let c = u.try_open().expect("a slot freed");
    drop((b, c));
    assert_eq!(u.open_connections(), 0);
    // No limit: always a slot.
    let free = Arc::new(upstream("free"));
    let guards: Vec<_> = (0..100).map(|_| free.try_open().unwrap()).collect();
    assert_eq!(free.open_connections(), 100);
    drop(guards);
}

#[test]
fn default_san_matcher_is_the_exact_spiffe_id() {
    let u = upstream("api");
    assert_eq!(u.san_matchers.len(), 1);
    assert!(u.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/dc1/svc/api"));
    assert!(!u.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/dc1/svc/api2"));
}

fn in_dc(name: &str, dc: &str, eps: &[&str]) -> Upstream {
    let mut u = Upstream::new(
        ServiceId::new("td.consul", "default", "default", dc, name),
        Duration::from_secs(5),
    );
    u.endpoints = eps.iter().map(|e| Endpoint::new(sa(e))).collect();
    u
}

/// (primary endpoints, failover targets' endpoints, wanted target's dc)
type TargetRow<'a> = (&'a [&'a str], &'a [&'a [&'a str]], Option<&'a str>);

#[test]
fn target_is_the_first_in_failover_order_with_an_endpoint() {
    let rows: &[TargetRow] = &[
        (&["10.0.1.1:20000"], &[], Some("dc1")),
        (&[], &[], None),
        (&["10.0.1.1:20000"], &[&["10.0.2.1:20000"]], Some("dc1")),
        (&[], &[&["10.0.2.1:20000"]], Some("dc2")),
        (&[], &[&[], &["10.0.3.1:20000"]], Some("dc3")),
        (
            &[],
            &[&["10.0.2.1:20000"], &["10.0.3.1:20000"]],
            Some("dc2"),
        ),
        (&[], &[&[], &[]], None),
    ];
    for (i, (primary, failover, want)) in rows.iter().enumerate() {
        let mut u = in_dc("api", "dc1", primary);
        u.virtual_ips = vec!["10.96.0.30".parse().unwrap()];
        u.failover = failover
            .iter()
            .enumerate()
            .map(|(j, eps)| in_dc("api", &format!("dc{}", j + 2), eps))
            .collect();
        let got = u.target().map(|t| t.identity.datacenter.clone());
        assert_eq!(got.as_deref(), *want, "row {i}");
        let t = RouteTable::new(vec![u], false, vec![]);
        let r = route(&t, dst("10.96.0.30:80"));
        match want {
            Some(_) => assert_eq!(r.unwrap().kind(), "mesh", "row {i}"),
            None => assert_eq!(r.unwrap_err().classify(), "no_endpoints", "row {i}"),
        }
        let r = route_explicit(&t.upstreams()[0]);
        assert_eq!(r.is_ok(), want.is_some(), "row {i}");
    }
}

#[test]
fn a_failover_target_keeps_its_own_identity_sni_and_round_robin() {
    let mut u = in_dc("api", "dc1", &[]);
    let mut remote = in_dc("api", "dc2", &["10.0.2.1:20000", "10.0.2.2:20000"]);
    remote.sni = "v1.api.default.dc2.internal.td.consul".into();
    u.failover = vec![remote].into_boxed_slice();
    let t = u.target().unwrap();
    assert_eq!(t.sni, "v1.api.default.dc2.internal.td.consul");
    assert!(t.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/dc2/svc/api"));
    assert!(!t.san_matchers[0].matches("spiffe://td.consul/ns/default/dc/dc1/svc/api"));
    let firsts: Vec<_> = (0..4).map(|_| t.pick_order(0)[0].addr.0).collect();
    assert_eq!(
        firsts,
        [
            sa("10.0.2.1:20000"),
            sa("10.0.2.2:20000"),
            sa("10.0.2.1:20000"),
            sa("10.0.2.2:20000")
        ]
    );
}
