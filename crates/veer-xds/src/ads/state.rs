//! The sans-IO Delta ADS state machine: what to request, how to apply a
//! response resource by resource, and what to ACK or NACK.
//!
//! It never touches a socket. The transport ([`super::client`]) calls
//! [`AdsState::start`] on every new stream and [`AdsState::on_response`]
//! for every response, and sends the requests they return, in order.
pub use crate::resources::{Decoded, Wanted};
use crate::resources::{Kind, Models, Protos, Resources};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;
use veer_core::snapshot::Spec;

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of every NACK.
pub const INVALID_ARGUMENT: i32 = 3;

/// The by-name kinds, in the order their subscription requests are sent.
const BY_NAME: [Kind; 3] = [Kind::Secret, Kind::Endpoints, Kind::Route];

/// Decodes an `Any` of the given kind (the type URL must match) into the
/// protobuf as received: a [`Check::check`] that keeps [`Protos`].
pub fn decode(kind: Kind, any: &Any) -> Result<Decoded<Protos>, String> {
    if any.type_url != kind.type_url() {
        return Err(format!(
            "resource of type {:?} in a {} response",
            any.type_url,
            kind.short()
        ));
    }
    let v = any.value.as_slice();
    let r = match kind {
        Kind::Listener => Listener::decode(v).map(Decoded::Listener),
        Kind::Cluster => Cluster::decode(v).map(Decoded::Cluster),
        Kind::Endpoints => ClusterLoadAssignment::decode(v).map(Decoded::Endpoints),
        Kind::Route => RouteConfiguration::decode(v).map(Decoded::Route),
        Kind::Secret => Secret::decode(v).map(Decoded::Secret),
    };
    r.map_err(|e| format!("cannot decode: {e}"))
}

/// What the ADS client asks of the translation. Implemented by the real
/// translation and by tests.
pub trait Check {
    /// What the store keeps of each accepted resource.
    type Models: Models;
    /// Decodes and checks one resource on its own. `Err(reason)` = NACK it
    /// and keep the old version.
    fn check(&self, kind: Kind, name: &str, any: &Any) -> Result<Decoded<Self::Models>, String>;
    /// Names to subscribe for the by-name kinds, given the accepted resources.
    fn wanted(&self, res: &Resources<Self::Models>) -> Wanted;
    /// Whether resources of `kind` can change what [`Check::wanted`]
    /// returns. A response of a kind that cannot (EDS, for the
    /// translation: its names come from clusters and listeners) does not
    /// call `wanted` at all, which at mesh scale walks every cluster: the
    /// names subscribed stay what they were, and only the names that
    /// response brought are checked against them. `wanted` must not depend
    /// on [`Resources::dns`] or [`Resources::refused`]. The default (every
    /// kind can) is always correct.
    fn shapes_wanted(&self, kind: Kind) -> bool {
        let _ = kind;
        true
    }
    /// What a configuration visibly still waits for (a resource named by
    /// another and not received). Cheap: no compile. Used when a response
    /// changed nothing, to keep the status current.
    fn missing(&self, res: &Resources<Self::Models>) -> Vec<String>;
    /// The whole configuration, compiled once per response that changed
    /// something. `since` says what changed since the last configuration
    /// the runtime took (a translation may rebuild only that part).
    fn compile(&mut self, res: &Resources<Self::Models>, since: &Changed) -> Compiled;
}

/// What changed in the accepted resources since the last configuration
/// the runtime took (see [`Check::compile`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have (or nothing was taken yet): compile it all.
    Anything,
    /// Only the endpoint assignments (EDS) of these names: added, replaced
    /// or removed.
    Endpoints(BTreeSet<String>),
}

impl Changed {
    /// Nothing changed.
    pub fn nothing() -> Changed {
        Changed::Endpoints(BTreeSet::new())
    }

    /// What changed in `self` and then in `then`.
    fn and(&self, then: Changed) -> Changed {
        match (self, then) {
            (Changed::Endpoints(a), Changed::Endpoints(mut b)) => {
                b.extend(a.iter().cloned());
                Changed::Endpoints(b)
            }
            _ => Changed::Anything,
        }
    }
}

