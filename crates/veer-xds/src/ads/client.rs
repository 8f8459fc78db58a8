//! The transport: one Delta ADS stream at a time over gRPC (tonic), driven
//! by [`AdsState`], reconnecting with backoff.
use super::state::{AdsState, Check, Reply};
use crate::resources::Kind;
use envoy_types::pb::envoy::config::core::v3::{node::UserAgentVersionType, Node};
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::google::protobuf::{value, ListValue, NullValue, Struct, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;
use veer_core::snapshot::Spec;

/// Where the xDS server is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    /// A TCP address (`host` may be an IP literal or a DNS name), h2c or TLS.
    Tcp { host: String, port: u16 },
    /// A unix socket (Envoy's `pipe`), h2c.
    Unix(PathBuf),
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Server::Tcp { host, port } => write!(f, "{host}:{port}"),
            Server::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// TLS to the xDS server (TCP only): the server certificate must chain to
/// `ca_pem`; no client certificate is sent (as in Consul's bootstrap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca_pem: String,
    /// The name to verify; the server's host when `None`.
    pub server_name: Option<String>,
}

/// The node sent in the first request of every stream. `user_agent_name`
/// is always `veer` (so Consul skips its Envoy version check) and
/// `user_agent_version` veer's version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeInfo {
    pub id: String,
    pub cluster: String,
    /// `node.metadata` (Consul: `namespace`, `partition`, `node_name`).
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl NodeInfo {
    pub fn to_proto(&self) -> Node {
        Node {
            id: self.id.clone(),
            cluster: self.cluster.clone(),
            metadata: (!self.metadata.is_empty()).then(|| to_struct(&self.metadata)),
            user_agent_name: "veer".to_string(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_string(),
            )),
            ..Default::default()
        }
    }
}

fn to_struct(m: &serde_json::Map<String, serde_json::Value>) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

fn to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match v {
        J::Null => value::Kind::NullValue(NullValue::NullValue as i32),
        J::Bool(b) => value::Kind::BoolValue(*b),
        J::Number(n) => value::Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => value::Kind::StringValue(s.clone()),
        J::Array(a) => value::Kind::ListValue(ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        J::Object(o) => value::Kind::StructValue(to_struct(o)),
    };
    Value { kind: Some(kind) }
}

/// How to reach the xDS server and who we are.
#[derive(Clone, Debug)]
pub struct AdsConfig {
    pub server: Server,
    pub tls: Option<Tls>,
    /// gRPC metadata on every stream (`x-consul-token` from the bootstrap's
    /// `initial_metadata`). Keys must be lowercase ASCII, values ASCII.
    pub metadata: Vec<(String, String)>,
    pub node: NodeInfo,
    /// The largest message accepted or sent (default 256 MiB; at least 64 MiB
    /// is needed for big meshes).
    pub max_message_bytes: usize,
    /// Reconnect backoff: starts at `backoff_min`, doubles up to
    /// `backoff_max`, and starts over after a stream that got a response.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Counters, shared with whoever renders metrics.
    pub metrics: Arc<AdsMetrics>,
}

impl AdsConfig {
    pub fn new(server: Server, node: NodeInfo) -> AdsConfig {
        AdsConfig {
            server,
            tls: None,
            metadata: Vec::new(),
            node,
            max_message_bytes: 256 << 20,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(15),
            metrics: Arc::default(),
        }
    }
}

/// Why a stream ended or could not start: the error enum of the ADS
/// client's boundary. [`AdsError::classify`] gives the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdsError {
    /// The configuration cannot work (bad metadata, bad CA, bad address);
    /// the only error [`run`] returns.
    #[error("ADS client configuration: {0}")]
    Config(String),
    /// No connection: refused, timed out, or lost.
    #[error("xDS server unreachable: {0}")]
    Unreachable(String),
    /// `PermissionDenied` or `Unauthenticated`: a bad or missing token.
    #[error("xDS server denied access (check the ACL token): {0}")]
    Denied(String),
    /// `ResourceExhausted` or a drained stream: the server sends us elsewhere.
    #[error("xDS server is rebalancing streams: {0}")]
    Rebalance(String),
    /// The server ended the stream without an error.
    #[error("xDS server closed the stream")]
    Closed,
    /// Any other gRPC error.
    #[error("xDS stream failed: {0}")]
    Stream(String),
}

