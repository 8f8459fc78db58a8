//! Consul as veer's control plane.
//!
//! [`ConsulSource`] follows one sidecar proxy's configuration on the local
//! Consul agent through blocking queries on the agent's HTTP API and turns
//! it into complete [`Spec`]s for `veer_core::snapshot::Snapshot::build` /
//! `veer_proxy::state::Shared::apply`. It works with Consul 1.8.7 (tested
//! against a real agent) and reads the transparent-proxy fields of newer
//! versions where they exist.
//!
//! # API
//!
//! ```no_run
//! # async fn demo() -> Result<(), veer_consul::Error> {
//! use veer_consul::{ConsulSource, Flags, Options};
//! let flags = Flags {
//!     proxy_id: Some("web-sidecar-proxy".into()), // or sidecar_for: Some("web".into())
//!     transparent: true,
//!     ..Flags::default()
//! };
//! let opts = Options::from_env_and_flags(&flags)?; // CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, …
//! let mut source = ConsulSource::new(opts)?;
//! let spec = source.first().await?; // the first complete spec, or a clear error
//! # let _ = spec;
//! // build the runtime from `spec`, then:
//! tokio::spawn(source.run(move |spec| {
//!     // shared.apply(spec): called only with complete specs that differ
//!     // from the previous one
//!     # let _ = spec;
//! }));
//! # Ok(()) }
//! ```
//!
//! - [`Options`] / [`Flags`]: agent address (`http`, `https`, `unix://`),
//!   token, TLS and namespace from the `CONSUL_*` environment and the
//!   `-http-addr`, `-token`, `-token-file`, `-ca-file` flags.
//! - [`ConsulSource::first`] waits for the first complete spec;
//!   [`ConsulSource::next`] for the next different one;
//!   [`ConsulSource::run`] calls a closure with each.
//! - [`Error`]: the one error type, with [`Error::classify`].
//! - Sans-IO parts: [`api`] (response parsers), [`assemble`] (`State` →
//!   `Spec`, the "changed?" check), [`blocking`] (index rules, back-off).
//!
//! # What is watched
//!
//! | Watch | Endpoint | Blocking |
//! |---|---|---|
//! | registration | `/v1/agent/service/:proxy-id` | hash (`X-Consul-ContentHash`) |
//! | CA roots | `/v1/agent/connect/ca/roots` | index |
//! | leaf | `/v1/agent/connect/ca/leaf/:destination-service` | index |
//! | intentions | `/v1/connect/intentions` | index |
//! | catalog (transparent mode) | `/v1/catalog/services` | index |
//! | every check (transparent mode) | `/v1/health/state/any` | index |
//! | explicit upstreams (not transparent; or in another datacenter) | `/v1/health/connect/:svc` (`?dc=`), `/v1/catalog/service/:svc` | index |
//! | each candidate upstream (transparent mode), after it changed | `/v1/catalog/service/:svc`, then `/v1/health/connect/:svc` | no: read once, at most `--consul-max-reads` at a time |
//! | config entries | `/v1/config/service-defaults`, `/v1/config/proxy-defaults`, `/v1/config/mesh/mesh` | index |
//! | discovery chains of the upstreams with a resolver, after any config-entry change | `/v1/discovery-chain/:svc` (`?compile-dc=`) | no: read one after the other on one connection |
//! | each target of those chains | `/v1/health/connect/:svc?dc=&filter=` | index |
//! | discovery-chain entries ([`entries`]: resolvers decide which chains are read; routers and splitters are named) | `/v1/config/service-resolver`, `/v1/config/service-router`, `/v1/config/service-splitter` | index |
//!
//! Blocking queries use `wait=5m`; the index is reset to 0 when it goes
//! backwards and raised to 1 when it is 0; errors reset the cursor and are
//! retried with jittered exponential back-off (200 ms doubling to 30 s),
//! logged at the 1st, 2nd, 4th, 8th … failure and once on recovery.
//! Answers that bring nothing new and come back quickly are paced.
//!
//! **Intentions.** Consul 1.8.7's `/v1/connect/intentions/match` blocks but
//! sends no `X-Consul-Index` header (observed), so it cannot drive a
//! blocking watch. veer watches the intention list instead (same ACL
//! filtering, index-blocking) and keeps those whose destination matches its
//! service, in Consul's order — exactly `match?by=destination` — evaluated
//! locally by veer-core; no per-connection API call.
//!
//! **Default intention decision.** ACLs off ⇒ allow; ACLs on ⇒
//! `acl.default_policy`. `/v1/agent/self` would tell, but needs
//! `agent:read`, which a proxy token does not have. Instead veer asks the
//! agent to authorize a made-up source
//! (`…/svc/veer-default-probe-<random 64-bit>`) against its own service with
//! `POST /v1/agent/connect/authorize` (the call Consul 1.8's Envoy ext_authz
//! and built-in proxy make; it needs `service:write` on our service, which
//! the proxy token has for its leaf anyway). No intention can name that
//! source exactly, and the answer's `Reason` says whether an intention
//! decided: "ACLs disabled, access is allowed by default" and "Default
//! behavior configured by ACLs" carry the default; "Matched intention: …"
//! means a wildcard-source intention decided (inconclusive). Then
//! `/v1/agent/self` is tried; if that is refused too, the default is deny —
//! which cannot matter: a wildcard-source intention decides every inbound
//! connection. The probe runs at start and after each intention change.
//!
//! **Upstreams.** In transparent mode (`--transparent`, or `Mode:
//! transparent` on the registration, the service's `service-defaults` or
//! `proxy-defaults`), every catalog service except `consul` and our own that
//! has at least one Connect sidecar (or is connect-native) is an upstream;
//! explicit upstreams (`Proxy.Upstreams[]` with `LocalBindPort`) are added in
//! any mode. Endpoints are the passing sidecars; virtual IPs come from
//! `TaggedAddresses["consul-virtual"]` and (in our partition)
//! `["virtual"]` of the sidecars *and* of the destination service's own
//! instances, because a 1.8.7 sidecar registered with `SidecarService` does
//! not inherit the service's `virtual` address. Upstreams are not pruned by
//! intentions: the destination enforces them.
//!
//! **Transparent mode at scale** ([`feed`]). Candidates are not watched one
//! by one (that held one agent connection per service, past Consul's
//! default `limits.http_max_conns_per_client` of 200). Two blocking lists,
//! the catalog and every check, say which services changed; those are read
//! with non-blocking requests, `--consul-max-reads` (default 8) at a time,
//! so veer holds about a dozen long polls plus that many connections whatever
//! the catalog's size, and nothing runs per service while idle. A sidecar
//! name seen in a service's Connect answer is not read itself. A catalog
//! change that no list explains (a port change without a check change) or
//! an index going backwards reads every service again. An agent that
//! closes connections before answering (its per-client limit) is reported
//! as such ([`Error::Closed`]), apart from an unreachable one; reads back
//! off on either. [`Status`] counts upstreams, catalog services, the most
//! connections the source may hold, errors by kind, and how old the view
//! is; `veer run` shows it in `/ready`, `/config_dump` and metrics.
//!
//! **Completeness.** The first spec is produced only when registration,
//! roots, leaf (chaining to those roots), intentions, the default decision,
//! the config entries, the catalog (transparent mode) and every wanted
//! per-service watch or read have answered (one failing 3 times in a
//! row without ever answering counts as "no instances"). Later, every
//! update is again a complete spec, built from the last good answer of
//! every watch, and held while the reads of a change are under way so
//! that the change is applied whole; an unchanged result is not handed out. When the agent is
//! unreachable the last good state stays, and the watches catch up when it
//! returns (a restarted agent's lower indexes reset the cursors).
//!
//! # What is not done
//!
//! Listener addresses (inbound bind, outbound port, expose paths) are read
//! at start by the runtime; a later change is logged, not applied.
//! `Expose.Checks` (paths derived from HTTP checks), prepared-query and
//! Unix-socket upstreams, peering, L7 intentions (enforced as deny at L4),
//! per-namespace queries beyond sending `ns=`/`partition=` and L7
//! discovery-chain routing (routers and splitters: named as unapplied)
//! are not supported.
//!
//! **Discovery chain** ([`chain`]). Only services with a
//! `service-resolver` entry have their chain read (a service without one
//! has Consul's default chain); the resolver's targets — primary after
//! redirect and default subset, then failover in order — become the
//! upstream's targets, each with its SNI, expected identity, connect
//! timeout and healthy instances (no critical check; with `OnlyPassing`
//! every check passing; another datacenter's at their WAN address, or
//! through the mesh gateways of mode `local`/`remote`: the instances of
//! kind `mesh-gateway` of `/v1/internal/ui/nodes?dc=` filtered on
//! `Services.Kind contains "mesh-gateway"`, one watch per datacenter
//! needed). Instance weights (`Service.Weights`: Passing, Warning while a
//! check warns, clamped to 128, below 1 = not used) become endpoint
//! weights. The number of target watches follows the resolvers'
//! targets, not the mesh. Router and splitter entries of upstreams in use
//! are named in [`Spec::unapplied`] ([`entries::unapplied`]). `CONSUL_HTTP_AUTH` (basic auth) and
//! `CONSUL_HTTP_SSL_VERIFY=false` are not supported. The token file is read
//! once at start.
#![deny(unsafe_code)]

pub mod api;
pub mod assemble;
pub mod blocking;
pub mod chain;
pub mod entries;
mod error;
pub mod feed;
pub mod http;
pub mod options;
mod source;
pub mod watch;

pub use error::Error;
pub use options::{AgentAddr, Flags, Options, ProxyTarget};
pub use source::{desired_watches, ConsulSource, Status};
pub use veer_core::snapshot::Spec;
