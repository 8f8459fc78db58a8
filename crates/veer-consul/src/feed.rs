//! The change feed for transparent mode, sans IO: which services to read
//! again, given two index-ed lists the agent keeps current.
//!
//! In transparent mode every catalog service is a candidate upstream, so a
//! blocking query per service would hold one agent connection per service
//! (Consul's `limits.http_max_conns_per_client` is 200 by default). Instead
//! two blocking queries tell what changed:
//!
//! - `/v1/catalog/services` (name → tags; its index moves with any service
//!   registration change in the datacenter): names added or retagged are
//!   read, names gone are dropped;
//! - `/v1/health/state/any` (every check with its `ModifyIndex`; its index
//!   moves with any check change): a service whose checks changed is read
//!   again — for a sidecar, the services it is a proxy for; for a node
//!   check, every upstream with an instance on that node.
//!
//! A service is "read" with non-blocking fetches (`/v1/catalog/service/:name`,
//! then `/v1/health/connect/:name` unless it is a proxy), a bounded number
//! at a time. A catalog move that neither list explains (a service changed
//! without a check changing at the same raft index, e.g. a new port) leads
//! to reading every service again, and so does an index that went
//! backwards (agent or servers restarted). Observed on Consul 1.8.7: a
//! check status change moves `/v1/health/state/any` but not
//! `/v1/catalog/services`; a port change moves `/v1/catalog/services` (and
//! that service's `/v1/health/connect` index) but not the checks.
//!
//! Known gap: several services changed in one raft entry (one `/v1/txn`),
//! one with a check and one without, explain each other; the one without a
//! check is read again only at its next change.
use crate::api::{CatalogInstance, ChecksView, ConnectInstance};
use crate::assemble::ServiceKey;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// `/v1/catalog/services` at one index: name → fingerprint of its tags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogView {
    pub index: u64,
    pub services: BTreeMap<String, u64>,
}

/// What changed between two catalog answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogDiff {
    pub added: BTreeSet<String>,
    pub removed: BTreeSet<String>,
    pub retagged: BTreeSet<String>,
}

impl CatalogDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.retagged.is_empty()
    }
}

/// Compares two catalog answers.
pub fn diff_catalog(old: &BTreeMap<String, u64>, new: &BTreeMap<String, u64>) -> CatalogDiff {
    let mut d = CatalogDiff::default();
    for (name, tags) in new {
        match old.get(name) {
            None => {
                d.added.insert(name.clone());
            }
            Some(t) if t != tags => {
                d.retagged.insert(name.clone());
            }
            Some(_) => {}
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            d.removed.insert(name.clone());
        }
    }
    d
}

/// Whose checks changed between two check lists: service names and nodes
/// (node checks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChecksDiff {
    pub services: BTreeSet<String>,
    pub nodes: BTreeSet<String>,
}

fn diff_maps(old: &HashMap<String, u64>, new: &HashMap<String, u64>) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = new
        .iter()
        .filter(|(k, v)| old.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .collect();
    out.extend(old.keys().filter(|k| !new.contains_key(*k)).cloned());
    out
}

/// Compares two check lists.
pub fn diff_checks(old: &ChecksView, new: &ChecksView) -> ChecksDiff {
    ChecksDiff {
        services: diff_maps(&old.by_service, &new.by_service),
        nodes: diff_maps(&old.by_node, &new.by_node),
    }
}

/// Whether a catalog change at raft index `index` is accounted for by the
/// checks: the check list changed at that very index (a check created,
/// modified or removed along with the service change).
pub fn checks_explain(index: u64, checks: &ChecksView) -> bool {
    checks.index == index || checks.indexes.contains(&index)
}

/// What reading one service found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetched {
    /// Every instance is a `connect-proxy`: not an upstream itself; the
    /// services it is a proxy for, and its instance IDs.
    Proxy {
        ids: Vec<String>,
        destinations: BTreeSet<String>,
    },
    /// Anything else: its own instances (for virtual addresses) and its
    /// Connect instances (sidecars, or itself if connect-native).
    Service {
        instances: Vec<CatalogInstance>,
        connect: Vec<ConnectInstance>,
    },
}

