//! `Intentions::new` + `Intentions::evaluate` against a slow, obvious model
//! of Consul's L4 authorization (consul-dataplane.md §5.3, §5.4).
//!
//! The input is a small structured value (via `arbitrary`): a destination,
//! up to 16 intentions over a tiny alphabet of partitions, namespaces and
//! names (including `*`), a default action and up to 8 sources.
//!
//! The model, for a source S and destination D:
//! 1. candidates = intentions whose destination matches D and whose source
//!    matches S (partition exact; namespace and name exact or `*`);
//! 2. precedence from Consul's 9-row table, indexed by how exact the source
//!    and the destination are (namespace `*` ⇒ 0, name `*` ⇒ 1, else 2);
//! 3. keep the highest precedence, then the smallest (source namespace,
//!    source name, destination namespace, destination name), compared as
//!    strings, `*` included;
//! 4. none ⇒ the default action; otherwise the intention veer picked must
//!    be one of the kept ones, and its action is the decision.
//!
//! Also checked: `rules()` holds exactly the intentions whose destination
//! matches D, in precedence order; `explain` and `classify` never panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use veer_core::intentions::{Action, Intention, Intentions, Reason, Target};
use veer_core::spiffe::ServiceId;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Part {
    Default,
    Ap1,
}
impl Part {
    fn s(self) -> &'static str {
        match self {
            Part::Default => "default",
            Part::Ap1 => "ap1",
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Ns {
    Default,
    Ns1,
    Ns2,
}
impl Ns {
    fn s(self) -> &'static str {
        match self {
            Ns::Default => "default",
            Ns::Ns1 => "ns1",
            Ns::Ns2 => "ns2",
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Svc {
    Web,
    Api,
    Db,
}
impl Svc {
    fn s(self) -> &'static str {
        match self {
            Svc::Web => "web",
            Svc::Api => "api",
            Svc::Db => "db",
        }
    }
}

/// A namespace or name pattern: exact or `*`.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Pat<T> {
    Any,
    Exact(T),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct TargetIn {
    partition: Part,
    namespace: Pat<Ns>,
    name: Pat<Svc>,
}
impl TargetIn {
    fn ns(&self) -> &'static str {
        match self.namespace {
            Pat::Any => "*",
            Pat::Exact(n) => n.s(),
        }
    }
    fn name(&self) -> &'static str {
        match self.name {
            Pat::Any => "*",
            Pat::Exact(n) => n.s(),
        }
    }
    fn target(&self) -> Target {
        Target::new(self.partition.s(), self.ns(), self.name())
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct IdIn {
    other_trust_domain: bool,
    partition: Part,
    namespace: Ns,
    dc2: bool,
    service: Svc,
}
impl IdIn {
    fn id(&self) -> ServiceId {
        ServiceId::new(
            if self.other_trust_domain {
                "other.consul"
            } else {
                "td.consul"
            },
            self.partition.s(),
            self.namespace.s(),
            if self.dc2 { "dc2" } else { "dc1" },
            self.service.s(),
        )
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct RuleIn {
    source: TargetIn,
    destination: TargetIn,
    allow: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    destination: IdIn,
    rules: Vec<RuleIn>,
    default_allow: bool,
    sources: Vec<IdIn>,
}

fn action(allow: bool) -> Action {
    if allow {
        Action::Allow
    } else {
        Action::Deny
    }
}

// ---- the model -------------------------------------------------------------

fn pat_matches(pat: &str, value: &str) -> bool {
    pat == "*" || pat == value
}

fn target_matches(t: &TargetIn, id: &ServiceId) -> bool {
    t.partition.s() == id.partition
        && pat_matches(t.ns(), &id.namespace)
        && pat_matches(t.name(), &id.service)
}

/// §5.3: namespace `*` ⇒ 0; name `*` ⇒ 1; else 2.
fn count_exact(t: &TargetIn) -> usize {
    if t.ns() == "*" {
        0
    } else if t.name() == "*" {
        1
    } else {
        2
    }
}

/// §5.3's table, indexed [destination exact count][source exact count].
fn precedence(r: &RuleIn) -> u8 {
    const TABLE: [[u8; 3]; 3] = [
        // dst */*: src */*, ns/*, ns/name
        [1, 2, 3],
        // dst ns/*
        [4, 5, 6],
        // dst ns/name
        [7, 8, 9],
    ];
    TABLE[count_exact(&r.destination)][count_exact(&r.source)]
}

type Key = (
    std::cmp::Reverse<u8>,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

/// §5.4: precedence descending, then names ascending.
fn sort_key(r: &RuleIn) -> Key {
    (
        std::cmp::Reverse(precedence(r)),
        r.source.ns(),
        r.source.name(),
        r.destination.ns(),
        r.destination.name(),
    )
}

fn same_intention(a: &Intention, b: &RuleIn) -> bool {
    a.source == b.source.target()
        && a.destination == b.destination.target()
        && a.action == action(b.allow)
}

// ---- the target ------------------------------------------------------------

fuzz_target!(|input: Input| {
    let mut input = input;
    input.rules.truncate(16);
    input.sources.truncate(8);
    let dest = input.destination.id();
    let default = action(input.default_allow);
    let all: Vec<Intention> = input
        .rules
        .iter()
        .map(|r| Intention::new(r.source.target(), r.destination.target(), action(r.allow)))
        .collect();
    let ixns = Intentions::new(&dest, all, default);
    assert_eq!(ixns.default_action(), default);

    // rules(): the intentions for this destination, in Consul's order.
    let mut for_dest: Vec<&RuleIn> = input
        .rules
        .iter()
        .filter(|r| target_matches(&r.destination, &dest))
        .collect();
    for_dest.sort_by_key(|r| sort_key(r));
    let rules = ixns.rules();
    assert_eq!(
        rules.len(),
        for_dest.len(),
        "rules(): {rules:?}\nmodel: {for_dest:?}"
    );
    for (got, want) in rules.iter().zip(&for_dest) {
        assert_eq!(got.precedence(), precedence(want), "{got}");
        let key = (
            std::cmp::Reverse(got.precedence()),
            got.source.namespace.to_string(),
            got.source.name.to_string(),
            got.destination.namespace.to_string(),
            got.destination.name.to_string(),
        );
        let wk = sort_key(want);
        assert_eq!(
            key,
            (
                wk.0,
                wk.1.to_string(),
                wk.2.to_string(),
                wk.3.to_string(),
                wk.4.to_string()
            ),
            "order of rules(): {rules:?}"
        );
    }
    // Same multiset (each rule of veer's list is a distinct model rule).
    let mut used = vec![false; for_dest.len()];
    for got in rules {
        let j = (0..for_dest.len())
            .find(|&j| !used[j] && same_intention(got, for_dest[j]))
            .unwrap_or_else(|| panic!("{got} is not an intention for {dest}: {rules:?}"));
        used[j] = true;
    }

    for src in &input.sources {
        let src = src.id();
        let decision = ixns.evaluate(&src);
        let _ = ixns.explain(&decision);
        let _ = decision.classify();

        let candidates: Vec<&RuleIn> = input
            .rules
            .iter()
            .filter(|r| target_matches(&r.destination, &dest) && target_matches(&r.source, &src))
            .collect();
        let best = candidates.iter().map(|r| sort_key(r)).min();
        match best {
            None => {
                assert_eq!(
                    decision.action, default,
                    "{src} -> {dest}: no intention matches"
                );
                assert_eq!(
                    decision.reason,
                    Reason::Default,
                    "{src} -> {dest}: {rules:?}"
                );
            }
            Some(best) => {
                let winners: Vec<&&RuleIn> =
                    candidates.iter().filter(|r| sort_key(r) == best).collect();
                let Reason::Matched(i) = decision.reason else {
                    panic!("{src} -> {dest}: veer applied the default, model wants {winners:?}");
                };
                let picked = &rules[i];
                assert_eq!(decision.action, picked.action);
                assert!(
                    winners.iter().any(|w| same_intention(picked, w)),
                    "{src} -> {dest}: veer matched {picked}, model wants one of {winners:?}\nrules: {rules:?}"
                );
                if winners.iter().all(|w| w.allow == winners[0].allow) {
                    assert_eq!(decision.action, action(winners[0].allow));
                }
            }
        }
    }
});
