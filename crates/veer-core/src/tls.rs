//! TLS material for the mesh: rustls configurations for both directions,
//! PEM loading, peer-identity extraction and error classification.
//!
//! Inbound (server side) requires a client certificate that chains to one of
//! the roots and carries the client-auth usage (webpki). Outbound (client
//! side) verifies, inside the handshake, the server chain against the
//! upstream's roots with the server-auth usage (no DNS name: a Consul leaf
//! has only a SPIFFE URI SAN) and the leaf's URI SAN against the upstream's
//! expected SANs ([`upstream_client_config`]); a mismatch fails the
//! handshake before veer sends its own certificate.
use crate::authz::Matcher;
use crate::spiffe::{ServiceId, SpiffeError};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use std::path::Path;
use std::sync::Arc;

/// Why TLS material could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate in it")]
    NoCertificate(String),
    #[error("{0}: no PEM private key in it (PKCS#8, SEC1 EC or PKCS#1 RSA)")]
    NoKey(String),
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
}

/// Why a certificate does not give a usable peer identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("certificate has no URI SAN")]
    NoUriSan,
    #[error("certificate has {0} URI SANs; exactly one SPIFFE ID is expected")]
    MultipleUriSans(usize),
    #[error("{0}")]
    Spiffe(#[from] SpiffeError),
    #[error("trust domain {got:?} is not ours ({want:?})")]
    WrongTrustDomain { got: String, want: String },
}

impl IdentityError {
    /// Metric label.
    pub fn classify(&self) -> &'static str {
        match self {
            IdentityError::BadCertificate(_) => "bad_certificate",
            IdentityError::NoUriSan => "no_uri_san",
            IdentityError::MultipleUriSans(_) => "multiple_uri_sans",
            IdentityError::Spiffe(e) => e.classify(),
            IdentityError::WrongTrustDomain { .. } => "wrong_trust_domain",
        }
    }
}

/// Reads all PEM certificates from a file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_certs(&data, &path.display().to_string())
}

/// Parses all PEM certificates in `data`; `what` names the source in errors.
pub fn parse_certs(data: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(data)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what: what.to_string(),
            msg: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.to_string()));
    }
    Ok(certs)
}

/// Reads one PEM private key from a file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_key(&data, &path.display().to_string())
}

/// Parses one PEM private key.
pub fn parse_key(data: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(data).map_err(|_| TlsError::NoKey(what.to_string()))
}

/// The first URI SAN of a DER certificate, parsed as a service identity.
/// Exactly one URI SAN is accepted.
pub fn peer_identity(cert: &[u8]) -> Result<ServiceId, IdentityError> {
    let uris = uri_sans(cert)?;
    match uris.len() {
        0 => Err(IdentityError::NoUriSan),
        1 => Ok(ServiceId::parse(&uris[0])?),
        n => Err(IdentityError::MultipleUriSans(n)),
    }
}

/// The names of a verified peer leaf, for RBAC: every URI SAN, the subject,
/// and the Consul identity when its one URI SAN parses as one in
/// `trust_domain` (else `None`, so that intentions never decide on an
/// identity from another trust domain).
pub fn peer(cert: &[u8], trust_domain: &str) -> Result<crate::authz::Peer, IdentityError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let uris = uri_sans(cert)?;
    let id = match uris.as_slice() {
        [one] => ServiceId::parse(one)
            .ok()
            .filter(|id| id.trust_domain == trust_domain),
        _ => None,
    };
    Ok(crate::authz::Peer {
        uris,
        subject: x.subject().to_string(),
        id,
    })
}

/// All URI SANs of a DER certificate.
pub fn uri_sans(cert: &[u8]) -> Result<Vec<String>, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Facts about a certificate, for logs and `/config_dump` (never key material).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    pub subject: String,
    pub uri_sans: Vec<String>,
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn parse(cert: &[u8]) -> Result<CertInfo, IdentityError> {
        let (_, x) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
        Ok(CertInfo {
            subject: x.subject().to_string(),
            uri_sans: uri_sans(cert)?,
            serial: x.raw_serial_as_string(),
            not_before: x.validity().not_before.timestamp(),
            not_after: x.validity().not_after.timestamp(),
            is_ca: x.is_ca(),
        })
    }
}

