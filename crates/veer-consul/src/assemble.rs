//! From parsed agent answers to a complete [`Spec`], sans IO.
//!
//! [`State`] holds the latest parsed answer of every watch. [`wanted`] says
//! which per-service watches should run for it, [`missing`] what has not
//! arrived yet, and [`assemble`] builds the spec — the only place in this
//! crate that constructs a [`Spec`]. [`same_spec`] tells whether a new spec
//! differs from the last one, so an update that changes nothing does not
//! swap snapshots.
use crate::api::{
    CatalogInstance, ConnectInstance, Leaf, Mesh, Mode, ProxyDefaults, Registration, Roots,
    ServiceDefaults,
};
use crate::chain::{self, Compiled};
use crate::entries::Entries;
use crate::Error;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use veer_core::intentions::{Action, Intention, Intentions};
use veer_core::route::Protocol;
use veer_core::snapshot::{ListenSpec, Spec, TargetSpec, Timeouts, Unapplied, UpstreamSpec};
use veer_core::spiffe::ServiceId;

/// Consul's default transparent outbound listener port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// The service name Consul's implicit-upstream discovery leaves out.
const CONSUL_SERVICE: &str = "consul";

/// A service whose instances are watched: a name, in the local datacenter
/// (`None`) or another one (explicit upstreams with `Datacenter`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub name: String,
    pub datacenter: Option<String>,
}

impl ServiceKey {
    pub fn local(name: &str) -> ServiceKey {
        ServiceKey {
            name: name.to_string(),
            datacenter: None,
        }
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.datacenter {
            Some(dc) => write!(f, "{}@{dc}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// The instances of one discovery-chain target: a service in a datacenter,
/// through its subset's filter (`/v1/health/connect/:service?dc=&filter=`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    pub service: String,
    pub datacenter: String,
    pub filter: Option<String>,
}

impl TargetKey {
    pub fn of(t: &chain::Target) -> TargetKey {
        TargetKey {
            service: t.service.clone(),
            datacenter: t.datacenter.clone(),
            filter: t.filter.clone(),
        }
    }
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.service, self.datacenter)?;
        match &self.filter {
            Some(x) => write!(f, "[{x}]"),
            None => Ok(()),
        }
    }
}

/// The latest parsed answer of every watch; `None` / absent = not yet.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub registration: Option<Registration>,
    pub roots: Option<Roots>,
    pub leaf: Option<Leaf>,
    /// Every intention the token can read (filtered to ours in [`assemble`]).
    pub intentions: Option<Vec<Intention>>,
    pub default_action: Option<Action>,
    /// Service names in the catalog.
    pub catalog: Option<BTreeSet<String>>,
    /// `/v1/health/connect/:name` per watched service.
    pub connect: BTreeMap<ServiceKey, Vec<ConnectInstance>>,
    /// `/v1/catalog/service/:name` per watched mesh service (for `virtual`).
    pub instances: BTreeMap<ServiceKey, Vec<CatalogInstance>>,
    pub service_defaults: Option<BTreeMap<String, ServiceDefaults>>,
    pub proxy_defaults: Option<ProxyDefaults>,
    pub mesh: Option<Mesh>,
    /// `service-resolver`, `service-router` and `service-splitter` entries.
    pub chain_entries: Entries,
    /// Services with a resolver entry (name → `ModifyIndex`), derived from
    /// the resolver list of `chain_entries` ([`crate::entries::resolver_index`]).
    /// Only their chains are read: a service
    /// without one has Consul's default chain, which is what veer does
    /// without a chain.
    pub resolvers: Option<BTreeMap<String, u64>>,
    /// The compiled discovery chain per upstream (key: name and the
    /// datacenter it is compiled in, for explicit upstreams with one).
    pub chains: BTreeMap<ServiceKey, Compiled>,
    /// The chain keys the last completed chain read was for.
    pub chains_read: Option<BTreeSet<ServiceKey>>,
    /// Chains the last read refused (e.g. a router regex that does not
    /// compile), with the reason; the last good one (or Consul's default
    /// chain) stays in force and the spec names the refusal.
    pub chain_errors: BTreeMap<ServiceKey, String>,
    /// The instances of each target of those chains.
    pub targets: BTreeMap<TargetKey, Vec<ConnectInstance>>,
    /// The mesh gateways of a datacenter (its instances of kind
    /// `mesh-gateway`, whatever their name), for targets reached through
    /// one.
    pub gateways: BTreeMap<String, Vec<ConnectInstance>>,
}

