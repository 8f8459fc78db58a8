//! The immutable configuration snapshot.
//!
//! A control-plane source (the TOML file today, the Consul agent next, xDS
//! later) fills a [`Spec`] — plain data — and [`Snapshot::build`] turns it
//! into what the listeners read per connection: rustls configurations (one
//! per upstream, with its identity check), the inbound authorization
//! (intentions or network RBAC), and the routing table. A snapshot is never
//! changed after it is built; the runtime swaps whole snapshots atomically.
use crate::authz::{Authz, AuthzError, Principal, RbacRules, StringMatch};
use crate::intentions::{Action, Intention, Intentions};
use crate::route::{Endpoint, Protocol, RouteTable, Upstream};
use crate::spiffe::ServiceId;
use crate::tls::{self, CertInfo, TlsError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Timeouts, with Envoy's and Consul's defaults, and the per-listener
/// connection limit (`[limits]`; kept here so that every control-plane
/// source gets its default from `Timeouts::default()`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Timeouts {
    /// Dialing an upstream, a dialed-directly instance or a passthrough
    /// destination (Consul: 5 s).
    pub connect: Duration,
    /// Dialing the local app (Consul: 5 s).
    pub local_connect: Duration,
    /// Completing an inbound or outbound TLS handshake.
    pub handshake: Duration,
    /// Closing a connection with no traffic either way (Envoy: 1 h).
    pub idle: Duration,
    /// Closing a half-closed connection with no traffic in the open direction.
    pub half_close: Duration,
    /// Connections open at once per listener (`[limits] max_connections`);
    /// past it, new connections are closed at once (linkerd: 100,000).
    pub max_connections: usize,
    /// veer <-> veer multiplexing (`[mux] enabled`, default on): outbound
    /// connections to a peer that negotiates it by ALPN ride as HTTP/2
    /// CONNECT streams over one pooled mTLS connection, and the inbound
    /// listener offers it. `VEER_MUX=0` in the environment turns it off in
    /// every mode (read by veer-proxy).
    pub mux: bool,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            local_connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(3600),
            half_close: Duration::from_secs(60),
            max_connections: 100_000,
            mux: true,
        }
    }
}

/// Where to listen. Binds are read at start; explicit upstream listeners
/// follow the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ListenSpec {
    pub inbound: SocketAddr,
    /// The transparent outbound listener(s): 127.0.0.1:15001 and [::1]:15001.
    pub outbound: Vec<SocketAddr>,
}

/// One upstream as a control-plane source describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub identity: ServiceId,
    pub protocol: Protocol,
    pub virtual_ips: Vec<IpAddr>,
    pub endpoints: Vec<SocketAddr>,
    pub dialed_directly: bool,
    pub instances: Vec<IpAddr>,
    pub local_bind: Option<SocketAddr>,
    pub connect_timeout: Option<Duration>,
    /// The SNI sent to its endpoints; `None` = `identity.sni()`.
    pub sni: Option<String>,
    /// What the server certificate's URI SAN must match (any of them);
    /// empty = exactly the SPIFFE ID of `identity`. Checked inside the TLS
    /// handshake, before veer sends its own certificate.
    pub san_matchers: Vec<StringMatch>,
    /// The CAs its servers must chain to; `None` = the spec's `roots`.
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// The port its virtual IPs match; `None` = any port. A destination is
    /// looked up by (ip, port) first, then by ip.
    pub destination_port: Option<u16>,
    /// Connections open at once to this upstream (Envoy circuit breaker
    /// `max_connections`); past it new ones are refused (`reason=overflow`).
    /// `None` = no limit beyond the listener's.
    pub max_connections: Option<u32>,
    /// Load-balancing weight of each endpoint, parallel to `endpoints`;
    /// empty = all 1. Each weight must be at least 1.
    pub endpoint_weights: Vec<u32>,
    /// The targets after this one (its own fields above are the primary
    /// target), in failover order: a new connection goes to the first
    /// target that has an endpoint (Consul's discovery-chain failover;
    /// endpoints are the healthy instances, so failover is taken when the
    /// primary has none and given back when it has one again). Empty for
    /// an upstream with one target.
    pub failover: Vec<TargetSpec>,
    /// L7 routing when `protocol` is http-like; `None` = L4 (an http-like
    /// upstream without routes is then proxied as TCP, as before L7).
    pub http: Option<crate::l7::HttpRoutes>,
}

/// One failover target of an upstream: a (service, subset, namespace,
/// datacenter) with its own endpoints, SNI, expected identity, roots and
/// connect timeout. The same fields as an [`UpstreamSpec`]'s primary target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// The identity its sidecars present (e.g. the same service in `dc2`).
    pub identity: ServiceId,
    /// Its healthy endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Parallel to `endpoints`; empty = all 1.
    pub endpoint_weights: Vec<u32>,
    /// `None` = `identity.sni()`.
    pub sni: Option<String>,
    /// Empty = exactly the SPIFFE ID of `identity`.
    pub san_matchers: Vec<StringMatch>,
    /// `None` = the spec's roots.
    pub roots: Option<Vec<CertificateDer<'static>>>,
    /// `None` = the spec's connect timeout.
    pub connect_timeout: Option<Duration>,
}

