//! [`ConsulSource`]: the event loop that runs the watches, keeps the
//! [`State`], and hands out complete specs.
use crate::api;
use crate::assemble::{self, ServiceKey, Settings, State};
use crate::blocking::Backoff;
use crate::feed::{Feed, Fetched};
use crate::http::Client;
use crate::options::{Options, ProxyTarget};
use crate::watch::{self, DefaultOutcome, Msg, Payload, ProbeTarget, WatchKey};
use crate::Error;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use veer_core::intentions::Action;
use veer_core::snapshot::Spec;

/// After this many consecutive failures without any answer, a per-service
/// watch counts as "no instances" so that one unreadable service does not
/// hold back the first spec.
const GIVE_UP_AFTER: u32 = 3;

/// Aborts its task when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The watches a state calls for (pure): the fixed set, the leaf of our
/// service, the catalog in transparent mode, and the per-service watches of
/// [`assemble::wanted`].
pub fn desired_watches(state: &State, settings: &Settings) -> BTreeSet<WatchKey> {
    let mut w: BTreeSet<WatchKey> = [
        WatchKey::Registration,
        WatchKey::Roots,
        WatchKey::Intentions,
        WatchKey::ServiceDefaults,
        WatchKey::ProxyDefaults,
        WatchKey::Mesh,
    ]
    .into();
    w.extend(crate::entries::Kind::ALL.map(WatchKey::ChainEntries));
    for t in assemble::target_keys(state, settings) {
        w.insert(WatchKey::Target(t));
    }
    for dc in assemble::gateway_keys(state, settings) {
        w.insert(WatchKey::Gateways(dc));
    }
    if let Some(reg) = &state.registration {
        w.insert(WatchKey::Leaf(reg.destination_service.clone()));
    }
    if assemble::transparent(state, settings) == Some(true) {
        // The feed follows the local datacenter; explicit upstreams in
        // another one keep a blocking watch each.
        w.insert(WatchKey::Catalog);
        w.insert(WatchKey::Checks);
        for u in state.registration.iter().flat_map(|r| &r.upstreams) {
            if let Some(dc) = &u.datacenter {
                w.insert(WatchKey::Connect(ServiceKey {
                    name: u.name.clone(),
                    datacenter: Some(dc.clone()),
                }));
            }
        }
        return w;
    }
    for (k, instances) in assemble::wanted(state, settings) {
        if instances {
            w.insert(WatchKey::Instances(k.clone()));
        }
        w.insert(WatchKey::Connect(k));
    }
    w
}

/// Follows one proxy's configuration on the local Consul agent; see the
/// crate documentation for the whole picture.
pub struct ConsulSource {
    client: Client,
    opts: Options,
    settings: Settings,
    state: State,
    proxy_id: Option<String>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    watches: HashMap<WatchKey, Task>,
    failures: HashMap<WatchKey, u32>,
    probe: Option<Task>,
    probe_again: bool,
    last: Option<Spec>,
    last_warnings: Vec<String>,
    last_missing: Vec<String>,
    /// Since when the agent has been unreachable, if it is.
    down_since: Option<std::time::Instant>,
    /// Since when the agent has been closing connections before answering.
    closing_since: Option<std::time::Instant>,
    /// Transparent mode: the change feed and its reads under way.
    feed: Feed,
    reads: HashMap<String, Task>,
    checks_now: Option<Task>,
    /// Back-off of the feed's reads after failures; no read starts before
    /// `read_pause`.
    read_backoff: Backoff,
    read_pause: Option<tokio::time::Instant>,
    /// The discovery-chain read under way, the keys it (or the last one)
    /// was for, and whether a config entry changed since it started.
    chains_task: Option<Task>,
    chains_for: Option<BTreeSet<ServiceKey>>,
    chains_dirty: bool,
    /// The number of the current chain read.
    chains_round: u64,
    status: Arc<Status>,
}

