//! The `envoy_*` metrics: Envoy's names, with the labels Consul's
//! `stats_tags` extract (see [`veer_core::stats_tags`]), for what Consul's
//! UI, dashboards and alerts read.
//!
//! Series exist only for what is in use: a cluster and its upstream
//! listener's TCP stats are made on the upstream's first connection (Envoy
//! makes them for every cluster it is sent, idle or not); their handles are
//! then kept in the upstream itself ([`veer_core::route::StatsSlot`]), so a
//! connection adds to plain atomics and never looks a label set up. The
//! maps below are locked only when a series is made and when `/stats/prometheus`
//! is rendered.
use super::hist::{Hist, ENVOY_BUCKETS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use veer_core::route::Upstream;
use veer_core::snapshot::Snapshot;
use veer_core::stats_tags::{upstream_tcp_prefix, StatName, TagRules};

/// The cluster Consul names the local app's.
pub const LOCAL_APP: &str = "local_app";
/// The TCP stat prefix of Consul's public listener.
pub const PUBLIC_LISTENER: &str = "public_listener";
/// The stat prefix of Consul's network RBAC filter.
pub const CONNECT_AUTHZ: &str = "connect_authz";

type Labels = Arc<[(String, String)]>;

/// A resource's Prometheus name prefix and labels, from tagging one of its
/// stats (Consul's extractors look at the resource part of the name only).
#[derive(Debug)]
struct Tags {
    prefix: String,
    labels: Labels,
}

impl Tags {
    fn new(rules: &TagRules, stat: StatName, probe: &str, fallback: &str) -> Tags {
        let t = rules.tagged(&stat);
        let prefix = t
            .name
            .strip_suffix(probe)
            .map_or_else(|| fallback.to_string(), str::to_string);
        Tags {
            prefix,
            labels: t.labels.into(),
        }
    }
    fn name(&self, stat: &str) -> String {
        format!("{}{stat}", self.prefix)
    }
}

/// Envoy's cluster stats (`cluster.<name>.*`).
#[derive(Debug)]
pub struct ClusterStats {
    tags: Tags,
    pub cx_total: AtomicU64,
    pub cx_active: AtomicU64,
    pub connect_fail: AtomicU64,
    pub connect_timeout: AtomicU64,
    /// Bytes received from / sent to the cluster's endpoints.
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub connect_ms: Hist,
    pub length_ms: Hist,
    pub membership_total: AtomicU64,
    pub membership_healthy: AtomicU64,
    /// Its request stats, made on its first HTTP request (L4 clusters
    /// never have them).
    http: std::sync::OnceLock<Box<HttpClusterStats>>,
}

/// Envoy's per-cluster request stats (`upstream_rq_total`,
/// `upstream_rq_<class>xx`, `upstream_rq_time`).
#[derive(Debug)]
pub struct HttpClusterStats {
    pub rq_total: AtomicU64,
    /// By response class 1xx..5xx.
    pub rq_xx: [AtomicU64; 5],
    /// Milliseconds until the response head.
    pub rq_time: Hist,
    /// The cluster's labels with `envoy_response_code_class` = 1..5.
    class_labels: [Labels; 5],
}

impl HttpClusterStats {
    /// One answered request (`status` as sent to the app) after `ms`.
    pub fn answered(&self, status: u16, ms: f64) {
        self.rq_total.fetch_add(1, Relaxed);
        if let Some(c) = (status / 100).checked_sub(1).filter(|c| *c < 5) {
            self.rq_xx[c as usize].fetch_add(1, Relaxed);
        }
        self.rq_time.observe(ms);
    }
}

impl ClusterStats {
    /// Its request stats, made on first use.
    pub fn http(&self) -> &HttpClusterStats {
        self.http.get_or_init(|| {
            let class_labels = std::array::from_fn(|i| {
                let mut l = self.tags.labels.to_vec();
                l.push(("envoy_response_code_class".to_string(), (i + 1).to_string()));
                Labels::from(l)
            });
            Box::new(HttpClusterStats {
                rq_total: AtomicU64::new(0),
                rq_xx: Default::default(),
                rq_time: Hist::new(ENVOY_BUCKETS),
                class_labels,
            })
        })
    }

    fn new(rules: &TagRules, name: &str) -> ClusterStats {
        ClusterStats {
            tags: Tags::new(
                rules,
                StatName::cluster(name, "upstream_cx_total"),
                "upstream_cx_total",
                "envoy_cluster_",
            ),
            cx_total: AtomicU64::new(0),
            cx_active: AtomicU64::new(0),
            connect_fail: AtomicU64::new(0),
            connect_timeout: AtomicU64::new(0),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            connect_ms: Hist::new(ENVOY_BUCKETS),
            length_ms: Hist::new(ENVOY_BUCKETS),
            membership_total: AtomicU64::new(0),
            membership_healthy: AtomicU64::new(0),
            http: std::sync::OnceLock::new(),
        }
    }

    /// One connection attempt to an endpoint began.
    pub fn attempt(&self) {
        self.cx_total.fetch_add(1, Relaxed);
        self.cx_active.fetch_add(1, Relaxed);
    }

    /// The attempt failed (`timeout`: the connect timeout passed).
    pub fn failed(&self, timeout: bool) {
        self.connect_fail.fetch_add(1, Relaxed);
        if timeout {
            self.connect_timeout.fetch_add(1, Relaxed);
        }
        self.cx_active.fetch_sub(1, Relaxed);
    }

    /// A connection made by [`ClusterStats::attempt`] closed after `ms`.
    pub fn closed(&self, ms: f64) {
        self.length_ms.observe(ms);
        self.cx_active.fetch_sub(1, Relaxed);
    }
}

/// The TCP proxy's stats (`tcp.<stat_prefix>.*`); its bytes are its
/// cluster's, seen from the downstream side.
#[derive(Debug)]
pub struct TcpStats {
    tags: Tags,
    pub cx_total: AtomicU64,
    pub no_route: AtomicU64,
    pub cluster: Arc<ClusterStats>,
}

impl TcpStats {
    fn new(rules: &TagRules, prefix: &str, cluster: Arc<ClusterStats>) -> TcpStats {
        TcpStats {
            tags: Tags::new(
                rules,
                StatName::tcp(prefix, "downstream_cx_total"),
                "downstream_cx_total",
                "envoy_tcp_",
            ),
            cx_total: AtomicU64::new(0),
            no_route: AtomicU64::new(0),
            cluster,
        }
    }

    /// The counters a relay adds its bytes to: received from the
    /// downstream (sent to the cluster) and sent to the downstream.
    pub fn bytes(&self) -> (&AtomicU64, &AtomicU64) {
        (&self.cluster.tx_bytes, &self.cluster.rx_bytes)
    }
}

/// A listener's stats (`listener.<address>.*`).
#[derive(Debug)]
pub struct ListenerStats {
    tags: Tags,
    pub cx_total: AtomicU64,
    pub cx_active: AtomicU64,
    pub length_ms: Hist,
}

/// The network RBAC filter's stats (`connect_authz.rbac.*`).
#[derive(Debug)]
pub struct RbacStats {
    tags: Tags,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
}

/// The inbound HTTP connection manager's request stats
/// (`http.public_listener.downstream_rq_*`): Envoy's
/// `envoy_http_downstream_rq_xx{envoy_response_code_class}`,
/// `envoy_http_downstream_rq_total` and `envoy_http_downstream_rq_time`.
#[derive(Debug)]
pub struct HttpStats {
    tags: Tags,
    /// `tags.labels` plus `envoy_response_code_class` 1..=5.
    class_labels: [Labels; 5],
    pub rq_total: AtomicU64,
    pub rq_xx: [AtomicU64; 5],
    pub rq_time_ms: Hist,
}

impl HttpStats {
    fn new(rules: &TagRules, prefix: &str) -> HttpStats {
        let tags = Tags::new(
            rules,
            StatName::http(prefix, "downstream_rq_total"),
            "downstream_rq_total",
            "envoy_http_",
        );
        let class_labels = std::array::from_fn(|i| {
            let mut l = tags.labels.to_vec();
            l.push(("envoy_response_code_class".into(), (i + 1).to_string()));
            l.into()
        });
        HttpStats {
            tags,
            class_labels,
            rq_total: AtomicU64::new(0),
            rq_xx: Default::default(),
            rq_time_ms: Hist::new(ENVOY_BUCKETS),
        }
    }

    /// One request answered with `status` after `ms`.
    pub fn request(&self, status: u16, ms: f64) {
        self.rq_total.fetch_add(1, Relaxed);
        if let Some(c) = self.rq_xx.get(usize::from(status / 100).wrapping_sub(1)) {
            c.fetch_add(1, Relaxed);
        }
        self.rq_time_ms.observe(ms);
    }
}

/// What an outbound connection to one upstream adds to.
#[derive(Debug)]
pub struct UpstreamStats {
    pub cluster: Arc<ClusterStats>,
    pub tcp: Arc<TcpStats>,
}

/// What an inbound connection adds to.
#[derive(Debug)]
pub struct InboundStats {
    pub cluster: Arc<ClusterStats>,
    pub tcp: Arc<TcpStats>,
    pub rbac: RbacStats,
    /// Made by the first L7 request ([`EnvoyStats::inbound_http`]).
    pub http: std::sync::OnceLock<HttpStats>,
}

/// Every `envoy_*` series.
#[derive(Debug, Default)]
pub struct EnvoyStats {
    rules: RwLock<Arc<TagRules>>,
    clusters: Mutex<HashMap<String, Arc<ClusterStats>>>,
    tcp: Mutex<HashMap<String, Arc<TcpStats>>>,
    listeners: Mutex<HashMap<SocketAddr, Arc<ListenerStats>>>,
    inbound: std::sync::OnceLock<Arc<InboundStats>>,
    /// `server.live` and `server.uptime` (seconds), set before a render.
    pub live: AtomicU64,
    pub uptime: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EnvoyStats {
    /// The tag extractors series made from now on use (set at start: a
    /// bootstrap's `stats_config`, or Consul's for the other sources).
    pub fn set_rules(&self, rules: TagRules) {
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(rules);
    }

    fn rules(&self) -> Arc<TagRules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn cluster(&self, rules: &TagRules, name: &str) -> Arc<ClusterStats> {
        lock(&self.clusters)
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(ClusterStats::new(rules, name)))
            .clone()
    }

    fn tcp(&self, rules: &TagRules, prefix: &str, cluster: Arc<ClusterStats>) -> Arc<TcpStats> {
        lock(&self.tcp)
            .entry(prefix.to_string())
            .or_insert_with(|| Arc::new(TcpStats::new(rules, prefix, cluster)))
            .clone()
    }

    /// The stats of `u` (its cluster is named by its SNI, as Consul names
    /// it; its TCP prefix is Consul's `upstream.<svc>.<ns>.<partition>.<dc>`),
    /// made on first use and kept in `u`.
    pub fn upstream<'u>(&self, u: &'u Upstream) -> Option<&'u UpstreamStats> {
        u.stats.get_or_init(|| {
            let rules = self.rules();
            let cluster = self.cluster(&rules, &u.sni);
            let tcp = self.tcp(&rules, &upstream_tcp_prefix(&u.identity), cluster.clone());
            Arc::new(UpstreamStats { cluster, tcp })
        })
    }

    /// The inbound side's stats: cluster `local_app`, TCP prefix
    /// `public_listener`, RBAC prefix `connect_authz`.
    pub fn inbound(&self) -> &InboundStats {
        self.inbound.get_or_init(|| {
            let rules = self.rules();
            let cluster = self.cluster(&rules, LOCAL_APP);
            cluster.membership_total.store(1, Relaxed);
            cluster.membership_healthy.store(1, Relaxed);
            let tcp = self.tcp(&rules, PUBLIC_LISTENER, cluster.clone());
            let rbac = RbacStats {
                tags: Tags::new(
                    &rules,
                    StatName::rbac(CONNECT_AUTHZ, "allowed"),
                    "allowed",
                    "envoy_rbac_",
                ),
                allowed: AtomicU64::new(0),
                denied: AtomicU64::new(0),
            };
            Arc::new(InboundStats {
                cluster,
                tcp,
                rbac,
                http: std::sync::OnceLock::new(),
            })
        })
    }

    /// The public listener's HTTP stats (an L7 inbound listener).
    pub fn inbound_http(&self) -> &HttpStats {
        self.inbound()
            .http
            .get_or_init(|| HttpStats::new(&self.rules(), PUBLIC_LISTENER))
    }

    /// The stats of the listener on `addr` (resolved once per listener).
    pub fn listener(&self, addr: SocketAddr) -> Arc<ListenerStats> {
        let rules = self.rules();
        lock(&self.listeners)
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(ListenerStats {
                    tags: Tags::new(
                        &rules,
                        StatName::listener(addr, "downstream_cx_total"),
                        "downstream_cx_total",
                        "envoy_listener_",
                    ),
                    cx_total: AtomicU64::new(0),
                    cx_active: AtomicU64::new(0),
                    length_ms: Hist::new(ENVOY_BUCKETS),
                })
            })
            .clone()
    }

    /// Sets the gauges read from the snapshot (cluster membership of the
    /// upstreams in use) and the server's.
    pub fn refresh(&self, snap: &Snapshot, now_ms: u64, live: bool, uptime_secs: u64) {
        self.live.store(live as u64, Relaxed);
        self.uptime.store(uptime_secs, Relaxed);
        let clusters = lock(&self.clusters);
        for u in snap.routes.upstreams() {
            if let Some(c) = clusters.get(&u.sni) {
                c.membership_total.store(u.endpoints.len() as u64, Relaxed);
                let healthy = veer_core::route::StatsSlot::healthy(u, now_ms);
                c.membership_healthy.store(healthy as u64, Relaxed);
            }
        }
    }

    /// A cluster's connections attempted so far (tests, `/stats`).
    pub fn cluster_cx_total(&self, name: &str) -> Option<u64> {
        lock(&self.clusters)
            .get(name)
            .map(|c| c.cx_total.load(Relaxed))
    }
}

