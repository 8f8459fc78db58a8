//! The L7 part of one resource on its own: an HTTP connection manager
//! (`envoy.filters.network.http_connection_manager`), its HTTP filters and
//! route configuration (inline or RDS), and the HTTP RBAC filter, into
//! small models of what veer uses, or a [`Fault`] naming the field.
//!
//! What changes where a request goes or who may send it and that veer
//! cannot do is refused; what only changes a detail veer does not
//! implement (idle timeouts, header additions, gRPC retry conditions,
//! hash policies) is accepted and named as unapplied in the spec.
use super::parse::{matcher, unpack, At, Fault};
use envoy_types::pb::envoy::config::core::v3::config_source;
use envoy_types::pb::envoy::config::rbac::v3::{permission, Permission as PbPermission};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher, query_parameter_matcher, route, route_action, route_match, HeaderMatcher,
    QueryParameterMatcher, Route, RouteAction as PbRouteAction, RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::filters::http::grpc_http1_bridge::v3::Config as GrpcHttp1Bridge;
use envoy_types::pb::envoy::extensions::filters::http::grpc_stats::v3::FilterConfig as GrpcStats;
use envoy_types::pb::envoy::extensions::filters::http::header_to_metadata::v3::Config as HeaderToMetadata;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options, HttpProtocolOptions,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{path_matcher, string_matcher, StringMatcher};
use envoy_types::pb::google::protobuf::Any;
use prost::Name;
use std::collections::HashMap;
use std::time::Duration;
use veer_core::authz::{MatchPattern, RbacRules, StringMatch};
use veer_core::l7::{
    HeaderMatch, HeaderMatchKind, PathMatch, QueryMatch, QueryMatchKind, RbacPermission,
    RequestMatch, RetryPolicy, Xfcc,
};
use veer_core::route::Protocol;

type R<T> = Result<T, Fault>;

/// A setting accepted but not applied: (field path, what veer does instead).
pub type Note = (String, String);

/// Where an HCM's routes come from.
#[derive(Clone, Debug, PartialEq)]
pub enum RouteSource {
    Inline(RoutesModel),
    /// RDS by this name (over ADS).
    Rds(String),
}

/// One HTTP connection manager.
#[derive(Clone, Debug, PartialEq)]
pub struct Hcm {
    pub routes: RouteSource,
    /// `Grpc` when gRPC filters are present, `Http2` when the codec is
    /// HTTP/2 (`http2_protocol_options` or `codec_type: HTTP2`), else `Http`.
    pub protocol: Protocol,
    /// HTTP RBAC filters with rules, in order (each must allow).
    pub rbac: Vec<RbacRules>,
    pub xfcc: Xfcc,
    pub notes: Vec<Note>,
}

/// One route of a route configuration, with clusters by name (the
/// translation resolves them against CDS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteModel {
    pub name: String,
    pub matches: RequestMatch,
    /// (cluster name, weight).
    pub clusters: Vec<(String, u32)>,
    pub prefix_rewrite: Option<String>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

/// A route configuration: one virtual host's routes, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutesModel {
    pub name: String,
    pub routes: Vec<RouteModel>,
    pub notes: Vec<Note>,
}