/// The crypto provider of every TLS configuration veer makes (mesh,
/// Consul's HTTPS API, certificate checks): aws-lc-rs, picked by
/// measurement over ring (benches/crypto: X25519 1.8x, a resumed mTLS
/// handshake pair 1.3x and AES-128-GCM on 16 KiB records 1.15x cheaper on
/// this CPU).
///
/// - Suites: AES-128-GCM first. rustls prefers AES-256-GCM; Envoy
///   (BoringSSL) and Consul's defaults prefer AES-128-GCM, which is as
///   sound for mesh traffic and about a third cheaper per byte with AES-NI
///   (10 rounds instead of 14). As a server veer follows the client's order.
/// - Key exchange: X25519, then P-256 and P-384, as with ring before.
///   aws-lc-rs's own default offers X25519MLKEM768 first (and P-384 before
///   X25519): the hybrid's key share costs 3.3x an X25519 one and adds
///   about 1.1 KiB to each hello, on every new connection, resumed ones
///   included; not offered.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::kx_group;
    use rustls::CipherSuite as C;
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    let rank = |s: C| match s {
        C::TLS13_AES_128_GCM_SHA256 => 0,
        C::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        C::TLS13_AES_256_GCM_SHA384 => 2,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 3,
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => 4,
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 5,
        _ => 6,
    };
    p.cipher_suites.sort_by_key(|s| rank(s.suite()));
    p.kx_groups = vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
    Arc::new(p)
}

/// Builds a root store from PEM roots (all of them are trusted, as during a
/// Consul CA rotation).
pub fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for (i, r) in roots.iter().enumerate() {
        store.add(r.clone()).map_err(|e| TlsError::Invalid {
            what: format!("root certificate #{}", i + 1),
            msg: e.to_string(),
        })?;
    }
    Ok(store)
}

/// The inbound listener's TLS configuration: our leaf, client certificate
/// required and verified against `roots`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider.clone())
            .build()
            .map_err(|e| TlsError::Invalid {
                what: "client verifier".into(),
                msg: e.to_string(),
            })?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "server config".into(),
            msg: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid {
            what: "leaf certificate and key".into(),
            msg: e.to_string(),
        })?;
    cfg.max_fragment_size = None;
    // New connections resume (no certificates, no signatures), as Envoy's
    // do. TLS 1.3 tickets are single-use, so connections that start
    // together each need one: four per connection keep the client's store
    // (rustls keeps up to 8 per upstream) stocked for bursts (16 parallel
    // new connections in benches/run.sh: 20 % full handshakes with one
    // ticket, 8-13 % with four). Stateless tickets: the server keeps no session cache (which
    // held 256 sessions for all clients together), and a new snapshot
    // (new roots or leaf) brings a new ticket key, so no connection
    // resumes past a CA change.
    cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| TlsError::Invalid {
        what: "session ticket key".into(),
        msg: e.to_string(),
    })?;
    cfg.send_tls13_tickets = 4;
    Ok(Arc::new(cfg))
}

/// The base outbound TLS configuration: our leaf as client certificate,
/// server chains verified against `roots`, and the session store. Every
/// upstream's configuration is a clone of it with its own server check
/// ([`upstream_client_config`]); connections use those, never the base.
pub fn client_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: &[CertificateDer<'static>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = crypto_provider();
    let verifier = Arc::new(MeshServerVerifier {
        roots: Arc::new(root_store(roots)?),
        algs: provider.signature_verification_algorithms,
    });
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            what: "client config".into(),
            msg: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| TlsError::Invalid {
            what: "leaf certificate and key".into(),
            msg: e.to_string(),
        })?;
    let mut cfg = cfg;
    cfg.resumption = rustls::client::Resumption::store(Arc::new(SessionStore::default()));
    Ok(Arc::new(cfg))
}

/// TLS 1.3 tickets kept per upstream server name: enough for a burst of
/// new connections to one upstream (TLS 1.3 tickets are single-use, and a
/// connection that finds none makes a full handshake; rustls's own store
/// keeps 8). Each connection brings back four ([`server_config`]), so the
/// store refills after a burst.
pub const TICKETS_PER_UPSTREAM: usize = 16;
/// Upstream server names with sessions kept (the oldest is forgotten
/// first); rustls's own store keeps 32.
pub const SESSION_UPSTREAMS: usize = 64;

/// The outbound session store, shared by every upstream configuration of a
/// snapshot's leaf ([`upstream_client_config`]): per server name (the
/// upstream's SNI) up to [`TICKETS_PER_UPSTREAM`] TLS 1.3 tickets, one
/// TLS 1.2 session and the key-exchange group the server chose, for up to
/// [`SESSION_UPSTREAMS`] names. A ticket is about 0.7 KiB (it carries our
/// certificate, sealed by the server), so the store holds at most about
/// 0.7 MiB. rustls resumes a stored session only with the verifier that
/// checked it (and a new leaf or new roots make a new store), so sharing
/// one store never skips an identity check.
#[derive(Debug, Default)]
pub struct SessionStore {
    inner: std::sync::Mutex<Sessions>,
}

