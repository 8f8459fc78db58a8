//! What a mesh costs in memory in xDS mode: the live bytes of the accepted
//! resources (as the ADS client keeps them: `translate::decode`'s models),
//! the compiled spec and the snapshot for N upstreams shaped as
//! Consul sends them (`veer_testsupport::consul_xds`, from Consul v1.16.0's
//! goldens), counted by a global allocator.
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use veer_testsupport::consul_xds::{self as cx, Certs, Params, SidecarShape};
use veer_xds::resources::{Kind, Resources};
use veer_xds::translate::{decode, translate};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// The most live bytes since it was last set.
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        grew(l.size() as isize);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        grew(new as isize - l.size() as isize);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Relaxed)
}

fn mesh(n: usize) -> Vec<(String, String, envoy_types::pb::google::protobuf::Any)> {
    let ca = veer_ca::Ca::new_root("11111111-2222-3333-4444-555555555555.consul").unwrap();
    let mut p = Params::golden(Certs::issue(&ca, "dc1", "web"));
    p.vips.clear();
    p.endpoints.clear();
    p.instances.clear();
    let mut shape = SidecarShape {
        passthrough: true,
        ..Default::default()
    };
    for i in 0..n {
        let svc = format!("svc{i:05}");
        let (a, b) = ((i / 250) as u8, (i % 250) as u8);
        p.vips
            .insert(svc.clone(), vec![IpAddr::from([10, 120 + a, b, 1])]);
        p.endpoints.insert(
            svc.clone(),
            (1..=3)
                .map(|k| SocketAddr::from(([10, 200 + a, b, k], 20000)))
                .collect(),
        );
        shape.upstreams.push(svc);
    }
    cx::sidecar(&p, &shape).resources()
}

/// Bytes per upstream held by the accepted resources, the spec and the
/// snapshot (printed with `--nocapture`).
#[test]
fn bytes_per_upstream() {
    let n = 2000;
    let wire = mesh(n);
    let base = live();
    let mut res = Resources::default();
    for (url, name, any) in &wire {
        let kind = Kind::from_type_url(url).unwrap();
        res.insert(name.clone(), decode(kind, name, any).unwrap());
    }
    let resources = live() - base;
    for kind in Kind::ALL {
        let b = live();
        let mut r = Resources::default();
        let mut wire_bytes = 0;
        for (url, name, any) in wire.iter().filter(|(u, _, _)| u == kind.type_url()) {
            let _ = url;
            wire_bytes += any.value.len();
            r.insert(name.clone(), decode(kind, name, any).unwrap());
        }
        eprintln!(
            "{}: {} B kept, {} B on the wire",
            kind.short(),
            live() - b,
            wire_bytes
        );
        drop(r);
    }
    let base = live();
    let spec = translate(&res).unwrap();
    let spec_bytes = live() - base;
    let base = live();
    let snap = veer_core::snapshot::Snapshot::build(spec.clone(), 1).unwrap();
    let snap_bytes = live() - base;
    let per = |b: isize| b / n as isize;
    eprintln!(
        "per upstream: resources {} B, spec {} B, snapshot {} B (n = {n})",
        per(resources),
        per(spec_bytes),
        per(snap_bytes)
    );
    // What veer compiles stays small: measured 814 B of spec and 1,624 B
    // of snapshot per upstream (TLS client configurations are built on
    // first use, not here).
    assert!(
        per(spec_bytes) < 1_200,
        "spec: {} B per upstream",
        per(spec_bytes)
    );
    assert!(
        per(snap_bytes) < 2_400,
        "snapshot: {} B per upstream",
        per(snap_bytes)
    );
    // The accepted resources are kept as the translation's models, not as
    // decoded protobufs: measured 1,311 B per upstream (CDS 834 B, EDS
    // 259 B, LDS 216 B; the inline leaf and roots Consul repeats in every
    // cluster are shared). Decoded protobufs took 14,590 B (CDS 8.4 KB,
    // EDS 4 KB, LDS 2.1 KB: prost's structs are 4-20x their wire size).
    assert!(
        per(resources) < 1_600,
        "resources: {} B per upstream",
        per(resources)
    );
    drop(snap);
}

