//! `-proxy-id`: reads the proxy registration from the local Consul agent
//! (`GET /v1/agent/service/<id>`) and derives the redirection settings from it
//! as Consul's `redirect-traffic` does ([`derive`], a pure function).
//!
//! The HTTP client is a small blocking HTTP/1.1 client over `std::net` (or a
//! Unix socket for `unix://` addresses); `https://` / `CONSUL_HTTP_SSL=true`
//! are refused with a clear "not supported yet" error.
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::config::check_port_spec;
use crate::Error;

/// Where the agent's HTTP API is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    /// `host:port`
    Tcp(String),
    /// `unix:///path/to/socket`
    Unix(PathBuf),
}

/// Parses `CONSUL_HTTP_ADDR` / `-http-addr`: `host:port`, `http://host:port`,
/// `unix:///path`; a missing port means 8500.
pub fn parse_addr(s: &str) -> Result<AgentAddr, Error> {
    let s = s.trim().trim_end_matches('/');
    if s.starts_with("https://") {
        return Err(Error::Consul(format!(
            "HTTPS to the Consul agent ({s}) is not supported yet; use an http:// address"
        )));
    }
    if let Some(p) = s.strip_prefix("unix://") {
        return Ok(AgentAddr::Unix(PathBuf::from(p)));
    }
    let hp = s.strip_prefix("http://").unwrap_or(s);
    if hp.is_empty() || hp.contains('/') || hp.contains(char::is_whitespace) {
        return Err(Error::Consul(format!("invalid Consul HTTP address {s:?}")));
    }
    let has_port = match hp.rfind(']') {
        Some(i) => hp[i..].contains(':'),
        None => hp.contains(':'),
    };
    Ok(AgentAddr::Tcp(if has_port {
        hp.to_string()
    } else {
        format!("{hp}:8500")
    }))
}

/// A Consul agent HTTP client.
#[derive(Debug, Clone)]
pub struct Agent {
    pub addr: AgentAddr,
    /// Sent as `X-Consul-Token`.
    pub token: Option<String>,
    pub timeout: Duration,
}

impl Agent {
    pub fn new(addr: AgentAddr, token: Option<String>) -> Result<Agent, Error> {
        if let Some(t) = &token {
            if t.contains(['\r', '\n']) {
                return Err(Error::Consul(
                    "the Consul token contains a line break".into(),
                ));
            }
        }
        Ok(Agent {
            addr,
            token,
            timeout: Duration::from_secs(10),
        })
    }

