//! veer's L7 engine (hyper): what the proxy runs on a connection whose
//! upstream or local service is http-like. Named after the pipeline stages:
//!
//! - [`outbound`]: the app's requests to an http-like upstream, routed per
//!   request ([`veer_core::l7`] routes, splits, retries, timeouts) over
//!   pooled mTLS connections to the chosen cluster's endpoints.
//! - [`inbound`]: requests from peers after mTLS, authorized one by one
//!   (intentions with permissions, HTTP RBAC) and forwarded to the local app.
//!
//! The L4 path never enters this crate.
#![deny(unsafe_code)]

pub mod inbound;
pub mod outbound;
