//! The static TOML configuration file and its validation.
//!
//! Every mistake names the file, the line and the key:
//! `veer.toml:14: upstreams[0].virtual_ips: "10.96.0.x" is not an IP address`.
//! [`load`] reads the file and the files it names and returns a [`Spec`]
//! ready for [`Snapshot::build`](crate::snapshot::Snapshot::build).
use crate::intentions::{Action, Intention, Target};
use crate::route::Protocol;
use crate::snapshot::{
    ExposePath, ListenSpec, SnapshotError, Spec, TargetSpec, Timeouts, UpstreamSpec,
};
use crate::spiffe::ServiceId;
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// A configuration mistake, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The key path, e.g. `upstreams[1].endpoints`.
    pub key: Option<String>,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": ")?;
        if let Some(k) = &self.key {
            write!(f, "{k}: ")?;
        }
        write!(f, "{}", self.msg)
    }
}

impl std::error::Error for ConfigError {}

type S<T> = Spanned<T>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    service: S<ServiceSection>,
    tls: S<TlsSection>,
    #[serde(default)]
    inbound: InboundSection,
    #[serde(default)]
    outbound: OutboundSection,
    #[serde(default)]
    intentions: IntentionsSection,
    #[serde(default)]
    upstreams: Vec<S<UpstreamSection>>,
    #[serde(default)]
    timeouts: TimeoutsSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    mux: MuxSection,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    expose: Vec<S<ExposeSection>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    /// The admin endpoint; "" turns it off. Default 127.0.0.1:19000.
    bind: Option<S<String>>,
    /// A second listener serving only `/stats/prometheus` (and `/metrics`,
    /// `/ready`), like Consul's `envoy_prometheus_bind_addr`. Default off.
    prometheus_bind: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExposeSection {
    listener: S<String>,
    path: S<String>,
    local_path_port: S<i64>,
    protocol: Option<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: S<String>,
    namespace: Option<S<String>>,
    partition: Option<S<String>>,
    datacenter: S<String>,
    trust_domain: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    ca_file: S<String>,
    cert_file: S<String>,
    key_file: S<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InboundSection {
    bind: Option<S<String>>,
    local_app: Option<S<String>>,
    /// Original destination ports relayed as plain TCP (permissive mTLS).
    #[serde(default)]
    permissive_ports: Vec<u16>,
    /// The local service's protocol and its L7 settings ([`l7inbound`]).
    protocol: Option<S<String>>,
    xfcc: Option<S<String>>,
    request_timeout: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OutboundSection {
    bind: Option<S<String>>,
    /// The IPv6 outbound listener; "" turns it off. Default `[::1]:<port of bind>`.
    bind_ipv6: Option<S<String>>,
    #[serde(default)]
    mesh_destinations_only: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IntentionsSection {
    default_action: Option<S<String>>,
    #[serde(default)]
    rules: Vec<S<RuleSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSection {
    source: S<String>,
    source_namespace: Option<S<String>>,
    source_partition: Option<S<String>>,
    /// Required unless `permissions` decide (then not allowed, as in Consul).
    action: Option<S<String>>,
    #[serde(default)]
    permissions: Vec<S<l7inbound::PermissionSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamSection {
    name: S<String>,
    namespace: Option<S<String>>,
    partition: Option<S<String>>,
    datacenter: Option<S<String>>,
    #[serde(default)]
    virtual_ips: Vec<S<String>>,
    #[serde(default)]
    endpoints: Vec<S<String>>,
    #[serde(default)]
    dialed_directly: bool,
    #[serde(default)]
    instances: Vec<S<String>>,
    local_bind: Option<S<String>>,
    protocol: Option<S<String>>,
    connect_timeout: Option<S<String>>,
    /// The primary target's subset (its SNI gets the `<subset>.` prefix).
    subset: Option<S<String>>,
    /// The targets after the primary one, in failover order.
    #[serde(default)]
    failover: Vec<S<FailoverSection>>,
    /// More destinations for `routes` (an http-like upstream).
    #[serde(default)]
    clusters: Vec<S<http::ClusterSection>>,
    /// HTTP routes, in order (an http-like upstream).
    #[serde(default)]
    routes: Vec<S<http::RouteSection>>,
}

/// `[[upstreams.failover]]`: one failover target. Name, namespace and
/// partition default to the upstream's, the datacenter to the local one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverSection {
    name: Option<S<String>>,
    namespace: Option<S<String>>,
    partition: Option<S<String>>,
    datacenter: Option<S<String>>,
    subset: Option<S<String>>,
    #[serde(default)]
    endpoints: Vec<S<String>>,
    connect_timeout: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TimeoutsSection {
    connect: Option<S<String>>,
    local_connect: Option<S<String>>,
    handshake: Option<S<String>>,
    idle: Option<S<String>>,
    half_close: Option<S<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    /// Connections open at once per listener; default 100,000.
    max_connections: Option<S<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MuxSection {
    /// veer <-> veer multiplexing (HTTP/2 CONNECT streams over pooled
    /// mTLS); default on.
    enabled: Option<bool>,
}

/// Resolves spans to lines and builds errors.
struct Ctx<'a> {
    file: String,
    src: &'a str,
    dir: PathBuf,
}

impl Ctx<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        self.src[..span.start.min(self.src.len())]
            .matches('\n')
            .count()
            + 1
    }
    fn err(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: Some(self.line(span)),
            key: Some(key.into()),
            msg: msg.into(),
        }
    }
    fn name(&self, v: &S<String>, key: &str) -> Result<String, ConfigError> {
        let s = v.get_ref();
        if s.is_empty()
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(self.err(
                v.span(),
                key,
                format!("{s:?} is not a valid name ([A-Za-z0-9._-]+)"),
            ));
        }
        Ok(s.clone())
    }
    fn opt_name(
        &self,
        v: &Option<S<String>>,
        key: &str,
        default: &str,
    ) -> Result<String, ConfigError> {
        match v {
            Some(v) => self.name(v, key),
            None => Ok(default.to_string()),
        }
    }
    fn sockaddr(&self, v: &S<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        v.get_ref().parse().map_err(|_| {
            self.err(
                v.span(),
                key,
                format!(
                    "{:?} is not an address of the form IP:PORT (IPv6 as [::1]:PORT)",
                    v.get_ref()
                ),
            )
        })
    }
    fn ip(&self, v: &S<String>, key: &str) -> Result<IpAddr, ConfigError> {
        v.get_ref().parse().map_err(|_| {
            self.err(
                v.span(),
                key,
                format!("{:?} is not an IP address", v.get_ref()),
            )
        })
    }
    fn duration(
        &self,
        v: &Option<S<String>>,
        key: &str,
        default: std::time::Duration,
    ) -> Result<std::time::Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(v) => crate::duration::parse(v.get_ref()).map_err(|m| self.err(v.span(), key, m)),
        }
    }
    /// `file:line: key`, for a value set in the file, else
    /// `file: key (default)`.
    fn at(&self, v: Option<&S<String>>, key: &str) -> String {
        match v {
            Some(v) => format!("{}:{}: {key}", self.file, self.line(v.span())),
            None => format!("{}: {key} (default)", self.file),
        }
    }
    fn path(&self, v: &S<String>) -> PathBuf {
        let p = Path::new(v.get_ref());
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }
}