    /// `GET path` → (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, Vec<u8>), Error> {
        let host = match &self.addr {
            AgentAddr::Tcp(hp) => hp.clone(),
            AgentAddr::Unix(_) => "localhost".into(),
        };
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: veer-redirect\r\nAccept: application/json\r\nConnection: close\r\n"
        );
        if let Some(t) = &self.token {
            req.push_str(&format!("X-Consul-Token: {t}\r\n"));
        }
        req.push_str("\r\n");
        let what = |e: std::io::Error| {
            Error::Consul(format!("GET {path} from the Consul agent at {host}: {e}"))
        };
        let mut raw = Vec::new();
        match &self.addr {
            AgentAddr::Tcp(hp) => {
                let addr = hp
                    .to_socket_addrs()
                    .map_err(what)?
                    .next()
                    .ok_or_else(|| what(std::io::Error::other("address did not resolve")))?;
                let mut s = TcpStream::connect_timeout(&addr, self.timeout).map_err(what)?;
                s.set_read_timeout(Some(self.timeout)).map_err(what)?;
                s.set_write_timeout(Some(self.timeout)).map_err(what)?;
                s.write_all(req.as_bytes()).map_err(what)?;
                s.read_to_end(&mut raw).map_err(what)?;
            }
            AgentAddr::Unix(p) => {
                let mut s = UnixStream::connect(p).map_err(what)?;
                s.set_read_timeout(Some(self.timeout)).map_err(what)?;
                s.write_all(req.as_bytes()).map_err(what)?;
                s.read_to_end(&mut raw).map_err(what)?;
            }
        }
        parse_response(&raw).map_err(|e| Error::Consul(format!("GET {path}: {e}")))
    }

    /// Reads `/v1/agent/service/<proxy_id>` (and `/v1/agent/checks` when the
    /// proxy exposes checks) and derives the settings.
    pub fn proxy_settings(&self, proxy_id: &str) -> Result<Derived, Error> {
        let path = format!("/v1/agent/service/{}", escape_path(proxy_id));
        let (status, body) = self.get(&path)?;
        if status != 200 {
            return Err(Error::Consul(format!(
                "failed to fetch proxy service from Consul Agent: GET {path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        let svc: Value = serde_json::from_slice(&body)
            .map_err(|e| Error::Consul(format!("GET {path}: invalid JSON: {e}")))?;
        let mut d = derive(proxy_id, &svc)?;
        if d.expose_checks {
            let (status, body) = self.get("/v1/agent/checks")?;
            if status != 200 {
                return Err(Error::Consul(format!(
                    "failed to get checks for the proxy's destination service: GET /v1/agent/checks: HTTP {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            let checks: Value = serde_json::from_slice(&body)
                .map_err(|e| Error::Consul(format!("GET /v1/agent/checks: invalid JSON: {e}")))?;
            d.exclude_inbound_ports
                .extend(exposed_check_ports(&checks, &d.destination_service_name));
        }
        Ok(d)
    }
}

fn escape_path(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// Splits a raw HTTP/1.1 response into status and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        if body.len() < n {
            return Err("truncated HTTP body".into());
        }
        body.truncate(n);
    }
    Ok((status, body))
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunked encoding")?;
        let size_txt = String::from_utf8_lossy(&b[..eol]);
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16).map_err(|_| "bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// What a proxy registration says about redirection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derived {
    /// `Service.Port`, or `Proxy.Config.bind_port` when non-zero.
    pub inbound_port: u16,
    /// `Proxy.TransparentProxy.OutboundListenerPort` when non-zero (absent in 1.8.7).
    pub outbound_port: Option<u16>,
    /// Ports of `envoy_prometheus_bind_addr`, `envoy_stats_bind_addr`, then
    /// every `Expose.Paths[].ListenerPort` (then exposed check ports, added by
    /// [`Agent::proxy_settings`]).
    pub exclude_inbound_ports: Vec<String>,
    /// `Proxy.DestinationServiceName`.
    pub destination_service_name: String,
    /// `Proxy.Expose.Checks`.
    pub expose_checks: bool,
}

/// Derives the redirection settings from a `/v1/agent/service/<id>` reply,
/// as Consul's `redirect-traffic -proxy-id` does (reference §1.7).
pub fn derive(proxy_id: &str, svc: &Value) -> Result<Derived, Error> {
    let proxy = match svc.get("Proxy") {
        Some(p @ Value::Object(_)) => p,
        _ => {
            return Err(Error::Consul(format!(
                "service {proxy_id} is not a proxy service"
            )))
        }
    };
    let mut d = Derived {
        inbound_port: port_value(svc.get("Port"))
            .map_err(|e| Error::Consul(format!("service {proxy_id}: Port: {e}")))?,
        ..Derived::default()
    };
    let config = proxy.get("Config").filter(|c| c.is_object());
    let conf = |k: &str| config.and_then(|c| c.get(k)).filter(|v| !v.is_null());
    let bind_port = port_value(conf("bind_port"))
        .map_err(|e| Error::Consul(format!("service {proxy_id}: Proxy.Config.bind_port: {e}")))?;
    if bind_port != 0 {
        d.inbound_port = bind_port;
    }
    let outbound = port_value(
        proxy
            .get("TransparentProxy")
            .and_then(|t| t.get("OutboundListenerPort")),
    )
    .map_err(|e| Error::Consul(format!("service {proxy_id}: OutboundListenerPort: {e}")))?;
    if outbound != 0 {
        d.outbound_port = Some(outbound);
    }
    for key in ["envoy_prometheus_bind_addr", "envoy_stats_bind_addr"] {
        if let Some(v) = conf(key) {
            let s = v.as_str().unwrap_or_default();
            if s.is_empty() {
                continue;
            }
            let port = split_host_port(s).ok_or_else(|| {
                Error::Consul(format!("failed parsing host and port from {key}: {s:?}"))
            })?;
            check_port_spec(port, key)?;
            d.exclude_inbound_ports.push(port.to_string());
        }
    }
    let expose = proxy.get("Expose");
    if let Some(Value::Array(paths)) = expose.and_then(|e| e.get("Paths")) {
        for p in paths {
            let port = port_value(p.get("ListenerPort")).map_err(|e| {
                Error::Consul(format!(
                    "service {proxy_id}: Expose.Paths[].ListenerPort: {e}"
                ))
            })?;
            d.exclude_inbound_ports.push(port.to_string());
        }
    }
    d.expose_checks = expose
        .and_then(|e| e.get("Checks"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    d.destination_service_name = proxy
        .get("DestinationServiceName")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(d)
}

/// `ExposedPort` of every agent check (`/v1/agent/checks` reply) whose
/// `ServiceName` is `service`, in check-ID order.
pub fn exposed_check_ports(checks: &Value, service: &str) -> Vec<String> {
    let Value::Object(map) = checks else {
        return Vec::new();
    };
    let mut ids: Vec<&String> = map.keys().collect();
    ids.sort();
    ids.into_iter()
        .filter_map(|id| {
            let c = &map[id];
            (c.get("ServiceName").and_then(Value::as_str) == Some(service))
                .then(|| port_value(c.get("ExposedPort")).ok())
                .flatten()
                .filter(|p| *p != 0)
                .map(|p| p.to_string())
        })
        .collect()
}

/// A port given as a JSON number or a numeric string (Consul decodes proxy
/// config "weakly"); absent/null/"" is 0.
fn port_value(v: Option<&Value>) -> Result<u16, String> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("{n} is not a port")),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(0),
        Some(Value::String(s)) => s
            .trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?} is not a port")),
        Some(other) => Err(format!("{other} is not a port")),
    }
}

/// Go's `net.SplitHostPort`, port part only: `0.0.0.0:9102`, `[::]:9102`.
fn split_host_port(s: &str) -> Option<&str> {
    let (host, port) = s.rsplit_once(':')?;
    if host.starts_with('[') != host.ends_with(']') {
        return None;
    }
    if !host.starts_with('[') && host.contains(':') {
        return None; // unbracketed IPv6: "too many colons"
    }
    Some(port)
}

#[cfg(test)]
mod tests;