/// CPU time this thread has run, from the scheduler (nanoseconds): what a
/// step costs, whatever else the machine runs meanwhile.
fn thread_cpu() -> std::time::Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    std::time::Duration::from_nanos(
        s.split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    )
}

/// What one response costs at 2,000 upstreams once the mesh is held, in
/// thread CPU time (a measurement, not part of the suite; the mean of 40
/// rounds, printed; the scheduler counts in ticks, so one round alone
/// would not tell):
/// `cargo test -p veer-xds --test memory compile_times -- --ignored --nocapture`.
#[test]
#[ignore]
fn compile_times() {
    use std::time::Duration;
    let n = 2000;
    let wire = mesh(n);
    let mut res = Resources::default();
    for (url, name, any) in &wire {
        let kind = Kind::from_type_url(url).unwrap();
        res.insert(name.clone(), decode(kind, name, any).unwrap());
    }
    let mut snap = veer_core::snapshot::Snapshot::build(translate(&res).unwrap(), 1).unwrap();
    let mut total = [Duration::ZERO; 5];
    let rounds = 40;
    for v in 0..rounds {
        let t = thread_cpu();
        let _w = veer_xds::translate::wanted(&res);
        let _m = veer_xds::translate::missing(&res);
        let a = thread_cpu() - t;
        let t = thread_cpu();
        let spec = translate(&res).unwrap();
        let b = thread_cpu() - t;
        let t = thread_cpu();
        let next = veer_core::snapshot::Snapshot::build_after(spec, v + 2, Some(&snap)).unwrap();
        let c = thread_cpu() - t;
        let t = thread_cpu();
        snap = next;
        let d = thread_cpu() - t;
        // The same without the previous snapshot: every upstream built.
        let spec = translate(&res).unwrap();
        let t = thread_cpu();
        let fresh = veer_core::snapshot::Snapshot::build(spec, 0).unwrap();
        let e = thread_cpu() - t;
        drop(fresh);
        for (x, y) in total.iter_mut().zip([a, b, c, d, e]) {
            *x += y;
        }
    }
    let mean = total.map(|t| t / rounds as u32);
    eprintln!(
        "CPU, mean of {rounds}: wanted+missing {:?}, translate {:?}, build_after {:?} (a build without the previous snapshot: {:?}), dropping the old snapshot {:?}",
        mean[0], mean[1], mean[2], mean[4], mean[3]
    );
}