impl AdsError {
    /// Metric label.
    pub fn classify(&self) -> &'static str {
        match self {
            AdsError::Config(_) => "config",
            AdsError::Unreachable(_) => "unreachable",
            AdsError::Denied(_) => "denied",
            AdsError::Rebalance(_) => "rebalance",
            AdsError::Closed => "closed",
            AdsError::Stream(_) => "stream",
        }
    }

    fn from_status(s: &tonic::Status) -> AdsError {
        let msg = format!("{:?}: {}", s.code(), s.message());
        match s.code() {
            Code::PermissionDenied | Code::Unauthenticated => AdsError::Denied(msg),
            Code::ResourceExhausted => AdsError::Rebalance(msg),
            Code::Unavailable if s.message().contains("drain") => AdsError::Rebalance(msg),
            Code::Unavailable => AdsError::Unreachable(msg),
            _ => AdsError::Stream(msg),
        }
    }
}

/// Labels of [`AdsMetrics::reconnects`], in order.
pub const RECONNECT_REASONS: [&str; 5] = ["unreachable", "denied", "rebalance", "closed", "stream"];

/// Counters of one kind each.
#[derive(Debug, Default)]
pub struct PerKind([AtomicU64; 5]);

impl PerKind {
    fn idx(kind: Kind) -> usize {
        Kind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("known kind")
    }
    pub fn get(&self, kind: Kind) -> u64 {
        self.0[Self::idx(kind)].load(Ordering::Relaxed)
    }
    fn inc(&self, kind: Kind) {
        self.0[Self::idx(kind)].fetch_add(1, Ordering::Relaxed);
    }
}

/// The ADS client's counters.
#[derive(Debug, Default)]
pub struct AdsMetrics {
    pub responses: PerKind,
    pub acks: PerKind,
    pub nacks: PerKind,
    /// Specs handed to the runtime (and taken).
    pub applied: AtomicU64,
    /// Ended or failed streams, by [`RECONNECT_REASONS`].
    pub reconnects: [AtomicU64; 5],
}