/// The result of [`Feed::on_catalog`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogOutcome {
    /// Names no longer in the catalog: drop what is known of them.
    pub removed: BTreeSet<String>,
    /// The change is not explained yet by the checks at hand: read the
    /// check list once now (non-blocking) and hand it to [`Feed::on_checks`].
    pub need_checks: bool,
}

/// The feed's bookkeeping: the last two lists, the proxy → destination map
/// and the services waiting to be read. Holds no task and no future; a
/// service costs a few map entries.
#[derive(Debug, Default)]
pub struct Feed {
    catalog: Option<CatalogView>,
    checks: Option<ChecksView>,
    /// A catalog change at this index waiting for the checks to explain it.
    pending: Option<u64>,
    /// Proxy service name → the services its instances are proxies for,
    /// sorted (a `Vec`: nearly always one name, which a `BTreeSet` would
    /// keep in a node of eleven).
    proxies: HashMap<String, Vec<String>>,
    queue: BTreeSet<String>,
    in_flight: BTreeSet<String>,
    /// How often every service was read again (unexplained change or reset).
    pub full_reads: u64,
}

fn nodes_of(known: &BTreeMap<ServiceKey, Vec<ConnectInstance>>, node: &str) -> Vec<String> {
    known
        .iter()
        .filter(|(k, c)| k.datacenter.is_none() && c.iter().any(|i| i.node == node))
        .map(|(k, _)| k.name.clone())
        .collect()
}

impl Feed {
    /// The catalog names, once the first answer is in.
    pub fn catalog(&self) -> Option<&BTreeMap<String, u64>> {
        self.catalog.as_ref().map(|c| &c.services)
    }

    /// Whether `name` is known to be a proxy.
    pub fn is_proxy(&self, name: &str) -> bool {
        self.proxies.contains_key(name)
    }

    /// Reading can start once both lists are in (the check list is the
    /// baseline later changes are measured against).
    pub fn started(&self) -> bool {
        self.catalog.is_some() && self.checks.is_some()
    }

    /// Reads queued or under way, or a change not yet accounted for: a
    /// spec built now would mix old and new.
    pub fn busy(&self) -> bool {
        !self.queue.is_empty() || !self.in_flight.is_empty() || self.pending.is_some()
    }

