use super::*;
use veer_ca::{Ca, LeafSpec};

const TD: &str = "td.consul";

#[test]
fn identity_from_consul_style_leaf() {
    let ca = Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", "web").unwrap();
    let id = peer_identity(&leaf.der).unwrap();
    assert_eq!(id, ServiceId::new(TD, "default", "default", "dc1", "web"));
    let info = CertInfo::parse(&leaf.der).unwrap();
    assert!(!info.is_ca);
    assert!(info.not_after - info.not_before >= 72 * 3600);
}

#[test]
fn odd_uri_sans_are_refused_with_reasons() {
    let ca = Ca::new_root(TD).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "no_uri_san"),
        (
            vec![
                "spiffe://td.consul/ns/default/dc/dc1/svc/web".into(),
                "spiffe://td.consul/ns/default/dc/dc1/svc/admin".into(),
            ],
            "multiple_uri_sans",
        ),
        (
            vec!["SPIFFE://td.consul/ns/default/dc/dc1/svc/web".into()],
            "bad_scheme",
        ),
        (
            vec!["spiffe://td.consul/ns/default/dc/dc1/svc/web/".into()],
            "empty_segment",
        ),
        (
            vec!["spiffe://td.consul/ns/default/dc/dc1/svc/w%65b".into()],
            "percent_encoded",
        ),
    ];
    for (uris, label) in cases {
        let mut spec = LeafSpec::service(TD, "dc1", "web");
        spec.uris = uris.clone();
        let leaf = ca.issue(&spec).unwrap();
        let e = peer_identity(&leaf.der).unwrap_err();
        assert_eq!(e.classify(), label, "{uris:?}: {e}");
    }
    assert_eq!(
        peer_identity(b"garbage").unwrap_err().classify(),
        "bad_certificate"
    );
}

#[test]
fn configs_build_from_generated_material() {
    let ca = Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", "web").unwrap();
    let roots = parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap();
    let chain = parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap();
    let key = parse_key(leaf.key_pem.as_bytes(), "key").unwrap();
    server_config(chain.clone(), key.clone_key(), &roots).unwrap();
    client_config(chain, key, &roots).unwrap();
    assert!(matches!(parse_key(b"nope", "k"), Err(TlsError::NoKey(_))));
    assert!(matches!(
        parse_certs(b"", "c"),
        Err(TlsError::NoCertificate(_))
    ));
}

/// Two veer sidecars agree on TLS 1.3 with AES-128-GCM (as Envoy would),
/// and a second connection resumes the session (no certificate exchange).
#[test]
fn sidecars_negotiate_aes128_and_resume() {
    let ca = Ca::new_root(TD).unwrap();
    let roots = parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap();
    let material = |svc: &str| {
        let leaf = ca.service_leaf("dc1", svc).unwrap();
        (
            parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap(),
            parse_key(leaf.key_pem.as_bytes(), "key").unwrap(),
        )
    };
    let (sc, sk) = material("api");
    let (cc, ck) = material("web");
    let server = server_config(sc, sk, &roots).unwrap();
    let client = client_config(cc, ck, &roots).unwrap();
    let name = ServerName::try_from("api.default.dc1.internal.td.consul").unwrap();
    let handshake = || {
        let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        let mut buf = Vec::new();
        for _ in 0..10 {
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().unwrap();
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        (c, s)
    };
    let (c, s) = handshake();
    assert_eq!(
        c.negotiated_cipher_suite().unwrap().suite(),
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
    assert!(s.peer_certificates().is_some());
    let (c2, s2) = handshake();
    assert_eq!(c2.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    // The resumed session still knows the client's identity.
    let leaf = s2.peer_certificates().unwrap().first().unwrap().clone();
    assert_eq!(peer_identity(&leaf).unwrap().service, "web");
}
