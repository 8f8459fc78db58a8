//! The outbound routing decision: a pure function of the routing table and
//! the original destination.
//!
//! In Consul's order: a virtual IP of an upstream goes to that upstream over
//! mTLS (an upstream with a `destination_port` only on that port; an exact
//! (ip, port) entry wins over an ip-only one); an instance address of a dialed-directly upstream goes
//! over mTLS straight to the original destination; anything else passes
//! through as plain TCP, unless `mesh_destinations_only` is set. A
//! destination that is one of veer's own listeners would loop and is refused.
use crate::addr::{EndpointAddr, OrigDstAddr};
use crate::authz::{Matcher, StringMatch};
use crate::spiffe::ServiceId;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The application protocol of an upstream. Only `Tcp` is proxied at L4
/// today; the others are carried for the L7 work to come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "tcp" | "" => Some(Protocol::Tcp),
            "http" => Some(Protocol::Http),
            "http2" => Some(Protocol::Http2),
            "grpc" => Some(Protocol::Grpc),
            _ => None,
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

/// One endpoint of an upstream: the inbound listener of a healthy sidecar.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: EndpointAddr,
    /// Load-balancing weight, at least 1.
    pub weight: u32,
    /// Milliseconds (on the caller's clock) until which this endpoint is
    /// considered failed; 0 when healthy.
    failed_until_ms: AtomicU64,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint::weighted(addr, 1)
    }

    /// An endpoint with a load-balancing weight (0 is taken as 1).
    pub fn weighted(addr: SocketAddr, weight: u32) -> Endpoint {
        Endpoint {
            addr: EndpointAddr(addr),
            weight: weight.max(1),
            failed_until_ms: AtomicU64::new(0),
        }
    }
}

/// A place for whatever the runtime keeps per upstream (its metric
/// handles), set once on first use.
#[derive(Default)]
pub struct StatsSlot(std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>);

impl StatsSlot {
    /// The value of type `T`, made by `init` on the first call; `None` if
    /// the slot holds another type.
    pub fn get_or_init<T: std::any::Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> Arc<T>,
    ) -> Option<&T> {
        self.0
            .get_or_init(|| init() as Arc<dyn std::any::Any + Send + Sync>)
            .downcast_ref()
    }

    /// Endpoints of `u` not in back-off after a failure at `now_ms`.
    pub fn healthy(u: &Upstream, now_ms: u64) -> usize {
        u.endpoints
            .iter()
            .filter(|e| e.failed_until_ms.load(Ordering::Relaxed) <= now_ms)
            .count()
    }
}

impl std::fmt::Debug for StatsSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "StatsSlot(set)"
        } else {
            "StatsSlot(empty)"
        })
    }
}

/// An upstream service and what veer needs to reach it.
#[derive(Debug)]
pub struct Upstream {
    /// The identity its sidecars must present; also gives the SNI.
    pub identity: ServiceId,
    pub sni: String,
    pub protocol: Protocol,
    pub endpoints: Vec<Endpoint>,
    pub virtual_ips: Vec<IpAddr>,
    /// Instance addresses that are dialed directly (headless / DialedDirectly).
    pub instances: Vec<IpAddr>,
    pub dialed_directly: bool,
    /// An explicit upstream's own listener.
    pub local_bind: Option<SocketAddr>,
    pub connect_timeout: Duration,
    /// What the server certificate's URI SAN must match (any of them);
    /// by default exactly the SPIFFE ID of `identity`.
    pub san_matchers: Arc<[Matcher]>,
    /// The port its virtual IPs match; `None` = any port.
    pub destination_port: Option<u16>,
    /// Connections open at once to it; `None` = unlimited.
    pub max_connections: Option<u32>,
    /// Its own trusted CAs (facts, for `/config_dump`); `None` = the
    /// snapshot's roots.
    pub roots: Option<Arc<[crate::tls::CertInfo]>>,
    /// The TLS client configuration for its endpoints: the snapshot's leaf,
    /// this upstream's roots, and a server certificate check that requires
    /// `san_matchers` inside the handshake. Set by `Snapshot::build`.
    pub tls: Option<crate::tls::LazyClientConfig>,
    /// The runtime's metric handles for this upstream, made on its first
    /// connection: later connections find them here, without a lookup.
    pub stats: StatsSlot,
    /// The targets after this one, in failover order (each with its own
    /// identity, SNI, endpoints, connect timeout and TLS configuration;
    /// their other fields are unused). Empty for one target.
    pub failover: Box<[Upstream]>,
    /// Its compiled L7 routes (`UpstreamSpec.http`); `None` = L4.
    pub http: Option<Arc<crate::l7route::HttpTable>>,
    /// The spec it was built from, when its source kept that spec too
    /// (shared, not copied: the xDS translator keeps its last one). A next
    /// spec holding the same `Arc` is known unchanged without comparing
    /// (see `Snapshot::build_after`); held strongly, so the pointer cannot
    /// be reused by another spec meanwhile.
    pub built_from: Option<Arc<crate::snapshot::UpstreamSpec>>,
    open: AtomicU32,
    next: AtomicUsize,
}

