//! Inbound authorization with Envoy's L4 network RBAC semantics, beside
//! Consul's intentions (sans-IO).
//!
//! A control-plane source either gives Consul intentions (the TOML file, the
//! Consul agent) or Envoy network RBAC filters (xDS). Both compile into one
//! [`Authz`] that the inbound path and live revocation evaluate.
//!
//! RBAC, as Envoy's `envoy.filters.network.rbac` does it:
//! - a filter with action ALLOW allows iff one of its policies matches (so a
//!   filter with no policies, Consul's `rules: {}`, denies everything);
//! - a filter with action DENY denies iff one of its policies matches;
//! - several filters in one chain must all allow; no filter allows all.
//!
//! A policy matches when one of its principals matches (L4 permissions are
//! only `any`; a translator refuses others). `authenticated.principal_name`
//! is matched against every URI SAN of the peer's certificate (the SPIFFE
//! ID), or, when it has none, against its subject, as Envoy does.
//!
//! Regular expressions are compiled once, when the snapshot is built; they
//! match the whole string, as Envoy's RE2 `safe_regex` does.
use crate::intentions::{Action, Decision, Intentions};
use crate::spiffe::ServiceId;

/// What a [`StringMatch`] compares with (Envoy `type.matcher.v3.StringMatcher`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MatchPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// An RE2-syntax regular expression that must match the whole string.
    SafeRegex(String),
}

/// A string matcher; plain data. `ignore_case` (ASCII) applies to all but
/// `SafeRegex`, as in Envoy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StringMatch {
    pub pattern: MatchPattern,
    pub ignore_case: bool,
}

impl StringMatch {
    pub fn exact(s: impl Into<String>) -> StringMatch {
        StringMatch {
            pattern: MatchPattern::Exact(s.into()),
            ignore_case: false,
        }
    }
    pub fn prefix(s: impl Into<String>) -> StringMatch {
        StringMatch {
            pattern: MatchPattern::Prefix(s.into()),
            ignore_case: false,
        }
    }
    pub fn suffix(s: impl Into<String>) -> StringMatch {
        StringMatch {
            pattern: MatchPattern::Suffix(s.into()),
            ignore_case: false,
        }
    }
    pub fn contains(s: impl Into<String>) -> StringMatch {
        StringMatch {
            pattern: MatchPattern::Contains(s.into()),
            ignore_case: false,
        }
    }
    pub fn regex(s: impl Into<String>) -> StringMatch {
        StringMatch {
            pattern: MatchPattern::SafeRegex(s.into()),
            ignore_case: false,
        }
    }
    pub fn ignoring_case(mut self) -> StringMatch {
        self.ignore_case = true;
        self
    }

    /// Compiles the matcher (the regex, once).
    pub fn compile(&self) -> Result<Matcher, AuthzError> {
        let regex = match &self.pattern {
            MatchPattern::SafeRegex(r) => Some(
                regex::RegexBuilder::new(&format!("^(?:{r})$"))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| AuthzError::BadRegex {
                        regex: r.clone(),
                        msg: e.to_string(),
                    })?,
            ),
            _ => None,
        };
        Ok(Matcher {
            spec: self.clone(),
            regex,
        })
    }
}

impl std::fmt::Display for StringMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, v) = match &self.pattern {
            MatchPattern::Exact(s) => ("exact", s),
            MatchPattern::Prefix(s) => ("prefix", s),
            MatchPattern::Suffix(s) => ("suffix", s),
            MatchPattern::Contains(s) => ("contains", s),
            MatchPattern::SafeRegex(s) => ("safe_regex", s),
        };
        write!(f, "{k} {v:?}")?;
        if self.ignore_case {
            f.write_str(" (ignore case)")?;
        }
        Ok(())
    }
}

/// The compiled regex size bound (bytes of program), so that a hostile
/// control plane cannot make veer build a huge automaton.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A compiled [`StringMatch`]: the plain-data matcher (whose pattern the
/// literal kinds match against directly) and, for `SafeRegex`, its regex.
#[derive(Clone, Debug)]
pub struct Matcher {
    spec: StringMatch,
    regex: Option<regex::Regex>,
}

impl Matcher {
    /// The plain-data matcher it was compiled from.
    pub fn spec(&self) -> &StringMatch {
        &self.spec
    }