/// This proxy's datacenter (its leaf's), once known.
pub fn local_dc(state: &State) -> Option<String> {
    let leaf = state.leaf.as_ref()?.chain.first()?;
    Some(veer_core::tls::peer_identity(leaf).ok()?.datacenter)
}

/// The datacenters whose mesh gateways are needed: the local one for a
/// remote target in mode `local`, the target's for mode `remote`.
pub fn gateway_keys(state: &State, settings: &Settings) -> BTreeSet<String> {
    let Some(local) = local_dc(state) else {
        return BTreeSet::new();
    };
    chain_keys(state, settings)
        .iter()
        .filter_map(|k| Some((state.chains.get(k)?, gateway_override(state, k))))
        .flat_map(|(c, o)| c.all_targets().map(move |t| (t, o)))
        .filter(|(t, _)| t.datacenter != local)
        .filter_map(|(t, o)| match o.unwrap_or(t.mesh_gateway) {
            chain::GatewayMode::Local => Some(local.clone()),
            chain::GatewayMode::Remote => Some(t.datacenter.clone()),
            _ => None,
        })
        .collect()
}

/// Whether service `name` has a `service-resolver`, `service-router` or
/// `service-splitter` entry (its discovery chain is more than Consul's
/// default).
pub fn has_chain_entries(state: &State, name: &str) -> bool {
    use crate::entries::Kind;
    state
        .resolvers
        .as_ref()
        .is_some_and(|r| r.contains_key(name))
        || state.chain_entries.get(Kind::Router, name).is_some()
        || state.chain_entries.get(Kind::Splitter, name).is_some()
}

/// The upstreams whose discovery chain is read: those with a
/// `service-resolver`, `service-router` or `service-splitter` entry, and
/// explicit upstreams in another datacenter (their chain carries the mesh
/// gateway mode of the config entries); empty until the resolver list is in.
pub fn chain_keys(state: &State, settings: &Settings) -> BTreeSet<ServiceKey> {
    // The keys of `wanted` with a resolver or a datacenter, computed from
    // the few resolvers rather than the whole catalog: this runs on every
    // event, and the catalog can hold thousands of services.
    let (Some(res), Some(reg)) = (&state.resolvers, &state.registration) else {
        return BTreeSet::new();
    };
    let mut out: BTreeSet<ServiceKey> = reg
        .upstreams
        .iter()
        .filter(|u| {
            res.contains_key(&u.name) || u.datacenter.is_some() || has_chain_entries(state, &u.name)
        })
        .map(|u| ServiceKey {
            name: u.name.clone(),
            datacenter: u.datacenter.clone(),
        })
        .collect();
    if transparent(state, settings) == Some(true) {
        if let Some(catalog) = &state.catalog {
            let routed = state.chain_entries.services();
            for name in res.keys().map(String::as_str).chain(routed) {
                if name != CONSUL_SERVICE
                    && *name != reg.destination_service
                    && catalog.contains(name)
                {
                    out.insert(ServiceKey::local(name));
                }
            }
        }
    }
    out
}

/// The registration's mesh gateway mode for upstream `key`: the explicit
/// upstream's `MeshGateway.Mode`, else the proxy's (Consul's precedence:
/// both over the config entries). Unknown modes are ignored (Consul's
/// agent refuses them at registration).
pub fn gateway_override(state: &State, key: &ServiceKey) -> Option<chain::GatewayMode> {
    let reg = state.registration.as_ref()?;
    let up = reg
        .upstreams
        .iter()
        .find(|u| u.name == key.name && u.datacenter == key.datacenter)
        .and_then(|u| u.mesh_gateway.as_deref());
    up.or(reg.mesh_gateway.as_deref())
        .and_then(chain::GatewayMode::parse)
}

/// The targets of the chains in force, whose instances are watched.
pub fn target_keys(state: &State, settings: &Settings) -> BTreeSet<TargetKey> {
    chain_keys(state, settings)
        .iter()
        .filter_map(|k| state.chains.get(k))
        .flat_map(|c| c.all_targets().map(TargetKey::of))
        .collect()
}

/// Settings that do not come from the agent.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `--transparent`: transparent mode whatever the registration says.
    pub transparent: bool,
    /// `--outbound-port`: over every outbound port from the agent.
    pub outbound_port: Option<u16>,
    /// [`Spec::source`].
    pub source: String,
}

/// A spec and the problems met while assembling it that did not prevent it.
#[derive(Debug)]
pub struct Assembled {
    pub spec: Spec,
    pub warnings: Vec<String>,
}

