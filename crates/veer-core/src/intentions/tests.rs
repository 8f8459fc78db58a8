use super::*;

fn id(ns: &str, svc: &str) -> ServiceId {
    ServiceId::new("td.consul", "default", ns, "dc1", svc)
}

fn ixn(src: (&str, &str), dst: (&str, &str), action: Action) -> Intention {
    Intention::new(
        Target::new("default", src.0, src.1),
        Target::new("default", dst.0, dst.1),
        action,
    )
}

#[test]
fn precedence_table_matches_consul() {
    // Consul's documented table: (src ns, src name, dst ns, dst name) -> precedence.
    let table = [
        (("default", "web"), ("default", "api"), 9),
        (("default", "*"), ("default", "api"), 8),
        (("*", "*"), ("default", "api"), 7),
        (("default", "web"), ("default", "*"), 6),
        (("default", "*"), ("default", "*"), 5),
        (("*", "*"), ("default", "*"), 4),
        (("default", "web"), ("*", "*"), 3),
        (("default", "*"), ("*", "*"), 2),
        (("*", "*"), ("*", "*"), 1),
    ];
    for (src, dst, p) in table {
        assert_eq!(
            ixn(src, dst, Action::Allow).precedence(),
            p,
            "{src:?} -> {dst:?}"
        );
    }
}

#[test]
fn first_match_by_precedence_wins() {
    let me = id("default", "api");
    let all = vec![
        ixn(("*", "*"), ("*", "*"), Action::Deny), // 1
        ixn(("default", "*"), ("default", "api"), Action::Allow), // 8
        ixn(("default", "web"), ("default", "api"), Action::Deny), // 9
        ixn(("default", "db"), ("default", "*"), Action::Deny), // 6
    ];
    let ixns = Intentions::new(&me, all, Action::Allow);
    let prec: Vec<u8> = ixns.rules().iter().map(|r| r.precedence()).collect();
    assert_eq!(prec, vec![9, 8, 6, 1]);
    // web: exact deny at 9 beats the namespace-wide allow at 8.
    assert_eq!(ixns.evaluate(&id("default", "web")).action, Action::Deny);
    // db: the namespace-wide allow (8, destination exact) beats the deny at 6.
    assert_eq!(ixns.evaluate(&id("default", "db")).action, Action::Allow);
    // other namespace: only */* deny matches.
    let d = ixns.evaluate(&id("other", "web"));
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.classify(), "denied_by_intention");
}

#[test]
fn default_applies_when_nothing_matches() {
    let me = id("default", "api");
    let all = vec![ixn(("default", "web"), ("default", "api"), Action::Allow)];
    let deny = Intentions::new(&me, all.clone(), Action::Deny);
    let d = deny.evaluate(&id("default", "billing"));
    assert_eq!(
        d,
        Decision {
            action: Action::Deny,
            reason: Reason::Default
        }
    );
    assert_eq!(d.classify(), "denied_by_default");
    assert!(deny.evaluate(&id("default", "web")).allowed());
    let allow = Intentions::new(&me, all, Action::Allow);
    assert!(allow.evaluate(&id("default", "billing")).allowed());
}

#[test]
fn intentions_for_other_destinations_are_ignored() {
    let me = id("default", "api");
    let all = vec![
        ixn(("default", "web"), ("default", "billing"), Action::Deny),
        ixn(("default", "web"), ("other", "*"), Action::Deny),
    ];
    let ixns = Intentions::new(&me, all, Action::Allow);
    assert!(ixns.rules().is_empty());
    assert!(ixns.evaluate(&id("default", "web")).allowed());
}

#[test]
fn ties_sort_by_names() {
    let me = id("default", "api");
    let all = vec![
        ixn(("default", "zeta"), ("default", "api"), Action::Allow),
        ixn(("default", "alpha"), ("default", "api"), Action::Deny),
        ixn(("a-ns", "mid"), ("default", "api"), Action::Allow),
    ];
    let ixns = Intentions::new(&me, all, Action::Deny);
    let names: Vec<String> = ixns.rules().iter().map(|r| r.source.to_string()).collect();
    assert_eq!(names, vec!["a-ns/mid", "default/alpha", "default/zeta"]);
}

#[test]
fn partition_must_match_exactly() {
    let me = id("default", "api");
    let mut other = ixn(("default", "*"), ("default", "api"), Action::Allow);
    other.source.partition = "team".into();
    let ixns = Intentions::new(&me, vec![other], Action::Deny);
    assert!(!ixns.evaluate(&id("default", "web")).allowed());
    let mut web_team = id("default", "web");
    web_team.partition = "team".into();
    assert!(ixns.evaluate(&web_team).allowed());
}

#[test]
fn datacenter_is_not_checked() {
    let me = id("default", "api");
    let ixns = Intentions::new(
        &me,
        vec![ixn(("default", "web"), ("default", "api"), Action::Allow)],
        Action::Deny,
    );
    let mut web_dc2 = id("default", "web");
    web_dc2.datacenter = "dc2".into();
    assert!(ixns.evaluate(&web_dc2).allowed());
}