    pub fn matches(&self, s: &str) -> bool {
        let ic = self.spec.ignore_case;
        let s = s.as_bytes();
        match &self.spec.pattern {
            MatchPattern::Exact(p) => eq(s, p.as_bytes(), ic),
            MatchPattern::Prefix(p) => s.len() >= p.len() && eq(&s[..p.len()], p.as_bytes(), ic),
            MatchPattern::Suffix(p) => {
                s.len() >= p.len() && eq(&s[s.len() - p.len()..], p.as_bytes(), ic)
            }
            MatchPattern::Contains(p) => {
                let p = p.as_bytes();
                p.is_empty() || s.windows(p.len()).any(|w| eq(w, p, ic))
            }
            MatchPattern::SafeRegex(_) => match &self.regex {
                Some(re) => std::str::from_utf8(s).is_ok_and(|s| re.is_match(s)),
                None => false, // compile() always sets it for SafeRegex
            },
        }
    }
}

fn eq(a: &[u8], b: &[u8], ignore_case: bool) -> bool {
    if ignore_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// Who a policy applies to (Envoy `config.rbac.v3.Principal`, the L4 subset).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    Any,
    /// A TLS peer with a verified certificate; `principal_name` (when set)
    /// must match one of its URI SANs, or its subject when it has none.
    Authenticated {
        principal_name: Option<StringMatch>,
    },
    AndIds(Vec<Principal>),
    OrIds(Vec<Principal>),
    NotId(Box<Principal>),
}

impl Principal {
    /// `authenticated { principal_name: { safe_regex: re } }`, Consul's form.
    pub fn spiffe_regex(re: impl Into<String>) -> Principal {
        Principal::Authenticated {
            principal_name: Some(StringMatch::regex(re)),
        }
    }
}

/// One named RBAC policy: it applies to a peer one of whose principals
/// matches and (in an HTTP RBAC filter) to a request one of whose
/// permissions matches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RbacPolicy {
    pub name: String,
    pub principals: Vec<Principal>,
    /// Empty = `any` (always so in a network filter, where there is no
    /// request); see [`crate::l7::RbacPermission`].
    pub permissions: Vec<crate::l7::RbacPermission>,
}

/// One network RBAC filter: an action and its policies (`rules: {}` is
/// `RbacRules { action: Allow, policies: vec![] }`, which denies all).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RbacRules {
    pub action: Action,
    pub policies: Vec<RbacPolicy>,
}

/// Why RBAC rules or a matcher cannot be compiled; `classify()` gives a
/// metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    #[error("safe_regex {regex:?} does not compile: {msg}")]
    BadRegex { regex: String, msg: String },
    #[error("RBAC filter #{filter} policy {policy:?}: {source}")]
    Policy {
        filter: usize,
        policy: String,
        #[source]
        source: Box<AuthzError>,
    },
    /// An L7 permission of this intention cannot be compiled.
    #[error("intention {intention}: {source}")]
    Intention {
        intention: String,
        #[source]
        source: Box<AuthzError>,
    },
}

impl AuthzError {
    pub fn classify(&self) -> &'static str {
        match self {
            AuthzError::BadRegex { .. } => "bad_regex",
            AuthzError::Policy { source, .. } | AuthzError::Intention { source, .. } => {
                source.classify()
            }
        }
    }
}

/// The names a peer certificate gives, for matching principals and
/// intentions.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Every URI SAN of the verified leaf (a mesh leaf has one SPIFFE ID).
    pub uris: Vec<String>,
    /// The leaf's subject (RFC 4514 string), matched when it has no URI SAN.
    pub subject: String,
    /// The Consul service identity, when the leaf's one URI SAN parses as one.
    pub id: Option<ServiceId>,
}

impl Peer {
    /// A peer whose certificate carries exactly this Consul identity.
    pub fn from_id(id: ServiceId) -> Peer {
        Peer {
            uris: vec![id.to_string()],
            subject: String::new(),
            id: Some(id),
        }
    }

    /// For logs: the SPIFFE ID, else the first URI SAN, else the subject
    /// (as `Display` writes it).
    pub fn display_name(&self) -> String {
        self.to_string()
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.id, self.uris.first()) {
            (Some(id), _) => write!(f, "{id}"),
            (None, Some(u)) => f.write_str(u),
            (None, None) => f.write_str(&self.subject),
        }
    }
}

