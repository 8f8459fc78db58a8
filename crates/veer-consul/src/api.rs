//! Pure parsers for the agent API answers veer reads, from JSON to checked
//! values. No I/O: each takes the response body and returns a value (plus
//! warnings about entries it had to skip) or an [`Error::Decode`].
//!
//! Field names and shapes are those of Consul 1.8.7 (checked against a real
//! agent; fixtures in `tests/fixtures/`), plus the fields newer versions add
//! that matter for transparent proxying (`Proxy.Mode`,
//! `Proxy.TransparentProxy`, `consul-virtual` tagged addresses,
//! `service-defaults.TransparentProxy`, the `mesh` entry, intention
//! `Permissions`/`SourcePeer`), which are optional everywhere.
use crate::Error;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use veer_core::intentions::{Action, Intention, Target};
use veer_core::route::Protocol;
use veer_core::snapshot::ExposePath;

/// `null` and absent both become `T::default()` (Consul writes `null` for
/// empty lists and maps).
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn json<'a, T: Deserialize<'a>>(what: &str, body: &'a [u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::decode(what, format!("unexpected JSON: {e}")))
}

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim();
    (!s.is_empty()).then_some(s)
}

/// `default` when empty (OSS Consul leaves namespace/partition out).
fn or_default(s: &str) -> String {
    non_empty(s).unwrap_or("default").to_string()
}

/// A number or a numeric string (Consul decodes opaque proxy config
/// "weakly"); `None` for absent, null and "".
fn weak_u64(v: Option<&Value>) -> Result<Option<u64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
            .map(Some)
            .ok_or_else(|| format!("{n} is not a non-negative integer")),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{s:?} is not a non-negative integer")),
        Some(other) => Err(format!("{other} is not a number")),
    }
}

fn weak_port(v: Option<&Value>) -> Result<Option<u16>, String> {
    match weak_u64(v)? {
        None | Some(0) => Ok(None),
        Some(n) => u16::try_from(n)
            .map(Some)
            .map_err(|_| format!("{n} is not a port")),
    }
}

fn weak_ms(v: Option<&Value>) -> Result<Option<Duration>, String> {
    Ok(weak_u64(v)?.filter(|n| *n > 0).map(Duration::from_millis))
}

fn weak_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .and_then(non_empty)
        .map(str::to_string)
}

/// An IP address, or `localhost` as 127.0.0.1.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    s.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

// ---------------------------------------------------------------------------
// /v1/agent/service/:id

#[derive(Deserialize, Debug, Default)]
struct RawAgentService {
    #[serde(rename = "Kind", default, deserialize_with = "nullable")]
    kind: String,
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    id: String,
    #[serde(rename = "Service", default, deserialize_with = "nullable")]
    service: String,
    #[serde(rename = "Address", default, deserialize_with = "nullable")]
    address: String,
    #[serde(rename = "Port", default, deserialize_with = "nullable")]
    port: u16,
    #[serde(rename = "Namespace", default, deserialize_with = "nullable")]
    namespace: String,
    #[serde(rename = "Partition", default, deserialize_with = "nullable")]
    partition: String,
    #[serde(rename = "Proxy", default)]
    proxy: Option<RawProxy>,
}

#[derive(Deserialize, Debug, Default)]
struct RawProxy {
    #[serde(
        rename = "DestinationServiceName",
        default,
        deserialize_with = "nullable"
    )]
    destination_service_name: String,
    #[serde(
        rename = "DestinationServiceID",
        default,
        deserialize_with = "nullable"
    )]
    destination_service_id: String,
    #[serde(rename = "LocalServiceAddress", default, deserialize_with = "nullable")]
    local_service_address: String,
    #[serde(rename = "LocalServicePort", default, deserialize_with = "nullable")]
    local_service_port: u16,
    /// Absent before Consul 1.10.
    #[serde(rename = "Mode", default)]
    mode: Option<String>,
    #[serde(rename = "TransparentProxy", default)]
    transparent_proxy: Option<RawTransparentProxy>,
    #[serde(rename = "Config", default, deserialize_with = "nullable")]
    config: serde_json::Map<String, Value>,
    #[serde(rename = "Upstreams", default, deserialize_with = "nullable")]
    upstreams: Vec<RawUpstream>,
    #[serde(rename = "Expose", default)]
    expose: Option<RawExpose>,
    #[serde(rename = "MeshGateway", default)]
    mesh_gateway: Option<RawMeshGateway>,
}

#[derive(Deserialize, Debug, Default)]
struct RawMeshGateway {
    #[serde(rename = "Mode", default, deserialize_with = "nullable")]
    mode: String,
}

/// A `MeshGateway.Mode` override of the registration: `None` when unset.
fn gateway_mode(g: &Option<RawMeshGateway>) -> Option<String> {
    g.as_ref()
        .and_then(|g| non_empty(&g.mode))
        .map(str::to_string)
}

#[derive(Deserialize, Debug, Default, Clone)]
struct RawTransparentProxy {
    #[serde(
        rename = "OutboundListenerPort",
        default,
        deserialize_with = "nullable"
    )]
    outbound_listener_port: u16,
    #[serde(rename = "DialedDirectly", default, deserialize_with = "nullable")]
    dialed_directly: bool,
}

#[derive(Deserialize, Debug, Default)]
struct RawUpstream {
    #[serde(rename = "DestinationType", default, deserialize_with = "nullable")]
    destination_type: String,
    #[serde(
        rename = "DestinationNamespace",
        default,
        deserialize_with = "nullable"
    )]
    destination_namespace: String,
    #[serde(
        rename = "DestinationPartition",
        default,
        deserialize_with = "nullable"
    )]
    destination_partition: String,
    #[serde(rename = "DestinationPeer", default, deserialize_with = "nullable")]
    destination_peer: String,
    #[serde(rename = "DestinationName", default, deserialize_with = "nullable")]
    destination_name: String,
    #[serde(rename = "Datacenter", default, deserialize_with = "nullable")]
    datacenter: String,
    #[serde(rename = "LocalBindAddress", default, deserialize_with = "nullable")]
    local_bind_address: String,
    #[serde(rename = "LocalBindPort", default, deserialize_with = "nullable")]
    local_bind_port: u16,
    #[serde(rename = "LocalBindSocketPath", default, deserialize_with = "nullable")]
    local_bind_socket_path: String,
    #[serde(rename = "Config", default, deserialize_with = "nullable")]
    config: serde_json::Map<String, Value>,
    #[serde(rename = "MeshGateway", default)]
    mesh_gateway: Option<RawMeshGateway>,
}

#[derive(Deserialize, Debug, Default)]
struct RawExpose {
    #[serde(rename = "Checks", default, deserialize_with = "nullable")]
    checks: bool,
    #[serde(rename = "Paths", default, deserialize_with = "nullable")]
    paths: Vec<RawExposePath>,
}

