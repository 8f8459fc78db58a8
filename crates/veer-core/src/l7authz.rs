//! Per-request (L7) authorization of the inbound HTTP listener (sans-IO).
//!
//! Two sources, as for connections ([`crate::authz`]):
//! - **Intentions with permissions** (agent mode, TOML): the first
//!   intention (Consul's precedence order) whose source matches the peer
//!   decides. Without permissions its action applies to every request;
//!   with permissions the first permission whose match holds decides, and
//!   when none does the default action applies (Consul's documented
//!   `service-intentions` semantics).
//! - **HTTP RBAC filters** (xDS `envoy.filters.http.rbac`): as the network
//!   filter, but a policy applies to a request only when one of its
//!   principals matches the peer *and* one of its permissions matches the
//!   request (no permission = any).
//!
//! Matching follows Envoy (Consul compiles permissions to Envoy RBAC):
//! the path is the request path without the query string; a header that
//! appears several times is matched against its values joined with `,`; a
//! header that is absent matches only an inverted `present` condition
//! (Envoy's `invert_match` inverts the comparison of a value, and an absent
//! header has none); methods compare exactly (Consul writes them as a
//! `:method` regex of alternatives). `:method`, `:path` and `:authority`
//! can be named as headers.
//!
//! Everything is compiled once, when the snapshot is built: a regex that
//! does not compile is refused with the intention or policy named.
use crate::authz::{AuthzError, Matcher, Peer, RbacRules, StringMatch};
use crate::intentions::{Action, Intentions};
use crate::l7::{HeaderMatch, HeaderMatchKind, PathMatch, Permission, RbacPermission};
use std::borrow::Cow;

/// What the evaluation needs of a request. The data path implements it for
/// its HTTP request type; tests for a table.
pub trait RequestView {
    /// Upper-case method name.
    fn method(&self) -> &str;
    /// The path without the query string.
    fn path(&self) -> &str;
    /// The request's authority (`Host` in HTTP/1.1).
    fn authority(&self) -> &str;
    /// The values of a (lower-case) header joined with `,`; `None` when the
    /// request has none (or one that is not visible ASCII).
    fn header(&self, name: &str) -> Option<Cow<'_, str>>;
}

/// Looks a header up, the pseudo-headers included.
fn header_of<'r>(req: &'r dyn RequestView, name: &str) -> Option<Cow<'r, str>> {
    match name {
        ":method" => Some(Cow::Borrowed(req.method())),
        ":path" => Some(Cow::Borrowed(req.path())),
        ":authority" | "host" => Some(Cow::Borrowed(req.authority())),
        n => req.header(n),
    }
}

/// A compiled header condition.
#[derive(Clone, Debug)]
struct CHeader {
    name: String,
    /// `None` = present.
    value: Option<Matcher>,
    invert: bool,
}

impl CHeader {
    fn compile(
        name: &str,
        value: Option<&StringMatch>,
        invert: bool,
    ) -> Result<CHeader, AuthzError> {
        Ok(CHeader {
            name: name.to_ascii_lowercase(),
            value: value.map(|m| m.compile()).transpose()?,
            invert,
        })
    }

    fn from_match(h: &HeaderMatch) -> Result<CHeader, AuthzError> {
        let m = match &h.kind {
            HeaderMatchKind::Present => None,
            HeaderMatchKind::Exact(s) => Some(StringMatch::exact(s.clone())),
            HeaderMatchKind::Prefix(s) => Some(StringMatch::prefix(s.clone())),
            HeaderMatchKind::Suffix(s) => Some(StringMatch::suffix(s.clone())),
            HeaderMatchKind::Regex(s) => Some(StringMatch::regex(s.clone())),
        };
        CHeader::compile(&h.name, m.as_ref(), h.invert)
    }

    fn matches(&self, req: &dyn RequestView) -> bool {
        match (header_of(req, &self.name), &self.value) {
            (None, None) => self.invert,
            (None, Some(_)) => false,
            (Some(_), None) => !self.invert,
            (Some(v), Some(m)) => m.matches(&v) != self.invert,
        }
    }
}

fn path_matcher(p: &PathMatch) -> Option<StringMatch> {
    match p {
        PathMatch::Any => None,
        PathMatch::Exact(s) => Some(StringMatch::exact(s.clone())),
        PathMatch::Prefix(s) => Some(StringMatch::prefix(s.clone())),
        PathMatch::Regex(s) => Some(StringMatch::regex(s.clone())),
    }
}