/// Where the admin endpoint listens, as the `[admin] bind` key says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdminBind {
    /// Not set: the default address (127.0.0.1:19000).
    #[default]
    Default,
    /// `bind = ""`: no admin endpoint.
    Off,
    Addr(SocketAddr),
}

impl AdminBind {
    /// The admin endpoint's default address, as Envoy's under Consul.
    pub const DEFAULT: &'static str = "127.0.0.1:19000";

    /// Parses a command-line or file value: `""` is [`AdminBind::Off`].
    pub fn parse(s: &str) -> Result<AdminBind, String> {
        if s.is_empty() {
            return Ok(AdminBind::Off);
        }
        s.parse().map(AdminBind::Addr).map_err(|_| {
            format!(
                "{s:?} is not an address of the form IP:PORT (IPv6 as [::1]:PORT), or \"\" for off"
            )
        })
    }

    /// The address to bind, if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            AdminBind::Default => Some(Self::DEFAULT.parse().expect("default admin address")),
            AdminBind::Off => None,
            AdminBind::Addr(a) => Some(*a),
        }
    }
}

/// The `[admin]` section. Read once at start (not part of the snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct AdminSpec {
    pub bind: AdminBind,
    /// The separate Prometheus listener; `None` (the default) is off.
    pub prometheus_bind: Option<SocketAddr>,
}

