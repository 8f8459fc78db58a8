//! A Delta ADS server that behaves as Consul's (v1.16 `agent/xds/delta.go`,
//! as summarised in `/work/shared/reference/xds-dropin.md` §3), serving
//! whatever resources a test sets, and recording every request.
//!
//! - A type is wildcard iff its first request has an empty
//!   `resource_names_subscribe`; `"*"` means nothing special.
//! - A name in `resource_names_subscribe` is always (re)sent;
//!   `initial_resource_versions` of a type's first request is honoured.
//! - Responses go out in Consul's order: SDS, CDS, EDS upserts, LDS and RDS
//!   upserts with their removals, then CDS, EDS and SDS removals. One
//!   response per type is in flight at a time; LDS and RDS wait while a CDS
//!   or EDS response is un-ACKed.
//! - Version = a hash of the encoded resource, nonce = a `%08x` counter.
//! - A NACK drops the pending update: the NACKed versions are not sent
//!   again until the resource changes (or is subscribed again).
//! - With [`XdsServer::require_token`], a stream without the right
//!   `x-consul-token` ends with `PermissionDenied`.
//!
//! - Right after a CDS response, the EDS of the clusters in it is sent
//!   again (Consul does so because Envoy forgets a cluster's endpoints and
//!   does not ACK the cluster before they come).
//!
//! Not modelled: Consul re-sending a listener's RDS after an LDS ACK, and
//! the ACL re-checks while idle.
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Consul's send order: (type, upserts, removals).
const ORDER: [(&str, bool, bool); 8] = [
    (SDS, true, false),
    (CDS, true, false),
    (EDS, true, false),
    (LDS, true, true),
    (RDS, true, true),
    (CDS, false, true),
    (EDS, false, true),
    (SDS, false, true),
];

/// One request the server got.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Which stream (counted from 1 over the server's life, across restarts).
    pub stream: u64,
    pub req: DeltaDiscoveryRequest,
    /// When the server read it.
    pub at: std::time::Instant,
}

impl Recorded {
    pub fn type_url(&self) -> &str {
        &self.req.type_url
    }
    /// An ACK: a nonce and no error.
    pub fn is_ack(&self) -> bool {
        !self.req.response_nonce.is_empty() && self.req.error_detail.is_none()
    }
    /// A NACK: a nonce and an error.
    pub fn is_nack(&self) -> bool {
        !self.req.response_nonce.is_empty() && self.req.error_detail.is_some()
    }
    /// The NACK's message.
    pub fn error(&self) -> Option<&str> {
        self.req.error_detail.as_ref().map(|e| e.message.as_str())
    }
}

/// One response the server sent (without the resource bodies).
#[derive(Clone, Debug)]
pub struct Sent {
    pub stream: u64,
    /// When it was handed to the stream.
    pub at: std::time::Instant,
    pub type_url: String,
    pub nonce: String,
    /// (name, version) of each resource sent.
    pub resources: Vec<(String, String)>,
    pub removed: Vec<String>,
}

#[derive(Default)]
struct Log {
    requests: Vec<Recorded>,
    sent: Vec<Sent>,
}

/// type URL -> name -> (resource, version).
type Store = BTreeMap<String, BTreeMap<String, (Any, String)>>;

/// An un-ACKed response: nonce, upserts (name, version), removals.
type Pending = (String, Vec<(String, String)>, Vec<String>);

struct Shared {
    /// type URL -> name -> (resource, version).
    store: Mutex<Store>,
    changed: watch::Sender<u64>,
    token: Mutex<Option<String>>,
    log: Mutex<Log>,
    streams: AtomicU64,
    nonces: AtomicU64,
}

#[derive(Clone, Debug)]
enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The server; see the module documentation.
pub struct XdsServer {
    shared: Arc<Shared>,
    addr: Addr,
    /// Server certificate chain and key, PEM (TCP only).
    tls: Option<(String, String)>,
    running: Option<Running>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

/// A message packed in an `Any` (type URL from `prost::Name`).
pub fn any_of<M: prost::Message + prost::Name>(msg: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: msg.encode_to_vec(),
    }
}

/// A version: a hash of the encoded resource (Consul uses sha256).
pub fn version_of(any: &Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    any.encode_to_vec().hash(&mut h);
    format!("{:016x}", h.finish())
}