/// Whether the proxy runs in transparent mode: `--transparent`, else the
/// first `Mode` set among the registration, the `service-defaults` of its
/// service and `proxy-defaults`; `None` while that cannot be told yet.
pub fn transparent(state: &State, settings: &Settings) -> Option<bool> {
    if settings.transparent {
        return Some(true);
    }
    let reg = state.registration.as_ref()?;
    let modes = [
        Some(reg.mode),
        state
            .service_defaults
            .as_ref()?
            .get(&reg.destination_service)
            .and_then(|d| d.mode),
        state.proxy_defaults.as_ref()?.mode,
    ];
    Some(modes.into_iter().flatten().find(|m| *m != Mode::Unset) == Some(Mode::Transparent))
}

/// The per-service watches the state calls for: each key maps to whether
/// its destination's own instances (`/v1/catalog/service/:name`, for the
/// `virtual` tagged address) are needed besides its sidecars
/// (`/v1/health/connect/:name`).
///
/// Explicit upstreams are always watched. In transparent mode every catalog
/// service except `consul` and this proxy's own service is a candidate; a
/// candidate with no Connect instance at all is not an upstream and does
/// not need its instances read.
pub fn wanted(state: &State, settings: &Settings) -> BTreeMap<ServiceKey, bool> {
    let mut out = BTreeMap::new();
    let Some(reg) = &state.registration else {
        return out;
    };
    for u in &reg.upstreams {
        out.insert(
            ServiceKey {
                name: u.name.clone(),
                datacenter: u.datacenter.clone(),
            },
            false,
        );
    }
    if transparent(state, settings) == Some(true) {
        if let Some(catalog) = &state.catalog {
            for name in catalog {
                if name != CONSUL_SERVICE && *name != reg.destination_service {
                    out.insert(ServiceKey::local(name), false);
                }
            }
        }
        for (k, need) in out.iter_mut() {
            *need = k.datacenter.is_none() && state.connect.get(k).is_some_and(|c| !c.is_empty());
        }
    }
    out
}

/// What has not arrived yet, for logs and [`Error::Incomplete`]; empty when
/// [`assemble`] can build a spec.
pub fn missing(state: &State, settings: &Settings) -> Vec<String> {
    let mut m = Vec::new();
    let mut need = |ok: bool, what: &str| {
        if !ok {
            m.push(what.to_string());
        }
    };
    need(state.registration.is_some(), "the proxy registration");
    need(state.roots.is_some(), "the CA roots");
    need(state.leaf.is_some(), "the leaf certificate");
    need(state.intentions.is_some(), "the intentions");
    need(
        state.default_action.is_some(),
        "the default intention decision",
    );
    need(
        state.service_defaults.is_some(),
        "the service-defaults entries",
    );
    need(state.proxy_defaults.is_some(), "the proxy-defaults entry");
    need(state.mesh.is_some(), "the mesh entry");
    for k in state.chain_entries.missing() {
        need(false, &format!("the {k} entries"));
    }
    if transparent(state, settings) == Some(true) {
        need(state.catalog.is_some(), "the catalog services");
    }
    let keys = chain_keys(state, settings);
    let read = state.chains_read.as_ref();
    let unread: Vec<String> = keys
        .iter()
        .filter(|k| !read.is_some_and(|r| r.contains(*k)))
        .map(|k| k.to_string())
        .collect();
    if !unread.is_empty() {
        m.push(format!("the discovery chains of {}", unread.join(", ")));
    }
    let targets: Vec<String> = target_keys(state, settings)
        .into_iter()
        .filter(|k| !state.targets.contains_key(k))
        .map(|k| k.to_string())
        .collect();
    if !targets.is_empty() {
        m.push(format!("chain targets: {}", targets.join(", ")));
    }
    let gws: Vec<String> = gateway_keys(state, settings)
        .into_iter()
        .filter(|dc| !state.gateways.contains_key(dc))
        .collect();
    if !gws.is_empty() {
        m.push(format!("the mesh gateways of {}", gws.join(", ")));
    }
    let mut svc: Vec<String> = Vec::new();
    for (k, need_instances) in wanted(state, settings) {
        if !state.connect.contains_key(&k) {
            svc.push(format!("{k} (sidecars)"));
        } else if need_instances && !state.instances.contains_key(&k) {
            svc.push(format!("{k} (instances)"));
        }
    }
    if svc.len() > 10 {
        let more = svc.len() - 10;
        svc.truncate(10);
        svc.push(format!("and {more} more"));
    }
    if !svc.is_empty() {
        m.push(format!("upstream services: {}", svc.join(", ")));
    }
    m
}