impl RoutesModel {
    /// Every cluster named, in first-use order, once.
    pub fn clusters(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.routes {
            for (c, _) in &r.clusters {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
        out
    }
}

/// Which side an HCM serves: rules differ (HTTP RBAC only inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The public listener: requests from peers to the local app.
    Inbound,
    /// An outbound chain or explicit upstream listener.
    Outbound,
}

fn duration(d: &envoy_types::pb::google::protobuf::Duration, field: &str) -> R<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Fault::invalid(field, "negative or malformed duration"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

fn refuse_filter(name: &str, url: &str) -> String {
    let t = url.rsplit('/').next().unwrap_or(url);
    let what = if name.is_empty() { t } else { name };
    if t.contains("ext_authz")
        || t.contains("jwt_authn")
        || t.contains(".lua.")
        || t.contains("wasm")
    {
        format!("{what} is not enforced by veer")
    } else {
        format!("HTTP filter {what} ({t}) is not supported by veer; only rbac, header_to_metadata, grpc_stats, grpc_http1_bridge and router")
    }
}

/// Checks an HCM's `typed_config` on its own.
pub(crate) fn hcm(any: &Any, side: Side) -> R<Hcm> {
    let h: HttpConnectionManager = unpack(any, "typed_config")?;
    let at = "typed_config";
    let mut notes = Vec::new();
    use http_connection_manager::{CodecType, ForwardClientCertDetails as F};
    let mut protocol = match CodecType::try_from(h.codec_type) {
        Ok(CodecType::Auto) if h.http2_protocol_options.is_some() => Protocol::Http2,
        Ok(CodecType::Auto) | Ok(CodecType::Http1) => Protocol::Http,
        Ok(CodecType::Http2) => Protocol::Http2,
        _ => {
            return Err(Fault::refused(
                &format!("{at}.codec_type"),
                "only HTTP/1.1 and HTTP/2 are supported",
            ))
        }
    };
    if h.http3_protocol_options.is_some() {
        return Err(Fault::refused(
            &format!("{at}.http3_protocol_options"),
            "HTTP/3 is not supported",
        ));
    }
    let mut rbac = Vec::new();
    let mut router = false;
    for (i, f) in h.http_filters.iter().enumerate() {
        let fat = format!("{at}.http_filters[{i}]");
        if router {
            return Err(Fault::refused(
                &fat,
                "an HTTP filter after the router is not supported",
            ));
        }
        if f.disabled {
            return Err(Fault::refused(
                &format!("{fat}.disabled"),
                format!(
                    "{}: filters disabled by default (enabled per route) are not supported",
                    f.name
                ),
            ));
        }
        let a = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => a,
            _ => {
                return Err(Fault::refused(
                    &fat,
                    format!(
                        "{}: an HTTP filter without typed_config is not supported",
                        f.name
                    ),
                ))
            }
        };
        let url = a.type_url.as_str();
        if url == HttpRbac::type_url() {
            if side == Side::Outbound {
                return Err(Fault::refused(
                    &fat,
                    "an HTTP RBAC filter on an outbound HTTP connection manager is not enforced by veer",
                ));
            }
            rbac.extend(http_rbac(a).at(&fat)?);
        } else if url == HeaderToMetadata::type_url() {
            let _: HeaderToMetadata = unpack(a, "typed_config").at(&fat)?;
            notes.push((
                fat,
                "envoy.filters.http.header_to_metadata: accepted; the dynamic metadata it writes (the XFCC SPIFFE parts) is read by no veer filter, so it changes nothing".into(),
            ));
        } else if url == GrpcStats::type_url() {
            let _: GrpcStats = unpack(a, "typed_config").at(&fat)?;
            protocol = Protocol::Grpc;
            notes.push((
                fat,
                "envoy.filters.http.grpc_stats: accepted; veer does not emit per-method gRPC statistics".into(),
            ));
        } else if url == GrpcHttp1Bridge::type_url() {
            let _: GrpcHttp1Bridge = unpack(a, "typed_config").at(&fat)?;
            protocol = Protocol::Grpc;
            notes.push((
                fat,
                "envoy.filters.http.grpc_http1_bridge: accepted; gRPC over HTTP/1.1 requests are forwarded as they are, not bridged to HTTP/2".into(),
            ));
        } else if url == Router::type_url() {
            let r: Router = unpack(a, "typed_config").at(&fat)?;
            if !r.upstream_http_filters.is_empty() {
                return Err(Fault::refused(
                    &format!("{fat}.typed_config.upstream_http_filters"),
                    "upstream HTTP filters are not supported",
                ));
            }
            router = true;
        } else {
            return Err(Fault::refused(&fat, refuse_filter(&f.name, url)));
        }
    }
    if !router {
        return Err(Fault::invalid(
            &format!("{at}.http_filters"),
            "no envoy.filters.http.router (the last HTTP filter must be the router)",
        ));
    }
    let xfcc = match F::try_from(h.forward_client_cert_details) {
        Ok(F::Sanitize) => Xfcc::Sanitize,
        Ok(F::AppendForward) => Xfcc::AppendForward,
        Ok(F::SanitizeSet) => Xfcc::SanitizeSet,
        _ => {
            return Err(Fault::refused(
                &format!("{at}.forward_client_cert_details"),
                "forwarding a client's X-Forwarded-Client-Cert unsanitized lets peers forge identities; only SANITIZE, APPEND_FORWARD and SANITIZE_SET",
            ))
        }
    };
    if let Some(d) = &h.set_current_client_cert_details {
        if d.cert || d.chain || d.dns {
            notes.push((
                format!("{at}.set_current_client_cert_details"),
                "X-Forwarded-Client-Cert carries By, Hash, Subject and URI; Cert, Chain and DNS are not added".into(),
            ));
        }
    }
    if h.forward_client_cert_matcher.is_some() {
        return Err(Fault::refused(
            &format!("{at}.forward_client_cert_matcher"),
            "per-request XFCC configuration is not supported",
        ));
    }
    if !h.upgrade_configs.is_empty() {
        notes.push((
            format!("{at}.upgrade_configs"),
            "protocol upgrades (WebSocket) are not enabled".into(),
        ));
    }
    if !h.access_log.is_empty() {
        notes.push((
            format!("{at}.access_log"),
            "HCM access loggers are not used; veer writes its own access log".into(),
        ));
    }
    let routes = match &h.route_specifier {
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            RouteSource::Inline(route_config(rc).at(format!("{at}.route_config"))?)
        }
        Some(http_connection_manager::RouteSpecifier::Rds(r)) => {
            let ads = r.config_source.as_ref().is_some_and(|c| {
                matches!(
                    c.config_source_specifier,
                    Some(config_source::ConfigSourceSpecifier::Ads(_))
                )
            });
            if !ads {
                return Err(Fault::refused(
                    &format!("{at}.rds.config_source"),
                    "RDS is supported over ADS only",
                ));
            }
            if r.route_config_name.is_empty() {
                return Err(Fault::invalid(
                    &format!("{at}.rds.route_config_name"),
                    "empty",
                ));
            }
            RouteSource::Rds(r.route_config_name.clone())
        }
        Some(_) => {
            return Err(Fault::refused(
                &format!("{at}.scoped_routes"),
                "scoped routes are not supported",
            ))
        }
        None => return Err(Fault::invalid(&format!("{at}.route_config"), "no routes")),
    };
    Ok(Hcm {
        routes,
        protocol,
        rbac,
        xfcc,
        notes,
    })
}

