//! Tests of the ADS client: the state machine on its own, and the whole
//! client over real gRPC on loopback against the Consul-like test server
//! (`veer_testsupport::xds`). The `Check` here is a test one: it does not
//! depend on the translation.
use super::*;
use crate::resources::{Kind, Protos};

type Resources = crate::resources::Resources<Protos>;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use veer_core::intentions::Action;
use veer_core::snapshot::{ListenSpec, Spec, Timeouts};
use veer_core::spiffe::ServiceId;
use veer_testsupport::xds::{any_of, XdsServer, CDS, EDS, LDS};

const T: Duration = Duration::from_secs(10);

/// A test `Check`: listeners with `stat_prefix` "bad" are refused; every
/// cluster wants its EDS; a cluster named "uncompilable" makes the compile
/// fail; a listener "rds:<name>" wants route <name>. The spec's `source`
/// summarises the resources, so tests can read what was applied.
struct TestCheck;

impl Check for TestCheck {
    type Models = Protos;
    fn check(&self, kind: Kind, _name: &str, any: &Any) -> Result<Decoded<Protos>, String> {
        let d = decode(kind, any)?;
        if let Decoded::Listener(l) = &d {
            if l.stat_prefix == "bad" {
                return Err("stat_prefix \"bad\" is refused".into());
            }
        }
        if let Decoded::Endpoints(e) = &d {
            if e.cluster_name.ends_with("!bad") {
                return Err("endpoints marked bad are refused".into());
            }
        }
        Ok(d)
    }
    fn wanted(&self, res: &Resources) -> Wanted {
        Wanted {
            endpoints: res.clusters.keys().cloned().collect(),
            routes: res
                .listeners
                .values()
                .filter_map(|l| l.stat_prefix.strip_prefix("rds:").map(str::to_string))
                .collect(),
            secrets: Default::default(),
            dns: Default::default(),
        }
    }
    fn shapes_wanted(&self, kind: Kind) -> bool {
        matches!(kind, Kind::Listener | Kind::Cluster)
    }
    fn missing(&self, res: &Resources) -> Vec<String> {
        let mut m = Vec::new();
        if res.listeners.is_empty() {
            m.push("lds".to_string());
        }
        if res.clusters.is_empty() {
            m.push("cds".to_string());
        }
        let w = self.wanted(res);
        m.extend(
            w.endpoints
                .iter()
                .filter(|n| {
                    !res.endpoints.contains_key(*n)
                        && !res.refused.contains_key(&(Kind::Endpoints, n.to_string()))
                })
                .map(|n| format!("eds {n}")),
        );
        m.extend(
            w.routes
                .iter()
                .filter(|n| !res.routes.contains_key(*n))
                .map(|n| format!("rds {n}")),
        );
        m
    }
    fn compile(&mut self, res: &Resources, _since: &Changed) -> Compiled {
        let waiting = self.missing(res);
        if !waiting.is_empty() {
            return Compiled::Waiting(waiting);
        }
        if res.clusters.contains_key("uncompilable") {
            return Compiled::Refused("cluster uncompilable breaks the build".into());
        }
        if res
            .listeners
            .values()
            .any(|l| l.stat_prefix == "uncompilable")
        {
            return Compiled::Refused("listener uncompilable breaks the build".into());
        }
        let lds: Vec<String> = res
            .listeners
            .iter()
            .map(|(n, l)| {
                if l.stat_prefix.len() > 64 {
                    format!("{n}=<{} bytes>", l.stat_prefix.len())
                } else {
                    format!("{n}={}", l.stat_prefix)
                }
            })
            .collect();
        let eds: Vec<String> = res
            .endpoints
            .iter()
            .map(|(n, e)| format!("{n}={}", e.cluster_name))
            .collect();
        let source = format!(
            "lds[{}] cds[{}] eds[{}]",
            lds.join(","),
            res.clusters.keys().cloned().collect::<Vec<_>>().join(","),
            eds.join(",")
        );
        Compiled::Ready(spec(source))
    }
}

fn spec(source: String) -> Spec {
    Spec {
        identity: ServiceId {
            trust_domain: "11111111-2222-3333-4444-555555555555.consul".into(),
            partition: "default".into(),
            namespace: "default".into(),
            datacenter: "dc1".into(),
            service: "web".into(),
        },
        roots: Vec::new(),
        chain: Vec::new(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![0u8])),
        local_app: "127.0.0.1:8080".parse().unwrap(),
        intentions: Vec::new(),
        default_action: Action::Deny,
        upstreams: Vec::new(),
        mesh_destinations_only: false,
        listen: ListenSpec {
            inbound: "127.0.0.1:20000".parse().unwrap(),
            outbound: Vec::new(),
        },
        timeouts: Timeouts::default(),
        source,
        expose: Vec::new(),
        rbac: None,
        permissive_ports: Vec::new(),
        inbound_max_connections: None,
        unapplied: Vec::new(),
        inbound_http: None,
    }
}

fn listener(name: &str, stat_prefix: &str) -> Any {
    any_of(&Listener {
        name: name.into(),
        stat_prefix: stat_prefix.into(),
        ..Default::default()
    })
}

fn cluster(name: &str) -> Any {
    any_of(&Cluster {
        name: name.into(),
        ..Default::default()
    })
}

fn endpoints(name: &str, tag: &str) -> Any {
    any_of(&ClusterLoadAssignment {
        cluster_name: format!("{name}{tag}"),
        ..Default::default()
    })
}

fn node() -> NodeInfo {
    let mut metadata = serde_json::Map::new();
    metadata.insert("namespace".into(), "default".into());
    NodeInfo {
        id: "web-sidecar-proxy".into(),
        cluster: "web".into(),
        metadata,
    }
}

// ---- the state machine on its own ----