/// What [`Check::compile`] makes of the accepted resources.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per response, moved at once
pub enum Compiled {
    /// A whole configuration, to deliver.
    Ready(Spec),
    /// Not complete yet: what it waits for. Nothing is delivered, and the
    /// response is ACKed (a part still on its way is not an error).
    Waiting(Vec<String>),
    /// The resources do not make a configuration: NACK the response that
    /// led here and revert it.
    Refused(String),
}

/// The ACK or NACK of one response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ack,
    /// The NACK's `error_detail.message`.
    Nack(String),
}

/// What one response did.
#[derive(Debug)]
pub struct Outcome {
    /// The response's kind (`None` for a type URL veer does not know).
    pub kind: Option<Kind>,
    pub nonce: String,
    pub reply: Reply,
    /// A new spec went to the runtime (and it took it).
    pub delivered: bool,
    /// What the configuration still waits for (see [`Check::missing`]).
    pub waiting_for: Vec<String>,
    /// To send, in order: the ACK or NACK first, then any (un)subscriptions.
    pub requests: Vec<DeltaDiscoveryRequest>,
}

/// One change to the store, to undo it.
struct Undo<M: Models> {
    kind: Kind,
    name: String,
    old: Option<Decoded<M>>,
    old_version: Option<String>,
}

/// The client side of one ADS session (it outlives streams: resources and
/// versions survive reconnects).
pub struct AdsState<C: Check> {
    check: C,
    node: Node,
    res: Resources<C::Models>,
    versions: BTreeMap<Kind, BTreeMap<String, String>>,
    /// The names whose version was set or removed since
    /// [`AdsState::take_changed_versions`] last ran: the client's status
    /// copies only those (at mesh scale thousands of versions are held and
    /// a response changes a few).
    changed_versions: Vec<(Kind, String)>,
    /// The by-name kinds requested on the current stream, with their names.
    subscribed: BTreeMap<Kind, BTreeSet<String>>,
    delivered: bool,
    /// The hostnames DNS clusters name, with how often to resolve them
    /// ([`Wanted::dns`], as of the last response).
    dns: BTreeMap<String, Duration>,
    /// What changed since the runtime last took a configuration.
    since: Changed,
    /// `subscribed` and `dns` are what [`Check::wanted`] says of the
    /// resources held, and every by-name resource held (or refused) is
    /// wanted: set by `subscriptions`, and kept by responses of kinds
    /// that do not shape `wanted` (see [`Check::shapes_wanted`]).
    in_line: bool,
    /// How often `wanted` ran (for tests: an EDS-only response must not
    /// run it).
    wanted_runs: u64,
}

/// What one batch of DNS answers did ([`AdsState::on_dns`]).
#[derive(Debug, Default)]
pub struct DnsOutcome {
    /// Some address changed (the configuration was compiled again).
    pub changed: bool,
    /// A new spec went to the runtime (and it took it).
    pub delivered: bool,
    /// Why the configuration with the new addresses was not taken (the
    /// old addresses are kept); nothing is NACKed, as no response led here.
    pub refused: Option<String>,
    pub waiting_for: Vec<String>,
}

impl<C: Check> AdsState<C> {
    pub fn new(check: C, node: Node) -> AdsState<C> {
        AdsState {
            check,
            node,
            res: Resources::default(),
            versions: BTreeMap::new(),
            changed_versions: Vec::new(),
            subscribed: BTreeMap::new(),
            delivered: false,
            dns: BTreeMap::new(),
            since: Changed::Anything,
            in_line: false,
            wanted_runs: 0,
        }
    }

    /// How often [`Check::wanted`] ran, counted from the start.
    pub fn wanted_runs(&self) -> u64 {
        self.wanted_runs
    }

    /// The hostnames to resolve, each with its refresh interval.
    pub fn dns_wanted(&self) -> &BTreeMap<String, Duration> {
        &self.dns
    }

