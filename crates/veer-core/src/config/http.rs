//! `[[upstreams.clusters]]` and `[[upstreams.routes]]`: the L7 routing of
//! an http-like upstream in the TOML file, compiled to [`HttpRoutes`].
//!
//! ```toml
//! [[upstreams]]
//! name = "api"
//! protocol = "http"             # http, http2 or grpc: the upstream is L7
//! virtual_ips = ["10.96.0.20"]
//! endpoints = ["10.0.0.2:20000"] # the cluster named "api" (+ its failover)
//!
//! [[upstreams.clusters]]        # more destinations for routes
//! name = "api-v2"               # what routes call it
//! subset = "v2"                 # service, namespace, partition, datacenter,
//! endpoints = ["10.0.0.3:20000"] # protocol, connect_timeout: as upstreams
//!
//! [[upstreams.routes]]          # in order; the first match wins
//! name = "admin"                # default: routes[<index>]
//! path_prefix = "/admin/"       # or path_exact, path_regex
//! methods = ["GET", "PUT"]
//! headers = [{ name = "x-canary", exact = "1" }]  # present/exact/prefix/suffix/regex, invert
//! query = [{ name = "v", regex = "[0-9]+" }]      # present/exact/regex
//! cluster = "api-v2"            # or splits = [{ cluster = "api", weight = 90 }, ...]
//! prefix_rewrite = "/"
//! timeout = "5s"                # "0s" = none; default 15 s
//! retries = 2                   # with retry_on_connect_failure, retry_on_reset,
//! retry_on_status_codes = [503] #   retry_on_status_codes
//! ```
//!
//! As Consul's discovery chain, a catch-all route to the upstream's own
//! cluster is appended after the routes given.
use super::{ConfigError, Ctx, S};
use crate::l7::{
    ClusterSpec, HeaderMatch, HeaderMatchKind, HttpRoutes, PathMatch, QueryMatch, QueryMatchKind,
    RequestMatch, RetryPolicy, RouteAction, RouteSpec, WeightedCluster,
};
use crate::route::Protocol;
use crate::snapshot::{TargetSpec, UpstreamSpec};
use crate::spiffe::ServiceId;
use serde::Deserialize;

/// `[[upstreams.clusters]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    name: S<String>,
    service: Option<S<String>>,
    namespace: Option<S<String>>,
    partition: Option<S<String>>,
    datacenter: Option<S<String>>,
    subset: Option<S<String>>,
    protocol: Option<S<String>>,
    #[serde(default)]
    endpoints: Vec<S<String>>,
    connect_timeout: Option<S<String>>,
}