fn response(
    kind: Kind,
    nonce: &str,
    items: Vec<(&str, Any)>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: kind.type_url().into(),
        nonce: nonce.into(),
        resources: items
            .into_iter()
            .map(|(n, a)| Resource {
                name: n.into(),
                version: veer_testsupport::xds::version_of(&a),
                resource: Some(a),
                ..Default::default()
            })
            .collect(),
        removed_resources: removed.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[test]
fn first_requests_are_wildcard_cds_and_lds_with_the_node() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    let reqs = s.start();
    assert_eq!(reqs.len(), 2, "no by-name kind is wanted yet: {reqs:?}");
    assert_eq!(reqs[0].type_url, Kind::Cluster.type_url());
    assert_eq!(reqs[1].type_url, Kind::Listener.type_url());
    for r in &reqs {
        assert!(r.resource_names_subscribe.is_empty());
        assert!(r.response_nonce.is_empty());
    }
    let n = reqs[0].node.as_ref().expect("node in the first request");
    assert_eq!(n.id, "web-sidecar-proxy");
    assert_eq!(n.user_agent_name, "veer");
    assert!(n
        .metadata
        .as_ref()
        .unwrap()
        .fields
        .contains_key("namespace"));
    assert!(reqs[1].node.is_none());
}

#[test]
fn one_nack_names_the_bad_resources_and_the_rest_applies() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let mut got = Vec::new();
    let mut apply = |sp: Spec| {
        got.push(sp.source);
        Ok(())
    };
    let out = s.on_response(
        response(Kind::Cluster, "1", vec![("c1", cluster("c1"))], &[]),
        &mut apply,
    );
    assert_eq!(out.reply, Reply::Ack);
    // CDS brought a cluster: EDS is asked for by name, never empty.
    assert_eq!(out.requests.len(), 2);
    assert_eq!(out.requests[0].response_nonce, "1");
    assert_eq!(out.requests[1].type_url, Kind::Endpoints.type_url());
    assert_eq!(
        out.requests[1].resource_names_subscribe,
        vec!["c1".to_string()]
    );
    assert_eq!(
        out.waiting_for,
        vec!["lds".to_string(), "eds c1".to_string()]
    );
    let out = s.on_response(
        response(Kind::Endpoints, "2", vec![("c1", endpoints("c1", ""))], &[]),
        &mut apply,
    );
    assert_eq!(out.reply, Reply::Ack);
    assert!(!out.delivered);
    let out = s.on_response(
        response(
            Kind::Listener,
            "3",
            vec![
                ("a", listener("a", "a1")),
                ("b", listener("b", "bad")),
                ("c", listener("c", "bad")),
            ],
            &[],
        ),
        &mut apply,
    );
    assert_eq!(
        out.reply,
        Reply::Nack(
            "lds b: stat_prefix \"bad\" is refused; lds c: stat_prefix \"bad\" is refused".into()
        )
    );
    assert!(out.delivered, "the good listener applies");
    let nack = &out.requests[0];
    assert_eq!(nack.response_nonce, "3");
    assert_eq!(
        nack.error_detail.as_ref().unwrap().code,
        state::INVALID_ARGUMENT
    );
    assert_eq!(got, vec!["lds[a=a1] cds[c1] eds[c1=c1]".to_string()]);
    assert!(s.delivered());
}

#[test]
fn refused_endpoints_of_a_new_cluster_hold_nothing_back() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let got = std::cell::RefCell::new(Vec::new());
    let last = || got.borrow().last().cloned().unwrap();
    let mut apply = |sp: Spec| {
        got.borrow_mut().push(sp.source);
        Ok(())
    };
    s.on_response(
        response(Kind::Listener, "1", vec![("a", listener("a", "a1"))], &[]),
        &mut apply,
    );
    s.on_response(
        response(Kind::Cluster, "2", vec![("c1", cluster("c1"))], &[]),
        &mut apply,
    );
    s.on_response(
        response(Kind::Endpoints, "3", vec![("c1", endpoints("c1", ""))], &[]),
        &mut apply,
    );
    assert_eq!(got.borrow().len(), 1);
    // A new cluster whose first endpoints are refused: NACKed, and the
    // cluster serves with none instead of holding everything back.
    s.on_response(
        response(Kind::Cluster, "4", vec![("c2", cluster("c2"))], &[]),
        &mut apply,
    );
    let out = s.on_response(
        response(
            Kind::Endpoints,
            "5",
            vec![("c2", endpoints("c2", "!bad"))],
            &[],
        ),
        &mut apply,
    );
    assert_eq!(
        out.reply,
        Reply::Nack("eds c2: endpoints marked bad are refused".into())
    );
    assert!(out.delivered, "c2 applies without endpoints");
    assert!(out.waiting_for.is_empty(), "{:?}", out.waiting_for);
    assert_eq!(last(), "lds[a=a1] cds[c1,c2] eds[c1=c1]");
    assert!(!s.versions()[&Kind::Endpoints].contains_key("c2"));
    // A later update is not held back.
    let out = s.on_response(
        response(Kind::Listener, "6", vec![("b", listener("b", "b1"))], &[]),
        &mut apply,
    );
    assert_eq!(out.reply, Reply::Ack);
    assert!(out.delivered);
    assert_eq!(last(), "lds[a=a1,b=b1] cds[c1,c2] eds[c1=c1]");
    // A good version replaces the refusal.
    let out = s.on_response(
        response(
            Kind::Endpoints,
            "7",
            vec![("c2", endpoints("c2", "#2"))],
            &[],
        ),
        &mut apply,
    );
    assert_eq!(out.reply, Reply::Ack);
    assert_eq!(last(), "lds[a=a1,b=b1] cds[c1,c2] eds[c1=c1,c2=c2#2]");
    assert!(s.resources().refused.is_empty());
    // A refused update of endpoints already held keeps the old ones.
    let out = s.on_response(
        response(
            Kind::Endpoints,
            "8",
            vec![("c2", endpoints("c2", "!bad"))],
            &[],
        ),
        &mut apply,
    );
    assert!(matches!(out.reply, Reply::Nack(_)));
    assert!(!out.delivered);
    assert!(s.resources().refused.is_empty());
    assert_eq!(s.resources().endpoints["c2"].cluster_name, "c2#2");
    // A cluster removed takes its refusal with it.
    s.on_response(
        response(Kind::Cluster, "9", vec![("c3", cluster("c3"))], &[]),
        &mut apply,
    );
    s.on_response(
        response(
            Kind::Endpoints,
            "10",
            vec![("c3", endpoints("c3", "!bad"))],
            &[],
        ),
        &mut apply,
    );
    assert_eq!(s.resources().refused.len(), 1);
    s.on_response(response(Kind::Cluster, "11", vec![], &["c3"]), &mut apply);
    assert!(s.resources().refused.is_empty());
}