// ---------------------------------------------------------------- routes

/// Checks a route configuration on its own (RDS or inline).
pub(crate) fn route_config(rc: &RouteConfiguration) -> R<RoutesModel> {
    let mut notes = Vec::new();
    if rc.vhds.is_some() {
        return Err(Fault::refused("vhds", "VHDS is not supported"));
    }
    if !rc.typed_per_filter_config.is_empty() {
        return Err(Fault::refused(
            "typed_per_filter_config",
            "per-filter route configuration is not supported",
        ));
    }
    if !rc.cluster_specifier_plugins.is_empty() {
        return Err(Fault::refused(
            "cluster_specifier_plugins",
            "cluster specifier plugins are not supported",
        ));
    }
    if !rc.request_headers_to_add.is_empty()
        || !rc.request_headers_to_remove.is_empty()
        || !rc.response_headers_to_add.is_empty()
        || !rc.response_headers_to_remove.is_empty()
    {
        notes.push((
            "request_headers_to_add".to_string(),
            "header additions and removals are not applied".to_string(),
        ));
    }
    let [vh] = rc.virtual_hosts.as_slice() else {
        return Err(Fault::refused(
            "virtual_hosts",
            format!(
                "exactly one virtual host (domains [\"*\"]) is supported, as Consul sends; got {}",
                rc.virtual_hosts.len()
            ),
        ));
    };
    let vat = "virtual_hosts[0]";
    if vh.domains.as_slice() != ["*"] {
        return Err(Fault::refused(
            &format!("{vat}.domains"),
            format!(
                "only domains [\"*\"] is supported (veer routes by destination address, not Host), not {:?}",
                vh.domains
            ),
        ));
    }
    if !vh.typed_per_filter_config.is_empty() {
        return Err(Fault::refused(
            &format!("{vat}.typed_per_filter_config"),
            "per-filter route configuration is not supported",
        ));
    }
    if vh.require_tls != 0 {
        return Err(Fault::refused(
            &format!("{vat}.require_tls"),
            "require_tls is not supported",
        ));
    }
    if vh.matcher.is_some() {
        return Err(Fault::refused(
            &format!("{vat}.matcher"),
            "the matcher API is not supported; only routes",
        ));
    }
    if vh.retry_policy.is_some() || vh.retry_policy_typed_config.is_some() {
        notes.push((
            format!("{vat}.retry_policy"),
            "a virtual host's retry policy is not applied; routes' are".into(),
        ));
    }
    if !vh.request_headers_to_add.is_empty()
        || !vh.request_headers_to_remove.is_empty()
        || !vh.response_headers_to_add.is_empty()
        || !vh.response_headers_to_remove.is_empty()
    {
        notes.push((
            format!("{vat}.request_headers_to_add"),
            "header additions and removals are not applied".into(),
        ));
    }
    let mut routes = Vec::new();
    for (i, r) in vh.routes.iter().enumerate() {
        let rat = format!("{vat}.routes[{i}]");
        routes.push(one_route(r, i, &mut notes).at(&rat)?);
    }
    Ok(RoutesModel {
        name: rc.name.clone(),
        routes,
        notes,
    })
}

