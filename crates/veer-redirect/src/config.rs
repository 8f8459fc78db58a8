//! Consul's traffic-redirection `Config` (`sdk/iptables`), its JSON form and
//! its validation.
//!
//! The JSON is what consul-k8s puts in `CONSUL_REDIRECT_TRAFFIC_CONFIG`: Go
//! field names (`ProxyUserID`, `ProxyInboundPort`, `ExcludeOutboundCIDRs`,
//! `NetNS`, ...) matched case-insensitively as Go's `encoding/json` does,
//! `null` meaning "not set", unknown keys (`IptablesProvider`) ignored.
use std::net::IpAddr;

use serde_json::Value;

use crate::Error;

/// Consul's `DefaultTProxyOutboundPort`.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// The redirection configuration (Consul's `iptables.Config` plus dual stack).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `ConsulDNSIP`: DNS redirection target address ("" = none; see [`crate::rules`]).
    pub consul_dns_ip: String,
    /// `ConsulDNSPort`: DNS redirection target port (0 = none).
    pub consul_dns_port: u16,
    /// `ProxyUserID` (required): UID (or user name) of the proxy; its traffic is not redirected.
    pub proxy_user_id: String,
    /// `ProxyInboundPort` (required): where inbound TCP is redirected.
    pub proxy_inbound_port: u16,
    /// `ProxyOutboundPort`: where outbound TCP is redirected; 0 means 15001.
    pub proxy_outbound_port: u16,
    /// `ExcludeInboundPorts`: ports or `LOW:HIGH` ranges not redirected inbound.
    pub exclude_inbound_ports: Vec<String>,
    /// `ExcludeOutboundPorts`: destination ports or ranges not redirected outbound.
    pub exclude_outbound_ports: Vec<String>,
    /// `ExcludeOutboundCIDRs`: destination addresses/CIDRs not redirected outbound.
    pub exclude_outbound_cidrs: Vec<String>,
    /// `ExcludeUIDs`: UIDs (or `LOW-HIGH` ranges, or user names) whose traffic is not redirected.
    pub exclude_uids: Vec<String>,
    /// `NetNS`: path of the network namespace to apply the rules in ("" = current).
    pub netns: String,
    /// Not in Consul's JSON: dual stack (IPv4 and IPv6), from `-ipv6` or
    /// `CONSUL_DUAL_STACK=true`, as consul-k8s' `Setup(cfg, dualStack)`.
    pub dual_stack: bool,
}

impl Config {
    /// The effective outbound port (0 means Consul's default 15001).
    pub fn outbound_port(&self) -> u16 {
        if self.proxy_outbound_port == 0 {
            DEFAULT_OUTBOUND_PORT
        } else {
            self.proxy_outbound_port
        }
    }

    /// Parses consul-k8s' JSON (`CONSUL_REDIRECT_TRAFFIC_CONFIG`).
    ///
    /// Exclusion lists also accept numbers (`[20200]`), which Go would reject.
    pub fn from_json(text: &str) -> Result<Config, Error> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| Error::EnvConfig(format!("not JSON: {e}")))?;
        let Value::Object(map) = v else {
            return Err(Error::EnvConfig("expected a JSON object".into()));
        };
        let mut c = Config::default();
        for (key, value) in &map {
            match key.to_ascii_lowercase().as_str() {
                "consuldnsip" => c.consul_dns_ip = json_string(key, value)?,
                "consuldnsport" => c.consul_dns_port = json_port(key, value)?,
                "proxyuserid" => c.proxy_user_id = json_string(key, value)?,
                "proxyinboundport" => c.proxy_inbound_port = json_port(key, value)?,
                "proxyoutboundport" => c.proxy_outbound_port = json_port(key, value)?,
                "excludeinboundports" => c.exclude_inbound_ports = json_list(key, value)?,
                "excludeoutboundports" => c.exclude_outbound_ports = json_list(key, value)?,
                "excludeoutboundcidrs" => c.exclude_outbound_cidrs = json_list(key, value)?,
                "excludeuids" => c.exclude_uids = json_list(key, value)?,
                "netns" => c.netns = json_string(key, value)?,
                _ => {} // IptablesProvider and anything newer: ignored, as Go does.
            }
        }
        Ok(c)
    }

    /// Checks the configuration: Consul's required fields and DNS address
    /// family rules (with Consul's error texts), and that every value is a
    /// well-formed port, range, address, CIDR or user so that it cannot change
    /// the meaning of the generated `iptables-restore` input.
    pub fn validate(&self) -> Result<(), Error> {
        if self.proxy_user_id.is_empty() {
            return Err(Error::Invalid(
                "ProxyUserID is required to set up traffic redirection".into(),
            ));
        }
        if self.proxy_inbound_port == 0 {
            return Err(Error::Invalid(
                "ProxyInboundPort is required to set up traffic redirection".into(),
            ));
        }
        check_user(&self.proxy_user_id, "ProxyUserID")?;
        for u in &self.exclude_uids {
            check_user(u, "ExcludeUIDs")?;
        }
        for p in &self.exclude_inbound_ports {
            check_port_spec(p, "ExcludeInboundPorts")?;
        }
        for p in &self.exclude_outbound_ports {
            check_port_spec(p, "ExcludeOutboundPorts")?;
        }
        for c in &self.exclude_outbound_cidrs {
            let ip = parse_cidr(c)?;
            if ip.is_ipv6() && !self.dual_stack {
                return Err(Error::Invalid(format!(
                    "ExcludeOutboundCIDRs: {c} is an IPv6 address but IPv6 redirection is off (use -ipv6)"
                )));
            }
        }
        if !self.consul_dns_ip.is_empty() {
            let ip: IpAddr = self
                .consul_dns_ip
                .parse()
                .map_err(|_| Error::Invalid("unable to parse consulDNSIP".into()))?;
            if self.dual_stack && ip.is_ipv4() {
                return Err(Error::Invalid(
                    "for dual stack ipv6 consulDNSIP required".into(),
                ));
            }
            if !self.dual_stack && ip.is_ipv6() {
                return Err(Error::Invalid(
                    "for non dual stack setup ipv4 consulDNSIP required".into(),
                ));
            }
        }
        Ok(())
    }
}

