//! The long leak soak (issue 7): 100,000 connections of the hostile mix
//! (normal closes, half-closes, resets, denials, idle, half-close and
//! handshake timeouts) through both sidecars, in rounds, with each
//! sidecar's fds and RSS after every round. Off unless `VEER_SOAK=1`
//! (`VEER_SOAK_CONNECTIONS` sets the total); the suite runs a bounded
//! version in `tests/hostile.rs`.
mod support;
use std::sync::Arc;
use std::time::Instant;
use support::*;
use veer_testsupport::mesh::{self, Mesh};

#[test]
fn soak_100k_connections_leave_nothing_behind() {
    if std::env::var_os("VEER_SOAK").is_none() {
        eprintln!("soak skipped: set VEER_SOAK=1 to run it");
        return;
    }
    if !veer_testsupport::require_root("soak_100k_connections_leave_nothing_behind") {
        return;
    }
    raise_nofile(65536);
    let total: usize = std::env::var("VEER_SOAK_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let m = Arc::new(Mesh::with(
        &bin(),
        TIMERS,
        &format!("{}{TIMERS}", mesh::allow("web")),
    ));
    let warm = run_mix(&m, 1000, 16);
    assert!(warm.errors.is_empty(), "{:?}", warm.errors);
    quiesce(&m);
    let (web0, api0) = (figures(&m.web), figures(&m.api));
    let (cpu_web0, cpu_api0) = (cpu_time(pid(&m.web)), cpu_time(pid(&m.api)));
    eprintln!("idle after warm-up\n  web: {web0}\n  api: {api0}");
    let started = Instant::now();
    let rounds = 10;
    let mut errors = Vec::new();
    for round in 1..=rounds {
        let r = run_mix(&m, total / rounds, 16);
        errors.extend(r.errors);
        quiesce(&m);
        eprintln!(
            "round {round}/{rounds}: {} connections in {:?}\n  web: {}\n  api: {}",
            total / rounds * round,
            r.elapsed,
            figures(&m.web),
            figures(&m.api)
        );
    }
    let took = started.elapsed();
    let (web1, api1) = check_no_leaks(&m, web0, api0);
    eprintln!(
        "soak: {total} connections in {took:?} ({:.0}/s); CPU web {:?} api {:?}\n  web: {web0}\n   ->  {web1}\n  api: {api0}\n   ->  {api1}",
        total as f64 / took.as_secs_f64(),
        cpu_time(pid(&m.web)) - cpu_web0,
        cpu_time(pid(&m.api)) - cpu_api0,
    );
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
}