#[derive(Deserialize, Debug, Default)]
struct RawExposePath {
    #[serde(rename = "ListenerPort", default, deserialize_with = "nullable")]
    listener_port: u16,
    #[serde(rename = "Path", default, deserialize_with = "nullable")]
    path: String,
    #[serde(rename = "LocalPathPort", default, deserialize_with = "nullable")]
    local_path_port: u16,
    #[serde(rename = "Protocol", default, deserialize_with = "nullable")]
    protocol: String,
}

/// The proxy mode a registration or config entry asks for (Consul 1.10+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `""`: not set here; the next level decides.
    Unset,
    Direct,
    Transparent,
}

fn parse_mode(s: Option<&str>) -> Mode {
    match s.map(str::trim) {
        Some("transparent") => Mode::Transparent,
        Some("direct") => Mode::Direct,
        _ => Mode::Unset,
    }
}

/// An explicit upstream (`Proxy.Upstreams[]` with a `LocalBindPort`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExplicitUpstream {
    pub name: String,
    pub namespace: String,
    pub partition: String,
    /// `None`: the local datacenter.
    pub datacenter: Option<String>,
    pub bind: SocketAddr,
    /// `Config.connect_timeout_ms`.
    pub connect_timeout: Option<Duration>,
    /// `Config.protocol`.
    pub protocol: Option<String>,
    /// `MeshGateway.Mode`, when set: overrides the registration's and the
    /// config entries' mode for this upstream's remote targets.
    pub mesh_gateway: Option<String>,
}

/// The proxy registration, as veer uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub id: String,
    /// The proxy's own service name (`web-sidecar-proxy`).
    pub service: String,
    /// `Proxy.DestinationServiceName`: the identity this sidecar serves.
    pub destination_service: String,
    pub destination_service_id: String,
    pub namespace: String,
    pub partition: String,
    /// The inbound (public) listener: `Address` (0.0.0.0 when empty) :
    /// `Port`, overridden by `Proxy.Config.bind_address` / `bind_port`.
    pub bind: SocketAddr,
    /// `LocalServiceAddress` (127.0.0.1 when empty) : `LocalServicePort`.
    pub local_app: SocketAddr,
    /// `Proxy.Mode` (absent before 1.10).
    pub mode: Mode,
    /// `Proxy.TransparentProxy.OutboundListenerPort`, when non-zero.
    pub outbound_port: Option<u16>,
    pub upstreams: Vec<ExplicitUpstream>,
    /// `Proxy.MeshGateway.Mode`, when set: overrides the config entries'
    /// mode for every upstream's remote targets.
    pub mesh_gateway: Option<String>,
    pub expose: Vec<ExposePath>,
    /// `Proxy.Expose.Checks` (not acted on yet).
    pub expose_checks: bool,
    /// `Proxy.Config.protocol`.
    pub protocol: Option<String>,
    /// `Proxy.Config.local_connect_timeout_ms`.
    pub local_connect_timeout: Option<Duration>,
    /// `Proxy.Config.handshake_timeout_ms`.
    pub handshake_timeout: Option<Duration>,
    /// `Proxy.Config.connect_timeout_ms` (all upstreams' default).
    pub connect_timeout: Option<Duration>,
    /// `Proxy.Config.envoy_prometheus_bind_addr` (`0.0.0.0:20200` under
    /// consul-k8s with metrics on).
    pub prometheus_bind: Option<SocketAddr>,
    /// `Proxy.Config` and `Proxy.Upstreams[].Config` keys veer does not
    /// apply (Envoy escape hatches such as `envoy_tracing_json`, tuning it
    /// has no equivalent for), as `Proxy.Config.<key>` or
    /// `Proxy.Upstreams[<name>].Config.<key>`, sorted.
    pub unapplied_config: Vec<String>,
}

/// The `Proxy.Config` keys veer applies.
const PROXY_CONFIG_KEYS: &[&str] = &[
    "bind_address",
    "bind_port",
    "protocol",
    "local_connect_timeout_ms",
    "handshake_timeout_ms",
    "connect_timeout_ms",
    "envoy_prometheus_bind_addr",
];

/// The `Proxy.Upstreams[].Config` keys veer applies.
const UPSTREAM_CONFIG_KEYS: &[&str] = &["connect_timeout_ms", "protocol"];