/// What the source knows, for readiness, `/config_dump` and metrics:
/// shared with the runtime through [`ConsulSource::status`].
#[derive(Debug, Default)]
pub struct Status {
    /// Upstreams in the last spec handed out.
    pub upstreams: AtomicU64,
    /// Services in the catalog (transparent mode).
    pub catalog_services: AtomicU64,
    /// Agent connections the source may hold at most (long polls + reads).
    pub max_connections: AtomicU64,
    /// Unix milliseconds when the view was last known to match the agent
    /// (see `in_sync`). 0 = never.
    pub synced_at_ms: AtomicU64,
    /// The view matches the agent now: a spec was handed out, the agent
    /// answers, no watch is failing and no change is being read (blocking
    /// queries under way would have answered had anything changed).
    pub in_sync: AtomicBool,
    /// Agent errors by kind: unreachable, closed (refused connections).
    pub unreachable_errors: AtomicU64,
    pub closed_errors: AtomicU64,
    /// Every service read again after a change no list explained.
    pub full_reads: AtomicU64,
}

impl Status {
    /// How old the view is: zero while in sync, else the time since it
    /// last was (`None` before the first sync).
    pub fn view_age(&self) -> Option<Duration> {
        if self.in_sync.load(Relaxed) {
            return Some(Duration::ZERO);
        }
        let at = self.synced_at_ms.load(Relaxed);
        (at != 0).then(|| Duration::from_millis(now_ms().saturating_sub(at)))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl std::fmt::Debug for ConsulSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulSource")
            .field("agent", &self.client.addr())
            .field("proxy_id", &self.proxy_id)
            .field("watches", &self.watches.len())
            .finish()
    }
}