#[derive(Debug, Default)]
struct Sessions {
    by_name: std::collections::HashMap<ServerName<'static>, Upstream>,
    /// Names in the order they were added, for eviction.
    order: std::collections::VecDeque<ServerName<'static>>,
}

#[derive(Debug, Default)]
struct Upstream {
    kx_hint: Option<rustls::NamedGroup>,
    tls12: Option<rustls::client::Tls12ClientSessionValue>,
    tls13: std::collections::VecDeque<rustls::client::Tls13ClientSessionValue>,
}

impl Sessions {
    fn entry(&mut self, name: ServerName<'static>) -> &mut Upstream {
        if !self.by_name.contains_key(&name) {
            if self.by_name.len() >= SESSION_UPSTREAMS {
                if let Some(old) = self.order.pop_front() {
                    self.by_name.remove(&old);
                }
            }
            self.order.push_back(name.clone());
        }
        self.by_name.entry(name).or_default()
    }
}

impl SessionStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl rustls::client::ClientSessionStore for SessionStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.lock().entry(name).kx_hint = Some(group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.lock().by_name.get(name).and_then(|u| u.kx_hint)
    }

    fn set_tls12_session(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.lock().entry(name).tls12 = Some(value);
    }

    fn tls12_session(
        &self,
        name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.lock().by_name.get(name).and_then(|u| u.tls12.clone())
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        if let Some(u) = self.lock().by_name.get_mut(name) {
            u.tls12 = None;
        }
    }

    fn insert_tls13_ticket(
        &self,
        name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        let mut s = self.lock();
        let u = s.entry(name);
        if u.tls13.len() >= TICKETS_PER_UPSTREAM {
            u.tls13.pop_front();
        }
        u.tls13.push_back(value);
    }

    fn take_tls13_ticket(
        &self,
        name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        // Newest first: the oldest are the likeliest to have expired.
        self.lock().by_name.get_mut(name)?.tls13.pop_back()
    }
}

/// Verifies a server chain against the mesh roots with the server-auth usage,
/// without a DNS-name check (mesh leaves carry only a SPIFFE URI SAN).
#[derive(Debug)]
struct MeshServerVerifier {
    roots: Arc<RootCertStore>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A per-upstream client configuration: a clone of `base` (same leaf and
/// key, same session store, so tickets are shared and nothing is parsed
/// again) whose server check verifies the chain against `roots` and then
/// requires a URI SAN of the leaf to match one of `sans`.
pub fn upstream_client_config(
    base: &ClientConfig,
    roots: Arc<RootCertStore>,
    sans: Arc<[Matcher]>,
) -> Arc<ClientConfig> {
    let mut cfg = base.clone();
    let algs = base.crypto_provider().signature_verification_algorithms;
    cfg.dangerous()
        .set_certificate_verifier(Arc::new(UpstreamVerifier {
            chain: MeshServerVerifier { roots, algs },
            sans,
        }));
    Arc::new(cfg)
}

/// The server's leaf carries no URI SAN the upstream expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMismatch {
    /// The leaf's URI SANs (or why they could not be read).
    pub got: Vec<String>,
    /// The expected matchers, for logs.
    pub want: Vec<String>,
}

impl std::fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let got = match self.got.as_slice() {
            [] => "no URI SAN".to_string(),
            [one] => one.clone(),
            many => many.join(", "),
        };
        write!(
            f,
            "server certificate is for {got}, expected {}",
            self.want.join(" or ")
        )
    }
}

impl std::error::Error for SanMismatch {}

/// Checks that a URI SAN of the server leaf `cert` matches one of `sans`.
pub fn check_server_sans(cert: &[u8], sans: &[Matcher]) -> Result<(), SanMismatch> {
    let want = || sans.iter().map(|m| m.spec().to_string()).collect();
    let got = uri_sans(cert).map_err(|e| SanMismatch {
        got: vec![e.to_string()],
        want: want(),
    })?;
    if got.iter().any(|u| sans.iter().any(|m| m.matches(u))) {
        Ok(())
    } else {
        Err(SanMismatch { got, want: want() })
    }
}