/// Parses `/v1/agent/service/:id` into a [`Registration`]; warnings name the
/// parts veer ignores (prepared-query or socket upstreams, upstreams without
/// a port, peered upstreams).
pub fn parse_registration(id: &str, body: &[u8]) -> Result<(Registration, Vec<String>), Error> {
    let what = format!("/v1/agent/service/{id}");
    let raw: RawAgentService = json(&what, body)?;
    let Some(proxy) = raw.proxy.filter(|_| raw.kind == "connect-proxy") else {
        return Err(Error::NotAProxy {
            id: id.to_string(),
            kind: raw.kind,
        });
    };
    let bad = |field: &str, msg: String| Error::decode(format!("{what}: {field}"), msg);
    let mut warnings = Vec::new();
    let conf = |k: &str| proxy.config.get(k);

    let bind_ip = match weak_str(conf("bind_address"))
        .or_else(|| non_empty(&raw.address).map(str::to_string))
    {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some(a) => {
            parse_ip(&a).ok_or_else(|| bad("Address", format!("{a:?} is not an IP address")))?
        }
    };
    let bind_port = weak_port(conf("bind_port"))
        .map_err(|e| bad("Proxy.Config.bind_port", e))?
        .unwrap_or(raw.port);
    if bind_port == 0 {
        return Err(bad("Port", "the proxy has no port".into()));
    }
    let local_ip = match non_empty(&proxy.local_service_address) {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(a) => parse_ip(a).ok_or_else(|| {
            bad(
                "Proxy.LocalServiceAddress",
                format!("{a:?} is not an IP address"),
            )
        })?,
    };
    if proxy.local_service_port == 0 {
        return Err(bad("Proxy.LocalServicePort", "missing".into()));
    }
    if proxy.destination_service_name.trim().is_empty() {
        return Err(bad("Proxy.DestinationServiceName", "missing".into()));
    }
    let namespace = or_default(&raw.namespace);
    let partition = or_default(&raw.partition);

    let mut upstreams = Vec::new();
    for u in &proxy.upstreams {
        let name = u.destination_name.trim();
        let ty = non_empty(&u.destination_type).unwrap_or("service");
        if ty != "service" {
            warnings.push(format!(
                "upstream {name:?}: DestinationType {ty:?} is not supported; skipped"
            ));
            continue;
        }
        if non_empty(&u.destination_peer).is_some() {
            warnings.push(format!(
                "upstream {name:?}: peered upstreams are not supported; skipped"
            ));
            continue;
        }
        if u.local_bind_port == 0 {
            let why = if u.local_bind_socket_path.is_empty() {
                "has no LocalBindPort"
            } else {
                "binds a Unix socket (LocalBindSocketPath), which is not supported"
            };
            warnings.push(format!("upstream {name:?} {why}; skipped"));
            continue;
        }
        if name.is_empty() || name == "*" {
            warnings.push(format!("upstream {name:?}: no destination name; skipped"));
            continue;
        }
        let ip = match non_empty(&u.local_bind_address) {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(a) => match parse_ip(a) {
                Some(ip) => ip,
                None => {
                    warnings.push(format!(
                        "upstream {name:?}: LocalBindAddress {a:?} is not an IP address; skipped"
                    ));
                    continue;
                }
            },
        };
        let uconf = |k: &str| u.config.get(k);
        upstreams.push(ExplicitUpstream {
            name: name.to_string(),
            namespace: non_empty(&u.destination_namespace)
                .map_or_else(|| namespace.clone(), str::to_string),
            partition: non_empty(&u.destination_partition)
                .map_or_else(|| partition.clone(), str::to_string),
            datacenter: non_empty(&u.datacenter).map(str::to_string),
            bind: SocketAddr::new(ip, u.local_bind_port),
            connect_timeout: weak_ms(uconf("connect_timeout_ms"))
                .map_err(|e| bad(&format!("upstream {name}: Config.connect_timeout_ms"), e))?,
            protocol: weak_str(uconf("protocol")),
            mesh_gateway: gateway_mode(&u.mesh_gateway),
        });
    }

    let (expose_paths, expose_checks) = match &proxy.expose {
        Some(e) => (&e.paths[..], e.checks),
        None => (&[][..], false),
    };
    let mut expose = Vec::new();
    for p in expose_paths {
        if p.listener_port == 0 || p.local_path_port == 0 || !p.path.starts_with('/') {
            warnings.push(format!(
                "expose path {:?} (listener port {}, local port {}) is incomplete; skipped",
                p.path, p.listener_port, p.local_path_port
            ));
            continue;
        }
        let mut e = ExposePath::new(
            SocketAddr::new(bind_ip, p.listener_port),
            p.path.clone(),
            p.local_path_port,
        );
        match non_empty(&p.protocol).map(Protocol::parse) {
            None => {}
            Some(Some(proto @ (Protocol::Http | Protocol::Http2))) => e.protocol = proto,
            Some(_) => warnings.push(format!(
                "expose path {:?}: protocol {:?} is not http or http2; using http",
                p.path, p.protocol
            )),
        }
        expose.push(e);
    }

    let mut unapplied_config: Vec<String> = proxy
        .config
        .keys()
        .filter(|k| !PROXY_CONFIG_KEYS.contains(&k.as_str()))
        .map(|k| format!("Proxy.Config.{k}"))
        .collect();
    for u in &proxy.upstreams {
        for k in u.config.keys() {
            if !UPSTREAM_CONFIG_KEYS.contains(&k.as_str()) {
                unapplied_config.push(format!(
                    "Proxy.Upstreams[{}].Config.{k}",
                    u.destination_name.trim()
                ));
            }
        }
    }
    unapplied_config.sort();
    unapplied_config.dedup();
    let tp = proxy.transparent_proxy.clone().unwrap_or_default();
    let reg = Registration {
        id: non_empty(&raw.id).unwrap_or(id).to_string(),
        service: raw.service.clone(),
        destination_service: proxy.destination_service_name.trim().to_string(),
        destination_service_id: proxy.destination_service_id.clone(),
        namespace,
        partition,
        bind: SocketAddr::new(bind_ip, bind_port),
        local_app: SocketAddr::new(local_ip, proxy.local_service_port),
        mode: parse_mode(proxy.mode.as_deref()),
        outbound_port: (tp.outbound_listener_port != 0).then_some(tp.outbound_listener_port),
        upstreams,
        mesh_gateway: gateway_mode(&proxy.mesh_gateway),
        expose,
        expose_checks,
        protocol: weak_str(conf("protocol")),
        local_connect_timeout: weak_ms(conf("local_connect_timeout_ms"))
            .map_err(|e| bad("Proxy.Config.local_connect_timeout_ms", e))?,
        handshake_timeout: weak_ms(conf("handshake_timeout_ms"))
            .map_err(|e| bad("Proxy.Config.handshake_timeout_ms", e))?,
        connect_timeout: weak_ms(conf("connect_timeout_ms"))
            .map_err(|e| bad("Proxy.Config.connect_timeout_ms", e))?,
        prometheus_bind: weak_str(conf("envoy_prometheus_bind_addr")).and_then(|a| {
            let parsed = a.parse().ok();
            if parsed.is_none() {
                warnings.push(format!(
                    "Proxy.Config.envoy_prometheus_bind_addr {a:?} is not an IP:port; no Prometheus listener"
                ));
            }
            parsed
        }),
        unapplied_config,
    };
    Ok((reg, warnings))
}

/// `--sidecar-for`: the IDs of the local `connect-proxy` services whose
/// `Proxy.DestinationServiceID` is `service_id`, from `/v1/agent/services`,
/// sorted.
pub fn sidecars_for(service_id: &str, body: &[u8]) -> Result<Vec<String>, Error> {
    let all: BTreeMap<String, RawAgentService> = json("/v1/agent/services", body)?;
    Ok(all
        .into_iter()
        .filter(|(_, s)| {
            s.kind == "connect-proxy"
                && s.proxy
                    .as_ref()
                    .is_some_and(|p| p.destination_service_id == service_id)
        })
        .map(|(id, _)| id)
        .collect())
}

// ---------------------------------------------------------------------------
// CA roots and leaf

#[derive(Deserialize)]
struct RawRoots {
    #[serde(rename = "ActiveRootID", default, deserialize_with = "nullable")]
    active_root_id: String,
    #[serde(rename = "TrustDomain", default, deserialize_with = "nullable")]
    trust_domain: String,
    #[serde(rename = "Roots", default, deserialize_with = "nullable")]
    roots: Vec<RawRoot>,
}

#[derive(Deserialize)]
struct RawRoot {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    id: String,
    #[serde(rename = "RootCert", default, deserialize_with = "nullable")]
    root_cert: String,
    #[serde(rename = "Active", default, deserialize_with = "nullable")]
    active: bool,
}

/// The trusted CA roots: every root Consul lists (the active one and those
/// rotated out but still trusted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roots {
    pub trust_domain: String,
    pub active_id: String,
    /// Root IDs, in the order of `certs`.
    pub ids: Vec<String>,
    pub certs: Vec<CertificateDer<'static>>,
}