/// A loaded configuration: the spec and the files to watch for changes.
#[derive(Debug)]
pub struct Loaded {
    pub spec: Spec,
    /// The config file and every file it names.
    pub files: Vec<PathBuf>,
    /// The `[admin]` section.
    pub admin: AdminSpec,
    /// Every listen address the file configures, with where it is set
    /// (`veer.toml:14: upstreams[2].local_bind`; `veer.toml: admin.bind
    /// (default)` when the key is not written): [`Loaded::key_of`].
    pub listeners: Vec<(SocketAddr, String)>,
}

impl Loaded {
    /// Where the file sets listen address `addr` (`file:line: key`), to
    /// name it when the address cannot be bound.
    pub fn key_of(&self, addr: SocketAddr) -> Option<&str> {
        self.listeners
            .iter()
            .find(|(a, _)| *a == addr)
            .map(|(_, k)| k.as_str())
    }
}

/// Whether two listen addresses would collide (same port, and the same IP
/// or either one the wildcard).
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The key path (`upstreams[1].local_bind`, `limits`) of the innermost
/// value whose span holds `span`: where a type error or a missing field is.
fn key_at(src: &str, span: Range<usize>) -> Option<String> {
    use toml::de::{DeTable, DeValue};
    // Tables' spans cover only their headers, so every child is searched.
    fn inside(r: Range<usize>, span: &Range<usize>) -> bool {
        r.start <= span.start && span.end <= r.end
    }
    fn walk(v: &DeValue<'_>, span: &Range<usize>, path: &mut String) -> bool {
        let before = path.len();
        match v {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k.get_ref());
                    let here = inside(v.span(), span) || inside(k.span(), span);
                    if walk(v.get_ref(), span, path) || here {
                        return true;
                    }
                    path.truncate(before);
                }
            }
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    path.push_str(&format!("[{i}]"));
                    if walk(v.get_ref(), span, path) || inside(v.span(), span) {
                        return true;
                    }
                    path.truncate(before);
                }
            }
            _ => {}
        }
        false
    }
    let doc = DeTable::parse(src).ok()?;
    let mut path = String::new();
    walk(&DeValue::Table(doc.into_inner()), &span, &mut path).then_some(path)
}

/// serde's messages in words a person reading a config file knows:
/// `invalid type: string "1000", expected i64` becomes
/// `expected a number, found the string "1000"`.
fn explain_serde(msg: &str) -> String {
    let Some(rest) = msg.strip_prefix("invalid type: ") else {
        if let Some(f) = msg.strip_prefix("missing field ") {
            return format!("the required key {f} is missing");
        }
        return msg.to_string();
    };
    let Some((found, expected)) = rest.split_once(", expected ") else {
        return msg.to_string();
    };
    let expected = match expected {
        "i64" | "u64" | "i32" | "u32" | "u16" | "usize" => "a number (without quotes)",
        "a string" => "a string (in quotes)",
        "a boolean" => "true or false",
        "a sequence" => "a list [...]",
        e => e,
    };
    format!("expected {expected}, found {found}")
}

/// Reads and validates a configuration file, and the files it names.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.display().to_string(),
        line: None,
        key: None,
        msg: format!("cannot read: {e}"),
    })?;
    parse(&src, path)
}