/// The protocol of service `name` and the setting it came from:
/// service-defaults, else the explicit upstream's (or the registration's)
/// `Config.protocol`, else proxy-defaults.
fn protocol_of(
    name: &str,
    explicit: Option<(&str, String)>,
    sd: &BTreeMap<String, ServiceDefaults>,
    pd: &ProxyDefaults,
    warnings: &mut Vec<String>,
) -> (Protocol, String) {
    let p = sd
        .get(name)
        .and_then(|d| d.protocol.as_deref())
        .map(|p| (p, format!("service-defaults {name}: Protocol")))
        .or(explicit)
        .or(pd
            .protocol
            .as_deref()
            .map(|p| (p, "proxy-defaults global: Config.protocol".to_string())));
    match p {
        None => (Protocol::Tcp, String::new()),
        Some((s, from)) => match Protocol::parse(&s.to_ascii_lowercase()) {
            Some(p) => (p, from),
            None => {
                warnings.push(format!(
                    "upstream {name}: protocol {s:?} is unknown; using tcp"
                ));
                (Protocol::Tcp, from)
            }
        },
    }
}

/// Builds the complete spec, or says what is missing
/// ([`Error::Incomplete`]) or unusable ([`Error::Decode`]).
///
/// - identity: the leaf's SPIFFE ID; roots: every root; chain: the leaf's
///   `CertPEM` (leaf, then appended intermediates).
/// - intentions: those whose destination matches our identity, in
///   evaluation order; default: the probed default decision.
/// - listen: inbound = the registration's bind; outbound =
///   127.0.0.1 and `[::1]` on the outbound port (registration, then
///   service-defaults, then proxy-defaults `TransparentProxy.OutboundListenerPort`,
///   else 15001) in transparent mode, none otherwise.
/// - upstreams, sorted by name: endpoints = passing sidecars'
///   `Service.Address` (else `Node.Address`) : `Service.Port`; identity
///   datacenter = the instances' node datacenter; virtual IPs (transparent
///   mode, local datacenter) = `consul-virtual` of any sidecar or instance
///   and `virtual` of those in our partition; a VIP claimed by two services
///   stays with the first (by name) and is reported; protocol =
///   service-defaults, else the explicit upstream's `Config.protocol`, else
///   proxy-defaults `Config.protocol`, else tcp; dialed directly =
///   service-defaults or a sidecar says so, with the passing sidecars' IPs
///   as instances; explicit upstreams add `local_bind` (to the implicit
///   entry of the same service, or an entry of their own).
pub fn assemble(state: &State, settings: &Settings) -> Result<Assembled, Error> {
    let m = missing(state, settings);
    if !m.is_empty() {
        return Err(Error::Incomplete(m.join("; ")));
    }
    let (
        Some(reg),
        Some(roots),
        Some(leaf),
        Some(all_ixns),
        Some(default),
        Some(sd),
        Some(pd),
        Some(mesh),
    ) = (
        &state.registration,
        &state.roots,
        &state.leaf,
        &state.intentions,
        state.default_action,
        &state.service_defaults,
        &state.proxy_defaults,
        &state.mesh,
    )
    else {
        unreachable!("missing() checked every part");
    };
    let transparent = transparent(state, settings) == Some(true);
    let mut warnings = Vec::new();
    let mut unapplied: Vec<Unapplied> = reg
        .unapplied_config
        .iter()
        .map(|k| {
            Unapplied::unsupported(
                k.clone(),
                if k.contains(".envoy_") {
                    "an Envoy escape hatch; veer has no Envoy configuration to apply it to"
                } else {
                    "not a setting veer knows"
                },
            )
        })
        .collect();
    // The local service's own protocol (inbound): the registration's, as
    // Consul's xDS does (l7::inbound).
    let mut central_warnings = Vec::new();
    let (central, from) = protocol_of(
        &reg.destination_service,
        None,
        sd,
        pd,
        &mut central_warnings,
    );
    let inbound_http = l7::inbound(reg, (central, &from), &mut warnings, &mut unapplied);

    let leaf_der = leaf
        .chain
        .first()
        .ok_or_else(|| Error::decode("leaf certificate", "empty chain"))?;
    let identity = veer_core::tls::peer_identity(leaf_der)
        .map_err(|e| Error::decode("leaf certificate", e))?;
    if identity.service != reg.destination_service {
        return Err(Error::Incomplete(format!(
            "the leaf certificate for {} (have one for {})",
            reg.destination_service, identity.service
        )));
    }
    if let Err(e) = chains_to_roots(&leaf.chain, &roots.certs) {
        // E.g. right after an agent restart with a new CA, one of the two
        // has arrived before the other; wait for both rather than hand out
        // a spec Snapshot::build would refuse.
        return Err(Error::Incomplete(format!(
            "a leaf certificate that chains to the current roots ({e})"
        )));
    }
    let intentions = Intentions::new(&identity, all_ixns.clone(), default)
        .rules()
        .to_vec();
    if inbound_http.is_none() {
        // Consul's xDS does the same: an L7 intention on an L4 listener.
        for i in intentions.iter().filter(|i| !i.permissions.is_empty()) {
            unapplied.push(Unapplied::unsupported(
                format!(
                    "intention {} ({} => {}): Permissions",
                    i.id.as_deref().unwrap_or("-"),
                    i.source,
                    i.destination
                ),
                format!(
                    "the inbound listener of {} is L4 (its protocol is not http-like), so this \
                     L7 intention is enforced as deny",
                    reg.destination_service
                ),
            ));
        }
    }

    // Upstreams.
    let wanted = wanted(state, settings);
    let chains = chain_keys(state, settings);
    let explicit_keys: BTreeSet<ServiceKey> = reg
        .upstreams
        .iter()
        .map(|u| ServiceKey {
            name: u.name.clone(),
            datacenter: u.datacenter.clone(),
        })
        .collect();
    let mut by_key: BTreeMap<ServiceKey, UpstreamSpec> = BTreeMap::new();
    for key in wanted.keys() {
        let none = Vec::new();
        let sidecars = state.connect.get(key).unwrap_or(&none);
        let explicit = reg
            .upstreams
            .iter()
            .find(|u| u.name == key.name && u.datacenter == key.datacenter);
        let chain = chains
            .contains(key)
            .then(|| state.chains.get(key))
            .flatten();
        if sidecars.is_empty() && !explicit_keys.contains(key) && chain.is_none() {
            continue; // not a mesh service (or none registered yet)
        }
        let dc = sidecars
            .iter()
            .map(|i| i.datacenter.as_str())
            .find(|d| !d.is_empty())
            .map(str::to_string)
            .or_else(|| key.datacenter.clone())
            .unwrap_or_else(|| identity.datacenter.clone());
        let (ns, part) = match explicit {
            Some(u) => (u.namespace.as_str(), u.partition.as_str()),
            None => (reg.namespace.as_str(), reg.partition.as_str()),
        };
        let id = ServiceId::new(&roots.trust_domain, part, ns, &dc, &key.name);
        let mut u = UpstreamSpec::new(id);
        let (protocol, _) = protocol_of(
            &key.name,
            explicit.and_then(|e| {
                let p = e.protocol.as_deref()?;
                Some((p, format!("Proxy.Upstreams[{}].Config.protocol", e.name)))
            }),
            sd,
            pd,
            &mut warnings,
        );
        u.protocol = protocol;
        let passing: Vec<&ConnectInstance> = sidecars
            .iter()
            .filter(|i| i.passing && i.weight > 0)
            .collect();
        (u.endpoints, u.endpoint_weights) = weighted(
            passing
                .iter()
                .filter_map(|i| Some((i.endpoint()?, i.weight)))
                .collect(),
        );
        if transparent && key.datacenter.is_none() {
            let own_part = reg.partition.as_str();
            let mut vips: Vec<IpAddr> = Vec::new();
            let catalog = state.instances.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let all = sidecars
                .iter()
                .map(|i| (&i.vips, i.partition.as_str()))
                .chain(catalog.iter().map(|i| (&i.vips, i.partition.as_str())));
            for (v, p) in all {
                vips.extend(v.consul_virtual);
                if p == own_part {
                    vips.extend(v.virtual_ip);
                }
            }
            vips.sort();
            vips.dedup();
            u.virtual_ips = vips;
            let dd = sd.get(&key.name).is_some_and(|d| d.dialed_directly)
                || sidecars.iter().any(|i| i.dialed_directly);
            if dd {
                u.dialed_directly = true;
                let mut ips: Vec<IpAddr> = passing.iter().filter_map(|i| i.ip).collect();
                ips.sort();
                ips.dedup();
                u.instances = ips;
            }
        }
        u.connect_timeout = explicit
            .and_then(|e| e.connect_timeout)
            .or(reg.connect_timeout);
        if let Some(c) = chain {
            let timeout = explicit.and_then(|e| e.connect_timeout);
            let modes = [
                explicit.and_then(|e| e.mesh_gateway.as_deref()),
                reg.mesh_gateway.as_deref(),
            ];
            for m in modes.into_iter().flatten() {
                if chain::GatewayMode::parse(m).is_none() {
                    warnings.push(format!(
                        "upstream {}: MeshGateway.Mode {m:?} is not none, local or remote; ignored",
                        key.name
                    ));
                }
            }
            apply_chain(
                &mut u,
                c,
                state,
                (&roots.trust_domain, part, &identity.datacenter),
                (timeout, gateway_override(state, key)),
                &mut unapplied,
            );
        }
        u.http = l7::upstream_routes(
            &u,
            chain,
            state,
            (&roots.trust_domain, part, &identity.datacenter),
            (
                explicit.and_then(|e| e.connect_timeout),
                gateway_override(state, key),
            ),
        );
        by_key.insert(key.clone(), u);
    }
    // Explicit upstream listeners: the first of a service goes on its entry,
    // further ones get entries of their own without virtual IPs.
    let mut extra = Vec::new();
    let mut bound: BTreeSet<ServiceKey> = BTreeSet::new();
    for e in &reg.upstreams {
        let key = ServiceKey {
            name: e.name.clone(),
            datacenter: e.datacenter.clone(),
        };
        let Some(base) = by_key.get_mut(&key) else {
            continue;
        };
        if bound.insert(key.clone()) {
            base.local_bind = Some(e.bind);
        } else {
            let mut u = base.clone();
            u.virtual_ips.clear();
            u.dialed_directly = false;
            u.instances.clear();
            u.local_bind = Some(e.bind);
            if u.failover.is_empty() && !chains.contains(&key) {
                u.connect_timeout = e.connect_timeout.or(reg.connect_timeout);
            } else if let Some(t) = e.connect_timeout {
                // A chain's targets share the resolver's timeout; this
                // listener's own overrides it for each of them.
                u.connect_timeout = Some(t);
                for f in &mut u.failover {
                    f.connect_timeout = Some(t);
                }
            }
            extra.push(u);
        }
    }
    let mut upstreams: Vec<UpstreamSpec> = by_key.into_values().chain(extra).collect();
    for (k, e) in &state.chain_errors {
        if chains.contains(k) {
            unapplied.push(Unapplied::unsupported(
                format!("discovery chain {k}"),
                format!(
                    "refused: {e}; {} stays in force",
                    if state.chains.contains_key(k) {
                        "the last good chain"
                    } else {
                        "Consul's default chain"
                    }
                ),
            ));
        }
    }
    // Routers and splitters of upstreams whose chain is not read: named.
    unapplied.extend(crate::entries::unapplied(
        &state.chain_entries,
        &upstreams,
        |svc| has_chain_entries(state, svc),
    ));
    // One VIP, one service: Snapshot::build refuses duplicates, and one bad
    // registration must not stop every update.
    let mut owner: HashMap<IpAddr, String> = HashMap::new();
    for u in &mut upstreams {
        let name = u.identity.service.clone();
        u.virtual_ips.retain(|ip| match owner.get(ip) {
            Some(first) if *first != name => {
                warnings.push(format!(
                    "virtual IP {ip} is registered for both {first} and {name}; it stays with {first}"
                ));
                false
            }
            _ => {
                owner.insert(*ip, name.clone());
                true
            }
        });
    }

    let outbound_port = settings
        .outbound_port
        .or(reg.outbound_port)
        .or_else(|| {
            sd.get(&reg.destination_service)
                .and_then(|d| d.outbound_port)
        })
        .or(pd.outbound_port)
        .unwrap_or(DEFAULT_OUTBOUND_PORT);
    let outbound = if transparent {
        vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), outbound_port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), outbound_port),
        ]
    } else {
        Vec::new()
    };
    let mut timeouts = Timeouts::default();
    if let Some(t) = reg.local_connect_timeout {
        timeouts.local_connect = t;
    }
    if let Some(t) = reg.handshake_timeout {
        timeouts.handshake = t;
    }
    if let Some(t) = reg.connect_timeout {
        timeouts.connect = t;
    }

    let spec = Spec {
        identity,
        roots: roots.certs.clone(),
        chain: leaf.chain.clone(),
        key: leaf.key.clone_key(),
        local_app: reg.local_app,
        intentions,
        default_action: default,
        upstreams: upstreams.into_iter().map(std::sync::Arc::new).collect(),
        mesh_destinations_only: transparent && mesh.mesh_destinations_only(),
        listen: ListenSpec {
            inbound: reg.bind,
            outbound,
        },
        timeouts,
        source: settings.source.clone(),
        expose: reg.expose.clone(),
        rbac: None,
        permissive_ports: Vec::new(),
        inbound_max_connections: None,
        unapplied,
        inbound_http,
    };
    Ok(Assembled { spec, warnings })
}

