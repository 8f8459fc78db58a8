//! The xDS resources veer subscribes to, by kind, decoded.
//!
//! Shared vocabulary of the ADS client (which keeps one [`Resources`] per
//! stream and applies responses to it resource by resource) and the
//! translation (which reads a [`Resources`] and compiles a `Spec`).
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

/// The accepted resources of one ADS stream, by kind and name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub listeners: BTreeMap<String, Listener>,
    pub clusters: BTreeMap<String, Cluster>,
    pub endpoints: BTreeMap<String, ClusterLoadAssignment>,
    pub routes: BTreeMap<String, RouteConfiguration>,
    pub secrets: BTreeMap<String, Secret>,
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

/// One resource, decoded and checked on its own by
/// [`crate::translate::decode`]: what the ADS client stores in
/// [`Resources`] once it has accepted it.
// Short-lived (one per received resource, moved into `Resources`): boxing
// would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    Listener(Listener),
    Cluster(Cluster),
    Endpoints(ClusterLoadAssignment),
    Route(RouteConfiguration),
    Secret(Secret),
}

impl Decoded {
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
}

impl Resources {
    /// Stores an accepted resource under `name`, replacing any of that kind
    /// and name.
    pub fn insert(&mut self, name: String, d: Decoded) {
        match d {
            Decoded::Listener(r) => {
                self.listeners.insert(name, r);
            }
            Decoded::Cluster(r) => {
                self.clusters.insert(name, r);
            }
            Decoded::Endpoints(r) => {
                self.endpoints.insert(name, r);
            }
            Decoded::Route(r) => {
                self.routes.insert(name, r);
            }
            Decoded::Secret(r) => {
                self.secrets.insert(name, r);
            }
        }
    }

    /// Removes a resource; true if it was there.
    pub fn remove(&mut self, kind: Kind, name: &str) -> bool {
        match kind {
            Kind::Listener => self.listeners.remove(name).is_some(),
            Kind::Cluster => self.clusters.remove(name).is_some(),
            Kind::Endpoints => self.endpoints.remove(name).is_some(),
            Kind::Route => self.routes.remove(name).is_some(),
            Kind::Secret => self.secrets.remove(name).is_some(),
        }
    }
}