fn json_string(key: &str, v: &Value) -> Result<String, Error> {
    match v {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        other => Err(Error::EnvConfig(format!(
            "{key}: expected a string, got {other}"
        ))),
    }
}

fn json_port(key: &str, v: &Value) -> Result<u16, Error> {
    match v {
        Value::Null => Ok(0),
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| Error::EnvConfig(format!("{key}: {n} is not a port (0-65535)"))),
        other => Err(Error::EnvConfig(format!(
            "{key}: expected a number, got {other}"
        ))),
    }
}

fn json_list(key: &str, v: &Value) -> Result<Vec<String>, Error> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(Error::EnvConfig(format!(
                    "{key}: expected strings, got {other}"
                ))),
            })
            .collect(),
        other => Err(Error::EnvConfig(format!(
            "{key}: expected a list of strings, got {other}"
        ))),
    }
}

/// A port (`8080`) or an iptables range (`8000:9000`, low ≤ high).
pub fn check_port_spec(spec: &str, what: &str) -> Result<(), Error> {
    let bad = || {
        Error::Invalid(format!(
            "{what}: invalid port {spec:?}: want a number 1-65535 or a range LOW:HIGH"
        ))
    };
    let port = |s: &str| -> Option<u16> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|p| *p != 0)
    };
    match spec.split_once(':') {
        None => port(spec).map(|_| ()).ok_or_else(bad),
        Some((lo, hi)) => match (port(lo), port(hi)) {
            (Some(l), Some(h)) if l <= h => Ok(()),
            _ => Err(bad()),
        },
    }
}

/// A UID (`5995`), a UID range (`1000-2000`) or a user name (resolved by iptables).
pub fn check_user(u: &str, what: &str) -> Result<(), Error> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit());
    let ok = if digits(u) {
        u.parse::<u32>().is_ok()
    } else if let Some((lo, hi)) = u.split_once('-').filter(|(l, h)| digits(l) && digits(h)) {
        matches!((lo.parse::<u32>(), hi.parse::<u32>()), (Ok(l), Ok(h)) if l <= h)
    } else {
        // A user name, as iptables' owner match resolves it. Restricted to a
        // safe character set so it stays one token in the restore input.
        let mut bytes = u.bytes();
        matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
            && u.len() <= 32
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    };
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "{what}: invalid user {u:?}: want a UID, a range LOW-HIGH or a user name"
        )))
    }
}

/// Parses an address or CIDR (`10.0.0.0/8`, `192.168.1.1`, `fd00::/8`) and
/// returns its address.
pub fn parse_cidr(c: &str) -> Result<IpAddr, Error> {
    let bad = || {
        Error::Invalid(format!(
            "ExcludeOutboundCIDRs: invalid address or CIDR {c:?}"
        ))
    };
    let (addr, len) = match c.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (c, None),
    };
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    if let Some(l) = len {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match l.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => return Err(bad()),
        }
    }
    Ok(ip)
}

#[cfg(test)]
mod tests;