#[test]
fn compile_or_runtime_refusal_reverts_the_whole_response() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let mut refuse = false;
    let mut got = Vec::new();
    let mut apply = |sp: Spec| {
        if refuse {
            return Err("leaf does not chain".to_string());
        }
        got.push(sp.source);
        Ok(())
    };
    s.on_response(
        response(Kind::Listener, "1", vec![("a", listener("a", "a1"))], &[]),
        &mut apply,
    );
    s.on_response(
        response(Kind::Cluster, "2", vec![("c1", cluster("c1"))], &[]),
        &mut apply,
    );
    s.on_response(
        response(Kind::Endpoints, "3", vec![("c1", endpoints("c1", ""))], &[]),
        &mut apply,
    );
    let before = (s.resources().clone(), s.versions().clone());
    // A cluster the compile refuses, next to a good one and a removal.
    let out = s.on_response(
        response(
            Kind::Cluster,
            "4",
            vec![
                ("c2", cluster("c2")),
                ("uncompilable", cluster("uncompilable")),
            ],
            &["c1"],
        ),
        &mut apply,
    );
    // The new clusters want EDS: nothing is compiled until it is there.
    assert_eq!(out.reply, Reply::Ack);
    assert!(!out.delivered);
    let out = s.on_response(
        response(
            Kind::Endpoints,
            "5",
            vec![
                ("c2", endpoints("c2", "")),
                ("uncompilable", endpoints("u", "")),
            ],
            &[],
        ),
        &mut apply,
    );
    assert_eq!(
        out.reply,
        Reply::Nack("configuration rejected: cluster uncompilable breaks the build".into())
    );
    assert!(!out.delivered);
    assert_eq!(got, vec!["lds[a=a1] cds[c1] eds[c1=c1]".to_string()]);
    // The EDS response was reverted; the CDS one stays accepted but unapplied.
    assert!(s.resources().endpoints.is_empty());
    assert_ne!(s.resources().clone(), before.0);
    // The runtime refusing a spec reverts too.
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let mut ok = |_: Spec| Ok(());
    s.on_response(
        response(Kind::Listener, "1", vec![("a", listener("a", "a1"))], &[]),
        &mut ok,
    );
    s.on_response(
        response(Kind::Cluster, "2", vec![("c1", cluster("c1"))], &[]),
        &mut ok,
    );
    let out = s.on_response(
        response(Kind::Endpoints, "3", vec![("c1", endpoints("c1", ""))], &[]),
        &mut ok,
    );
    assert!(out.delivered);
    let versions = s.versions().clone();
    refuse = true;
    let mut apply = |_: Spec| {
        if refuse {
            Err("leaf does not chain".to_string())
        } else {
            Ok(())
        }
    };
    let out = s.on_response(
        response(
            Kind::Listener,
            "4",
            vec![("a", listener("a", "a2"))],
            &["zzz"],
        ),
        &mut apply,
    );
    assert_eq!(
        out.reply,
        Reply::Nack("runtime refused the configuration: leaf does not chain".into())
    );
    assert_eq!(s.resources().listeners["a"].stat_prefix, "a1");
    assert_eq!(s.versions(), &versions);
}

#[test]
fn removal_unsubscribes_and_reconnect_resumes_versions() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let mut ok = |_: Spec| Ok(());
    s.on_response(
        response(Kind::Listener, "1", vec![("a", listener("a", "a1"))], &[]),
        &mut ok,
    );
    s.on_response(
        response(
            Kind::Cluster,
            "2",
            vec![("c1", cluster("c1")), ("c2", cluster("c2"))],
            &[],
        ),
        &mut ok,
    );
    s.on_response(
        response(
            Kind::Endpoints,
            "3",
            vec![("c1", endpoints("c1", "")), ("c2", endpoints("c2", ""))],
            &[],
        ),
        &mut ok,
    );
    let out = s.on_response(response(Kind::Cluster, "4", vec![], &["c2"]), &mut ok);
    assert!(out.delivered);
    assert_eq!(out.requests.len(), 2);
    assert!(out.requests[1].resource_names_subscribe.is_empty());
    assert_eq!(
        out.requests[1].resource_names_unsubscribe,
        vec!["c2".to_string()]
    );
    assert!(
        !s.resources().endpoints.contains_key("c2"),
        "unwanted EDS is dropped"
    );
    // A new stream: initial versions for every kind held, EDS resubscribed.
    let reqs = s.start();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].initial_resource_versions.len(), 1);
    assert_eq!(
        reqs[0].initial_resource_versions["c1"],
        veer_testsupport::xds::version_of(&cluster("c1"))
    );
    assert_eq!(reqs[1].initial_resource_versions.len(), 1);
    assert_eq!(reqs[2].type_url, Kind::Endpoints.type_url());
    assert_eq!(reqs[2].resource_names_subscribe, vec!["c1".to_string()]);
    assert_eq!(reqs[2].initial_resource_versions.len(), 1);
    // The same resources again apply nothing new.
    let mut n = 0;
    let mut count = |_: Spec| {
        n += 1;
        Ok(())
    };
    let out = s.on_response(
        response(Kind::Endpoints, "5", vec![("c1", endpoints("c1", ""))], &[]),
        &mut count,
    );
    assert_eq!(out.reply, Reply::Ack);
    assert_eq!(n, 0);
}

