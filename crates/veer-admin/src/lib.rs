//! veer's operational surface, kept off the data plane.
//!
//! - [`lifecycle`]: the one controller that owns readiness, drain and exit.
//!   Signals, `POST /drain` and `POST /quitquitquit` are all requests to it.
//! - [`server`]: the admin endpoint (`/ready`, `/stats/prometheus`,
//!   `/config_dump`, `/drain`, `/quitquitquit`) and the separate Prometheus
//!   listener, served with hyper on their own thread and current-thread
//!   runtime, so data-plane load cannot starve probes or scrapes.
//! - [`expose`]: plain-HTTP expose-path listeners (Consul's probe
//!   overwrite), on that same admin thread.
//! - [`static_http`]: the static HTTP listeners of an Envoy bootstrap
//!   (Prometheus, ready) with ordered routes; expose paths use its routing.
//! - [`client`]: a minimal HTTP/1 GET, for `veer await-ready`.
//! - [`sdnotify`]: systemd readiness notification.
#![deny(unsafe_code)]

pub mod client;
pub mod expose;
mod http;
pub mod lifecycle;
pub mod sdnotify;
pub mod server;
pub mod static_http;

pub use lifecycle::{ControlPlane, ControlPlaneStatus, Lifecycle, Request, ShutdownOpts, Signals};
pub use server::{AdminAddrs, AdminServer, PreInitAdmin};
