//! Envoy's bootstrap, as consul-dataplane (1.x) and `consul connect envoy`
//! (Consul 1.10+) generate it, read into a plain [`Bootstrap`].
//!
//! Input is JSON or YAML (decided by content: a document starting with `{`
//! is JSON), read with proto3-JSON rules: field names in snake_case or
//! camelCase, `@type` in `Any`, durations as `"1s"`, enums as strings,
//! numbers as numbers or strings, and an object where a repeated field is
//! expected (Consul writes `grpc_services` as an object).
//!
//! Every field is either read, or known and recorded as accepted without
//! effect ([`Bootstrap::ignored`]: stats, tracing, runtime and access-log
//! settings), or an error naming its JSON path
//! (`static_resources.clusters[0].foo: unknown field`). Settings veer cannot
//! honour and that matter (state-of-the-world `GRPC` ADS, TLS on a static
//! listener, client certificates to the xDS server, a non-ADS config
//! source) are refused with the reason, never skipped.
//!
//! The parsing here is sans-IO; [`read_config`] is the one function that
//! touches the file system (the config path may be a FIFO that
//! `consul connect envoy` writes once).
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(test)]
mod tests;

/// The parsed bootstrap: what veer needs to start in Envoy's place.
#[derive(Clone, Debug, PartialEq)]
pub struct Bootstrap {
    pub node: Node,
    /// `admin.address`; `None` when the bootstrap has no admin.
    pub admin: Option<SocketAddr>,
    /// The ADS server (`dynamic_resources.ads_config`).
    pub ads: AdsServer,
    /// Every static cluster, by name, in file order.
    pub clusters: Vec<StaticCluster>,
    /// The static HTTP listeners veer serves itself (Prometheus, ready).
    pub listeners: Vec<StaticListener>,
    /// `stats_config`, whose `stats_tags` name the `envoy_*` metrics'
    /// labels ([`veer_core::stats_tags::TagRules::from_stats_config`];
    /// checked here).
    pub stats_config: Option<Value>,
    /// JSON paths of settings accepted without effect (log them once).
    pub ignored: Vec<String>,
    /// JSON paths of unknown fields let through by
    /// `--allow-unknown-static-fields`.
    pub unknown: Vec<String>,
}

/// `node`: who veer is to the xDS server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    /// `node.metadata` as given (Consul: `namespace`, `partition`,
    /// `node_name`).
    pub metadata: Map<String, Value>,
}

/// An endpoint address from the bootstrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Tcp(SocketAddr),
    /// `pipe.path`: a unix socket.
    Unix(PathBuf),
    /// A host name (DNS clusters); veer does not resolve these.
    Host(String, u16),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix://{}", p.display()),
            Addr::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Where the trusted CA of a TLS connection to a static cluster comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaSource {
    /// `trusted_ca.inline_string`: PEM.
    Inline(String),
    /// `trusted_ca.filename`: read when connecting ([`CaSource::pem`]).
    File(PathBuf),
}

impl CaSource {
    /// The CA bundle, PEM.
    pub fn pem(&self) -> std::io::Result<String> {
        match self {
            CaSource::Inline(s) => Ok(s.clone()),
            CaSource::File(p) => std::fs::read_to_string(p).map_err(|e| {
                std::io::Error::new(e.kind(), format!("CA file {}: {e}", p.display()))
            }),
        }
    }
}

/// `transport_socket` `UpstreamTlsContext` of a static cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTls {
    /// `None`: the system's roots (Envoy: no validation context = no
    /// verification; veer refuses that, see [`parse`]).
    pub ca: CaSource,
    pub sni: Option<String>,
}

/// A static cluster (`type: STATIC` with one endpoint, or another type kept
/// only by name).
#[derive(Clone, Debug, PartialEq)]
pub struct StaticCluster {
    pub name: String,
    /// `type` as written (`STATIC`, `STRICT_DNS`, …).
    pub kind: String,
    /// The first endpoint, when there is one.
    pub addr: Option<Addr>,
    pub connect_timeout: Option<Duration>,
    /// `http2_protocol_options` (or an explicit HTTP/2 config) is present.
    pub http2: bool,
    pub tls: Option<UpstreamTls>,
}

/// The ADS server veer connects to.
#[derive(Clone, Debug, PartialEq)]
pub struct AdsServer {
    /// The static cluster named by `envoy_grpc.cluster_name`.
    pub cluster: String,
    pub addr: Addr,
    pub tls: Option<UpstreamTls>,
    pub connect_timeout: Option<Duration>,
    /// `initial_metadata` (Consul's agent mode: `x-consul-token`).
    pub initial_metadata: Vec<(String, String)>,
    /// `grpc_services[0].timeout`, when given.
    pub timeout: Option<Duration>,
}