/// The chain check of [`MeshServerVerifier`], then the upstream's SANs.
#[derive(Debug)]
struct UpstreamVerifier {
    chain: MeshServerVerifier,
    sans: Arc<[Matcher]>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_server_sans(end_entity, &self.sans).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A bounded metric label for a TLS handshake failure.
pub fn classify_tls_error(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => "no_client_cert",
        E::InvalidCertificate(CertificateError::Other(o))
            if o.0.downcast_ref::<SanMismatch>().is_some() =>
        {
            "server_identity"
        }
        E::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "cert_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "cert_not_yet_valid"
            }
            // Another CA (a foreign Consul cluster's root is also called
            // "Consul CA 1", so webpki finds our root by name and the
            // signature does not verify): not signed by a trusted root.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "cert_untrusted",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "cert_bad_usage"
            }
            CertificateError::Revoked => "cert_revoked",
            CertificateError::BadEncoding => "cert_bad_encoding",
            _ => "cert_invalid",
        },
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => "not_tls",
        E::PeerIncompatible(_) => "incompatible",
        E::PeerMisbehaved(_) => "peer_misbehaved",
        E::AlertReceived(_) => "alert_received",
        E::DecryptError => "decrypt_error",
        _ => "tls_other",
    }
}

/// Finds a rustls error inside an IO error (as tokio-rustls reports them).
pub fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

#[cfg(test)]
mod tests;

/// What makes two upstreams' TLS client configurations the same: their own
/// roots (`None` = the snapshot's; shared by every upstream with the same
/// set) and expected SANs.
pub type UpstreamTlsKey = (
    Option<Arc<Vec<CertificateDer<'static>>>>,
    Vec<crate::authz::StringMatch>,
);

/// The per-upstream client configurations, each made the first time a
/// connection to that upstream needs it (memory follows the upstreams in
/// use, not the mesh), and kept by the next snapshot with the same leaf,
/// key and roots: rustls resumes a session only with the very verifier
/// that checked it, so keeping them keeps the session tickets.
#[derive(Debug)]
pub struct UpstreamConfigs {
    base: Arc<ClientConfig>,
    built: std::sync::Mutex<std::collections::HashMap<UpstreamTlsKey, Arc<ClientConfig>>>,
}

impl UpstreamConfigs {
    pub fn new(base: Arc<ClientConfig>) -> UpstreamConfigs {
        UpstreamConfigs {
            base,
            built: Default::default(),
        }
    }

    /// How many configurations have been made (upstreams dialled).
    pub fn len(&self) -> usize {
        self.built.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(
        &self,
        key: &UpstreamTlsKey,
        roots: &Arc<RootCertStore>,
        sans: &Arc<[Matcher]>,
    ) -> Arc<ClientConfig> {
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        built
            .entry(key.clone())
            .or_insert_with(|| upstream_client_config(&self.base, roots.clone(), sans.clone()))
            .clone()
    }
}

/// One upstream's TLS client configuration, made on first use.
#[derive(Debug)]
pub struct LazyClientConfig {
    /// The upstream's own roots (`None` = the snapshot's): with `sans`,
    /// the [`UpstreamTlsKey`], made when the configuration is first needed
    /// rather than kept per upstream.
    roots_key: Option<Arc<Vec<CertificateDer<'static>>>>,
    roots: Arc<RootCertStore>,
    sans: Arc<[Matcher]>,
    configs: Arc<UpstreamConfigs>,
    cell: std::sync::OnceLock<Arc<ClientConfig>>,
}

impl LazyClientConfig {
    pub fn new(
        roots_key: Option<Arc<Vec<CertificateDer<'static>>>>,
        roots: Arc<RootCertStore>,
        sans: Arc<[Matcher]>,
        configs: Arc<UpstreamConfigs>,
    ) -> LazyClientConfig {
        LazyClientConfig {
            roots_key,
            roots,
            sans,
            configs,
            cell: std::sync::OnceLock::new(),
        }
    }

    /// The upstream's own roots; `None` = the snapshot's.
    pub fn roots_key(&self) -> Option<&Arc<Vec<CertificateDer<'static>>>> {
        self.roots_key.as_ref()
    }

    /// The configuration: the snapshot's leaf, this upstream's roots, and a
    /// server certificate check that requires its SANs inside the handshake.
    pub fn get(&self) -> Arc<ClientConfig> {
        self.cell
            .get_or_init(|| {
                let key = (
                    self.roots_key.clone(),
                    self.sans.iter().map(|m| m.spec().clone()).collect(),
                );
                self.configs.get(&key, &self.roots, &self.sans)
            })
            .clone()
    }
}