fn one_route(r: &Route, index: usize, notes: &mut Vec<Note>) -> R<RouteModel> {
    let name = if r.name.is_empty() {
        format!("{index}")
    } else {
        r.name.clone()
    };
    let rat = |f: &str| format!("virtual_hosts[0].routes[{index}].{f}");
    if !r.typed_per_filter_config.is_empty() {
        return Err(Fault::refused(
            "typed_per_filter_config",
            "per-route filter configuration (which may disable RBAC) is not supported",
        ));
    }
    if !r.request_headers_to_add.is_empty()
        || !r.request_headers_to_remove.is_empty()
        || !r.response_headers_to_add.is_empty()
        || !r.response_headers_to_remove.is_empty()
    {
        notes.push((
            rat("request_headers_to_add"),
            "header additions and removals are not applied".into(),
        ));
    }
    let Some(m) = &r.r#match else {
        return Err(Fault::invalid("match", "missing"));
    };
    let matches = request_match(m).at("match")?;
    let action = match &r.action {
        Some(route::Action::Route(ra)) => ra,
        Some(route::Action::Redirect(_)) => {
            return Err(Fault::refused(
                "redirect",
                "redirect routes are not supported",
            ))
        }
        Some(route::Action::DirectResponse(_)) => {
            return Err(Fault::refused(
                "direct_response",
                "direct-response routes are not supported",
            ))
        }
        _ => {
            return Err(Fault::refused(
                "action",
                "only route actions (to clusters) are supported",
            ))
        }
    };
    let (clusters, prefix_rewrite, timeout, retry) =
        route_action(action, &|f| rat(&format!("route.{f}")), notes).at("route")?;
    Ok(RouteModel {
        name,
        matches,
        clusters,
        prefix_rewrite,
        timeout,
        retry,
    })
}

fn request_match(m: &envoy_types::pb::envoy::config::route::v3::RouteMatch) -> R<RequestMatch> {
    use route_match::PathSpecifier as P;
    if m.case_sensitive.as_ref().is_some_and(|b| !b.value) {
        return Err(Fault::refused(
            "case_sensitive",
            "case-insensitive path matching is not supported",
        ));
    }
    if m.runtime_fraction.is_some() {
        return Err(Fault::refused(
            "runtime_fraction",
            "runtime fractions are not supported",
        ));
    }
    if m.grpc.is_some() || m.tls_context.is_some() {
        return Err(Fault::refused(
            "grpc",
            "gRPC-only and TLS-context route matches are not supported",
        ));
    }
    if !m.cookies.is_empty() || !m.dynamic_metadata.is_empty() || !m.filter_state.is_empty() {
        return Err(Fault::refused(
            "cookies",
            "cookie, metadata and filter-state matches are not supported",
        ));
    }
    let path = match &m.path_specifier {
        Some(P::Prefix(p)) if p.is_empty() || p == "/" => PathMatch::Any,
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex, "safe_regex.regex")?),
        Some(_) => {
            return Err(Fault::refused(
                "path_specifier",
                "only prefix, path and safe_regex path matches are supported",
            ))
        }
        None => return Err(Fault::invalid("path_specifier", "missing")),
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        headers.push(header_match(h).at(format!("headers[{i}]"))?);
    }
    let mut query = Vec::new();
    for (i, q) in m.query_parameters.iter().enumerate() {
        query.push(query_match(q).at(format!("query_parameters[{i}]"))?);
    }
    Ok(RequestMatch {
        path,
        headers,
        query,
        methods: Vec::new(),
    })
}

