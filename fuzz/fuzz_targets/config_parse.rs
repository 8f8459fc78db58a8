//! `config::parse(text, path)` on arbitrary text.
//!
//! A temporary directory, made once per process, holds a valid root, a leaf
//! for `api` in `dc1` of the trust domain below and its key, under the names
//! the seed configurations use (`roots.pem`, `leaf.pem`, `key.pem`), plus a
//! few wrong files (another service's leaf and key, an expired leaf, an empty
//! file, garbage, a root of another CA) so that the certificate checks run.
//!
//! Invariants:
//! - never panics;
//! - every `Err` has a non-empty message, names the file, and when it has a
//!   line, the line is within the text (1 ..= number of '\n' + 1);
//! - on `Ok`, the identities it built print as SPIFFE IDs that parse back to
//!   the same identities, and no virtual IP is claimed twice (comparing
//!   `::ffff:a.b.c.d` and `a.b.c.d` as one address, as routing does).
//!
//! The configuration can name any file. So that the fuzzer never reads
//! outside its directory (`/dev/zero`, `/dev/stdin`...), inputs whose
//! `[tls]` file names hold a `/` are skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;
use veer_ca::{Ca, LeafSpec};
use veer_core::spiffe::ServiceId;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        // Directories of earlier runs whose process is gone.
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("veer-fuzz-config-") {
                    if !PathBuf::from(format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = tmp.join(format!("veer-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = Ca::new_root(TD).expect("root");
        let leaf = ca.service_leaf("dc1", "api").expect("leaf");
        let other = ca.service_leaf("dc1", "web").expect("leaf");
        let expired = ca
            .issue(&LeafSpec::service(TD, "dc1", "api").valid_between(-7200, -3600))
            .expect("leaf");
        let foreign = Ca::new_root(TD).expect("root");
        let w = |n: &str, d: &[u8]| std::fs::write(dir.join(n), d).expect("write");
        w("roots.pem", ca.cert_pem.as_bytes());
        w("leaf.pem", leaf.chain_pem.as_bytes());
        w("key.pem", leaf.key_pem.as_bytes());
        w("other.pem", other.chain_pem.as_bytes());
        w("other-key.pem", other.key_pem.as_bytes());
        w("expired.pem", expired.chain_pem.as_bytes());
        w("foreign-roots.pem", foreign.cert_pem.as_bytes());
        w("empty.pem", b"");
        w(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        );
        dir
    })
}

/// Whether the configuration can only make `parse` read files inside `dir()`.
fn stays_inside(text: &str) -> bool {
    // Fast path: no '/' at all, and no escape that could spell one.
    if !text.contains('/') && !text.contains("\\u") && !text.contains("\\U") {
        return true;
    }
    let Ok(doc) = text.parse::<toml::Table>() else {
        // Not TOML: `parse` stops before reading any file.
        return true;
    };
    let Some(toml::Value::Table(tls)) = doc.get("tls") else {
        return true;
    };
    ["ca_file", "cert_file", "key_file"]
        .iter()
        .all(|k| match tls.get(*k) {
            Some(toml::Value::String(s)) => !s.contains('/'),
            _ => true,
        })
}

fn check_roundtrip(id: &ServiceId) {
    let s = id.to_string();
    let back = ServiceId::parse(&s).unwrap_or_else(|e| panic!("{s:?} does not parse: {e}"));
    assert_eq!(&back, id, "{s:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !stays_inside(text) {
        return;
    }
    let path = dir().join("veer.toml");
    match veer_core::config::parse(text, &path) {
        Ok(loaded) => {
            check_roundtrip(&loaded.spec.identity);
            for u in &loaded.spec.upstreams {
                check_roundtrip(&u.identity);
            }
            let mut vips: Vec<std::net::IpAddr> = loaded
                .spec
                .upstreams
                .iter()
                .flat_map(|u| u.virtual_ips.iter())
                .map(|ip| veer_core::addr::canonical(std::net::SocketAddr::new(*ip, 0)).ip())
                .collect();
            let n = vips.len();
            vips.sort();
            vips.dedup();
            assert_eq!(
                vips.len(),
                n,
                "a virtual IP is claimed twice: {:?}",
                loaded.spec.upstreams
            );
            assert_eq!(loaded.files.len(), 4);
            assert_eq!(loaded.files[0], path);
        }
        Err(e) => {
            assert!(!e.msg.trim().is_empty(), "empty message: {e:?}");
            assert_eq!(e.file, path.display().to_string());
            if let Some(line) = e.line {
                let lines = text.matches('\n').count() + 1;
                assert!(
                    (1..=lines).contains(&line),
                    "line {line} outside the text ({lines} lines): {e:?}"
                );
            }
            if let Some(k) = &e.key {
                assert!(!k.is_empty(), "empty key: {e:?}");
            }
            assert!(!e.to_string().is_empty());
        }
    }
});
