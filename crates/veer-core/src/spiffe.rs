//! Consul's SPIFFE service identities and the SNI names derived from them.
//!
//! A service identity is
//! `spiffe://<trust-domain>[/ap/<partition>]/ns/<namespace>/dc/<datacenter>/svc/<service>`.
//! Parsing is strict: lowercase `spiffe` scheme, a lowercase trust domain, no
//! percent-escapes, no empty segments, no trailing slash, no query, fragment,
//! user info or port. Anything else is refused with its own reason, so a
//! certificate with an odd URI SAN never maps to an identity by accident.
use std::fmt;

/// A Consul service identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    pub trust_domain: String,
    /// `default` when the ID has no `/ap/` segment.
    pub partition: String,
    pub namespace: String,
    pub datacenter: String,
    pub service: String,
}

/// Why a URI is not a Consul service identity. `classify()` gives a metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeError {
    /// The scheme is not exactly `spiffe` (wrong scheme, or not lowercase).
    #[error("URI scheme is not \"spiffe\": {0:?}")]
    BadScheme(String),
    /// The URI has user info, a port, a query or a fragment.
    #[error("SPIFFE ID has user info, port, query or fragment: {0:?}")]
    ExtraComponents(String),
    /// The trust domain is empty or has characters outside `[a-z0-9._-]`.
    #[error("SPIFFE trust domain is empty or not lowercase [a-z0-9._-]: {0:?}")]
    BadTrustDomain(String),
    /// A path segment holds a `%` escape.
    #[error("SPIFFE ID holds a percent-escape: {0:?}")]
    PercentEncoded(String),
    /// The path ends with `/` or has an empty segment.
    #[error("SPIFFE ID has an empty path segment or trailing slash: {0:?}")]
    EmptySegment(String),
    /// A segment has a character outside `[A-Za-z0-9._-]`.
    #[error("SPIFFE ID segment has a character outside [A-Za-z0-9._-]: {0:?}")]
    BadCharacter(String),
    /// A service identity written in a non-canonical form Consul never
    /// issues (an explicit `/ap/default` segment).
    #[error("SPIFFE ID is not in Consul's canonical form: {0:?}")]
    NonCanonical(String),
    /// Valid SPIFFE, but not a service identity (an agent, a gateway, the CA...).
    #[error("SPIFFE ID is not a Consul service identity: {0:?}")]
    NotAService(String),
}

impl SpiffeError {
    /// A short, bounded label for metrics.
    pub fn classify(&self) -> &'static str {
        match self {
            SpiffeError::BadScheme(_) => "bad_scheme",
            SpiffeError::ExtraComponents(_) => "extra_components",
            SpiffeError::BadTrustDomain(_) => "bad_trust_domain",
            SpiffeError::PercentEncoded(_) => "percent_encoded",
            SpiffeError::EmptySegment(_) => "empty_segment",
            SpiffeError::BadCharacter(_) => "bad_character",
            SpiffeError::NonCanonical(_) => "non_canonical",
            SpiffeError::NotAService(_) => "not_a_service",
        }
    }
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

impl ServiceId {
    pub fn new(
        trust_domain: &str,
        partition: &str,
        namespace: &str,
        datacenter: &str,
        service: &str,
    ) -> ServiceId {
        ServiceId {
            trust_domain: trust_domain.to_string(),
            partition: partition.to_string(),
            namespace: namespace.to_string(),
            datacenter: datacenter.to_string(),
            service: service.to_string(),
        }
    }

    /// Parses a URI SAN into a service identity.
    pub fn parse(uri: &str) -> Result<ServiceId, SpiffeError> {
        let err_uri = || uri.chars().take(256).collect::<String>();
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(SpiffeError::BadScheme(err_uri()));
        };
        if scheme != "spiffe" {
            return Err(SpiffeError::BadScheme(err_uri()));
        }
        if rest.contains(['?', '#', '@']) {
            return Err(SpiffeError::ExtraComponents(err_uri()));
        }
        if rest.contains('%') {
            return Err(SpiffeError::PercentEncoded(err_uri()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.contains(':') {
            return Err(SpiffeError::ExtraComponents(err_uri()));
        }
        if td.is_empty()
            || !td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
            })
        {
            return Err(SpiffeError::BadTrustDomain(err_uri()));
        }
        if path.is_empty() {
            // The CA's own (signing) identity.
            return Err(SpiffeError::NotAService(err_uri()));
        }
        let segs: Vec<&str> = path[1..].split('/').collect();
        if segs.iter().any(|s| s.is_empty()) {
            return Err(SpiffeError::EmptySegment(err_uri()));
        }
        if !segs.iter().all(|s| segment_ok(s)) {
            return Err(SpiffeError::BadCharacter(err_uri()));
        }
        let (partition, segs) = match segs.as_slice() {
            // Consul writes no `/ap/` segment for the default partition; an
            // explicit one would not match Envoy's RBAC principal either.
            ["ap", "default", ..] => return Err(SpiffeError::NonCanonical(err_uri())),
            ["ap", ap, rest @ ..] => (*ap, rest),
            rest => ("default", rest),
        };
        match segs {
            ["ns", ns, "dc", dc, "svc", svc] => Ok(ServiceId::new(td, partition, ns, dc, svc)),
            _ => Err(SpiffeError::NotAService(err_uri())),
        }
    }

    /// The SNI a client sends to reach this service:
    /// `<svc>.<ns>.<dc>.internal.<td>` or, in a non-default partition,
    /// `<svc>.<ns>.<ap>.<dc>.internal-v1.<td>`.
    pub fn sni(&self) -> String {
        if self.partition == "default" {
            format!(
                "{}.{}.{}.internal.{}",
                self.service, self.namespace, self.datacenter, self.trust_domain
            )
        } else {
            format!(
                "{}.{}.{}.{}.internal-v1.{}",
                self.service, self.namespace, self.partition, self.datacenter, self.trust_domain
            )
        }
    }

    /// Same service, ignoring the datacenter (intentions do not look at it).
    pub fn same_service(&self, other: &ServiceId) -> bool {
        self.service == other.service
            && self.namespace == other.namespace
            && self.partition == other.partition
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.trust_domain)?;
        if self.partition != "default" {
            write!(f, "/ap/{}", self.partition)?;
        }
        write!(
            f,
            "/ns/{}/dc/{}/svc/{}",
            self.namespace, self.datacenter, self.service
        )
    }
}

#[cfg(test)]
mod tests;
