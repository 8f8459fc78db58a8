//! veer's sans-IO core.
//!
//! Everything here is a pure function of its inputs: no sockets, no clocks
//! except where a caller passes the time in. The proxy runtime (`veer-proxy`)
//! reads one immutable [`snapshot::Snapshot`] per connection and asks
//! [`route::route`] and [`intentions::Intentions::evaluate`] what to do.
//!
//! - [`addr`]: typed addresses (client, original destination, endpoint, local app).
//! - [`spiffe`]: Consul's SPIFFE service identities and SNI names.
//! - [`intentions`]: Consul's L4 intention precedence and evaluation.
//! - [`authz`]: Envoy network RBAC and the one inbound authorization of a snapshot.
//! - [`route`]: the outbound routing decision.
//! - [`l7`]: the HTTP part of a spec (routes, inbound HTTP, permissions).
//! - [`l7route`]: outbound HTTP routes compiled, and the per-request decision.
//! - [`tls`]: rustls configurations and peer-identity extraction.
//! - [`config`]: the TOML file format and its validation.
//! - [`snapshot`]: the immutable configuration snapshot the listeners read.
//! - [`stats_tags`]: Envoy stat names and tag extraction (Consul's `stats_tags`).
#![deny(unsafe_code)]

pub mod addr;
pub mod authz;
pub mod config;
pub mod duration;
pub mod intentions;
pub mod l7;
pub mod l7authz;
pub mod l7route;
pub mod route;
pub mod snapshot;
pub mod spiffe;
pub mod stats_tags;
pub mod tls;
