//! Where the agent is, how to authenticate, and which proxy to follow —
//! from the standard `CONSUL_*` environment and the CLI flags.
use crate::Error;
use std::path::PathBuf;
use std::time::Duration;

/// The agent's HTTP API address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// `http://host:port` or `https://host:port`.
    Tcp {
        https: bool,
        /// A host name, an IPv4 address or a bracket-less IPv6 address.
        host: String,
        port: u16,
    },
    /// `unix:///path/to/socket`.
    Unix(PathBuf),
}

impl std::fmt::Display for AgentAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentAddr::Tcp { https, host, port } => {
                let scheme = if *https { "https" } else { "http" };
                if host.contains(':') {
                    write!(f, "{scheme}://[{host}]:{port}")
                } else {
                    write!(f, "{scheme}://{host}:{port}")
                }
            }
            AgentAddr::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

impl AgentAddr {
    /// Parses `CONSUL_HTTP_ADDR` / `-http-addr`: `host[:port]`,
    /// `http://host[:port]`, `https://host[:port]`, `[v6]:port` or
    /// `unix:///path`. Without a scheme, `https` is used when `ssl` is set
    /// (`CONSUL_HTTP_SSL=true`). A missing port is 8500 for http and 8501
    /// for https (Consul's defaults).
    pub fn parse(s: &str, ssl: bool) -> Result<AgentAddr, Error> {
        let s = s.trim();
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(Error::Config(format!("{s:?}: empty unix socket path")));
            }
            return Ok(AgentAddr::Unix(PathBuf::from(p)));
        }
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if s.contains("://") {
            return Err(Error::Config(format!(
                "Consul HTTP address {s:?}: unknown scheme (use http://, https:// or unix://)"
            )));
        } else {
            (ssl, s)
        };
        let rest = rest.trim_end_matches('/');
        let bad = || Error::Config(format!("invalid Consul HTTP address {s:?}"));
        if rest.is_empty()
            || rest.contains(['/', '?', '#', '@'])
            || rest.contains(char::is_whitespace)
        {
            return Err(bad());
        }
        let default_port = if https { 8501 } else { 8500 };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(bad)?,
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => return Err(bad()), // bare IPv6 needs brackets
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(AgentAddr::Tcp { https, host, port })
    }
}

/// Which registered proxy this sidecar is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyTarget {
    /// `--proxy-id web-sidecar-proxy`: the proxy's service ID.
    ProxyId(String),
    /// `--sidecar-for web`: the local proxy whose `Proxy.DestinationServiceID`
    /// is this service ID (looked up once in `/v1/agent/services`).
    SidecarFor(String),
}

/// The CLI flags, as given (None when absent). The caller maps its
/// argument parser onto this; [`Options::from_env_and_flags`] merges it
/// with the environment, flags winning.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// `-http-addr`
    pub http_addr: Option<String>,
    /// `-token`
    pub token: Option<String>,
    /// `-token-file`
    pub token_file: Option<PathBuf>,
    /// `-ca-file`
    pub ca_file: Option<PathBuf>,
    /// `--proxy-id`
    pub proxy_id: Option<String>,
    /// `--sidecar-for`
    pub sidecar_for: Option<String>,
    /// `--transparent`: run the transparent outbound listener and discover
    /// implicit upstreams even when the registration does not say
    /// `Mode: transparent` (Consul 1.8.7 has no such field).
    pub transparent: bool,
    /// `--consul-max-reads`: see [`Options::max_reads`].
    pub max_reads: Option<usize>,
    /// `--outbound-port`: the transparent outbound listener's port, over
    /// `TransparentProxy.OutboundListenerPort` (which Consul < 1.10 lacks).
    pub outbound_port: Option<u16>,
}

/// The default of [`Options::max_reads`].
pub const DEFAULT_MAX_READS: usize = 8;