/// A compiled intention permission match: every set part must hold.
#[derive(Clone, Debug)]
struct CPermission {
    action: Action,
    path: Option<Matcher>,
    headers: Vec<CHeader>,
    methods: Vec<String>,
}

impl CPermission {
    fn compile(p: &Permission) -> Result<CPermission, AuthzError> {
        Ok(CPermission {
            action: p.action,
            path: path_matcher(&p.http.path)
                .map(|m| m.compile())
                .transpose()?,
            headers: p
                .http
                .headers
                .iter()
                .map(CHeader::from_match)
                .collect::<Result<_, _>>()?,
            methods: p
                .http
                .methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
        })
    }

    fn matches(&self, req: &dyn RequestView) -> bool {
        self.path.as_ref().is_none_or(|m| m.matches(req.path()))
            && self.headers.iter().all(|h| h.matches(req))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method()))
    }
}

/// A compiled [`RbacPermission`].
#[derive(Clone, Debug)]
enum CRbacPerm {
    Any,
    Path(Matcher),
    Header(CHeader),
    And(Vec<CRbacPerm>),
    Or(Vec<CRbacPerm>),
    Not(Box<CRbacPerm>),
}

impl CRbacPerm {
    fn compile(p: &RbacPermission) -> Result<CRbacPerm, AuthzError> {
        let all = |v: &[RbacPermission]| {
            v.iter()
                .map(CRbacPerm::compile)
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match p {
            RbacPermission::Any => CRbacPerm::Any,
            RbacPermission::UrlPath(m) => CRbacPerm::Path(m.compile()?),
            RbacPermission::Header {
                name,
                value,
                invert,
            } => CRbacPerm::Header(CHeader::compile(name, value.as_ref(), *invert)?),
            RbacPermission::And(v) => CRbacPerm::And(all(v)?),
            RbacPermission::Or(v) => CRbacPerm::Or(all(v)?),
            RbacPermission::Not(p) => CRbacPerm::Not(Box::new(CRbacPerm::compile(p)?)),
        })
    }

    fn matches(&self, req: &dyn RequestView) -> bool {
        match self {
            CRbacPerm::Any => true,
            CRbacPerm::Path(m) => m.matches(req.path()),
            CRbacPerm::Header(h) => h.matches(req),
            CRbacPerm::And(v) => v.iter().all(|p| p.matches(req)),
            CRbacPerm::Or(v) => v.iter().any(|p| p.matches(req)),
            CRbacPerm::Not(p) => !p.matches(req),
        }
    }
}

/// Intentions with their permissions compiled, in evaluation order.
#[derive(Clone, Debug)]
pub struct HttpIntentions {
    intentions: Intentions,
    /// Per rule of `intentions.rules()`.
    permissions: Vec<Vec<CPermission>>,
}

