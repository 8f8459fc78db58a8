use super::*;
use crate::api::{self, Vips};

fn cat(index: u64, names: &[(&str, u64)]) -> CatalogView {
    CatalogView {
        index,
        services: names.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
    }
}

/// A check list: (node, service name or "" for a node check, create, modify, status).
fn checks(index: u64, list: &[(&str, &str, u64, u64, &str)]) -> ChecksView {
    let body: Vec<serde_json::Value> = list
        .iter()
        .map(|(node, svc, c, m, status)| {
            serde_json::json!({
                "Node": node, "CheckID": format!("{node}/{svc}"), "Status": status,
                "ServiceName": svc, "CreateIndex": c, "ModifyIndex": m,
            })
        })
        .collect();
    api::parse_health_state(index, serde_json::to_string(&body).unwrap().as_bytes()).unwrap()
}

fn inst(id: &str, node: &str) -> ConnectInstance {
    ConnectInstance {
        id: id.into(),
        service: id.into(),
        node: node.into(),
        datacenter: "dc1".into(),
        partition: "default".into(),
        ip: Some("10.0.0.1".parse().unwrap()),
        port: 20000,
        passing: true,
        critical: false,
        weight: 1,
        wan: None,
        vips: Vips::default(),
        dialed_directly: false,
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

fn service() -> Fetched {
    Fetched::Service {
        instances: vec![],
        connect: vec![],
    }
}

fn proxy(ids: &[&str], dests: &[&str]) -> Fetched {
    Fetched::Proxy {
        ids: ids.iter().map(|s| s.to_string()).collect(),
        destinations: set(dests),
    }
}

/// Reads everything queued and answers each with `answer(name)`.
fn drain(
    f: &mut Feed,
    known: &BTreeMap<ServiceKey, Vec<ConnectInstance>>,
    answer: impl Fn(&str) -> Fetched,
) -> BTreeSet<String> {
    let mut read = BTreeSet::new();
    loop {
        let batch = f.take(1000);
        if batch.is_empty() {
            break;
        }
        for n in batch {
            assert!(f.on_fetched(&n, &answer(&n), known), "{n} still wanted");
            read.insert(n);
        }
    }
    read
}

fn answer(n: &str) -> Fetched {
    match n.strip_suffix("-sidecar-proxy") {
        Some(d) => proxy(&[n], &[d]),
        None => service(),
    }
}

/// A feed that has read `a`, `a-sidecar-proxy` (on node n1), `b` and
/// `b-sidecar-proxy` (on n2), with known Connect instances to match.
fn settled() -> (Feed, BTreeMap<ServiceKey, Vec<ConnectInstance>>) {
    let mut f = Feed::default();
    let mut known = BTreeMap::new();
    known.insert(ServiceKey::local("a"), vec![inst("a-sidecar-proxy", "n1")]);
    known.insert(ServiceKey::local("b"), vec![inst("b-sidecar-proxy", "n2")]);
    let o = f.on_catalog(cat(
        10,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    assert_eq!(o, CatalogOutcome::default());
    assert!(
        f.take(10).is_empty(),
        "nothing is read before the check list"
    );
    f.on_checks(
        checks(
            9,
            &[
                ("n1", "a-sidecar-proxy", 5, 5, "passing"),
                ("n2", "b-sidecar-proxy", 6, 6, "passing"),
                ("n1", "", 1, 1, "passing"),
            ],
        ),
        &known,
        false,
    );
    let read = drain(&mut f, &known, answer);
    assert_eq!(read.len(), 4, "every name read once: {read:?}");
    assert!(!f.busy());
    assert!(f.is_proxy("a-sidecar-proxy") && !f.is_proxy("a"));
    (f, known)
}

#[test]
fn catalog_diff_table() {
    let m = |l: &[(&str, u64)]| -> BTreeMap<String, u64> {
        l.iter().map(|(n, t)| (n.to_string(), *t)).collect()
    };
    type Names<'a> = &'a [(&'a str, u64)];
    type Set<'a> = &'a [&'a str];
    // (old, new, added, removed, retagged)
    let cases: &[(Names, Names, Set, Set, Set)] = &[
        (&[], &[("a", 1)], &["a"], &[], &[]),
        (&[("a", 1)], &[], &[], &["a"], &[]),
        (&[("a", 1)], &[("a", 2)], &[], &[], &["a"]),
        (&[("a", 1), ("b", 1)], &[("a", 1), ("b", 1)], &[], &[], &[]),
        (
            &[("a", 1), ("b", 1)],
            &[("b", 3), ("c", 1)],
            &["c"],
            &["a"],
            &["b"],
        ),
    ];
    for (old, new, added, removed, retagged) in cases {
        let d = diff_catalog(&m(old), &m(new));
        assert_eq!(d.added, set(added), "{old:?} -> {new:?}");
        assert_eq!(d.removed, set(removed), "{old:?} -> {new:?}");
        assert_eq!(d.retagged, set(retagged), "{old:?} -> {new:?}");
        assert_eq!(
            d.is_empty(),
            added.is_empty() && removed.is_empty() && retagged.is_empty()
        );
    }
}

#[test]
fn checks_diff_table() {
    let base = checks(
        20,
        &[
            ("n1", "a", 5, 5, "passing"),
            ("n1", "b", 6, 6, "passing"),
            ("n1", "", 1, 1, "passing"),
        ],
    );
    type List<'a> = &'a [(&'a str, &'a str, u64, u64, &'a str)];
    // (new list, services changed, nodes changed)
    let cases: &[(List, &[&str], &[&str])] = &[
        // same list, same answer
        (
            &[
                ("n1", "a", 5, 5, "passing"),
                ("n1", "b", 6, 6, "passing"),
                ("n1", "", 1, 1, "passing"),
            ],
            &[],
            &[],
        ),
        // a's check went critical
        (
            &[
                ("n1", "a", 5, 21, "critical"),
                ("n1", "b", 6, 6, "passing"),
                ("n1", "", 1, 1, "passing"),
            ],
            &["a"],
            &[],
        ),
        // b's check removed, c's added, node check changed
        (
            &[
                ("n1", "a", 5, 5, "passing"),
                ("n1", "c", 22, 22, "passing"),
                ("n1", "", 1, 23, "critical"),
            ],
            &["b", "c"],
            &["n1"],
        ),
    ];
    for (list, services, nodes) in cases {
        let d = diff_checks(&base, &checks(25, list));
        assert_eq!(d.services, set(services), "{list:?}");
        assert_eq!(d.nodes, set(nodes), "{list:?}");
    }
    // Order does not matter.
    let shuffled = checks(
        20,
        &[
            ("n1", "", 1, 1, "passing"),
            ("n1", "b", 6, 6, "passing"),
            ("n1", "a", 5, 5, "passing"),
        ],
    );
    assert_eq!(diff_checks(&base, &shuffled), ChecksDiff::default());
}

#[test]
fn explain_table() {
    let c = checks(
        30,
        &[
            ("n1", "a", 5, 12, "passing"),
            ("n1", "b", 17, 17, "passing"),
        ],
    );
    for (index, want) in [
        (30, true),
        (12, true),
        (17, true),
        (5, true),
        (13, false),
        (31, false),
    ] {
        assert_eq!(checks_explain(index, &c), want, "index {index}");
    }
}

#[test]
fn health_change_of_a_sidecar_reads_its_destination_only() {
    let (mut f, known) = settled();
    f.on_checks(
        checks(
            11,
            &[
                ("n1", "a-sidecar-proxy", 5, 11, "critical"),
                ("n2", "b-sidecar-proxy", 6, 6, "passing"),
                ("n1", "", 1, 1, "passing"),
            ],
        ),
        &known,
        false,
    );
    assert!(f.busy());
    assert_eq!(f.take(10), vec!["a".to_string()]);
    assert!(f.busy(), "a read is under way");
    assert!(f.on_fetched("a", &service(), &known));
    assert!(!f.busy());
    assert_eq!(f.full_reads, 0);
}

#[test]
fn node_check_reads_every_upstream_on_the_node() {
    let (mut f, known) = settled();
    f.on_checks(
        checks(
            11,
            &[
                ("n1", "a-sidecar-proxy", 5, 5, "passing"),
                ("n2", "b-sidecar-proxy", 6, 6, "passing"),
                ("n1", "", 1, 11, "critical"),
            ],
        ),
        &known,
        false,
    );
    assert_eq!(f.take(10), vec!["a".to_string()]);
}

#[test]
fn new_and_removed_services() {
    let (mut f, known) = settled();
    // c and its sidecar registered (with a check, same raft index 12).
    let o = f.on_catalog(cat(
        12,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("b", 0),
            ("b-sidecar-proxy", 0),
            ("c", 0),
            ("c-sidecar-proxy", 0),
        ],
    ));
    assert_eq!(o, CatalogOutcome::default(), "explained by the names");
    assert_eq!(
        drain(&mut f, &known, answer),
        set(&["c", "c-sidecar-proxy"])
    );
    // b deregistered with its sidecar.
    let o = f.on_catalog(cat(
        13,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("c", 0),
            ("c-sidecar-proxy", 0),
        ],
    ));
    assert_eq!(o.removed, set(&["b", "b-sidecar-proxy"]));
    assert!(!o.need_checks);
    assert!(!f.busy());
    assert!(!f.is_proxy("b-sidecar-proxy"));
    // A late read of a removed name is not wanted.
    f.queue.insert("x".into());
    assert!(!f.on_fetched("b", &service(), &known));
    assert_eq!(f.full_reads, 0);
}

#[test]
fn second_sidecar_instance_reads_the_destination() {
    let (mut f, known) = settled();
    // A second a-sidecar-proxy instance: the name exists; its new check
    // (raft index 14) changes a-sidecar-proxy's checks.
    let o = f.on_catalog(cat(
        14,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    assert!(o.need_checks, "the check list is behind");
    assert!(f.busy(), "pending until the checks tell");
    f.on_checks(
        checks(
            14,
            &[
                ("n1", "a-sidecar-proxy", 5, 5, "passing"),
                ("n3", "a-sidecar-proxy", 14, 14, "passing"),
                ("n2", "b-sidecar-proxy", 6, 6, "passing"),
                ("n1", "", 1, 1, "passing"),
            ],
        ),
        &known,
        true,
    );
    assert_eq!(f.take(10), vec!["a".to_string()]);
    assert!(f.on_fetched("a", &service(), &known));
    assert!(!f.busy());
    assert_eq!(f.full_reads, 0, "explained by the checks at index 14");
}

#[test]
fn unexplained_catalog_change_reads_everything_once() {
    let (mut f, known) = settled();
    // Checks already past the change, and nothing changed at 15: a port change.
    f.on_checks(
        checks(
            16,
            &[
                ("n1", "a-sidecar-proxy", 5, 5, "passing"),
                ("n2", "b-sidecar-proxy", 6, 16, "passing"),
                ("n1", "", 1, 1, "passing"),
            ],
        ),
        &known,
        false,
    );
    assert_eq!(drain(&mut f, &known, answer), set(&["b"]));
    let o = f.on_catalog(cat(
        15,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    assert!(!o.need_checks);
    assert_eq!(f.full_reads, 1);
    assert_eq!(
        drain(&mut f, &known, answer),
        set(&["a", "b"]),
        "every non-proxy name"
    );
    // Same thing when the checks arrive later and do not explain it.
    let o = f.on_catalog(cat(
        40,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    assert!(o.need_checks);
    let mut c = checks(
        40,
        &[
            ("n1", "a-sidecar-proxy", 5, 5, "passing"),
            ("n2", "b-sidecar-proxy", 6, 16, "passing"),
            ("n1", "", 1, 1, "passing"),
        ],
    );
    c.index = 39; // the watch, older than the catalog change: still pending
    f.on_checks(c.clone(), &known, false);
    assert!(f.busy() && f.queued() == 0);
    // The one-shot read (made after the catalog answer) settles it even
    // though the checks' index stayed below the catalog's.
    f.on_checks(c, &known, true);
    assert_eq!(f.full_reads, 2);
    assert_eq!(drain(&mut f, &known, answer), set(&["a", "b"]));
}

#[test]
fn stale_one_shot_checks_are_ignored() {
    let (mut f, known) = settled();
    let newer = checks(
        50,
        &[
            ("n1", "a-sidecar-proxy", 5, 50, "critical"),
            ("n2", "b-sidecar-proxy", 6, 6, "passing"),
            ("n1", "", 1, 1, "passing"),
        ],
    );
    f.on_checks(newer, &known, false);
    drain(&mut f, &known, answer);
    let older = checks(
        9,
        &[
            ("n1", "a-sidecar-proxy", 5, 5, "passing"),
            ("n2", "b-sidecar-proxy", 6, 6, "passing"),
            ("n1", "", 1, 1, "passing"),
        ],
    );
    f.on_checks(older, &known, true);
    assert!(!f.busy());
    assert_eq!(f.full_reads, 0);
}

#[test]
fn index_going_backwards_reads_everything() {
    let (mut f, known) = settled();
    f.on_catalog(cat(3, &[("a", 0), ("a-sidecar-proxy", 0), ("b", 0)]));
    assert_eq!(f.full_reads, 1);
    assert_eq!(drain(&mut f, &known, answer), set(&["a", "b"]));
    f.on_checks(checks(2, &[]), &known, false);
    assert_eq!(f.full_reads, 2);
}

#[test]
fn a_new_sidecar_seen_through_its_proxy_reads_the_destination() {
    let (mut f, known) = settled();
    // The retagged proxy name is read; it has an instance `a` does not show yet.
    f.on_catalog(cat(
        60,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 9),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    assert_eq!(f.take(10), vec!["a-sidecar-proxy".to_string()]);
    f.on_fetched(
        "a-sidecar-proxy",
        &proxy(&["a-sidecar-proxy", "a-sidecar-proxy-2"], &["a"]),
        &known,
    );
    assert_eq!(f.take(10), vec!["a".to_string()]);
    // A proxy that now serves another destination: the old one is read again.
    f.on_fetched("a", &service(), &known);
    f.on_catalog(cat(
        61,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 10),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    let n = f.take(10);
    f.on_fetched(&n[0], &proxy(&["b-sidecar-proxy"], &["b"]), &known);
    assert_eq!(f.take(10), vec!["a".to_string()]);
}

#[test]
fn reads_are_bounded_and_a_busy_name_waits_for_its_read() {
    let mut f = Feed::default();
    let names: Vec<(String, u64)> = (0..50).map(|i| (format!("s{i:02}"), 0)).collect();
    let refs: Vec<(&str, u64)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    f.on_catalog(cat(5, &refs));
    f.on_checks(checks(5, &[]), &BTreeMap::new(), false);
    let first = f.take(8);
    assert_eq!(first.len(), 8);
    assert_eq!(f.in_flight(), 8);
    // s00 changes while being read: queued again, not read twice at once.
    f.queue("s00");
    let next = f.take(8);
    assert!(!next.contains(&"s00".to_string()));
    f.on_failed("s01", true);
    assert!(f.queue.contains("s01"));
    f.on_failed("s02", false);
    assert!(!f.queue.contains("s02") && !f.in_flight.contains("s02"));
}

#[test]
fn sidecar_names_in_connect_answers_are_not_read() {
    let mut f = Feed::default();
    f.on_catalog(cat(
        5,
        &[
            ("a", 0),
            ("a-sidecar-proxy", 0),
            ("b", 0),
            ("b-sidecar-proxy", 0),
        ],
    ));
    f.on_checks(checks(5, &[]), &BTreeMap::new(), false);
    assert_eq!(f.take(1), vec!["a".to_string()]);
    let a = Fetched::Service {
        instances: vec![],
        connect: vec![inst("a-sidecar-proxy", "n1")],
    };
    assert!(f.on_fetched("a", &a, &BTreeMap::new()));
    assert!(f.is_proxy("a-sidecar-proxy"));
    assert_eq!(
        drain(&mut f, &BTreeMap::new(), answer),
        set(&["b", "b-sidecar-proxy"]),
        "a's sidecar is known from a's answer"
    );
    // Its checks still lead to `a`.
    f.on_checks(
        checks(6, &[("n1", "a-sidecar-proxy", 6, 6, "critical")]),
        &BTreeMap::new(),
        false,
    );
    assert_eq!(f.take(10), vec!["a".to_string()]);
}
