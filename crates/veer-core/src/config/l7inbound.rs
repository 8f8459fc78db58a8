//! The TOML file's inbound L7 settings: `[inbound] protocol`, `xfcc`,
//! `request_timeout`, and intention permissions
//! (`[[intentions.rules.permissions]]`, Consul's `service-intentions`
//! `Permissions` with the `HTTP` part flattened):
//!
//! ```toml
//! [inbound]
//! protocol = "http"            # tcp (default), http, http2, grpc
//! xfcc = "append_forward"      # sanitize (default), append_forward, sanitize_set
//! request_timeout = "30s"      # default 15s; "0s" = none
//!
//! [[intentions.rules]]
//! source = "web"               # no `action`: the permissions decide
//! [[intentions.rules.permissions]]
//! action = "deny"
//! path_prefix = "/admin"       # at most one of path_exact, path_prefix, path_regex
//! [[intentions.rules.permissions]]
//! action = "allow"
//! methods = ["GET", "HEAD"]
//! headers = [{ name = "x-env", exact = "prod" }]   # or prefix, suffix, regex, present; invert
//! ```
use super::{Ctx, S};
use crate::authz::StringMatch;
use crate::config::ConfigError;
use crate::intentions::Action;
use crate::l7::{
    HeaderMatch, HeaderMatchKind, InboundHttp, PathMatch, Permission, PermissionMatch, Xfcc,
};
use crate::route::Protocol;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PermissionSection {
    action: S<String>,
    path_exact: Option<S<String>>,
    path_prefix: Option<S<String>>,
    path_regex: Option<S<String>>,
    #[serde(default)]
    methods: Vec<S<String>>,
    #[serde(default)]
    headers: Vec<S<HeaderSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeaderSection {
    name: S<String>,
    exact: Option<S<String>>,
    prefix: Option<S<String>>,
    suffix: Option<S<String>>,
    regex: Option<S<String>>,
    present: Option<S<bool>>,
    #[serde(default)]
    invert: bool,
}

fn regex(cx: &Ctx<'_>, v: &S<String>, key: &str) -> Result<String, ConfigError> {
    StringMatch::regex(v.get_ref().clone())
        .compile()
        .map_err(|e| cx.err(v.span(), key, e.to_string()))?;
    Ok(v.get_ref().clone())
}

/// `[inbound]`'s L7 part; `None` for `tcp` (or no `protocol`).
pub(super) fn inbound(
    cx: &Ctx<'_>,
    protocol: &Option<S<String>>,
    xfcc: &Option<S<String>>,
    request_timeout: &Option<S<String>>,
) -> Result<Option<InboundHttp>, ConfigError> {
    let p = match protocol {
        None => Protocol::Tcp,
        Some(v) => Protocol::parse(v.get_ref()).ok_or_else(|| {
            cx.err(
                v.span(),
                "inbound.protocol",
                format!("{:?} is not tcp, http, http2 or grpc", v.get_ref()),
            )
        })?,
    };
    if p == Protocol::Tcp {
        for (v, k) in [
            (xfcc, "inbound.xfcc"),
            (request_timeout, "inbound.request_timeout"),
        ] {
            if let Some(v) = v {
                return Err(cx.err(v.span(), k, "applies only to protocol http, http2 or grpc"));
            }
        }
        return Ok(None);
    }
    let xfcc = match xfcc {
        None => Xfcc::Sanitize,
        Some(v) => match v.get_ref().as_str() {
            "sanitize" => Xfcc::Sanitize,
            "append_forward" => Xfcc::AppendForward,
            "sanitize_set" => Xfcc::SanitizeSet,
            s => {
                return Err(cx.err(
                    v.span(),
                    "inbound.xfcc",
                    format!("{s:?} is not sanitize, append_forward or sanitize_set"),
                ))
            }
        },
    };
    let request_timeout = match request_timeout {
        None => None,
        Some(_) => Some(cx.duration(
            request_timeout,
            "inbound.request_timeout",
            Default::default(),
        )?),
    };
    Ok(Some(InboundHttp {
        protocol: p,
        rbac: None,
        xfcc,
        request_timeout,
    }))
}

/// The permissions of `intentions.rules[i]`.
pub(super) fn permissions(
    cx: &Ctx<'_>,
    i: usize,
    perms: &[S<PermissionSection>],
) -> Result<Vec<Permission>, ConfigError> {
    let mut out = Vec::with_capacity(perms.len());
    for (j, p) in perms.iter().enumerate() {
        let k = |f: &str| format!("intentions.rules[{i}].permissions[{j}].{f}");
        let p = p.get_ref();
        let action = Action::parse(p.action.get_ref()).ok_or_else(|| {
            cx.err(
                p.action.span(),
                k("action"),
                format!("{:?} is not \"allow\" or \"deny\"", p.action.get_ref()),
            )
        })?;
        let paths: Vec<_> = [
            (&p.path_exact, "path_exact"),
            (&p.path_prefix, "path_prefix"),
            (&p.path_regex, "path_regex"),
        ]
        .into_iter()
        .filter_map(|(v, n)| v.as_ref().map(|v| (v, n)))
        .collect();
        if let [_, (v, n), ..] = paths.as_slice() {
            return Err(cx.err(
                v.span(),
                k(n),
                "at most one of path_exact, path_prefix, path_regex (as in Consul)",
            ));
        }
        let path = match paths.first() {
            None => PathMatch::Any,
            Some((v, n)) => {
                if *n != "path_regex" && !v.get_ref().starts_with('/') {
                    return Err(cx.err(v.span(), k(n), "must begin with '/' (as in Consul)"));
                }
                match *n {
                    "path_exact" => PathMatch::Exact(v.get_ref().clone()),
                    "path_prefix" => PathMatch::Prefix(v.get_ref().clone()),
                    _ => PathMatch::Regex(regex(cx, v, &k(n))?),
                }
            }
        };
        let mut methods = Vec::new();
        for m in &p.methods {
            let s = m.get_ref();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(cx.err(
                    m.span(),
                    k("methods"),
                    format!("{s:?} is not an upper-case HTTP method"),
                ));
            }
            if methods.contains(s) {
                return Err(cx.err(m.span(), k("methods"), format!("{s} is listed twice")));
            }
            methods.push(s.clone());
        }
        let mut headers = Vec::new();
        for (h, hs) in p.headers.iter().enumerate() {
            let kh = |f: &str| k(&format!("headers[{h}].{f}"));
            let hs = hs.get_ref();
            let name = hs.name.get_ref();
            if name.is_empty() || http_token(name).is_none() {
                return Err(cx.err(
                    hs.name.span(),
                    kh("name"),
                    format!("{name:?} is not a header name"),
                ));
            }
            let mut kinds = Vec::new();
            if let Some(v) = &hs.exact {
                kinds.push((v.span(), HeaderMatchKind::Exact(v.get_ref().clone())));
            }
            if let Some(v) = &hs.prefix {
                kinds.push((v.span(), HeaderMatchKind::Prefix(v.get_ref().clone())));
            }
            if let Some(v) = &hs.suffix {
                kinds.push((v.span(), HeaderMatchKind::Suffix(v.get_ref().clone())));
            }
            if let Some(v) = &hs.regex {
                kinds.push((
                    v.span(),
                    HeaderMatchKind::Regex(regex(cx, v, &kh("regex"))?),
                ));
            }
            if let Some(v) = &hs.present {
                if !*v.get_ref() {
                    return Err(cx.err(
                        v.span(),
                        kh("present"),
                        "only `present = true` (use `invert` for absent)",
                    ));
                }
                kinds.push((v.span(), HeaderMatchKind::Present));
            }
            let kind = match kinds.len() {
                1 => kinds
                    .pop()
                    .map(|(_, k)| k)
                    .unwrap_or(HeaderMatchKind::Present),
                0 => {
                    return Err(cx.err(
                        hs.name.span(),
                        kh("name"),
                        "needs one of exact, prefix, suffix, regex, present",
                    ))
                }
                _ => {
                    return Err(cx.err(
                        kinds[1].0.clone(),
                        kh("name"),
                        "only one of exact, prefix, suffix, regex, present",
                    ))
                }
            };
            headers.push(HeaderMatch {
                name: name.to_ascii_lowercase(),
                kind,
                invert: hs.invert,
            });
        }
        out.push(Permission {
            action,
            http: PermissionMatch {
                path,
                headers,
                methods,
            },
        });
    }
    Ok(out)
}

/// `Some(())` when `s` is an HTTP field name (RFC 9110 token), or a
/// pseudo-header Consul allows (`:method`, `:path`, `:authority`).
fn http_token(s: &str) -> Option<()> {
    let t = s.strip_prefix(':').unwrap_or(s);
    if s.starts_with(':') && ![":method", ":path", ":authority"].contains(&s) {
        return None;
    }
    (!t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)))
    .then_some(())
}