#[test]
fn unknown_type_and_empty_body_are_nacked() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let mut ok = |_: Spec| Ok(());
    let out = s.on_response(
        DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig".into(),
            nonce: "9".into(),
            ..Default::default()
        },
        &mut ok,
    );
    assert!(matches!(out.reply, Reply::Nack(_)));
    assert_eq!(out.requests.len(), 1);
    assert!(out.requests[0].error_detail.is_some());
    let mut r = response(Kind::Listener, "10", vec![("a", listener("a", "a1"))], &[]);
    r.resources[0].resource = None;
    r.resources.push(Resource {
        name: "x".into(),
        resource: Some(cluster("x")),
        ..Default::default()
    });
    let out = s.on_response(r, &mut ok);
    assert_eq!(
        out.reply,
        Reply::Nack(format!(
            "lds a: the resource has no body; lds x: resource of type {:?} in a lds response",
            Kind::Cluster.type_url()
        ))
    );
}

// ---- the client over gRPC against the Consul-like server ----

struct Client {
    specs: mpsc::UnboundedReceiver<String>,
    status: watch::Receiver<AdsStatus>,
    metrics: Arc<AdsMetrics>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(mut cfg: AdsConfig) -> Client {
    cfg.backoff_max = Duration::from_millis(200);
    let metrics = cfg.metrics.clone();
    let (tx, specs) = mpsc::unbounded_channel();
    let (stx, status) = watch::channel(AdsStatus::default());
    let task = tokio::spawn(async move {
        let r = run(
            cfg,
            TestCheck,
            move |s: Spec| {
                if s.source.contains("runtime-refuses") {
                    return Err("runtime refuses".into());
                }
                let _ = tx.send(s.source);
                Ok(())
            },
            stx,
        )
        .await;
        panic!("run returned: {r:?}");
    });
    Client {
        specs,
        status,
        metrics,
        task,
    }
}

fn tcp(server: &XdsServer) -> AdsConfig {
    let a = server.addr().unwrap();
    AdsConfig::new(
        Server::Tcp {
            host: a.ip().to_string(),
            port: a.port(),
        },
        node(),
    )
}

async fn next_spec(c: &mut Client) -> String {
    tokio::time::timeout(T, c.specs.recv())
        .await
        .expect("a spec in time")
        .expect("client running")
}

/// Every response sent got exactly one reply, and no request ever asked
/// for "*" or opened a by-name kind with an empty list.
fn assert_protocol(server: &XdsServer) {
    let reqs = server.requests();
    for r in &reqs {
        assert!(
            !r.req.resource_names_subscribe.iter().any(|n| n == "*"),
            "{r:?}"
        );
        assert!(
            !r.req.resource_names_unsubscribe.iter().any(|n| n == "*"),
            "{r:?}"
        );
    }
    for ty in [EDS] {
        let mut seen = std::collections::BTreeSet::new();
        for r in reqs.iter().filter(|r| r.type_url() == ty) {
            if seen.insert(r.stream) {
                assert!(
                    !r.req.resource_names_subscribe.is_empty(),
                    "first {ty} request is empty: {r:?}"
                );
            }
        }
    }
    for s in server.sent() {
        let replies = reqs
            .iter()
            .filter(|r| r.stream == s.stream && r.req.response_nonce == s.nonce)
            .count();
        assert!(
            replies <= 1,
            "response {} answered {replies} times",
            s.nonce
        );
    }
}

async fn all_answered(server: &XdsServer) -> bool {
    server
        .wait_for(T, |reqs, sent| {
            sent.iter().all(|s| {
                reqs.iter()
                    .any(|r| r.stream == s.stream && r.req.response_nonce == s.nonce)
            })
        })
        .await
}

#[tokio::test]
async fn wildcard_then_eds_by_name_first_spec_only_when_complete() {
    let server = XdsServer::tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server.set(LDS, "a", listener("a", "a1"));
    server.set(CDS, "c1", cluster("c1"));
    let mut c = start(tcp(&server));
    // CDS and LDS arrive and are ACKed; EDS c1 is asked for by name.
    assert!(
        server
            .wait_for(T, |reqs, _| {
                reqs.iter().filter(|r| r.is_ack()).count() >= 2
                    && reqs
                        .iter()
                        .any(|r| r.type_url() == EDS && r.req.resource_names_subscribe == ["c1"])
            })
            .await
    );
    let reqs = server.requests();
    let first = &reqs[0];
    assert_eq!(first.type_url(), CDS);
    assert_eq!(first.req.node.as_ref().unwrap().user_agent_name, "veer");
    let lds = reqs.iter().find(|r| r.type_url() == LDS).unwrap();
    assert!(
        lds.req.resource_names_subscribe.is_empty()
            && first.req.resource_names_subscribe.is_empty()
    );
    // Not complete: nothing applied, not ready.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(c.specs.try_recv().is_err());
    let st = c.status.borrow().clone();
    assert!(st.connected && !st.applied);
    assert_eq!(st.waiting_for, vec!["eds c1".to_string()]);
    server.set(EDS, "c1", endpoints("c1", "#1"));
    assert_eq!(next_spec(&mut c).await, "lds[a=a1] cds[c1] eds[c1=c1#1]");
    assert!(all_answered(&server).await);
    assert!(c.status.borrow().applied);
    assert_eq!(c.metrics.acks.get(Kind::Endpoints), 1);
    assert_eq!(c.metrics.nacks.get(Kind::Listener), 0);
    // Removal: the listener goes; the cluster goes and its EDS is unsubscribed.
    server.set(LDS, "b", listener("b", "b1"));
    assert_eq!(
        next_spec(&mut c).await,
        "lds[a=a1,b=b1] cds[c1] eds[c1=c1#1]"
    );
    server.remove(LDS, "a");
    assert_eq!(next_spec(&mut c).await, "lds[b=b1] cds[c1] eds[c1=c1#1]");
    server.set(CDS, "c2", cluster("c2"));
    server.set(EDS, "c2", endpoints("c2", ""));
    assert_eq!(
        next_spec(&mut c).await,
        "lds[b=b1] cds[c1,c2] eds[c1=c1#1,c2=c2]"
    );
    server.remove(CDS, "c1");
    assert_eq!(next_spec(&mut c).await, "lds[b=b1] cds[c2] eds[c2=c2]");
    assert!(
        server
            .wait_for(T, |reqs, _| reqs.iter().any(
                |r| r.type_url() == EDS && r.req.resource_names_unsubscribe == ["c1"]
            ))
            .await
    );
    assert!(all_answered(&server).await);
    assert_protocol(&server);
    assert!(c
        .metrics
        .render()
        .contains("veer_xds_acks_total{type=\"lds\"} "));
}

#[tokio::test]
async fn one_nack_for_a_bad_resource_the_others_applied_the_old_kept() {
    let server = XdsServer::tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server.set(LDS, "a", listener("a", "a1"));
    server.set(LDS, "b", listener("b", "b1"));
    server.set(CDS, "c1", cluster("c1"));
    server.set(EDS, "c1", endpoints("c1", ""));
    let mut c = start(tcp(&server));
    assert_eq!(next_spec(&mut c).await, "lds[a=a1,b=b1] cds[c1] eds[c1=c1]");
    server.set_all(vec![
        (LDS, "a", listener("a", "a2")),
        (LDS, "b", listener("b", "bad")),
    ]);
    assert_eq!(next_spec(&mut c).await, "lds[a=a2,b=b1] cds[c1] eds[c1=c1]");
    assert!(
        server
            .wait_for(T, |reqs, _| reqs.iter().any(|r| r.is_nack()))
            .await
    );
    let nacks: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_nack())
        .collect();
    assert_eq!(nacks.len(), 1);
    assert_eq!(
        nacks[0].error(),
        Some("lds b: stat_prefix \"bad\" is refused")
    );
    assert_eq!(nacks[0].req.error_detail.as_ref().unwrap().code, 3);
    let st = c.status.borrow().clone();
    assert_eq!(
        st.last[&Kind::Listener].nack.as_deref(),
        Some("lds b: stat_prefix \"bad\" is refused")
    );
    assert_eq!(c.metrics.nacks.get(Kind::Listener), 1);
    // A compile failure NACKs and reverts the whole response; the server
    // does not send it again; a good change afterwards applies.
    server.set_all(vec![
        (LDS, "a", listener("a", "a3")),
        (LDS, "u", listener("u", "uncompilable")),
    ]);
    assert!(
        server
            .wait_for(T, |reqs, _| reqs.iter().any(|r| r.error()
                == Some(
                    "configuration rejected: listener uncompilable breaks the build"
                )))
            .await
    );
    // A spec the runtime refuses is NACKed too.
    server.remove(LDS, "u");
    server.set(LDS, "a", listener("a", "runtime-refuses"));
    assert!(
        server
            .wait_for(T, |reqs, _| reqs.iter().any(
                |r| r.error() == Some("runtime refused the configuration: runtime refuses")
            ))
            .await
    );
    server.set(LDS, "b", listener("b", "b3"));
    assert_eq!(next_spec(&mut c).await, "lds[a=a2,b=b3] cds[c1] eds[c1=c1]");
    assert!(all_answered(&server).await);
    assert!(c.specs.try_recv().is_err());
    // The NACKed listener b "bad" was never sent again.
    let bad = veer_testsupport::xds::version_of(&listener("b", "bad"));
    let sent_bad = server
        .sent()
        .iter()
        .filter(|s| s.resources.iter().any(|(n, v)| n == "b" && *v == bad))
        .count();
    assert_eq!(sent_bad, 1);
    assert_protocol(&server);
}