#[derive(Clone, Debug)]
enum CPrincipal {
    Any,
    Authenticated(Option<Matcher>),
    And(Vec<CPrincipal>),
    Or(Vec<CPrincipal>),
    Not(Box<CPrincipal>),
}

impl CPrincipal {
    fn compile(p: &Principal) -> Result<CPrincipal, AuthzError> {
        Ok(match p {
            Principal::Any => CPrincipal::Any,
            Principal::Authenticated { principal_name } => {
                CPrincipal::Authenticated(principal_name.as_ref().map(|m| m.compile()).transpose()?)
            }
            Principal::AndIds(ids) => CPrincipal::And(
                ids.iter()
                    .map(CPrincipal::compile)
                    .collect::<Result<_, _>>()?,
            ),
            Principal::OrIds(ids) => CPrincipal::Or(
                ids.iter()
                    .map(CPrincipal::compile)
                    .collect::<Result<_, _>>()?,
            ),
            Principal::NotId(p) => CPrincipal::Not(Box::new(CPrincipal::compile(p)?)),
        })
    }

    fn matches(&self, peer: &Peer) -> bool {
        match self {
            CPrincipal::Any => true,
            CPrincipal::Authenticated(None) => true,
            CPrincipal::Authenticated(Some(m)) => {
                if peer.uris.is_empty() {
                    m.matches(&peer.subject)
                } else {
                    peer.uris.iter().any(|u| m.matches(u))
                }
            }
            CPrincipal::And(ids) => ids.iter().all(|p| p.matches(peer)),
            CPrincipal::Or(ids) => ids.iter().any(|p| p.matches(peer)),
            CPrincipal::Not(p) => !p.matches(peer),
        }
    }
}

#[derive(Clone, Debug)]
struct CRules {
    action: Action,
    policies: Vec<(String, Vec<CPrincipal>)>,
}

/// Compiled RBAC filters, evaluated per connection.
#[derive(Clone, Debug)]
pub struct Rbac {
    spec: Vec<RbacRules>,
    filters: Vec<CRules>,
}

impl Rbac {
    /// Compiles the filters (every regex once). A control-plane source calls
    /// this to refuse (NACK) rules veer cannot compile.
    pub fn compile(rules: &[RbacRules]) -> Result<Rbac, AuthzError> {
        let mut filters = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let mut policies = Vec::with_capacity(r.policies.len());
            for p in &r.policies {
                let principals = p
                    .principals
                    .iter()
                    .map(CPrincipal::compile)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| AuthzError::Policy {
                        filter: i,
                        policy: p.name.clone(),
                        source: Box::new(e),
                    })?;
                policies.push((p.name.clone(), principals));
            }
            filters.push(CRules {
                action: r.action,
                policies,
            });
        }
        Ok(Rbac {
            spec: rules.to_vec(),
            filters,
        })
    }

    /// The plain-data filters it was compiled from.
    pub fn rules(&self) -> &[RbacRules] {
        &self.spec
    }

    /// Whether one of the principals of policy `policy` of filter `filter`
    /// matches `peer` (the HTTP RBAC filter checks its permissions besides).
    pub fn principal_matches(&self, filter: usize, policy: usize, peer: &Peer) -> bool {
        self.filters[filter].policies[policy]
            .1
            .iter()
            .any(|p| p.matches(peer))
    }

    pub fn evaluate(&self, peer: &Peer) -> RbacDecision {
        let mut allowed_by = None;
        for (i, f) in self.filters.iter().enumerate() {
            let hit = f
                .policies
                .iter()
                .position(|(_, ps)| ps.iter().any(|p| p.matches(peer)));
            match (f.action, hit) {
                (Action::Allow, Some(j)) => {
                    allowed_by.get_or_insert((i, j));
                }
                (Action::Allow, None) => return RbacDecision::NoPolicyMatched { filter: i },
                (Action::Deny, Some(j)) => {
                    return RbacDecision::DeniedByPolicy {
                        filter: i,
                        policy: j,
                    }
                }
                (Action::Deny, None) => {}
            }
        }
        match allowed_by {
            Some((filter, policy)) => RbacDecision::AllowedByPolicy { filter, policy },
            None => RbacDecision::NothingDenied,
        }
    }

    pub fn explain(&self, d: &RbacDecision) -> String {
        let name = |f: usize, p: usize| self.filters[f].policies[p].0.as_str();
        match *d {
            RbacDecision::AllowedByPolicy { filter, policy } => format!(
                "RBAC filter #{filter} (ALLOW) policy {:?} matched",
                name(filter, policy)
            ),
            RbacDecision::NothingDenied if self.filters.is_empty() => {
                "no RBAC filter; all allowed".to_string()
            }
            RbacDecision::NothingDenied => "no DENY policy matched".to_string(),
            RbacDecision::DeniedByPolicy { filter, policy } => format!(
                "RBAC filter #{filter} (DENY) policy {:?} matched",
                name(filter, policy)
            ),
            RbacDecision::NoPolicyMatched { filter } => format!(
                "RBAC filter #{filter} (ALLOW) has no policy that matches ({} policies)",
                self.filters[filter].policies.len()
            ),
        }
    }
}