/// Whether an instance is a healthy endpoint of a chain target: no
/// critical check, and with `OnlyPassing` no warning either (Consul's
/// rules for the endpoints it gives Envoy).
fn healthy(i: &ConnectInstance, only_passing: bool) -> bool {
    if i.weight == 0 {
        false
    } else if only_passing {
        i.passing
    } else {
        !i.critical
    }
}

/// Endpoints with their weights, sorted, each address once (its first
/// weight), as an upstream's or target's `endpoints` and
/// `endpoint_weights` (empty when every weight is 1).
fn weighted(mut eps: Vec<(SocketAddr, u32)>) -> (Vec<SocketAddr>, Vec<u32>) {
    eps.sort_by_key(|e| e.0);
    eps.dedup_by_key(|e| e.0);
    let weights = if eps.iter().all(|e| e.1 == 1) {
        Vec::new()
    } else {
        eps.iter().map(|e| e.1.max(1)).collect()
    };
    (eps.into_iter().map(|e| e.0).collect(), weights)
}

/// Makes `u` follow its compiled discovery chain: the primary target's
/// identity, SNI, endpoints and connect timeout replace the default
/// ones, the failover targets follow in order. `local` = (trust domain,
/// partition, local datacenter); `overrides` = the explicit upstream's
/// own connect timeout (over the resolver's) and the registration's mesh
/// gateway mode (over the config entries'). Instances in another
/// datacenter are dialed at their WAN address (mesh gateway mode `none`)
/// or through the gateways of mode `local`/`remote`.
pub fn apply_chain(
    u: &mut UpstreamSpec,
    c: &Compiled,
    state: &State,
    local: (&str, &str, &str),
    overrides: (Option<std::time::Duration>, Option<chain::GatewayMode>),
    unapplied: &mut Vec<Unapplied>,
) {
    for line in &c.unapplied {
        let (node, detail) = line.split_once(": ").unwrap_or((line.as_str(), ""));
        unapplied.push(Unapplied::unsupported(
            format!("discovery chain {}: {node}", c.service),
            detail.to_string(),
        ));
    }
    let targets: Vec<TargetSpec> = c
        .targets
        .iter()
        .map(|t| target_spec(t, c.connect_timeout, state, local, overrides))
        .collect();
    let mut it = targets.into_iter();
    if let Some(primary) = it.next() {
        u.set_primary(primary);
    }
    u.failover = it.collect();
}

