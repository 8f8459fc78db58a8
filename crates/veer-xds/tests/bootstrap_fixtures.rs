//! Every sidecar bootstrap golden of consul-dataplane (HEAD 28a963a and
//! v1.1.0) and of Consul v1.16.0's `consul connect envoy` parses, or is
//! refused for the listed reason (see tests/fixtures/bootstrap/README.md).
use std::path::{Path, PathBuf};
use veer_xds::bootstrap::{self, Addr, Bootstrap, Options, PathMatch, RouteAction};

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bootstrap")
        .join(sub)
}

/// Goldens veer refuses, with the start of the error it must give.
const REFUSED: &[(&str, &str)] = &[
    // A template-override test: no dynamic_resources and a made-up field.
    (
        "consul-v1.16.0/custom-bootstrap.json",
        "dynamic_resources: required",
    ),
    // Concatenation tests with fake listeners that have only a name (Envoy
    // could not serve them either).
    (
        "consul-v1.16.0/extra_-multiple.json",
        "static_resources.listeners[0].address: required",
    ),
    (
        "consul-v1.16.0/extra_-single.json",
        "static_resources.listeners[0].address: required",
    ),
    // TLS on the Prometheus listener: veer serves static listeners as plain
    // HTTP/1.1 and refuses rather than serving metrics without the TLS asked for.
    (
        "consul-v1.16.0/prometheus-metrics-tls-ca-file.json",
        "static_resources.listeners[0].filter_chains[0].transport_socket: not supported",
    ),
    (
        "consul-v1.16.0/prometheus-metrics-tls-ca-path.json",
        "static_resources.listeners[0].filter_chains[0].transport_socket: not supported",
    ),
];

fn load(p: &Path) -> Result<Bootstrap, bootstrap::BootstrapError> {
    let doc = bootstrap::read_config(Some(p), None)?;
    bootstrap::parse(doc, Options::default())
}

fn all() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for sub in [
        "dataplane-28a963a",
        "dataplane-v1.1.0",
        "dataplane-releases",
        "consul-v1.16.0",
    ] {
        for e in std::fs::read_dir(dir(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "json") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

#[test]
fn every_sidecar_golden_parses_or_is_refused_with_its_reason() {
    let files = all();
    assert!(files.len() >= 55, "fixtures missing: {}", files.len());
    let mut parsed = 0;
    for p in &files {
        let rel = p
            .strip_prefix(dir(""))
            .unwrap()
            .to_string_lossy()
            .to_string();
        match (load(p), REFUSED.iter().find(|(f, _)| *f == rel)) {
            (Ok(b), None) => {
                assert!(!b.node.id.is_empty(), "{rel}: node.id");
                assert!(b.admin.is_some(), "{rel}: admin");
                assert!(matches!(b.ads.addr, Addr::Tcp(_) | Addr::Unix(_)), "{rel}");
                parsed += 1;
            }
            (Err(e), Some((_, want))) => {
                assert!(e.to_string().starts_with(want), "{rel}: {e}");
            }
            (Ok(_), Some((_, want))) => panic!("{rel}: accepted, expected {want}"),
            (Err(e), None) => panic!("{rel}: {e}"),
        }
    }
    assert_eq!(parsed, files.len() - REFUSED.len());
}

#[test]
fn dataplane_ready_listener_and_unix_socket() {
    let b = load(&dir("dataplane-28a963a/ready-listener.json")).unwrap();
    assert_eq!(b.node.id, "web-proxy");
    assert_eq!(b.node.metadata["node_name"], "agentless-node");
    assert_eq!(b.ads.cluster, "consul-dataplane");
    assert_eq!(b.ads.addr, Addr::Tcp("127.0.0.1:1234".parse().unwrap()));
    assert_eq!(b.ads.token(), None);
    let l = &b.listeners[0];
    assert_eq!(l.name, "envoy_ready_listener");
    assert_eq!(l.addr, "127.0.0.1:20000".parse().unwrap());
    assert_eq!(l.routes[0].path, PathMatch::Exact("/ready".into()));
    assert!(
        matches!(&l.routes[0].action, RouteAction::Forward { cluster, addr, prefix_rewrite }
        if cluster == "self_admin" && addr.port() == 19000 && prefix_rewrite.as_deref() == Some("/ready"))
    );
    assert_eq!(l.routes[1].path, PathMatch::Prefix("/".into()));
    assert!(matches!(
        l.routes[1].action,
        RouteAction::Direct { status: 404, .. }
    ));
    // Its stats tags name the envoy_* metrics' labels: taken, not ignored.
    assert!(
        !b.ignored.iter().any(|i| i.starts_with("stats_config")),
        "{:?}",
        b.ignored
    );
    let rules =
        veer_core::stats_tags::TagRules::from_stats_config(b.stats_config.as_ref().unwrap())
            .unwrap();
    assert_eq!(rules.rules().len(), 20);

    let b = load(&dir("dataplane-v1.1.0/unix-socket-xds-server.json")).unwrap();
    assert!(matches!(b.ads.addr, Addr::Unix(_)), "{:?}", b.ads.addr);
}

#[test]
fn consul_agent_token_tls_and_prometheus() {
    let b = load(&dir("consul-v1.16.0/token-arg.json")).unwrap();
    assert_eq!(b.ads.cluster, "local_agent");
    assert!(b.ads.token().is_some());
    let b = load(&dir("consul-v1.16.0/grpc-addr-unix-with-tls.json")).unwrap();
    assert!(matches!(b.ads.addr, Addr::Unix(_)));
    assert!(b.ads.tls.is_some());
    let b = load(&dir("consul-v1.16.0/prometheus-metrics.json")).unwrap();
    let l = b
        .listeners
        .iter()
        .find(|l| l.name == "envoy_prometheus_metrics_listener")
        .unwrap();
    assert!(
        matches!(&l.routes[0].action, RouteAction::Forward { cluster, prefix_rewrite, .. }
        if cluster == "prometheus_backend" && prefix_rewrite.as_deref() == Some("/stats/prometheus"))
    );
}

/// Every bootstrap Consul v1.16 and consul-dataplane generate has stats
/// tags veer takes; a bad regex is refused naming its field.
#[test]
fn stats_tags_of_every_fixture_are_taken_and_a_bad_one_is_refused() {
    for d in ["consul-v1.16.0", "dataplane-28a963a", "dataplane-v1.1.0"] {
        for f in std::fs::read_dir(dir(d)).unwrap() {
            let p = f.unwrap().path();
            let Ok(b) = load(&p) else { continue };
            if let Some(sc) = &b.stats_config {
                veer_core::stats_tags::TagRules::from_stats_config(sc)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
    let text = std::fs::read_to_string(dir("dataplane-28a963a/basic.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["stats_config"]["stats_tags"][2]["regex"] = "(unclosed".into();
    let e = veer_xds::bootstrap::parse(v, Default::default()).unwrap_err();
    assert!(e.to_string().contains("stats_config"), "{e}");
    assert!(e.to_string().contains("stats_tags[2]"), "{e}");
}