impl AdsServer {
    /// The `x-consul-token` metadata value, when present and not empty.
    pub fn token(&self) -> Option<&str> {
        self.initial_metadata
            .iter()
            .find(|(k, v)| k.eq_ignore_ascii_case("x-consul-token") && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }
}

/// A static HTTP/1.1 listener from `static_resources.listeners`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticListener {
    pub name: String,
    pub addr: SocketAddr,
    /// In order; the first match answers.
    pub routes: Vec<StaticRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteAction {
    /// Forward to a static cluster's address.
    Forward {
        cluster: String,
        addr: SocketAddr,
        prefix_rewrite: Option<String>,
    },
    /// `direct_response`.
    Direct { status: u16, body: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRoute {
    pub path: PathMatch,
    pub action: RouteAction,
}

/// Why a bootstrap was refused. Every variant names the JSON path (or the
/// file). [`BootstrapError::classify`] gives a bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("bootstrap is not valid {format}: {msg}")]
    Syntax { format: &'static str, msg: String },
    #[error("{0}: unknown field")]
    UnknownField(String),
    #[error("{0}: required")]
    Missing(String),
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("{path}: not supported by veer: {reason}")]
    Unsupported { path: String, reason: String },
}

impl BootstrapError {
    pub fn classify(&self) -> &'static str {
        match self {
            BootstrapError::Read { .. } => "read",
            BootstrapError::Syntax { .. } => "syntax",
            BootstrapError::UnknownField(_) => "unknown_field",
            BootstrapError::Missing(_) => "missing",
            BootstrapError::Invalid { .. } => "invalid",
            BootstrapError::Unsupported { .. } => "unsupported",
        }
    }
}

type R<T> = Result<T, BootstrapError>;

fn invalid(path: &str, reason: impl Into<String>) -> BootstrapError {
    BootstrapError::Invalid {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn unsupported(path: &str, reason: impl Into<String>) -> BootstrapError {
    BootstrapError::Unsupported {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// How to parse.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Envoy's `--allow-unknown-static-fields`.
    pub allow_unknown_fields: bool,
}

/// Reads `--config-path` (a file or a FIFO: opened at once and read to EOF,
/// once) and/or `--config-yaml` (merged over the file, as Envoy does), and
/// returns the combined document.
pub fn read_config(path: Option<&Path>, inline: Option<&str>) -> R<Value> {
    let file = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| BootstrapError::Read {
                path: p.display().to_string(),
                source: e,
            })?;
            Some(parse_document(&text)?)
        }
        None => None,
    };
    let inline = inline.map(parse_document).transpose()?;
    match (file, inline) {
        (Some(mut f), Some(i)) => {
            merge(&mut f, i);
            Ok(f)
        }
        (Some(v), None) | (None, Some(v)) => Ok(v),
        (None, None) => Err(BootstrapError::Missing(
            "--config-path or --config-yaml".into(),
        )),
    }
}

/// Parses one JSON or YAML document (JSON when it starts with `{`).
pub fn parse_document(text: &str) -> R<Value> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| BootstrapError::Syntax {
            format: "JSON",
            msg: e.to_string(),
        })
    } else {
        let v: Value = serde_yaml_ng::from_str(text).map_err(|e| BootstrapError::Syntax {
            format: "YAML",
            msg: e.to_string(),
        })?;
        if v.is_object() {
            Ok(v)
        } else {
            Err(BootstrapError::Syntax {
                format: "YAML",
                msg: "the document is not a mapping".into(),
            })
        }
    }
}

/// Protobuf `MergeFrom` on JSON: objects merge field by field, lists
/// append, anything else is replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(bv) => merge(bv, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) => b.extend(o),
        (b, o) => *b = o,
    }
}

/// camelCase -> snake_case (proto3 JSON accepts both).
fn snake(k: &str) -> String {
    let mut s = String::with_capacity(k.len() + 4);
    for c in k.chars() {
        if c.is_ascii_uppercase() {
            s.push('_');
            s.push(c.to_ascii_lowercase());
        } else {
            s.push(c);
        }
    }
    s
}

/// Collects what was ignored or let through while parsing.
#[derive(Default)]
struct Ctx {
    allow_unknown: bool,
    ignored: Vec<String>,
    unknown: Vec<String>,
}

