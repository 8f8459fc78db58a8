//! The discovery-chain config entries — `service-resolver`,
//! `service-router`, `service-splitter` — sans IO: parsing the agent's
//! lists, and naming what veer does not apply yet.
//!
//! # Watching
//!
//! One blocking list per kind, `GET /v1/config/<kind>` (every entry of the
//! kind the token may read, index-blocking; observed on Consul 1.8.7: a
//! write or delete of that kind wakes the list within a second, a write of
//! another kind does not): three long polls whatever the number of
//! upstreams, never one query per service. The source runs them as
//! [`crate::watch::WatchKey::ChainEntries`] and keeps the latest answer of
//! each kind in [`crate::assemble::State::chain_entries`] ([`Entries`]).
//!
//! # Applying
//!
//! Every service with an entry of any of these kinds has its discovery
//! chain read ([`crate::assemble::chain_keys`]), and the chain applies
//! them: resolvers as targets and failover, routers and splitters as HTTP
//! routes ([`crate::chain::http`]). [`unapplied`] names the router and
//! splitter entries of an upstream whose chain is *not* read (with the
//! settings they set: `service-router api: Routes`), for
//! [`veer_core::snapshot::Spec::unapplied`]; they are routing, not
//! authorization, so they are named, not refused. Entries for veer's own
//! service are not named: they shape how *callers* reach this service and
//! are applied by the callers' proxies, not by this one.
//!
//! The discovery-chain work can take this module over: [`Entries`] says
//! which services have entries of any kind ([`Entries::services`]) and
//! keeps each entry's JSON ([`Entry::raw`]) for a typed reading.
use crate::Error;
use std::collections::{BTreeMap, BTreeSet};
use veer_core::snapshot::{Unapplied, UpstreamSpec};

/// A discovery-chain config entry kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Resolver,
    Router,
    Splitter,
}

impl Kind {
    /// Every kind, in the order a chain is compiled (router → splitter →
    /// resolver) reversed: resolvers first.
    pub const ALL: [Kind; 3] = [Kind::Resolver, Kind::Router, Kind::Splitter];

    /// Consul's name of the kind (`service-resolver`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Resolver => "service-resolver",
            Kind::Router => "service-router",
            Kind::Splitter => "service-splitter",
        }
    }

    /// The agent endpoint listing every entry of the kind.
    pub fn path(self) -> String {
        format!("/v1/config/{}", self.as_str())
    }

    /// What veer does instead of applying an entry of this kind.
    fn instead(self, service: &str) -> String {
        match self {
            Kind::Resolver => format!(
                "not applied yet: veer connects to {service}'s own healthy instances with the \
                 upstream's connect timeout (no subsets, redirect or failover)"
            ),
            Kind::Router => format!(
                "routes not applied, traffic to {service} relayed at L4 to its own instances"
            ),
            Kind::Splitter => {
                format!("splits not applied, all traffic to {service} goes to its own instances")
            }
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry as the agent lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub kind: Kind,
    /// The service the entry is for.
    pub name: String,
    /// `default` when the agent leaves it out (OSS).
    pub namespace: String,
    /// The top-level settings the entry sets, by Consul's field names
    /// (sorted), with the value for scalars
    /// (`ConnectTimeout=1s`, `DefaultSubset=v1`, `Failover`, `Routes`);
    /// bookkeeping fields (`Kind`, `Name`, `Namespace`, `Partition`,
    /// `Meta`, the indexes) and empty values are left out.
    pub settings: Vec<String>,
    /// The entry's JSON as the agent sent it.
    pub raw: serde_json::Value,
}

/// Fields of an entry that are not settings.
const BOOKKEEPING: [&str; 7] = [
    "Kind",
    "Name",
    "Namespace",
    "Partition",
    "Meta",
    "CreateIndex",
    "ModifyIndex",
];

fn is_empty(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

fn setting(key: &str, v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::String(s) => format!("{key}={s}"),
        Value::Bool(_) | Value::Number(_) => format!("{key}={v}"),
        _ => key.to_string(),
    }
}

/// Parses `GET /v1/config/<kind>` (a JSON list of entries). Entries of
/// another kind or without a name are skipped.
pub fn parse(kind: Kind, body: &[u8]) -> Result<Vec<Entry>, Error> {
    let what = kind.path();
    let list: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_slice(body)
        .map_err(|e| Error::decode(&what, format!("unexpected JSON: {e}")))?;
    let mut out = Vec::new();
    for m in list {
        let text = |k: &str| m.get(k).and_then(|v| v.as_str()).unwrap_or("").trim();
        if !text("Kind").is_empty() && text("Kind") != kind.as_str() {
            continue;
        }
        let name = text("Name").to_string();
        if name.is_empty() {
            continue;
        }
        let namespace = match text("Namespace") {
            "" => "default".to_string(),
            ns => ns.to_string(),
        };
        let settings = m
            .iter()
            .filter(|(k, v)| !BOOKKEEPING.contains(&k.as_str()) && !is_empty(v))
            .map(|(k, v)| setting(k, v))
            .collect();
        out.push(Entry {
            kind,
            name,
            namespace,
            settings,
            raw: serde_json::Value::Object(m),
        });
    }
    Ok(out)
}

/// The latest list of each kind; a kind absent has not been read yet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entries {
    lists: BTreeMap<Kind, BTreeMap<String, Entry>>,
}

