//! veer's runtime: the listeners, the inbound and outbound pipelines, the
//! relay, and atomic snapshot swaps.
//!
//! Pipeline stages, one module each:
//! - [`accept`]: listeners and accept loops: a connection limit per
//!   listener, shedding (never spinning) when out of file descriptors.
//! - [`inbound`]: mTLS handshake → peer identity → intentions → dial the
//!   local app → relay.
//! - [`outbound`]: original destination → [`veer_core::route::route`] →
//!   connect (mTLS with SPIFFE check, or plain) → relay.
//! - [`mux`]: veer <-> veer multiplexing (HTTP/2 CONNECT streams over
//!   pooled mTLS), negotiated by ALPN.
//! - [`relay`]: splice or buffered copy, half-close, resets, timers.
//! - [`tls_stream`]: TLS on rustls's unbuffered API, with buffers held
//!   only while bytes are in flight.
//! - [`state`]: the current snapshot, the open-connection registry, metrics.
#![deny(unsafe_code)]

pub mod accept;
pub mod inbound;
pub mod inbound_http;
pub mod metrics;
pub mod mux;
pub mod net;
pub mod outbound;
pub mod relay;
pub mod state;
pub mod sys;
pub mod tls_stream;