/// Parses `/v1/agent/connect/ca/roots`.
pub fn parse_roots(body: &[u8]) -> Result<Roots, Error> {
    let what = "/v1/agent/connect/ca/roots";
    let raw: RawRoots = json(what, body)?;
    if non_empty(&raw.trust_domain).is_none() {
        return Err(Error::decode(
            what,
            "no TrustDomain (is Connect enabled on the agent?)",
        ));
    }
    let mut roots = Roots {
        trust_domain: raw.trust_domain.trim().to_string(),
        active_id: raw.active_root_id,
        ids: Vec::new(),
        certs: Vec::new(),
    };
    // Active root first: it is the one new leaves chain to.
    let mut list = raw.roots;
    list.sort_by_key(|r| !r.active);
    for r in list {
        let certs =
            veer_core::tls::parse_certs(r.root_cert.as_bytes(), &format!("{what}: root {}", r.id))
                .map_err(|e| Error::decode(what, e))?;
        roots.ids.push(r.id);
        roots.certs.push(
            certs
                .into_iter()
                .next()
                .expect("parse_certs returns at least one"),
        );
    }
    if roots.certs.is_empty() {
        return Err(Error::decode(
            what,
            "no roots (is Connect enabled on the agent?)",
        ));
    }
    Ok(roots)
}

#[derive(Deserialize)]
struct RawLeaf {
    #[serde(rename = "SerialNumber", default, deserialize_with = "nullable")]
    serial_number: String,
    #[serde(rename = "CertPEM", default, deserialize_with = "nullable")]
    cert_pem: String,
    #[serde(rename = "PrivateKeyPEM", default, deserialize_with = "nullable")]
    private_key_pem: String,
    #[serde(rename = "Service", default, deserialize_with = "nullable")]
    service: String,
    #[serde(rename = "ServiceURI", default, deserialize_with = "nullable")]
    service_uri: String,
    #[serde(rename = "ValidBefore", default, deserialize_with = "nullable")]
    valid_before: String,
}

/// The service's leaf certificate, its chain and key.
pub struct Leaf {
    pub service: String,
    pub service_uri: String,
    pub serial: String,
    pub valid_before: String,
    /// Leaf first, then the intermediates Consul appends (e.g. the
    /// cross-signed new root during a CA rotation).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Leaf {
    fn clone(&self) -> Leaf {
        Leaf {
            service: self.service.clone(),
            service_uri: self.service_uri.clone(),
            serial: self.serial.clone(),
            valid_before: self.valid_before.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl PartialEq for Leaf {
    fn eq(&self, o: &Leaf) -> bool {
        self.chain == o.chain && self.key.secret_der() == o.key.secret_der()
    }
}

impl std::fmt::Debug for Leaf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leaf")
            .field("service_uri", &self.service_uri)
            .field("serial", &self.serial)
            .field("valid_before", &self.valid_before)
            .field("chain", &self.chain.len())
            .finish()
    }
}

/// Parses `/v1/agent/connect/ca/leaf/:service`; the leaf must be for `service`.
pub fn parse_leaf(service: &str, body: &[u8]) -> Result<Leaf, Error> {
    let what = format!("/v1/agent/connect/ca/leaf/{service}");
    let raw: RawLeaf = json(&what, body)?;
    let chain = veer_core::tls::parse_certs(raw.cert_pem.as_bytes(), &format!("{what}: CertPEM"))
        .map_err(|e| Error::decode(&what, e))?;
    let key = veer_core::tls::parse_key(
        raw.private_key_pem.as_bytes(),
        &format!("{what}: PrivateKeyPEM"),
    )
    .map_err(|e| Error::decode(&what, e))?;
    if !raw.service.is_empty() && raw.service != service {
        return Err(Error::decode(
            &what,
            format!("the leaf is for service {:?}", raw.service),
        ));
    }
    Ok(Leaf {
        service: service.to_string(),
        service_uri: raw.service_uri,
        serial: raw.serial_number,
        valid_before: raw.valid_before,
        chain,
        key,
    })
}

// ---------------------------------------------------------------------------
// Intentions and the default decision

#[derive(Deserialize)]
struct RawIntention {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    id: String,
    #[serde(rename = "SourceNS", default, deserialize_with = "nullable")]
    source_ns: String,
    #[serde(rename = "SourceName", default, deserialize_with = "nullable")]
    source_name: String,
    #[serde(rename = "SourcePartition", default, deserialize_with = "nullable")]
    source_partition: String,
    #[serde(rename = "SourcePeer", default, deserialize_with = "nullable")]
    source_peer: String,
    #[serde(rename = "SourceSamenessGroup", default, deserialize_with = "nullable")]
    source_sameness_group: String,
    #[serde(rename = "DestinationNS", default, deserialize_with = "nullable")]
    destination_ns: String,
    #[serde(rename = "DestinationName", default, deserialize_with = "nullable")]
    destination_name: String,
    #[serde(
        rename = "DestinationPartition",
        default,
        deserialize_with = "nullable"
    )]
    destination_partition: String,
    #[serde(rename = "Action", default, deserialize_with = "nullable")]
    action: String,
    /// L7 permissions (Consul 1.9+).
    #[serde(rename = "Permissions", default, deserialize_with = "nullable")]
    permissions: Vec<Value>,
}

/// Parses an intention list (`/v1/connect/intentions`, or one service's
/// list from `/v1/connect/intentions/match`) into veer-core intentions.
///
/// An L7 intention (with `Permissions`, Consul ≥ 1.9) keeps them in
/// [`Intention::permissions`] ([`permissions::parse`]) and has action
/// **deny**, which is what counts at L4, as in Consul's
/// `/agent/connect/authorize`; a permission veer cannot enforce makes the
/// intention a plain deny, with a warning. Intentions whose source is a
/// cluster peer or a sameness group are skipped (veer does not peer, and
/// their sources never match a local identity). Missing namespaces are
/// `default`; a missing source partition is the destination's.
pub fn parse_intentions(body: &[u8]) -> Result<(Vec<Intention>, Vec<String>), Error> {
    let raw: Vec<RawIntention> = json("/v1/connect/intentions", body)?;
    let mut out = Vec::with_capacity(raw.len());
    let mut warnings = Vec::new();
    for r in raw {
        if !r.source_peer.is_empty() || !r.source_sameness_group.is_empty() {
            continue;
        }
        let dest_part = or_default(&r.destination_partition);
        let src_part =
            non_empty(&r.source_partition).map_or_else(|| dest_part.clone(), str::to_string);
        let source = Target::new(&src_part, &or_default(&r.source_ns), r.source_name.trim());
        let destination = Target::new(
            &dest_part,
            &or_default(&r.destination_ns),
            r.destination_name.trim(),
        );
        let mut perms = Vec::new();
        let action = if !r.permissions.is_empty() {
            // Decided per request on an L7 inbound listener; `Deny` is what
            // counts at L4 (and what an unenforceable permission becomes).
            match permissions::parse(&r.permissions) {
                Ok(p) => perms = p,
                Err(e) => warnings.push(format!(
                    "intention {} ({source} => {destination}): {e}; the intention is enforced as deny",
                    r.id
                )),
            }
            Action::Deny
        } else {
            match Action::parse(r.action.trim()) {
                Some(a) => a,
                None => {
                    warnings.push(format!(
                        "intention {} ({source} => {destination}) has action {:?}; enforced as deny",
                        r.id, r.action
                    ));
                    Action::Deny
                }
            }
        };
        if r.source_name.trim().is_empty() || r.destination_name.trim().is_empty() {
            warnings.push(format!(
                "intention {} has an empty source or destination; skipped",
                r.id
            ));
            continue;
        }
        let mut i = Intention::new(source, destination, action);
        i.id = non_empty(&r.id).map(str::to_string);
        i.permissions = perms;
        out.push(i);
    }
    Ok((out, warnings))
}

