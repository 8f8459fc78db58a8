//! A development CA that issues certificates shaped like Consul's built-in
//! CA: an ECDSA P-256 root with the URI SAN `spiffe://<trust-domain>`, and
//! ECDSA P-256 leaves with one SPIFFE URI SAN, client and server usages,
//! NotBefore one minute in the past and a 72 h lifetime by default.
//!
//! Used by `veer demo` (the embedded default) and by the tests, which also
//! need deliberately wrong certificates (expired, wrong usage, odd SANs).
#![deny(unsafe_code)]
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::time::Duration;
use time::OffsetDateTime;

pub use rcgen::Error;

/// Consul's SPIFFE ID of a service in the default partition.
pub fn service_uri(trust_domain: &str, namespace: &str, datacenter: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/dc/{datacenter}/svc/{service}")
}

/// A CA (root or intermediate) that can sign leaves.
pub struct Ca {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate, PEM.
    pub cert_pem: String,
    /// PEM of the certificates between a leaf signed here and the root
    /// (empty for a root), sent along with leaves.
    pub chain_pem: String,
}

/// What to put in a leaf.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub uris: Vec<String>,
    pub common_name: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub client_auth: bool,
    pub server_auth: bool,
}

impl LeafSpec {
    /// A Consul-style leaf for a service: 72 h, both usages.
    pub fn service(trust_domain: &str, datacenter: &str, service: &str) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            uris: vec![service_uri(trust_domain, "default", datacenter, service)],
            common_name: service.to_string(),
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(72 * 3600),
            client_auth: true,
            server_auth: true,
        }
    }

    /// Lifetime relative to now: valid from `from` to `to` (negative = past).
    pub fn valid_between(mut self, from_secs: i64, to_secs: i64) -> LeafSpec {
        let now = OffsetDateTime::now_utc();
        self.not_before = now + time::Duration::seconds(from_secs);
        self.not_after = now + time::Duration::seconds(to_secs);
        self
    }
}

/// An issued leaf.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// Leaf followed by any intermediates, PEM.
    pub chain_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
    pub der: Vec<u8>,
}

fn ca_params(trust_domain: &str, cn: &str, days: u32) -> Result<CertificateParams, Error> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + Duration::from_secs(u64::from(days) * 86400);
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

impl Ca {
    /// A new self-signed root for `trust_domain` (e.g. `<uuid>.consul`).
    pub fn new_root(trust_domain: &str) -> Result<Ca, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(trust_domain, "Consul CA 1", 3650)?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            chain_pem: String::new(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An intermediate CA signed by this one (like a secondary datacenter's).
    pub fn intermediate(&self, cn: &str) -> Result<Ca, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = ca_params(&self.trust_domain, cn, 365)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Ca {
            trust_domain: self.trust_domain.clone(),
            cert_pem: cert.pem(),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a leaf.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Leaf, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        p.distinguished_name = dn;
        p.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| Ok(SanType::URI(u.as_str().try_into()?)))
            .collect::<Result<_, Error>>()?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        let mut eku = Vec::new();
        if spec.server_auth {
            eku.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client_auth {
            eku.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if eku.is_empty() {
            eku.push(ExtendedKeyUsagePurpose::CodeSigning);
        }
        p.extended_key_usages = eku;
        p.not_before = spec.not_before;
        p.not_after = spec.not_after;
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// A service leaf with Consul's defaults.
    pub fn service_leaf(&self, datacenter: &str, service: &str) -> Result<Leaf, Error> {
        self.issue(&LeafSpec::service(&self.trust_domain, datacenter, service))
    }
}