/// One proto message being read: its fields by snake_case name.
struct Msg {
    path: String,
    fields: BTreeMap<String, Value>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Msg {
    fn new(v: Value, path: String) -> R<Msg> {
        match v {
            Value::Object(m) => {
                let mut fields = BTreeMap::new();
                for (k, v) in m {
                    let s = snake(&k);
                    if fields.insert(s.clone(), v).is_some() {
                        return Err(invalid(
                            &join(&path, &s),
                            "given twice (in snake_case and camelCase)",
                        ));
                    }
                }
                Ok(Msg { fields, path })
            }
            Value::Null => Ok(Msg {
                fields: BTreeMap::new(),
                path,
            }),
            other => Err(invalid(
                &path,
                format!("expected an object, found {}", kind(&other)),
            )),
        }
    }

    fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    fn has(&self, key: &str) -> bool {
        self.fields.get(key).is_some_and(|v| !v.is_null())
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.fields.remove(key).filter(|v| !v.is_null())
    }

    fn msg(&mut self, key: &str) -> R<Option<Msg>> {
        let path = self.at(key);
        self.take(key).map(|v| Msg::new(v, path)).transpose()
    }

    fn req_msg(&mut self, key: &str) -> R<Msg> {
        let p = self.at(key);
        self.msg(key)?.ok_or(BootstrapError::Missing(p))
    }

    fn string(&mut self, key: &str) -> R<Option<String>> {
        let path = self.at(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(o) => Err(invalid(
                &path,
                format!("expected a string, found {}", kind(&o)),
            )),
        }
    }

    fn req_string(&mut self, key: &str) -> R<String> {
        let p = self.at(key);
        self.string(key)?.ok_or(BootstrapError::Missing(p))
    }

    /// An unsigned integer, as a number or a string.
    fn uint(&mut self, key: &str, max: u64) -> R<Option<u64>> {
        let path = self.at(key);
        let n = match self.take(key) {
            None => return Ok(None),
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(o) => {
                return Err(invalid(
                    &path,
                    format!("expected a number, found {}", kind(&o)),
                ))
            }
        };
        match n {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(invalid(&path, format!("expected an integer 0..={max}"))),
        }
    }

    fn duration(&mut self, key: &str) -> R<Option<Duration>> {
        let path = self.at(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => parse_duration(&s).map(Some).ok_or_else(|| {
                invalid(
                    &path,
                    format!("bad duration {s:?} (expected seconds with an s suffix, e.g. \"1s\", \"0.25s\")"),
                )
            }),
            // The pre-v3 object form {seconds, nanos}.
            Some(v @ Value::Object(_)) => {
                let mut m = Msg::new(v, path)?;
                let s = m.uint("seconds", u64::MAX)?.unwrap_or(0);
                let n = m.uint("nanos", 999_999_999)?.unwrap_or(0);
                m.done_strict()?;
                Ok(Some(Duration::new(s, n as u32)))
            }
            Some(o) => Err(invalid(
                &path,
                format!("expected a duration string, found {}", kind(&o)),
            )),
        }
    }

    /// A repeated field: a list, or one object where a list is expected.
    fn list(&mut self, key: &str) -> R<Vec<(String, Value)>> {
        let path = self.at(key);
        Ok(match self.take(key) {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("{path}[{i}]"), v))
                .collect(),
            Some(v) => vec![(format!("{path}[0]"), v)],
        })
    }

    fn msgs(&mut self, key: &str) -> R<Vec<Msg>> {
        self.list(key)?
            .into_iter()
            .map(|(p, v)| Msg::new(v, p))
            .collect()
    }

    /// Records known fields that veer accepts without applying them.
    fn ignore(&mut self, ctx: &mut Ctx, keys: &[&str]) {
        for k in keys {
            if self.fields.remove(*k).is_some() {
                ctx.ignored.push(self.at(k));
            }
        }
    }

    /// Drops known fields whose value makes no difference to veer (no log).
    fn skip(&mut self, keys: &[&str]) {
        for k in keys {
            self.fields.remove(*k);
        }
    }

    /// Every field left over is unknown: an error, or (with
    /// `--allow-unknown-static-fields`) a note.
    fn done(self, ctx: &mut Ctx) -> R<()> {
        for k in self.fields.keys() {
            let p = join(&self.path, k);
            if ctx.allow_unknown {
                ctx.unknown.push(p);
            } else {
                return Err(BootstrapError::UnknownField(p));
            }
        }
        Ok(())
    }

    fn done_strict(self) -> R<()> {
        match self.fields.keys().next() {
            Some(k) => Err(BootstrapError::UnknownField(join(&self.path, k))),
            None => Ok(()),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Proto3-JSON duration: decimal seconds with an `s` suffix.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let n = s.strip_suffix('s')?;
    if n.is_empty() || n.starts_with('-') {
        return None;
    }
    let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
    {
        return None;
    }
    let secs: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(Duration::new(secs, nanos))
}

/// Parses a bootstrap document (see [`read_config`] and [`parse_document`]).
pub fn parse(doc: Value, opts: Options) -> R<Bootstrap> {
    let mut ctx = Ctx {
        allow_unknown: opts.allow_unknown_fields,
        ..Ctx::default()
    };
    let mut top = Msg::new(doc, String::new())?;
    let node = parse_node(top.msg("node")?, &mut ctx)?;
    let admin = match top.msg("admin")? {
        Some(m) => parse_admin(m, &mut ctx)?,
        None => None,
    };
    let mut clusters = Vec::new();
    let mut raw_listeners = Vec::new();
    if let Some(mut sr) = top.msg("static_resources")? {
        for c in sr.msgs("clusters")? {
            let c = parse_cluster(c, &mut ctx)?;
            if clusters.iter().any(|o: &StaticCluster| o.name == c.name) {
                return Err(invalid(
                    &sr.at("clusters"),
                    format!("cluster {:?} defined twice", c.name),
                ));
            }
            clusters.push(c);
        }
        raw_listeners = sr.msgs("listeners")?;
        // Only the Prometheus listener's TLS uses static secrets, and that
        // listener is refused when it has TLS.
        sr.ignore(&mut ctx, &["secrets"]);
        sr.done(&mut ctx)?;
    }
    let mut listeners = Vec::new();
    for l in raw_listeners {
        listeners.push(parse_listener(l, &clusters, &mut ctx)?);
    }
    let dynamic = top.req_msg("dynamic_resources")?;
    let ads = parse_dynamic(dynamic, &clusters, &mut ctx)?;
    let stats_config = top.take("stats_config");
    if let Some(sc) = &stats_config {
        let at = top.at("stats_config");
        veer_core::stats_tags::TagRules::from_stats_config(sc)
            .map_err(|e| invalid(&at, e.to_string()))?;
        if let Some(o) = sc.as_object() {
            for k in o.keys() {
                if ![
                    "stats_tags",
                    "statsTags",
                    "use_all_default_tags",
                    "useAllDefaultTags",
                ]
                .contains(&k.as_str())
                {
                    ctx.ignored.push(format!("{at}.{k}"));
                }
            }
        }
    }
    top.ignore(
        &mut ctx,
        &[
            "layered_runtime",
            "stats_sinks",
            "stats_flush_interval",
            "stats_flush_on_admin",
            "tracing",
            "overload_manager",
            "watchdog",
            "watchdogs",
            "cluster_manager",
            "enable_dispatcher_stats",
            "header_prefix",
            "stats_server_version_override",
            "use_tcp_for_dns_lookups",
        ],
    );
    top.done(&mut ctx)?;
    Ok(Bootstrap {
        node,
        admin,
        ads,
        clusters,
        listeners,
        stats_config,
        ignored: ctx.ignored,
        unknown: ctx.unknown,
    })
}

fn parse_node(m: Option<Msg>, ctx: &mut Ctx) -> R<Node> {
    let Some(mut m) = m else {
        return Ok(Node::default());
    };
    let id = m.string("id")?.unwrap_or_default();
    let cluster = m.string("cluster")?.unwrap_or_default();
    let path = m.at("metadata");
    let metadata = match m.take("metadata") {
        None => Map::new(),
        Some(Value::Object(o)) => o,
        Some(o) => {
            return Err(invalid(
                &path,
                format!("expected an object, found {}", kind(&o)),
            ))
        }
    };
    m.ignore(ctx, &["locality", "user_agent_name", "extensions"]);
    m.done(ctx)?;
    Ok(Node {
        id,
        cluster,
        metadata,
    })
}

fn parse_admin(mut m: Msg, ctx: &mut Ctx) -> R<Option<SocketAddr>> {
    m.skip(&["access_log_path"]);
    m.ignore(
        ctx,
        &[
            "access_log",
            "profile_path",
            "socket_options",
            "ignore_global_conn_limit",
        ],
    );
    let addr = match m.msg("address")? {
        None => None,
        Some(a) => {
            let path = a.path.clone();
            match parse_address(a, ctx)? {
                Addr::Tcp(s) => Some(s),
                other => {
                    return Err(unsupported(
                        &path,
                        format!("the admin address must be an IP socket address, not {other}"),
                    ))
                }
            }
        }
    };
    m.done(ctx)?;
    Ok(addr)
}

/// `socket_address` or `pipe`.
fn parse_address(mut m: Msg, ctx: &mut Ctx) -> R<Addr> {
    if let Some(mut p) = m.msg("pipe")? {
        let path = p.req_string("path")?;
        p.ignore(ctx, &["mode"]);
        p.done(ctx)?;
        m.done(ctx)?;
        return Ok(Addr::Unix(PathBuf::from(path)));
    }
    let Some(mut s) = m.msg("socket_address")? else {
        return Err(BootstrapError::Missing(m.at("socket_address")));
    };
    let host = s.req_string("address")?;
    let port = s.uint("port_value", 65535)?.unwrap_or(0) as u16;
    if let Some(proto) = s.string("protocol")? {
        if proto != "TCP" {
            return Err(unsupported(
                &s.at("protocol"),
                format!("{proto} (TCP only)"),
            ));
        }
    }
    if s.has("named_port") {
        return Err(unsupported(&s.at("named_port"), "named ports"));
    }
    s.skip(&["ipv4_compat", "resolver_name"]);
    s.done(ctx)?;
    m.done(ctx)?;
    let ip = if host == "localhost" {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    Ok(match ip {
        Some(ip) => Addr::Tcp(SocketAddr::new(ip, port)),
        None => Addr::Host(host, port),
    })
}

const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";

fn parse_cluster(mut m: Msg, ctx: &mut Ctx) -> R<StaticCluster> {
    let name = m.req_string("name")?;
    let kind = match m.take("type") {
        None => "STATIC".to_string(),
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => "STATIC".into(),
            Some(1) => "STRICT_DNS".into(),
            Some(2) => "LOGICAL_DNS".into(),
            Some(3) => "EDS".into(),
            Some(4) => "ORIGINAL_DST".into(),
            _ => return Err(invalid(&m.at("type"), format!("unknown cluster type {n}"))),
        },
        Some(o) => {
            return Err(invalid(
                &m.at("type"),
                format!("expected a string, found {}", kind(&o)),
            ))
        }
    };
    let connect_timeout = m.duration("connect_timeout")?;
    let mut http2 = m.take("http2_protocol_options").is_some();
    m.skip(&["http_protocol_options", "ignore_health_on_host_removal"]);
    if let Some(o) = m.take("typed_extension_protocol_options") {
        // HttpProtocolOptions { explicit_http_config { http2_protocol_options } }.
        http2 |= o.to_string().contains("http2_protocol_options")
            || o.to_string().contains("http2ProtocolOptions");
    }
    m.ignore(
        ctx,
        &[
            "dns_lookup_family",
            "dns_refresh_rate",
            "lb_policy",
            "circuit_breakers",
            "upstream_connection_options",
            "per_connection_buffer_limit_bytes",
            "alt_stat_name",
            "common_lb_config",
            "outlier_detection",
            "respect_dns_ttl",
            "health_checks",
            "eds_cluster_config",
        ],
    );
    let mut addr = None;
    if let Some(mut la) = m.msg("load_assignment")? {
        la.skip(&["cluster_name"]);
        la.ignore(ctx, &["policy", "named_endpoints"]);
        for mut e in la.msgs("endpoints")? {
            e.ignore(
                ctx,
                &["locality", "priority", "load_balancing_weight", "metadata"],
            );
            for mut lb in e.msgs("lb_endpoints")? {
                if let Some(mut ep) = lb.msg("endpoint")? {
                    if let Some(a) = ep.msg("address")? {
                        let a = parse_address(a, ctx)?;
                        if addr.is_none() {
                            addr = Some(a);
                        }
                    }
                    ep.ignore(ctx, &["hostname", "health_check_config"]);
                    ep.done(ctx)?;
                }
                lb.ignore(ctx, &["health_status", "load_balancing_weight", "metadata"]);
                lb.done(ctx)?;
            }
            e.done(ctx)?;
        }
        la.done(ctx)?;
    }
    let tls = match m.msg("transport_socket")? {
        Some(ts) => parse_upstream_tls(ts, ctx)?,
        None => None,
    };
    m.done(ctx)?;
    Ok(StaticCluster {
        name,
        kind,
        addr,
        connect_timeout,
        http2,
        tls,
    })
}

/// `transport_socket` of a cluster: raw buffer (`None`) or TLS with a
/// trusted CA and no client certificate.
fn parse_upstream_tls(mut ts: Msg, ctx: &mut Ctx) -> R<Option<UpstreamTls>> {
    let name = ts.string("name")?.unwrap_or_default();
    let Some(mut tc) = ts.msg("typed_config")? else {
        let tc_path = ts.at("typed_config");
        ts.done(ctx)?;
        return match name.as_str() {
            "" | "envoy.transport_sockets.raw_buffer" | "raw_buffer" => Ok(None),
            _ => Err(BootstrapError::Missing(tc_path)),
        };
    };
    ts.done(ctx)?;
    let ty = tc.req_string("@type")?;
    if ty != UPSTREAM_TLS {
        return Err(unsupported(
            &tc.at("@type"),
            format!("transport socket {ty} (only UpstreamTlsContext)"),
        ));
    }
    let sni = tc.string("sni")?;
    let mut common = tc.req_msg("common_tls_context")?;
    for k in [
        "tls_certificates",
        "tls_certificate_sds_secret_configs",
        "tls_certificate_provider_instance",
    ] {
        if common.has(k) {
            return Err(unsupported(
                &common.at(k),
                "client certificates to a static cluster",
            ));
        }
    }
    let Some(mut vc) = common.msg("validation_context")? else {
        return Err(unsupported(
            &common.at("validation_context"),
            "TLS without a trusted CA (Envoy would not verify the server; veer refuses that)",
        ));
    };
    let mut ca = vc.req_msg("trusted_ca")?;
    let src = if let Some(s) = ca.string("inline_string")? {
        CaSource::Inline(s)
    } else if let Some(f) = ca.string("filename")? {
        CaSource::File(PathBuf::from(f))
    } else {
        return Err(BootstrapError::Missing(ca.at("inline_string")));
    };
    ca.done(ctx)?;
    for k in [
        "match_subject_alt_names",
        "match_typed_subject_alt_names",
        "verify_certificate_spki",
        "verify_certificate_hash",
        "crl",
    ] {
        if vc.has(k) {
            return Err(unsupported(
                &vc.at(k),
                "extra server certificate checks on a static cluster",
            ));
        }
    }
    vc.done(ctx)?;
    common.ignore(ctx, &["tls_params", "alpn_protocols"]);
    common.done(ctx)?;
    tc.done(ctx)?;
    Ok(Some(UpstreamTls { ca: src, sni }))
}

const HCM: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

fn parse_listener(mut m: Msg, clusters: &[StaticCluster], ctx: &mut Ctx) -> R<StaticListener> {
    let name = m.string("name")?.unwrap_or_default();
    let addr_path = m.at("address");
    let addr = match parse_address(m.req_msg("address")?, ctx)? {
        Addr::Tcp(a) => a,
        other => {
            return Err(unsupported(
                &addr_path,
                format!("static listener address {other} (IP socket addresses only)"),
            ))
        }
    };
    m.skip(&["traffic_direction", "stat_prefix"]);
    m.ignore(ctx, &["per_connection_buffer_limit_bytes"]);
    for k in [
        "listener_filters",
        "default_filter_chain",
        "use_original_dst",
    ] {
        if m.has(k) {
            return Err(unsupported(&m.at(k), "on a static listener"));
        }
    }
    let mut chains = m.msgs("filter_chains")?;
    if chains.len() != 1 {
        return Err(unsupported(
            &m.at("filter_chains"),
            format!(
                "{} filter chains (a static listener has exactly one, with one HTTP connection manager)",
                chains.len()
            ),
        ));
    }
    let mut chain = chains.remove(0);
    for k in ["transport_socket", "filter_chain_match"] {
        if chain.has(k) {
            return Err(unsupported(
                &chain.at(k),
                "TLS or matching on a static listener (veer serves static listeners as plain HTTP/1.1)",
            ));
        }
    }
    chain.ignore(ctx, &["name"]);
    let mut filters = chain.msgs("filters")?;
    chain.done(ctx)?;
    if filters.len() != 1 {
        return Err(unsupported(
            &m.at("filter_chains[0].filters"),
            "a static listener needs exactly one HTTP connection manager filter",
        ));
    }
    let mut f = filters.remove(0);
    f.skip(&["name"]);
    let mut hcm = f.req_msg("typed_config")?;
    f.done(ctx)?;
    let ty = hcm.req_string("@type")?;
    if ty != HCM {
        return Err(unsupported(
            &hcm.at("@type"),
            format!("network filter {ty} on a static listener (only HttpConnectionManager)"),
        ));
    }
    if let Some(c) = hcm.string("codec_type")? {
        if c != "AUTO" && c != "HTTP1" {
            return Err(unsupported(
                &hcm.at("codec_type"),
                format!("{c} (static listeners speak HTTP/1.1)"),
            ));
        }
    }
    hcm.skip(&["stat_prefix"]);
    hcm.ignore(
        ctx,
        &["access_log", "tracing", "normalize_path", "merge_slashes"],
    );
    if hcm.has("rds") {
        return Err(unsupported(&hcm.at("rds"), "RDS on a static listener"));
    }
    for mut hf in hcm.msgs("http_filters")? {
        let n = hf.string("name")?.unwrap_or_default();
        if let Some(mut tc) = hf.msg("typed_config")? {
            let ty = tc.req_string("@type")?;
            if ty != ROUTER {
                return Err(unsupported(
                    &tc.at("@type"),
                    format!("HTTP filter {ty} on a static listener (only the router)"),
                ));
            }
            tc.done(ctx)?;
        } else if n != "envoy.filters.http.router" && n != "envoy.router" {
            return Err(unsupported(
                &hf.at("name"),
                format!("HTTP filter {n} on a static listener (only the router)"),
            ));
        }
        hf.done(ctx)?;
    }
    let mut rc = hcm.req_msg("route_config")?;
    hcm.done(ctx)?;
    rc.skip(&["name"]);
    rc.ignore(ctx, &["validate_clusters"]);
    let mut routes = Vec::new();
    for mut vh in rc.msgs("virtual_hosts")? {
        vh.skip(&["name"]);
        let domains: Vec<String> = vh
            .list("domains")?
            .into_iter()
            .map(|(_, v)| v.as_str().unwrap_or_default().to_string())
            .collect();
        if !domains.iter().any(|d| d == "*") {
            return Err(unsupported(
                &vh.at("domains"),
                "virtual hosts other than \"*\" on a static listener",
            ));
        }
        for r in vh.msgs("routes")? {
            routes.push(parse_route(r, clusters, ctx)?);
        }
        vh.done(ctx)?;
    }
    rc.done(ctx)?;
    m.done(ctx)?;
    Ok(StaticListener { name, addr, routes })
}

fn parse_route(mut r: Msg, clusters: &[StaticCluster], ctx: &mut Ctx) -> R<StaticRoute> {
    r.skip(&["name"]);
    let mut mm = r.req_msg("match")?;
    let path = if let Some(p) = mm.string("path")? {
        PathMatch::Exact(p)
    } else if let Some(p) = mm.string("prefix")? {
        PathMatch::Prefix(p)
    } else {
        return Err(unsupported(
            &mm.path,
            "route matches other than path or prefix on a static listener",
        ));
    };
    if mm.take("case_sensitive") == Some(Value::Bool(false)) {
        return Err(unsupported(
            &mm.at("case_sensitive"),
            "case-insensitive matching",
        ));
    }
    mm.done(ctx)?;
    let action = if let Some(mut ra) = r.msg("route")? {
        let cluster = ra.req_string("cluster")?;
        let prefix_rewrite = ra.string("prefix_rewrite")?;
        ra.ignore(ctx, &["timeout"]);
        let cpath = ra.at("cluster");
        ra.done(ctx)?;
        let c = clusters
            .iter()
            .find(|c| c.name == cluster)
            .ok_or_else(|| invalid(&cpath, format!("no static cluster named {cluster:?}")))?;
        let addr = match (&c.kind[..], &c.addr, &c.tls) {
            ("STATIC", Some(Addr::Tcp(a)), None) => *a,
            _ => {
                return Err(unsupported(
                    &cpath,
                    format!(
                        "cluster {cluster:?} for a static route must be STATIC, plain, with an IP address"
                    ),
                ))
            }
        };
        RouteAction::Forward {
            cluster,
            addr,
            prefix_rewrite,
        }
    } else if let Some(mut dr) = r.msg("direct_response")? {
        let status = dr.uint("status", 599)?.unwrap_or(200) as u16;
        if status < 200 {
            return Err(invalid(&dr.at("status"), "expected 200..=599"));
        }
        let body = match dr.msg("body")? {
            Some(mut b) => {
                let s = b.string("inline_string")?.unwrap_or_default();
                b.done(ctx)?;
                s
            }
            None => String::new(),
        };
        dr.done(ctx)?;
        RouteAction::Direct { status, body }
    } else {
        return Err(unsupported(
            &r.path,
            "a static route needs route.cluster or direct_response",
        ));
    };
    r.done(ctx)?;
    Ok(StaticRoute { path, action })
}

/// `lds_config` / `cds_config`: must be `ads {}`.
fn parse_ads_source(m: Option<Msg>, path: &str, ctx: &mut Ctx) -> R<()> {
    let Some(mut m) = m else {
        return Err(BootstrapError::Missing(path.to_string()));
    };
    if m.take("ads").is_none() {
        return Err(unsupported(
            path,
            "config sources other than ads {} (Consul always uses ADS)",
        ));
    }
    // "0s" (wait for ever) is what veer does; another value is not applied.
    let ift = m.at("initial_fetch_timeout");
    if let Some(d) = m.duration("initial_fetch_timeout")? {
        if !d.is_zero() {
            ctx.ignored.push(ift);
        }
    }
    if let Some(v) = m.string("resource_api_version")? {
        if v != "V3" && v != "AUTO" {
            return Err(unsupported(&m.at("resource_api_version"), v));
        }
    }
    m.done(ctx)
}

fn parse_dynamic(mut m: Msg, clusters: &[StaticCluster], ctx: &mut Ctx) -> R<AdsServer> {
    let lds = m.msg("lds_config")?;
    parse_ads_source(lds, &m.at("lds_config"), ctx)?;
    let cds = m.msg("cds_config")?;
    parse_ads_source(cds, &m.at("cds_config"), ctx)?;
    let mut ads = m.req_msg("ads_config")?;
    m.done(ctx)?;
    let api = ads.req_string("api_type")?;
    match api.as_str() {
        "DELTA_GRPC" => {}
        "GRPC" => {
            return Err(unsupported(
                &ads.at("api_type"),
                "GRPC (state-of-the-world ADS); veer speaks Delta xDS, which Consul >= 1.10 serves: use DELTA_GRPC",
            ))
        }
        other => return Err(unsupported(&ads.at("api_type"), other)),
    }
    if let Some(v) = ads.string("transport_api_version")? {
        if v != "V3" && v != "AUTO" {
            return Err(unsupported(
                &ads.at("transport_api_version"),
                format!("{v} (v3 only)"),
            ));
        }
    }
    ads.ignore(
        ctx,
        &["set_node_on_first_message_only", "rate_limit_settings"],
    );
    let mut services = ads.msgs("grpc_services")?;
    ads.done(ctx)?;
    if services.len() != 1 {
        return Err(unsupported(
            "dynamic_resources.ads_config.grpc_services",
            format!("{} gRPC services (exactly one)", services.len()),
        ));
    }
    let mut svc = services.remove(0);
    if svc.has("google_grpc") {
        return Err(unsupported(
            &svc.at("google_grpc"),
            "google_grpc (use envoy_grpc with a static cluster)",
        ));
    }
    let mut eg = svc.req_msg("envoy_grpc")?;
    let cluster = eg.req_string("cluster_name")?;
    let cpath = eg.at("cluster_name");
    eg.ignore(
        ctx,
        &["authority", "retry_policy", "max_receive_message_length"],
    );
    eg.done(ctx)?;
    let timeout = svc.duration("timeout")?;
    let mut initial_metadata = Vec::new();
    for mut kv in svc.msgs("initial_metadata")? {
        let k = kv.req_string("key")?;
        let v = kv.string("value")?.unwrap_or_default();
        kv.done(ctx)?;
        initial_metadata.push((k, v));
    }
    svc.done(ctx)?;
    let c = clusters
        .iter()
        .find(|c| c.name == cluster)
        .ok_or_else(|| invalid(&cpath, format!("no static cluster named {cluster:?}")))?;
    let addr = match (&c.kind[..], &c.addr) {
        ("STATIC", Some(a @ (Addr::Tcp(_) | Addr::Unix(_)))) => a.clone(),
        _ => {
            return Err(unsupported(
                &cpath,
                format!("the xDS cluster {cluster:?} must be STATIC with an IP or pipe address"),
            ))
        }
    };
    Ok(AdsServer {
        cluster,
        addr,
        tls: c.tls.clone(),
        connect_timeout: c.connect_timeout,
        initial_metadata,
        timeout,
    })
}
