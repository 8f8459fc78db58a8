//! CA material written to a temporary folder, as veer's config names it.
use std::path::{Path, PathBuf};
use veer_ca::{Ca, LeafSpec};

/// The trust domain tests use, shaped like Consul's (`<uuid>.consul`).
pub const TRUST_DOMAIN: &str = "11111111-2222-3333-4444-555555555555.consul";

/// A temporary folder (mode 0755, so a sidecar running as another UID can
/// read it), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(crate::unique(prefix));
        std::fs::create_dir_all(&p).expect("temp dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Writes a file atomically (temp file + rename), as a control plane would.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, &p).expect("rename");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("VEER_KEEP_TEST_FILES").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A test CA whose root is written to `roots.pem` in its folder.
pub struct TestCa {
    pub ca: Ca,
    pub dir: TempDir,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> TestCa {
        let ca = Ca::new_root(trust_domain).expect("CA");
        let dir = TempDir::new("veer-ca-");
        dir.write("roots.pem", &ca.cert_pem);
        TestCa { ca, dir }
    }

    pub fn roots(&self) -> PathBuf {
        self.dir.join("roots.pem")
    }

    /// Writes a leaf as `<name>.pem` / `<name>-key.pem`; returns both paths.
    pub fn write_leaf(&self, name: &str, spec: &LeafSpec) -> (PathBuf, PathBuf) {
        let leaf = self.ca.issue(spec).expect("leaf");
        (
            self.dir.write(&format!("{name}.pem"), &leaf.chain_pem),
            self.dir.write(&format!("{name}-key.pem"), &leaf.key_pem),
        )
    }

    /// A Consul-style leaf for `service` in dc1.
    pub fn service(&self, service: &str) -> (PathBuf, PathBuf) {
        self.write_leaf(
            service,
            &LeafSpec::service(&self.ca.trust_domain, "dc1", service),
        )
    }
}