    /// Applies the answers of one round of DNS resolution (`None` = the
    /// lookup failed: the addresses held are kept, as Envoy keeps a DNS
    /// cluster's hosts when a refresh fails; a name never resolved gets
    /// none, so that a configuration does not wait for it forever).
    /// Answers for names no longer wanted are dropped. When an address
    /// changed, the configuration is compiled and applied; if it is
    /// refused, the old addresses are restored.
    pub fn on_dns(
        &mut self,
        answers: BTreeMap<String, Option<Vec<IpAddr>>>,
        apply: &mut dyn FnMut(Spec) -> Result<(), String>,
    ) -> DnsOutcome {
        let before = self.res.dns.clone();
        self.res.dns.retain(|h, _| self.dns.contains_key(h));
        for (host, ips) in answers {
            if !self.dns.contains_key(&host) {
                continue;
            }
            match ips {
                Some(ips) => {
                    self.res.dns.insert(host, ips);
                }
                None => {
                    self.res.dns.entry(host).or_default();
                }
            }
        }
        let mut out = DnsOutcome {
            changed: self.res.dns != before,
            ..Default::default()
        };
        if !out.changed {
            out.waiting_for = self.check.missing(&self.res);
            return out;
        }
        // (DNS answers reach the translation as a whole.)
        let compiled = self.check.compile(&self.res, &Changed::Anything);
        self.since = Changed::Anything;
        match compiled {
            Compiled::Waiting(w) => out.waiting_for = w,
            Compiled::Refused(reason) => out.refused = Some(reason),
            Compiled::Ready(spec) => match apply(spec) {
                Ok(()) => {
                    out.delivered = true;
                    self.delivered = true;
                    self.since = Changed::nothing();
                }
                Err(reason) => {
                    out.refused = Some(format!("runtime refused the configuration: {reason}"))
                }
            },
        }
        if out.refused.is_some() {
            self.res.dns = before;
            out.waiting_for = self.check.missing(&self.res);
        }
        out
    }

    /// The accepted resources.
    pub fn resources(&self) -> &Resources<C::Models> {
        &self.res
    }

    /// The versions of the accepted resources, by kind and name.
    pub fn versions(&self) -> &BTreeMap<Kind, BTreeMap<String, String>> {
        &self.versions
    }

    /// The names (by kind) whose version changed since the last call, in
    /// the order of the changes; see [`AdsState::versions`] for what they
    /// are now.
    pub fn take_changed_versions(&mut self) -> Vec<(Kind, String)> {
        std::mem::take(&mut self.changed_versions)
    }

    /// Sets (`Some`) or removes (`None`) the version of `kind` `name`,
    /// noting the name if that changed anything; returns the old version.
    fn set_version(&mut self, kind: Kind, name: String, v: Option<String>) -> Option<String> {
        let held = self.versions.entry(kind).or_default();
        let old = match v {
            Some(v) => match held.get_mut(&name) {
                Some(h) if *h == v => return Some(v),
                Some(h) => Some(std::mem::replace(h, v)),
                None => {
                    held.insert(name.clone(), v);
                    None
                }
            },
            None => match held.remove(&name) {
                Some(old) => Some(old),
                None => return None,
            },
        };
        self.changed_versions.push((kind, name));
        old
    }

    /// Whether a spec has been delivered (the first configuration is in).
    pub fn delivered(&self) -> bool {
        self.delivered
    }

    pub fn check(&self) -> &C {
        &self.check
    }

    /// The first requests of a new stream: CDS and LDS as wildcards (an
    /// empty subscribe list, never `"*"`), then each by-name kind that has
    /// names to ask for. The node goes in the first one. Every request
    /// carries the versions already held (`initial_resource_versions`).
    pub fn start(&mut self) -> Vec<DeltaDiscoveryRequest> {
        self.subscribed.clear();
        let mut out = Vec::new();
        for kind in [Kind::Cluster, Kind::Listener] {
            out.push(DeltaDiscoveryRequest {
                type_url: kind.type_url().to_string(),
                initial_resource_versions: self
                    .versions
                    .get(&kind)
                    .map(|v| v.iter().map(|(n, v)| (n.clone(), v.clone())).collect())
                    .unwrap_or_default(),
                ..Default::default()
            });
        }
        out.extend(self.subscriptions());
        out[0].node = Some(self.node.clone());
        out
    }

