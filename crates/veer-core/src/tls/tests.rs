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