impl TargetSpec {
    pub fn new(identity: ServiceId) -> TargetSpec {
        TargetSpec {
            identity,
            endpoints: Vec::new(),
            endpoint_weights: Vec::new(),
            sni: None,
            san_matchers: Vec::new(),
            roots: None,
            connect_timeout: None,
        }
    }
}

impl UpstreamSpec {
    pub fn new(identity: ServiceId) -> UpstreamSpec {
        UpstreamSpec {
            identity,
            protocol: Protocol::Tcp,
            virtual_ips: Vec::new(),
            endpoints: Vec::new(),
            dialed_directly: false,
            instances: Vec::new(),
            local_bind: None,
            connect_timeout: None,
            sni: None,
            san_matchers: Vec::new(),
            roots: None,
            destination_port: None,
            max_connections: None,
            endpoint_weights: Vec::new(),
            failover: Vec::new(),
            http: None,
        }
    }

    /// Its primary target's fields as a [`TargetSpec`] (a copy).
    pub fn primary(&self) -> TargetSpec {
        TargetSpec {
            identity: self.identity.clone(),
            endpoints: self.endpoints.clone(),
            endpoint_weights: self.endpoint_weights.clone(),
            sni: self.sni.clone(),
            san_matchers: self.san_matchers.clone(),
            roots: self.roots.clone(),
            connect_timeout: self.connect_timeout,
        }
    }

    /// Sets its primary target's fields from `t`.
    pub fn set_primary(&mut self, t: TargetSpec) {
        self.identity = t.identity;
        self.endpoints = t.endpoints;
        self.endpoint_weights = t.endpoint_weights;
        self.sni = t.sni;
        self.san_matchers = t.san_matchers;
        self.roots = t.roots;
        self.connect_timeout = t.connect_timeout;
    }
}

/// One exposed path (Consul `Proxy.Expose.Paths[]`): a plain-HTTP listener
/// that forwards requests for exactly `path` to the local app on
/// `127.0.0.1:<local_path_port>`, so that probes (kubelet, Consul HTTP
/// checks) reach the app without mTLS. Other paths get 404.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposePath {
    /// Where the plain-HTTP listener binds (Consul: the proxy address and
    /// `ListenerPort`, e.g. `0.0.0.0:20300`).
    pub listener: SocketAddr,
    /// The exact path served (query strings are ignored when matching).
    pub path: String,
    /// The local app's port the request is forwarded to, on 127.0.0.1.
    pub local_path_port: u16,
    /// `Http` (HTTP/1.1); Consul also allows `http2`.
    pub protocol: Protocol,
}

impl ExposePath {
    /// An HTTP expose path.
    pub fn new(listener: SocketAddr, path: impl Into<String>, local_path_port: u16) -> ExposePath {
        ExposePath {
            listener,
            path: path.into(),
            local_path_port,
            protocol: Protocol::Http,
        }
    }
}

/// A setting a source gave that the snapshot does not apply: veer logs one
/// warning naming it when it first appears, counts it in
/// `veer_unapplied_settings_total{kind}` and lists it in `/config_dump`.
/// (Security-relevant settings veer cannot enforce are refused instead.)
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unapplied {
    /// The setting as its source names it, e.g. `service-defaults api:
    /// Protocol`, `Proxy.Config.envoy_tracing_json`, `inbound.bind`.
    pub setting: String,
    /// A bounded label for the metric: `unsupported` (not implemented yet)
    /// or `needs_restart` (applies when veer restarts).
    pub kind: &'static str,
    /// What veer does instead.
    pub detail: String,
}

impl Unapplied {
    /// A setting veer does not implement yet.
    pub fn unsupported(setting: impl Into<String>, detail: impl Into<String>) -> Unapplied {
        Unapplied {
            setting: setting.into(),
            kind: "unsupported",
            detail: detail.into(),
        }
    }
    /// A setting that takes effect only when veer restarts.
    pub fn needs_restart(setting: impl Into<String>, detail: impl Into<String>) -> Unapplied {
        Unapplied {
            setting: setting.into(),
            kind: "needs_restart",
            detail: detail.into(),
        }
    }
}

/// Everything a snapshot is built from; plain data.
#[derive(Debug)]
pub struct Spec {
    pub identity: ServiceId,
    pub roots: Vec<CertificateDer<'static>>,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub local_app: SocketAddr,
    pub intentions: Vec<Intention>,
    pub default_action: Action,
    pub upstreams: Vec<Arc<UpstreamSpec>>,
    pub mesh_destinations_only: bool,
    pub listen: ListenSpec,
    pub timeouts: Timeouts,
    /// Where this spec came from, for `/config_dump` and logs.
    pub source: String,
    /// Plain-HTTP expose paths (probe overwrite); empty when none.
    pub expose: Vec<ExposePath>,
    /// Envoy network RBAC filters that decide inbound connections instead
    /// of `intentions`/`default_action`: `None` = intentions decide;
    /// `Some(vec![])` = no RBAC filter, all allowed; each filter must allow.
    pub rbac: Option<Vec<RbacRules>>,
    /// Inbound connections whose original destination port is one of these
    /// are relayed as plain TCP to the local app (Consul's permissive mTLS);
    /// empty = all inbound connections need mTLS.
    pub permissive_ports: Vec<u16>,
    /// Connections the inbound listener holds open at once (Envoy
    /// `connection_limit`); `None` = `timeouts.max_connections`.
    pub inbound_max_connections: Option<u32>,
    /// Settings the source gave that veer does not apply (named, not dropped).
    pub unapplied: Vec<Unapplied>,
    /// The inbound listener at L7 (the local service is http-like);
    /// `None` = L4 relay to the local app.
    pub inbound_http: Option<crate::l7::InboundHttp>,
}

