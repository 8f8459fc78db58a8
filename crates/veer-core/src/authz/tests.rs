use super::*;
use crate::intentions::{Intention, Target};

fn peer(svc: &str) -> Peer {
    Peer::from_id(ServiceId::new(
        "test.consul",
        "default",
        "default",
        "dc1",
        svc,
    ))
}

fn m(sm: StringMatch) -> Matcher {
    sm.compile().expect("compiles")
}

#[test]
fn string_matchers_follow_envoy() {
    // (matcher, input, expected)
    let table: Vec<(StringMatch, &str, bool)> = vec![
        (StringMatch::exact("abc"), "abc", true),
        (StringMatch::exact("abc"), "abcd", false),
        (StringMatch::exact("abc"), "ABC", false),
        (StringMatch::exact("abc").ignoring_case(), "ABC", true),
        (StringMatch::prefix("spiffe://"), "spiffe://x", true),
        (StringMatch::prefix("spiffe://"), "spiffe:/", false),
        (
            StringMatch::prefix("SPIFFE://").ignoring_case(),
            "spiffe://x",
            true,
        ),
        (
            StringMatch::suffix("/svc/web"),
            "spiffe://t/ns/default/dc/dc1/svc/web",
            true,
        ),
        (
            StringMatch::suffix("/svc/web"),
            "spiffe://t/ns/default/dc/dc1/svc/web2",
            false,
        ),
        (
            StringMatch::suffix("/SVC/WEB").ignoring_case(),
            "x/svc/web",
            true,
        ),
        (
            StringMatch::contains("/ns/default/"),
            "spiffe://t/ns/default/dc/x",
            true,
        ),
        (
            StringMatch::contains("/ns/default/"),
            "spiffe://t/ns/other/dc/x",
            false,
        ),
        (
            StringMatch::contains("/NS/DEFAULT/").ignoring_case(),
            "a/ns/default/b",
            true,
        ),
        (StringMatch::contains(""), "anything", true),
        // safe_regex matches the whole string, anchors or not.
        (StringMatch::regex("svc/web"), "spiffe://t/svc/web", false),
        (StringMatch::regex(".*svc/web"), "spiffe://t/svc/web", true),
        (StringMatch::regex("web|api"), "web", true),
        (StringMatch::regex("web|api"), "webapi", false),
        (
            StringMatch::regex("^spiffe://[^/]+/svc/web$"),
            "spiffe://t/svc/web",
            true,
        ),
        // ignore_case has no effect on safe_regex (Envoy).
        (StringMatch::regex("web").ignoring_case(), "WEB", false),
    ];
    for (sm, input, want) in table {
        assert_eq!(m(sm.clone()).matches(input), want, "{sm} against {input:?}");
    }
}

#[test]
fn a_bad_regex_is_refused_with_its_text() {
    let e = StringMatch::regex("a(b").compile().unwrap_err();
    assert_eq!(e.classify(), "bad_regex");
    assert!(e.to_string().contains("a(b"), "{e}");
    let rules = vec![RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            permissions: Vec::new(),
            name: "p1".into(),
            principals: vec![Principal::NotId(Box::new(Principal::spiffe_regex("(")))],
        }],
    }];
    let e = Rbac::compile(&rules).unwrap_err();
    assert_eq!(e.classify(), "bad_regex");
    assert!(e.to_string().contains("\"p1\""), "{e}");
}

/// The DENY filter of Consul v1.16.0's
/// agent/xds/testdata/rbac/default-allow-kitchen-sink.golden (MPL-2.0): cron,
/// web, and any service but web, unsafe and cron.
fn kitchen_sink_deny() -> RbacRules {
    let svc = |s: &str| {
        Principal::spiffe_regex(format!(
            "^spiffe://test.consul/ns/default/dc/[^/]+/svc/{s}$"
        ))
    };
    RbacRules {
        action: Action::Deny,
        policies: vec![RbacPolicy {
            permissions: Vec::new(),
            name: "consul-intentions-layer4".into(),
            principals: vec![
                svc("cron"),
                svc("web"),
                Principal::AndIds(vec![
                    svc("[^/]+"),
                    Principal::NotId(Box::new(svc("web"))),
                    Principal::NotId(Box::new(svc("unsafe"))),
                    Principal::NotId(Box::new(svc("cron"))),
                ]),
            ],
        }],
    }
}