    /// Subscription requests that bring the by-name kinds in line with
    /// [`Check::wanted`]. A kind's first request on a stream is sent only
    /// once it has a name (an empty first list would mean wildcard).
    fn subscriptions(&mut self) -> Vec<DeltaDiscoveryRequest> {
        let mut wanted = self.check.wanted(&self.res);
        self.wanted_runs += 1;
        self.in_line = true;
        self.dns = std::mem::take(&mut wanted.dns);
        let mut out = Vec::new();
        for kind in BY_NAME {
            let want = wanted.take(kind);
            match self.subscribed.get(&kind) {
                None if want.is_empty() => {}
                None => {
                    let held = self.versions.get(&kind);
                    out.push(DeltaDiscoveryRequest {
                        type_url: kind.type_url().to_string(),
                        resource_names_subscribe: want.iter().cloned().collect(),
                        initial_resource_versions: want
                            .iter()
                            .filter_map(|n| Some((n.clone(), held?.get(n)?.clone())))
                            .collect(),
                        ..Default::default()
                    });
                    self.subscribed.insert(kind, want);
                }
                Some(have) if *have == want => {}
                Some(have) => {
                    out.push(DeltaDiscoveryRequest {
                        type_url: kind.type_url().to_string(),
                        resource_names_subscribe: want.difference(have).cloned().collect(),
                        resource_names_unsubscribe: have.difference(&want).cloned().collect(),
                        ..Default::default()
                    });
                    self.subscribed.insert(kind, want);
                }
            }
        }
        out
    }

    /// Applies one response: each resource on its own (rejected ones keep
    /// their old version and are named in one NACK), then the removals;
    /// by-name resources no longer wanted are dropped. If anything changed
    /// and nothing is missing, the whole configuration is compiled and
    /// handed to `apply`; if either refuses, the whole response is reverted
    /// and NACKed. Returns exactly one ACK or NACK, then the subscription
    /// changes.
    pub fn on_response(
        &mut self,
        resp: DeltaDiscoveryResponse,
        apply: &mut dyn FnMut(Spec) -> Result<(), String>,
    ) -> Outcome {
        let nonce = resp.nonce;
        let Some(kind) = Kind::from_type_url(&resp.type_url) else {
            let msg = format!("veer does not handle resources of type {:?}", resp.type_url);
            return Outcome {
                kind: None,
                requests: vec![reply(&resp.type_url, &nonce, Some(&msg))],
                nonce,
                reply: Reply::Nack(msg),
                delivered: false,
                waiting_for: self.check.missing(&self.res),
            };
        };

        let mut undo = Vec::new();
        let mut errors = Vec::new();
        let refused_before = self.res.refused.clone();
        // What `wanted` says cannot change with this response: the names
        // subscribed stand, and only the names it brought can be stale.
        let keeps_wanted = self.in_line && !self.check.shapes_wanted(kind);
        let mut brought: Vec<String> = Vec::new();
        for r in resp.resources {
            let decoded = match &r.resource {
                None => Err("the resource has no body".to_string()),
                Some(any) => self.check.check(kind, &r.name, any).and_then(|d| {
                    if d.kind() == kind {
                        Ok(d)
                    } else {
                        Err(format!("decoded as {}", d.kind().short()))
                    }
                }),
            };
            match decoded {
                Ok(d) if self.res.holds(&r.name, &d) => {
                    // The same content again (a re-subscription, a
                    // reconnect): nothing to apply.
                    self.set_version(kind, r.name, Some(r.version));
                }
                Ok(d) => {
                    if keeps_wanted {
                        brought.push(r.name.clone());
                    }
                    self.res.refused.remove(&(kind, r.name.clone()));
                    let old = self.res.insert(r.name.clone(), d);
                    let old_version = self.set_version(kind, r.name.clone(), Some(r.version));
                    undo.push(Undo {
                        kind,
                        name: r.name,
                        old,
                        old_version,
                    });
                }
                Err(reason) => {
                    let msg = format!("{} {}: {reason}", kind.short(), r.name);
                    // A by-name resource refused before any version of it
                    // was accepted: recorded, so that what names it is not
                    // held back waiting for it (see `Resources::refused`).
                    if !kind.is_wildcard() && !self.res.has(kind, &r.name) {
                        if keeps_wanted {
                            brought.push(r.name.clone());
                        }
                        self.res.refused.insert((kind, r.name), reason);
                    }
                    errors.push(msg);
                }
            }
        }
        for name in resp.removed_resources {
            self.take(kind, name, &mut undo);
        }
        // By-name resources nothing refers to any more are dropped (and
        // unsubscribed below).
        if keeps_wanted {
            // (A wildcard kind has no stale names; other by-name kinds
            // held what they held, all wanted.)
            if !kind.is_wildcard() {
                let want = self.subscribed.get(&kind);
                let stale: BTreeSet<String> = brought
                    .into_iter()
                    .filter(|n| !want.is_some_and(|w| w.contains(n)))
                    .collect();
                for name in stale {
                    self.take(kind, name, &mut undo);
                }
            }
        } else {
            self.drop_stale(&mut undo);
        }
        let mut delivered = false;
        let mut waiting_for = Vec::new();
        if undo.is_empty() && self.res.refused == refused_before {
            waiting_for = self.check.missing(&self.res);
        } else {
            // Only endpoint assignments added, replaced or removed: say
            // which, so that the translation can rebuild only what they feed.
            let now = if self.res.refused == refused_before
                && undo.iter().all(|u| u.kind == Kind::Endpoints)
            {
                Changed::Endpoints(undo.iter().map(|u| u.name.clone()).collect())
            } else {
                Changed::Anything
            };
            let since = self.since.and(now);
            let refused = match self.check.compile(&self.res, &since) {
                Compiled::Refused(reason) => Some(format!("configuration rejected: {reason}")),
                Compiled::Waiting(w) => {
                    waiting_for = w;
                    self.since = since;
                    None
                }
                Compiled::Ready(spec) => match apply(spec) {
                    Err(reason) => Some(format!("runtime refused the configuration: {reason}")),
                    Ok(()) => {
                        delivered = true;
                        self.delivered = true;
                        self.since = Changed::nothing();
                        None
                    }
                },
            };
            if let Some(reason) = refused {
                // What the translation made last was not taken: the next
                // compile starts over.
                self.since = Changed::Anything;
                errors.push(reason);
                self.revert(undo);
                self.res.refused = refused_before;
                waiting_for = self.check.missing(&self.res);
            }
        }

        let msg = (!errors.is_empty()).then(|| errors.join("; "));
        let mut requests = vec![reply(kind.type_url(), &nonce, msg.as_deref())];
        if !keeps_wanted {
            requests.extend(self.subscriptions());
        }
        Outcome {
            kind: Some(kind),
            nonce,
            reply: msg.map_or(Reply::Ack, Reply::Nack),
            delivered,
            waiting_for,
            requests,
        }
    }