/// The whole xDS side at 2,000 upstreams, as veer runs it: responses (CDS,
/// EDS, LDS, as Consul sends them) through the ADS state with the real
/// translator, each delivered spec built into a snapshot after the
/// previous one; then one endpoint change. Prints what stays live (the ADS
/// state: resources, versions, subscriptions and the translator's last
/// spec; the snapshot) and the peak while a response is handled (a
/// measurement, not part of the suite):
/// `cargo test -p veer-xds --test memory whole_xds_side -- --ignored --nocapture --test-threads=1`
/// (one test at a time: the allocator counts every thread).
#[test]
#[ignore]
fn whole_xds_side() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use veer_core::snapshot::{Snapshot, Spec};
    use veer_xds::ads::AdsState;
    use veer_xds::translate::Translator;
    let n = 2000;
    let wire = mesh(n);
    let response = |kind: Kind, nonce: &str| DeltaDiscoveryResponse {
        type_url: kind.type_url().into(),
        nonce: nonce.into(),
        resources: wire
            .iter()
            .filter(|(u, _, _)| u == kind.type_url())
            .map(|(_, name, any)| Resource {
                name: name.clone(),
                version: "1".into(),
                resource: Some(any.clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let wire_total: usize = wire.iter().map(|(_, _, a)| a.value.len()).sum();
    let base = live();
    let mut snap: Option<Snapshot> = None;
    let mut state = AdsState::new(Translator::new(), Node::default());
    state.start();
    let mut peak_over = 0isize;
    for (i, kind) in [Kind::Cluster, Kind::Endpoints, Kind::Listener]
        .into_iter()
        .enumerate()
    {
        PEAK.store(live(), Relaxed);
        // (The response as the gRPC client decodes it: live while handled.)
        let resp = response(kind, &i.to_string());
        let mut apply = |spec: Spec| {
            let next = Snapshot::build_after(spec, 1, snap.as_ref()).map_err(|e| e.to_string())?;
            snap = Some(next);
            Ok(())
        };
        let out = state.on_response(resp, &mut apply);
        assert_eq!(out.reply, veer_xds::ads::Reply::Ack);
        peak_over = peak_over.max(PEAK.load(Relaxed) - base);
    }
    assert!(state.delivered());
    let snap_bytes = {
        let s = snap.take().unwrap();
        let b = live();
        drop(s);
        b - live()
    };
    let state_bytes = live() - base;
    let per = |b: isize| b / n as isize;
    eprintln!(
        "n = {n}: ADS state {} B per upstream ({state_bytes} B), snapshot {} B per upstream; peak while a response is handled {} B per upstream ({peak_over} B, the responses' resources {wire_total} B on the wire)",
        per(state_bytes),
        per(snap_bytes),
        per(peak_over),
    );
}

/// What one endpoint change costs at 2,000 upstreams through the ADS
/// state (thread CPU, the mean of 40 changes; a measurement, not part of
/// the suite): the whole response (`on_response`, with the snapshot built
/// after the previous one), and of it `build_after` alone:
/// `cargo test --release -p veer-xds --test memory endpoint_change_times -- --ignored --nocapture --test-threads=1`.
#[test]
#[ignore]
fn endpoint_change_times() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use prost::Message;
    use std::time::Duration;
    use veer_core::snapshot::{Snapshot, Spec};
    use veer_xds::ads::AdsState;
    use veer_xds::translate::Translator;
    let n = 2000;
    let wire = mesh(n);
    let response =
        |kind: &str,
         nonce: String,
         items: Vec<(String, envoy_types::pb::google::protobuf::Any)>| {
            DeltaDiscoveryResponse {
                type_url: kind.into(),
                nonce,
                resources: items
                    .into_iter()
                    .map(|(name, any)| Resource {
                        name,
                        version: "1".into(),
                        resource: Some(any),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
        };
    let mut snap: Option<Snapshot> = None;
    let mut build = Duration::ZERO;
    let mut state = AdsState::new(Translator::new(), Node::default());
    state.start();
    for (i, kind) in [Kind::Cluster, Kind::Endpoints, Kind::Listener]
        .into_iter()
        .enumerate()
    {
        let items = wire
            .iter()
            .filter(|(u, _, _)| u == kind.type_url())
            .map(|(_, n, a)| (n.clone(), a.clone()))
            .collect();
        let mut apply = |spec: Spec| {
            snap = Some(Snapshot::build_after(spec, 1, snap.as_ref()).map_err(|e| e.to_string())?);
            Ok(())
        };
        state.on_response(response(kind.type_url(), i.to_string(), items), &mut apply);
    }
    assert!(state.delivered());
    let (_, name, any) = wire
        .iter()
        .find(|(u, _, _)| u == Kind::Endpoints.type_url())
        .unwrap();
    let la = ClusterLoadAssignment::decode(any.value.as_slice()).unwrap();
    // (`VEER_ROUNDS=1000` for a steadier mean where the scheduler's
    // counts are coarse.)
    let rounds: u32 = std::env::var("VEER_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40);
    let mut total = Duration::ZERO;
    for k in 0..rounds {
        let mut la = la.clone();
        la.endpoints[0].lb_endpoints.truncate(1 + (k as usize % 2));
        let any = envoy_types::pb::google::protobuf::Any {
            type_url: Kind::Endpoints.type_url().into(),
            value: la.encode_to_vec(),
        };
        let resp = response(
            Kind::Endpoints.type_url(),
            format!("e{k}"),
            vec![(name.clone(), any)],
        );
        let mut apply = |spec: Spec| {
            let t = thread_cpu();
            snap = Some(Snapshot::build_after(spec, 2, snap.as_ref()).map_err(|e| e.to_string())?);
            build += thread_cpu() - t;
            Ok(())
        };
        let t = thread_cpu();
        let out = state.on_response(resp, &mut apply);
        total += thread_cpu() - t;
        assert!(out.delivered);
    }
    let c = state.check().counts();
    eprintln!(
        "one endpoint change at n = {n}, CPU mean of {rounds}: on_response {:?}, of it build_after {:?} (translator: {c:?})",
        total / rounds,
        build / rounds,
    );
}