/// Parses configuration text; relative paths are taken from `path`'s folder.
pub fn parse(src: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let cx = Ctx {
        file: path.display().to_string(),
        src,
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let file: File = toml::from_str(src).map_err(|e| {
        let line = e.span().map(|s| cx.line(s));
        let key = e.span().and_then(|s| key_at(src, s));
        ConfigError {
            file: cx.file.clone(),
            line,
            key,
            msg: explain_serde(e.message().trim()),
        }
    })?;

    // [service]
    let svc = file.service.get_ref();
    let trust_domain = svc.trust_domain.get_ref().clone();
    if trust_domain.is_empty()
        || !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err(cx.err(
            svc.trust_domain.span(),
            "service.trust_domain",
            format!("{trust_domain:?} is not a trust domain (lowercase, e.g. <uuid>.consul)"),
        ));
    }
    let identity = ServiceId::new(
        &trust_domain,
        &cx.opt_name(&svc.partition, "service.partition", "default")?,
        &cx.opt_name(&svc.namespace, "service.namespace", "default")?,
        &cx.name(&svc.datacenter, "service.datacenter")?,
        &cx.name(&svc.name, "service.name")?,
    );

    // [tls]
    let tls = file.tls.get_ref();
    let ca = cx.path(&tls.ca_file);
    let cert = cx.path(&tls.cert_file);
    let key = cx.path(&tls.key_file);
    let roots = crate::tls::load_certs(&ca)
        .map_err(|e| cx.err(tls.ca_file.span(), "tls.ca_file", e.to_string()))?;
    let chain = crate::tls::load_certs(&cert)
        .map_err(|e| cx.err(tls.cert_file.span(), "tls.cert_file", e.to_string()))?;
    let key_der = crate::tls::load_key(&key)
        .map_err(|e| cx.err(tls.key_file.span(), "tls.key_file", e.to_string()))?;

    // [inbound]
    let inbound = match &file.inbound.bind {
        Some(b) => cx.sockaddr(b, "inbound.bind")?,
        None => "0.0.0.0:20000".parse().unwrap(),
    };
    let local_app = match &file.inbound.local_app {
        Some(b) => cx.sockaddr(b, "inbound.local_app")?,
        None => "127.0.0.1:8080".parse().unwrap(),
    };

    if clash(inbound, local_app) {
        let span = file
            .inbound
            .local_app
            .as_ref()
            .or(file.inbound.bind.as_ref());
        return Err(cx.err(
            span.map(|v| v.span()).unwrap_or(0..0),
            if file.inbound.local_app.is_some() {
                "inbound.local_app"
            } else {
                "inbound.bind"
            },
            format!(
                "the local app {local_app} is veer's own inbound listener {inbound}: connections would loop back into veer"
            ),
        ));
    }

    // [outbound]
    let ob = &file.outbound;
    let out4 = match &ob.bind {
        Some(b) => cx.sockaddr(b, "outbound.bind")?,
        None => "127.0.0.1:15001".parse().unwrap(),
    };
    for (key, v, addr) in [
        ("outbound.bind", &ob.bind, Some(out4)),
        (
            "outbound.bind_ipv6",
            &ob.bind_ipv6,
            match &ob.bind_ipv6 {
                Some(b) if !b.get_ref().is_empty() => Some(cx.sockaddr(b, "outbound.bind_ipv6")?),
                _ => None,
            },
        ),
    ] {
        if let Some(addr) = addr.filter(|a| clash(*a, inbound)) {
            let span = v.as_ref().or(file.inbound.bind.as_ref());
            return Err(cx.err(
                span.map(|v| v.span()).unwrap_or(0..0),
                if v.is_some() { key } else { "inbound.bind" },
                format!("{addr} collides with the inbound listener on {inbound}"),
            ));
        }
    }
    let mut outbound = vec![out4];
    match &ob.bind_ipv6 {
        Some(b) if b.get_ref().is_empty() => {}
        Some(b) => outbound.push(cx.sockaddr(b, "outbound.bind_ipv6")?),
        None => outbound.push(SocketAddr::new("::1".parse().unwrap(), out4.port())),
    }

    // [inbound] protocol and its L7 settings
    let inbound_http = l7inbound::inbound(
        &cx,
        &file.inbound.protocol,
        &file.inbound.xfcc,
        &file.inbound.request_timeout,
    )?;

    // [intentions]
    let default_action = match &file.intentions.default_action {
        None => Action::Deny,
        Some(a) => Action::parse(a.get_ref()).ok_or_else(|| {
            cx.err(
                a.span(),
                "intentions.default_action",
                format!("{:?} is not \"allow\" or \"deny\"", a.get_ref()),
            )
        })?,
    };
    let destination = Target::new(&identity.partition, &identity.namespace, &identity.service);
    let mut intentions = Vec::new();
    for (i, r) in file.intentions.rules.iter().enumerate() {
        let k = |f: &str| format!("intentions.rules[{i}].{f}");
        let r = r.get_ref();
        let src_name = if r.source.get_ref() == "*" {
            "*".to_string()
        } else {
            cx.name(&r.source, &k("source"))?
        };
        let src_ns = match &r.source_namespace {
            Some(v) if v.get_ref() == "*" => "*".to_string(),
            v => cx.opt_name(v, &k("source_namespace"), "default")?,
        };
        if src_ns == "*" && src_name != "*" {
            return Err(cx.err(
                r.source.span(),
                k("source"),
                "an exact source name cannot follow a wildcard source namespace (as in Consul)",
            ));
        }
        let src_part = cx.opt_name(
            &r.source_partition,
            &k("source_partition"),
            &identity.partition,
        )?;
        let permissions = l7inbound::permissions(&cx, i, &r.permissions)?;
        let action = match (&r.action, permissions.is_empty()) {
            (Some(a), true) => Action::parse(a.get_ref()).ok_or_else(|| {
                cx.err(
                    a.span(),
                    k("action"),
                    format!("{:?} is not \"allow\" or \"deny\"", a.get_ref()),
                )
            })?,
            (None, true) => {
                return Err(cx.err(r.source.span(), k("action"), "missing (allow or deny)"))
            }
            (Some(a), false) => {
                return Err(cx.err(
                    a.span(),
                    k("action"),
                    "not with permissions: they decide (as in Consul)",
                ))
            }
            (None, false) if inbound_http.is_none() => {
                return Err(cx.err(
                    r.source.span(),
                    k("permissions"),
                    "L7 permissions need [inbound] protocol http, http2 or grpc (Consul refuses them for tcp services)",
                ))
            }
            (None, false) => Action::Deny,
        };
        let source = Target::new(&src_part, &src_ns, &src_name);
        if let Some(j) = intentions
            .iter()
            .position(|o: &Intention| o.source == source)
        {
            return Err(cx.err(
                r.source.span(),
                k("source"),
                format!(
                    "{source} already has a rule (intentions.rules[{j}]); one rule per source (Consul refuses duplicate intentions)"
                ),
            ));
        }
        let mut ixn = Intention::new(source, destination.clone(), action);
        ixn.permissions = permissions;
        intentions.push(ixn);
    }

    // [timeouts]
    let d = Timeouts::default();
    let t = &file.timeouts;
    let timeouts = Timeouts {
        connect: cx.duration(&t.connect, "timeouts.connect", d.connect)?,
        local_connect: cx.duration(&t.local_connect, "timeouts.local_connect", d.local_connect)?,
        handshake: cx.duration(&t.handshake, "timeouts.handshake", d.handshake)?,
        idle: cx.duration(&t.idle, "timeouts.idle", d.idle)?,
        half_close: cx.duration(&t.half_close, "timeouts.half_close", d.half_close)?,
        max_connections: match &file.limits.max_connections {
            None => d.max_connections,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    cx.err(
                        v.span(),
                        "limits.max_connections",
                        format!("{} is not a positive number of connections", v.get_ref()),
                    )
                })?,
        },
        mux: file.mux.enabled.unwrap_or(d.mux),
    };

    // [[upstreams]]
    let mut upstreams: Vec<UpstreamSpec> = Vec::new();
    let mut binds: Vec<SocketAddr> = vec![inbound];
    binds.extend(outbound.iter().copied());
    for (i, u) in file.upstreams.iter().enumerate() {
        let k = |f: &str| format!("upstreams[{i}].{f}");
        let span = u.span();
        let u = u.get_ref();
        let id = ServiceId::new(
            &trust_domain,
            &cx.opt_name(&u.partition, &k("partition"), "default")?,
            &cx.opt_name(&u.namespace, &k("namespace"), "default")?,
            &cx.opt_name(&u.datacenter, &k("datacenter"), &identity.datacenter)?,
            &cx.name(&u.name, &k("name"))?,
        );
        // One entry per upstream, as Consul refuses duplicate upstreams in
        // a proxy registration (same destination name, namespace, partition
        // and datacenter): one entry takes a service's virtual IPs, its
        // `local_bind` listener and its dialed-directly instances.
        if let Some(j) = upstreams.iter().position(|o| o.identity == id) {
            return Err(cx.err(
                u.name.span(),
                k("name"),
                format!(
                    "{:?} is already upstreams[{j}] (line {}); one entry per upstream service \
                     (Consul refuses duplicate upstreams too): give that entry the virtual_ips, \
                     local_bind or dialed_directly instances",
                    u.name.get_ref(),
                    cx.line(file.upstreams[j].get_ref().name.span()),
                ),
            ));
        }
        let mut spec = UpstreamSpec::new(id);
        if let Some(p) = &u.protocol {
            spec.protocol = Protocol::parse(p.get_ref()).ok_or_else(|| {
                cx.err(
                    p.span(),
                    k("protocol"),
                    format!("{:?} is not one of tcp, http, http2, grpc", p.get_ref()),
                )
            })?;
        }
        for v in &u.virtual_ips {
            spec.virtual_ips.push(cx.ip(v, &k("virtual_ips"))?);
        }
        for v in &u.endpoints {
            spec.endpoints.push(cx.sockaddr(v, &k("endpoints"))?);
        }
        for v in &u.instances {
            spec.instances.push(cx.ip(v, &k("instances"))?);
        }
        spec.dialed_directly = u.dialed_directly;
        if !u.instances.is_empty() && !u.dialed_directly {
            return Err(cx.err(
                span,
                k("instances"),
                "instances are only used with dialed_directly = true",
            ));
        }
        if u.dialed_directly && u.instances.is_empty() {
            return Err(cx.err(
                span,
                k("instances"),
                "dialed_directly = true needs at least one instance address",
            ));
        }
        if let Some(b) = &u.local_bind {
            let addr = cx.sockaddr(b, &k("local_bind"))?;
            if binds.contains(&addr) {
                return Err(cx.err(
                    b.span(),
                    k("local_bind"),
                    format!("{addr} is already used by another listener"),
                ));
            }
            binds.push(addr);
            spec.local_bind = Some(addr);
        }
        if let Some(t) = &u.connect_timeout {
            spec.connect_timeout = Some(
                crate::duration::parse(t.get_ref())
                    .map_err(|m| cx.err(t.span(), k("connect_timeout"), m))?,
            );
        }
        if let Some(sub) = &u.subset {
            let sub = cx.name(sub, &k("subset"))?;
            spec.sni = Some(format!("{sub}.{}", spec.identity.sni()));
        }
        for (j, f) in u.failover.iter().enumerate() {
            let fk = |x: &str| format!("upstreams[{i}].failover[{j}].{x}");
            let fspan = f.span();
            let f = f.get_ref();
            let id = ServiceId::new(
                &trust_domain,
                &cx.opt_name(&f.partition, &fk("partition"), &spec.identity.partition)?,
                &cx.opt_name(&f.namespace, &fk("namespace"), &spec.identity.namespace)?,
                &cx.opt_name(&f.datacenter, &fk("datacenter"), &identity.datacenter)?,
                &cx.opt_name(&f.name, &fk("name"), &spec.identity.service)?,
            );
            let mut t = TargetSpec::new(id);
            if let Some(sub) = &f.subset {
                let sub = cx.name(sub, &fk("subset"))?;
                t.sni = Some(format!("{sub}.{}", t.identity.sni()));
            }
            for v in &f.endpoints {
                t.endpoints.push(cx.sockaddr(v, &fk("endpoints"))?);
            }
            if t.endpoints.is_empty() {
                return Err(cx.err(fspan, fk("endpoints"), "a failover target needs endpoints"));
            }
            t.connect_timeout = match &f.connect_timeout {
                Some(c) => Some(
                    crate::duration::parse(c.get_ref())
                        .map_err(|m| cx.err(c.span(), fk("connect_timeout"), m))?,
                ),
                None => spec.connect_timeout,
            };
            spec.failover.push(t);
        }
        if u.dialed_directly && !u.failover.is_empty() {
            return Err(cx.err(
                span,
                k("failover"),
                "failover targets apply to upstreams reached by virtual IP or local_bind, not to dialed_directly instances",
            ));
        }
        if spec.virtual_ips.is_empty() && spec.local_bind.is_none() && !spec.dialed_directly {
            return Err(cx.err(
                span,
                format!("upstreams[{i}]"),
                "an upstream needs virtual_ips, local_bind or dialed_directly to be reachable",
            ));
        }
        if (!spec.virtual_ips.is_empty() || spec.local_bind.is_some())
            && spec.endpoints.is_empty()
            && spec.failover.is_empty()
        {
            return Err(cx.err(
                span,
                k("endpoints"),
                "an upstream reached by virtual IP or local_bind needs endpoints",
            ));
        }
        spec.http = http::routes(
            &cx,
            i,
            span,
            &spec,
            &u.clusters,
            &u.routes,
            &trust_domain,
            &identity.datacenter,
        )?;
        upstreams.push(spec);
    }
    // An address is either a virtual IP or a dialed-directly instance.
    for (i, u) in upstreams.iter().enumerate() {
        for (j, o) in upstreams.iter().enumerate() {
            if let Some(ip) = o.instances.iter().find(|ip| u.virtual_ips.contains(ip)) {
                let entry = file.upstreams[j].get_ref();
                let span = entry
                    .instances
                    .iter()
                    .find(|v| v.get_ref().parse::<IpAddr>().ok() == Some(*ip))
                    .map(|v| v.span())
                    .unwrap_or(file.upstreams[j].span());
                return Err(cx.err(
                    span,
                    format!("upstreams[{j}].instances"),
                    format!(
                        "{ip} is also a virtual IP of upstreams[{i}] ({}); an address routes to one service",
                        u.identity.service
                    ),
                ));
            }
        }
    }

    // [[expose]]
    let mut expose: Vec<ExposePath> = Vec::new();
    for (i, e) in file.expose.iter().enumerate() {
        let k = |f: &str| format!("expose[{i}].{f}");
        let e = e.get_ref();
        let listener = cx.sockaddr(&e.listener, &k("listener"))?;
        let path = e.path.get_ref();
        if !path.starts_with('/')
            || path.contains(['?', '#'])
            || path.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(cx.err(
                e.path.span(),
                k("path"),
                format!("{path:?} is not an absolute URL path such as \"/healthz\""),
            ));
        }
        let port = *e.local_path_port.get_ref();
        let local_path_port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                cx.err(
                    e.local_path_port.span(),
                    k("local_path_port"),
                    format!("{port} is not a port (1-65535)"),
                )
            })?;
        let mut ep = ExposePath::new(listener, path.clone(), local_path_port);
        if let Some(p) = &e.protocol {
            ep.protocol = match Protocol::parse(p.get_ref()) {
                Some(Protocol::Http) => Protocol::Http,
                _ => {
                    return Err(cx.err(
                        p.span(),
                        k("protocol"),
                        format!(
                            "{:?}: only \"http\" expose paths are supported",
                            p.get_ref()
                        ),
                    ))
                }
            };
        }
        if let Some(b) = binds.iter().find(|b| clash(**b, listener)) {
            return Err(cx.err(
                e.listener.span(),
                k("listener"),
                format!("{listener} collides with the listener on {b}"),
            ));
        }
        if expose
            .iter()
            .any(|o| o.listener == listener && o.path == ep.path)
        {
            return Err(cx.err(
                e.path.span(),
                k("path"),
                format!("{path:?} is already exposed on {listener}"),
            ));
        }
        if let Some(o) = expose
            .iter()
            .find(|o| o.listener != listener && clash(o.listener, listener))
        {
            return Err(cx.err(
                e.listener.span(),
                k("listener"),
                format!(
                    "{listener} collides with the expose listener on {}",
                    o.listener
                ),
            ));
        }
        expose.push(ep);
    }

    // [admin]
    let mut admin = AdminSpec::default();
    if let Some(b) = &file.admin.bind {
        admin.bind =
            AdminBind::parse(b.get_ref()).map_err(|m| cx.err(b.span(), "admin.bind", m))?;
    }
    if let Some(b) = &file.admin.prometheus_bind {
        if !b.get_ref().is_empty() {
            admin.prometheus_bind = Some(cx.sockaddr(b, "admin.prometheus_bind")?);
        }
    }
    let mut taken: Vec<SocketAddr> = binds.clone();
    taken.extend(expose.iter().map(|e| e.listener));
    for (key, addr, v) in [
        ("admin.bind", admin.bind.addr(), &file.admin.bind),
        (
            "admin.prometheus_bind",
            admin.prometheus_bind,
            &file.admin.prometheus_bind,
        ),
    ] {
        let Some(addr) = addr else { continue };
        if let Some(b) = taken.iter().find(|b| clash(**b, addr)) {
            let span = v.as_ref().map(|v| v.span()).unwrap_or(0..0);
            return Err(cx.err(
                span,
                key,
                format!("{addr} collides with the listener on {b}"),
            ));
        }
        taken.push(addr);
    }

    let spec = Spec {
        identity,
        roots,
        chain,
        key: key_der,
        local_app,
        intentions,
        default_action,
        upstreams: upstreams.into_iter().map(std::sync::Arc::new).collect(),
        mesh_destinations_only: ob.mesh_destinations_only,
        listen: ListenSpec { inbound, outbound },
        timeouts,
        source: format!("file {}", path.display()),
        expose,
        rbac: None,
        permissive_ports: file.inbound.permissive_ports.clone(),
        inbound_max_connections: None,
        unapplied: Vec::new(),
        inbound_http,
    };
    // Errors that only show once the snapshot is built point at [tls] or [[upstreams]].
    let check = crate::snapshot::Snapshot::build(spec.clone(), 0);
    if let Err(e) = check {
        let (span, key) = match &e {
            SnapshotError::LeafIdentity { .. }
            | SnapshotError::LeafUntrusted(_)
            | SnapshotError::LeafExpired { .. }
            | SnapshotError::LeafNotYetValid { .. }
            | SnapshotError::LeafIsCa => (tls.cert_file.span(), "tls.cert_file".to_string()),
            SnapshotError::DuplicateVip { .. } => (
                file.upstreams.first().map(|u| u.span()).unwrap_or(0..0),
                "upstreams".to_string(),
            ),
            _ => (file.tls.span(), "tls".to_string()),
        };
        return Err(cx.err(span, key, e.to_string()));
    }
    let mut listeners: Vec<(SocketAddr, String)> = vec![
        (inbound, cx.at(file.inbound.bind.as_ref(), "inbound.bind")),
        (out4, cx.at(ob.bind.as_ref(), "outbound.bind")),
    ];
    if let Some(a) = spec.listen.outbound.get(1) {
        listeners.push((*a, cx.at(ob.bind_ipv6.as_ref(), "outbound.bind_ipv6")));
    }
    for (i, u) in file.upstreams.iter().enumerate() {
        if let (Some(v), Some(a)) = (&u.get_ref().local_bind, spec.upstreams[i].local_bind) {
            listeners.push((a, cx.at(Some(v), &format!("upstreams[{i}].local_bind"))));
        }
    }
    for (i, e) in file.expose.iter().enumerate() {
        let a = spec.expose[i].listener;
        if !listeners.iter().any(|(b, _)| *b == a) {
            listeners.push((
                a,
                cx.at(
                    Some(&e.get_ref().listener),
                    &format!("expose[{i}].listener"),
                ),
            ));
        }
    }
    if let Some(a) = admin.bind.addr() {
        listeners.push((a, cx.at(file.admin.bind.as_ref(), "admin.bind")));
    }
    if let Some(a) = admin.prometheus_bind {
        listeners.push((
            a,
            cx.at(file.admin.prometheus_bind.as_ref(), "admin.prometheus_bind"),
        ));
    }
    Ok(Loaded {
        spec,
        files: vec![path.to_path_buf(), ca, cert, key],
        admin,
        listeners,
    })
}

mod http;
mod l7inbound;

#[cfg(test)]
mod tests;
