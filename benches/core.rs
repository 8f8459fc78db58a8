//! Micro-benchmarks of veer's per-connection decisions (pure, sans-IO):
//! the routing decision, intention evaluation and SPIFFE ID parsing.
//!
//! `cargo bench --bench core` (no root needed).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use veer_core::addr::OrigDstAddr;
use veer_core::intentions::{Action, Intention, Intentions, Target};
use veer_core::route::{route, Endpoint, RouteTable, Upstream};
use veer_core::spiffe::ServiceId;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

fn id(service: &str) -> ServiceId {
    ServiceId::new(TD, "default", "default", "dc1", service)
}

/// A table of `n` upstreams, upstream `i` with VIP 10.96.(i/256).(i%256)
/// plus an IPv6 VIP, and one endpoint each.
fn table(n: usize) -> RouteTable {
    let ups = (0..n)
        .map(|i| {
            let mut u = Upstream::new(id(&format!("svc{i}")), Duration::from_secs(5));
            u.virtual_ips = vec![
                IpAddr::V4(Ipv4Addr::new(10, 96, (i / 256) as u8, (i % 256) as u8)),
                format!("fd00::{i:x}").parse().unwrap(),
            ];
            u.endpoints = vec![Endpoint::new(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
                20000,
            ))];
            u
        })
        .collect();
    RouteTable::new(
        ups,
        false,
        vec![
            "127.0.0.1:15001".parse().unwrap(),
            "0.0.0.0:20000".parse().unwrap(),
        ],
    )
}

fn bench_route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for n in [1usize, 100, 5000] {
        let t = table(n);
        let hit = OrigDstAddr("10.96.0.0:80".parse().unwrap());
        let miss = OrigDstAddr("192.0.2.7:443".parse().unwrap());
        g.bench_with_input(BenchmarkId::new("virtual_ip", n), &t, |b, t| {
            b.iter(|| route(black_box(t), black_box(hit)))
        });
        g.bench_with_input(BenchmarkId::new("passthrough", n), &t, |b, t| {
            b.iter(|| route(black_box(t), black_box(miss)))
        });
    }
    g.finish();
}

fn bench_intentions(c: &mut Criterion) {
    let dest = id("api");
    let mut g = c.benchmark_group("intentions");
    for n in [1usize, 10, 1000] {
        // n exact sources allowed, then a wildcard deny; default deny.
        let mut all: Vec<Intention> = (0..n)
            .map(|i| {
                Intention::new(
                    Target::new("default", "default", &format!("client{i}")),
                    Target::new("default", "default", "api"),
                    Action::Allow,
                )
            })
            .collect();
        all.push(Intention::new(
            Target::new("default", "default", "*"),
            Target::new("default", "default", "api"),
            Action::Deny,
        ));
        let ix = Intentions::new(&dest, all, Action::Deny);
        let first = id("client0");
        let last = id(&format!("client{}", n - 1));
        let other = id("evil");
        g.bench_with_input(BenchmarkId::new("first_rule", n), &ix, |b, ix| {
            b.iter(|| ix.evaluate(black_box(&first)))
        });
        g.bench_with_input(BenchmarkId::new("last_exact_rule", n), &ix, |b, ix| {
            b.iter(|| ix.evaluate(black_box(&last)))
        });
        g.bench_with_input(BenchmarkId::new("wildcard", n), &ix, |b, ix| {
            b.iter(|| ix.evaluate(black_box(&other)))
        });
    }
    g.finish();
}

fn bench_spiffe(c: &mut Criterion) {
    let mut g = c.benchmark_group("spiffe_parse");
    let cases = [
        (
            "service",
            format!("spiffe://{TD}/ns/default/dc/dc1/svc/web"),
        ),
        (
            "partition",
            format!("spiffe://{TD}/ap/team-a/ns/payments/dc/dc1/svc/ledger"),
        ),
        (
            "agent_rejected",
            format!("spiffe://{TD}/agent/client/dc/dc1/id/node-1"),
        ),
        (
            "bad_scheme_rejected",
            format!("https://{TD}/ns/default/dc/dc1/svc/web"),
        ),
    ];
    for (name, uri) in &cases {
        g.bench_with_input(BenchmarkId::from_parameter(name), uri, |b, uri| {
            b.iter(|| ServiceId::parse(black_box(uri)))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_route, bench_intentions, bench_spiffe);
criterion_main!(benches);
