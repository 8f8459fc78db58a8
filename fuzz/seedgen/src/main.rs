//! Writes DER certificates from veer-ca, with ordinary and odd URI SANs, as
//! seeds for the `uri_san` fuzz target. Usage: `veer-fuzz-seedgen <dir>`.
use std::path::PathBuf;
use veer_ca::{Ca, LeafSpec};

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

fn der_of_pem(pem: &str) -> Vec<u8> {
    // First PEM block only; enough for the certificates veer-ca writes.
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    decode_b64(&b64)
}

fn decode_b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        let k = chunk.len() - 1;
        for i in 0..k {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .expect("usage: veer-fuzz-seedgen <dir>"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new_root(TD).unwrap();
    let inter = ca.intermediate("Consul CA secondary").unwrap();
    let svc = |uris: &[&str]| {
        let mut s = LeafSpec::service(TD, "dc1", "api");
        s.uris = uris.iter().map(|u| u.to_string()).collect();
        s
    };
    let td_uri = |path: &str| format!("spiffe://{TD}{path}");
    let write =
        |name: &str, der: Vec<u8>| std::fs::write(dir.join(format!("{name}.der")), der).unwrap();

    write("root", der_of_pem(&ca.cert_pem));
    write("intermediate", der_of_pem(&inter.cert_pem));
    write("leaf", ca.service_leaf("dc1", "api").unwrap().der);
    write(
        "leaf-via-intermediate",
        inter.service_leaf("dc2", "web").unwrap().der,
    );
    let odd: &[(&str, Vec<String>)] = &[
        (
            "partition",
            vec![td_uri("/ap/team1/ns/default/dc/dc1/svc/api")],
        ),
        (
            "ap-default",
            vec![td_uri("/ap/default/ns/default/dc/dc1/svc/api")],
        ),
        (
            "two-uris",
            vec![
                td_uri("/ns/default/dc/dc1/svc/api"),
                td_uri("/ns/default/dc/dc1/svc/web"),
            ],
        ),
        ("no-san", vec![]),
        (
            "https-uri",
            vec!["https://example.com/ns/default/dc/dc1/svc/api".into()],
        ),
        (
            "uppercase-scheme",
            vec![format!("SPIFFE://{TD}/ns/default/dc/dc1/svc/api")],
        ),
        ("percent", vec![td_uri("/ns/default/dc/dc1/svc/a%70i")]),
        ("agent", vec![td_uri("/agent/client/dc/dc1/id/0b0e7a3c")]),
        ("query", vec![td_uri("/ns/default/dc/dc1/svc/api?x=1")]),
        (
            "trailing-slash",
            vec![td_uri("/ns/default/dc/dc1/svc/api/")],
        ),
    ];
    for (name, uris) in odd {
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        write(name, ca.issue(&svc(&uris)).unwrap().der);
    }
    write(
        "expired",
        ca.issue(&LeafSpec::service(TD, "dc1", "api").valid_between(-7200, -3600))
            .unwrap()
            .der,
    );
    let mut no_usage = LeafSpec::service(TD, "dc1", "api");
    no_usage.client_auth = false;
    no_usage.server_auth = false;
    write("code-signing-only", ca.issue(&no_usage).unwrap().der);
}