/// Checks that `re` compiles as veer compiles regexes (whole value).
fn regex(re: &str, field: &str) -> R<String> {
    if re.is_empty() {
        return Err(Fault::invalid(field, "empty regex"));
    }
    StringMatch {
        pattern: MatchPattern::SafeRegex(re.to_string()),
        ignore_case: false,
    }
    .compile()
    .map_err(|e| Fault::invalid(field, e.to_string()))?;
    Ok(re.to_string())
}

fn plain_matcher(s: &StringMatcher) -> R<HeaderMatchKind> {
    use string_matcher::MatchPattern as P;
    if s.ignore_case {
        return Err(Fault::refused(
            "ignore_case",
            "case-insensitive header matching is not supported in routes",
        ));
    }
    Ok(match &s.match_pattern {
        Some(P::Exact(v)) => HeaderMatchKind::Exact(v.clone()),
        Some(P::Prefix(v)) => HeaderMatchKind::Prefix(v.clone()),
        Some(P::Suffix(v)) => HeaderMatchKind::Suffix(v.clone()),
        Some(P::SafeRegex(r)) => HeaderMatchKind::Regex(regex(&r.regex, "safe_regex.regex")?),
        Some(P::Contains(_)) | Some(P::Custom(_)) => {
            return Err(Fault::refused(
                "contains",
                "contains and custom matches are not supported in routes",
            ))
        }
        None => return Err(Fault::invalid("", "string matcher has no pattern")),
    })
}

// Consul v1.16 sends the deprecated `exact_match` etc.
#[allow(deprecated)]
fn header_match(h: &HeaderMatcher) -> R<HeaderMatch> {
    use header_matcher::HeaderMatchSpecifier as S;
    if h.name.is_empty() {
        return Err(Fault::invalid("name", "empty header name"));
    }
    if h.treat_missing_header_as_empty {
        return Err(Fault::refused(
            "treat_missing_header_as_empty",
            "not supported",
        ));
    }
    let mut invert = h.invert_match;
    let kind = match &h.header_match_specifier {
        Some(S::ExactMatch(v)) => HeaderMatchKind::Exact(v.clone()),
        Some(S::PrefixMatch(v)) => HeaderMatchKind::Prefix(v.clone()),
        Some(S::SuffixMatch(v)) => HeaderMatchKind::Suffix(v.clone()),
        Some(S::SafeRegexMatch(r)) => {
            HeaderMatchKind::Regex(regex(&r.regex, "safe_regex_match.regex")?)
        }
        Some(S::PresentMatch(true)) => HeaderMatchKind::Present,
        // `present_match: false` matches when the header is absent.
        Some(S::PresentMatch(false)) => {
            invert = !invert;
            HeaderMatchKind::Present
        }
        Some(S::StringMatch(s)) => plain_matcher(s).at("string_match")?,
        Some(S::RangeMatch(_)) | Some(S::ContainsMatch(_)) => {
            return Err(Fault::refused(
                "range_match",
                "range and contains header matches are not supported in routes",
            ))
        }
        // No specifier: Envoy matches on presence.
        None => HeaderMatchKind::Present,
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        kind,
        invert,
    })
}