/// Everything [`ConsulSource`](crate::ConsulSource) needs.
#[derive(Clone)]
pub struct Options {
    pub addr: AgentAddr,
    /// Sent as `X-Consul-Token` on every request; `None` uses the agent's
    /// default token.
    pub token: Option<String>,
    /// PEM CA bundle for an https agent (`CONSUL_CACERT` / `-ca-file`).
    pub ca_file: Option<PathBuf>,
    /// Directory of PEM CA certificates (`CONSUL_CAPATH`).
    pub ca_path: Option<PathBuf>,
    /// Client certificate and key for agents with `verify_incoming`
    /// (`CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY`).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Overrides the TLS server name (`CONSUL_TLS_SERVER_NAME`).
    pub tls_server_name: Option<String>,
    /// Enterprise namespace and admin partition (`CONSUL_NAMESPACE`,
    /// `CONSUL_PARTITION`), sent as `ns=` / `partition=` when set.
    pub namespace: Option<String>,
    pub partition: Option<String>,
    pub target: ProxyTarget,
    /// See [`Flags::transparent`].
    pub transparent: bool,
    /// See [`Flags::outbound_port`].
    pub outbound_port: Option<u16>,
    /// The blocking-query `wait` (Consul's default and ours: 5 minutes).
    pub wait: Duration,
    /// How many services the transparent-mode feed reads at once (each
    /// read is one agent connection while it lasts). veer's agent
    /// connections stay below this plus about a dozen long polls
    /// (registration, roots, leaf, intentions, catalog, checks, six config
    /// entry lists, and
    /// one per explicit upstream in another datacenter) — far below
    /// Consul's `limits.http_max_conns_per_client` (200). At least 1.
    pub max_reads: usize,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("addr", &self.addr.to_string())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_file", &self.ca_file)
            .field("ca_path", &self.ca_path)
            .field("client_cert", &self.client_cert)
            .field("client_key", &self.client_key)
            .field("tls_server_name", &self.tls_server_name)
            .field("namespace", &self.namespace)
            .field("partition", &self.partition)
            .field("target", &self.target)
            .field("transparent", &self.transparent)
            .field("outbound_port", &self.outbound_port)
            .field("wait", &self.wait)
            .field("max_reads", &self.max_reads)
            .finish()
    }
}

impl Options {
    /// Options for `target` with the agent at `addr`, no token, no TLS
    /// extras, 5-minute waits.
    pub fn new(addr: AgentAddr, target: ProxyTarget) -> Options {
        Options {
            addr,
            token: None,
            ca_file: None,
            ca_path: None,
            client_cert: None,
            client_key: None,
            tls_server_name: None,
            namespace: None,
            partition: None,
            target,
            transparent: false,
            outbound_port: None,
            wait: Duration::from_secs(300),
            max_reads: DEFAULT_MAX_READS,
        }
    }

    /// Merges the process environment with `flags` (flags win); see
    /// [`Options::from_lookup`].
    pub fn from_env_and_flags(flags: &Flags) -> Result<Options, Error> {
        Options::from_lookup(flags, |k| std::env::var(k).ok())
    }

    /// Merges an environment (`env(name)`; empty values count as unset)
    /// with `flags`:
    ///
    /// | setting | flag | environment | default |
    /// |---|---|---|---|
    /// | address | `-http-addr` | `CONSUL_HTTP_ADDR` (+ `CONSUL_HTTP_SSL`) | `127.0.0.1:8500` |
    /// | token | `-token-file`, then `-token` | `CONSUL_HTTP_TOKEN_FILE`, then `CONSUL_HTTP_TOKEN` | agent default |
    /// | CA | `-ca-file` | `CONSUL_CACERT`, `CONSUL_CAPATH` | system roots |
    /// | client cert | — | `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY` | none |
    /// | server name | — | `CONSUL_TLS_SERVER_NAME` | address host |
    /// | namespace, partition | — | `CONSUL_NAMESPACE`, `CONSUL_PARTITION` | none |
    ///
    /// The token file is read here (trimmed; an empty file means no token).
    /// As in Consul's Go client a token file beats a token value given at
    /// the same level; any flag beats any environment variable.
    /// `CONSUL_HTTP_SSL_VERIFY=false` is refused: give the agent's CA instead.
    pub fn from_lookup(
        flags: &Flags,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Options, Error> {
        let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let truthy = |k: &str| -> Result<Option<bool>, Error> {
            match env(k) {
                None => Ok(None),
                Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "1" | "t" | "true" => Ok(Some(true)),
                    "0" | "f" | "false" => Ok(Some(false)),
                    _ => Err(Error::Config(format!("{k}={v:?} is not a boolean"))),
                },
            }
        };
        let ssl = truthy("CONSUL_HTTP_SSL")?.unwrap_or(false);
        if truthy("CONSUL_HTTP_SSL_VERIFY")? == Some(false) {
            return Err(Error::Config(
                "CONSUL_HTTP_SSL_VERIFY=false is not supported; give the agent's CA with CONSUL_CACERT or -ca-file".into(),
            ));
        }
        let addr_s = flags
            .http_addr
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| env("CONSUL_HTTP_ADDR"))
            .unwrap_or_else(|| "127.0.0.1:8500".into());
        let addr = AgentAddr::parse(&addr_s, ssl)?;

