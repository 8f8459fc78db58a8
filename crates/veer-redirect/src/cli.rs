//! Flags of `veer redirect-traffic` (Consul's `connect redirect-traffic` flags
//! plus `-ipv6`, `-iptables-backend`, `-dry-run`, `-cleanup`), parsed by hand
//! like Go's `flag` package: `-flag value`, `-flag=value`, `--flag` forms;
//! boolean flags take no value (`-ipv6=false` allowed); `--` ends the flags.
//!
//! Configuration sources ([`build_config`]), lowest to highest precedence:
//! 1. `CONSUL_REDIRECT_TRAFFIC_CONFIG` JSON (consul-k8s), and
//!    `CONSUL_DUAL_STACK=true` for dual stack;
//! 2. the proxy registration when `-proxy-id` is given (inbound port, outbound
//!    port, inbound exclusions appended), as consul-k8s' connect-init does;
//! 3. flags: single-valued flags (`-proxy-uid`, `-proxy-inbound-port`,
//!    `-proxy-outbound-port`, `-consul-dns-ip`, `-consul-dns-port`, `-netns`)
//!    override; repeatable exclusion flags are appended to the lists; `-ipv6`
//!    turns dual stack on.
use std::ffi::OsString;

use crate::config::Config;
use crate::consul;
use crate::exec::{Backend, BackendChoice};
use crate::Error;

/// The parsed command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cli {
    pub help: bool,
    /// `cleanup` subcommand or `-cleanup`.
    pub cleanup: bool,
    pub dry_run: bool,
    /// `-ipv6`: also apply the IPv6 rule set (dual stack).
    pub ipv6: bool,
    pub proxy_uid: Option<String>,
    pub proxy_id: Option<String>,
    pub proxy_inbound_port: Option<u16>,
    pub proxy_outbound_port: Option<u16>,
    pub exclude_inbound_ports: Vec<String>,
    pub exclude_outbound_ports: Vec<String>,
    pub exclude_outbound_cidrs: Vec<String>,
    pub exclude_uids: Vec<String>,
    pub consul_dns_ip: Option<String>,
    pub consul_dns_port: Option<u16>,
    pub netns: Option<String>,
    pub backend: BackendChoice,
    pub http_addr: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<String>,
    pub node_name: Option<String>,
}

/// Help text for `-h` / `-help` / `--help`.
pub const HELP: &str = "\
Usage: veer redirect-traffic [options]
       veer redirect-traffic cleanup [-netns PATH] [-iptables-backend nft|legacy] [-ipv6]

  Installs Consul's transparent-proxy traffic redirection rules (nat table:
  CONSUL_PROXY_INBOUND, CONSUL_PROXY_IN_REDIRECT, CONSUL_PROXY_OUTPUT,
  CONSUL_PROXY_REDIRECT, CONSUL_DNS_REDIRECT) in one iptables-restore
  transaction per address family. Running it again replaces the rules
  (idempotent); a failure changes nothing (atomic). Needs root or NET_ADMIN.

  Configuration comes from CONSUL_REDIRECT_TRAFFIC_CONFIG (consul-k8s JSON) if
  set, then from the proxy registration (-proxy-id), then from flags:
  single-valued flags override, repeatable -exclude-* flags add.

Options (also accepted with two dashes, and as -flag=value):
  -proxy-uid UID              UID of the proxy; its traffic is not redirected (required)
  -proxy-id ID                read ports and exclusions from the proxy's registration
                              on the local Consul agent (GET /v1/agent/service/ID)
  -proxy-inbound-port PORT    inbound listener port (required unless -proxy-id)
  -proxy-outbound-port PORT   outbound listener port (default 15001)
  -exclude-inbound-port P     inbound port or LOW:HIGH range not redirected (repeatable)
  -exclude-outbound-port P    outbound port or LOW:HIGH range not redirected (repeatable)
  -exclude-outbound-cidr C    destination address/CIDR not redirected (repeatable)
  -exclude-uid UID            UID (or LOW-HIGH) whose traffic is not redirected (repeatable)
  -consul-dns-ip IP           redirect DNS (port 53) to this address
  -consul-dns-port PORT       redirect DNS sent to -consul-dns-ip (default 127.0.0.1) to this port
  -netns PATH                 apply inside this network namespace (via nsenter --net=PATH)
  -ipv6                       dual stack: also apply the IPv6 rules with ip6tables
                              (also enabled by CONSUL_DUAL_STACK=true)
  -iptables-backend B         nft, legacy or auto (default auto: the back end that
                              already has Consul's chains, else the system default)
  -dry-run                    print the iptables-restore input instead of applying it
  -cleanup                    remove Consul's chains and the rules jumping to them
  -http-addr ADDR             Consul agent address (default CONSUL_HTTP_ADDR or 127.0.0.1:8500)
  -token TOKEN                Consul ACL token (default CONSUL_HTTP_TOKEN)
  -token-file FILE            file holding the Consul ACL token (default CONSUL_HTTP_TOKEN_FILE)
  -h, -help                   show this help
";

enum Kind {
    Bool,
    Value,
}

fn flag_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "h" | "help" | "cleanup" | "dry-run" | "ipv6" => Kind::Bool,
        "proxy-uid"
        | "proxy-id"
        | "proxy-inbound-port"
        | "proxy-outbound-port"
        | "exclude-inbound-port"
        | "exclude-outbound-port"
        | "exclude-outbound-cidr"
        | "exclude-uid"
        | "consul-dns-ip"
        | "consul-dns-port"
        | "netns"
        | "iptables-backend"
        | "http-addr"
        | "token"
        | "token-file"
        | "node-name" => Kind::Value,
        _ => return None,
    })
}

