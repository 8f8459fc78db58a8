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
use std::collections::BTreeMap;

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
}
