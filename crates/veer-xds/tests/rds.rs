//! RDS over the real Delta ADS client and the real translation, against
//! the Consul-like ADS server (`veer_testsupport::xds`), with the resources
//! of Consul v1.16.0's `connect-proxy-with-chain-and-router` golden
//! (`veer_testsupport::consul_xds::l7`): the HCM's route configuration is
//! asked for by name, waited for (readiness says so), applied, updated,
//! and a bad version is NACKed naming the route and field while the last
//! good one keeps serving.
use envoy_types::pb::envoy::config::route::v3::{route_match, RouteMatch};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use veer_core::snapshot::Spec;
use veer_testsupport::consul_xds::{self as cx, l7, Params};
use veer_testsupport::xds::{any_of, XdsServer, CDS, EDS, LDS, RDS};
use veer_xds::ads::{run, AdsConfig, AdsStatus, NodeInfo, Server};
use veer_xds::translate::Translator;

const T: Duration = Duration::from_secs(10);

fn node() -> NodeInfo {
    let mut metadata = serde_json::Map::new();
    metadata.insert("namespace".into(), "default".into());
    NodeInfo {
        id: "web-sidecar-proxy".into(),
        cluster: "web".into(),
        metadata,
    }
}

/// Routes of the `db` upstream in a spec.
fn db_routes(s: &Spec) -> usize {
    s.upstreams
        .iter()
        .find(|u| u.identity.service == "db")
        .and_then(|u| u.http.as_ref())
        .map_or(0, |h| h.routes.len())
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Spec>) -> Spec {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("a spec in time")
        .expect("client running")
}

#[tokio::test]
async fn rds_subscribed_waited_for_applied_updated_and_nacked() {
    let ca = veer_ca::Ca::new_root(veer_testsupport::ca::TRUST_DOMAIN).expect("ca");
    let p = Params::golden(cx::Certs::issue(&ca, "dc1", "web"));
    let x = l7::chain_and_router(&p);
    let server = XdsServer::tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // Everything but the route configuration.
    let items: Vec<(String, String, _)> = x
        .resources()
        .into_iter()
        .filter(|(ty, _, _)| ty != RDS)
        .collect();
    server.set_all(
        items
            .iter()
            .map(|(t, n, a)| (t.as_str(), n.as_str(), a.clone()))
            .collect(),
    );
    let a = server.addr().unwrap();
    let cfg = AdsConfig::new(
        Server::Tcp {
            host: a.ip().to_string(),
            port: a.port(),
        },
        node(),
    );
    let (tx, mut specs) = mpsc::unbounded_channel();
    let (stx, mut status) = watch::channel(AdsStatus::default());
    let task = tokio::spawn(async move {
        let r = run(
            cfg,
            Translator::new(),
            move |s: Spec| {
                let _ = tx.send(s);
                Ok(())
            },
            stx,
        )
        .await;
        panic!("run returned: {r:?}");
    });

    // The listener's RDS name is asked for, and readiness waits for it.
    assert!(
        server
            .wait_for(T, |reqs, _| reqs
                .iter()
                .any(|r| r.type_url() == RDS
                    && r.req.resource_names_subscribe.iter().any(|n| n == "db")))
            .await,
        "RDS db subscribed"
    );
    let want = format!("route db (RDS), named by listener db:{}", p.db_bind);
    tokio::time::timeout(T, async {
        loop {
            if status.borrow().waiting_for.contains(&want) {
                break;
            }
            status.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("waiting for {want:?}: {:?}", status.borrow().waiting_for));
    assert!(!status.borrow().applied);
    assert!(specs.try_recv().is_err(), "no spec before the routes");

    // The routes arrive: a spec with the router's 23 routes.
    let rc = l7::router_routes(&p);
    server.set(RDS, "db", any_of(&rc));
    let s = next(&mut specs).await;
    assert_eq!(db_routes(&s), 23);
    assert_eq!(s.source, "xds");

    // An update to the routes alone is applied.
    let mut fewer = rc.clone();
    fewer.virtual_hosts[0].routes.remove(0);
    server.set(RDS, "db", any_of(&fewer));
    let s = next(&mut specs).await;
    assert_eq!(db_routes(&s), 22);

    // A bad regex: NACKed naming the route and field, nothing applied.
    let mut bad = fewer.clone();
    bad.virtual_hosts[0].routes[1].r#match = Some(RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: "(unclosed".into(),
            ..Default::default()
        })),
        ..Default::default()
    });
    server.set(RDS, "db", any_of(&bad));
    let field = "route db: virtual_hosts[0].routes[1].match.safe_regex.regex";
    assert!(
        server
            .wait_for(T, |reqs, _| reqs.iter().any(|r| r.type_url() == RDS
                && r.is_nack()
                && r.error().is_some_and(|e| e.contains(field))))
            .await,
        "NACK naming {field}: {:?}",
        server
            .requests()
            .iter()
            .filter_map(|r| r.error().map(str::to_string))
            .collect::<Vec<_>>()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(specs.try_recv().is_err(), "the bad version is not applied");
    let accepted = status.borrow().versions[&veer_xds::resources::Kind::Route]["db"].clone();
    assert_eq!(accepted, veer_testsupport::xds::version_of(&any_of(&fewer)));

    // A good version afterwards applies.
    server.set(RDS, "db", any_of(&rc));
    let s = next(&mut specs).await;
    assert_eq!(db_routes(&s), 23);
    // Other kinds were not disturbed.
    for ty in [LDS, CDS, EDS] {
        assert!(
            !server
                .requests()
                .iter()
                .any(|r| r.type_url() == ty && r.is_nack()),
            "{ty} NACKed"
        );
    }
    task.abort();
}