/// One chain target as the data path dials it: its identity, SNI, healthy
/// endpoints (directly, at the WAN address in another datacenter, or
/// through mesh gateways) and connect timeout (the explicit upstream's
/// over `resolver_timeout`). See [`apply_chain`] for `local`/`overrides`.
pub fn target_spec(
    t: &chain::Target,
    resolver_timeout: std::time::Duration,
    state: &State,
    local: (&str, &str, &str),
    overrides: (Option<std::time::Duration>, Option<chain::GatewayMode>),
) -> TargetSpec {
    let (td, part, local_dc) = local;
    let (timeout, gw_override) = overrides;
    let none = Vec::new();
    let remote = t.datacenter != local_dc;
    let id = ServiceId::new(td, part, &t.namespace, &t.datacenter, &t.service);
    let mut ts = TargetSpec::new(id);
    ts.sni = Some(t.sni.clone());
    let inst = state.targets.get(&TargetKey::of(t)).unwrap_or(&none);
    let mut healthy_inst = inst.iter().filter(|i| healthy(i, t.only_passing));
    let mode = gw_override.unwrap_or(t.mesh_gateway);
    let eps: Vec<(SocketAddr, u32)> = if remote && mode.via_gateway() {
        // Through a gateway (which routes on the SNI at L4, TLS end to
        // end): its endpoints, while the target has a healthy instance
        // (Consul gives them the health of the backends).
        let (dc, wan) = match mode {
            chain::GatewayMode::Local => (local_dc, false),
            _ => (t.datacenter.as_str(), true),
        };
        let gws = state.gateways.get(dc).unwrap_or(&none);
        if healthy_inst.next().is_some() {
            gws.iter()
                .filter(|g| g.passing && g.weight > 0)
                .filter_map(|g| Some((if wan { g.wan } else { g.endpoint() }?, g.weight)))
                .collect()
        } else {
            Vec::new()
        }
    } else {
        healthy_inst
            .filter_map(|i| Some((if remote { i.wan } else { i.endpoint() }?, i.weight)))
            .collect()
    };
    (ts.endpoints, ts.endpoint_weights) = weighted(eps);
    ts.connect_timeout = Some(timeout.unwrap_or(resolver_timeout));
    ts
}