        let token = if let Some(f) = &flags.token_file {
            read_token_file(f)?
        } else if let Some(t) = flags.token.clone().filter(|t| !t.trim().is_empty()) {
            Some(t.trim().to_string())
        } else if let Some(f) = env("CONSUL_HTTP_TOKEN_FILE") {
            read_token_file(&PathBuf::from(f))?
        } else {
            env("CONSUL_HTTP_TOKEN").map(|t| t.trim().to_string())
        };
        if let Some(t) = &token {
            if t.bytes().any(|b| b.is_ascii_control()) {
                return Err(Error::Config(
                    "the Consul ACL token contains control characters".into(),
                ));
            }
        }

        let target = match (
            flags.proxy_id.clone().filter(|s| !s.is_empty()),
            flags.sidecar_for.clone().filter(|s| !s.is_empty()),
        ) {
            (Some(id), None) => ProxyTarget::ProxyId(id),
            (None, Some(svc)) => ProxyTarget::SidecarFor(svc),
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give either --proxy-id or --sidecar-for, not both".into(),
                ))
            }
            (None, None) => return Err(Error::Config("give --proxy-id or --sidecar-for".into())),
        };
        let client_cert = env("CONSUL_CLIENT_CERT").map(PathBuf::from);
        let client_key = env("CONSUL_CLIENT_KEY").map(PathBuf::from);
        if client_cert.is_some() != client_key.is_some() {
            return Err(Error::Config(
                "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be given together".into(),
            ));
        }
        Ok(Options {
            addr,
            token,
            ca_file: flags
                .ca_file
                .clone()
                .or_else(|| env("CONSUL_CACERT").map(PathBuf::from)),
            ca_path: env("CONSUL_CAPATH").map(PathBuf::from),
            client_cert,
            client_key,
            tls_server_name: env("CONSUL_TLS_SERVER_NAME"),
            namespace: env("CONSUL_NAMESPACE"),
            partition: env("CONSUL_PARTITION"),
            target,
            transparent: flags.transparent,
            outbound_port: flags.outbound_port,
            wait: Duration::from_secs(300),
            max_reads: match flags.max_reads {
                None => DEFAULT_MAX_READS,
                Some(0) => {
                    return Err(Error::Config(
                        "--consul-max-reads must be at least 1".into(),
                    ))
                }
                Some(n) => n,
            },
        })
    }
}

