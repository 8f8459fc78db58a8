//! An in-process veer (the real listeners and pipelines on loopback) built
//! from a TOML text, for tests that read its metrics directly.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio_rustls::TlsConnector;
use veer_ca::Ca;
use veer_proxy::accept::Listeners;
use veer_proxy::state::Shared;

pub const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

/// A temporary folder with a CA and leaves for `api` (the sidecar) and
/// `web` (the test's client), removed on drop.
pub struct Material {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Material {
    pub fn new() -> Material {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "veer-proxy-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = Ca::new_root(TD).unwrap();
        std::fs::write(dir.join("roots.pem"), &ca.cert_pem).unwrap();
        for svc in ["api", "web"] {
            let leaf = ca.service_leaf("dc1", svc).unwrap();
            std::fs::write(dir.join(format!("{svc}.pem")), &leaf.chain_pem).unwrap();
            std::fs::write(dir.join(format!("{svc}-key.pem")), &leaf.key_pem).unwrap();
        }
        Material { dir, ca }
    }

    /// The api sidecar's configuration: inbound and outbound on loopback
    /// (ephemeral ports), default allow, `extra` appended.
    pub fn config(&self, local_app: SocketAddr, extra: &str) -> String {
        format!(
            r#"[service]
name = "api"
datacenter = "dc1"
trust_domain = "{TD}"

[tls]
ca_file = "roots.pem"
cert_file = "api.pem"
key_file = "api-key.pem"

[inbound]
bind = "127.0.0.1:0"
local_app = "{local_app}"

[outbound]
bind = "127.0.0.1:0"
bind_ipv6 = ""

[admin]
bind = ""

[intentions]
default_action = "allow"
{extra}
"#
        )
    }

    /// Builds the state and starts the listeners.
    pub async fn start(&self, local_app: SocketAddr, extra: &str) -> (Arc<Shared>, Listeners) {
        let path = self.dir.join("veer.toml");
        std::fs::write(&path, self.config(local_app, extra)).unwrap();
        let loaded = veer_core::config::load(&path).unwrap();
        let shared = Shared::new(loaded.spec).unwrap();
        let l = Listeners::start(shared.clone()).await.unwrap();
        (shared, l)
    }

    /// A TLS connector presenting web's leaf.
    pub fn web_connector(&self) -> TlsConnector {
        let roots = veer_core::tls::load_certs(&self.dir.join("roots.pem")).unwrap();
        let chain = veer_core::tls::load_certs(&self.dir.join("web.pem")).unwrap();
        let key = veer_core::tls::load_key(&self.dir.join("web-key.pem")).unwrap();
        TlsConnector::from(veer_core::tls::client_config(chain, key, &roots).unwrap())
    }
}

impl Drop for Material {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The name veer's client verifier ignores (mesh leaves have no DNS name).
pub fn server_name() -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from("api.mesh").unwrap()
}

/// Waits until `f` holds, for up to `secs` seconds.
pub async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    f()
}

/// A local app on loopback that echoes each connection until EOF.
pub async fn echo_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                // Out of fds (a test may lower the limit): try again later.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}