impl Clone for Spec {
    fn clone(&self) -> Spec {
        Spec {
            identity: self.identity.clone(),
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            local_app: self.local_app,
            intentions: self.intentions.clone(),
            default_action: self.default_action,
            upstreams: self.upstreams.clone(),
            mesh_destinations_only: self.mesh_destinations_only,
            listen: self.listen.clone(),
            timeouts: self.timeouts.clone(),
            source: self.source.clone(),
            expose: self.expose.clone(),
            rbac: self.rbac.clone(),
            permissive_ports: self.permissive_ports.clone(),
            inbound_max_connections: self.inbound_max_connections,
            unapplied: self.unapplied.clone(),
            inbound_http: self.inbound_http.clone(),
        }
    }
}

/// Why a spec cannot become a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the leaf certificate is for {got}, but this sidecar is {want}")]
    LeafIdentity { got: String, want: String },
    #[error("the leaf certificate does not chain to any of the roots: {0}")]
    LeafUntrusted(String),
    #[error("the leaf certificate expired at {at}; it must be renewed")]
    LeafExpired { at: String },
    #[error("the leaf certificate is not valid before {from} (is the clock right?)")]
    LeafNotYetValid { from: String },
    #[error("the leaf certificate is a CA certificate (CA:TRUE, e.g. self-signed), not a service certificate issued by one of the roots")]
    LeafIsCa,
    #[error("no roots")]
    NoRoots,
    #[error(
        "virtual IP {ip}{} is claimed by both {first} and {second}",
        port.map(|p| format!(" port {p}")).unwrap_or_default()
    )]
    DuplicateVip {
        ip: IpAddr,
        /// The upstreams' `destination_port`, when they have one.
        port: Option<u16>,
        first: String,
        second: String,
    },
    /// The RBAC filters cannot be compiled.
    #[error("RBAC: {0}")]
    Rbac(AuthzError),
    /// One upstream's fields are unusable (bad SAN matcher, roots, SNI,
    /// endpoint weights).
    #[error("upstream {upstream}: {msg}")]
    Upstream { upstream: String, msg: String },
    /// A listener of the new snapshot (an upstream's `local_bind`, an
    /// expose path) cannot bind; the snapshot is not applied.
    #[error("{what}: cannot listen on {addr}: {error}")]
    Listener {
        what: String,
        addr: SocketAddr,
        error: String,
    },
}

impl SnapshotError {
    /// A bounded label for metrics.
    pub fn classify(&self) -> &'static str {
        match self {
            SnapshotError::Tls(_) => "tls",
            SnapshotError::LeafIdentity { .. } => "leaf_identity",
            SnapshotError::LeafUntrusted(_) => "leaf_untrusted",
            SnapshotError::LeafExpired { .. } => "leaf_expired",
            SnapshotError::LeafNotYetValid { .. } => "leaf_not_yet_valid",
            SnapshotError::LeafIsCa => "leaf_is_ca",
            SnapshotError::NoRoots => "no_roots",
            SnapshotError::DuplicateVip { .. } => "duplicate_vip",
            SnapshotError::Listener { .. } => "listener_bind",
            SnapshotError::Rbac(_) => "rbac",
            SnapshotError::Upstream { .. } => "upstream",
        }
    }
}

/// The TLS side of a snapshot.
pub struct TlsMaterial {
    pub server: Arc<ServerConfig>,
    /// The base client configuration each upstream's (`Upstream::tls`) is
    /// cloned from; it checks the chain only, so connections never use it.
    pub client: Arc<ClientConfig>,
    pub leaf: CertInfo,
    pub roots: Vec<CertInfo>,
    /// The per-upstream client configurations, made on first use and kept
    /// by the next snapshot with the same leaf, key and roots (see
    /// [`tls::UpstreamConfigs`]).
    pub upstream_configs: Arc<tls::UpstreamConfigs>,
    /// What `server` and `client` were built from, so that the next
    /// snapshot can keep them (and their session tickets) when only other
    /// parts changed.
    source: (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        Vec<CertificateDer<'static>>,
    ),
}

/// A distinct set of per-upstream roots: the set (the key of the upstream
/// TLS configurations) and its root store.
type SharedRoots = (
    Arc<Vec<CertificateDer<'static>>>,
    Arc<rustls::RootCertStore>,
);

/// What building the targets of one snapshot shares: the default connect
/// timeout, the root stores (the spec's and one per distinct per-target
/// set) and the lazily made TLS client configurations.
struct TargetCtx {
    default_connect: Duration,
    spec_store: Arc<rustls::RootCertStore>,
    stores: HashMap<Vec<CertificateDer<'static>>, SharedRoots>,
    root_infos: HashMap<Vec<CertificateDer<'static>>, Arc<[CertInfo]>>,
    upstream_configs: Arc<tls::UpstreamConfigs>,
}

