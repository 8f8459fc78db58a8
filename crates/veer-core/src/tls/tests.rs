use super::*;
use crate::authz::StringMatch;
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

/// Drives an in-memory handshake until it finishes or one side fails;
/// returns the client's and the server's errors.
fn drive(
    c: &mut rustls::ClientConnection,
    s: &mut rustls::ServerConnection,
) -> (Option<rustls::Error>, Option<rustls::Error>) {
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
        if let Err(e) = s.process_new_packets() {
            return (None, Some(e));
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
        }
        if let Err(e) = c.process_new_packets() {
            // Let the server read the client's alert, if any.
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            return (Some(e), s.process_new_packets().err());
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            // Deliver the session tickets the server sends after it.
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            return (c.process_new_packets().err(), None);
        }
    }
    panic!("handshake did not finish");
}

fn material(ca: &Ca, svc: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let leaf = ca.service_leaf("dc1", svc).unwrap();
    (
        parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap(),
        parse_key(leaf.key_pem.as_bytes(), "key").unwrap(),
    )
}

fn exact(svc: &str) -> Arc<[Matcher]> {
    let uri = ServiceId::new(TD, "default", "default", "dc1", svc).to_string();
    Arc::from(vec![StringMatch::exact(uri).compile().unwrap()])
}