/// Checks that the leaf chains to one of the roots (as `Snapshot::build` will).
fn chains_to_roots(
    chain: &[rustls::pki_types::CertificateDer<'static>],
    roots: &[rustls::pki_types::CertificateDer<'static>],
) -> Result<(), String> {
    let store = veer_core::tls::root_store(roots).map_err(|e| e.to_string())?;
    let leaf = rustls::server::ParsedCertificate::try_from(&chain[0]).map_err(|e| e.to_string())?;
    let provider = veer_core::tls::crypto_provider();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &store,
        &chain[1..],
        rustls::pki_types::UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| e.to_string())
}

/// Whether two specs are the same (then the runtime need not swap).
/// Exhaustive on purpose: a new `Spec` field fails to compile here until it
/// is compared.
pub fn same_spec(a: &Spec, b: &Spec) -> bool {
    let Spec {
        identity,
        roots,
        chain,
        key,
        local_app,
        intentions,
        default_action,
        upstreams,
        mesh_destinations_only,
        listen,
        timeouts,
        source,
        expose,
        rbac,
        permissive_ports,
        inbound_max_connections,
        unapplied,
        inbound_http,
    } = a;
    *identity == b.identity
        && *roots == b.roots
        && *chain == b.chain
        && key.secret_der() == b.key.secret_der()
        && *local_app == b.local_app
        && *intentions == b.intentions
        && *default_action == b.default_action
        && *upstreams == b.upstreams
        && *mesh_destinations_only == b.mesh_destinations_only
        && *listen == b.listen
        && *timeouts == b.timeouts
        && *source == b.source
        && *expose == b.expose
        && *rbac == b.rbac
        && *permissive_ports == b.permissive_ports
        && *inbound_max_connections == b.inbound_max_connections
        && *unapplied == b.unapplied
        && *inbound_http == b.inbound_http
}

/// A one-line summary of what changed between two specs, for logs.
pub fn describe_change(old: Option<&Spec>, new: &Spec) -> String {
    let Some(old) = old else {
        return format!(
            "first spec: {} upstreams, {} intentions (default {}), {} roots",
            new.upstreams.len(),
            new.intentions.len(),
            new.default_action.as_str(),
            new.roots.len()
        );
    };
    let mut parts = Vec::new();
    if old.identity != new.identity {
        parts.push("identity".to_string());
    }
    if old.roots != new.roots {
        parts.push(format!("roots ({} → {})", old.roots.len(), new.roots.len()));
    }
    if old.chain != new.chain || old.key.secret_der() != new.key.secret_der() {
        parts.push("leaf".to_string());
    }
    if old.intentions != new.intentions || old.default_action != new.default_action {
        parts.push(format!(
            "intentions ({} → {}, default {})",
            old.intentions.len(),
            new.intentions.len(),
            new.default_action.as_str()
        ));
    }
    if old.upstreams != new.upstreams {
        let names = |s: &Spec| -> BTreeSet<String> {
            s.upstreams
                .iter()
                .map(|u| u.identity.service.clone())
                .collect()
        };
        let (o, n) = (names(old), names(new));
        let added: Vec<_> = n.difference(&o).cloned().collect();
        let removed: Vec<_> = o.difference(&n).cloned().collect();
        let changed = old
            .upstreams
            .iter()
            .filter(|u| {
                new.upstreams
                    .iter()
                    .any(|v| v.identity.service == u.identity.service && v != *u)
            })
            .count();
        parts.push(format!(
            "upstreams (added {added:?}, removed {removed:?}, {changed} changed)"
        ));
    }
    if old.listen != new.listen || old.local_app != new.local_app || old.expose != new.expose {
        parts.push("listeners".to_string());
    }
    if old.timeouts != new.timeouts {
        parts.push("timeouts".to_string());
    }
    if old.mesh_destinations_only != new.mesh_destinations_only {
        parts.push("mesh_destinations_only".to_string());
    }
    if parts.is_empty() {
        parts.push("other".to_string());
    }
    parts.join(", ")
}

pub mod l7;

#[cfg(test)]
mod tests;