fn parse_port(flag: &str, v: &str) -> Result<u16, Error> {
    v.parse::<u16>().map_err(|_| {
        Error::Usage(format!(
            "invalid value {v:?} for flag -{flag}: parse error (want a port 0-65535)"
        ))
    })
}

fn parse_backend(v: &str) -> Result<BackendChoice, Error> {
    if v == "auto" || v.is_empty() {
        return Ok(BackendChoice::Auto);
    }
    let msg = format!("invalid value {v:?} for flag -iptables-backend: want nft, legacy or auto");
    v.parse::<Backend>()
        .map(BackendChoice::Fixed)
        .map_err(|_| Error::Usage(msg))
}

fn parse_bool(flag: &str, v: &str) -> Result<bool, Error> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::Usage(format!(
            "invalid boolean value {v:?} for -{flag}: parse error"
        ))),
    }
}

/// Parses the arguments after `redirect-traffic`.
pub fn parse(args: &[OsString]) -> Result<Cli, Error> {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| Error::Usage(format!("argument {a:?} is not valid UTF-8")))
        })
        .collect::<Result<_, _>>()?;
    let mut cli = Cli::default();
    let mut i = 0;
    if args.first().map(String::as_str) == Some("cleanup") {
        cli.cleanup = true;
        i = 1;
    }
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            break;
        }
        let Some(body) = arg
            .strip_prefix("--")
            .or_else(|| arg.strip_prefix('-'))
            .filter(|b| !b.is_empty() && !b.starts_with('-'))
        else {
            return Err(Error::Usage(format!("unexpected argument: {arg}")));
        };
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let kind = flag_kind(name)
            .ok_or_else(|| Error::Usage(format!("flag provided but not defined: -{name}")))?;
        let value = match kind {
            Kind::Bool => {
                let on = match &inline {
                    Some(v) => parse_bool(name, v)?,
                    None => true,
                };
                match name {
                    "h" | "help" => cli.help = on,
                    "cleanup" => cli.cleanup = on,
                    "dry-run" => cli.dry_run = on,
                    "ipv6" => cli.ipv6 = on,
                    _ => unreachable!(),
                }
                continue;
            }
            Kind::Value => match inline {
                Some(v) => v,
                None => {
                    let v = args
                        .get(i)
                        .ok_or_else(|| Error::Usage(format!("flag needs an argument: -{name}")))?;
                    i += 1;
                    v.clone()
                }
            },
        };
        match name {
            "proxy-uid" => cli.proxy_uid = Some(value),
            "proxy-id" => cli.proxy_id = Some(value),
            "proxy-inbound-port" => cli.proxy_inbound_port = Some(parse_port(name, &value)?),
            "proxy-outbound-port" => cli.proxy_outbound_port = Some(parse_port(name, &value)?),
            "exclude-inbound-port" => cli.exclude_inbound_ports.push(value),
            "exclude-outbound-port" => cli.exclude_outbound_ports.push(value),
            "exclude-outbound-cidr" => cli.exclude_outbound_cidrs.push(value),
            "exclude-uid" => cli.exclude_uids.push(value),
            "consul-dns-ip" => cli.consul_dns_ip = Some(value),
            "consul-dns-port" => cli.consul_dns_port = Some(parse_port(name, &value)?),
            "netns" => cli.netns = Some(value),
            "iptables-backend" => cli.backend = parse_backend(&value)?,
            "http-addr" => cli.http_addr = Some(value),
            "token" => cli.token = Some(value),
            "token-file" => cli.token_file = Some(value),
            "node-name" => cli.node_name = Some(value),
            _ => unreachable!(),
        }
    }
    if i < args.len() {
        return Err(Error::Usage(format!("unexpected argument: {}", args[i])));
    }
    Ok(cli)
}