impl TargetCtx {
    /// One target of upstream `name` as a routing-table [`Upstream`] (its
    /// target fields set: identity, SNI, endpoints, connect timeout, SANs,
    /// roots and TLS configuration).
    fn target(&mut self, name: &str, t: TargetSpec) -> Result<Upstream, SnapshotError> {
        let bad = |msg: String| SnapshotError::Upstream {
            upstream: name.to_string(),
            msg,
        };
        if !t.endpoint_weights.is_empty() && t.endpoint_weights.len() != t.endpoints.len() {
            return Err(bad(format!(
                "{} endpoint weights for {} endpoints",
                t.endpoint_weights.len(),
                t.endpoints.len()
            )));
        }
        if let Some(i) = t.endpoint_weights.iter().position(|w| *w == 0) {
            return Err(bad(format!("endpoint {} has weight 0", t.endpoints[i])));
        }
        let mut up = Upstream::new(
            t.identity,
            t.connect_timeout.unwrap_or(self.default_connect),
        );
        if let Some(sni) = t.sni {
            rustls::pki_types::ServerName::try_from(sni.as_str())
                .map_err(|e| bad(format!("SNI {sni:?}: {e}")))?;
            up.sni = sni;
        }
        // `Upstream::new` compiled the default: exactly its SPIFFE ID.
        let custom = !t.san_matchers.is_empty()
            && t.san_matchers.as_slice() != std::slice::from_ref(up.san_matchers[0].spec());
        if custom {
            up.san_matchers = t
                .san_matchers
                .iter()
                .map(|m| m.compile())
                .collect::<Result<Arc<[_]>, _>>()
                .map_err(|e| bad(format!("SAN matcher: {e}")))?;
        }
        let (roots_key, store) = match &t.roots {
            None => (None, self.spec_store.clone()),
            Some(r) if r.is_empty() => return Err(bad("empty roots".into())),
            Some(r) => match self.stores.get(r) {
                Some((k, s)) => (Some(k.clone()), s.clone()),
                None => {
                    let s = tls::root_store(r).map_err(|e| bad(format!("roots: {e}")))?;
                    let (k, s) = (Arc::new(r.clone()), Arc::new(s));
                    self.stores.insert(r.clone(), (k.clone(), s.clone()));
                    (Some(k), s)
                }
            },
        };
        if let Some(r) = &roots_key {
            up.roots = Some(match self.root_infos.get(&**r) {
                Some(i) => i.clone(),
                None => {
                    let i = r
                        .iter()
                        .map(|c| CertInfo::parse(c))
                        .collect::<Result<Arc<[CertInfo]>, _>>()
                        .map_err(|e| bad(format!("roots: {e}")))?;
                    self.root_infos.insert((**r).clone(), i.clone());
                    i
                }
            });
        }
        up.tls = Some(tls::LazyClientConfig::new(
            roots_key,
            store,
            up.san_matchers.clone(),
            self.upstream_configs.clone(),
        ));
        up.endpoints = if t.endpoint_weights.is_empty() {
            t.endpoints.into_iter().map(Endpoint::new).collect()
        } else {
            t.endpoints
                .into_iter()
                .zip(t.endpoint_weights)
                .map(|(a, w)| Endpoint::weighted(a, w))
                .collect()
        };
        Ok(up)
    }
}

/// One immutable configuration snapshot.
pub struct Snapshot {
    /// Increases with every snapshot a process builds.
    pub version: u64,
    pub identity: ServiceId,
    pub tls: TlsMaterial,
    /// The spec's Consul intentions (what `authz` evaluates when the spec
    /// gave no RBAC filters).
    pub intentions: Intentions,
    /// What decides inbound connections, whatever the source filled.
    pub authz: Authz,
    pub routes: RouteTable,
    pub local_app: SocketAddr,
    pub listen: ListenSpec,
    pub timeouts: Timeouts,
    pub source: String,
    pub expose: Vec<ExposePath>,
    /// Inbound original-destination ports relayed as plain TCP to the local
    /// app; empty = mTLS on every inbound connection.
    pub permissive_ports: Vec<u16>,
    /// The inbound listener's connection limit.
    pub inbound_max_connections: usize,
    /// Settings given but not applied ([`Unapplied`]).
    pub unapplied: Vec<Unapplied>,
    /// The inbound listener at L7, compiled; `None` = L4.
    pub inbound_http: Option<Arc<crate::l7authz::InboundL7>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("identity", &self.identity.to_string())
            .field("upstreams", &self.routes.upstreams().len())
            .finish()
    }
}

impl Spec {
    /// Makes each upstream that equals one of `last`'s that very one (the
    /// same `Arc`). For a source that keeps the last spec it gave: the
    /// runtime then knows those upstreams unchanged without comparing, and
    /// its snapshot shares them with the source's spec instead of holding
    /// old copies (see [`crate::route::Upstream::built_from`]).
    pub fn share_upstreams_of(&mut self, last: &Spec) {
        type Key<'a> = (&'a ServiceId, Option<SocketAddr>, Option<u16>);
        fn key(u: &UpstreamSpec) -> Key<'_> {
            (&u.identity, u.local_bind, u.destination_port)
        }
        let mut by_key: Option<HashMap<Key<'_>, &Arc<UpstreamSpec>>> = None;
        for (i, u) in self.upstreams.iter_mut().enumerate() {
            let old = match last.upstreams.get(i) {
                Some(o) if key(o) == key(u) => Some(o),
                _ => by_key
                    .get_or_insert_with(|| last.upstreams.iter().map(|o| (key(o), o)).collect())
                    .get(&key(u))
                    .copied(),
            };
            if let Some(o) = old {
                if **o == **u {
                    *u = o.clone();
                }
            }
        }
    }
}