/// Parses `service-intentions` config entries (Consul ≥ 1.9;
/// `GET /v1/config/service-intentions` lists them, one entry or a list is
/// accepted): each `Sources[]` item is one intention to the entry's
/// `Name`, read as [`parse_intentions`] reads the intention list
/// (`LegacyID` as its ID). Consul 1.8.7 refuses this kind.
pub fn parse_service_intentions(body: &[u8]) -> Result<(Vec<Intention>, Vec<String>), Error> {
    const WHAT: &str = "/v1/config/service-intentions";
    let v: Value = json(WHAT, body)?;
    let entries = match v {
        Value::Array(a) => a,
        o @ Value::Object(_) => vec![o],
        _ => return Err(Error::decode(WHAT, "not an entry or a list of entries")),
    };
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut list = Vec::new();
    for e in &entries {
        if !matches!(text(e, "Kind").as_str(), "" | "service-intentions") {
            continue;
        }
        for src in e
            .get("Sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            list.push(serde_json::json!({
                "ID": text(src, "LegacyID"),
                "SourceName": text(src, "Name"),
                "SourceNS": text(src, "Namespace"),
                "SourcePartition": text(src, "Partition"),
                "SourcePeer": text(src, "Peer"),
                "SourceSamenessGroup": text(src, "SamenessGroup"),
                "DestinationName": text(e, "Name"),
                "DestinationNS": text(e, "Namespace"),
                "DestinationPartition": text(e, "Partition"),
                "Action": text(src, "Action"),
                "Permissions": src.get("Permissions").cloned().unwrap_or(Value::Null),
            }));
        }
    }
    let bytes = serde_json::to_vec(&list).map_err(|e| Error::decode(WHAT, e))?;
    parse_intentions(&bytes)
}

/// Parses `/v1/connect/intentions/match?by=destination&name=<service>`
/// (an object keyed by the name) the same way as [`parse_intentions`].
pub fn parse_intentions_match(
    service: &str,
    body: &[u8],
) -> Result<(Vec<Intention>, Vec<String>), Error> {
    let mut m: HashMap<String, Value> = json("/v1/connect/intentions/match", body)?;
    let list = m.remove(service).unwrap_or(Value::Array(Vec::new()));
    let bytes =
        serde_json::to_vec(&list).map_err(|e| Error::decode("/v1/connect/intentions/match", e))?;
    parse_intentions(&bytes)
}

/// What a default-decision probe found out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DefaultProbe {
    /// The agent applied its default decision: this is it.
    Default(Action),
    /// An intention decided (a wildcard source matched the probe), so the
    /// answer says nothing about the default.
    Inconclusive(String),
}

#[derive(Deserialize)]
struct RawAuthorize {
    #[serde(rename = "Authorized", default, deserialize_with = "nullable")]
    authorized: bool,
    #[serde(rename = "Reason", default, deserialize_with = "nullable")]
    reason: String,
}

/// Interprets `POST /v1/agent/connect/authorize` for a source that no
/// intention can name exactly (see the crate docs). Consul 1.8.7's reasons
/// are "ACLs disabled, access is allowed by default" and "Default behavior
/// configured by ACLs" when no intention matched, "Matched intention: …"
/// (1.9+: "Matched L4 intention: …", "Matched L7 intention: …") otherwise.
/// Any other reason is inconclusive.
pub fn parse_authorize(body: &[u8]) -> Result<DefaultProbe, Error> {
    let raw: RawAuthorize = json("/v1/agent/connect/authorize", body)?;
    let action = if raw.authorized {
        Action::Allow
    } else {
        Action::Deny
    };
    let r = raw.reason.trim();
    if r.starts_with("ACLs disabled") || r.starts_with("Default behavior configured by ACLs") {
        Ok(DefaultProbe::Default(action))
    } else {
        Ok(DefaultProbe::Inconclusive(r.to_string()))
    }
}

/// The default decision from `/v1/agent/self` (needs `agent:read`):
/// ACLs off ⇒ allow, else `acl.default_policy`. `None` if the fields are absent.
pub fn default_from_agent_self(body: &[u8]) -> Result<Option<Action>, Error> {
    let v: Value = json("/v1/agent/self", body)?;
    let dc = &v["DebugConfig"];
    let Some(enabled) = dc["ACLsEnabled"].as_bool() else {
        return Ok(None);
    };
    if !enabled {
        return Ok(Some(Action::Allow));
    }
    let policy = dc["ACLDefaultPolicy"]
        .as_str()
        .or_else(|| dc["ACLResolverSettings"]["ACLDefaultPolicy"].as_str());
    Ok(policy.and_then(Action::parse))
}

// ---------------------------------------------------------------------------
// Catalog and health

/// Parses `/v1/catalog/services` into the set of service names.
pub fn parse_catalog_services(body: &[u8]) -> Result<BTreeSet<String>, Error> {
    let m: BTreeMap<String, Value> = json("/v1/catalog/services", body)?;
    Ok(m.into_keys().collect())
}

