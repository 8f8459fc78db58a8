//! Real Envoy as a Consul transparent sidecar, for interop tests and benchmarks.
//!
//! [`Bootstrap`] writes a static Envoy bootstrap (JSON) shaped the way Consul's
//! xDS server shapes a transparent sidecar (see `consul-dataplane.md` §3):
//!
//! - outbound listener `127.0.0.1:15001` with the `original_dst` listener
//!   filter, one filter chain per upstream matching its virtual IPs
//!   (`prefix_ranges`, /32 and /128) → `tcp_proxy` → a cluster named by the
//!   upstream's SNI whose `UpstreamTlsContext` carries the leaf, the trusted
//!   roots, an exact URI SAN match on the upstream's SPIFFE ID and the SNI;
//!   a default chain → `tcp_proxy` → `original-destination` (`ORIGINAL_DST`,
//!   plain TCP);
//! - inbound public listener with a `DownstreamTlsContext` that requires a
//!   client certificate, the network `rbac` filter (`connect_authz`) on the
//!   peer's URI SAN, then `tcp_proxy` → `local_app`;
//! - admin on `127.0.0.1:19000`.
//!
//! Consul's static parts are kept (empty `tls_params`, 5 s connect timeouts,
//! panic threshold 0, stat prefixes); EDS is replaced by static endpoints.
//! [`Envoy`] runs it in a namespace as UID 5995, like a veer sidecar.
use crate::ca::TestCa;
use crate::mesh::PROXY_UID;
use crate::netns::Netns;
use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A tiny JSON value, enough to write a bootstrap without extra dependencies.
enum J {
    S(String),
    N(u64),
    B(bool),
    A(Vec<J>),
    O(Vec<(&'static str, J)>),
}

fn s(v: impl Into<String>) -> J {
    J::S(v.into())
}

fn o<const N: usize>(fields: [(&'static str, J); N]) -> J {
    J::O(fields.into())
}

impl fmt::Display for J {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            J::S(v) => {
                f.write_char('"')?;
                for c in v.chars() {
                    match c {
                        '"' => f.write_str("\\\"")?,
                        '\\' => f.write_str("\\\\")?,
                        '\n' => f.write_str("\\n")?,
                        c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                        c => f.write_char(c)?,
                    }
                }
                f.write_char('"')
            }
            J::N(n) => write!(f, "{n}"),
            J::B(b) => write!(f, "{b}"),
            J::A(items) => {
                f.write_char('[')?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_char(']')
            }
            J::O(fields) => {
                f.write_char('{')?;
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_char(',')?;
                    }
                    write!(f, "{}:{v}", J::S((*k).to_string()))?;
                }
                f.write_char('}')
            }
        }
    }
}

fn socket_address(a: SocketAddr) -> J {
    o([(
        "socket_address",
        o([
            ("address", s(a.ip().to_string())),
            ("port_value", J::N(a.port().into())),
        ]),
    )])
}

fn typed(type_url: &str, mut fields: Vec<(&'static str, J)>) -> J {
    fields.insert(0, ("@type", s(format!("type.googleapis.com/{type_url}"))));
    J::O(fields)
}

fn tcp_proxy(stat_prefix: &str, cluster: &str) -> J {
    o([
        ("name", s("envoy.filters.network.tcp_proxy")),
        (
            "typed_config",
            typed(
                "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                vec![("stat_prefix", s(stat_prefix)), ("cluster", s(cluster))],
            ),
        ),
    ])
}

fn static_endpoints(cluster: &str, addrs: &[SocketAddr]) -> J {
    o([
        ("cluster_name", s(cluster)),
        (
            "endpoints",
            J::A(vec![o([(
                "lb_endpoints",
                J::A(
                    addrs
                        .iter()
                        .map(|a| o([("endpoint", o([("address", socket_address(*a))]))]))
                        .collect(),
                ),
            )])]),
        ),
    ])
}

/// An upstream service reached through the outbound listener.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub service: String,
    /// Virtual IPs matched by the upstream's filter chain (any port).
    pub virtual_ips: Vec<IpAddr>,
    /// Inbound listeners of the upstream's sidecars.
    pub endpoints: Vec<SocketAddr>,
}

