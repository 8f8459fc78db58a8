//! The xDS resources veer subscribes to, by kind, as the ADS client keeps
//! them once accepted.
//!
//! Shared vocabulary of the ADS client (which keeps one [`Resources`] per
//! stream and applies responses to it resource by resource) and the
//! translation (which reads a [`Resources`] and compiles a `Spec`).
use crate::translate::{ClusterModel, EndpointModel, ListenerEntry, RoutesModel, SecretModel};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

/// The resource kinds Consul serves over Delta ADS (v3 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Listener,
    Cluster,
    Endpoints,
    Route,
    Secret,
}

impl Kind {
    /// Every kind, in Consul's send order (SDS, CDS, EDS, LDS, RDS).
    pub const ALL: [Kind; 5] = [
        Kind::Secret,
        Kind::Cluster,
        Kind::Endpoints,
        Kind::Listener,
        Kind::Route,
    ];

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoints => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    /// Short name for logs and metric labels (`lds`, `cds`, `eds`, `rds`, `sds`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Cluster => "cds",
            Kind::Endpoints => "eds",
            Kind::Route => "rds",
            Kind::Secret => "sds",
        }
    }

    /// LDS and CDS are wildcard subscriptions; the others are by name.
    pub fn is_wildcard(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }
}

/// What the store keeps of each resource kind once accepted.
pub trait Models: Sized {
    type Listener: Clone + std::fmt::Debug + PartialEq;
    type Cluster: Clone + std::fmt::Debug + PartialEq;
    type Endpoints: Clone + std::fmt::Debug + PartialEq;
    type Route: Clone + std::fmt::Debug + PartialEq;
    type Secret: Clone + std::fmt::Debug + PartialEq;
}

/// What veer keeps: the translation's models of each resource, checked on
/// their own ([`crate::translate::decode`]). A few hundred bytes per
/// upstream where the decoded protobufs took about 14 KB (prost's structs
/// are 4-20x their wire size); inline certificates are shared between
/// resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Compact;

impl Models for Compact {
    type Listener = ListenerEntry;
    type Cluster = ClusterModel;
    type Endpoints = Box<[EndpointModel]>;
    type Route = RoutesModel;
    type Secret = SecretModel;
}

/// The decoded protobufs, as received (the ADS client's own tests, which
/// do not depend on the translation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Protos;

impl Models for Protos {
    type Listener = Listener;
    type Cluster = Cluster;
    type Endpoints = ClusterLoadAssignment;
    type Route = RouteConfiguration;
    type Secret = Secret;
}

/// The accepted resources of one ADS stream, by kind and name.
#[derive(Clone, Debug, PartialEq)]
pub struct Resources<M: Models = Compact> {
    pub listeners: BTreeMap<String, M::Listener>,
    pub clusters: BTreeMap<String, M::Cluster>,
    pub endpoints: BTreeMap<String, M::Endpoints>,
    pub routes: BTreeMap<String, M::Route>,
    pub secrets: BTreeMap<String, M::Secret>,
    /// By-name resources (EDS, RDS, SDS) whose every version so far was
    /// refused (NACKed), with the reason. What names them does not wait
    /// for them: a cluster whose endpoints were refused has none (Envoy's
    /// cluster, too, leaves warming without endpoints), so one bad
    /// resource does not hold back every later update. Cleared when a
    /// version is accepted or nothing names it any more.
    pub refused: BTreeMap<(Kind, String), String>,
    /// The addresses of the hostnames DNS clusters name, as the source
    /// last resolved them (the translation stays sans IO: the ADS client
    /// resolves [`Wanted::dns`] and feeds the answers in). Present = the
    /// name was resolved at least once; empty = it has no address (or its
    /// first resolution failed: a cluster with no hosts, not a wait).
    pub dns: BTreeMap<String, Vec<IpAddr>>,
}

impl<M: Models> Default for Resources<M> {
    fn default() -> Self {
        Resources {
            listeners: BTreeMap::new(),
            clusters: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
            secrets: BTreeMap::new(),
            refused: BTreeMap::new(),
            dns: BTreeMap::new(),
        }
    }
}

/// One resource, checked on its own (for veer, by
/// [`crate::translate::decode`]): what the ADS client stores in
/// [`Resources`] once it has accepted it.
// Short-lived (one per received resource, moved into `Resources`): boxing
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded<M: Models = Compact> {
    Listener(M::Listener),
    Cluster(M::Cluster),
    Endpoints(M::Endpoints),
    Route(M::Route),
    Secret(M::Secret),
}