/// A stable fingerprint (FNV-1a, 64 bit) of some strings and numbers, for
/// telling whether a list entry changed between two answers.
#[derive(Clone, Copy, Debug)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Fingerprint {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    pub fn bytes(mut self, b: &[u8]) -> Fingerprint {
        for x in b.iter().chain([0xffu8].iter()) {
            self.0 ^= u64::from(*x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    pub fn num(self, n: u64) -> Fingerprint {
        self.bytes(&n.to_le_bytes())
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// Parses `/v1/catalog/services` into name → fingerprint of its tag list.
pub fn parse_catalog_tags(body: &[u8]) -> Result<BTreeMap<String, u64>, Error> {
    let m: BTreeMap<String, Option<Vec<String>>> = json("/v1/catalog/services", body)?;
    Ok(m.into_iter()
        .map(|(name, tags)| {
            let fp = tags
                .unwrap_or_default()
                .iter()
                .fold(Fingerprint::default(), |f, t| f.bytes(t.as_bytes()));
            (name, fp.get())
        })
        .collect())
}

#[derive(Deserialize)]
struct RawStateCheck {
    #[serde(rename = "Node", default, deserialize_with = "nullable")]
    node: String,
    #[serde(rename = "CheckID", default, deserialize_with = "nullable")]
    check_id: String,
    #[serde(rename = "Status", default, deserialize_with = "nullable")]
    status: String,
    #[serde(rename = "ServiceName", default, deserialize_with = "nullable")]
    service_name: String,
    #[serde(rename = "CreateIndex", default, deserialize_with = "nullable")]
    create_index: u64,
    #[serde(rename = "ModifyIndex", default, deserialize_with = "nullable")]
    modify_index: u64,
}

/// Every health check of the datacenter in a compact form, from
/// `/v1/health/state/any`: per service name and per node (node checks,
/// `ServiceName` empty) a fingerprint of its checks (node, ID, status,
/// modify index), and the raft indexes at which checks were created or
/// modified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChecksView {
    /// `X-Consul-Index` of the answer.
    pub index: u64,
    pub by_service: HashMap<String, u64>,
    pub by_node: HashMap<String, u64>,
    pub indexes: std::collections::HashSet<u64>,
}

/// Parses `/v1/health/state/any`. Fingerprints are combined with a sum so
/// that the order of the list does not matter.
pub fn parse_health_state(index: u64, body: &[u8]) -> Result<ChecksView, Error> {
    let raw: Vec<RawStateCheck> = json("/v1/health/state/any", body)?;
    let mut v = ChecksView {
        index,
        ..ChecksView::default()
    };
    for c in raw {
        let fp = Fingerprint::default()
            .bytes(c.node.as_bytes())
            .bytes(c.check_id.as_bytes())
            .bytes(c.status.as_bytes())
            .num(c.modify_index)
            .get();
        v.indexes.insert(c.create_index);
        v.indexes.insert(c.modify_index);
        let slot = if c.service_name.is_empty() {
            v.by_node.entry(c.node).or_insert(0)
        } else {
            v.by_service.entry(c.service_name).or_insert(0)
        };
        *slot = slot.wrapping_add(fp);
    }
    Ok(v)
}

#[derive(Deserialize, Default)]
struct RawNode {
    #[serde(rename = "Node", default, deserialize_with = "nullable")]
    node: String,
    #[serde(rename = "Address", default, deserialize_with = "nullable")]
    address: String,
    #[serde(rename = "Datacenter", default, deserialize_with = "nullable")]
    datacenter: String,
    #[serde(rename = "Partition", default, deserialize_with = "nullable")]
    partition: String,
    #[serde(rename = "TaggedAddresses", default, deserialize_with = "nullable")]
    tagged_addresses: HashMap<String, Value>,
}

#[derive(Deserialize, Default)]
struct RawHealthService {
    #[serde(rename = "ID", default, deserialize_with = "nullable")]
    id: String,
    #[serde(rename = "Service", default, deserialize_with = "nullable")]
    service: String,
    #[serde(rename = "Address", default, deserialize_with = "nullable")]
    address: String,
    #[serde(rename = "Port", default, deserialize_with = "nullable")]
    port: u16,
    #[serde(rename = "TaggedAddresses", default, deserialize_with = "nullable")]
    tagged_addresses: HashMap<String, Value>,
    #[serde(rename = "Partition", default, deserialize_with = "nullable")]
    partition: String,
    #[serde(rename = "Proxy", default)]
    proxy: Option<RawProxy>,
    #[serde(rename = "Weights", default)]
    weights: Option<RawWeights>,
}

#[derive(Deserialize, Default)]
struct RawCheck {
    #[serde(rename = "Status", default, deserialize_with = "nullable")]
    status: String,
}

/// `Service.Weights`: the instance's load-balancing weight while its checks
/// pass, and while one warns.
#[derive(Deserialize)]
struct RawWeights {
    #[serde(rename = "Passing", default)]
    passing: i64,
    #[serde(rename = "Warning", default)]
    warning: i64,
}

/// Consul's weight of an instance for Envoy: `Weights.Passing` (1 when the
/// instance has no weights), `Weights.Warning` while a check warns,
/// clamped to 128; 0 when the weight is below 1 (Consul then marks the
/// endpoint unhealthy: it gets no traffic).
fn instance_weight(w: Option<&RawWeights>, warning: bool) -> u32 {
    let Some(w) = w else { return 1 };
    let v = if warning { w.warning } else { w.passing };
    if v < 1 {
        0
    } else {
        v.min(128) as u32
    }
}

#[derive(Deserialize)]
struct RawHealthEntry {
    #[serde(rename = "Node", default)]
    node: Option<RawNode>,
    #[serde(rename = "Service", default)]
    service: Option<RawHealthService>,
    #[serde(rename = "Checks", default, deserialize_with = "nullable")]
    checks: Vec<RawCheck>,
}

/// The virtual addresses an instance carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Vips {
    /// `TaggedAddresses["virtual"]` (consul-k8s: the Kubernetes ClusterIP;
    /// veer on 1.8.7: whatever the operator registers).
    pub virtual_ip: Option<IpAddr>,
    /// `TaggedAddresses["consul-virtual"]` (auto-assigned, Consul 1.11+).
    pub consul_virtual: Option<IpAddr>,
}

fn tagged_ip(tagged: &HashMap<String, Value>, key: &str) -> Option<IpAddr> {
    let v = tagged.get(key)?;
    // `Address` in real answers; some documentation samples spell it `address`.
    let a = v
        .get("Address")
        .or_else(|| v.get("address"))
        .and_then(Value::as_str)
        .or_else(|| v.as_str())?;
    parse_ip(a)
}

fn vips(tagged: &HashMap<String, Value>) -> Vips {
    Vips {
        virtual_ip: tagged_ip(tagged, "virtual"),
        consul_virtual: tagged_ip(tagged, "consul-virtual"),
    }
}

/// One sidecar (or connect-native) instance of a service, from
/// `/v1/health/connect/:service`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectInstance {
    pub id: String,
    /// The instance's service name: the sidecar's (`web-sidecar-proxy`), or
    /// the service's own when it is connect-native.
    pub service: String,
    pub node: String,
    /// The node's datacenter: the datacenter of the instance's identity.
    pub datacenter: String,
    pub partition: String,
    /// `Service.Address`, falling back to `Node.Address`; `None` when it is
    /// not an IP address (e.g. a host name).
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// Every check of the instance and its node is passing (what `?passing`
    /// filters on).
    pub passing: bool,
    /// A check of the instance or its node is critical (Consul's Envoy
    /// marks such an endpoint unhealthy; a warning is unhealthy only for a
    /// subset with `OnlyPassing`).
    pub critical: bool,
    /// Its load-balancing weight (`Service.Weights`, see
    /// [`instance_weight`]): 1..=128, or 0 = not used (a weight below 1,
    /// which Consul's Envoy marks unhealthy).
    pub weight: u32,
    /// The address another datacenter dials (Consul's
    /// `BestAddress(wan=true)`): `Service.TaggedAddresses.wan`, else
    /// `Service.Address`, else `Node.TaggedAddresses.wan`, else
    /// `Node.Address`.
    pub wan: Option<SocketAddr>,
    pub vips: Vips,
    /// `Proxy.TransparentProxy.DialedDirectly` on the instance (1.10+).
    pub dialed_directly: bool,
}