/// A static Envoy bootstrap for one transparent sidecar.
#[derive(Clone, Debug)]
pub struct Bootstrap {
    pub service: String,
    pub trust_domain: String,
    pub datacenter: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
    pub admin: SocketAddr,
    /// The public listener (`None`: no inbound listener).
    pub inbound: Option<SocketAddr>,
    pub local_app: SocketAddr,
    /// Source services the RBAC filter allows (default deny, as with
    /// Consul's default-deny intentions); empty: nobody.
    pub allowed_sources: Vec<String>,
    /// The outbound (transparent) listener (`None`: none).
    pub outbound: Option<SocketAddr>,
    pub upstreams: Vec<Upstream>,
    /// The default chain to `original-destination` (false: Consul's
    /// `MeshDestinationsOnly`).
    pub passthrough: bool,
    /// Circuit-breaker `max_connections` (and pending/requests) on the
    /// upstream and `local_app` clusters, as Consul sets from an upstream's
    /// `Limits`; `None` keeps Envoy's default of 1024.
    pub max_connections: Option<u32>,
    /// The services' protocol: `tcp` (the default), `http`, `http2` or
    /// `grpc`. At L7 both listeners run Envoy's HTTP connection manager
    /// shaped as Consul v1.16.0 emits it (goldens
    /// `agent/xds/testdata/listeners/http-public-listener`,
    /// `http2-public-listener` and `transparent-proxy-http-upstream`):
    /// inbound `public_listener` with the intentions as an HTTP `rbac`
    /// filter, `APPEND_FORWARD` XFCC, a route to `local_app` and ALPN
    /// `http/1.1`; outbound one route config per upstream to its cluster;
    /// `http2`/`grpc` add HTTP/2 options and ALPN `h2,http/1.1`.
    pub protocol: String,
}

impl Bootstrap {
    /// A full sidecar for `service` with the test CA's leaf for it (written
    /// now): inbound `0.0.0.0:20000` → `127.0.0.1:8080`, outbound
    /// `127.0.0.1:15001` with passthrough, admin `127.0.0.1:19000`, nobody
    /// allowed and no upstreams yet.
    pub fn sidecar(ca: &TestCa, service: &str) -> Bootstrap {
        let (cert, key) = ca.service(service);
        Bootstrap {
            service: service.to_string(),
            trust_domain: ca.ca.trust_domain.clone(),
            datacenter: "dc1".into(),
            cert,
            key,
            roots: ca.roots(),
            admin: "127.0.0.1:19000".parse().unwrap(),
            inbound: Some("0.0.0.0:20000".parse().unwrap()),
            local_app: "127.0.0.1:8080".parse().unwrap(),
            allowed_sources: Vec::new(),
            outbound: Some("127.0.0.1:15001".parse().unwrap()),
            upstreams: Vec::new(),
            passthrough: true,
            max_connections: None,
            protocol: "tcp".into(),
        }
    }

    /// Sets the services' protocol (`tcp`, `http`, `http2`, `grpc`).
    pub fn protocol(mut self, protocol: &str) -> Bootstrap {
        assert!(
            matches!(protocol, "tcp" | "http" | "http2" | "grpc"),
            "protocol {protocol:?}"
        );
        self.protocol = protocol.to_string();
        self
    }

    fn is_http(&self) -> bool {
        self.protocol != "tcp"
    }

    fn is_h2(&self) -> bool {
        matches!(self.protocol.as_str(), "http2" | "grpc")
    }

    /// Envoy's HTTP connection manager routing every request to `cluster`,
    /// with `http_filters` before the router.
    fn hcm(
        &self,
        stat_prefix: &str,
        route: &str,
        cluster: &str,
        mut filters: Vec<J>,
        inbound: bool,
    ) -> J {
        filters.push(o([
            ("name", s("envoy.filters.http.router")),
            (
                "typed_config",
                typed("envoy.extensions.filters.http.router.v3.Router", vec![]),
            ),
        ]));
        let mut fields = vec![
            ("stat_prefix", s(stat_prefix)),
            (
                "route_config",
                o([
                    ("name", s(route)),
                    (
                        "virtual_hosts",
                        J::A(vec![o([
                            ("name", s(route)),
                            ("domains", J::A(vec![s("*")])),
                            (
                                "routes",
                                J::A(vec![o([
                                    ("match", o([("prefix", s("/"))])),
                                    ("route", o([("cluster", s(cluster))])),
                                ])]),
                            ),
                        ])]),
                    ),
                ]),
            ),
            ("http_filters", J::A(filters)),
            ("tracing", o([("random_sampling", o([]))])),
        ];
        if self.is_h2() {
            fields.push(("http2_protocol_options", o([])));
        }
        if inbound {
            fields.push(("forward_client_cert_details", s("APPEND_FORWARD")));
            fields.push((
                "set_current_client_cert_details",
                o([
                    ("subject", J::B(true)),
                    ("cert", J::B(true)),
                    ("chain", J::B(true)),
                    ("dns", J::B(true)),
                    ("uri", J::B(true)),
                ]),
            ));
        }
        o([
            ("name", s("envoy.filters.network.http_connection_manager")),
            (
                "typed_config",
                typed(
                    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    fields,
                ),
            ),
        ])
    }

