use super::*;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

#[test]
fn parses_default_partition() {
    let id = ServiceId::parse(&format!("spiffe://{TD}/ns/default/dc/dc1/svc/web")).unwrap();
    assert_eq!(id, ServiceId::new(TD, "default", "default", "dc1", "web"));
    assert_eq!(
        id.to_string(),
        format!("spiffe://{TD}/ns/default/dc/dc1/svc/web")
    );
    assert_eq!(id.sni(), format!("web.default.dc1.internal.{TD}"));
}

#[test]
fn parses_partition() {
    let id = ServiceId::parse(&format!("spiffe://{TD}/ap/team/ns/ns1/dc/dc2/svc/api")).unwrap();
    assert_eq!(id.partition, "team");
    assert_eq!(
        id.to_string(),
        format!("spiffe://{TD}/ap/team/ns/ns1/dc/dc2/svc/api")
    );
    assert_eq!(id.sni(), format!("api.ns1.team.dc2.internal-v1.{TD}"));
}

#[test]
fn refuses_odd_forms_each_with_its_reason() {
    let cases: &[(&str, &str)] = &[
        ("SPIFFE://td.consul/ns/default/dc/dc1/svc/web", "bad_scheme"),
        ("Spiffe://td.consul/ns/default/dc/dc1/svc/web", "bad_scheme"),
        ("https://td.consul/ns/default/dc/dc1/svc/web", "bad_scheme"),
        ("spiffe:/td.consul/ns/default/dc/dc1/svc/web", "bad_scheme"),
        (
            "spiffe://td.consul/ns/default/dc/dc1/svc/web/",
            "empty_segment",
        ),
        ("spiffe://td.consul/ns//dc/dc1/svc/web", "empty_segment"),
        (
            "spiffe://td.consul/ns/default/dc/dc1/svc/w%65b",
            "percent_encoded",
        ),
        (
            "spiffe://td.consul/ns/default/dc/dc1/svc/web?x=1",
            "extra_components",
        ),
        (
            "spiffe://td.consul/ns/default/dc/dc1/svc/web#f",
            "extra_components",
        ),
        (
            "spiffe://u@td.consul/ns/default/dc/dc1/svc/web",
            "extra_components",
        ),
        (
            "spiffe://td.consul:443/ns/default/dc/dc1/svc/web",
            "extra_components",
        ),
        (
            "spiffe://TD.consul/ns/default/dc/dc1/svc/web",
            "bad_trust_domain",
        ),
        ("spiffe:///ns/default/dc/dc1/svc/web", "bad_trust_domain"),
        (
            "spiffe://td.consul/ns/default/dc/dc1/svc/we b",
            "bad_character",
        ),
        (
            "spiffe://td.consul/agent/client/dc/dc1/id/abc",
            "not_a_service",
        ),
        ("spiffe://td.consul", "not_a_service"),
        ("spiffe://td.consul/ns/default/dc/dc1/svc", "not_a_service"),
        // Found by fuzzing: Display would drop the segment (non-canonical).
        (
            "spiffe://td.consul/ap/default/ns/default/dc/dc1/svc/web",
            "non_canonical",
        ),
        (
            "spiffe://td.consul/ns/default/dc/dc1/svc/web/extra",
            "not_a_service",
        ),
    ];
    for (uri, label) in cases {
        let err = ServiceId::parse(uri).expect_err(uri);
        assert_eq!(err.classify(), *label, "{uri}: {err}");
    }
}

#[test]
fn display_round_trips() {
    for uri in [
        "spiffe://a.consul/ns/default/dc/dc1/svc/web",
        "spiffe://a.consul/ap/p1/ns/n/dc/d/svc/s-1_x.y",
    ] {
        assert_eq!(ServiceId::parse(uri).unwrap().to_string(), uri);
    }
}