impl ConnectInstance {
    /// The endpoint to dial: the proxy's public listener.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.ip
            .filter(|_| self.port != 0)
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// Consul's `BestAddress(wan=true)` of one instance.
fn wan_addr(node: &RawNode, svc: &RawHealthService) -> Option<SocketAddr> {
    if let Some(v) = svc.tagged_addresses.get("wan") {
        let ip = tagged_ip(&svc.tagged_addresses, "wan");
        let port = v.get("Port").and_then(Value::as_u64).unwrap_or(0);
        if let (Some(ip), Ok(port)) = (ip, u16::try_from(port)) {
            if port != 0 {
                return Some(SocketAddr::new(ip, port));
            }
        }
    }
    let ip = match non_empty(&svc.address) {
        Some(a) => parse_ip(a),
        None => tagged_ip(&node.tagged_addresses, "wan").or_else(|| parse_ip(&node.address)),
    }?;
    (svc.port != 0).then(|| SocketAddr::new(ip, svc.port))
}

/// Parses `/v1/health/connect/:service` (without `?passing`: health is
/// computed here so that an upstream whose instances are all failing stays
/// known, with no endpoints).
pub fn parse_health_connect(
    service: &str,
    body: &[u8],
) -> Result<(Vec<ConnectInstance>, Vec<String>), Error> {
    let what = format!("/v1/health/connect/{service}");
    let raw: Vec<RawHealthEntry> = json(&what, body)?;
    let mut out = Vec::with_capacity(raw.len());
    let mut warnings = Vec::new();
    for e in raw {
        let node = e.node.unwrap_or_default();
        let svc = e.service.unwrap_or_default();
        out.push(connect_instance(&what, node, svc, &e.checks, &mut warnings));
    }
    out.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    Ok((out, warnings))
}

/// One instance from its node, its service and the checks that bear on it
/// (the node's and its own).
fn connect_instance(
    what: &str,
    node: RawNode,
    svc: RawHealthService,
    checks: &[RawCheck],
    warnings: &mut Vec<String>,
) -> ConnectInstance {
    let addr = non_empty(&svc.address)
        .unwrap_or(node.address.as_str())
        .to_string();
    let ip = parse_ip(&addr);
    let wan = wan_addr(&node, &svc);
    if ip.is_none() {
        warnings.push(format!(
            "{what}: instance {} has address {addr:?}, which is not an IP address; not used",
            svc.id
        ));
    }
    ConnectInstance {
        weight: instance_weight(
            svc.weights.as_ref(),
            checks.iter().any(|c| c.status == "warning"),
        ),
        id: svc.id,
        service: svc.service,
        node: node.node,
        datacenter: node.datacenter,
        partition: or_default(non_empty(&svc.partition).unwrap_or(&node.partition)),
        ip,
        port: svc.port,
        passing: checks.iter().all(|c| c.status == "passing"),
        critical: checks.iter().any(|c| c.status == "critical"),
        wan,
        vips: vips(&svc.tagged_addresses),
        dialed_directly: svc
            .proxy
            .as_ref()
            .and_then(|p| p.transparent_proxy.as_ref())
            .is_some_and(|t| t.dialed_directly),
    }
}

/// The filter that makes `/v1/internal/ui/nodes` give the nodes running a
/// mesh gateway (Consul 1.8.7 has no filter on `/v1/catalog/services`,
/// and `/v1/health/service/:name` needs the name).
pub const GATEWAY_NODES_FILTER: &str = "Services.Kind contains \"mesh-gateway\"";

#[derive(Deserialize)]
struct RawNodeDumpService {
    #[serde(rename = "Kind", default, deserialize_with = "nullable")]
    kind: String,
    #[serde(flatten)]
    service: RawHealthService,
}

#[derive(Deserialize)]
struct RawNodeDumpCheck {
    #[serde(rename = "ServiceID", default, deserialize_with = "nullable")]
    service_id: String,
    #[serde(rename = "Status", default, deserialize_with = "nullable")]
    status: String,
}

#[derive(Deserialize)]
struct RawNodeDump {
    #[serde(flatten)]
    node: RawNode,
    #[serde(rename = "Services", default, deserialize_with = "nullable")]
    services: Vec<RawNodeDumpService>,
    #[serde(rename = "Checks", default, deserialize_with = "nullable")]
    checks: Vec<RawNodeDumpCheck>,
}

/// Parses `/v1/internal/ui/nodes?dc=<dc>&filter=`[`GATEWAY_NODES_FILTER`]:
/// the mesh gateways of `dc`, found by their kind whatever their service
/// name (as Consul finds them), each with the health of its node's checks
/// and its own.
pub fn parse_gateway_nodes(
    dc: &str,
    body: &[u8],
) -> Result<(Vec<ConnectInstance>, Vec<String>), Error> {
    let what = format!("/v1/internal/ui/nodes?dc={dc} (mesh gateways)");
    let raw: Vec<RawNodeDump> = json(&what, body)?;
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for n in raw {
        for s in n.services {
            if s.kind != "mesh-gateway" {
                continue;
            }
            let checks: Vec<RawCheck> = n
                .checks
                .iter()
                .filter(|c| c.service_id.is_empty() || c.service_id == s.service.id)
                .map(|c| RawCheck {
                    status: c.status.clone(),
                })
                .collect();
            let node = RawNode {
                node: n.node.node.clone(),
                address: n.node.address.clone(),
                // The node dump does not say; the watch is for `dc`.
                datacenter: if n.node.datacenter.is_empty() {
                    dc.to_string()
                } else {
                    n.node.datacenter.clone()
                },
                partition: n.node.partition.clone(),
                tagged_addresses: n.node.tagged_addresses.clone(),
            };
            out.push(connect_instance(
                &what,
                node,
                s.service,
                &checks,
                &mut warnings,
            ));
        }
    }
    out.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    Ok((out, warnings))
}

#[derive(Deserialize)]
struct RawCatalogEntry {
    #[serde(rename = "ServiceID", default, deserialize_with = "nullable")]
    service_id: String,
    #[serde(rename = "ServiceKind", default, deserialize_with = "nullable")]
    service_kind: String,
    #[serde(
        rename = "ServiceTaggedAddresses",
        default,
        deserialize_with = "nullable"
    )]
    service_tagged_addresses: HashMap<String, Value>,
    #[serde(rename = "Partition", default, deserialize_with = "nullable")]
    partition: String,
    #[serde(rename = "ServiceProxy", default)]
    service_proxy: Option<RawProxyDestination>,
}