impl<M: Models> Decoded<M> {
    pub fn kind(&self) -> Kind {
        match self {
            Decoded::Listener(_) => Kind::Listener,
            Decoded::Cluster(_) => Kind::Cluster,
            Decoded::Endpoints(_) => Kind::Endpoints,
            Decoded::Route(_) => Kind::Route,
            Decoded::Secret(_) => Kind::Secret,
        }
    }
}

/// The names to subscribe to for the by-name kinds (EDS, RDS, SDS), as
/// [`crate::translate::wanted`] derives them from the accepted listeners
/// and clusters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub endpoints: BTreeSet<String>,
    pub routes: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
    /// Hostnames of DNS clusters to resolve, each with how often (the
    /// shortest `dns_refresh_rate` of the clusters naming it).
    pub dns: BTreeMap<String, Duration>,
}

impl Wanted {
    /// The names wanted for one by-name kind; `None` for LDS and CDS
    /// (wildcard).
    pub fn names(&self, kind: Kind) -> Option<&BTreeSet<String>> {
        match kind {
            Kind::Endpoints => Some(&self.endpoints),
            Kind::Route => Some(&self.routes),
            Kind::Secret => Some(&self.secrets),
            Kind::Listener | Kind::Cluster => None,
        }
    }

    /// Takes the names of a by-name kind out (empty for the others).
    pub fn take(&mut self, kind: Kind) -> BTreeSet<String> {
        match kind {
            Kind::Endpoints => std::mem::take(&mut self.endpoints),
            Kind::Route => std::mem::take(&mut self.routes),
            Kind::Secret => std::mem::take(&mut self.secrets),
            Kind::Listener | Kind::Cluster => BTreeSet::new(),
        }
    }
}

impl<M: Models> Resources<M> {
    /// Stores an accepted resource under `name`, replacing (and returning)
    /// any of that kind and name.
    pub fn insert(&mut self, name: String, d: Decoded<M>) -> Option<Decoded<M>> {
        match d {
            Decoded::Listener(r) => self.listeners.insert(name, r).map(Decoded::Listener),
            Decoded::Cluster(r) => self.clusters.insert(name, r).map(Decoded::Cluster),
            Decoded::Endpoints(r) => self.endpoints.insert(name, r).map(Decoded::Endpoints),
            Decoded::Route(r) => self.routes.insert(name, r).map(Decoded::Route),
            Decoded::Secret(r) => self.secrets.insert(name, r).map(Decoded::Secret),
        }
    }

    /// Removes a resource, returning it.
    pub fn remove(&mut self, kind: Kind, name: &str) -> Option<Decoded<M>> {
        match kind {
            Kind::Listener => self.listeners.remove(name).map(Decoded::Listener),
            Kind::Cluster => self.clusters.remove(name).map(Decoded::Cluster),
            Kind::Endpoints => self.endpoints.remove(name).map(Decoded::Endpoints),
            Kind::Route => self.routes.remove(name).map(Decoded::Route),
            Kind::Secret => self.secrets.remove(name).map(Decoded::Secret),
        }
    }

    /// Whether exactly this resource is held under this name.
    pub fn holds(&self, name: &str, d: &Decoded<M>) -> bool {
        match d {
            Decoded::Listener(v) => self.listeners.get(name) == Some(v),
            Decoded::Cluster(v) => self.clusters.get(name) == Some(v),
            Decoded::Endpoints(v) => self.endpoints.get(name) == Some(v),
            Decoded::Route(v) => self.routes.get(name) == Some(v),
            Decoded::Secret(v) => self.secrets.get(name) == Some(v),
        }
    }

    /// Whether a resource of this kind and name is held.
    pub fn has(&self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Listener => self.listeners.contains_key(name),
            Kind::Cluster => self.clusters.contains_key(name),
            Kind::Endpoints => self.endpoints.contains_key(name),
            Kind::Route => self.routes.contains_key(name),
            Kind::Secret => self.secrets.contains_key(name),
        }
    }

    /// The names held of one kind.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        match kind {
            Kind::Listener => self.listeners.keys().cloned().collect(),
            Kind::Cluster => self.clusters.keys().cloned().collect(),
            Kind::Endpoints => self.endpoints.keys().cloned().collect(),
            Kind::Route => self.routes.keys().cloned().collect(),
            Kind::Secret => self.secrets.keys().cloned().collect(),
        }
    }

    /// The names held of one kind, borrowed.
    pub fn names_held(&self, kind: Kind) -> Vec<&str> {
        match kind {
            Kind::Listener => self.listeners.keys().map(String::as_str).collect(),
            Kind::Cluster => self.clusters.keys().map(String::as_str).collect(),
            Kind::Endpoints => self.endpoints.keys().map(String::as_str).collect(),
            Kind::Route => self.routes.keys().map(String::as_str).collect(),
            Kind::Secret => self.secrets.keys().map(String::as_str).collect(),
        }
    }
}