fn env_bool(v: Option<String>) -> bool {
    v.is_some_and(|v| matches!(v.trim(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

/// Merges the environment, the proxy registration (`-proxy-id`, fetched from
/// the agent) and the flags into one [`Config`]; see the module docs for the
/// precedence. For `cleanup` only `-netns`/`NetNS` and dual stack matter.
pub fn build_config(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error> {
    let from_env = env(crate::ENV_CONFIG).filter(|s| !s.trim().is_empty());
    let mut cfg = match &from_env {
        Some(json) => Config::from_json(json)?,
        None => Config::default(),
    };
    cfg.dual_stack = cli.ipv6 || env_bool(env(crate::ENV_DUAL_STACK));
    if let Some(ns) = &cli.netns {
        cfg.netns = ns.clone();
    }
    if cli.cleanup {
        return Ok(cfg);
    }
    // Without the JSON, report missing flags the way Consul's CLI does,
    // before talking to the agent.
    if from_env.is_none() {
        if cli.proxy_uid.is_none() {
            return Err(Error::Invalid("-proxy-uid is required".into()));
        }
        if cli.proxy_inbound_port.is_none() && cli.proxy_id.is_none() {
            return Err(Error::Invalid(
                "either -proxy-id or -proxy-inbound-port are required".into(),
            ));
        }
    }
    if let Some(id) = &cli.proxy_id {
        if cli.node_name.is_some() {
            return Err(Error::Usage(
                "-node-name (reading the proxy from the catalog) is not supported yet; use -proxy-id with the local agent".into(),
            ));
        }
        if cli.proxy_inbound_port.is_some()
            || cli
                .proxy_outbound_port
                .is_some_and(|p| p != crate::config::DEFAULT_OUTBOUND_PORT)
        {
            return Err(Error::Usage(
                "-proxy-inbound-port or -proxy-outbound-port cannot be provided together with -proxy-id; \
                 the proxy's inbound and outbound ports are read from its registration"
                    .into(),
            ));
        }
        let agent = agent(cli, env)?;
        let d = agent.proxy_settings(id)?;
        cfg.proxy_inbound_port = d.inbound_port;
        if let Some(p) = d.outbound_port {
            cfg.proxy_outbound_port = p;
        }
        cfg.exclude_inbound_ports.extend(d.exclude_inbound_ports);
    } else if cli.node_name.is_some() {
        return Err(Error::Usage("-node-name requires -proxy-id".into()));
    }
    if let Some(u) = &cli.proxy_uid {
        cfg.proxy_user_id = u.clone();
    }
    if let Some(p) = cli.proxy_inbound_port {
        cfg.proxy_inbound_port = p;
    }
    if let Some(p) = cli.proxy_outbound_port {
        cfg.proxy_outbound_port = p;
    }
    if let Some(ip) = &cli.consul_dns_ip {
        cfg.consul_dns_ip = ip.clone();
    }
    if let Some(p) = cli.consul_dns_port {
        cfg.consul_dns_port = p;
    }
    // Values given as flags are checked under the flag's name (the JSON
    // field names are for values from -cfg or the registration).
    for p in &cli.exclude_inbound_ports {
        crate::config::check_port_spec(p, "-exclude-inbound-port")?;
    }
    for p in &cli.exclude_outbound_ports {
        crate::config::check_port_spec(p, "-exclude-outbound-port")?;
    }
    for u in &cli.exclude_uids {
        crate::config::check_user(u, "-exclude-uid")?;
    }
    for c in &cli.exclude_outbound_cidrs {
        crate::config::parse_cidr(c).map_err(|_| {
            Error::Invalid(format!(
                "-exclude-outbound-cidr: invalid address or CIDR {c:?}"
            ))
        })?;
    }
    cfg.exclude_inbound_ports
        .extend(cli.exclude_inbound_ports.iter().cloned());
    cfg.exclude_outbound_ports
        .extend(cli.exclude_outbound_ports.iter().cloned());
    cfg.exclude_outbound_cidrs
        .extend(cli.exclude_outbound_cidrs.iter().cloned());
    cfg.exclude_uids.extend(cli.exclude_uids.iter().cloned());
    cfg.validate()?;
    Ok(cfg)
}

fn agent(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<consul::Agent, Error> {
    let addr = cli
        .http_addr
        .clone()
        .or_else(|| env("CONSUL_HTTP_ADDR").filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "127.0.0.1:8500".into());
    if env_bool(env("CONSUL_HTTP_SSL")) && !addr.starts_with("http://") {
        return Err(Error::Consul(
            "HTTPS to the Consul agent (CONSUL_HTTP_SSL=true) is not supported yet; use an http:// address".into(),
        ));
    }
    let token_file = cli
        .token_file
        .clone()
        .or_else(|| env("CONSUL_HTTP_TOKEN_FILE").filter(|s| !s.is_empty()));
    let token = match (&cli.token, token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(&f)
                .map_err(|e| Error::io(format!("reading token file {f}"), e))?
                .trim()
                .to_string(),
        ),
        (None, None) => env("CONSUL_HTTP_TOKEN"),
    }
    .filter(|t| !t.is_empty());
    consul::Agent::new(consul::parse_addr(&addr)?, token)
}

#[cfg(test)]
mod tests;