impl ConsulSource {
    /// Checks the options and builds the HTTP client (loading TLS files).
    /// Nothing is sent until [`first`](Self::first), [`next`](Self::next)
    /// or [`run`](Self::run).
    pub fn new(opts: Options) -> Result<ConsulSource, Error> {
        let client = Client::new(&opts)?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(ConsulSource {
            client,
            settings: Settings {
                transparent: opts.transparent,
                outbound_port: opts.outbound_port,
                source: String::new(),
            },
            opts,
            state: State::default(),
            proxy_id: None,
            tx,
            rx,
            watches: HashMap::new(),
            failures: HashMap::new(),
            probe: None,
            probe_again: false,
            last: None,
            last_warnings: Vec::new(),
            last_missing: Vec::new(),
            down_since: None,
            closing_since: None,
            feed: Feed::default(),
            reads: HashMap::new(),
            checks_now: None,
            read_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)),
            read_pause: None,
            chains_task: None,
            chains_for: None,
            chains_dirty: false,
            chains_round: 0,
            status: Arc::default(),
        })
    }

    /// Counts and ages for readiness, `/config_dump` and metrics; updated
    /// as the source runs.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// The proxy's service ID, once known (after `--sidecar-for` is resolved).
    pub fn proxy_id(&self) -> Option<&str> {
        self.proxy_id.as_deref()
    }

    /// `Proxy.Config.envoy_prometheus_bind_addr` of the registration, once
    /// known: where Consul asks the sidecar to serve Prometheus metrics.
    pub fn prometheus_bind(&self) -> Option<std::net::SocketAddr> {
        self.state.registration.as_ref()?.prometheus_bind
    }

    /// The current state (for diagnostics and tests).
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Waits until registration, roots, leaf, intentions (with the default
    /// decision), config entries and the upstream set have all arrived and
    /// returns the first complete spec. Network trouble and 5xx answers are
    /// retried with back-off (logged); errors waiting cannot fix — unknown
    /// proxy ID, not a proxy, no or several sidecars for `--sidecar-for`,
    /// permission denied — are returned at once. Wrap it in a timeout to
    /// bound the wait for an agent that never comes up.
    pub async fn first(&mut self) -> Result<Spec, Error> {
        self.start().await?;
        self.wait_spec(true).await
    }

    /// Waits for the next complete spec that differs from the last one
    /// handed out (the first one if none was). Never fails: trouble is
    /// logged and the last good state kept until the agent answers again.
    pub async fn next(&mut self) -> Spec {
        loop {
            if self.proxy_id.is_none() {
                if let Err(e) = self.start().await {
                    tracing::error!(error = %e, "cannot start following the Consul agent; retrying in 10s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    continue;
                }
            }
            match self.wait_spec(false).await {
                Ok(s) => return s,
                Err(e) => tracing::error!(error = %e, "unexpected error from the Consul source"),
            }
        }
    }

    /// Calls `apply` with every new complete spec (the first one too, if
    /// [`first`](Self::first) was not called), forever. Run it in its own
    /// task; dropping the task stops every watch.
    ///
    /// SIGHUP makes it [refetch](Self::refetch) everything.
    pub async fn run(mut self, mut apply: impl FnMut(Spec) + Send) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        loop {
            // `next` only awaits the watch channel (cancel-safe) or start-up.
            let spec = tokio::select! {
                s = self.next() => s,
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                    tracing::info!(agent = %self.client.addr(), "SIGHUP: refetching everything from the Consul agent");
                    self.refetch();
                    continue;
                }
            };
            apply(spec);
        }
    }

    /// Restarts every watch (and the default-decision probe) with a fresh
    /// read, keeping the current state until the answers arrive.
    pub fn refetch(&mut self) {
        self.watches.clear();
        self.failures.clear();
        self.probe = None;
        self.probe_again = true;
        self.reconcile();
    }

    /// Resolves the proxy ID and starts the watches.
    async fn start(&mut self) -> Result<(), Error> {
        if self.proxy_id.is_some() {
            return Ok(());
        }
        let id = match self.opts.target.clone() {
            ProxyTarget::ProxyId(id) => id,
            ProxyTarget::SidecarFor(svc) => self.resolve_sidecar(&svc).await?,
        };
        tracing::info!(agent = %self.client.addr(), proxy_id = %id, "following the proxy registration on the Consul agent");
        self.settings.source = format!("consul {} proxy {id}", self.client.addr());
        self.proxy_id = Some(id);
        self.reconcile();
        Ok(())
    }

    async fn resolve_sidecar(&self, service_id: &str) -> Result<String, Error> {
        let path = "/v1/agent/services";
        let mut backoff = Backoff::default();
        loop {
            let r = self.client.get(path, Duration::from_secs(30)).await;
            let r = r
                .and_then(|r| r.ok(path))
                .and_then(|r| api::sidecars_for(service_id, &r.body));
            match r {
                Ok(ids) => {
                    return match ids.len() {
                        0 => Err(Error::NoSidecar(service_id.to_string())),
                        1 => Ok(ids.into_iter().next().expect("one")),
                        _ => Err(Error::AmbiguousSidecar {
                            service: service_id.to_string(),
                            ids: ids.join(", "),
                        }),
                    };
                }
                Err(e) if e.is_fatal_at_start() => return Err(e),
                Err(e) => {
                    let d = backoff.failure();
                    if backoff.should_warn() {
                        tracing::warn!(error = %e, retry_in = ?d, "cannot list the agent's services to find the sidecar");
                    }
                    tokio::time::sleep(d).await;
                }
            }
        }
    }

    /// Processes messages until a new complete spec is ready.
    async fn wait_spec(&mut self, fatal: bool) -> Result<Spec, Error> {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            let pause = self.read_pause.filter(|_| self.feed.queued() > 0);
            tokio::select! {
                _ = async { tokio::time::sleep_until(pause.expect("guarded")).await }, if pause.is_some() => {
                    self.read_pause = None;
                    self.reconcile();
                }
                m = self.rx.recv() => {
                    let Some(m) = m else {
                        return Err(Error::Config("the watch channel closed".into()));
                    };
                    self.handle(m, fatal)?;
                    while let Ok(m) = self.rx.try_recv() {
                        self.handle(m, fatal)?;
                    }
                    self.reconcile();
                    let spec = self.try_spec();
                    self.update_sync();
                    if let Some(spec) = spec {
                        return Ok(spec);
                    }
                }
                _ = tick.tick() => {
                    if self.last.is_none() {
                        let m = assemble::missing(&self.state, &self.settings);
                        tracing::info!(missing = %m.join("; "), "waiting for the Consul agent");
                    }
                }
            }
        }
    }

    /// Applies one message to the state.
    fn handle(&mut self, m: Msg, fatal: bool) -> Result<(), Error> {
        let Msg { key, result } = m;
        let current = match &key {
            WatchKey::DefaultProbe => self.probe.is_some(),
            WatchKey::ChecksNow => self.checks_now.take().is_some(),
            WatchKey::Fetch(n) => self.reads.remove(n).is_some(),
            WatchKey::Chains => match &result {
                // Only the current round's answer; an earlier one, sent
                // before its task was replaced, is dropped.
                Ok(Payload::Chains(round, ..)) if *round == self.chains_round => {
                    self.chains_task.take().is_some()
                }
                _ => false,
            },
            k => self.watches.contains_key(k),
        };
        if !current {
            return Ok(()); // from a watch stopped since
        }
        let p = match result {
            Ok(p) => {
                self.failures.remove(&key);
                if let Some(t) = self.down_since.take() {
                    tracing::info!(agent = %self.client.addr(), after = ?t.elapsed(), "the Consul agent answers again; catching up");
                }
                if let Some(t) = self.closing_since.take() {
                    tracing::info!(agent = %self.client.addr(), after = ?t.elapsed(), "the Consul agent accepts veer's connections again");
                }
                p
            }
            Err(e) => {
                if e.is_closed() {
                    self.status.closed_errors.fetch_add(1, Relaxed);
                    if self.closing_since.is_none() {
                        tracing::warn!(agent = %self.client.addr(), error = %e, max_connections = self.max_connections(), "the Consul agent closes veer's connections before answering: it is refusing more connections from this address (limits.http_max_conns_per_client) or shutting down; keeping the last good configuration and retrying with back-off");
                        self.closing_since = Some(std::time::Instant::now());
                    }
                } else if e.is_unreachable() {
                    self.status.unreachable_errors.fetch_add(1, Relaxed);
                    if self.down_since.is_none() {
                        tracing::warn!(agent = %self.client.addr(), error = %e, "the Consul agent is unreachable; keeping the last good configuration and retrying with back-off");
                        self.down_since = Some(std::time::Instant::now());
                    }
                } else if self.down_since.is_some() {
                    // It answers, if with an error.
                    self.down_since = None;
                }
                if let WatchKey::Fetch(name) = &key {
                    self.read_failed(name, &e);
                    return Ok(());
                }
                if key == WatchKey::ChecksNow {
                    // Asked again by the next catalog change; the checks
                    // watch answers as well.
                    let d = self.read_backoff.failure();
                    let fut = watch::checks_now(self.client.clone(), self.tx.clone());
                    self.checks_now = Some(Task(tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        fut.await
                    })));
                    return Ok(());
                }
                let essential = matches!(
                    key,
                    WatchKey::Registration
                        | WatchKey::Roots
                        | WatchKey::Leaf(_)
                        | WatchKey::Intentions
                        | WatchKey::Catalog
                        | WatchKey::Checks
                        | WatchKey::DefaultProbe
                );
                if fatal && self.last.is_none() && essential && e.is_fatal_at_start() {
                    return Err(e);
                }
                let n = self.failures.entry(key.clone()).or_insert(0);
                *n += 1;
                if *n >= GIVE_UP_AFTER {
                    match &key {
                        WatchKey::Connect(k) if !self.state.connect.contains_key(k) => {
                            tracing::warn!(service = %k, error = %e, "cannot read this service's sidecars; treating it as having none for now");
                            self.state.connect.insert(k.clone(), Vec::new());
                        }
                        WatchKey::Gateways(dc) if !self.state.gateways.contains_key(dc) => {
                            tracing::warn!(datacenter = %dc, error = %e, "cannot read the mesh gateways; treating the datacenter as having none for now");
                            self.state.gateways.insert(dc.clone(), Vec::new());
                        }
                        WatchKey::Target(k) if !self.state.targets.contains_key(k) => {
                            tracing::warn!(target = %k, error = %e, "cannot read this chain target's instances; treating it as having none for now");
                            self.state.targets.insert(k.clone(), Vec::new());
                        }
                        WatchKey::Instances(k) if !self.state.instances.contains_key(k) => {
                            tracing::warn!(service = %k, error = %e, "cannot read this service's instances; using no virtual addresses from them for now");
                            self.state.instances.insert(k.clone(), Vec::new());
                        }
                        _ => {}
                    }
                }
                return Ok(());
            }
        };
        let s = &mut self.state;
        match (key, p) {
            (WatchKey::Registration, Payload::Registration(r)) => {
                if let Some(old) = &s.registration {
                    if old.destination_service != r.destination_service {
                        s.leaf = None; // the leaf watch follows in reconcile()
                    }
                    if old.bind != r.bind
                        || old.expose != r.expose
                        || old.prometheus_bind != r.prometheus_bind
                    {
                        tracing::warn!("the proxy's bind address, expose paths or Prometheus address changed in Consul; listeners bound at start keep their addresses until veer restarts");
                    }
                }
                s.registration = Some(*r);
            }
            (WatchKey::Roots, Payload::Roots(r)) => {
                if s.roots.as_ref().map(|o| &o.trust_domain) != Some(&r.trust_domain) {
                    self.probe_again = true;
                }
                s.roots = Some(r);
            }
            (WatchKey::Leaf(_), Payload::Leaf(l)) => s.leaf = Some(l),
            (WatchKey::Intentions, Payload::Intentions(i)) => {
                s.intentions = Some(i);
                self.probe_again = true;
            }
            (WatchKey::Catalog, Payload::Catalog(c)) => {
                s.catalog = Some(c.services.keys().cloned().collect());
                self.status
                    .catalog_services
                    .store(c.services.len() as u64, Relaxed);
                let out = self.feed.on_catalog(c);
                for n in &out.removed {
                    let k = ServiceKey::local(n);
                    s.connect.remove(&k);
                    s.instances.remove(&k);
                }
                if out.need_checks {
                    // (replacing a read under way: the answer must be newer
                    // than this catalog answer)
                    let fut = watch::checks_now(self.client.clone(), self.tx.clone());
                    self.checks_now = Some(Task(tokio::spawn(fut)));
                }
            }
            (WatchKey::Checks, Payload::Checks(c)) => {
                tracing::debug!(
                    index = c.index,
                    checks = c.by_service.len(),
                    "check list changed"
                );
                self.feed.on_checks(c, &s.connect, false);
                tracing::debug!(
                    queued = self.feed.queued(),
                    "services to read after the check change"
                );
            }
            (WatchKey::ChecksNow, Payload::Checks(c)) => self.feed.on_checks(c, &s.connect, true),
            (WatchKey::Fetch(name), Payload::Fetched(f)) => {
                tracing::trace!(service = %name, "read");
                self.read_backoff.reset();
                self.failures.remove(&WatchKey::Fetch(name.clone()));
                if self.feed.on_fetched(&name, &f, &s.connect) {
                    let k = ServiceKey::local(&name);
                    match f {
                        Fetched::Proxy { .. } => {
                            s.connect.insert(k.clone(), Vec::new());
                            s.instances.remove(&k);
                        }
                        Fetched::Service { instances, connect } => {
                            for c in &connect {
                                if c.service != name && self.feed.is_proxy(&c.service) {
                                    s.connect.entry(ServiceKey::local(&c.service)).or_default();
                                }
                            }
                            if connect.is_empty() {
                                s.instances.remove(&k);
                            } else {
                                s.instances.insert(k.clone(), instances);
                            }
                            s.connect.insert(k, connect);
                        }
                    }
                }
            }
            (WatchKey::Connect(k), Payload::Connect(c)) => {
                s.connect.insert(k, c);
            }
            (WatchKey::Instances(k), Payload::Instances(c)) => {
                s.instances.insert(k, c);
            }
            (WatchKey::ServiceDefaults, Payload::ServiceDefaults(d)) => {
                // Any config-entry change may change a compiled chain
                // (protocol, mesh gateway mode, ExternalSNI).
                self.chains_dirty = true;
                s.service_defaults = Some(d)
            }
            (WatchKey::ProxyDefaults, Payload::ProxyDefaults(d)) => {
                self.chains_dirty = true;
                s.proxy_defaults = Some(d)
            }
            (WatchKey::Target(k), Payload::Connect(c)) => {
                s.targets.insert(k, c);
            }
            (WatchKey::Gateways(dc), Payload::Connect(c)) => {
                s.gateways.insert(dc, c);
            }
            (WatchKey::Chains, Payload::Chains(_, keys, got)) => {
                for (k, r) in got {
                    match r {
                        Ok(c) => {
                            if s.chains.get(&k) != Some(&c) {
                                tracing::info!(chain = %k, targets = ?c.targets.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), connect_timeout = ?c.connect_timeout, "discovery chain");
                            }
                            s.chain_errors.remove(&k);
                            s.chains.insert(k, c);
                        }
                        Err(e) => {
                            s.chain_errors.insert(k.clone(), e.clone());
                            tracing::warn!(chain = %k, error = %e, "cannot use this discovery chain; keeping the last good one (or Consul's default chain)");
                        }
                    }
                }
                s.chains.retain(|k, _| keys.contains(k));
                s.chain_errors.retain(|k, _| keys.contains(k));
                s.chains_read = Some(keys);
            }
            (WatchKey::Mesh, Payload::Mesh(m)) => s.mesh = Some(m),
            (WatchKey::ChainEntries(k), Payload::ChainEntries(e)) => {
                // Any resolver, router or splitter change may change a
                // chain: read the chains again.
                self.chains_dirty = true;
                if k == crate::entries::Kind::Resolver {
                    s.resolvers = Some(crate::entries::resolver_index(&e));
                }
                s.chain_entries.set(k, e);
            }
            (WatchKey::DefaultProbe, Payload::Default(o)) => {
                self.probe = None;
                match o {
                    DefaultOutcome::Known { action, via } => {
                        if s.default_action != Some(action) {
                            tracing::info!(
                                default = action.as_str(),
                                via,
                                "default intention decision"
                            );
                        }
                        s.default_action = Some(action);
                    }
                    DefaultOutcome::Unknown(why) => {
                        if s.default_action.is_none() {
                            tracing::warn!(reason = %why, "cannot tell the default intention decision; using deny (a wildcard-source intention decides every inbound connection anyway)");
                            s.default_action = Some(Action::Deny);
                        }
                    }
                }
            }
            (k, p) => tracing::error!(watch = %k, payload = ?p, "mismatched watch answer (bug)"),
        }
        Ok(())
    }

    /// Starts and stops watches to match the state; starts the default probe
    /// when needed.
    fn reconcile(&mut self) {
        let Some(id) = self.proxy_id.clone() else {
            return;
        };
        let want = desired_watches(&self.state, &self.settings);
        let stale: Vec<WatchKey> = self
            .watches
            .keys()
            .filter(|k| !want.contains(*k))
            .cloned()
            .collect();
        for k in stale {
            self.watches.remove(&k);
            self.failures.remove(&k);
            match &k {
                WatchKey::Connect(s) => {
                    self.state.connect.remove(s);
                }
                WatchKey::Instances(s) => {
                    self.state.instances.remove(s);
                }
                WatchKey::Target(t) => {
                    self.state.targets.remove(t);
                }
                WatchKey::Gateways(dc) => {
                    self.state.gateways.remove(dc);
                }
                WatchKey::Catalog => {
                    self.state.catalog = None;
                    self.feed = Feed::default();
                    self.reads.clear();
                    self.checks_now = None;
                    self.state.connect.retain(|k, _| k.datacenter.is_some());
                    self.state.instances.retain(|k, _| k.datacenter.is_some());
                }
                WatchKey::Leaf(_) => self.state.leaf = None,
                _ => {}
            }
            tracing::debug!(watch = %k, "stopped watch");
        }
        for k in want {
            if !self.watches.contains_key(&k) {
                let fut = watch::run(
                    self.client.clone(),
                    k.clone(),
                    id.clone(),
                    self.opts.wait,
                    self.tx.clone(),
                );
                self.watches.insert(k.clone(), Task(tokio::spawn(fut)));
                tracing::debug!(watch = %k, "started watch");
            }
        }
        if self.watches.contains_key(&WatchKey::Catalog) {
            self.feed_reads();
        }
        self.chain_reads();
        self.status
            .max_connections
            .store(self.max_connections() as u64, Relaxed);
        // The default decision: once at start, and again after intentions
        // change (cheap, and it notices an agent restarted with other ACLs).
        let need = self.state.default_action.is_none() || self.probe_again;
        if need && self.probe.is_none() {
            if let Some(t) = self.probe_target() {
                self.probe_again = false;
                let fut = watch::probe_default(self.client.clone(), t, self.tx.clone());
                self.probe = Some(Task(tokio::spawn(fut)));
            }
        }
    }

    /// Starts a round of chain reads when the upstreams with a resolver
    /// changed, or a config entry did since the last round.
    fn chain_reads(&mut self) {
        if self.state.resolvers.is_none() {
            return;
        }
        let keys = assemble::chain_keys(&self.state, &self.settings);
        if self.chains_for.as_ref() == Some(&keys) && !self.chains_dirty {
            return;
        }
        self.chains_dirty = false;
        self.chains_for = Some(keys.clone());
        if keys.is_empty() {
            self.chains_task = None;
            self.state.chains.clear();
            self.state.chain_errors.clear();
            self.state.chains_read = Some(keys);
            return;
        }
        self.chains_round += 1;
        let fut = watch::read_chains(
            self.client.clone(),
            self.chains_round,
            keys,
            self.tx.clone(),
        );
        self.chains_task = Some(Task(tokio::spawn(fut)));
    }

    /// In sync: a spec was handed out, the agent answers, every watch's
    /// last answer was good and the feed has nothing to read.
    fn update_sync(&self) {
        let feed_busy = self.watches.contains_key(&WatchKey::Catalog) && self.feed.busy();
        let ok = self.last.is_some()
            && self.down_since.is_none()
            && self.closing_since.is_none()
            && self.failures.is_empty()
            && !feed_busy;
        if ok {
            self.status.synced_at_ms.store(now_ms(), Relaxed);
        }
        self.status.in_sync.store(ok, Relaxed);
    }

    /// Agent connections this source may hold at once: its long polls, the
    /// feed's reads, the one-shot check read, the chain reads and the
    /// default probe.
    fn max_connections(&self) -> usize {
        let feed = if self.watches.contains_key(&WatchKey::Catalog) {
            self.opts.max_reads + 1
        } else {
            0
        };
        self.watches.len() + feed + 2
    }

    /// Transparent mode: explicit local upstreams missing from the catalog
    /// have no instances; starts reads up to the limit unless paused.
    fn feed_reads(&mut self) {
        let Some(reg) = &self.state.registration else {
            return;
        };
        let own = reg.destination_service.clone();
        if let Some(cat) = self.feed.catalog() {
            for u in &reg.upstreams {
                let k = ServiceKey::local(&u.name);
                if u.datacenter.is_none()
                    && !cat.contains_key(&u.name)
                    && !self.state.connect.contains_key(&k)
                {
                    self.state.connect.insert(k, Vec::new());
                }
            }
        }
        if self
            .read_pause
            .is_some_and(|t| t > tokio::time::Instant::now())
        {
            return;
        }
        self.read_pause = None;
        let room = self.opts.max_reads.saturating_sub(self.reads.len());
        for name in self.feed.take(room) {
            if name == own || name == "consul" {
                // Never an upstream: not read.
                self.feed.on_failed(&name, false);
                self.state
                    .connect
                    .insert(ServiceKey::local(&name), Vec::new());
                continue;
            }
            let fut = watch::fetch(self.client.clone(), name.clone(), self.tx.clone());
            self.reads.insert(name, Task(tokio::spawn(fut)));
        }
    }

    /// A feed read failed: agent trouble pauses every read (back-off) and
    /// reads the service again; other errors (403, 404, bad JSON) are
    /// retried twice, then the service counts as having no instances.
    fn read_failed(&mut self, name: &str, e: &Error) {
        let transient = e.is_unreachable()
            || e.is_closed()
            || matches!(e, Error::Status { status, .. } if *status >= 500);
        if transient {
            let d = self.read_backoff.failure();
            self.read_pause = Some(tokio::time::Instant::now() + d);
            self.feed.on_failed(name, true);
            return;
        }
        let key = WatchKey::Fetch(name.to_string());
        let n = self.failures.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n < GIVE_UP_AFTER {
            self.feed.on_failed(name, true);
            return;
        }
        self.failures.remove(&key);
        self.feed.on_failed(name, false);
        let k = ServiceKey::local(name);
        if let std::collections::btree_map::Entry::Vacant(v) = self.state.connect.entry(k) {
            tracing::warn!(service = %name, error = %e, "cannot read this service's instances; treating it as having none until it changes");
            v.insert(Vec::new());
        }
    }

    fn probe_target(&self) -> Option<ProbeTarget> {
        let reg = self.state.registration.as_ref()?;
        let roots = self.state.roots.as_ref()?;
        let leaf = self.state.leaf.as_ref()?;
        let me = veer_core::tls::peer_identity(leaf.chain.first()?).ok()?;
        Some(ProbeTarget {
            service: reg.destination_service.clone(),
            trust_domain: roots.trust_domain.clone(),
            datacenter: me.datacenter,
            namespace: reg.namespace.clone(),
            partition: reg.partition.clone(),
        })
    }

    /// A new spec, when the state is complete and differs from the last.
    fn try_spec(&mut self) -> Option<Spec> {
        let feed = self.watches.contains_key(&WatchKey::Catalog);
        if feed {
            self.status.full_reads.store(self.feed.full_reads, Relaxed);
        }
        if feed && self.feed.busy() {
            return None; // a change is being read: apply it whole
        }
        let started = std::time::Instant::now();
        let assembled = assemble::assemble(&self.state, &self.settings);
        tracing::debug!(took = ?started.elapsed(), "assembled");
        match assembled {
            Ok(mut a) => {
                if let Some(last) = &self.last {
                    a.spec.share_upstreams_of(last);
                }
                self.last_missing.clear();
                if a.warnings != self.last_warnings {
                    for w in &a.warnings {
                        tracing::warn!("{w}");
                    }
                    self.last_warnings = a.warnings;
                }
                if let Some(last) = &self.last {
                    if assemble::same_spec(last, &a.spec) {
                        return None;
                    }
                }
                tracing::info!(change = %assemble::describe_change(self.last.as_ref(), &a.spec), "new configuration from Consul");
                self.status
                    .upstreams
                    .store(a.spec.upstreams.len() as u64, Relaxed);
                self.last = Some(a.spec.clone());
                Some(a.spec)
            }
            Err(Error::Incomplete(what)) => {
                let m = vec![what];
                if self.last.is_some() && m != self.last_missing {
                    tracing::info!(waiting_for = %m[0], "Consul update held back until it is complete");
                }
                self.last_missing = m;
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot assemble a spec from Consul's answers; keeping the last good one");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assemble::ServiceKey;

    #[test]
    fn per_service_watch_key_display() {
        let k = WatchKey::Connect(ServiceKey {
            name: "db".into(),
            datacenter: Some("dc2".into()),
        });
        assert_eq!(k.to_string(), "connect:db@dc2");
        assert_eq!(watch::path_of(&k, "x"), "/v1/health/connect/db?dc=dc2");
        assert_eq!(
            watch::path_of(&WatchKey::Registration, "web sidecar"),
            "/v1/agent/service/web%20sidecar"
        );
    }
}