    /// Services waiting to be read (queued, not under way).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Reads under way.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn in_catalog(&self, name: &str) -> bool {
        self.catalog
            .as_ref()
            .is_some_and(|c| c.services.contains_key(name))
    }

    fn queue(&mut self, name: &str) {
        if self.in_catalog(name) {
            self.queue.insert(name.to_string());
        }
    }

    /// Every service again (proxies are known through their destinations).
    fn read_all(&mut self) {
        self.full_reads += 1;
        let names: Vec<String> = self
            .catalog
            .iter()
            .flat_map(|c| c.services.keys())
            .filter(|n| !self.proxies.contains_key(*n))
            .cloned()
            .collect();
        self.queue.extend(names);
    }

    /// A new `/v1/catalog/services` answer.
    pub fn on_catalog(&mut self, view: CatalogView) -> CatalogOutcome {
        let mut out = CatalogOutcome::default();
        let Some(old) = self.catalog.replace(view) else {
            let names: Vec<String> = self
                .catalog()
                .into_iter()
                .flatten()
                .map(|(n, _)| n.clone())
                .collect();
            self.queue.extend(names);
            return out;
        };
        let new = self.catalog.as_ref().expect("just set");
        let (index, went_back) = (new.index, new.index < old.index);
        let diff = diff_catalog(&old.services, &new.services);
        for n in diff.removed.iter() {
            self.queue.remove(n);
            self.proxies.remove(n);
        }
        let explained = !diff.is_empty();
        for n in diff.added.iter().chain(diff.retagged.iter()) {
            self.queue.insert(n.clone());
        }
        out.removed = diff.removed;
        if went_back {
            self.pending = None;
            self.read_all();
        } else if index != old.index && !explained {
            match &self.checks {
                Some(c) if c.index >= index => {
                    if !checks_explain(index, c) {
                        self.read_all();
                    }
                }
                _ => {
                    self.pending = Some(self.pending.map_or(index, |p| p.max(index)));
                    out.need_checks = true;
                }
            }
        }
        out
    }

    /// A new `/v1/health/state/any` answer; `known` is what is known of
    /// each upstream (to find the services on a node). `one_shot`: the read
    /// asked for by [`CatalogOutcome::need_checks`], made after the catalog
    /// answer it is for (the caller drops an older one still under way):
    /// it settles the pending change — explained by the checks, or every
    /// service is read again (Consul's index for the check list does not
    /// move when a change leaves the checks alone). A one-shot answer older
    /// than the watch's is not used as the list, only to settle.
    pub fn on_checks(
        &mut self,
        view: ChecksView,
        known: &BTreeMap<ServiceKey, Vec<ConnectInstance>>,
        one_shot: bool,
    ) {
        if one_shot && self.checks.as_ref().is_some_and(|c| view.index < c.index) {
            return self.settle_pending(true);
        }
        let Some(old) = self.checks.replace(view) else {
            return self.settle_pending(one_shot);
        };
        let new = self.checks.as_ref().expect("just set");
        if new.index < old.index {
            self.pending = None;
            return self.read_all();
        }
        let d = diff_checks(&old, new);
        for s in &d.services {
            match self.proxies.get(s) {
                Some(dests) => {
                    for d in dests.clone() {
                        self.queue(&d);
                    }
                }
                None => self.queue(s),
            }
        }
        for n in &d.nodes {
            for s in nodes_of(known, n) {
                self.queue(&s);
            }
        }
        self.settle_pending(one_shot);
    }

    fn settle_pending(&mut self, now: bool) {
        let (Some(p), Some(c)) = (self.pending, &self.checks) else {
            return;
        };
        if now || c.index >= p {
            self.pending = None;
            if !checks_explain(p, c) {
                self.read_all();
            }
        }
    }

    /// Takes up to `room` services to read now (none before
    /// [`started`](Self::started)); the caller reports each with
    /// [`on_fetched`](Self::on_fetched) or [`on_failed`](Self::on_failed).
    pub fn take(&mut self, room: usize) -> Vec<String> {
        if !self.started() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        while out.len() < room {
            let Some(n) = self.queue.pop_first() else {
                break;
            };
            if self.in_flight.contains(&n) {
                skipped.push(n); // read again once the current read is back
            } else {
                self.in_flight.insert(n.clone());
                out.push(n);
            }
        }
        self.queue.extend(skipped);
        out
    }

    /// A read failed: drop it from the reads under way; `again` queues it.
    pub fn on_failed(&mut self, name: &str, again: bool) {
        self.in_flight.remove(name);
        if again {
            self.queue(name);
        }
    }

    /// A read came back. Returns whether it is still wanted (the name is in
    /// the catalog). For a proxy, queues each destination whose known
    /// Connect instances lack one of the proxy's instances (a new sidecar;
    /// a read under way is followed by another), and destinations it no
    /// longer serves.
    pub fn on_fetched(
        &mut self,
        name: &str,
        f: &Fetched,
        known: &BTreeMap<ServiceKey, Vec<ConnectInstance>>,
    ) -> bool {
        self.in_flight.remove(name);
        if !self.in_catalog(name) {
            return false;
        }
        let before = match f {
            Fetched::Proxy { ids, destinations } => {
                for d in destinations {
                    let seen = known
                        .get(&ServiceKey::local(d))
                        .is_some_and(|c| ids.iter().all(|id| c.iter().any(|i| &i.id == id)));
                    if !seen {
                        self.queue(d);
                    }
                }
                self.proxies
                    .insert(name.to_string(), destinations.iter().cloned().collect())
            }
            Fetched::Service { connect, .. } => {
                // The sidecars named here are proxies for `name`: a sidecar
                // name not read yet need not be.
                for c in connect {
                    if c.service != name && self.in_catalog(&c.service) {
                        let dests = self.proxies.entry(c.service.clone()).or_default();
                        if let Err(i) = dests.binary_search_by(|d| d.as_str().cmp(name)) {
                            dests.insert(i, name.to_string());
                        }
                        self.queue.remove(&c.service);
                    }
                }
                self.proxies.remove(name)
            }
        };
        if let Some(before) = before {
            let now = match f {
                Fetched::Proxy { destinations, .. } => Some(destinations),
                Fetched::Service { .. } => None,
            };
            for d in before
                .iter()
                .filter(|d| !now.is_some_and(|n| n.contains(*d)))
            {
                self.queue(d);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests;
