//! Shared test support for veer's crates and end-to-end tests.
//!
//! - [`netns`]: real network namespaces and veth pairs (needs root), with a loud
//!   skip when not root.
//! - [`consul`]: a real Consul dev agent on a Unix socket, reachable from every namespace.
//! - [`consul_xds`]: Consul-shaped xDS resources (mirroring Consul v1.16.0 goldens).
//! - [`ca`]: a Consul-style test CA on top of `veer-ca`, written to a temp dir.
//! - [`echo`]: a scriptable blocking TCP app that records what it sees.
//! - [`mesh`]: two namespaces, redirect rules and two real veer sidecars.
//! - [`xds`]: a Consul-like Delta ADS server serving what a test sets.
pub mod ca;
pub mod consul;
pub mod consul_xds;
pub mod echo;
pub mod envoy;
pub mod http;
pub mod http_app;
pub mod mesh;
pub mod netns;
pub mod xds;

/// Returns true when the test may run; prints a loud SKIP line otherwise.
/// Tests that need root call this first and return early when it is false,
/// unless `VEER_REQUIRE_ROOT=1` is set (as in CI), in which case they panic.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip(
        test,
        "needs root (network namespaces, iptables); run as root",
    );
    false
}

/// Skips a test that cannot run here, loudly: the line goes straight to the
/// process's stderr, past the test harness's output capture, so a plain
/// `cargo test` shows it. With `VEER_REQUIRE_ROOT` set (to anything but
/// `0`, as in CI, where everything is installed) it panics instead.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("VEER_REQUIRE_ROOT").is_some_and(|v| v != "0") {
        panic!("{test}: {why}, and VEER_REQUIRE_ROOT is set: it must run here");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// Whether this process runs as root (the owner of `/proc/self` is the
/// effective UID).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// A unique-enough suffix for names of namespaces, files and chains made by one test process.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Path of a tool installed by `.ci/install-deps` (consul, envoy), or from PATH.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("VEER_TOOLS").unwrap_or_else(|| "/opt/veer-tools".into());
    let p = std::path::Path::new(&dir).join("bin").join(name);
    if p.exists() {
        return Some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}
