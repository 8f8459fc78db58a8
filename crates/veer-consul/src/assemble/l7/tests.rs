use super::*;
use crate::api;
use veer_core::l7::PathMatch;
use veer_core::spiffe::ServiceId;

const TD: &str = "f08cada1-f2ba-9feb-c2ae-6858ba45a30f.consul";

fn registration(protocol: Option<&str>) -> Registration {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/1.8.7-agent-service-web-sidecar.json");
    let mut raw: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    raw["Proxy"]["Config"] = match protocol {
        Some(p) => serde_json::json!({ "protocol": p }),
        None => serde_json::json!({}),
    };
    api::parse_registration("web-sidecar-proxy", &serde_json::to_vec(&raw).unwrap())
        .unwrap()
        .0
}

#[test]
fn inbound_follows_the_registrations_protocol() {
    let rows = [
        (Some("http"), Protocol::Tcp, Some(Protocol::Http), 0),
        (Some("HTTP2"), Protocol::Tcp, Some(Protocol::Http2), 0),
        (Some("grpc"), Protocol::Http, Some(Protocol::Grpc), 0),
        (Some("tcp"), Protocol::Http, None, 0),
        (None, Protocol::Tcp, None, 0),
        // Central config off: service-defaults says http, the registration
        // nothing → L4, named.
        (None, Protocol::Http, None, 1),
    ];
    for (reg, central, want, named) in rows {
        let (mut w, mut u) = (Vec::new(), Vec::new());
        let got = inbound(
            &registration(reg),
            (central, "service-defaults web: Protocol"),
            &mut w,
            &mut u,
        );
        assert_eq!(got.as_ref().map(|i| i.protocol), want, "{reg:?}");
        if let Some(i) = got {
            assert_eq!(i.xfcc, Xfcc::Sanitize);
            assert_eq!((i.rbac, i.request_timeout), (None, None));
        }
        assert_eq!(u.len(), named, "{reg:?}: {u:?}");
        assert!(w.is_empty(), "{w:?}");
    }
    // An unknown protocol: a warning, L4.
    let mut w = Vec::new();
    let got = inbound(
        &registration(Some("bogus")),
        (Protocol::Tcp, ""),
        &mut w,
        &mut Vec::new(),
    );
    assert_eq!(got, None);
    assert!(w[0].contains("\"bogus\""), "{w:?}");
}

#[test]
fn http_upstream_without_a_chain_gets_consuls_default_route() {
    let id = ServiceId::new(TD, "default", "default", "dc1", "api");
    let mut u = UpstreamSpec::new(id.clone());
    u.endpoints = vec!["10.0.0.2:21000".parse().unwrap()];
    let state = State::default();
    let local = (TD, "default", "dc1");
    // tcp: L4.
    assert_eq!(upstream_routes(&u, None, &state, local, (None, None)), None);
    for p in [Protocol::Http, Protocol::Http2, Protocol::Grpc] {
        u.protocol = p;
        let h = upstream_routes(&u, None, &state, local, (None, None)).unwrap();
        assert_eq!(h.clusters.len(), 1);
        assert_eq!(h.clusters[0].name, id.sni());
        assert_eq!(h.clusters[0].targets, vec![u.primary()]);
        assert_eq!(h.clusters[0].protocol, p);
        assert_eq!(h.routes.len(), 1);
        assert_eq!(h.routes[0].matches.path, PathMatch::Any);
        assert_eq!(h.routes[0].action, RouteAction::to_cluster(0));
    }
    // A tcp chain with an http upstream (an explicit Config.protocol):
    // the chain's targets (primary + failover) as one cluster.
    let c = crate::chain::compile(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/chain/08a-post-override-protocol-tcp.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.http, None);
    let mut f = u.primary();
    f.identity = ServiceId::new(TD, "default", "default", "dc2", "api");
    u.failover = vec![f.clone()];
    let h = upstream_routes(&u, Some(&c), &state, local, (None, None)).unwrap();
    assert_eq!(h.clusters[0].targets, vec![u.primary(), f]);
}
