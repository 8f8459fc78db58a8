//! The L7 parts of an agent-mode spec: an http-like upstream's
//! [`HttpRoutes`] (from its compiled discovery chain, or Consul's default
//! chain: one catch-all route to the upstream's own targets) and the
//! inbound switch ([`InboundHttp`]).
//!
//! # The inbound switch
//!
//! Consul's xDS server makes the public listener HTTP when the proxy's
//! *registration* says so (`Proxy.Config.protocol`, as
//! `/v1/agent/service/:id` serves it). The agent merges `service-defaults`
//! and `proxy-defaults` into the registration only with
//! `enable_central_service_config = true` (Consul 1.8's default is off;
//! on from 1.9), so veer follows the registration too: with central
//! config off and `service-defaults` saying `http`, the inbound side stays
//! L4 exactly as Consul's Envoy does, and the spec names why in
//! [`veer_core::snapshot::Spec::unapplied`]. `X-Forwarded-Client-Cert` is
//! sanitized (Envoy's default, what Consul 1.8 configures); no local
//! request timeout is set (Consul ≥ 1.14's `LocalRequestTimeoutMs` is
//! not a 1.8 setting).
use super::{target_spec, State};
use crate::api::Registration;
use crate::chain::{self, Compiled};
use std::time::Duration;
use veer_core::l7::{ClusterSpec, HttpRoutes, InboundHttp, RouteAction, RouteSpec, Xfcc};
use veer_core::route::Protocol;
use veer_core::snapshot::{Unapplied, UpstreamSpec};

/// Whether `p` is served at L7.
pub fn http_like(p: Protocol) -> bool {
    matches!(p, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
}

/// The routes of upstream `u`, whose protocol, primary target and
/// failover targets are set (after [`super::apply_chain`] when it has a
/// chain); `None` when its protocol is not http-like. With a compiled
/// http chain: its clusters (each target dialed as [`target_spec`] does)
/// and routes. Otherwise Consul's default: one cluster named by the
/// upstream's SNI with its targets, and the catch-all route.
pub fn upstream_routes(
    u: &UpstreamSpec,
    chain: Option<&Compiled>,
    state: &State,
    local: (&str, &str, &str),
    overrides: (Option<Duration>, Option<chain::GatewayMode>),
) -> Option<HttpRoutes> {
    if !http_like(u.protocol) {
        return None;
    }
    if let Some(h) = chain.and_then(|c| c.http.as_ref()) {
        let clusters = h
            .clusters
            .iter()
            .map(|c| ClusterSpec {
                name: c.name.clone(),
                targets: c
                    .targets
                    .iter()
                    .map(|t| target_spec(t, c.connect_timeout, state, local, overrides))
                    .collect(),
                protocol: u.protocol,
            })
            .collect();
        return Some(HttpRoutes {
            clusters,
            routes: h.routes.clone(),
        });
    }
    let primary = u.primary();
    let name = primary.sni.clone().unwrap_or_else(|| u.identity.sni());
    let targets = std::iter::once(primary)
        .chain(u.failover.iter().cloned())
        .collect();
    Some(HttpRoutes {
        clusters: vec![ClusterSpec {
            name,
            targets,
            protocol: u.protocol,
        }],
        routes: vec![RouteSpec {
            name: "default".into(),
            matches: Default::default(),
            action: RouteAction::to_cluster(0),
        }],
    })
}

/// The inbound listener's L7 settings: `Some` when the registration's
/// `Proxy.Config.protocol` is http-like (see the module docs). `central` =
/// the protocol service-defaults or proxy-defaults give the local service
/// and the setting it came from; when it is http-like but the registration
/// has none, that is named in `unapplied`.
pub fn inbound(
    reg: &Registration,
    central: (Protocol, &str),
    warnings: &mut Vec<String>,
    unapplied: &mut Vec<Unapplied>,
) -> Option<InboundHttp> {
    let own = reg
        .protocol
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty());
    let protocol = match own.map(|p| (p, Protocol::parse(&p.to_ascii_lowercase()))) {
        Some((_, Some(p))) => p,
        Some((p, None)) => {
            warnings.push(format!(
                "Proxy.Config.protocol {p:?} is not tcp, http, http2 or grpc; the inbound listener stays L4"
            ));
            Protocol::Tcp
        }
        None => {
            let (p, from) = central;
            if http_like(p) {
                unapplied.push(Unapplied::unsupported(
                    format!("{from} = {:?}", p.as_str()),
                    format!(
                        "inbound to {} stays L4 (no HTTP intentions or metrics), as Consul's Envoy does: \
                         the agent's registration has no Proxy.Config.protocol \
                         (enable_central_service_config is off)",
                        reg.destination_service
                    ),
                ));
            }
            Protocol::Tcp
        }
    };
    http_like(protocol).then_some(InboundHttp {
        protocol,
        rbac: None,
        xfcc: Xfcc::Sanitize,
        request_timeout: None,
    })
}

#[cfg(test)]
mod tests;