/// The outcome of RBAC for one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RbacDecision {
    /// Every filter allowed; this ALLOW filter's policy matched first.
    AllowedByPolicy { filter: usize, policy: usize },
    /// Every filter allowed and none was an ALLOW filter (only DENY filters,
    /// none matched, or no filter at all).
    NothingDenied,
    /// A DENY filter's policy matched.
    DeniedByPolicy { filter: usize, policy: usize },
    /// An ALLOW filter had no matching policy.
    NoPolicyMatched { filter: usize },
}

/// Inbound authorization of one snapshot, whatever its source.
#[derive(Clone, Debug)]
pub enum Authz {
    /// Consul intentions and the default action.
    Intentions(Intentions),
    /// Envoy network RBAC filters (all must allow).
    Rbac(Rbac),
}

/// The outcome of [`Authz::evaluate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthzDecision {
    Intentions(Decision),
    /// Intentions apply but the peer has no Consul service identity.
    NoIdentity,
    Rbac(RbacDecision),
}

impl AuthzDecision {
    pub fn allowed(&self) -> bool {
        match self {
            AuthzDecision::Intentions(d) => d.allowed(),
            AuthzDecision::NoIdentity => false,
            AuthzDecision::Rbac(d) => matches!(
                d,
                RbacDecision::AllowedByPolicy { .. } | RbacDecision::NothingDenied
            ),
        }
    }

    /// Metric label: `allowed`, `denied_by_intention`, `denied_by_default`
    /// (intentions), `denied_no_identity` (intentions and a peer without a
    /// Consul identity), `denied_by_policy` (an RBAC DENY policy matched),
    /// `denied_no_policy` (no policy of an RBAC ALLOW filter matched).
    pub fn classify(&self) -> &'static str {
        match self {
            AuthzDecision::Intentions(d) => d.classify(),
            AuthzDecision::NoIdentity => "denied_no_identity",
            AuthzDecision::Rbac(RbacDecision::DeniedByPolicy { .. }) => "denied_by_policy",
            AuthzDecision::Rbac(RbacDecision::NoPolicyMatched { .. }) => "denied_no_policy",
            AuthzDecision::Rbac(_) => "allowed",
        }
    }
}

impl Authz {
    /// Builds the authorization from a spec's parts: RBAC filters when
    /// given, else the intentions.
    pub fn new(rbac: Option<&[RbacRules]>, intentions: &Intentions) -> Result<Authz, AuthzError> {
        match rbac {
            Some(r) => Ok(Authz::Rbac(Rbac::compile(r)?)),
            None => Ok(Authz::Intentions(intentions.clone())),
        }
    }

    /// True when intentions (Consul identities in our trust domain) decide.
    pub fn uses_intentions(&self) -> bool {
        matches!(self, Authz::Intentions(_))
    }

    pub fn evaluate(&self, peer: &Peer) -> AuthzDecision {
        match self {
            Authz::Intentions(ixns) => match &peer.id {
                Some(id) => AuthzDecision::Intentions(ixns.evaluate(id)),
                None => AuthzDecision::NoIdentity,
            },
            Authz::Rbac(r) => AuthzDecision::Rbac(r.evaluate(peer)),
        }
    }

    /// A human-readable reason for logs.
    pub fn explain(&self, d: &AuthzDecision) -> String {
        match (self, d) {
            (Authz::Intentions(i), AuthzDecision::Intentions(d)) => i.explain(d),
            (Authz::Rbac(r), AuthzDecision::Rbac(d)) => r.explain(d),
            (_, AuthzDecision::NoIdentity) => {
                "the peer certificate carries no Consul service identity".to_string()
            }
            _ => "decision from another authorization".to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
