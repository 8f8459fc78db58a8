//! `1.8.7-config-service-*.json` are real answers of a Consul 1.8.7 dev
//! agent (see `tests/fixtures/README.md`).
use super::*;
use veer_core::spiffe::ServiceId;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn upstream(name: &str) -> UpstreamSpec {
    UpstreamSpec::new(ServiceId::new(
        "td.consul",
        "default",
        "default",
        "dc1",
        name,
    ))
}

/// Every kind read from the 1.8.7 fixtures.
fn recorded() -> Entries {
    let mut e = Entries::default();
    for k in Kind::ALL {
        let body = fixture(&format!("1.8.7-config-{}.json", k.as_str()));
        e.set(k, parse(k, &body).unwrap());
    }
    e
}

#[test]
fn parses_the_recorded_lists() {
    let r = parse(
        Kind::Resolver,
        &fixture("1.8.7-config-service-resolver.json"),
    )
    .unwrap();
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].kind, r[0].name.as_str(), r[0].namespace.as_str()),
        (Kind::Resolver, "api", "default")
    );
    assert_eq!(r[0].settings, vec!["ConnectTimeout=1s", "Failover"]);
    assert_eq!(r[0].raw["Failover"]["*"]["Datacenters"][0], "dc2");
    let r = parse(Kind::Router, &fixture("1.8.7-config-service-router.json")).unwrap();
    assert_eq!(r[0].settings, vec!["Routes"]);
    let s = parse(
        Kind::Splitter,
        &fixture("1.8.7-config-service-splitter.json"),
    )
    .unwrap();
    assert_eq!(s[0].settings, vec!["Splits"]);
    // An empty list (no entry of the kind), as 1.8.7 answers it.
    assert!(parse(Kind::Router, b"[]").unwrap().is_empty());
}