impl Entries {
    /// Replaces the list of `kind`.
    pub fn set(&mut self, kind: Kind, entries: Vec<Entry>) {
        let by_name = entries
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| (e.name.clone(), e))
            .collect();
        self.lists.insert(kind, by_name);
    }

    /// Forgets everything read (the watches start over).
    pub fn clear(&mut self) {
        self.lists.clear();
    }

    /// Whether every kind has been read.
    pub fn complete(&self) -> bool {
        Kind::ALL.iter().all(|k| self.lists.contains_key(k))
    }

    /// The kinds not read yet.
    pub fn missing(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| !self.lists.contains_key(k))
            .collect()
    }

    /// The entry of `kind` for `service`, if any.
    pub fn get(&self, kind: Kind, service: &str) -> Option<&Entry> {
        self.lists.get(&kind)?.get(service)
    }

    /// Every service that has an entry of any of these kinds (whose
    /// discovery chain is more than the default).
    pub fn services(&self) -> BTreeSet<&str> {
        self.lists
            .values()
            .flat_map(|l| l.keys().map(String::as_str))
            .collect()
    }
}

/// The services with a `service-resolver` entry, each with the entry's
/// `ModifyIndex`: which chains veer reads ([`crate::assemble::chain_keys`]).
pub fn resolver_index(resolvers: &[Entry]) -> BTreeMap<String, u64> {
    resolvers
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.raw
                    .get("ModifyIndex")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0),
            )
        })
        .collect()
}

/// Names every entry that concerns an upstream in `upstreams` (by service
/// name; several upstream entries of one service are named once), sorted
/// by service, then kind: `service-resolver web: ConnectTimeout=1s,
/// Failover`, `service-router api: Routes`, `service-splitter api: Splits`.
///
/// Resolvers are applied (the discovery chain, [`crate::chain`]), so they
/// are never named here; nor is anything of a service whose chain veer
/// reads (`chained`): the chain names its own routers and splitters.
pub fn unapplied(
    entries: &Entries,
    upstreams: &[UpstreamSpec],
    chained: impl Fn(&str) -> bool,
) -> Vec<Unapplied> {
    let names: BTreeSet<&str> = upstreams
        .iter()
        .map(|u| u.identity.service.as_str())
        .collect();
    let mut out = Vec::new();
    for service in names {
        if chained(service) {
            continue;
        }
        for kind in [Kind::Router, Kind::Splitter] {
            let Some(e) = entries.get(kind, service) else {
                continue;
            };
            let what = if e.settings.is_empty() {
                "(no settings)".to_string()
            } else {
                e.settings.join(", ")
            };
            out.push(Unapplied::unsupported(
                format!("{kind} {service}: {what}"),
                kind.instead(service),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests;