fn query_match(q: &QueryParameterMatcher) -> R<QueryMatch> {
    use query_parameter_matcher::QueryParameterMatchSpecifier as S;
    use string_matcher::MatchPattern as P;
    if q.name.is_empty() {
        return Err(Fault::invalid("name", "empty parameter name"));
    }
    let kind = match &q.query_parameter_match_specifier {
        Some(S::PresentMatch(true)) | None => QueryMatchKind::Present,
        Some(S::PresentMatch(false)) => {
            return Err(Fault::refused(
                "present_match",
                "matching an absent query parameter is not supported",
            ))
        }
        Some(S::StringMatch(s)) => {
            if s.ignore_case {
                return Err(Fault::refused(
                    "string_match.ignore_case",
                    "case-insensitive query matching is not supported",
                ));
            }
            match &s.match_pattern {
                Some(P::Exact(v)) => QueryMatchKind::Exact(v.clone()),
                Some(P::SafeRegex(r)) => {
                    QueryMatchKind::Regex(regex(&r.regex, "string_match.safe_regex.regex")?)
                }
                _ => {
                    return Err(Fault::refused(
                        "string_match",
                        "only exact and safe_regex query parameter matches are supported",
                    ))
                }
            }
        }
    };
    Ok(QueryMatch {
        name: q.name.clone(),
        kind,
    })
}

type ActionParts = (
    Vec<(String, u32)>,
    Option<String>,
    Option<Duration>,
    Option<RetryPolicy>,
);

fn route_action(
    a: &PbRouteAction,
    field: &dyn Fn(&str) -> String,
    notes: &mut Vec<Note>,
) -> R<ActionParts> {
    use route_action::ClusterSpecifier as C;
    let clusters = match &a.cluster_specifier {
        Some(C::Cluster(c)) if !c.is_empty() => vec![(c.clone(), 1)],
        Some(C::WeightedClusters(w)) => {
            let mut v = Vec::new();
            for (i, cw) in w.clusters.iter().enumerate() {
                let cat = format!("weighted_clusters.clusters[{i}]");
                if cw.name.is_empty() {
                    return Err(Fault::invalid(&format!("{cat}.name"), "empty cluster name"));
                }
                if cw.metadata_match.is_some() {
                    return Err(Fault::refused(
                        &format!("{cat}.metadata_match"),
                        "subset load balancing is not supported",
                    ));
                }
                if !cw.request_headers_to_add.is_empty()
                    || !cw.request_headers_to_remove.is_empty()
                    || !cw.response_headers_to_add.is_empty()
                    || !cw.response_headers_to_remove.is_empty()
                {
                    notes.push((
                        field(&format!("{cat}.request_headers_to_add")),
                        "header additions and removals are not applied".into(),
                    ));
                }
                v.push((cw.name.clone(), cw.weight.as_ref().map_or(0, |w| w.value)));
            }
            if v.iter().all(|(_, w)| *w == 0) {
                return Err(Fault::invalid(
                    "weighted_clusters.clusters",
                    "no cluster with a weight above 0",
                ));
            }
            v
        }
        Some(C::Cluster(_)) | None => return Err(Fault::invalid("cluster", "no cluster")),
        Some(_) => {
            return Err(Fault::refused(
                "cluster_header",
                "only cluster and weighted_clusters are supported",
            ))
        }
    };
    if a.metadata_match.is_some() {
        return Err(Fault::refused(
            "metadata_match",
            "subset load balancing is not supported",
        ));
    }
    if a.regex_rewrite.is_some() || a.path_rewrite_policy.is_some() || !a.path_rewrite.is_empty() {
        return Err(Fault::refused(
            "regex_rewrite",
            "only prefix_rewrite is supported",
        ));
    }
    if a.host_rewrite_specifier.is_some() {
        return Err(Fault::refused(
            "host_rewrite_literal",
            "host rewriting is not supported",
        ));
    }
    if !a.request_mirror_policies.is_empty() {
        return Err(Fault::refused(
            "request_mirror_policies",
            "request mirroring is not supported",
        ));
    }
    if a.idle_timeout.is_some() {
        notes.push((
            field("idle_timeout"),
            "a route's stream idle timeout is not applied; its timeout is".into(),
        ));
    }
    if !a.hash_policy.is_empty() {
        notes.push((
            field("hash_policy"),
            "hash-based load balancing is approximated by (weighted) round robin, without session affinity".into(),
        ));
    }
    let prefix_rewrite = (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone());
    let timeout = match &a.timeout {
        Some(d) => Some(duration(d, "timeout")?),
        None => None,
    };
    let retry = match &a.retry_policy {
        Some(p) => Some(retry_policy(
            p,
            &|f| field(&format!("retry_policy.{f}")),
            notes,
        )?),
        None => None,
    };
    Ok((clusters, prefix_rewrite, timeout, retry))
}