impl XdsServer {
    fn new(addr: Addr) -> XdsServer {
        XdsServer {
            shared: Arc::new(Shared {
                store: Mutex::default(),
                changed: watch::channel(0).0,
                token: Mutex::default(),
                log: Mutex::default(),
                streams: AtomicU64::new(0),
                nonces: AtomicU64::new(0),
            }),
            addr,
            tls: None,
            running: None,
        }
    }

    /// Serves on a TCP address (port 0 picks one; see [`addr`](Self::addr)).
    pub async fn tcp(addr: SocketAddr) -> std::io::Result<XdsServer> {
        let l = tokio::net::TcpListener::bind(addr).await?;
        Self::tcp_listener(l.into_std()?)
    }

    /// Serves on a listener bound by the caller (e.g. inside a network
    /// namespace). Needs a tokio runtime.
    pub fn tcp_listener(l: std::net::TcpListener) -> std::io::Result<XdsServer> {
        let mut s = XdsServer::new(Addr::Tcp(l.local_addr()?));
        s.serve_tcp(l)?;
        Ok(s)
    }

    /// Serves gRPC over TLS on a TCP address, with this certificate chain
    /// and key (PEM); no client certificate is asked for.
    pub async fn tcp_tls(
        addr: SocketAddr,
        chain_pem: &str,
        key_pem: &str,
    ) -> std::io::Result<XdsServer> {
        let l = tokio::net::TcpListener::bind(addr).await?.into_std()?;
        let mut s = XdsServer::new(Addr::Tcp(l.local_addr()?));
        s.tls = Some((chain_pem.to_string(), key_pem.to_string()));
        s.serve_tcp(l)?;
        Ok(s)
    }

    /// Serves on a unix socket at `path` (removed first if it exists).
    pub async fn unix(path: impl Into<PathBuf>) -> std::io::Result<XdsServer> {
        let mut s = XdsServer::new(Addr::Unix(path.into()));
        s.serve_unix()?;
        Ok(s)
    }

    /// The TCP address served, if TCP.
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.addr {
            Addr::Tcp(a) => Some(*a),
            Addr::Unix(_) => None,
        }
    }

    fn serve_tcp(&mut self, l: std::net::TcpListener) -> std::io::Result<()> {
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        self.serve(incoming)
    }

    fn serve_unix(&mut self) -> std::io::Result<()> {
        let Addr::Unix(path) = &self.addr else {
            unreachable!()
        };
        let _ = std::fs::remove_file(path);
        let l = tokio::net::UnixListener::bind(path)?;
        self.serve(tokio_stream::wrappers::UnixListenerStream::new(l))
    }

    fn serve<I, IO>(&mut self, incoming: I) -> std::io::Result<()>
    where
        I: tokio_stream::Stream<Item = std::io::Result<IO>> + Send + 'static,
        IO: tokio::io::AsyncRead
            + tokio::io::AsyncWrite
            + tonic::transport::server::Connected
            + Unpin
            + Send
            + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let svc = AggregatedDiscoveryServiceServer::new(Service {
            shared: self.shared.clone(),
            stop: stop.subscribe(),
        })
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
        let mut builder = tonic::transport::Server::builder();
        if let Some((chain, key)) = &self.tls {
            let tls = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(chain, key));
            builder = builder
                .tls_config(tls)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        let task = tokio::spawn(async move {
            let _ = builder
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
        });
        self.running = Some(Running { stop, task });
        Ok(())
    }

    /// Stops serving: open streams end (the client sees the stream close)
    /// and the address is released. The resources and the log stay.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), r.task).await;
        }
    }

    /// Serves again on the same address (after [`stop`](Self::stop)).
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.stop().await;
        match self.addr.clone() {
            Addr::Tcp(a) => {
                let l = tokio::net::TcpListener::bind(a).await?;
                self.serve_tcp(l.into_std()?)
            }
            Addr::Unix(_) => self.serve_unix(),
        }
    }

    /// Serves again on a listener bound by the caller (same address, e.g.
    /// inside a network namespace).
    pub async fn restart_on(&mut self, l: std::net::TcpListener) -> std::io::Result<()> {
        self.stop().await;
        self.addr = Addr::Tcp(l.local_addr()?);
        self.serve_tcp(l)
    }

    /// Requires `x-consul-token: <token>` on every stream (`None`: no check).
    pub fn require_token(&self, token: Option<&str>) {
        *self.shared.token.lock().unwrap() = token.map(str::to_string);
    }

    /// Sets (adds or replaces) a resource of a type; streams get it.
    pub fn set(&self, type_url: &str, name: &str, any: Any) {
        let v = version_of(&any);
        self.shared
            .store
            .lock()
            .unwrap()
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), (any, v));
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// Sets several resources at once (so that those of one type go out in
    /// one response).
    pub fn set_all(&self, items: Vec<(&str, &str, Any)>) {
        {
            let mut store = self.shared.store.lock().unwrap();
            for (ty, name, any) in items {
                let v = version_of(&any);
                store
                    .entry(ty.to_string())
                    .or_default()
                    .insert(name.to_string(), (any, v));
            }
        }
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// Sets a resource from its message (type URL from `prost::Name`).
    pub fn put<M: prost::Message + prost::Name>(&self, name: &str, msg: &M) {
        self.set(&M::type_url(), name, any_of(msg));
    }

    /// Removes a resource; streams that hold it are told.
    pub fn remove(&self, type_url: &str, name: &str) {
        if let Some(m) = self.shared.store.lock().unwrap().get_mut(type_url) {
            m.remove(name);
        }
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// The version the server gives a resource now.
    pub fn version(&self, type_url: &str, name: &str) -> Option<String> {
        let store = self.shared.store.lock().unwrap();
        Some(store.get(type_url)?.get(name)?.1.clone())
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.log.lock().unwrap().requests.clone()
    }

    /// Every response so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.shared.log.lock().unwrap().sent.clone()
    }

    /// Polls until `pred(requests, sent)` holds; false after `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Recorded], &[Sent]) -> bool,
    ) -> bool {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            {
                let log = self.shared.log.lock().unwrap();
                if pred(&log.requests, &log.sent) {
                    return true;
                }
            }
            if tokio::time::Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for XdsServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.stop.send(true);
            r.task.abort();
        }
    }
}