impl HttpIntentions {
    pub fn compile(intentions: &Intentions) -> Result<HttpIntentions, AuthzError> {
        let permissions = intentions
            .rules()
            .iter()
            .map(|r| {
                r.permissions
                    .iter()
                    .map(CPermission::compile)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| AuthzError::Intention {
                        intention: r.to_string(),
                        source: Box::new(e),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(HttpIntentions {
            intentions: intentions.clone(),
            permissions,
        })
    }

    pub fn evaluate(&self, peer: &Peer, req: &dyn RequestView) -> HttpDecision {
        let Some(id) = &peer.id else {
            return HttpDecision::NoIdentity;
        };
        let d = self.intentions.evaluate_source(id);
        let Some(i) = d else {
            return HttpDecision::Default(self.intentions.default_action());
        };
        let rule = &self.intentions.rules()[i];
        let perms = &self.permissions[i];
        if rule.permissions.is_empty() {
            return HttpDecision::Intention {
                index: i,
                action: rule.action,
            };
        }
        match perms.iter().position(|p| p.matches(req)) {
            Some(j) => HttpDecision::Permission {
                intention: i,
                permission: j,
                action: perms[j].action,
            },
            None => HttpDecision::NoPermission {
                intention: i,
                action: self.intentions.default_action(),
            },
        }
    }
}

/// HTTP RBAC filters, compiled: the principals by the network RBAC
/// ([`crate::authz::Rbac`], same semantics and errors), the permissions
/// here.
#[derive(Clone, Debug)]
pub struct HttpRbac {
    principals: crate::authz::Rbac,
    /// Per filter, per policy: its permissions (empty = any).
    permissions: Vec<Vec<Vec<CRbacPerm>>>,
}

impl HttpRbac {
    pub fn compile(rules: &[RbacRules]) -> Result<HttpRbac, AuthzError> {
        let principals = crate::authz::Rbac::compile(rules)?;
        let mut permissions = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let mut policies = Vec::with_capacity(r.policies.len());
            for p in &r.policies {
                let perms = p
                    .permissions
                    .iter()
                    .map(CRbacPerm::compile)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| AuthzError::Policy {
                        filter: i,
                        policy: p.name.clone(),
                        source: Box::new(e),
                    })?;
                policies.push(perms);
            }
            permissions.push(policies);
        }
        Ok(HttpRbac {
            principals,
            permissions,
        })
    }

    /// Whether policy `j` of filter `f` matches the peer and the request.
    fn policy_matches(&self, f: usize, j: usize, peer: &Peer, req: &dyn RequestView) -> bool {
        let perms = &self.permissions[f][j];
        (perms.is_empty() || perms.iter().any(|p| p.matches(req)))
            && self.principals.principal_matches(f, j, peer)
    }

    pub fn evaluate(&self, peer: &Peer, req: &dyn RequestView) -> HttpDecision {
        let mut allowed_by = None;
        for (i, r) in self.principals.rules().iter().enumerate() {
            let hit = (0..r.policies.len()).find(|&j| self.policy_matches(i, j, peer, req));
            match (r.action, hit) {
                (Action::Allow, Some(j)) => {
                    allowed_by.get_or_insert((i, j));
                }
                (Action::Allow, None) => return HttpDecision::RbacNoPolicy { filter: i },
                (Action::Deny, Some(j)) => {
                    return HttpDecision::RbacDenied {
                        filter: i,
                        policy: j,
                    }
                }
                (Action::Deny, None) => {}
            }
        }
        match allowed_by {
            Some((filter, policy)) => HttpDecision::RbacAllowed { filter, policy },
            None => HttpDecision::RbacNothingDenied,
        }
    }

    fn policy_name(&self, f: usize, p: usize) -> &str {
        &self.principals.rules()[f].policies[p].name
    }
}

/// What decides inbound requests.
#[derive(Clone, Debug)]
pub enum HttpAuthz {
    Intentions(HttpIntentions),
    Rbac(HttpRbac),
    /// The connection-level decision was all (xDS gave network RBAC on the
    /// HTTP listener and no HTTP RBAC filter): every request is allowed.
    ConnectionOnly,
}

impl HttpAuthz {
    /// HTTP RBAC filters when given; else intentions when they decide
    /// (`uses_intentions`); else nothing per request.
    pub fn new(
        http_rbac: Option<&[RbacRules]>,
        intentions: &Intentions,
        uses_intentions: bool,
    ) -> Result<HttpAuthz, AuthzError> {
        match http_rbac {
            Some(r) => Ok(HttpAuthz::Rbac(HttpRbac::compile(r)?)),
            None if uses_intentions => {
                Ok(HttpAuthz::Intentions(HttpIntentions::compile(intentions)?))
            }
            None => Ok(HttpAuthz::ConnectionOnly),
        }
    }

    pub fn evaluate(&self, peer: &Peer, req: &dyn RequestView) -> HttpDecision {
        match self {
            HttpAuthz::Intentions(i) => i.evaluate(peer, req),
            HttpAuthz::Rbac(r) => r.evaluate(peer, req),
            HttpAuthz::ConnectionOnly => HttpDecision::RbacNothingDenied,
        }
    }

