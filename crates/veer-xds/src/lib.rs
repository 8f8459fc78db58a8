//! veer in Envoy's place.
//!
//! consul-dataplane (Kubernetes) and `consul connect envoy` (VMs) start the
//! `envoy` binary with a bootstrap and serve it Delta xDS. This crate lets
//! veer take that place for a transparent-proxy sidecar:
//!
//! - Envoy's command line and bootstrap (what consul-dataplane and
//!   `consul connect envoy` pass);
//! - a Delta ADS client over gRPC (wildcard LDS and CDS; EDS, RDS and SDS by
//!   name), which ACKs or NACKs every response;
//! - the sans-IO translation of the resources Consul emits into veer's one
//!   plain-data [`veer_core::snapshot::Spec`].
#![deny(unsafe_code)]

pub mod ads;
pub mod bootstrap;
pub mod envoy_cli;
pub mod resources;
pub mod translate;