    /// Drops every by-name resource (and refusal) [`Check::wanted`] no
    /// longer names, recording how to undo it.
    fn drop_stale(&mut self, undo: &mut Vec<Undo<C::Models>>) {
        let wanted = self.check.wanted(&self.res);
        self.wanted_runs += 1;
        for k in BY_NAME {
            let want = wanted.names(k).expect("by-name kind");
            let refused = self
                .res
                .refused
                .keys()
                .filter(|(rk, _)| *rk == k)
                .map(|(_, n)| n.as_str());
            // (Only the stale names are copied: at mesh scale, thousands
            // are held and one or none is stale.)
            let stale: Vec<String> = self
                .res
                .names_held(k)
                .into_iter()
                .chain(refused)
                .filter(|n| !want.contains(*n))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(str::to_string)
                .collect();
            for name in stale {
                self.take(k, name, undo);
            }
        }
    }

    /// Removes a resource (if held), recording how to undo it.
    fn take(&mut self, kind: Kind, name: String, undo: &mut Vec<Undo<C::Models>>) {
        // (A refusal dropped here is restored with the rest on a revert:
        // the caller keeps the set it started from.)
        self.res.refused.remove(&(kind, name.clone()));
        let old = self.res.remove(kind, &name);
        let old_version = self.set_version(kind, name.clone(), None);
        if old.is_some() || old_version.is_some() {
            undo.push(Undo {
                kind,
                name,
                old,
                old_version,
            });
        }
    }

    fn revert(&mut self, undo: Vec<Undo<C::Models>>) {
        for u in undo.into_iter().rev() {
            match u.old {
                Some(d) => {
                    self.res.insert(u.name.clone(), d);
                }
                None => {
                    self.res.remove(u.kind, &u.name);
                }
            }
            self.set_version(u.kind, u.name, u.old_version);
        }
    }
}

/// An ACK (no message) or a NACK (`INVALID_ARGUMENT` with the message).
fn reply(type_url: &str, nonce: &str, nack: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        response_nonce: nonce.to_string(),
        error_detail: nack.map(|m| Status {
            code: INVALID_ARGUMENT,
            message: m.to_string(),
            details: Vec::new(),
        }),
        ..Default::default()
    }
}