impl Upstream {
    /// Whether `self` takes the same destinations as `other` would at the
    /// same position in a table: the fields a route table's index reads.
    pub fn routes_as(&self, other: &Upstream) -> bool {
        self.virtual_ips == other.virtual_ips
            && self.destination_port == other.destination_port
            && self.dialed_directly == other.dialed_directly
            && self.instances == other.instances
    }

    pub fn new(identity: ServiceId, connect_timeout: Duration) -> Upstream {
        let exact = StringMatch::exact(identity.to_string())
            .compile()
            .expect("an exact matcher always compiles");
        Upstream {
            sni: identity.sni(),
            identity,
            protocol: Protocol::Tcp,
            endpoints: Vec::new(),
            virtual_ips: Vec::new(),
            instances: Vec::new(),
            dialed_directly: false,
            local_bind: None,
            connect_timeout,
            san_matchers: Arc::from(vec![exact]),
            destination_port: None,
            max_connections: None,
            roots: None,
            tls: None,
            stats: StatsSlot::default(),
            failover: Box::new([]),
            http: None,
            built_from: None,
            open: AtomicU32::new(0),
            next: AtomicUsize::new(0),
        }
    }

    /// Takes one of its connection slots; `None` when `max_connections`
    /// are open (Envoy's circuit breaker overflow). The slot frees on drop.
    pub fn try_open(self: &Arc<Self>) -> Option<OpenSlot> {
        let max = self.max_connections.unwrap_or(u32::MAX);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(OpenSlot(self.clone()))
    }

    /// Connections open to it now (slots taken).
    pub fn open_connections(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    /// The target a new connection goes to: this one if it has an
    /// endpoint, else the first failover target that has one (endpoints
    /// are the healthy instances). `None` when no target has any.
    #[inline]
    pub fn target(&self) -> Option<&Upstream> {
        if !self.endpoints.is_empty() {
            return Some(self);
        }
        self.failover.iter().find(|t| !t.endpoints.is_empty())
    }

    /// The service name, for logs and metric labels.
    pub fn name(&self) -> &str {
        &self.identity.service
    }

    /// Endpoints in the order to try them for one connection: round robin
    /// from a rotating start, endpoints marked failed (at `now_ms`) last.
    ///
    /// With unequal weights the start is weighted: the k-th connection
    /// starts at the endpoint that holds unit `(k * stride) mod total` of
    /// the summed weights, with `stride` coprime to `total` (near its
    /// golden section), so each run of `total` connections starts at each
    /// endpoint exactly `weight` times, interleaved. Constant memory and
    /// O(endpoints) time, whatever the weights.
    pub fn pick_order(&self, now_ms: u64) -> Vec<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return Vec::new();
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let w0 = self.endpoints[0].weight;
        let start = if self.endpoints.iter().all(|e| e.weight == w0) {
            k % n
        } else {
            weighted_start(&self.endpoints, k as u64)
        };
        let mut order: Vec<&Endpoint> = (0..n).map(|i| &self.endpoints[(start + i) % n]).collect();
        // Stable: healthy ones first, each group keeps round-robin order.
        order.sort_by_key(|e| e.failed_until_ms.load(Ordering::Relaxed) > now_ms);
        order
    }

    /// Marks an endpoint failed until `until_ms`.
    pub fn mark_failed(&self, ep: &Endpoint, until_ms: u64) {
        ep.failed_until_ms.store(until_ms, Ordering::Relaxed);
    }

