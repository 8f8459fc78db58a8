//! The hook between the ADS client and `run`: a refused configuration is
//! answered `Err` (for a NACK) and the previous one keeps serving; the
//! first good one builds the snapshot.
use super::*;
use veer_testsupport::ca::TempDir;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

fn spec(dir: &TempDir) -> Spec {
    let ca = veer_ca::Ca::new_root(TD).unwrap();
    let leaf = ca.service_leaf("dc1", "api").unwrap();
    std::fs::write(dir.join("roots.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("leaf.pem"), &leaf.chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    let toml = format!(
        "[service]\nname = \"api\"\ndatacenter = \"dc1\"\ntrust_domain = \"{TD}\"\n\n\
         [tls]\nca_file = \"roots.pem\"\ncert_file = \"leaf.pem\"\nkey_file = \"key.pem\"\n\n\
         [inbound]\nbind = \"127.0.0.1:0\"\nlocal_app = \"127.0.0.1:1\"\n\n\
         [outbound]\nbind = \"127.0.0.1:0\"\nbind_ipv6 = \"\"\n"
    );
    std::fs::write(dir.join("veer.toml"), toml).unwrap();
    veer_core::config::load(&dir.join("veer.toml"))
        .unwrap()
        .spec
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn send(tx: &mpsc::Sender<XdsUpdate>, spec: Spec) -> oneshot::Receiver<Result<u64, String>> {
    let (applied, rx) = oneshot::channel();
    tx.send(XdsUpdate { spec, applied }).await.unwrap();
    rx
}

#[test]
fn first_waits_past_a_refused_configuration_and_follow_answers_each() {
    let d = TempDir::new("veer-xds-feed");
    let good = spec(&d);
    let mut bad = good.clone();
    bad.roots.clear();
    rt().block_on(async {
        let (tx, updates) = mpsc::channel(1);
        let mut feed = XdsFeed {
            updates,
            status: XdsStatus::unconnected(),
        };
        let t = tokio::spawn(async move {
            let r1 = send(&tx, bad).await;
            let r2 = send(&tx, good.clone()).await;
            (tx, good, r1.await.unwrap(), r2.await.unwrap())
        });
        let shared = first(&mut feed).await.unwrap();
        let (tx, good, r1, r2) = t.await.unwrap();
        assert_eq!(r1, Err("no roots".to_string()));
        assert_eq!(r2, Ok(1));
        assert_eq!(shared.snapshot().version, 1);

        let f = tokio::spawn(follow(feed, shared.clone()));
        let mut bad = good.clone();
        bad.roots.clear();
        assert_eq!(send(&tx, bad).await.await.unwrap(), Err("no roots".into()));
        assert_eq!(
            shared.snapshot().version,
            1,
            "the old snapshot keeps serving"
        );
        let v = send(&tx, good).await.await.unwrap().unwrap();
        assert!(v > 1, "{v}");
        assert_eq!(shared.snapshot().version, v);
        drop(tx);
        f.await.unwrap();
    });
}

#[test]
fn a_feed_closed_before_the_first_configuration_is_an_error() {
    rt().block_on(async {
        let (tx, updates) = mpsc::channel::<XdsUpdate>(1);
        drop(tx);
        let e = first(&mut XdsFeed {
            updates,
            status: XdsStatus::unconnected(),
        })
        .await
        .err()
        .unwrap();
        assert!(e.contains("before the first configuration"), "{e}");
    });
}

#[test]
fn static_listeners_from_a_dataplane_bootstrap() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crates/veer-xds/tests/fixtures/bootstrap/dataplane-28a963a/custom-prometheus-scrape-path.json");
    let doc = veer_xds::bootstrap::read_config(Some(&p), None).unwrap();
    let b = veer_xds::bootstrap::parse(doc, Default::default()).unwrap();
    let l = static_listeners(&b);
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].name, "envoy_prometheus_metrics_listener");
    assert!(matches!(
        &l[0].routes[0].action,
        static_http::Action::Forward { prefix_rewrite: Some(r), .. } if r == "/stats/prometheus"
    ));
    assert_eq!(static_connect_timeout(&b), Duration::from_secs(5));
}