struct Service {
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("only incremental xDS is supported"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let want = self.shared.token.lock().unwrap().clone();
        if let Some(want) = want {
            let got = req
                .metadata()
                .get("x-consul-token")
                .and_then(|v| v.to_str().ok());
            if got != Some(want.as_str()) {
                return Err(Status::permission_denied(
                    "permission denied: token lacks service:write",
                ));
            }
        }
        let id = self.shared.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(16);
        let stream = Stream {
            id,
            shared: self.shared.clone(),
            types: HashMap::new(),
            tx,
        };
        tokio::spawn(stream.run(req.into_inner(), self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The state of one type on one stream.
#[derive(Default)]
struct TypeState {
    wildcard: bool,
    /// Registered by the request being handled (its first).
    fresh: bool,
    subscriptions: BTreeSet<String>,
    /// What the client holds, by name ("" = must be re-sent).
    versions: HashMap<String, String>,
    /// Versions the client NACKed: not sent again until they change.
    nacked: HashMap<String, String>,
    /// The un-ACKed response: nonce, upserts (name, version), removals.
    pending: Option<Pending>,
}

struct Stream {
    id: u64,
    shared: Arc<Shared>,
    types: HashMap<String, TypeState>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl Stream {
    async fn run(
        mut self,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut changed = self.shared.changed.subscribe();
        loop {
            tokio::select! {
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                r = changed.changed() => {
                    if r.is_err() { return; }
                }
                m = inbound.message() => match m {
                    Ok(Some(req)) => {
                        if let Err(s) = self.on_request(req) {
                            let _ = self.tx.send(Err(s)).await;
                            return;
                        }
                    }
                    _ => return,
                },
            }
            if self.generate().await.is_err() {
                return;
            }
        }
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        // Read before the lock, which a test polling the log may hold.
        let at = std::time::Instant::now();
        self.shared.log.lock().unwrap().requests.push(Recorded {
            stream: self.id,
            req: req.clone(),
            at,
        });
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument("type URL is required for ADS"));
        }
        if ![LDS, RDS, CDS, EDS, SDS].contains(&req.type_url.as_str()) {
            return Ok(());
        }
        let first = !self.types.contains_key(&req.type_url);
        let t = self.types.entry(req.type_url.clone()).or_default();
        if first {
            t.wildcard = req.resource_names_subscribe.is_empty();
            t.fresh = true;
        }
        if !req.response_nonce.is_empty() {
            if let Some((nonce, ups, rms)) = t.pending.take() {
                if nonce != req.response_nonce {
                    t.pending = Some((nonce, ups, rms));
                } else if req.error_detail.is_none() {
                    for (n, v) in ups {
                        t.versions.insert(n, v);
                    }
                    for n in rms {
                        t.versions.remove(&n);
                    }
                    return self.subscribe(req);
                } else {
                    for (n, v) in ups {
                        t.nacked.insert(n, v);
                    }
                }
            }
        }
        self.subscribe(req)
    }

    /// The subscription part of a request.
    fn subscribe(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        let t = self.types.get_mut(&req.type_url).expect("registered");
        let first = std::mem::take(&mut t.fresh);
        if first && !req.initial_resource_versions.is_empty() {
            t.versions = req.initial_resource_versions.clone();
            if !t.wildcard {
                t.subscriptions
                    .extend(req.initial_resource_versions.keys().cloned());
            }
        }
        if !t.wildcard {
            for n in &req.resource_names_subscribe {
                t.subscriptions.insert(n.clone());
                t.nacked.remove(n);
                if let Some(v) = t.versions.get_mut(n) {
                    v.clear();
                }
            }
            for n in &req.resource_names_unsubscribe {
                t.subscriptions.remove(n);
                t.versions.remove(n);
            }
        }
        Ok(())
    }

    /// Sends what is due, in Consul's order.
    async fn generate(&mut self) -> Result<(), ()> {
        let mut out = Vec::new();
        {
            let store = self.shared.store.lock().unwrap();
            let empty = BTreeMap::new();
            for (ty, upsert, remove) in ORDER {
                let pending = |t: &str| self.types.get(t).is_some_and(|s| s.pending.is_some());
                if (ty == LDS || ty == RDS) && (pending(CDS) || pending(EDS)) {
                    continue;
                }
                let Some(t) = self.types.get_mut(ty) else {
                    continue;
                };
                if t.pending.is_some() {
                    continue;
                }
                let have = store.get(ty).unwrap_or(&empty);
                let in_scope = |n: &str| t.wildcard || t.subscriptions.contains(n);
                let mut resources = Vec::new();
                if upsert {
                    for (name, (any, v)) in have {
                        if in_scope(name)
                            && t.versions.get(name) != Some(v)
                            && t.nacked.get(name) != Some(v)
                        {
                            resources.push(Resource {
                                name: name.clone(),
                                version: v.clone(),
                                resource: Some(any.clone()),
                                ..Default::default()
                            });
                        }
                    }
                }
                let mut removed = Vec::new();
                if remove {
                    for name in t.versions.keys() {
                        if in_scope(name) && !have.contains_key(name) {
                            removed.push(name.clone());
                        }
                    }
                    removed.sort();
                }
                if resources.is_empty() && removed.is_empty() {
                    continue;
                }
                let nonce = format!(
                    "{:08x}",
                    self.shared.nonces.fetch_add(1, Ordering::Relaxed) + 1
                );
                let ups: Vec<(String, String)> = resources
                    .iter()
                    .map(|r| (r.name.clone(), r.version.clone()))
                    .collect();
                t.pending = Some((nonce.clone(), ups.clone(), removed.clone()));
                let at = std::time::Instant::now();
                self.shared.log.lock().unwrap().sent.push(Sent {
                    stream: self.id,
                    at,
                    type_url: ty.to_string(),
                    nonce: nonce.clone(),
                    resources: ups,
                    removed: removed.clone(),
                });
                let updated: Vec<String> = resources.iter().map(|r| r.name.clone()).collect();
                out.push(DeltaDiscoveryResponse {
                    type_url: ty.to_string(),
                    nonce,
                    resources,
                    removed_resources: removed,
                    ..Default::default()
                });
                // Consul (`ensureChildResend`, v1.16.0 agent/xds/delta.go):
                // when a cluster update is sent, the cluster's endpoints are
                // sent again right behind it (Envoy forgets them, and does
                // not ACK the cluster until they come).
                if ty == CDS {
                    if let Some(e) = self.types.get_mut(EDS) {
                        for n in updated {
                            if let Some(v) = e.versions.get_mut(&n) {
                                v.clear();
                            }
                        }
                    }
                }
            }
        }
        for r in out {
            self.tx.send(Ok(r)).await.map_err(|_| ())?;
        }
        Ok(())
    }
}