    pub fn mark_ok(&self, ep: &Endpoint) {
        if ep.failed_until_ms.load(Ordering::Relaxed) != 0 {
            ep.failed_until_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// One open connection to an upstream, for its `max_connections`.
#[derive(Debug)]
pub struct OpenSlot(Arc<Upstream>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn weighted_start(eps: &[Endpoint], k: u64) -> usize {
    let total: u64 = eps.iter().map(|e| u64::from(e.weight)).sum();
    // ~0.618 * total, then the next number coprime to it.
    let mut stride = ((u128::from(total) * 618_034 / 1_000_000) as u64).max(1);
    while gcd(stride, total) != 1 {
        stride += 1;
    }
    let mut unit = ((u128::from(k) * u128::from(stride)) % u128::from(total)) as u64;
    for (i, e) in eps.iter().enumerate() {
        let w = u64::from(e.weight);
        if unit < w {
            return i;
        }
        unit -= w;
    }
    0
}

/// Where an outbound connection goes.
#[derive(Clone, Debug)]
pub enum Route {
    /// mTLS to an endpoint of the upstream (virtual IP or explicit upstream).
    Mesh { upstream: Arc<Upstream> },
    /// mTLS straight to the original destination (dialed directly).
    Direct {
        upstream: Arc<Upstream>,
        addr: EndpointAddr,
    },
    /// Plain TCP to the original destination.
    Passthrough { addr: EndpointAddr },
}

impl Route {
    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Mesh { .. } => "mesh",
            Route::Direct { .. } => "direct",
            Route::Passthrough { .. } => "passthrough",
        }
    }
}

/// Why an outbound connection has no route. `classify()` gives a metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The original destination is veer's own listener: dialing it would loop
    /// (the proxy's traffic is not excluded from redirection, or a client
    /// dialled the listener directly).
    #[error("original destination {0} is veer's own listener; refusing to loop (is the proxy UID excluded from redirection?)")]
    Loop(OrigDstAddr),
    /// `mesh_destinations_only` is set and the destination is not in the mesh.
    #[error(
        "original destination {0} is not a mesh destination and mesh_destinations_only is set"
    )]
    NotInMesh(OrigDstAddr),
    /// The upstream has no endpoints.
    #[error("upstream {0} has no healthy endpoints")]
    NoEndpoints(String),
}

impl RouteError {
    pub fn classify(&self) -> &'static str {
        match self {
            RouteError::Loop(_) => "loop",
            RouteError::NotInMesh(_) => "not_in_mesh",
            RouteError::NoEndpoints(_) => "no_endpoints",
        }
    }
}

/// The routing table of one snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    upstreams: Vec<Arc<Upstream>>,
    /// Shared with the previous table when no upstream's routing fields
    /// changed (see [`RouteTable::reindexed`]).
    index: Arc<Index>,
    mesh_destinations_only: bool,
    /// veer's own listener addresses, for loop detection.
    own_listeners: Vec<SocketAddr>,
}

impl RouteTable {
    /// Builds the table. When two upstreams claim one address, the first wins
    /// (and the caller is expected to have reported the conflict).
    pub fn new(
        upstreams: Vec<Upstream>,
        mesh_destinations_only: bool,
        own_listeners: Vec<SocketAddr>,
    ) -> RouteTable {
        // Not `into_iter().map(Arc::new).collect()`: that collects in place
        // and keeps the `Vec<Upstream>`'s buffer (hundreds of bytes per
        // upstream) as this vector's spare capacity for the snapshot's life.
        let mut arcs = Vec::with_capacity(upstreams.len());
        arcs.extend(upstreams.into_iter().map(Arc::new));
        RouteTable::from_shared(arcs, mesh_destinations_only, own_listeners)
    }

    /// [`RouteTable::new`] from upstreams that may be shared with another
    /// table (a snapshot keeps the previous one's unchanged upstreams).
    pub fn from_shared(
        upstreams: Vec<Arc<Upstream>>,
        mesh_destinations_only: bool,
        own_listeners: Vec<SocketAddr>,
    ) -> RouteTable {
        let index = Arc::new(Index::of(&upstreams));
        RouteTable::with_index(upstreams, index, mesh_destinations_only, own_listeners)
    }

    /// [`RouteTable::from_shared`], keeping `prev`'s index (VIP, VIP and
    /// port, instance -> upstream) when every upstream at each position
    /// has the routing fields of `prev`'s there ([`Upstream::routes_as`]):
    /// an endpoint change then hashes no address. The comparison is
    /// cheap (no hashing, no allocation).
    pub fn reindexed(
        upstreams: Vec<Arc<Upstream>>,
        mesh_destinations_only: bool,
        own_listeners: Vec<SocketAddr>,
        prev: &RouteTable,
    ) -> RouteTable {
        let same = upstreams.len() == prev.upstreams.len()
            && upstreams
                .iter()
                .zip(&prev.upstreams)
                .all(|(u, p)| Arc::ptr_eq(u, p) || u.routes_as(p));
        let index = match same {
            true => prev.index.clone(),
            false => Arc::new(Index::of(&upstreams)),
        };
        RouteTable::with_index(upstreams, index, mesh_destinations_only, own_listeners)
    }