#[test]
fn parse_table() {
    // (kind, body, Some(settings per entry) | None for an error)
    type Want = Option<Vec<(&'static str, Vec<&'static str>)>>;
    let cases: &[(Kind, &str, Want)] = &[
        // Bookkeeping and empty values are not settings; scalars show their value.
        (
            Kind::Resolver,
            r#"[{"Kind":"service-resolver","Name":"web","Namespace":"","Meta":{"a":"b"},
                "DefaultSubset":"v1","Subsets":{"v1":{"Filter":"Service.Meta.v == 1"}},
                "Redirect":null,"Failover":{},"ConnectTimeout":"0s","CreateIndex":3,"ModifyIndex":4}]"#,
            Some(vec![(
                "web",
                vec!["ConnectTimeout=0s", "DefaultSubset=v1", "Subsets"],
            )]),
        ),
        // Fields of later Consul versions are named too.
        (
            Kind::Resolver,
            r#"[{"Kind":"service-resolver","Name":"web","LoadBalancer":{"Policy":"ring_hash"},"RequestTimeout":"3s"}]"#,
            Some(vec![("web", vec!["LoadBalancer", "RequestTimeout=3s"])]),
        ),
        // An entry that sets nothing.
        (
            Kind::Resolver,
            r#"[{"Kind":"service-resolver","Name":"web"}]"#,
            Some(vec![("web", vec![])]),
        ),
        // Another kind, or no name: skipped.
        (
            Kind::Router,
            r#"[{"Kind":"service-resolver","Name":"web","ConnectTimeout":"1s"},{"Kind":"service-router","Routes":[{}]},
                {"Name":"api","Routes":[{}]}]"#,
            Some(vec![("api", vec!["Routes"])]),
        ),
        (Kind::Splitter, r#"{"Kind":"service-splitter"}"#, None),
        (Kind::Splitter, "not json", None),
    ];
    for (kind, body, want) in cases {
        let got = parse(*kind, body.as_bytes());
        match (want, got) {
            (Some(want), Ok(got)) => {
                let got: Vec<(&str, Vec<&str>)> = got
                    .iter()
                    .map(|e| {
                        (
                            e.name.as_str(),
                            e.settings.iter().map(String::as_str).collect(),
                        )
                    })
                    .collect();
                assert_eq!(&got, want, "{body}");
            }
            (None, Err(e)) => assert!(e.to_string().contains(&kind.path()), "{e}"),
            (want, got) => panic!("{body}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn unapplied_names_entries_of_upstreams_in_use() {
    let e = recorded();
    assert!(e.complete());
    let named = |ups: &[UpstreamSpec]| -> Vec<String> {
        unapplied(&e, ups, |_| false)
            .into_iter()
            .map(|u| {
                assert_eq!(u.kind, "unsupported");
                u.setting
            })
            .collect()
    };
    // (upstreams, named)
    let cases: &[(&[&str], &[&str])] = &[
        (&[], &[]),
        (&["web", "db"], &[]),
        // Resolvers are applied (the discovery chain): never named.
        (
            &["api"],
            &["service-router api: Routes", "service-splitter api: Splits"],
        ),
        // Two upstream entries of one service (two listeners): named once.
        (
            &["db", "api", "api"],
            &["service-router api: Routes", "service-splitter api: Splits"],
        ),
    ];
    for (ups, want) in cases {
        let ups: Vec<UpstreamSpec> = ups.iter().map(|n| upstream(n)).collect();
        assert_eq!(named(&ups), *want, "{ups:?}");
    }
    let u = unapplied(&e, &[upstream("api")], |_| false);
    assert!(u[0].detail.contains("relayed at L4"), "{}", u[0].detail);
    assert!(
        u[1].detail.contains("splits not applied"),
        "{}",
        u[1].detail
    );
    // A service whose chain veer reads: the chain names its own L7 parts.
    assert!(unapplied(&e, &[upstream("api")], |s| s == "api").is_empty());
}

#[test]
fn entries_follow_each_list_and_say_what_is_missing() {
    let mut e = Entries::default();
    assert!(!e.complete());
    assert_eq!(e.missing(), Kind::ALL.to_vec());
    e.set(
        Kind::Resolver,
        parse(
            Kind::Resolver,
            br#"[{"Kind":"service-resolver","Name":"web","ConnectTimeout":"2s"},
                 {"Kind":"service-resolver","Name":"api","ConnectTimeout":"3s"}]"#,
        )
        .unwrap(),
    );
    e.set(Kind::Router, Vec::new());
    assert_eq!(e.missing(), vec![Kind::Splitter]);
    e.set(Kind::Splitter, Vec::new());
    assert!(e.complete());
    assert_eq!(e.services().into_iter().collect::<Vec<_>>(), ["api", "web"]);
    // Resolvers are applied (the discovery chain): not named.
    assert!(unapplied(&e, &[upstream("web")], |_| false).is_empty());
    assert!(e.get(Kind::Resolver, "web").is_some());
    // A new list replaces the old one: a deleted entry is gone.
    e.set(
        Kind::Resolver,
        parse(
            Kind::Resolver,
            br#"[{"Kind":"service-resolver","Name":"api","ConnectTimeout":"3s"}]"#,
        )
        .unwrap(),
    );
    assert!(e.get(Kind::Resolver, "web").is_none());
    assert!(e.get(Kind::Resolver, "api").is_some());
    e.clear();
    assert!(!e.complete());
}

#[test]
fn resolver_index_names_services_with_their_modify_index() {
    let e = parse(
        Kind::Resolver,
        br#"[{"Kind":"service-resolver","Name":"api","ModifyIndex":17},
             {"Kind":"service-resolver","Name":"db"}]"#,
    )
    .unwrap();
    let idx = resolver_index(&e);
    assert_eq!(
        idx.into_iter().collect::<Vec<_>>(),
        [("api".to_string(), 17), ("db".to_string(), 0)]
    );
}
