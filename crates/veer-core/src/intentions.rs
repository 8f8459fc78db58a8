//! Consul's L4 intentions: precedence, ordering and evaluation (sans-IO).
//!
//! Precedence counts how exact the source and destination are
//! (namespace `*` counts 0, name `*` counts 1, both exact count 2):
//! `max = 3, 6, 9` for a destination exact-count of 0, 1, 2, and
//! `precedence = max - (2 - source exact-count)`. Intentions are sorted by
//! precedence (highest first), then by source namespace, source name,
//! destination namespace and destination name. The first intention whose
//! source matches the peer decides; with none, the default action applies.
use crate::spiffe::ServiceId;
use std::cmp::Ordering;
use std::fmt;

/// An exact name or the wildcard `*`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Name {
    Any,
    Exact(String),
}

impl Name {
    pub fn parse(s: &str) -> Name {
        if s == "*" {
            Name::Any
        } else {
            Name::Exact(s.to_string())
        }
    }
    fn matches(&self, s: &str) -> bool {
        match self {
            Name::Any => true,
            Name::Exact(e) => e == s,
        }
    }
    fn as_str(&self) -> &str {
        match self {
            Name::Any => "*",
            Name::Exact(e) => e,
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// A (namespace, name) pair, each exact or `*`. Partitions must be exact.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub partition: String,
    pub namespace: Name,
    pub name: Name,
}

impl Target {
    pub fn new(partition: &str, namespace: &str, name: &str) -> Target {
        Target {
            partition: partition.to_string(),
            namespace: Name::parse(namespace),
            name: Name::parse(name),
        }
    }
    fn exact_count(&self) -> u8 {
        match (&self.namespace, &self.name) {
            (Name::Any, _) => 0,
            (_, Name::Any) => 1,
            _ => 2,
        }
    }
    fn matches(&self, id: &ServiceId) -> bool {
        self.partition == id.partition
            && self.namespace.matches(&id.namespace)
            && self.name.matches(&id.service)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.partition != "default" {
            write!(f, "{}/", self.partition)?;
        }
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One L4 intention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intention {
    pub source: Target,
    pub destination: Target,
    pub action: Action,
    /// Consul's ID when it came from Consul; for logs.
    pub id: Option<String>,
    /// L7 permissions (Consul ≥ 1.9 `service-intentions`); when not empty
    /// they decide per request instead of `action` (first match; none
    /// matching = the default action). On an L4 listener they cannot be
    /// checked, so the intention counts as `deny` there, as Consul's own
    /// xDS does.
    pub permissions: Vec<crate::l7::Permission>,
}

impl Intention {
    pub fn new(source: Target, destination: Target, action: Action) -> Intention {
        Intention {
            source,
            destination,
            action,
            id: None,
            permissions: Vec::new(),
        }
    }

    /// Consul's precedence, 1..=9.
    pub fn precedence(&self) -> u8 {
        let max = match self.destination.exact_count() {
            2 => 9,
            1 => 6,
            _ => 3,
        };
        max - (2 - self.source.exact_count())
    }

    fn sort_key(&self) -> (std::cmp::Reverse<u8>, &str, &str, &str, &str) {
        (
            std::cmp::Reverse(self.precedence()),
            self.source.namespace.as_str(),
            self.source.name.as_str(),
            self.destination.namespace.as_str(),
            self.destination.name.as_str(),
        )
    }
}

impl fmt::Display for Intention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} => {} ({}, precedence {})",
            self.source,
            self.destination,
            self.action.as_str(),
            self.precedence()
        )
    }
}

/// Why a decision was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The intention at this index of [`Intentions::rules`] matched first.
    Matched(usize),
    /// No intention matched the source; the default action applied.
    Default,
}

/// The outcome of evaluating one source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.action == Action::Allow
    }
    /// Metric label: `allowed`, `denied_by_intention` or `denied_by_default`.
    pub fn classify(&self) -> &'static str {
        match (self.action, &self.reason) {
            (Action::Allow, _) => "allowed",
            (Action::Deny, Reason::Matched(_)) => "denied_by_intention",
            (Action::Deny, Reason::Default) => "denied_by_default",
        }
    }
}

/// The intentions that apply to one destination service, in evaluation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intentions {
    rules: Vec<Intention>,
    default: Action,
}

impl Intentions {
    /// Keeps the intentions whose destination matches `destination` and sorts
    /// them in Consul's order.
    pub fn new(destination: &ServiceId, all: Vec<Intention>, default: Action) -> Intentions {
        let mut rules: Vec<Intention> = all
            .into_iter()
            .filter(|i| i.destination.matches(destination))
            .collect();
        rules.sort_by(|a, b| match a.sort_key().cmp(&b.sort_key()) {
            Ordering::Equal => a.source.partition.cmp(&b.source.partition),
            o => o,
        });
        Intentions { rules, default }
    }

    pub fn rules(&self) -> &[Intention] {
        &self.rules
    }

    pub fn default_action(&self) -> Action {
        self.default
    }

    /// Decides whether `source` may connect (L4). An intention with L7
    /// permissions cannot be checked on a connection, so it denies, as
    /// Consul's own xDS does ("in case L7 intentions slip through").
    pub fn evaluate(&self, source: &ServiceId) -> Decision {
        match self.evaluate_source(source) {
            Some(i) => {
                let rule = &self.rules[i];
                Decision {
                    action: if rule.permissions.is_empty() {
                        rule.action
                    } else {
                        Action::Deny
                    },
                    reason: Reason::Matched(i),
                }
            }
            None => Decision {
                action: self.default,
                reason: Reason::Default,
            },
        }
    }

    /// The index (in [`Intentions::rules`]) of the first intention whose
    /// source matches `source`, the one that decides.
    pub fn evaluate_source(&self, source: &ServiceId) -> Option<usize> {
        self.rules.iter().position(|r| r.source.matches(source))
    }

    /// A human-readable reason for logs.
    pub fn explain(&self, d: &Decision) -> String {
        match d.reason {
            Reason::Matched(i) if !self.rules[i].permissions.is_empty() => format!(
                "matched intention {}, whose L7 permissions a TCP listener cannot check: denied",
                self.rules[i]
            ),
            Reason::Matched(i) => {
                let r = &self.rules[i];
                match &r.id {
                    Some(id) => format!("matched intention {r} [id {id}]"),
                    None => format!("matched intention {r}"),
                }
            }
            Reason::Default => format!(
                "no intention matched; default action is {}",
                self.default.as_str()
            ),
        }
    }
}

#[cfg(test)]
mod tests;
