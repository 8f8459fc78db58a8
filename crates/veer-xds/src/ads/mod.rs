//! The Delta ADS client: a sans-IO state machine ([`state`]) and its gRPC
//! transport ([`client`]).
//!
//! Consul (≥ 1.10) serves Delta ADS v3 only. LDS and CDS are wildcard
//! subscriptions (an empty first subscribe list, never `"*"`); EDS, RDS and
//! SDS are asked for by name, as the accepted clusters and listeners call
//! for them. Every response gets exactly one ACK or NACK; a rejected
//! resource keeps its previous version serving.
pub mod client;
pub mod dns;
pub mod grpc;
pub mod state;
#[cfg(test)]
mod tests;

pub use client::{
    run, AdsConfig, AdsError, AdsMetrics, AdsStatus, LastReply, NodeInfo, PerKind, Server, Tls,
    RECONNECT_REASONS,
};
pub use state::{
    decode, AdsState, Changed, Check, Compiled, Decoded, DnsOutcome, Outcome, Reply, Wanted,
};