#[test]
fn rbac_table() {
    let allow = |principals: Vec<Principal>| RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            permissions: Vec::new(),
            name: "consul-intentions-layer4".into(),
            principals,
        }],
    };
    let web_only = allow(vec![Principal::spiffe_regex(
        "^spiffe://test.consul/ns/default/dc/[^/]+/svc/web$",
    )]);
    let empty_allow = RbacRules {
        action: Action::Allow,
        policies: vec![],
    };
    let empty_deny = RbacRules {
        action: Action::Deny,
        policies: vec![],
    };
    // (filters, peer service, expected label)
    let table: Vec<(Vec<RbacRules>, &str, &str)> = vec![
        // No filter at all: allow.
        (vec![], "web", "allowed"),
        // rules: {} (ALLOW, no policies) denies all.
        (vec![empty_allow.clone()], "web", "denied_no_policy"),
        // DENY with no policies denies nothing.
        (vec![empty_deny], "web", "allowed"),
        (vec![web_only.clone()], "web", "allowed"),
        (vec![web_only.clone()], "api", "denied_no_policy"),
        // Every filter must allow.
        (
            vec![web_only.clone(), empty_allow],
            "web",
            "denied_no_policy",
        ),
        (vec![kitchen_sink_deny()], "cron", "denied_by_policy"),
        (vec![kitchen_sink_deny()], "web", "denied_by_policy"),
        (vec![kitchen_sink_deny()], "api", "denied_by_policy"),
        (vec![kitchen_sink_deny()], "unsafe", "allowed"),
        (
            vec![web_only.clone(), kitchen_sink_deny()],
            "web",
            "denied_by_policy",
        ),
        (vec![allow(vec![Principal::Any])], "anything", "allowed"),
        (
            vec![allow(vec![Principal::Authenticated {
                principal_name: None,
            }])],
            "x",
            "allowed",
        ),
        (
            vec![allow(vec![Principal::OrIds(vec![
                Principal::Authenticated {
                    principal_name: Some(StringMatch::suffix("/svc/a")),
                },
                Principal::Authenticated {
                    principal_name: Some(StringMatch::suffix("/svc/b")),
                },
            ])])],
            "b",
            "allowed",
        ),
        (
            vec![allow(vec![Principal::OrIds(vec![
                Principal::Authenticated {
                    principal_name: Some(StringMatch::suffix("/svc/a")),
                },
            ])])],
            "c",
            "denied_no_policy",
        ),
    ];
    for (i, (rules, svc, want)) in table.into_iter().enumerate() {
        let authz = Authz::new(
            Some(&rules),
            &Intentions::new(&peer("me").id.unwrap(), vec![], Action::Allow),
        )
        .expect("compiles");
        let d = authz.evaluate(&peer(svc));
        assert_eq!(d.classify(), want, "case {i}: {svc}: {}", authz.explain(&d));
        assert_eq!(d.allowed(), want == "allowed", "case {i}");
        assert!(!authz.explain(&d).is_empty());
    }
}

#[test]
fn principal_name_matches_any_uri_san_else_the_subject() {
    let rules = vec![RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            permissions: Vec::new(),
            name: "p".into(),
            principals: vec![Principal::Authenticated {
                principal_name: Some(StringMatch::exact("CN=legacy")),
            }],
        }],
    }];
    let authz = Rbac::compile(&rules).unwrap();
    let no_uri = Peer {
        uris: vec![],
        subject: "CN=legacy".into(),
        id: None,
    };
    assert!(matches!(
        authz.evaluate(&no_uri),
        RbacDecision::AllowedByPolicy {
            filter: 0,
            policy: 0
        }
    ));
    // With a URI SAN, the subject is not matched.
    let with_uri = Peer {
        uris: vec!["spiffe://x/y".into()],
        subject: "CN=legacy".into(),
        id: None,
    };
    assert_eq!(
        authz.evaluate(&with_uri),
        RbacDecision::NoPolicyMatched { filter: 0 }
    );
    let second_uri = Rbac::compile(&[RbacRules {
        action: Action::Allow,
        policies: vec![RbacPolicy {
            permissions: Vec::new(),
            name: "p".into(),
            principals: vec![Principal::spiffe_regex("spiffe://b/.*")],
        }],
    }])
    .unwrap();
    let two = Peer {
        uris: vec!["spiffe://a/1".into(), "spiffe://b/2".into()],
        subject: String::new(),
        id: None,
    };
    assert!(AuthzDecision::Rbac(second_uri.evaluate(&two)).allowed());
}

#[test]
fn intentions_decide_when_no_rbac_is_given() {
    let me = ServiceId::new("test.consul", "default", "default", "dc1", "api");
    let ixns = Intentions::new(
        &me,
        vec![Intention::new(
            Target::new("default", "default", "web"),
            Target::new("default", "default", "api"),
            Action::Allow,
        )],
        Action::Deny,
    );
    let authz = Authz::new(None, &ixns).unwrap();
    assert!(authz.uses_intentions());
    assert_eq!(authz.evaluate(&peer("web")).classify(), "allowed");
    assert_eq!(authz.evaluate(&peer("db")).classify(), "denied_by_default");
    let anon = Peer {
        uris: vec!["spiffe://elsewhere/x".into()],
        subject: String::new(),
        id: None,
    };
    let d = authz.evaluate(&anon);
    assert_eq!(d.classify(), "denied_no_identity");
    assert!(!d.allowed());
    // Some(vec![]) means "no RBAC filter": all allowed, intentions ignored.
    let open = Authz::new(Some(&[]), &ixns).unwrap();
    assert!(!open.uses_intentions());
    assert!(open.evaluate(&peer("db")).allowed());
    assert_eq!(
        open.explain(&open.evaluate(&peer("db"))),
        "no RBAC filter; all allowed"
    );
}