impl Snapshot {
    /// Builds a snapshot: checks the leaf is ours and chains to the roots,
    /// makes both rustls configurations and the routing table.
    pub fn build(spec: Spec, version: u64) -> Result<Snapshot, SnapshotError> {
        Snapshot::build_after(spec, version, None)
    }

    /// Like [`Snapshot::build`], keeping `prev`'s TLS configurations when
    /// the leaf chain, key and roots are unchanged: a catalog, intention or
    /// timeout change then does not drop the session tickets (every new
    /// connection would make a full handshake). New roots or a new leaf
    /// build new configurations, so no session resumes across them.
    pub fn build_after(
        spec: Spec,
        version: u64,
        prev: Option<&Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        if spec.roots.is_empty() {
            return Err(SnapshotError::NoRoots);
        }
        let leaf_der = spec
            .chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate("leaf chain".into()))?;
        let same = prev.filter(|p| {
            let (chain, key, roots) = &p.tls.source;
            *chain == spec.chain
                && key.secret_der() == spec.key.secret_der()
                && *roots == spec.roots
        });
        // The same chain and roots as `prev`'s chained when it was built:
        // only what depends on the time or on the rest of the spec is
        // checked again (at mesh scale, no signature check per endpoint
        // change).
        let (leaf, roots) = match same {
            Some(p) => (p.tls.leaf.clone(), p.tls.roots.clone()),
            None => (
                CertInfo::parse(leaf_der).map_err(TlsError::from)?,
                Vec::new(),
            ),
        };
        check_leaf_facts(&leaf)?;
        let got = tls::peer_identity(leaf_der).map_err(TlsError::from)?;
        if got != spec.identity {
            return Err(SnapshotError::LeafIdentity {
                got: got.to_string(),
                want: spec.identity.to_string(),
            });
        }
        let roots = match same {
            Some(_) => roots,
            None => {
                verify_leaf(&spec.chain, &spec.roots)?;
                spec.roots
                    .iter()
                    .map(|r| CertInfo::parse(r).map_err(TlsError::from))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let (server, client) = match same {
            Some(p) => (p.tls.server.clone(), p.tls.client.clone()),
            None => (
                tls::server_config(spec.chain.clone(), spec.key.clone_key(), &spec.roots)?,
                tls::client_config(spec.chain.clone(), spec.key.clone_key(), &spec.roots)?,
            ),
        };
        let source = (spec.chain, spec.key, spec.roots);

        // Each virtual IP (and port) with the index of its upstream.
        let mut seen: std::collections::HashMap<(IpAddr, Option<u16>), usize> = Default::default();
        let mut own = vec![spec.listen.inbound];
        own.extend(spec.listen.outbound.iter().copied());
        own.extend(spec.expose.iter().map(|e| e.listener));
        // Root stores: the spec's, and one per distinct per-upstream set.
        let spec_store = Arc::new(tls::root_store(&source.2)?);
        let upstream_configs = match same {
            Some(p) => p.tls.upstream_configs.clone(),
            None => Arc::new(tls::UpstreamConfigs::new(client.clone())),
        };
        let mut upstreams = Vec::with_capacity(spec.upstreams.len());
        let mut ctx = TargetCtx {
            default_connect: spec.timeouts.connect,
            spec_store,
            stores: HashMap::new(),
            root_infos: HashMap::new(),
            upstream_configs: upstream_configs.clone(),
        };
        // With the same TLS material, an upstream whose spec did not change
        // is the previous snapshot's, shared: an endpoint change elsewhere
        // rebuilds nothing of it (and it keeps its open-connection count,
        // round-robin position, endpoint failure marks and TLS client
        // configuration).
        let reuse =
            same.map(|p| Reuse::new(&p.routes, p.timeouts.connect == spec.timeouts.connect));
        // When every upstream routes as the previous snapshot's at its
        // position (an endpoint change), no address can be claimed twice
        // (the previous one was checked) and the route table keeps its
        // index: nothing here hashes an address.
        let routed_as = prev.filter(|p| {
            let old = p.routes.upstreams();
            old.len() == spec.upstreams.len()
                && old.iter().zip(&spec.upstreams).all(|(o, u)| {
                    o.built_from.as_ref().is_some_and(|f| Arc::ptr_eq(f, u))
                        || o.virtual_ips == u.virtual_ips
                            && o.destination_port == u.destination_port
                            && o.dialed_directly == u.dialed_directly
                            && o.instances == u.instances
                })
        });
        for u in spec.upstreams {
            for ip in u.virtual_ips.iter().filter(|_| routed_as.is_none()) {
                // Canonical form: `::ffff:10.0.0.1` is `10.0.0.1` (found by fuzzing).
                let key = (veer_canonical_ip(*ip), u.destination_port);
                if let Some(first) = seen.insert(key, upstreams.len()) {
                    // (None: twice in this upstream's own list.)
                    let first = upstreams
                        .get(first)
                        .map_or(&u.identity.service, |f: &Arc<Upstream>| &f.identity.service);
                    return Err(SnapshotError::DuplicateVip {
                        ip: *ip,
                        port: u.destination_port,
                        first: first.clone(),
                        second: u.identity.service.clone(),
                    });
                }
            }
            let at = upstreams.len();
            if let Some(old) = reuse
                .as_ref()
                .and_then(|r| r.find(at, &u, ctx.default_connect))
            {
                own.extend(u.local_bind);
                upstreams.push(old);
                continue;
            }
            // Kept when the source keeps it too (shared, no copy; see
            // `Upstream::built_from`), and copied to be taken apart then.
            let built_from = (Arc::strong_count(&u) > 1).then(|| u.clone());
            let mut u = Arc::unwrap_or_clone(u);
            let name = u.identity.service.clone();
            let failover = std::mem::take(&mut u.failover);
            let primary = TargetSpec {
                identity: u.identity,
                endpoints: u.endpoints,
                endpoint_weights: u.endpoint_weights,
                sni: u.sni,
                san_matchers: u.san_matchers,
                roots: u.roots,
                connect_timeout: u.connect_timeout,
            };
            let mut up = ctx.target(&name, primary)?;
            up.failover = failover
                .into_iter()
                .map(|t| ctx.target(&name, t))
                .collect::<Result<Vec<_>, _>>()?
                .into_boxed_slice();
            if let Some(http) = u.http {
                if u.protocol == Protocol::Tcp {
                    return Err(SnapshotError::Upstream {
                        upstream: name,
                        msg: "HTTP routes on an upstream of protocol tcp (http, http2 or grpc needed)".into(),
                    });
                }
                let table = crate::l7route::HttpTable::compile(http, |t| {
                    ctx.target(&name, t).map_err(|e| match e {
                        SnapshotError::Upstream { msg, .. } => msg,
                        e => e.to_string(),
                    })
                })
                .map_err(|e| SnapshotError::Upstream {
                    upstream: name.clone(),
                    msg: e.to_string(),
                })?;
                up.http = Some(Arc::new(table));
            }
            up.protocol = u.protocol;
            up.virtual_ips = u.virtual_ips;
            up.dialed_directly = u.dialed_directly;
            up.instances = u.instances;
            up.local_bind = u.local_bind;
            up.destination_port = u.destination_port;
            up.max_connections = u.max_connections;
            up.built_from = built_from;
            own.extend(u.local_bind);
            upstreams.push(Arc::new(up));
        }
        let routes = match routed_as {
            Some(p) => {
                RouteTable::reindexed(upstreams, spec.mesh_destinations_only, own, &p.routes)
            }
            None => RouteTable::from_shared(upstreams, spec.mesh_destinations_only, own),
        };
        let intentions = Intentions::new(&spec.identity, spec.intentions, spec.default_action);
        let authz = Authz::new(spec.rbac.as_deref(), &intentions).map_err(SnapshotError::Rbac)?;
        let inbound_http = spec
            .inbound_http
            .map(|h| crate::l7authz::InboundL7::new(h, &authz, &intentions, &server))
            .transpose()
            .map_err(SnapshotError::Rbac)?
            .map(Arc::new);
        let inbound_max_connections = spec
            .inbound_max_connections
            .map_or(spec.timeouts.max_connections, |n| n as usize);
        Ok(Snapshot {
            version,
            identity: spec.identity,
            tls: TlsMaterial {
                server,
                client,
                upstream_configs,
                leaf,
                roots,
                source,
            },
            intentions,
            authz,
            routes,
            local_app: spec.local_app,
            listen: spec.listen,
            timeouts: spec.timeouts,
            source: spec.source,
            expose: spec.expose,
            permissive_ports: spec.permissive_ports,
            inbound_max_connections,
            unapplied: spec.unapplied,
            inbound_http,
        })
    }

    /// The snapshot as JSON for `/config_dump`: identities, certificate facts
    /// (never keys), intentions in evaluation order, upstreams, timeouts.
    pub fn dump(&self) -> serde_json::Value {
        use serde_json::json;
        let ixns: Vec<_> = self
            .intentions
            .rules()
            .iter()
            .map(|r| {
                json!({
                    "source": r.source.to_string(),
                    "destination": r.destination.to_string(),
                    "action": r.action.as_str(),
                    "precedence": r.precedence(),
                    "id": r.id,
                })
            })
            .collect();
        let ups: Vec<_> = self
            .routes
            .upstreams()
            .iter()
            .map(|u| {
                json!({
                    "name": u.name(),
                    "identity": u.identity.to_string(),
                    "sni": u.sni,
                    "protocol": u.protocol.as_str(),
                    "virtual_ips": u.virtual_ips,
                    "endpoints": u.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                    "endpoint_weights": u.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
                    "san_matchers": u.san_matchers.iter().map(|m| m.spec().to_string()).collect::<Vec<_>>(),
                    "destination_port": u.destination_port,
                    "roots": u.roots.as_deref(),
                    "max_connections": u.max_connections,
                    "dialed_directly": u.dialed_directly,
                    "instances": u.instances,
                    "local_bind": u.local_bind,
                    "connect_timeout": crate::duration::format(u.connect_timeout),
                    "failover": u.failover.iter().map(|t| json!({
                        "identity": t.identity.to_string(),
                        "sni": t.sni,
                        "endpoints": t.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                        "endpoint_weights": t.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
                        "san_matchers": t.san_matchers.iter().map(|m| m.spec().to_string()).collect::<Vec<_>>(),
                        "roots": t.roots.as_deref(),
                        "connect_timeout": crate::duration::format(t.connect_timeout),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let expose: Vec<_> = self
            .expose
            .iter()
            .map(|e| {
                json!({
                    "listener": e.listener,
                    "path": e.path,
                    "local_path_port": e.local_path_port,
                    "protocol": e.protocol.as_str(),
                })
            })
            .collect();
        json!({
            "version": self.version,
            "source": self.source,
            "identity": self.identity.to_string(),
            "local_app": self.local_app,
            "listen": self.listen,
            "leaf": self.tls.leaf,
            "roots": self.tls.roots,
            "intentions": {
                "default_action": self.intentions.default_action().as_str(),
                "rules": ixns,
            },
            "rbac": match &self.authz {
                Authz::Intentions(_) => serde_json::Value::Null,
                Authz::Rbac(r) => r.rules().iter().map(|f| json!({
                    "action": f.action.as_str(),
                    "policies": f.policies.iter().map(|p| json!({
                        "name": p.name,
                        "principals": p.principals.iter().map(principal_json).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>().into(),
            },
            "permissive_ports": self.permissive_ports,
            "mesh_destinations_only": self.routes.mesh_destinations_only(),
            "upstreams": ups,
            "timeouts": {
                "connect": crate::duration::format(self.timeouts.connect),
                "local_connect": crate::duration::format(self.timeouts.local_connect),
                "handshake": crate::duration::format(self.timeouts.handshake),
                "idle": crate::duration::format(self.timeouts.idle),
                "half_close": crate::duration::format(self.timeouts.half_close),
            },
            "limits": {
                "max_connections": self.timeouts.max_connections,
                "inbound_max_connections": self.inbound_max_connections,
            },
            "mux": { "enabled": self.timeouts.mux },
            "expose": expose,
            "unapplied": self.unapplied,
        })
    }
}

fn principal_json(p: &Principal) -> serde_json::Value {
    use serde_json::json;
    match p {
        Principal::Any => json!("any"),
        Principal::Authenticated { principal_name } => json!({
            "authenticated": principal_name.as_ref().map(|m| m.to_string()),
        }),
        Principal::AndIds(ids) => {
            json!({ "and_ids": ids.iter().map(principal_json).collect::<Vec<_>>() })
        }
        Principal::OrIds(ids) => {
            json!({ "or_ids": ids.iter().map(principal_json).collect::<Vec<_>>() })
        }
        Principal::NotId(p) => json!({ "not_id": principal_json(p) }),
    }
}

fn veer_canonical_ip(ip: IpAddr) -> IpAddr {
    crate::addr::canonical(SocketAddr::new(ip, 0)).ip()
}

/// Unix seconds as `2026-01-31 12:00:00 UTC`.
pub fn format_unix(secs: i64) -> String {
    match x509_parser::time::ASN1Time::from_timestamp(secs) {
        Ok(t) => {
            let d = t.to_datetime();
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        }
        Err(_) => format!("unix time {secs}"),
    }
}

/// The checks whose failure deserves its own words (rather than webpki's
/// `CaUsedAsEndEntity` or a generic "does not chain").
fn check_leaf_facts(leaf: &CertInfo) -> Result<(), SnapshotError> {
    if leaf.is_ca {
        return Err(SnapshotError::LeafIsCa);
    }
    let now = rustls::pki_types::UnixTime::now().as_secs() as i64;
    if leaf.not_after <= now {
        return Err(SnapshotError::LeafExpired {
            at: format_unix(leaf.not_after),
        });
    }
    if leaf.not_before > now {
        return Err(SnapshotError::LeafNotYetValid {
            from: format_unix(leaf.not_before),
        });
    }
    Ok(())
}

fn verify_leaf(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), SnapshotError> {
    let store = tls::root_store(roots)?;
    let provider = tls::crypto_provider();
    let cert = rustls::server::ParsedCertificate::try_from(&chain[0])
        .map_err(|e| SnapshotError::LeafUntrusted(e.to_string()))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &cert,
        &store,
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| {
        SnapshotError::LeafUntrusted(match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
                "it was issued by none of them (a self-signed certificate, the wrong CA file, or a leaf from another CA)".into()
            }
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature) => {
                "its signature does not verify against the root of its issuer's name (a leaf from another CA of the same name, or the wrong CA file)".into()
            }
            e => e.to_string(),
        })
    })
}

/// The previous snapshot's upstreams, to find the one an unchanged spec
/// made (see [`Snapshot::build_after`]).
struct Reuse<'a> {
    olds: &'a [Arc<Upstream>],
    /// The default connect timeout is the previous snapshot's (an upstream
    /// without its own was built with it).
    same_default_connect: bool,
    /// Made on the first upstream not found at its own position.
    by_key: std::cell::OnceCell<HashMap<UpstreamKey<'a>, &'a Arc<Upstream>>>,
}

/// An upstream's SNI, destination port and local bind.
type UpstreamKey<'a> = (&'a str, Option<u16>, Option<SocketAddr>);

impl<'a> Reuse<'a> {
    fn new(routes: &'a RouteTable, same_default_connect: bool) -> Reuse<'a> {
        Reuse {
            olds: routes.upstreams(),
            same_default_connect,
            by_key: Default::default(),
        }
    }

    /// The previous upstream `u` (at position `at` in the new list) would
    /// build again, if there is one: the one at the same position first
    /// (no lookup while the list keeps its order), else by its key.
    fn find(
        &self,
        at: usize,
        spec: &Arc<UpstreamSpec>,
        default_connect: Duration,
    ) -> Option<Arc<Upstream>> {
        // The very spec it was built from (the source patched its last spec
        // elsewhere): nothing to compare.
        if let Some(o) = self.olds.get(at) {
            if self.same_default_connect
                && o.built_from.as_ref().is_some_and(|f| Arc::ptr_eq(f, spec))
            {
                return Some(Arc::clone(o));
            }
        }
        #[cfg(test)]
        tests::COMPARED.with(|c| c.set(c.get() + 1));
        let u: &UpstreamSpec = spec;
        // Every field, named: a new field must be compared here too.
        let UpstreamSpec {
            identity,
            protocol,
            virtual_ips,
            endpoints,
            dialed_directly,
            instances,
            local_bind,
            connect_timeout,
            sni,
            san_matchers,
            roots,
            destination_port,
            max_connections,
            endpoint_weights,
            failover,
            http,
        } = u;
        // HTTP upstreams are built again (their route tables are not
        // compared).
        if http.is_some() {
            return None;
        }
        let primary = TargetView {
            identity,
            endpoints,
            endpoint_weights,
            sni: sni.as_deref(),
            san_matchers,
            roots: roots.as_ref(),
            connect_timeout: *connect_timeout,
        };
        // (Borrowed when the spec names its SNI, as xDS specs do: no
        // allocation per upstream.)
        let sni_key: std::borrow::Cow<str> = match sni {
            Some(s) => s.as_str().into(),
            None => identity.sni().into(),
        };
        let key = (&*sni_key, *destination_port, *local_bind);
        let old = match self.olds.get(at) {
            Some(o) if (o.sni.as_str(), o.destination_port, o.local_bind) == key => o,
            _ => self
                .by_key
                .get_or_init(|| {
                    self.olds
                        .iter()
                        .map(|u| ((u.sni.as_str(), u.destination_port, u.local_bind), u))
                        .collect()
                })
                .get(&key)?,
        };
        let same = old.protocol == *protocol
            && old.virtual_ips == *virtual_ips
            && old.dialed_directly == *dialed_directly
            && old.instances == *instances
            && old.max_connections == *max_connections
            && primary.built_as(old, default_connect)
            && old.failover.len() == failover.len()
            && failover
                .iter()
                .zip(old.failover.iter())
                .all(|(t, o)| TargetView::of(t).built_as(o, default_connect));
        same.then(|| Arc::clone(old))
    }
}

/// The fields of one target, borrowed from an [`UpstreamSpec`] or a
/// [`TargetSpec`].
struct TargetView<'a> {
    identity: &'a ServiceId,
    endpoints: &'a [SocketAddr],
    endpoint_weights: &'a [u32],
    sni: Option<&'a str>,
    san_matchers: &'a [StringMatch],
    roots: Option<&'a Vec<CertificateDer<'static>>>,
    connect_timeout: Option<Duration>,
}

impl<'a> TargetView<'a> {
    fn of(t: &'a TargetSpec) -> TargetView<'a> {
        // Every field, named: a new field must be compared here too.
        let TargetSpec {
            identity,
            endpoints,
            endpoint_weights,
            sni,
            san_matchers,
            roots,
            connect_timeout,
        } = t;
        TargetView {
            identity,
            endpoints,
            endpoint_weights,
            sni: sni.as_deref(),
            san_matchers,
            roots: roots.as_ref(),
            connect_timeout: *connect_timeout,
        }
    }

    /// Whether [`TargetCtx::target`] made `old` from these fields (with the
    /// same TLS material).
    fn built_as(&self, old: &Upstream, default_connect: Duration) -> bool {
        let sni_same = match self.sni {
            Some(s) => old.sni == s,
            None => old.sni == self.identity.sni(),
        };
        let sans_same = if self.san_matchers.is_empty() {
            old.san_matchers.len() == 1
                && *old.san_matchers[0].spec() == StringMatch::exact(self.identity.to_string())
        } else {
            old.san_matchers.len() == self.san_matchers.len()
                && old
                    .san_matchers
                    .iter()
                    .zip(self.san_matchers)
                    .all(|(o, m)| o.spec() == m)
        };
        let roots_same = match (self.roots, old.tls.as_ref().map(|t| t.roots_key())) {
            (None, Some(None)) => true,
            (Some(r), Some(Some(k))) => **k == *r,
            _ => false,
        };
        let weight = |i: usize| self.endpoint_weights.get(i).copied().unwrap_or(1);
        let endpoints_same = old.endpoints.len() == self.endpoints.len()
            && (self.endpoint_weights.is_empty()
                || self.endpoint_weights.len() == self.endpoints.len())
            && old
                .endpoints
                .iter()
                .zip(self.endpoints)
                .enumerate()
                .all(|(i, (o, a))| o.addr.0 == *a && o.weight == weight(i));
        old.identity == *self.identity
            && old.connect_timeout == self.connect_timeout.unwrap_or(default_connect)
            && sni_same
            && sans_same
            && roots_same
            && endpoints_same
    }
}

#[cfg(test)]
mod tests;