/// `[[upstreams.routes]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteSection {
    name: Option<S<String>>,
    path_exact: Option<S<String>>,
    path_prefix: Option<S<String>>,
    path_regex: Option<S<String>>,
    #[serde(default)]
    methods: Vec<S<String>>,
    #[serde(default)]
    headers: Vec<S<HeaderSection>>,
    #[serde(default)]
    query: Vec<S<QuerySection>>,
    cluster: Option<S<String>>,
    #[serde(default)]
    splits: Vec<S<SplitSection>>,
    prefix_rewrite: Option<S<String>>,
    timeout: Option<S<String>>,
    retries: Option<S<u32>>,
    #[serde(default)]
    retry_on_connect_failure: bool,
    #[serde(default)]
    retry_on_reset: bool,
    #[serde(default)]
    retry_on_status_codes: Vec<S<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeaderSection {
    name: S<String>,
    #[serde(default)]
    present: bool,
    exact: Option<S<String>>,
    prefix: Option<S<String>>,
    suffix: Option<S<String>>,
    regex: Option<S<String>>,
    #[serde(default)]
    invert: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct QuerySection {
    name: S<String>,
    #[serde(default)]
    present: bool,
    exact: Option<S<String>>,
    regex: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SplitSection {
    cluster: S<String>,
    weight: S<u32>,
}

fn regex(cx: &Ctx<'_>, v: &S<String>, key: String) -> Result<String, ConfigError> {
    regex::Regex::new(&format!("^(?:{})$", v.get_ref()))
        .map_err(|e| cx.err(v.span(), key, format!("bad regex: {e}")))?;
    Ok(v.get_ref().clone())
}

/// The upstream's HTTP routes: `None` for a tcp upstream (which may then
/// have no clusters or routes).
#[allow(clippy::too_many_arguments)]
pub(super) fn routes(
    cx: &Ctx<'_>,
    i: usize,
    span: std::ops::Range<usize>,
    spec: &UpstreamSpec,
    clusters: &[S<ClusterSection>],
    routes: &[S<RouteSection>],
    trust_domain: &str,
    local_dc: &str,
) -> Result<Option<HttpRoutes>, ConfigError> {
    let k = |f: &str| format!("upstreams[{i}].{f}");
    if spec.protocol == Protocol::Tcp {
        if !clusters.is_empty() || !routes.is_empty() {
            return Err(cx.err(
                span,
                k("protocol"),
                "clusters and routes need protocol = \"http\", \"http2\" or \"grpc\"",
            ));
        }
        return Ok(None);
    }
    if spec.dialed_directly {
        if !clusters.is_empty() || !routes.is_empty() {
            return Err(cx.err(
                span,
                k("routes"),
                "clusters and routes apply to upstreams reached by virtual IP or local_bind, not to dialed_directly instances",
            ));
        }
        return Ok(None);
    }
    let mut own = vec![spec.primary()];
    own.extend(spec.failover.iter().cloned());
    let mut out = HttpRoutes {
        clusters: vec![ClusterSpec {
            name: spec.identity.service.clone(),
            targets: own,
            protocol: spec.protocol,
        }],
        routes: Vec::new(),
    };
    for (j, c) in clusters.iter().enumerate() {
        let ck = |x: &str| format!("upstreams[{i}].clusters[{j}].{x}");
        let cspan = c.span();
        let c = c.get_ref();
        let name = cx.name(&c.name, &ck("name"))?;
        if out.clusters.iter().any(|o| o.name == name) {
            return Err(cx.err(
                c.name.span(),
                ck("name"),
                format!("cluster {name:?} is named twice (the upstream's own cluster is named after it)"),
            ));
        }
        let id = ServiceId::new(
            trust_domain,
            &cx.opt_name(&c.partition, &ck("partition"), &spec.identity.partition)?,
            &cx.opt_name(&c.namespace, &ck("namespace"), &spec.identity.namespace)?,
            &cx.opt_name(&c.datacenter, &ck("datacenter"), local_dc)?,
            &cx.opt_name(&c.service, &ck("service"), &spec.identity.service)?,
        );
        let mut t = TargetSpec::new(id);
        if let Some(sub) = &c.subset {
            let sub = cx.name(sub, &ck("subset"))?;
            t.sni = Some(format!("{sub}.{}", t.identity.sni()));
        }
        for v in &c.endpoints {
            t.endpoints.push(cx.sockaddr(v, &ck("endpoints"))?);
        }
        if t.endpoints.is_empty() {
            return Err(cx.err(cspan, ck("endpoints"), "a cluster needs endpoints"));
        }
        t.connect_timeout = match &c.connect_timeout {
            Some(v) => Some(
                crate::duration::parse(v.get_ref())
                    .map_err(|m| cx.err(v.span(), ck("connect_timeout"), m))?,
            ),
            None => spec.connect_timeout,
        };
        let protocol = match &c.protocol {
            None => spec.protocol,
            Some(p) => match Protocol::parse(p.get_ref()) {
                Some(Protocol::Tcp) | None => {
                    return Err(cx.err(
                        p.span(),
                        ck("protocol"),
                        format!("{:?} is not one of http, http2, grpc", p.get_ref()),
                    ))
                }
                Some(p) => p,
            },
        };
        out.clusters.push(ClusterSpec {
            name,
            targets: vec![t],
            protocol,
        });
    }
    let index = |v: &S<String>, key: String| -> Result<usize, ConfigError> {
        out.clusters
            .iter()
            .position(|c| c.name == *v.get_ref())
            .ok_or_else(|| {
                let names: Vec<_> = out.clusters.iter().map(|c| c.name.as_str()).collect();
                cx.err(
                    v.span(),
                    key,
                    format!(
                        "no cluster {:?} (clusters: {})",
                        v.get_ref(),
                        names.join(", ")
                    ),
                )
            })
    };
    for (j, r) in routes.iter().enumerate() {
        let rk = |x: &str| format!("upstreams[{i}].routes[{j}].{x}");
        let rspan = r.span();
        let r = r.get_ref();
        let name = match &r.name {
            Some(n) => cx.name(n, &rk("name"))?,
            None => format!("routes[{j}]"),
        };
        let paths = [&r.path_exact, &r.path_prefix, &r.path_regex];
        if paths.iter().filter(|p| p.is_some()).count() > 1 {
            return Err(cx.err(
                rspan,
                rk("path_exact"),
                "at most one of path_exact, path_prefix, path_regex",
            ));
        }
        let starts = |v: &S<String>, key: &str| -> Result<String, ConfigError> {
            if !v.get_ref().starts_with('/') {
                return Err(cx.err(
                    v.span(),
                    rk(key),
                    format!("{:?} must begin with /", v.get_ref()),
                ));
            }
            Ok(v.get_ref().clone())
        };
        let path = if let Some(p) = &r.path_exact {
            PathMatch::Exact(starts(p, "path_exact")?)
        } else if let Some(p) = &r.path_prefix {
            PathMatch::Prefix(starts(p, "path_prefix")?)
        } else if let Some(p) = &r.path_regex {
            PathMatch::Regex(regex(cx, p, rk("path_regex"))?)
        } else {
            PathMatch::Any
        };
        let mut methods = Vec::new();
        for m in &r.methods {
            let s = m.get_ref();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
                return Err(cx.err(
                    m.span(),
                    rk("methods"),
                    format!("{s:?} is not an HTTP method"),
                ));
            }
            methods.push(s.to_ascii_uppercase());
        }
        let mut headers = Vec::new();
        for (h_i, h) in r.headers.iter().enumerate() {
            let hk = format!("upstreams[{i}].routes[{j}].headers[{h_i}]");
            let hspan = h.span();
            let h = h.get_ref();
            let kinds = [&h.exact, &h.prefix, &h.suffix, &h.regex];
            let n = kinds.iter().filter(|k| k.is_some()).count() + usize::from(h.present);
            if n != 1 {
                return Err(cx.err(
                    hspan,
                    hk,
                    "exactly one of present, exact, prefix, suffix, regex",
                ));
            }
            let kind = if let Some(v) = &h.exact {
                HeaderMatchKind::Exact(v.get_ref().clone())
            } else if let Some(v) = &h.prefix {
                HeaderMatchKind::Prefix(v.get_ref().clone())
            } else if let Some(v) = &h.suffix {
                HeaderMatchKind::Suffix(v.get_ref().clone())
            } else if let Some(v) = &h.regex {
                HeaderMatchKind::Regex(regex(cx, v, format!("{hk}.regex"))?)
            } else {
                HeaderMatchKind::Present
            };
            if h.name.get_ref().is_empty() {
                return Err(cx.err(h.name.span(), format!("{hk}.name"), "empty header name"));
            }
            headers.push(HeaderMatch {
                name: h.name.get_ref().to_ascii_lowercase(),
                kind,
                invert: h.invert,
            });
        }
        let mut query = Vec::new();
        for (q_i, q) in r.query.iter().enumerate() {
            let qk = format!("upstreams[{i}].routes[{j}].query[{q_i}]");
            let qspan = q.span();
            let q = q.get_ref();
            let n = usize::from(q.exact.is_some())
                + usize::from(q.regex.is_some())
                + usize::from(q.present);
            if n != 1 {
                return Err(cx.err(qspan, qk, "exactly one of present, exact, regex"));
            }
            let kind = if let Some(v) = &q.exact {
                QueryMatchKind::Exact(v.get_ref().clone())
            } else if let Some(v) = &q.regex {
                QueryMatchKind::Regex(regex(cx, v, format!("{qk}.regex"))?)
            } else {
                QueryMatchKind::Present
            };
            if q.name.get_ref().is_empty() {
                return Err(cx.err(q.name.span(), format!("{qk}.name"), "empty name"));
            }
            query.push(QueryMatch {
                name: q.name.get_ref().clone(),
                kind,
            });
        }
        let clusters = match (&r.cluster, r.splits.is_empty()) {
            (Some(_), false) => {
                return Err(cx.err(rspan, rk("splits"), "either cluster or splits, not both"))
            }
            (None, true) => {
                return Err(cx.err(rspan, rk("cluster"), "a route needs a cluster (or splits)"))
            }
            (Some(c), true) => vec![WeightedCluster {
                cluster: index(c, rk("cluster"))?,
                weight: 1,
            }],
            (None, false) => {
                let mut v = Vec::new();
                for (s_i, s) in r.splits.iter().enumerate() {
                    let s = s.get_ref();
                    v.push(WeightedCluster {
                        cluster: index(&s.cluster, rk(&format!("splits[{s_i}].cluster")))?,
                        weight: *s.weight.get_ref(),
                    });
                }
                if v.iter().all(|w| w.weight == 0) {
                    return Err(cx.err(
                        rspan,
                        rk("splits"),
                        "at least one split needs a weight above 0",
                    ));
                }
                v
            }
        };
        if r.prefix_rewrite.is_some() && r.path_regex.is_some() {
            return Err(cx.err(
                rspan,
                rk("prefix_rewrite"),
                "prefix_rewrite needs path_exact or path_prefix (not path_regex)",
            ));
        }
        let timeout = match &r.timeout {
            None => None,
            Some(v) => Some(
                crate::duration::parse(v.get_ref())
                    .map_err(|m| cx.err(v.span(), rk("timeout"), m))?,
            ),
        };
        let wants_retry = r.retries.is_some()
            || r.retry_on_connect_failure
            || r.retry_on_reset
            || !r.retry_on_status_codes.is_empty();
        let mut codes = Vec::new();
        for c in &r.retry_on_status_codes {
            if !(100..=599).contains(c.get_ref()) {
                return Err(cx.err(
                    c.span(),
                    rk("retry_on_status_codes"),
                    format!("{} is not an HTTP status code", c.get_ref()),
                ));
            }
            codes.push(*c.get_ref());
        }
        let retry = wants_retry.then(|| RetryPolicy {
            // Envoy's default count when a policy is set without one.
            num_retries: r.retries.as_ref().map_or(1, |n| *n.get_ref()),
            on_connect_failure: r.retry_on_connect_failure,
            on_reset: r.retry_on_reset,
            on_status_codes: codes,
        });
        out.routes.push(RouteSpec {
            name,
            matches: RequestMatch {
                path,
                headers,
                query,
                methods,
            },
            action: RouteAction {
                clusters,
                prefix_rewrite: r.prefix_rewrite.as_ref().map(|p| p.get_ref().clone()),
                timeout,
                retry,
            },
        });
    }
    // Consul's catch-all to the upstream's own cluster.
    out.routes.push(RouteSpec {
        name: "default".into(),
        matches: RequestMatch::default(),
        action: RouteAction::to_cluster(0),
    });
    Ok(Some(out))
}