#[tokio::test]
async fn reconnects_after_a_restart_with_initial_versions() {
    let mut server = XdsServer::tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server.set(LDS, "a", listener("a", "a1"));
    server.set(CDS, "c1", cluster("c1"));
    server.set(EDS, "c1", endpoints("c1", ""));
    let mut c = start(tcp(&server));
    assert_eq!(next_spec(&mut c).await, "lds[a=a1] cds[c1] eds[c1=c1]");
    assert!(all_answered(&server).await);
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!c.status.borrow().connected);
    // While the server is away, a cluster is added.
    server.set(CDS, "c2", cluster("c2"));
    server.set(EDS, "c2", endpoints("c2", ""));
    server.restart().await.unwrap();
    assert_eq!(
        next_spec(&mut c).await,
        "lds[a=a1] cds[c1,c2] eds[c1=c1,c2=c2]"
    );
    assert!(all_answered(&server).await);
    let reqs: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.stream == 2)
        .collect();
    let by = |ty: &str| {
        reqs.iter()
            .find(|r| r.type_url() == ty)
            .unwrap()
            .req
            .clone()
    };
    assert!(reqs[0].req.node.is_some());
    assert_eq!(by(CDS).initial_resource_versions.len(), 1);
    assert_eq!(
        by(CDS).initial_resource_versions["c1"],
        server.version(CDS, "c1").unwrap()
    );
    assert_eq!(
        by(LDS).initial_resource_versions["a"],
        server.version(LDS, "a").unwrap()
    );
    assert_eq!(by(EDS).resource_names_subscribe, vec!["c1".to_string()]);
    assert_eq!(
        by(EDS).initial_resource_versions["c1"],
        server.version(EDS, "c1").unwrap()
    );
    // Only what the client did not hold was sent: no LDS, only c2 of CDS.
    let sent: Vec<_> = server
        .sent()
        .into_iter()
        .filter(|s| s.stream == 2)
        .collect();
    assert!(sent.iter().all(|s| s.type_url != LDS), "{sent:?}");
    let cds: Vec<_> = sent.iter().filter(|s| s.type_url == CDS).collect();
    assert_eq!(cds.len(), 1);
    assert_eq!(cds[0].resources.len(), 1);
    assert_eq!(cds[0].resources[0].0, "c2");
    assert!(c.status.borrow().connected);
    assert!(c.metrics.reconnects("closed") + c.metrics.reconnects("unreachable") >= 1);
    // A changed cluster: its EDS comes again after the CDS ACK (as Consul
    // does); the same endpoints apply nothing new.
    let eds_c1 = |sent: &[veer_testsupport::xds::Sent]| {
        sent.iter()
            .filter(|s| s.type_url == EDS && s.resources.iter().any(|(n, _)| n == "c1"))
            .count()
    };
    let before = eds_c1(&server.sent());
    server.set(
        CDS,
        "c1",
        any_of(&Cluster {
            name: "c1".into(),
            alt_stat_name: "changed".into(),
            ..Default::default()
        }),
    );
    assert_eq!(
        next_spec(&mut c).await,
        "lds[a=a1] cds[c1,c2] eds[c1=c1,c2=c2]"
    );
    assert!(server.wait_for(T, |_, sent| eds_c1(sent) > before).await);
    assert!(all_answered(&server).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        c.specs.try_recv().is_err(),
        "the same endpoints again are no new spec"
    );
    server.set(LDS, "b", listener("b", "b1"));
    assert_eq!(
        next_spec(&mut c).await,
        "lds[a=a1,b=b1] cds[c1,c2] eds[c1=c1,c2=c2]"
    );
    assert_protocol(&server);
}

