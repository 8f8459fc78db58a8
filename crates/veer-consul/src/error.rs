//! The one error type of this crate.
use std::time::Duration;

/// Why talking to the Consul agent, or turning its answers into a spec,
/// failed. [`Error::classify`] gives a short, bounded label for metrics and
/// logs; [`Error::is_fatal_at_start`] says whether [`first`] gives up on it.
///
/// [`first`]: crate::ConsulSource::first
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The options are unusable (bad address, unreadable token file, both
    /// or neither of proxy ID and sidecar-for). Fix the flags/environment.
    #[error("Consul client configuration: {0}")]
    Config(String),
    /// TLS material for the agent connection could not be loaded.
    #[error("Consul agent TLS: {0}")]
    Tls(String),
    /// The agent could not be reached (refused, unreachable, TLS handshake).
    #[error("cannot reach the Consul agent at {addr}: {msg}")]
    Connect { addr: String, msg: String },
    /// The agent closed the connection before answering anything: it is
    /// refusing more connections from this address
    /// (`limits.http_max_conns_per_client`), or shutting down.
    #[error("{method} {path}: the Consul agent closed the connection before answering (too many connections from this address? see limits.http_max_conns_per_client): {msg}")]
    Closed {
        method: &'static str,
        path: String,
        msg: String,
    },
    /// The connection broke while the request was in flight.
    #[error("{method} {path}: connection to the Consul agent failed: {msg}")]
    Transport {
        method: &'static str,
        path: String,
        msg: String,
    },
    /// No answer within the request deadline (the blocking wait plus slack).
    #[error("{method} {path}: no answer from the Consul agent within {after:?}")]
    Timeout {
        method: &'static str,
        path: String,
        after: Duration,
    },
    /// HTTP 403: the token lacks a permission (or is unknown: "ACL not found").
    #[error(
        "{path}: permission denied by the Consul agent (HTTP 403: {body}); check the ACL token"
    )]
    PermissionDenied { path: String, body: String },
    /// HTTP 404 on an endpoint where that is an error.
    #[error("{path}: not found (HTTP 404: {body})")]
    NotFound { path: String, body: String },
    /// Any other non-2xx answer.
    #[error("{path}: HTTP {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    /// The answer is not the JSON we expect, or holds unusable values
    /// (bad PEM, bad address, a leaf for another service).
    #[error("{what}: {msg}")]
    Decode { what: String, msg: String },
    /// `--proxy-id`: the agent has no service with this ID.
    #[error("the local Consul agent has no service with ID {0:?}; register the sidecar proxy first (or check --proxy-id)")]
    ProxyNotFound(String),
    /// `--proxy-id` names a service that is not a `connect-proxy`.
    #[error("service {id:?} is not a Connect sidecar proxy (Kind {kind:?})")]
    NotAProxy { id: String, kind: String },
    /// `--sidecar-for`: no local proxy has `Proxy.DestinationServiceID` = this.
    #[error("no sidecar proxy for service ID {0:?} is registered with the local Consul agent")]
    NoSidecar(String),
    /// `--sidecar-for`: several local proxies serve this service ID.
    #[error("more than one sidecar proxy is registered for service ID {service:?} ({ids}); use --proxy-id with one of them")]
    AmbiguousSidecar { service: String, ids: String },
    /// [`assemble`](crate::assemble::assemble) was called before every part arrived.
    #[error("incomplete: still waiting for {0}")]
    Incomplete(String),
}

impl Error {
    /// A short label for metrics: `config`, `tls`, `connect`, `closed`, `transport`,
    /// `timeout`, `permission_denied`, `not_found`, `http_4xx`, `http_5xx`,
    /// `decode`, `proxy_not_found`, `not_a_proxy`, `no_sidecar`,
    /// `ambiguous_sidecar`, `incomplete`.
    pub fn classify(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Tls(_) => "tls",
            Error::Connect { .. } => "connect",
            Error::Transport { .. } => "transport",
            Error::Closed { .. } => "closed",
            Error::Timeout { .. } => "timeout",
            Error::PermissionDenied { .. } => "permission_denied",
            Error::NotFound { .. } => "not_found",
            Error::Status { status, .. } if *status < 500 => "http_4xx",
            Error::Status { .. } => "http_5xx",
            Error::Decode { .. } => "decode",
            Error::ProxyNotFound(_) => "proxy_not_found",
            Error::NotAProxy { .. } => "not_a_proxy",
            Error::NoSidecar(_) => "no_sidecar",
            Error::AmbiguousSidecar { .. } => "ambiguous_sidecar",
            Error::Incomplete(_) => "incomplete",
        }
    }

    /// Errors that waiting will not fix, so that [`first`] returns them at
    /// once instead of retrying: configuration and TLS mistakes, an unknown
    /// or non-proxy service, ambiguous or missing sidecars, and permission
    /// denials. Network trouble and 5xx answers are retried.
    ///
    /// [`first`]: crate::ConsulSource::first
    pub fn is_fatal_at_start(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Tls(_)
                | Error::PermissionDenied { .. }
                | Error::ProxyNotFound(_)
                | Error::NotAProxy { .. }
                | Error::NoSidecar(_)
                | Error::AmbiguousSidecar { .. }
        )
    }

    /// The agent could not be reached or did not answer (connect,
    /// transport, timeout).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. } | Error::Transport { .. } | Error::Timeout { .. }
        )
    }

    /// The agent closed the connection before answering (see [`Error::Closed`]).
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed { .. })
    }

    pub(crate) fn decode(what: impl Into<String>, msg: impl std::fmt::Display) -> Error {
        Error::Decode {
            what: what.into(),
            msg: msg.to_string(),
        }
    }
}