    /// Whether this table's index is `other`'s, shared (for tests).
    pub fn shares_index_with(&self, other: &RouteTable) -> bool {
        Arc::ptr_eq(&self.index, &other.index)
    }

    fn with_index(
        upstreams: Vec<Arc<Upstream>>,
        index: Arc<Index>,
        mesh_destinations_only: bool,
        own_listeners: Vec<SocketAddr>,
    ) -> RouteTable {
        let own_listeners = own_listeners
            .into_iter()
            .map(crate::addr::canonical)
            .collect();
        RouteTable {
            upstreams,
            index,
            mesh_destinations_only,
            own_listeners,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    pub fn mesh_destinations_only(&self) -> bool {
        self.mesh_destinations_only
    }

    /// Finds an upstream by service name (explicit upstream listeners).
    pub fn upstream_by_bind(&self, bind: SocketAddr) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.local_bind == Some(bind))
    }

    fn is_own_listener(&self, dst: SocketAddr) -> bool {
        self.own_listeners.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip() == dst.ip() || (l.ip().is_unspecified() && dst.ip().is_loopback()))
        })
    }
}

/// Which upstream (by position) each destination address goes to.
#[derive(Debug, Default)]
struct Index {
    by_vip: HashMap<IpAddr, usize>,
    /// VIPs of upstreams with a `destination_port`.
    by_vip_port: HashMap<(IpAddr, u16), usize>,
    by_instance: HashMap<IpAddr, usize>,
}

impl Index {
    /// Reads only the fields [`Upstream::routes_as`] compares.
    fn of(upstreams: &[Arc<Upstream>]) -> Index {
        let mut x = Index::default();
        // Every address is keyed in canonical form: `::ffff:10.0.0.1` and
        // `10.0.0.1` are one destination.
        for (i, u) in upstreams.iter().enumerate() {
            for ip in &u.virtual_ips {
                match u.destination_port {
                    Some(p) => x.by_vip_port.entry((canonical_ip(*ip), p)).or_insert(i),
                    None => x.by_vip.entry(canonical_ip(*ip)).or_insert(i),
                };
            }
            if u.dialed_directly {
                for ip in &u.instances {
                    x.by_instance.entry(canonical_ip(*ip)).or_insert(i);
                }
            }
        }
        x
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    crate::addr::canonical(SocketAddr::new(ip, 0)).ip()
}

/// Decides where a redirected outbound connection goes.
pub fn route(table: &RouteTable, orig_dst: OrigDstAddr) -> Result<Route, RouteError> {
    let dst = crate::addr::canonical(orig_dst.0);
    if table.is_own_listener(dst) {
        return Err(RouteError::Loop(orig_dst));
    }
    let index = &*table.index;
    let vip = match index.by_vip_port.is_empty() {
        true => None,
        false => index.by_vip_port.get(&(dst.ip(), dst.port())),
    };
    if let Some(&i) = vip.or_else(|| index.by_vip.get(&dst.ip())) {
        let upstream = table.upstreams[i].clone();
        if upstream.target().is_none() {
            return Err(RouteError::NoEndpoints(upstream.name().to_string()));
        }
        return Ok(Route::Mesh { upstream });
    }
    if let Some(&i) = index.by_instance.get(&dst.ip()) {
        return Ok(Route::Direct {
            upstream: table.upstreams[i].clone(),
            addr: EndpointAddr(orig_dst.0),
        });
    }
    if table.mesh_destinations_only {
        return Err(RouteError::NotInMesh(orig_dst));
    }
    Ok(Route::Passthrough {
        addr: EndpointAddr(orig_dst.0),
    })
}

/// The route of an explicit upstream listener: always that upstream.
pub fn route_explicit(upstream: &Arc<Upstream>) -> Result<Route, RouteError> {
    if upstream.target().is_none() {
        return Err(RouteError::NoEndpoints(upstream.name().to_string()));
    }
    Ok(Route::Mesh {
        upstream: upstream.clone(),
    })
}

#[cfg(test)]
mod tests;