impl AdsMetrics {
    pub fn reconnects(&self, reason: &str) -> u64 {
        RECONNECT_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.reconnects[i].load(Ordering::Relaxed))
    }

    fn count_reconnect(&self, e: &AdsError) {
        if let Some(i) = RECONNECT_REASONS.iter().position(|r| *r == e.classify()) {
            self.reconnects[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text format, `veer_xds_*` counters.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        for (name, help, c) in [
            ("responses", "xDS responses received", &self.responses),
            ("acks", "xDS responses ACKed", &self.acks),
            ("nacks", "xDS responses NACKed", &self.nacks),
        ] {
            let _ = writeln!(s, "# HELP veer_xds_{name}_total {help}, by type.");
            let _ = writeln!(s, "# TYPE veer_xds_{name}_total counter");
            for k in Kind::ALL {
                let _ = writeln!(
                    s,
                    "veer_xds_{name}_total{{type=\"{}\"}} {}",
                    k.short(),
                    c.get(k)
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP veer_xds_applied_total Configurations from xDS handed to the runtime."
        );
        let _ = writeln!(s, "# TYPE veer_xds_applied_total counter");
        let _ = writeln!(
            s,
            "veer_xds_applied_total {}",
            self.applied.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP veer_xds_reconnects_total xDS streams that ended, by reason."
        );
        let _ = writeln!(s, "# TYPE veer_xds_reconnects_total counter");
        for (i, r) in RECONNECT_REASONS.iter().enumerate() {
            let _ = writeln!(
                s,
                "veer_xds_reconnects_total{{reason=\"{r}\"}} {}",
                self.reconnects[i].load(Ordering::Relaxed)
            );
        }
        s
    }
}

/// The last ACK or NACK sent for one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastReply {
    pub nonce: String,
    /// `None` for an ACK; the NACK's message otherwise.
    pub nack: Option<String>,
}

/// What the ADS client is doing, for `/ready` and `/config_dump`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdsStatus {
    /// A stream is open.
    pub connected: bool,
    /// A first configuration was applied (ready).
    pub applied: bool,
    /// What the configuration still waits for.
    pub waiting_for: Vec<String>,
    /// The last reply per kind.
    pub last: BTreeMap<Kind, LastReply>,
    /// Accepted resource versions, by kind and name.
    pub versions: BTreeMap<Kind, BTreeMap<String, String>>,
    /// Why the last stream ended, if one did.
    pub last_error: Option<String>,
    /// By-name resources refused before any version was accepted
    /// (`"<kind> <name>"` → reason; see `Resources::refused`).
    pub refused: BTreeMap<String, String>,
}

/// Runs the ADS client until the future is dropped: connects, streams,
/// applies, and reconnects with backoff; the runtime keeps its last spec
/// while the server is away. Returns only when the configuration cannot
/// work ([`AdsError::Config`]).
pub async fn run<C: Check>(
    cfg: AdsConfig,
    check: C,
    mut apply: impl FnMut(Spec) -> Result<(), String>,
    status: watch::Sender<AdsStatus>,
) -> Result<Infallible, AdsError> {
    let metadata = parse_metadata(&cfg.metadata)?;
    let tls = tls_config(&cfg)?;
    let mut state = AdsState::new(check, cfg.node.to_proto());
    let mut backoff = cfg.backoff_min;
    // DNS clusters' names are resolved beside the stream (see `super::dns`).
    let (names_tx, names_rx) = watch::channel(BTreeMap::new());
    let (answers_tx, answers_rx) = mpsc::channel(2);
    let _resolver = AbortOnDrop(tokio::spawn(super::dns::resolve_loop(names_rx, answers_tx)));
    let mut dns = Dns {
        names: names_tx,
        answers: answers_rx,
    };
    loop {
        let (worked, err) = stream_once(
            &cfg,
            &metadata,
            tls.as_ref(),
            &mut state,
            &mut apply,
            &status,
            &mut dns,
        )
        .await;
        if let AdsError::Config(_) = err {
            return Err(err);
        }
        if worked {
            backoff = cfg.backoff_min;
        }
        cfg.metrics.count_reconnect(&err);
        match &err {
            AdsError::Denied(_) => {
                tracing::error!(server = %cfg.server, reason = err.classify(), "xDS: {err}; retrying in {backoff:?}")
            }
            _ => {
                tracing::warn!(server = %cfg.server, reason = err.classify(), "xDS: {err}; retrying in {backoff:?}")
            }
        }
        status.send_modify(|s| {
            s.connected = false;
            s.last_error = Some(err.to_string());
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

type Metadata = Vec<(AsciiMetadataKey, AsciiMetadataValue)>;

/// Aborts a task when dropped (the resolver ends with the client).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The client's side of the resolver: the names to resolve, the answers.
struct Dns {
    names: watch::Sender<BTreeMap<String, Duration>>,
    answers: mpsc::Receiver<super::dns::Answers>,
}

impl Dns {
    /// Tells the resolver the names the state wants now (if they changed).
    fn want<C: Check>(&self, state: &AdsState<C>) {
        self.names.send_if_modified(|n| {
            if n == state.dns_wanted() {
                false
            } else {
                n.clone_from(state.dns_wanted());
                true
            }
        });
    }
}

fn parse_metadata(m: &[(String, String)]) -> Result<Metadata, AdsError> {
    m.iter()
        .map(|(k, v)| {
            let key = AsciiMetadataKey::from_bytes(k.as_bytes())
                .map_err(|_| AdsError::Config(format!("gRPC metadata key {k:?} is not valid")))?;
            let value = AsciiMetadataValue::try_from(v.as_str()).map_err(|_| {
                AdsError::Config(format!(
                    "gRPC metadata value of {k:?} is not printable ASCII"
                ))
            })?;
            Ok((key, value))
        })
        .collect()
}

fn tls_config(cfg: &AdsConfig) -> Result<Option<ClientTlsConfig>, AdsError> {
    let Some(tls) = &cfg.tls else { return Ok(None) };
    let host = match &cfg.server {
        Server::Tcp { host, .. } => host,
        Server::Unix(_) => {
            return Err(AdsError::Config(
                "TLS to an xDS server on a unix socket is not supported".into(),
            ))
        }
    };
    if !tls.ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(AdsError::Config(
            "the xDS server's CA holds no PEM certificate".into(),
        ));
    }
    Ok(Some(
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .domain_name(tls.server_name.clone().unwrap_or_else(|| host.clone())),
    ))
}

async fn connect(cfg: &AdsConfig, tls: Option<&ClientTlsConfig>) -> Result<Channel, AdsError> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let uri = match &cfg.server {
        Server::Tcp { .. } => format!("{scheme}://{}", cfg.server),
        Server::Unix(_) => "http://localhost".to_string(),
    };
    let mut ep = Endpoint::from_shared(uri)
        .map_err(|e| AdsError::Config(format!("xDS server address {}: {e}", cfg.server)))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(t) = tls {
        ep = ep
            .tls_config(t.clone())
            .map_err(|e| AdsError::Config(format!("TLS to the xDS server: {e}")))?;
    }
    let r = match &cfg.server {
        Server::Tcp { .. } => ep.connect().await,
        Server::Unix(path) => {
            let path = path.clone();
            ep.connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
        }
    };
    r.map_err(|e| AdsError::Unreachable(error_chain(&e)))
}

/// An error with its sources (tonic's transport errors say little on top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// One stream, until it ends. Returns whether it got any response, and why
/// it ended.
async fn stream_once<C: Check>(
    cfg: &AdsConfig,
    metadata: &Metadata,
    tls: Option<&ClientTlsConfig>,
    state: &mut AdsState<C>,
    apply: &mut impl FnMut(Spec) -> Result<(), String>,
    status: &watch::Sender<AdsStatus>,
    dns: &mut Dns,
) -> (bool, AdsError) {
    let channel = match connect(cfg, tls).await {
        Ok(c) => c,
        Err(e) => return (false, e),
    };
    let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    for r in state.start() {
        let _ = tx.send(r);
    }
    // Our own framing (see `super::grpc`): tonic's would keep a buffer as
    // large as the largest response for as long as the stream lives.
    let mut inbound = match super::grpc::open(channel, metadata, rx, cfg.max_message_bytes).await {
        Ok(r) => r,
        Err(s) => return (false, AdsError::from_status(&s)),
    };
    tracing::info!(server = %cfg.server, "xDS: stream open");
    status.send_modify(|s| s.connected = true);
    let mut worked = false;
    let m = &cfg.metrics;
    loop {
        let mut apply_counted = |spec: Spec| {
            let r = apply(spec);
            if r.is_ok() {
                m.applied.fetch_add(1, Ordering::Relaxed);
            }
            r
        };
        // (`Streaming::message` keeps its state in the stream: cancel-safe.)
        let next = tokio::select! {
            r = inbound.message() => r,
            Some(answers) = dns.answers.recv() => {
                let out = state.on_dns(answers, &mut apply_counted);
                if let Some(why) = &out.refused {
                    tracing::warn!("xDS: the configuration with the new DNS answers was refused (the old addresses are kept): {why}");
                } else if out.delivered {
                    tracing::debug!("xDS: DNS answers changed; configuration applied");
                }
                if out.changed {
                    status.send_modify(|s| {
                        s.applied = state.delivered();
                        s.waiting_for = out.waiting_for.clone();
                    });
                }
                continue;
            }
        };
        let resp = match next {
            Ok(Some(r)) => r,
            Ok(None) => return (worked, AdsError::Closed),
            Err(s) => return (worked, AdsError::from_status(&s)),
        };
        worked = true;
        let out = state.on_response(resp, &mut apply_counted);
        dns.want(state);
        if let Some(kind) = out.kind {
            m.responses.inc(kind);
            match &out.reply {
                Reply::Ack => m.acks.inc(kind),
                Reply::Nack(_) => m.nacks.inc(kind),
            }
        }
        match &out.reply {
            Reply::Ack => {
                tracing::debug!(kind = ?out.kind, nonce = %out.nonce, delivered = out.delivered, "xDS: ACK")
            }
            Reply::Nack(msg) => {
                tracing::warn!(kind = ?out.kind, nonce = %out.nonce, "xDS: NACK: {msg}")
            }
        }
        if !out.delivered && !out.waiting_for.is_empty() {
            tracing::debug!(waiting_for = ?out.waiting_for, "xDS: configuration incomplete");
        }
        for r in out.requests {
            if tx.send(r).is_err() {
                return (worked, AdsError::Closed);
            }
        }
        let changed = state.take_changed_versions();
        status.send_modify(|s| {
            if let Some(kind) = out.kind {
                s.last.insert(
                    kind,
                    LastReply {
                        nonce: out.nonce.clone(),
                        nack: match &out.reply {
                            Reply::Ack => None,
                            Reply::Nack(m) => Some(m.clone()),
                        },
                    },
                );
            }
            s.applied = state.delivered();
            s.waiting_for = out.waiting_for.clone();
            sync_versions(&mut s.versions, state.versions(), changed);
            s.refused = state
                .resources()
                .refused
                .iter()
                .map(|((k, n), why)| (format!("{} {n}", k.short()), why.clone()))
                .collect();
        });
    }
}

/// Makes `dst` equal to `src` again after the names in `changed` (by
/// kind) were set or removed in `src`: only those are copied (at mesh
/// scale thousands of versions are held and a response changes a few; a
/// whole copy, or even a comparison, made the status cost as much as the
/// mesh is large on every response).
pub(crate) fn sync_versions(
    dst: &mut BTreeMap<Kind, BTreeMap<String, String>>,
    src: &BTreeMap<Kind, BTreeMap<String, String>>,
    changed: Vec<(Kind, String)>,
) {
    // (A handful of kinds: the same ones, empty or not.)
    dst.retain(|k, _| src.contains_key(k));
    for k in src.keys() {
        dst.entry(*k).or_default();
    }
    for (kind, name) in changed {
        let d = dst.entry(kind).or_default();
        match src.get(&kind).and_then(|m| m.get(&name)) {
            Some(v) => match d.get_mut(&name) {
                Some(h) => h.clone_from(v),
                None => {
                    d.insert(name, v.clone());
                }
            },
            None => {
                d.remove(&name);
            }
        }
    }
    debug_assert!(dst == src, "the status's versions drifted from the state's");
}