/// One sample of a family.
enum Value<'a> {
    Counter(u64),
    Gauge(u64),
    Hist(&'a Hist),
}

impl Value<'_> {
    fn kind(&self) -> MetricType {
        match self {
            Value::Counter(_) => MetricType::Counter,
            Value::Gauge(_) => MetricType::Gauge,
            Value::Hist(_) => MetricType::Histogram,
        }
    }
}

/// The marker in the HELP line of counters whose Envoy name has no
/// `_total`: prometheus-client appends `_total` to every counter (the
/// OpenMetrics rule), so those are encoded untyped and
/// [`super::Metrics::render`] restores their `counter` type.
pub(super) const ENVOY_COUNTER_HELP: &str = "Envoy counter";

impl Collector for EnvoyStats {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // family name -> samples; the maps are only read here.
        let clusters: Vec<Arc<ClusterStats>> = lock(&self.clusters).values().cloned().collect();
        let tcps: Vec<Arc<TcpStats>> = lock(&self.tcp).values().cloned().collect();
        let listeners: Vec<Arc<ListenerStats>> = lock(&self.listeners).values().cloned().collect();
        let rules = self.rules();
        let server = Tags::new(&rules, StatName::server("live"), "live", "envoy_server_");
        let mut fams: BTreeMap<String, Vec<(&Labels, Value)>> = BTreeMap::new();
        fn push<'a>(
            fams: &mut BTreeMap<String, Vec<(&'a Labels, Value<'a>)>>,
            name: String,
            l: &'a Labels,
            v: Value<'a>,
        ) {
            fams.entry(name).or_default().push((l, v));
        }
        for c in &clusters {
            let (t, l) = (&c.tags, &c.tags.labels);
            push(
                &mut fams,
                t.name("upstream_cx_total"),
                l,
                Value::Counter(c.cx_total.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("upstream_cx_active"),
                l,
                Value::Gauge(c.cx_active.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("upstream_cx_connect_fail"),
                l,
                Value::Counter(c.connect_fail.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("upstream_cx_connect_timeout"),
                l,
                Value::Counter(c.connect_timeout.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("upstream_cx_rx_bytes_total"),
                l,
                Value::Counter(c.rx_bytes.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("upstream_cx_tx_bytes_total"),
                l,
                Value::Counter(c.tx_bytes.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("upstream_cx_connect_ms"),
                l,
                Value::Hist(&c.connect_ms),
            );
            push(
                &mut fams,
                t.name("upstream_cx_length_ms"),
                l,
                Value::Hist(&c.length_ms),
            );
            push(
                &mut fams,
                t.name("membership_total"),
                l,
                Value::Gauge(c.membership_total.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("membership_healthy"),
                l,
                Value::Gauge(c.membership_healthy.load(Relaxed)),
            );
            if let Some(h) = c.http.get() {
                push(
                    &mut fams,
                    t.name("upstream_rq_total"),
                    l,
                    Value::Counter(h.rq_total.load(Relaxed)),
                );
                for (n, cl) in h.rq_xx.iter().zip(&h.class_labels) {
                    let n = n.load(Relaxed);
                    if n > 0 {
                        push(&mut fams, t.name("upstream_rq_xx"), cl, Value::Counter(n));
                    }
                }
                push(
                    &mut fams,
                    t.name("upstream_rq_time"),
                    l,
                    Value::Hist(&h.rq_time),
                );
            }
        }
        for p in &tcps {
            let (t, l) = (&p.tags, &p.tags.labels);
            let (rx, tx) = p.bytes();
            push(
                &mut fams,
                t.name("downstream_cx_total"),
                l,
                Value::Counter(p.cx_total.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("downstream_cx_no_route"),
                l,
                Value::Counter(p.no_route.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("downstream_cx_rx_bytes_total"),
                l,
                Value::Counter(rx.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("downstream_cx_tx_bytes_total"),
                l,
                Value::Counter(tx.load(Relaxed)),
            );
        }
        for li in &listeners {
            let (t, l) = (&li.tags, &li.tags.labels);
            push(
                &mut fams,
                t.name("downstream_cx_total"),
                l,
                Value::Counter(li.cx_total.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("downstream_cx_active"),
                l,
                Value::Gauge(li.cx_active.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("downstream_cx_length_ms"),
                l,
                Value::Hist(&li.length_ms),
            );
        }
        if let Some(i) = self.inbound.get() {
            let (t, l) = (&i.rbac.tags, &i.rbac.tags.labels);
            push(
                &mut fams,
                t.name("allowed"),
                l,
                Value::Counter(i.rbac.allowed.load(Relaxed)),
            );
            push(
                &mut fams,
                t.name("denied"),
                l,
                Value::Counter(i.rbac.denied.load(Relaxed)),
            );
            if let Some(h) = i.http.get() {
                let (t, l) = (&h.tags, &h.tags.labels);
                push(
                    &mut fams,
                    t.name("downstream_rq_total"),
                    l,
                    Value::Counter(h.rq_total.load(Relaxed)),
                );
                for (c, cl) in h.rq_xx.iter().zip(&h.class_labels) {
                    push(
                        &mut fams,
                        t.name("downstream_rq_xx"),
                        cl,
                        Value::Counter(c.load(Relaxed)),
                    );
                }
                push(
                    &mut fams,
                    t.name("downstream_rq_time"),
                    l,
                    Value::Hist(&h.rq_time_ms),
                );
            }
        }
        push(
            &mut fams,
            server.name("live"),
            &server.labels,
            Value::Gauge(self.live.load(Relaxed)),
        );
        push(
            &mut fams,
            server.name("uptime"),
            &server.labels,
            Value::Gauge(self.uptime.load(Relaxed)),
        );
        for (name, samples) in &fams {
            let Some((_, first)) = samples.first() else {
                continue;
            };
            let kind = first.kind();
            // prometheus-client appends `_total` to counters.
            let (name, kind, help) = match (kind, name.strip_suffix("_total")) {
                (MetricType::Counter, Some(n)) => (n, kind, "Envoy counter (total)"),
                (MetricType::Counter, None) => {
                    (name.as_str(), MetricType::Unknown, ENVOY_COUNTER_HELP)
                }
                (MetricType::Gauge, _) => (name.as_str(), kind, "Envoy gauge"),
                _ => (name.as_str(), kind, "Envoy histogram"),
            };
            let mut m = enc.encode_descriptor(name, help, None, kind)?;
            for (labels, v) in samples {
                let labels: &[(String, String)] = labels;
                let mut s = m.encode_family(&labels)?;
                match v {
                    Value::Counter(n) => s.encode_counter::<NoLabelSet, _, u64>(n, None)?,
                    Value::Gauge(n) => s.encode_gauge(&(*n as i64))?,
                    Value::Hist(h) => h.encode_into(&mut s)?,
                }
            }
        }
        Ok(())
    }
}