    /// HTTP/2 to a cluster's endpoints (Consul: `http2`/`grpc` services).
    fn h2_cluster_options(&self, fields: &mut Vec<(&'static str, J)>) {
        if self.is_h2() {
            fields.push((
                "typed_extension_protocol_options",
                o([(
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    typed(
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        vec![(
                            "explicit_http_config",
                            o([("http2_protocol_options", o([]))]),
                        )],
                    ),
                )]),
            ));
        }
    }

    /// Allows `source` (by service name, any datacenter and trust domain).
    pub fn allow(mut self, source: &str) -> Bootstrap {
        self.allowed_sources.push(source.to_string());
        self
    }

    /// Adds an upstream.
    pub fn upstream(mut self, service: &str, vips: &[IpAddr], endpoints: &[SocketAddr]) -> Self {
        self.upstreams.push(Upstream {
            service: service.to_string(),
            virtual_ips: vips.to_vec(),
            endpoints: endpoints.to_vec(),
        });
        self
    }

    /// `<svc>.default.<dc>.internal.<td>`: the upstream's SNI and cluster name.
    pub fn sni(&self, service: &str) -> String {
        format!(
            "{service}.default.{}.internal.{}",
            self.datacenter, self.trust_domain
        )
    }

    fn spiffe(&self, service: &str) -> String {
        format!(
            "spiffe://{}/ns/default/dc/{}/svc/{service}",
            self.trust_domain, self.datacenter
        )
    }

    fn common_tls(&self, san: Option<String>) -> J {
        let mut validation = vec![("trusted_ca", o([("filename", path(&self.roots))]))];
        if let Some(uri) = san {
            validation.push((
                "match_typed_subject_alt_names",
                J::A(vec![o([
                    ("san_type", s("URI")),
                    ("matcher", o([("exact", s(uri))])),
                ])]),
            ));
        }
        o([
            ("tls_params", o([])),
            (
                "tls_certificates",
                J::A(vec![o([
                    ("certificate_chain", o([("filename", path(&self.cert))])),
                    ("private_key", o([("filename", path(&self.key))])),
                ])]),
            ),
            ("validation_context", J::O(validation)),
        ])
    }

    fn circuit_breakers(&self, fields: &mut Vec<(&'static str, J)>) {
        if let Some(n) = self.max_connections {
            let n = u64::from(n);
            fields.push((
                "circuit_breakers",
                o([(
                    "thresholds",
                    J::A(vec![o([
                        ("max_connections", J::N(n)),
                        ("max_pending_requests", J::N(n)),
                        ("max_requests", J::N(n)),
                    ])]),
                )]),
            ));
        }
    }

    fn inbound_listener(&self, bind: SocketAddr) -> J {
        let principals: Vec<J> = self
            .allowed_sources
            .iter()
            .map(|src| {
                o([(
                    "authenticated",
                    o([(
                        "principal_name",
                        o([(
                            "safe_regex",
                            o([(
                                "regex",
                                s(format!("^spiffe://[^/]+/ns/default/dc/[^/]+/svc/{src}$")),
                            )]),
                        )]),
                    )]),
                )])
            })
            .collect();
        // Default deny: an ALLOW list; with nobody allowed, no policy at all.
        let mut rules = vec![("action", s("ALLOW"))];
        if !principals.is_empty() {
            rules.push((
                "policies",
                o([(
                    "consul-intentions-layer4",
                    o([
                        ("permissions", J::A(vec![o([("any", J::B(true))])])),
                        ("principals", J::A(principals)),
                    ]),
                )]),
            ));
        }
        let filters = if self.is_http() {
            // Consul ≥ 1.9 puts an http service's intentions in the HTTP
            // connection manager's `rbac` filter, not the network one.
            let rbac = o([
                ("name", s("envoy.filters.http.rbac")),
                (
                    "typed_config",
                    typed(
                        "envoy.extensions.filters.http.rbac.v3.RBAC",
                        vec![("rules", J::O(rules))],
                    ),
                ),
            ]);
            vec![self.hcm(
                "public_listener",
                "public_listener",
                "local_app",
                vec![rbac],
                true,
            )]
        } else {
            let rbac = o([
                ("name", s("envoy.filters.network.rbac")),
                (
                    "typed_config",
                    typed(
                        "envoy.extensions.filters.network.rbac.v3.RBAC",
                        vec![("stat_prefix", s("connect_authz")), ("rules", J::O(rules))],
                    ),
                ),
            ]);
            vec![rbac, tcp_proxy("public_listener", "local_app")]
        };
        // Consul's `getAlpnProtocols` (agent/xds/listeners.go, v1.16.0).
        let mut common = self.common_tls(None);
        if let J::O(f) = &mut common {
            if self.is_h2() {
                f.push(("alpn_protocols", J::A(vec![s("h2"), s("http/1.1")])));
            } else if self.is_http() {
                f.push(("alpn_protocols", J::A(vec![s("http/1.1")])));
            }
        }
        let tls = o([
            ("name", s("tls")),
            (
                "typed_config",
                typed(
                    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                    vec![
                        ("common_tls_context", common),
                        ("require_client_certificate", J::B(true)),
                    ],
                ),
            ),
        ]);
        o([
            ("name", s(format!("public_listener:{bind}"))),
            ("address", socket_address(bind)),
            ("traffic_direction", s("INBOUND")),
            (
                "filter_chains",
                J::A(vec![o([
                    ("filters", J::A(filters)),
                    ("transport_socket", tls),
                ])]),
            ),
        ])
    }

    fn outbound_listener(&self, bind: SocketAddr) -> J {
        let mut chains: Vec<(String, J)> = self
            .upstreams
            .iter()
            .filter(|u| !u.virtual_ips.is_empty())
            .map(|u| {
                let ranges = u
                    .virtual_ips
                    .iter()
                    .map(|ip| {
                        o([
                            ("address_prefix", s(ip.to_string())),
                            ("prefix_len", J::N(if ip.is_ipv4() { 32 } else { 128 })),
                        ])
                    })
                    .collect();
                let stat = format!("upstream.{}.default.default.{}", u.service, self.datacenter);
                let filter = if self.is_http() {
                    let route = format!("{}.default.default.{}", u.service, self.datacenter);
                    self.hcm(&stat, &route, &self.sni(&u.service), vec![], false)
                } else {
                    tcp_proxy(&stat, &self.sni(&u.service))
                };
                let chain = o([
                    ("filter_chain_match", o([("prefix_ranges", J::A(ranges))])),
                    ("filters", J::A(vec![filter])),
                ]);
                (u.virtual_ips[0].to_string(), chain)
            })
            .collect();
        // Consul sorts the chains by their first prefix to avoid churn.
        chains.sort_by(|a, b| a.0.cmp(&b.0));
        let mut fields = vec![
            ("name", s(format!("outbound_listener:{bind}"))),
            ("address", socket_address(bind)),
            ("traffic_direction", s("OUTBOUND")),
            (
                "listener_filters",
                J::A(vec![o([
                    ("name", s("envoy.filters.listener.original_dst")),
                    (
                        "typed_config",
                        typed(
                            "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
                            vec![],
                        ),
                    ),
                ])]),
            ),
            (
                "filter_chains",
                J::A(chains.into_iter().map(|(_, c)| c).collect()),
            ),
        ];
        if self.passthrough {
            fields.push((
                "default_filter_chain",
                o([(
                    "filters",
                    J::A(vec![tcp_proxy(
                        "upstream.original-destination",
                        "original-destination",
                    )]),
                )]),
            ));
        }
        J::O(fields)
    }

    fn clusters(&self) -> Vec<J> {
        let mut out = Vec::new();
        if self.inbound.is_some() {
            let mut c = vec![
                ("name", s("local_app")),
                ("type", s("STATIC")),
                ("connect_timeout", s("5s")),
                (
                    "load_assignment",
                    static_endpoints("local_app", &[self.local_app]),
                ),
            ];
            self.circuit_breakers(&mut c);
            self.h2_cluster_options(&mut c);
            out.push(J::O(c));
        }
        if self.outbound.is_none() {
            return out;
        }
        for u in &self.upstreams {
            let sni = self.sni(&u.service);
            let tls = o([
                ("name", s("tls")),
                (
                    "typed_config",
                    typed(
                        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                        vec![
                            (
                                "common_tls_context",
                                self.common_tls(Some(self.spiffe(&u.service))),
                            ),
                            ("sni", s(&sni)),
                        ],
                    ),
                ),
            ]);
            let mut c = vec![
                ("name", s(&sni)),
                ("alt_stat_name", s(&sni)),
                ("type", s("STATIC")),
                ("connect_timeout", s("5s")),
                ("load_assignment", static_endpoints(&sni, &u.endpoints)),
                ("common_lb_config", o([("healthy_panic_threshold", o([]))])),
                ("outlier_detection", o([])),
                ("transport_socket", tls),
            ];
            self.circuit_breakers(&mut c);
            self.h2_cluster_options(&mut c);
            out.push(J::O(c));
        }
        if self.passthrough {
            out.push(o([
                ("name", s("original-destination")),
                ("type", s("ORIGINAL_DST")),
                ("lb_policy", s("CLUSTER_PROVIDED")),
                ("connect_timeout", s("5s")),
            ]));
        }
        out
    }

    /// The bootstrap as JSON.
    pub fn to_json(&self) -> String {
        let mut listeners = Vec::new();
        if let Some(b) = self.inbound {
            listeners.push(self.inbound_listener(b));
        }
        if let Some(b) = self.outbound {
            listeners.push(self.outbound_listener(b));
        }
        o([
            (
                "node",
                o([
                    ("id", s(format!("{}-sidecar-proxy", self.service))),
                    ("cluster", s(&self.service)),
                ]),
            ),
            ("admin", o([("address", socket_address(self.admin))])),
            (
                "static_resources",
                o([
                    ("listeners", J::A(listeners)),
                    ("clusters", J::A(self.clusters())),
                ]),
            ),
        ])
        .to_string()
    }
}

fn path(p: &Path) -> J {
    s(p.display().to_string())
}

/// An Envoy process inside a namespace, killed on drop.
pub struct Envoy {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub log: PathBuf,
    ns: PathBuf,
    name: String,
}

impl Envoy {
    /// Writes `boot` to `dir/<service>-envoy.json` and starts Envoy in `ns` as
    /// UID 5995 with `--concurrency concurrency`; waits until the admin
    /// `/ready` answers `LIVE` (15 s at most, then panics with the log).
    pub fn start(
        bin: &Path,
        ns: &Netns,
        boot: &Bootstrap,
        dir: &Path,
        concurrency: usize,
    ) -> Envoy {
        let config = dir.join(format!("{}-envoy.json", boot.service));
        std::fs::write(&config, boot.to_json()).expect("write envoy bootstrap");
        let log = dir.join(format!("{}-envoy.log", boot.service));
        let out = std::fs::File::create(&log).expect("envoy log");
        let level = std::env::var("VEER_ENVOY_LOG").unwrap_or_else(|_| "warn".into());
        let child = ns
            .command("setpriv")
            .args([
                &format!("--reuid={PROXY_UID}"),
                &format!("--regid={PROXY_UID}"),
                "--clear-groups",
            ])
            .arg(bin)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--disable-hot-restart", "--log-level", &level])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("start envoy");
        let mut e = Envoy {
            child: Some(child),
            admin: boot.admin,
            config,
            log,
            ns: ns.path(),
            name: format!("{} in {}", boot.service, ns.name()),
        };
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if e.admin_get("/ready").is_some_and(|b| b.contains("LIVE")) {
                return e;
            }
            let exited = e
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > end {
                let log = e.log_text();
                panic!("envoy ({}) did not become ready:\n{log}", e.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id (setpriv execs Envoy, so it is Envoy's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET <path>` on the admin listener (from inside the namespace); the
    /// body when the answer is 200.
    pub fn admin_get(&self, path: &str) -> Option<String> {
        let ns = self.ns.clone();
        let admin = self.admin;
        let path = path.to_string();
        std::thread::spawn(move || {
            crate::netns::enter(&ns).ok()?;
            let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut resp = String::new();
            s.read_to_string(&mut resp).ok()?;
            let (head, body) = resp.split_once("\r\n\r\n")?;
            if !head.starts_with("HTTP/1.1 200") {
                return None;
            }
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                return Some(dechunk(body));
            }
            Some(body.to_string())
        })
        .join()
        .ok()
        .flatten()
    }

    /// A counter or gauge from `/stats` (exact name), if present.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let body = self.admin_get(&format!("/stats?filter=^{name}$"))?;
        body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(": ")?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() || std::env::var_os("VEER_SHOW_LOGS").is_some() {
            eprintln!("---- envoy log ({}) ----\n{}", self.name, self.log_text());
        }
    }
}