/// An impostor with a valid leaf from the mesh CA but another identity
/// fails the handshake inside the client's certificate check: the server
/// never receives the client's certificate (so it cannot authenticate veer
/// and dial its app), and the failure is labelled `server_identity`.
#[test]
fn upstream_identity_is_checked_inside_the_handshake() {
    let ca = Ca::new_root(TD).unwrap();
    let roots = parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap();
    let store = Arc::new(root_store(&roots).unwrap());
    let (cc, ck) = material(&ca, "web");
    let base = client_config(cc, ck, &roots).unwrap();
    let to_api = upstream_client_config(&base, store.clone(), exact("api"));
    let name = ServerName::try_from("api.default.dc1.internal.td.consul").unwrap();

    let (sc, sk) = material(&ca, "db");
    let impostor = server_config(sc, sk, &roots).unwrap();
    let mut c = rustls::ClientConnection::new(to_api.clone(), name.clone()).unwrap();
    let mut s = rustls::ServerConnection::new(impostor).unwrap();
    let (ce, _) = drive(&mut c, &mut s);
    let ce = ce.expect("the client refuses the impostor");
    assert_eq!(classify_tls_error(&ce), "server_identity", "{ce}");
    assert!(ce.to_string().contains("/svc/db"), "{ce}");
    assert!(
        s.peer_certificates().is_none(),
        "the impostor received the client's certificate"
    );

    // The real api passes; a second connection with the same per-upstream
    // configuration resumes (the session store is the base's). rustls
    // resumes only with the very verifier that checked the session, so a
    // configuration with another verifier makes a full handshake: a ticket
    // never skips another upstream's identity check.
    let (sc, sk) = material(&ca, "api");
    let api = server_config(sc, sk, &roots).unwrap();
    let other_verifier = upstream_client_config(&base, store, exact("api"));
    let cases = [
        (to_api.clone(), rustls::HandshakeKind::Full),
        (to_api, rustls::HandshakeKind::Resumed),
        (other_verifier, rustls::HandshakeKind::Full),
    ];
    for (i, (cfg, want)) in cases.into_iter().enumerate() {
        let mut c = rustls::ClientConnection::new(cfg, name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(api.clone()).unwrap();
        assert_eq!(drive(&mut c, &mut s), (None, None), "case {i}");
        assert_eq!(c.handshake_kind(), Some(want), "case {i}");
        assert_eq!(
            peer_identity(s.peer_certificates().unwrap().first().unwrap())
                .unwrap()
                .service,
            "web"
        );
    }
}

/// Per-upstream roots: a server from another CA is trusted only by the
/// upstream configured with that CA.
#[test]
fn per_upstream_roots_and_san_matchers() {
    let ca = Ca::new_root(TD).unwrap();
    let other = Ca::new_root("peer.consul").unwrap();
    let roots = parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap();
    let other_roots = parse_certs(other.cert_pem.as_bytes(), "other").unwrap();
    let (cc, ck) = material(&ca, "web");
    let base = client_config(cc, ck, &roots).unwrap();
    let leaf = other.service_leaf("dc2", "billing").unwrap();
    let server = server_config(
        parse_certs(leaf.chain_pem.as_bytes(), "leaf").unwrap(),
        parse_key(leaf.key_pem.as_bytes(), "key").unwrap(),
        // The server trusts both, so only the client's check decides.
        &[roots.clone(), other_roots.clone()].concat(),
    )
    .unwrap();
    let name = ServerName::try_from("billing.default.dc2.external.peer.consul").unwrap();
    let prefix: Arc<[Matcher]> = Arc::from(vec![StringMatch::prefix(
        "spiffe://peer.consul/ns/default/dc/dc2/svc/",
    )
    .compile()
    .unwrap()]);
    let cases = [
        (
            root_store(&roots).unwrap(),
            prefix.clone(),
            Some("cert_untrusted"),
        ),
        (root_store(&other_roots).unwrap(), prefix, None),
        (
            root_store(&other_roots).unwrap(),
            exact("billing"),
            Some("server_identity"),
        ),
    ];
    for (i, (store, sans, want)) in cases.into_iter().enumerate() {
        let cfg = upstream_client_config(&base, Arc::new(store), sans);
        let mut c = rustls::ClientConnection::new(cfg, name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        let (ce, _) = drive(&mut c, &mut s);
        assert_eq!(
            ce.as_ref().map(classify_tls_error),
            want,
            "case {i}: {ce:?}"
        );
        assert_eq!(s.peer_certificates().is_some(), want.is_none(), "case {i}");
    }
}

#[test]
fn server_san_check_after_the_handshake_uses_the_same_matchers() {
    let ca = Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", "api").unwrap();
    assert!(check_server_sans(&leaf.der, &exact("api")).is_ok());
    let e = check_server_sans(&leaf.der, &exact("db")).unwrap_err();
    assert!(e.to_string().contains("/svc/api"), "{e}");
    assert!(e.to_string().contains("/svc/db"), "{e}");
    assert!(check_server_sans(b"junk", &exact("api")).is_err());
}

#[test]
fn peer_names_for_rbac() {
    let ca = Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", "web").unwrap();
    let p = peer(&leaf.der, TD).unwrap();
    assert_eq!(
        p.uris,
        vec!["spiffe://td.consul/ns/default/dc/dc1/svc/web".to_string()]
    );
    assert_eq!(p.id.as_ref().unwrap().service, "web");
    assert!(!p.subject.is_empty());
    // Another trust domain: the names stay, the Consul identity does not.
    let p = peer(&leaf.der, "other.consul").unwrap();
    assert_eq!(p.id, None);
    assert_eq!(p.uris.len(), 1);
    // No URI SAN: only the subject.
    let mut spec = LeafSpec::service(TD, "dc1", "web");
    spec.uris = vec![];
    let bare = ca.issue(&spec).unwrap();
    let p = peer(&bare.der, TD).unwrap();
    assert!(p.uris.is_empty() && p.id.is_none());
    assert!(p.subject.contains("web"), "{}", p.subject);
    assert_eq!(peer(b"junk", TD).unwrap_err().classify(), "bad_certificate");
}

/// A burst of 16 new connections to one upstream all resume once the store
/// holds enough tickets (rustls's own store keeps 8 per server, so 8 of
/// them made full handshakes); each connection brings back four; the
/// store keeps at most [`TICKETS_PER_UPSTREAM`].
#[test]
fn a_burst_of_new_connections_resumes() {
    let ca = Ca::new_root(TD).unwrap();
    let roots = parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap();
    let (sc, sk) = material(&ca, "api");
    let (cc, ck) = material(&ca, "web");
    let server = server_config(sc, sk, &roots).unwrap();
    let base = client_config(cc, ck, &roots).unwrap();
    let to_api = upstream_client_config(&base, Arc::new(root_store(&roots).unwrap()), exact("api"));
    let name = ServerName::try_from("api.default.dc1.internal.td.consul").unwrap();
    let start = || {
        (
            rustls::ClientConnection::new(to_api.clone(), name.clone()).unwrap(),
            rustls::ServerConnection::new(server.clone()).unwrap(),
        )
    };
    let (mut c, mut s) = start();
    assert_eq!(drive(&mut c, &mut s), (None, None));
    assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full));
    // 1 full + 4 resumed, one at a time: 4 + 4 * 3 = 16 tickets held.
    for _ in 0..4 {
        let (mut c, mut s) = start();
        assert_eq!(drive(&mut c, &mut s), (None, None));
        assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    }
    // 16 start before any finishes: each takes its own ticket.
    let mut burst: Vec<_> = (0..16).map(|_| start()).collect();
    for (i, (c, s)) in burst.iter_mut().enumerate() {
        assert_eq!(drive(c, s), (None, None), "connection {i}");
        assert_eq!(
            c.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "connection {i} of the burst"
        );
    }
    // Each brought back four; the store keeps the newest 16.
    let mut resumed = 0;
    let mut more: Vec<_> = (0..TICKETS_PER_UPSTREAM + 2).map(|_| start()).collect();
    for (c, s) in more.iter_mut() {
        assert_eq!(drive(c, s), (None, None));
        resumed += usize::from(c.handshake_kind() == Some(rustls::HandshakeKind::Resumed));
    }
    assert_eq!(resumed, TICKETS_PER_UPSTREAM);
}