#[tokio::test]
async fn token_is_sent_and_a_bad_one_is_told_apart() {
    let server = XdsServer::tcp("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    server.require_token(Some("s3cret"));
    server.set(LDS, "a", listener("a", "a1"));
    server.set(CDS, "c1", cluster("c1"));
    server.set(EDS, "c1", endpoints("c1", ""));
    let mut cfg = tcp(&server);
    cfg.metadata = vec![("x-consul-token".into(), "wrong".into())];
    let bad = start(cfg);
    let mut st = bad.status.clone();
    tokio::time::timeout(
        T,
        st.wait_for(|s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.contains("denied"))
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(bad.metrics.reconnects("denied") >= 1);
    assert!(!bad.status.borrow().applied);
    let mut cfg = tcp(&server);
    cfg.metadata = vec![("x-consul-token".into(), "s3cret".into())];
    let mut good = start(cfg);
    assert_eq!(next_spec(&mut good).await, "lds[a=a1] cds[c1] eds[c1=c1]");
    // A token that cannot be metadata is a configuration error.
    let mut cfg = tcp(&server);
    cfg.metadata = vec![("x-consul-token".into(), "a\nb".into())];
    let r = run(
        cfg,
        TestCheck,
        |_| Ok(()),
        watch::channel(AdsStatus::default()).0,
    )
    .await;
    assert!(matches!(r, Err(AdsError::Config(_))), "{r:?}");
}

#[tokio::test]
async fn unix_socket_and_a_message_over_64_mib() {
    let dir = std::env::temp_dir().join(veer_testsupport::unique("veer-ads-"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("xds.sock");
    let server = XdsServer::unix(&path).await.unwrap();
    server.set(LDS, "a", listener("a", &"x".repeat(65 << 20)));
    server.set(CDS, "c1", cluster("c1"));
    server.set(EDS, "c1", endpoints("c1", ""));
    let mut c = start(AdsConfig::new(Server::Unix(path), node()));
    assert_eq!(
        next_spec(&mut c).await,
        "lds[a=<68157440 bytes>] cds[c1] eds[c1=c1]"
    );
    assert!(all_answered(&server).await);
    drop(c);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

/// A CA and a server certificate for `xds.test` signed by it (PEM).
fn tls_material() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["xds.test".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_pem, leaf.pem(), key.serialize_pem())
}

#[tokio::test]
async fn tls_with_a_given_ca() {
    let (ca, chain, key) = tls_material();
    let server = XdsServer::tcp_tls("127.0.0.1:0".parse().unwrap(), &chain, &key)
        .await
        .unwrap();
    server.set(LDS, "a", listener("a", "a1"));
    server.set(CDS, "c1", cluster("c1"));
    server.set(EDS, "c1", endpoints("c1", ""));
    // Another CA: the handshake fails, counted as unreachable.
    let (other_ca, _, _) = tls_material();
    let mut cfg = tcp(&server);
    cfg.tls = Some(Tls {
        ca_pem: other_ca,
        server_name: Some("xds.test".into()),
    });
    let bad = start(cfg);
    let mut cfg = tcp(&server);
    cfg.tls = Some(Tls {
        ca_pem: ca,
        server_name: Some("xds.test".into()),
    });
    let mut good = start(cfg);
    assert_eq!(next_spec(&mut good).await, "lds[a=a1] cds[c1] eds[c1=c1]");
    let mut st = bad.status.clone();
    tokio::time::timeout(T, st.wait_for(|s| s.last_error.is_some()))
        .await
        .unwrap()
        .unwrap();
    assert!(bad.metrics.reconnects("unreachable") >= 1);
    assert!(!bad.status.borrow().connected);
    assert!(
        server.requests().iter().all(|r| r.stream == 1),
        "only the good client got through"
    );
    // No PEM at all is a configuration error.
    let mut cfg = tcp(&server);
    cfg.tls = Some(Tls {
        ca_pem: "nope".into(),
        server_name: None,
    });
    let r = run(
        cfg,
        TestCheck,
        |_| Ok(()),
        watch::channel(AdsStatus::default()).0,
    )
    .await;
    assert!(matches!(r, Err(AdsError::Config(_))), "{r:?}");
}

/// [`TestCheck`], recording what each compile was told changed.
#[derive(Default)]
struct Recording(Vec<Changed>);

impl Check for Recording {
    type Models = Protos;
    fn check(&self, kind: Kind, name: &str, any: &Any) -> Result<Decoded<Protos>, String> {
        TestCheck.check(kind, name, any)
    }
    fn wanted(&self, res: &Resources) -> Wanted {
        TestCheck.wanted(res)
    }
    fn shapes_wanted(&self, kind: Kind) -> bool {
        TestCheck.shapes_wanted(kind)
    }
    fn missing(&self, res: &Resources) -> Vec<String> {
        TestCheck.missing(res)
    }
    fn compile(&mut self, res: &Resources, since: &Changed) -> Compiled {
        self.0.push(since.clone());
        TestCheck.compile(res, since)
    }
}

/// A compile is told what changed since the runtime last took a
/// configuration: endpoint assignments only (accumulated over responses
/// that waited), or anything (a first configuration, another kind, or
/// after a configuration was not taken).
#[test]
fn compile_is_told_what_changed_since_the_last_configuration_taken() {
    let mut s = AdsState::new(Recording::default(), node().to_proto());
    s.start();
    let refuse = std::cell::Cell::new(false);
    let mut apply = |_: Spec| {
        if refuse.get() {
            return Err("refused".to_string());
        }
        Ok(())
    };
    let mut respond = |s: &mut AdsState<Recording>, kind, nonce: &str, items| {
        s.on_response(response(kind, nonce, items, &[]), &mut apply)
    };
    let only = |names: &[&str]| Changed::Endpoints(names.iter().map(|n| n.to_string()).collect());
    let out = respond(
        &mut s,
        Kind::Listener,
        "1",
        vec![("a", listener("a", "a1"))],
    );
    assert!(!out.delivered, "waits for clusters");
    // Clusters: they wait for their endpoints, which then complete them.
    let items = vec![("c1", cluster("c1")), ("c2", cluster("c2"))];
    assert!(!respond(&mut s, Kind::Cluster, "2", items).delivered);
    let items = vec![("c1", endpoints("c1", ""))];
    assert!(!respond(&mut s, Kind::Endpoints, "3", items).delivered);
    let items = vec![("c2", endpoints("c2", ""))];
    assert!(respond(&mut s, Kind::Endpoints, "4", items).delivered);
    // One endpoint change, then two in one response.
    let items = vec![("c1", endpoints("c1", "#2"))];
    assert!(respond(&mut s, Kind::Endpoints, "5", items).delivered);
    let items = vec![("c1", endpoints("c1", "#3")), ("c2", endpoints("c2", "#3"))];
    assert!(respond(&mut s, Kind::Endpoints, "6", items).delivered);
    // The runtime refuses one: the next compile starts over.
    refuse.set(true);
    let items = vec![("c1", endpoints("c1", "#4"))];
    let out = respond(&mut s, Kind::Endpoints, "7", items);
    assert!(matches!(out.reply, Reply::Nack(_)), "{:?}", out.reply);
    refuse.set(false);
    let items = vec![("c2", endpoints("c2", "#5"))];
    assert!(respond(&mut s, Kind::Endpoints, "8", items).delivered);
    let items = vec![("c2", endpoints("c2", "#6"))];
    assert!(respond(&mut s, Kind::Endpoints, "9", items).delivered);
    assert_eq!(
        s.check().0,
        vec![
            Changed::Anything,
            Changed::Anything,
            Changed::Anything,
            Changed::Anything,
            only(&["c1"]),
            only(&["c1", "c2"]),
            only(&["c1"]),
            Changed::Anything,
            only(&["c2"]),
        ]
    );
}

/// An EDS response does not ask the check what is wanted (at mesh scale
/// that walks every cluster): the names subscribed stand, a resource it
/// brings that is not subscribed is still dropped (held or refused), and
/// a cluster response asks again. A check that does not say which kinds
/// shape `wanted` is asked on every response.
#[test]
fn an_endpoints_response_does_not_recompute_the_names_wanted() {
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    fn respond(
        s: &mut AdsState<TestCheck>,
        kind: Kind,
        nonce: &str,
        items: Vec<(&str, Any)>,
    ) -> Outcome {
        s.on_response(response(kind, nonce, items, &[]), &mut |_| Ok(()))
    }
    respond(
        &mut s,
        Kind::Listener,
        "1",
        vec![("a", listener("a", "a1"))],
    );
    let out = respond(&mut s, Kind::Cluster, "2", vec![("c1", cluster("c1"))]);
    assert_eq!(out.requests.len(), 2, "ACK and the EDS subscription");
    let out = respond(
        &mut s,
        Kind::Endpoints,
        "3",
        vec![("c1", endpoints("c1", ""))],
    );
    assert!(out.delivered);
    let runs = s.wanted_runs();
    // Endpoint changes, one refused: wanted is not asked.
    let out = respond(
        &mut s,
        Kind::Endpoints,
        "4",
        vec![("c1", endpoints("c1", "#2"))],
    );
    assert!(out.delivered);
    assert_eq!(out.requests.len(), 1, "only the ACK");
    let out = respond(
        &mut s,
        Kind::Endpoints,
        "5",
        vec![("c1", endpoints("c1", "!bad"))],
    );
    assert!(matches!(out.reply, Reply::Nack(_)));
    assert_eq!(s.wanted_runs(), runs);
    // Endpoints never subscribed (and a refused one): dropped, not held.
    let items = vec![("x", endpoints("x", "")), ("y", endpoints("y", "!bad"))];
    let out = respond(&mut s, Kind::Endpoints, "6", items);
    assert_eq!(out.requests.len(), 1, "nothing to unsubscribe");
    assert_eq!(s.wanted_runs(), runs);
    assert!(!s.resources().endpoints.contains_key("x"));
    assert!(!s.versions()[&Kind::Endpoints].contains_key("x"));
    assert!(
        s.resources().refused.is_empty(),
        "{:?}",
        s.resources().refused
    );
    assert_eq!(s.resources().endpoints["c1"].cluster_name, "c1#2");
    // A cluster response asks again, and subscribes the new name.
    let out = respond(&mut s, Kind::Cluster, "7", vec![("c2", cluster("c2"))]);
    assert!(s.wanted_runs() > runs);
    assert_eq!(
        out.requests[1].resource_names_subscribe,
        vec!["c2".to_string()]
    );
    // The same EDS responses with a check that does not say: asked each time.
    let mut s = AdsState::new(Recording::default(), node().to_proto());
    s.start();
    let mut apply = |_: Spec| Ok(());
    s.on_response(
        response(Kind::Cluster, "1", vec![("c1", cluster("c1"))], &[]),
        &mut apply,
    );
    let runs = s.wanted_runs();
    s.on_response(
        response(Kind::Endpoints, "2", vec![("c1", endpoints("c1", ""))], &[]),
        &mut apply,
    );
    assert_eq!(s.wanted_runs(), runs);
    let mut s = AdsState::new(Unsaid, node().to_proto());
    s.start();
    s.on_response(
        response(Kind::Cluster, "1", vec![("c1", cluster("c1"))], &[]),
        &mut apply,
    );
    let runs = s.wanted_runs();
    s.on_response(
        response(Kind::Endpoints, "2", vec![("c1", endpoints("c1", ""))], &[]),
        &mut apply,
    );
    assert_eq!(
        s.wanted_runs(),
        runs + 2,
        "the stale check and the subscriptions"
    );
}

/// [`TestCheck`] without `shapes_wanted` (the default: every kind may).
struct Unsaid;

impl Check for Unsaid {
    type Models = Protos;
    fn check(&self, kind: Kind, name: &str, any: &Any) -> Result<Decoded<Protos>, String> {
        TestCheck.check(kind, name, any)
    }
    fn wanted(&self, res: &Resources) -> Wanted {
        TestCheck.wanted(res)
    }
    fn missing(&self, res: &Resources) -> Vec<String> {
        TestCheck.missing(res)
    }
    fn compile(&mut self, res: &Resources, since: &Changed) -> Compiled {
        TestCheck.compile(res, since)
    }
}

/// The status's copy of the versions follows the state's through the names
/// each change lists: equal after every step, and a version that did not
/// change is not copied again.
#[test]
fn versions_sync_copies_only_what_changed() {
    use super::client::sync_versions;
    use std::collections::BTreeMap;
    type Map = BTreeMap<Kind, BTreeMap<String, String>>;
    // (kind, name, Some(version) = set, None = removed)
    let steps: Vec<Vec<(Kind, &str, Option<&str>)>> = vec![
        vec![
            (Kind::Cluster, "a", Some("1")),
            (Kind::Endpoints, "a", Some("1")),
        ],
        vec![(Kind::Endpoints, "a", Some("2"))],
        vec![
            (Kind::Cluster, "b", Some("1")),
            (Kind::Endpoints, "a", None),
        ],
        vec![
            (Kind::Listener, "l", Some("7")),
            (Kind::Endpoints, "b", Some("1")),
        ],
        vec![(Kind::Cluster, "b", None), (Kind::Endpoints, "b", None)],
        // Set and removed within one response: listed twice.
        vec![
            (Kind::Endpoints, "c", Some("1")),
            (Kind::Endpoints, "c", None),
        ],
    ];
    let (mut src, mut dst): (Map, Map) = Default::default();
    for (i, step) in steps.iter().enumerate() {
        let kept = dst
            .get(&Kind::Cluster)
            .and_then(|m| m.get("a"))
            .map(|v| v.as_ptr());
        let mut changed = Vec::new();
        for (k, n, v) in step {
            let m = src.entry(*k).or_default();
            match v {
                Some(v) => m.insert(n.to_string(), v.to_string()),
                None => m.remove(*n),
            };
            changed.push((*k, n.to_string()));
        }
        sync_versions(&mut dst, &src, changed);
        assert_eq!(dst, src, "step {i}");
        if let Some(p) = kept {
            assert_eq!(
                dst[&Kind::Cluster]["a"].as_ptr(),
                p,
                "step {i}: copied again"
            );
        }
    }
}

/// The state lists the names whose version a response set or removed (an
/// unchanged one is not listed; a reverted response lists its names twice,
/// their old versions being back), and the status's copy synced from those
/// lists stays equal to the state's versions.
#[test]
fn the_state_lists_the_versions_each_response_changed() {
    use super::client::sync_versions;
    use std::collections::BTreeSet;
    let mut s = AdsState::new(TestCheck, node().to_proto());
    s.start();
    let mut apply = |_: Spec| Ok(());
    let mut dst = Default::default();
    let mut step = |s: &mut AdsState<TestCheck>, r| {
        s.on_response(r, &mut apply);
        let changed = s.take_changed_versions();
        let names: BTreeSet<String> = changed
            .iter()
            .map(|(k, n)| format!("{} {n}", k.short()))
            .collect();
        sync_versions(&mut dst, s.versions(), changed);
        assert_eq!(&dst, s.versions());
        names
    };
    let set = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    let r = response(Kind::Listener, "1", vec![("a", listener("a", "a1"))], &[]);
    assert_eq!(step(&mut s, r), set(&["lds a"]));
    let r = response(Kind::Cluster, "2", vec![("c1", cluster("c1"))], &[]);
    assert_eq!(step(&mut s, r), set(&["cds c1"]));
    let r = response(Kind::Endpoints, "3", vec![("c1", endpoints("c1", ""))], &[]);
    assert_eq!(step(&mut s, r), set(&["eds c1"]));
    // The same content and version again: nothing changed.
    let r = response(Kind::Endpoints, "3", vec![("c1", endpoints("c1", ""))], &[]);
    assert_eq!(step(&mut s, r), set(&[]));
    let was = s.versions()[&Kind::Endpoints]["c1"].clone();
    let r = response(
        Kind::Endpoints,
        "4",
        vec![("c1", endpoints("c1", "x"))],
        &[],
    );
    assert_eq!(step(&mut s, r), set(&["eds c1"]));
    assert_ne!(s.versions()[&Kind::Endpoints]["c1"], was);
    // A removal (its endpoints, no longer wanted, go too), and a response
    // refused as a whole (reverted).
    let r = response(Kind::Cluster, "5", vec![("c2", cluster("c2"))], &["c1"]);
    assert_eq!(step(&mut s, r), set(&["cds c1", "cds c2", "eds c1"]));
    let r = response(
        Kind::Endpoints,
        "6",
        vec![
            ("c2", endpoints("c2", "")),
            ("uncompilable", endpoints("u", "")),
        ],
        &[],
    );
    let names = step(&mut s, r);
    assert!(names.contains("eds uncompilable"), "{names:?}");
    assert!(!s.versions()[&Kind::Endpoints].contains_key("uncompilable"));
}