    /// A human-readable reason for logs.
    pub fn explain(&self, d: &HttpDecision) -> String {
        let ixn = |i: usize| match self {
            HttpAuthz::Intentions(h) => h.intentions.rules()[i].to_string(),
            _ => format!("#{i}"),
        };
        let pol = |f: usize, p: usize| match self {
            HttpAuthz::Rbac(r) => format!("{:?}", r.policy_name(f, p)),
            _ => format!("#{p}"),
        };
        match *d {
            HttpDecision::NoIdentity => {
                "the peer certificate carries no Consul service identity".into()
            }
            HttpDecision::Default(a) => {
                format!("no intention matched; default action is {}", a.as_str())
            }
            HttpDecision::Intention { index, .. } => format!("matched intention {}", ixn(index)),
            HttpDecision::Permission {
                intention,
                permission,
                action,
            } => format!(
                "intention {} permission #{permission} ({}) matched",
                ixn(intention),
                action.as_str()
            ),
            HttpDecision::NoPermission { intention, action } => format!(
                "intention {} has no permission that matches; default action is {}",
                ixn(intention),
                action.as_str()
            ),
            HttpDecision::RbacAllowed { filter, policy } => {
                format!(
                    "HTTP RBAC filter #{filter} (ALLOW) policy {} matched",
                    pol(filter, policy)
                )
            }
            HttpDecision::RbacNothingDenied => "no HTTP RBAC policy denied".into(),
            HttpDecision::RbacDenied { filter, policy } => {
                format!(
                    "HTTP RBAC filter #{filter} (DENY) policy {} matched",
                    pol(filter, policy)
                )
            }
            HttpDecision::RbacNoPolicy { filter } => {
                format!("HTTP RBAC filter #{filter} (ALLOW) has no policy that matches")
            }
        }
    }
}

/// The outcome of authorizing one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpDecision {
    /// Intentions decide and the peer has no Consul identity.
    NoIdentity,
    /// No intention's source matched the peer.
    Default(Action),
    /// An intention without permissions matched.
    Intention {
        index: usize,
        action: Action,
    },
    /// Permission `permission` of intention `intention` matched first.
    Permission {
        intention: usize,
        permission: usize,
        action: Action,
    },
    /// The intention matched the peer, none of its permissions the request:
    /// the default action.
    NoPermission {
        intention: usize,
        action: Action,
    },
    RbacAllowed {
        filter: usize,
        policy: usize,
    },
    RbacNothingDenied,
    RbacDenied {
        filter: usize,
        policy: usize,
    },
    RbacNoPolicy {
        filter: usize,
    },
}

impl HttpDecision {
    pub fn allowed(&self) -> bool {
        match self {
            HttpDecision::NoIdentity
            | HttpDecision::RbacDenied { .. }
            | HttpDecision::RbacNoPolicy { .. } => false,
            HttpDecision::Default(a)
            | HttpDecision::Intention { action: a, .. }
            | HttpDecision::Permission { action: a, .. }
            | HttpDecision::NoPermission { action: a, .. } => *a == Action::Allow,
            HttpDecision::RbacAllowed { .. } | HttpDecision::RbacNothingDenied => true,
        }
    }

    /// Metric label: `allowed`, `denied_by_intention`, `denied_by_permission`,
    /// `denied_no_permission` (default action after no permission matched),
    /// `denied_by_default`, `denied_no_identity`, `denied_by_policy`,
    /// `denied_no_policy`.
    pub fn classify(&self) -> &'static str {
        if self.allowed() {
            return "allowed";
        }
        match self {
            HttpDecision::NoIdentity => "denied_no_identity",
            HttpDecision::Default(_) => "denied_by_default",
            HttpDecision::Intention { .. } => "denied_by_intention",
            HttpDecision::Permission { .. } => "denied_by_permission",
            HttpDecision::NoPermission { .. } => "denied_no_permission",
            HttpDecision::RbacDenied { .. } => "denied_by_policy",
            HttpDecision::RbacNoPolicy { .. } => "denied_no_policy",
            HttpDecision::RbacAllowed { .. } | HttpDecision::RbacNothingDenied => "allowed",
        }
    }
}

#[cfg(test)]
mod tests;

/// The compiled inbound L7 listener of a snapshot: what
/// [`crate::l7::InboundHttp`] asked for, the per-request authorization, and
/// the server TLS configuration offering ALPN `h2` and `http/1.1` (the L4
/// listener's offers none).
pub struct InboundL7 {
    pub spec: crate::l7::InboundHttp,
    pub authz: HttpAuthz,
    pub server: std::sync::Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for InboundL7 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundL7")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl InboundL7 {
    /// Compiles the listener; `server` is the L4 listener's configuration
    /// (same certificates, verifier and ticket key).
    pub fn new(
        spec: crate::l7::InboundHttp,
        authz: &crate::authz::Authz,
        intentions: &Intentions,
        server: &rustls::ServerConfig,
    ) -> Result<InboundL7, AuthzError> {
        let authz = HttpAuthz::new(spec.rbac.as_deref(), intentions, authz.uses_intentions())?;
        let mut server = server.clone();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(InboundL7 {
            spec,
            authz,
            server: std::sync::Arc::new(server),
        })
    }
}