#[derive(Deserialize)]
struct RawProxyDestination {
    #[serde(
        rename = "DestinationServiceName",
        default,
        deserialize_with = "nullable"
    )]
    destination_service_name: String,
}

/// One instance of the destination service itself, from
/// `/v1/catalog/service/:service` (only its virtual addresses matter).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CatalogInstance {
    pub id: String,
    pub kind: String,
    pub partition: String,
    pub vips: Vips,
    /// `ServiceProxy.DestinationServiceName` (proxies only).
    pub destination: String,
}

/// Parses `/v1/catalog/service/:service`.
pub fn parse_catalog_service(service: &str, body: &[u8]) -> Result<Vec<CatalogInstance>, Error> {
    let raw: Vec<RawCatalogEntry> = json(&format!("/v1/catalog/service/{service}"), body)?;
    // `extend`, not `collect`: collecting in place would keep the raw
    // entries' larger buffer for as long as the instances are kept.
    let mut out: Vec<CatalogInstance> = Vec::with_capacity(raw.len());
    out.extend(raw.into_iter().map(|r| {
        CatalogInstance {
            id: r.service_id,
            kind: r.service_kind,
            partition: or_default(&r.partition),
            vips: vips(&r.service_tagged_addresses),
            destination: r
                .service_proxy
                .map(|p| p.destination_service_name)
                .unwrap_or_default(),
        }
    }));
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

// ---------------------------------------------------------------------------
// Config entries

#[derive(Deserialize)]
struct RawConfigEntry {
    #[serde(rename = "Kind", default, deserialize_with = "nullable")]
    kind: String,
    #[serde(rename = "Name", default, deserialize_with = "nullable")]
    name: String,
    #[serde(rename = "Protocol", default, deserialize_with = "nullable")]
    protocol: String,
    #[serde(rename = "Mode", default, deserialize_with = "nullable")]
    mode: String,
    #[serde(rename = "TransparentProxy", default)]
    transparent_proxy: Option<RawTransparentProxy>,
    #[serde(rename = "Config", default, deserialize_with = "nullable")]
    config: serde_json::Map<String, Value>,
}

/// A `service-defaults` entry, as veer uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceDefaults {
    pub protocol: Option<String>,
    pub mode: Option<Mode>,
    pub outbound_port: Option<u16>,
    /// `TransparentProxy.DialedDirectly` (1.10+).
    pub dialed_directly: bool,
}

/// Parses `/v1/config/service-defaults` (all entries) into a map by name.
pub fn parse_service_defaults(body: &[u8]) -> Result<BTreeMap<String, ServiceDefaults>, Error> {
    let raw: Vec<RawConfigEntry> = json("/v1/config/service-defaults", body)?;
    Ok(raw
        .into_iter()
        .filter(|r| r.kind.is_empty() || r.kind == "service-defaults")
        .map(|r| {
            let tp = r.transparent_proxy.unwrap_or_default();
            (
                r.name,
                ServiceDefaults {
                    protocol: non_empty(&r.protocol).map(str::to_string),
                    mode: non_empty(&r.mode).map(|m| parse_mode(Some(m))),
                    outbound_port: (tp.outbound_listener_port != 0)
                        .then_some(tp.outbound_listener_port),
                    dialed_directly: tp.dialed_directly,
                },
            )
        })
        .collect())
}

/// The `proxy-defaults` entry `global`, as veer uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyDefaults {
    /// `Config.protocol`.
    pub protocol: Option<String>,
    pub mode: Option<Mode>,
    pub outbound_port: Option<u16>,
}

/// Parses `/v1/config/proxy-defaults` (all entries; only `global` exists).
pub fn parse_proxy_defaults(body: &[u8]) -> Result<ProxyDefaults, Error> {
    let raw: Vec<RawConfigEntry> = json("/v1/config/proxy-defaults", body)?;
    let Some(g) = raw.into_iter().find(|r| r.name == "global") else {
        return Ok(ProxyDefaults::default());
    };
    let tp = g.transparent_proxy.unwrap_or_default();
    Ok(ProxyDefaults {
        protocol: weak_str(g.config.get("protocol")),
        mode: non_empty(&g.mode).map(|m| parse_mode(Some(m))),
        outbound_port: (tp.outbound_listener_port != 0).then_some(tp.outbound_listener_port),
    })
}

/// The `mesh` config entry (Consul 1.10+).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mesh {
    /// The agent does not know the kind (Consul < 1.10 answers HTTP 500
    /// "invalid config entry kind: mesh").
    Unsupported,
    /// Supported, but no entry is written (HTTP 404).
    Absent,
    Present {
        mesh_destinations_only: bool,
    },
}

impl Mesh {
    pub fn mesh_destinations_only(&self) -> bool {
        matches!(
            self,
            Mesh::Present {
                mesh_destinations_only: true
            }
        )
    }
}

/// Interprets the answer to `GET /v1/config/mesh/mesh`.
pub fn parse_mesh(status: u16, body: &[u8]) -> Result<Mesh, Error> {
    let what = "/v1/config/mesh/mesh";
    let text = String::from_utf8_lossy(body);
    match status {
        200 => {
            let v: Value = json(what, body)?;
            Ok(Mesh::Present {
                mesh_destinations_only: v["TransparentProxy"]["MeshDestinationsOnly"]
                    .as_bool()
                    .unwrap_or(false),
            })
        }
        404 => Ok(Mesh::Absent),
        400 | 500 if text.contains("invalid config entry kind") => Ok(Mesh::Unsupported),
        403 => Err(Error::PermissionDenied {
            path: what.into(),
            body: text.trim().to_string(),
        }),
        s => Err(Error::Status {
            path: what.into(),
            status: s,
            body: text.trim().to_string(),
        }),
    }
}

pub mod permissions;

#[cfg(test)]
mod tests;
