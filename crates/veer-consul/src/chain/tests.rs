//! Chain compiler tests. The fixtures are real Consul 1.8.7 answers from
//! the project's reference `chain-samples/` (see
//! `tests/fixtures/chain/README.md`).
use super::*;

const TD: &str = "f08cada1-f2ba-9feb-c2ae-6858ba45a30f.consul";

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chain")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids(c: &Compiled) -> Vec<&str> {
    c.targets.iter().map(|t| t.id.as_str()).collect()
}

/// (fixture, targets, connect timeout in ms, default, gateway mode of the
/// first, unapplied lines)
type Row<'a> = (&'a str, &'a [&'a str], u64, bool, GatewayMode, usize);

#[test]
fn samples_compile_to_targets_in_failover_order() {
    let rows: &[Row] = &[
        (
            "01-tcp-default.json",
            &["db.default.dc1"],
            5000,
            true,
            GatewayMode::Default,
            0,
        ),
        (
            "03-resolver-subsets.json",
            &["v1.api.default.dc1"],
            3000,
            false,
            GatewayMode::Default,
            0,
        ),
        // router → splitter (90 v1 / 10 v2) → v1 for L4; the L7 parts are
        // compiled (chain/http/tests.rs), not named.
        (
            "05-router-splitter-resolver.json",
            &["v1.api.default.dc1"],
            3000,
            false,
            GatewayMode::Default,
            0,
        ),
        (
            "06a-redirect-dc2-legacy.json",
            &["legacy.default.dc2"],
            5000,
            false,
            GatewayMode::Default,
            0,
        ),
        // failover "*" = dc2, expanded per subset; the catch-all → splitter → v1.
        (
            "07-failover.json",
            &["v1.api.default.dc1", "v1.api.default.dc2"],
            3000,
            false,
            GatewayMode::Default,
            0,
        ),
        (
            "08b-post-override-timeout-meshgw.json",
            &["legacy.default.dc2"],
            7000,
            false,
            GatewayMode::Remote,
            0,
        ),
        // compiled in dc2: the failover to its own DC is gone.
        (
            "09a-compile-dc-dc2-via-dc1.json",
            &["v1.api.default.dc2"],
            3000,
            false,
            GatewayMode::Default,
            0,
        ),
        (
            "10-meshgw-local.json",
            &["legacy.default.dc2"],
            5000,
            false,
            GatewayMode::Local,
            0,
        ),
        (
            "11-external-sni.json",
            &["ext.default.dc1"],
            5000,
            true,
            GatewayMode::Default,
            0,
        ),
    ];
    for (file, want, ms, default, gw, unapplied) in rows {
        let c = compile(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(ids(&c), *want, "{file}");
        assert_eq!(c.connect_timeout, Duration::from_millis(*ms), "{file}");
        assert_eq!(c.default, *default, "{file}");
        assert_eq!(c.targets[0].mesh_gateway, *gw, "{file}");
        assert_eq!(c.unapplied.len(), *unapplied, "{file}: {:?}", c.unapplied);
    }
}

#[test]
fn targets_carry_sni_subset_filter_and_datacenter() {
    let c = compile(&fixture("07-failover.json")).unwrap();
    assert_eq!(c.service, "api");
    assert_eq!(c.protocol, "http");
    let (p, f) = (&c.targets[0], &c.targets[1]);
    assert_eq!(p.sni, format!("v1.api.default.dc1.internal.{TD}"));
    assert_eq!(f.sni, format!("v1.api.default.dc2.internal.{TD}"));
    assert_eq!(
        (p.datacenter.as_str(), f.datacenter.as_str()),
        ("dc1", "dc2")
    );
    assert_eq!(p.filter.as_deref(), Some("Service.Meta.version == v1"));
    assert_eq!(f.filter, p.filter);
    assert_eq!((p.service.as_str(), p.subset.as_str()), ("api", "v1"));
    assert!(!p.only_passing);
    assert!(c.unapplied.is_empty(), "{:?}", c.unapplied);
    // A router on a chain that is not http-like (only an override can
    // leave one) is named, and L4 takes the catch-all and heaviest split.
    let body = edit("07-failover.json", |v| {
        v["Chain"]["Protocol"] = "tcp".into()
    });
    let t = compile(&body).unwrap();
    assert_eq!(t.http, None);
    assert!(
        t.unapplied[0].starts_with("router:api.default: 5 routes"),
        "{:?}",
        t.unapplied
    );
    assert!(
        t.unapplied[1].contains("heaviest split, 90%"),
        "{:?}",
        t.unapplied
    );
    // The default chain has no filter and Consul's SNI.
    let d = compile(&fixture("01-tcp-default.json")).unwrap();
    assert_eq!(d.targets[0].filter, None);
    assert_eq!(d.targets[0].sni, format!("db.default.dc1.internal.{TD}"));
    // ExternalSNI replaces the SNI.
    let e = compile(&fixture("11-external-sni.json")).unwrap();
    assert_eq!(e.targets[0].sni, "ext.example.com");
}

fn edit(file: &str, f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&fixture(file)).unwrap();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn what_consul_stores_unchecked_is_refused_by_field() {
    let t = "legacy.default.dc2";
    let rows: Vec<(Vec<u8>, &str)> = vec![
        (
            edit("06a-redirect-dc2-legacy.json", |v| {
                v["Chain"]["Targets"][t]["MeshGateway"]["Mode"] = "bogus".into()
            }),
            "MeshGateway.Mode \"bogus\"",
        ),
        (
            edit("06a-redirect-dc2-legacy.json", |v| {
                v["Chain"]["Nodes"]["resolver:legacy.default.dc2"]["Resolver"]["ConnectTimeout"] =
                    "-1s".into()
            }),
            "ConnectTimeout",
        ),
        (
            edit("06a-redirect-dc2-legacy.json", |v| {
                v["Chain"]["StartNode"] = "resolver:nope".into()
            }),
            "\"resolver:nope\" is named but not in Nodes",
        ),
        (
            edit("06a-redirect-dc2-legacy.json", |v| {
                v["Chain"]["Targets"].as_object_mut().unwrap().remove(t);
            }),
            "is named but not in Targets",
        ),
        (b"{}".to_vec(), "unexpected JSON"),
    ];
    for (body, want) in rows {
        let e = compile(&body).unwrap_err();
        assert!(e.to_string().contains(want), "{e} (want {want})");
        assert_eq!(e.classify(), "decode");
    }
}

#[test]
fn go_durations() {
    for (s, ms) in [
        ("5s", 5000),
        ("1m0s", 60_000),
        ("1.5s", 1500),
        ("250ms", 250),
        ("0s", 0),
    ] {
        assert_eq!(go_duration(s).unwrap(), Duration::from_millis(ms), "{s}");
    }
    for s in ["", "-1s", "5", "s", "1x"] {
        assert!(go_duration(s).is_err(), "{s}");
    }
}