fn retry_policy(
    p: &envoy_types::pb::envoy::config::route::v3::RetryPolicy,
    field: &dyn Fn(&str) -> String,
    notes: &mut Vec<Note>,
) -> R<RetryPolicy> {
    let mut out = RetryPolicy {
        // Envoy's default when a policy sets no count.
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        on_connect_failure: false,
        on_reset: false,
        on_status_codes: Vec::new(),
    };
    let mut codes = std::collections::BTreeSet::new();
    let mut unapplied = Vec::new();
    for cond in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match cond {
            "connect-failure" => out.on_connect_failure = true,
            "reset" | "refused-stream" | "reset-before-request" => out.on_reset = true,
            "retriable-status-codes" => {
                for (i, c) in p.retriable_status_codes.iter().enumerate() {
                    let c = u16::try_from(*c)
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .ok_or_else(|| {
                            Fault::invalid(
                                &format!("retriable_status_codes[{i}]"),
                                format!("{c} is not an HTTP status code"),
                            )
                        })?;
                    codes.insert(c);
                }
            }
            // Envoy: any 5xx, a reset or a connect failure.
            "5xx" => {
                codes.extend(500..=599);
                out.on_connect_failure = true;
                out.on_reset = true;
            }
            // Envoy: 502, 503, 504 (a connect failure ends as a 503).
            "gateway-error" => {
                codes.extend([502, 503, 504]);
                out.on_connect_failure = true;
            }
            "retriable-4xx" => {
                codes.insert(409);
            }
            // Only Envoy's own rate limiter sets x-envoy-ratelimited.
            "envoy-ratelimited" => {}
            other => unapplied.push(other.to_string()),
        }
    }
    out.on_status_codes = codes.into_iter().collect();
    if !unapplied.is_empty() {
        notes.push((
            field("retry_on"),
            format!(
                "retry conditions {} (gRPC status and header based) are not applied",
                unapplied.join(",")
            ),
        ));
    }
    if p.per_try_timeout.is_some()
        || p.per_try_idle_timeout.is_some()
        || p.retry_back_off.is_some()
        || !p.retry_host_predicate.is_empty()
        || p.retry_priority.is_some()
        || !p.retriable_headers.is_empty()
        || !p.retriable_request_headers.is_empty()
    {
        notes.push((
            field("per_try_timeout"),
            "per-try timeouts, back-off, host predicates and header conditions of retries are not applied".into(),
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------- HTTP RBAC

/// An HTTP `rbac` filter: `None` when it has no `rules` (enforces nothing).
pub(crate) fn http_rbac(any: &Any) -> R<Option<RbacRules>> {
    let r: HttpRbac = unpack(any, "typed_config")?;
    if r.matcher.is_some() {
        return Err(Fault::refused(
            "typed_config.matcher",
            "the RBAC matcher API is not supported; only rules",
        ));
    }
    // shadow_rules / shadow_matcher only record what would happen: ignored.
    let Some(rules) = r.rules else {
        return Ok(None);
    };
    super::parse::rbac_rules(&rules, |perm| rbac_permission(perm, 0)).map(Some)
}

fn rbac_permission(p: &PbPermission, depth: usize) -> R<RbacPermission> {
    use permission::Rule;
    if depth > 32 {
        return Err(Fault::invalid("", "permissions nested too deeply"));
    }
    let set = |rules: &[PbPermission], name: &str| -> R<Vec<RbacPermission>> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| rbac_permission(r, depth + 1).at(format!("{name}.rules[{i}]")))
            .collect()
    };
    Ok(match &p.rule {
        Some(Rule::Any(true)) => RbacPermission::Any,
        Some(Rule::Any(false)) => return Err(Fault::invalid("any", "must be true")),
        Some(Rule::AndRules(s)) => RbacPermission::And(set(&s.rules, "and_rules")?),
        Some(Rule::OrRules(s)) => RbacPermission::Or(set(&s.rules, "or_rules")?),
        Some(Rule::NotRule(n)) => {
            RbacPermission::Not(Box::new(rbac_permission(n, depth + 1).at("not_rule")?))
        }
        Some(Rule::UrlPath(pm)) => match &pm.rule {
            Some(path_matcher::Rule::Path(sm)) => {
                RbacPermission::UrlPath(matcher(sm).at("url_path.path")?)
            }
            None => return Err(Fault::invalid("url_path", "no path matcher")),
        },
        Some(Rule::Header(h)) => rbac_header(h).at("header")?,
        Some(_) => {
            return Err(Fault::refused(
                "",
                "only any, url_path, header, and_rules, or_rules and not_rule permissions are enforced by veer",
            ))
        }
        None => return Err(Fault::invalid("", "permission has no rule")),
    })
}

#[allow(deprecated)]
fn rbac_header(h: &HeaderMatcher) -> R<RbacPermission> {
    use header_matcher::HeaderMatchSpecifier as S;
    if h.name.is_empty() {
        return Err(Fault::invalid("name", "empty header name"));
    }
    if h.treat_missing_header_as_empty {
        return Err(Fault::refused(
            "treat_missing_header_as_empty",
            "not supported",
        ));
    }
    let sm = |p: MatchPattern| -> R<Option<StringMatch>> {
        let m = StringMatch {
            pattern: p,
            ignore_case: false,
        };
        m.compile()
            .map_err(|e| Fault::invalid("safe_regex_match.regex", e.to_string()))?;
        Ok(Some(m))
    };
    let mut invert = h.invert_match;
    let value = match &h.header_match_specifier {
        Some(S::ExactMatch(v)) => sm(MatchPattern::Exact(v.clone()))?,
        Some(S::PrefixMatch(v)) => sm(MatchPattern::Prefix(v.clone()))?,
        Some(S::SuffixMatch(v)) => sm(MatchPattern::Suffix(v.clone()))?,
        Some(S::ContainsMatch(v)) => sm(MatchPattern::Contains(v.clone()))?,
        Some(S::SafeRegexMatch(r)) => {
            if r.regex.is_empty() {
                return Err(Fault::invalid("safe_regex_match.regex", "empty regex"));
            }
            sm(MatchPattern::SafeRegex(r.regex.clone()))?
        }
        Some(S::PresentMatch(true)) | None => None,
        Some(S::PresentMatch(false)) => {
            invert = !invert;
            None
        }
        Some(S::StringMatch(s)) => Some(matcher(s).at("string_match")?),
        Some(S::RangeMatch(_)) => {
            return Err(Fault::refused(
                "range_match",
                "range header matches are not enforced by veer",
            ))
        }
    };
    Ok(RbacPermission::Header {
        name: h.name.to_ascii_lowercase(),
        value,
        invert,
    })
}

// ---------------------------------------------------------------- clusters

/// The HTTP protocol a cluster's `typed_extension_protocol_options`
/// ask for: `true` = HTTP/2 (explicit `http2_protocol_options`).
pub(crate) fn cluster_http2(opts: &HashMap<String, Any>) -> R<bool> {
    let mut http2 = false;
    for (k, a) in opts {
        let at = format!("typed_extension_protocol_options[{k:?}]");
        if a.type_url != HttpProtocolOptions::type_url() {
            return Err(Fault::refused(
                &at,
                format!("protocol options {} are not supported", a.type_url),
            ));
        }
        let o: HttpProtocolOptions = unpack(a, "").at(&at)?;
        use http_protocol_options::UpstreamProtocolOptions as U;
        match &o.upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => {
                use http_protocol_options::explicit_http_config::ProtocolConfig as P;
                match &e.protocol_config {
                    Some(P::Http2ProtocolOptions(_)) => http2 = true,
                    Some(P::HttpProtocolOptions(_)) | None => {}
                    Some(P::Http3ProtocolOptions(_)) => {
                        return Err(Fault::refused(
                            &format!("{at}.explicit_http_config"),
                            "HTTP/3 upstreams are not supported",
                        ))
                    }
                }
            }
            None => {}
            Some(_) => {
                return Err(Fault::refused(
                    &format!("{at}.upstream_protocol_options"),
                    "only explicit_http_config is supported (Consul's form)",
                ))
            }
        }
        if !o.http_filters.is_empty() {
            return Err(Fault::refused(
                &format!("{at}.http_filters"),
                "upstream HTTP filters are not supported",
            ));
        }
    }
    Ok(http2)
}

#[cfg(test)]
mod tests;