fn read_token_file(path: &std::path::Path) -> Result<Option<String>, Error> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the Consul token file {}: {e}",
            path.display()
        ))
    })?;
    let t = s.trim();
    if t.is_empty() {
        tracing::warn!(file = %path.display(), "the Consul token file is empty; using the agent's default token");
        return Ok(None);
    }
    Ok(Some(t.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn pid() -> Flags {
        Flags {
            proxy_id: Some("web-sidecar-proxy".into()),
            ..Flags::default()
        }
    }

    #[test]
    fn addresses() {
        let tcp = |https, host: &str, port| AgentAddr::Tcp {
            https,
            host: host.into(),
            port,
        };
        assert_eq!(
            AgentAddr::parse("127.0.0.1:8500", false).unwrap(),
            tcp(false, "127.0.0.1", 8500)
        );
        assert_eq!(
            AgentAddr::parse("localhost", false).unwrap(),
            tcp(false, "localhost", 8500)
        );
        assert_eq!(
            AgentAddr::parse("localhost", true).unwrap(),
            tcp(true, "localhost", 8501)
        );
        assert_eq!(
            AgentAddr::parse("https://c.example:9", false).unwrap(),
            tcp(true, "c.example", 9)
        );
        assert_eq!(
            AgentAddr::parse("http://[::1]:8500/", true).unwrap(),
            tcp(false, "::1", 8500)
        );
        assert_eq!(
            AgentAddr::parse("[::1]", false).unwrap(),
            tcp(false, "::1", 8500)
        );
        assert_eq!(
            AgentAddr::parse("unix:///run/consul.sock", false).unwrap(),
            AgentAddr::Unix("/run/consul.sock".into())
        );
        for bad in [
            "",
            "ftp://x",
            "::1:8500",
            "http://h:port",
            "http://h/x",
            "h:0",
            "unix://",
        ] {
            assert!(AgentAddr::parse(bad, false).is_err(), "{bad:?}");
        }
        assert_eq!(tcp(true, "::1", 1).to_string(), "https://[::1]:1");
    }

    #[test]
    fn env_and_flags() {
        let o = Options::from_lookup(&pid(), lookup(&[])).unwrap();
        assert_eq!(o.addr.to_string(), "http://127.0.0.1:8500");
        assert_eq!(o.token, None);
        assert_eq!(o.target, ProxyTarget::ProxyId("web-sidecar-proxy".into()));

        let env = lookup(&[
            ("CONSUL_HTTP_ADDR", "10.0.0.1:8501"),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_HTTP_TOKEN", "env-token"),
            ("CONSUL_CACERT", "/ca.pem"),
            ("CONSUL_CLIENT_CERT", "/c.pem"),
            ("CONSUL_CLIENT_KEY", "/k.pem"),
            ("CONSUL_TLS_SERVER_NAME", "consul.local"),
            ("CONSUL_NAMESPACE", "team"),
            ("CONSUL_PARTITION", "part"),
        ]);
        let o = Options::from_lookup(&pid(), env).unwrap();
        assert_eq!(o.addr.to_string(), "https://10.0.0.1:8501");
        assert_eq!(o.token.as_deref(), Some("env-token"));
        assert_eq!(o.ca_file, Some("/ca.pem".into()));
        assert_eq!(o.client_key, Some("/k.pem".into()));
        assert_eq!(o.tls_server_name.as_deref(), Some("consul.local"));
        assert_eq!(o.namespace.as_deref(), Some("team"));
        assert_eq!(o.partition.as_deref(), Some("part"));
        assert!(!format!("{o:?}").contains("env-token"));

        // Flags beat the environment; a file beats a value at the same level.
        let dir = std::env::temp_dir().join(veer_testsupport::unique("veer-consul-opt"));
        std::fs::create_dir_all(&dir).unwrap();
        let tf = dir.join("token");
        std::fs::write(&tf, "  file-token\n").unwrap();
        let f = Flags {
            http_addr: Some("unix:///s.sock".into()),
            token: Some("flag-token".into()),
            ca_file: Some("/flag-ca.pem".into()),
            ..pid()
        };
        let env = lookup(&[
            ("CONSUL_HTTP_ADDR", "10.0.0.1:8500"),
            ("CONSUL_HTTP_TOKEN_FILE", tf.to_str().unwrap()),
            ("CONSUL_CACERT", "/ca.pem"),
        ]);
        let o = Options::from_lookup(&f, &env).unwrap();
        assert_eq!(o.addr, AgentAddr::Unix("/s.sock".into()));
        assert_eq!(o.token.as_deref(), Some("flag-token"));
        assert_eq!(o.ca_file, Some("/flag-ca.pem".into()));
        let o = Options::from_lookup(&pid(), &env).unwrap();
        assert_eq!(o.token.as_deref(), Some("file-token"));
        let f = Flags {
            token_file: Some(tf.clone()),
            token: Some("flag-token".into()),
            ..pid()
        };
        assert_eq!(
            Options::from_lookup(&f, lookup(&[]))
                .unwrap()
                .token
                .as_deref(),
            Some("file-token")
        );
        let f = Flags {
            token_file: Some(dir.join("missing")),
            ..pid()
        };
        assert_eq!(
            Options::from_lookup(&f, lookup(&[]))
                .unwrap_err()
                .classify(),
            "config"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn refusals() {
        let both = Flags {
            sidecar_for: Some("web".into()),
            ..pid()
        };
        assert!(Options::from_lookup(&both, lookup(&[])).is_err());
        assert!(Options::from_lookup(&Flags::default(), lookup(&[])).is_err());
        let sf = Flags {
            sidecar_for: Some("web".into()),
            ..Flags::default()
        };
        assert_eq!(
            Options::from_lookup(&sf, lookup(&[])).unwrap().target,
            ProxyTarget::SidecarFor("web".into())
        );
        for env in [
            vec![("CONSUL_HTTP_SSL_VERIFY", "false")],
            vec![("CONSUL_HTTP_SSL", "maybe")],
            vec![("CONSUL_CLIENT_CERT", "/c.pem")],
            vec![("CONSUL_HTTP_TOKEN", "a\nb")],
            vec![("CONSUL_HTTP_ADDR", "gopher://x")],
        ] {
            let e = Options::from_lookup(&pid(), lookup(&env)).unwrap_err();
            assert_eq!(e.classify(), "config", "{env:?}: {e}");
        }
    }
}
