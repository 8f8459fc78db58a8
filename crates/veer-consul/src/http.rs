//! A small async HTTP/1.1 client for the agent API: hyper 1 over plain TCP,
//! rustls (ring) or a Unix socket, with a keep-alive pool (one connection
//! per concurrent blocking query), the token in `X-Consul-Token`, and a
//! deadline per request.
use crate::options::{AgentAddr, Options};
use crate::Error;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};

/// How long establishing a connection (TCP + TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers larger than this are refused (a catalog of thousands of services
/// is well below).
const MAX_BODY: usize = 64 << 20;

/// One answer from the agent.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// `X-Consul-Index`, when present.
    pub index: Option<u64>,
    /// `X-Consul-ContentHash`, when present.
    pub hash: Option<String>,
    pub body: Bytes,
}

impl Response {
    /// The body as (lossy, shortened) text for error messages.
    pub fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.body);
        let s = s.trim();
        if s.len() > 300 {
            let mut end = 300;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &s[..end])
        } else {
            s.to_string()
        }
    }

    /// `Ok(self)` for 2xx; 403 → [`Error::PermissionDenied`], 404 →
    /// [`Error::NotFound`], others → [`Error::Status`].
    pub fn ok(self, path: &str) -> Result<Response, Error> {
        match self.status {
            200..=299 => Ok(self),
            403 => Err(Error::PermissionDenied {
                path: path.to_string(),
                body: self.text(),
            }),
            404 => Err(Error::NotFound {
                path: path.to_string(),
                body: self.text(),
            }),
            status => Err(Error::Status {
                path: path.to_string(),
                status,
                body: self.text(),
            }),
        }
    }
}

/// The agent client. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    /// `http://authority` or `https://authority` (the pool key and Host).
    base: String,
    token: Option<Arc<str>>,
    /// `ns=..&partition=..` to append, or empty.
    scope: String,
    addr: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

impl Client {
    /// Builds the client; loads TLS material now so that mistakes show at
    /// start. Needs a tokio runtime only when requests are made.
    pub fn new(opts: &Options) -> Result<Client, Error> {
        let (target, base) = match &opts.addr {
            AgentAddr::Unix(p) => (Target::Unix(p.clone()), "http://localhost".to_string()),
            AgentAddr::Tcp { https, host, port } => {
                let authority = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                if *https {
                    let name = opts.tls_server_name.clone().unwrap_or_else(|| host.clone());
                    let server_name = ServerName::try_from(name.clone())
                        .map_err(|e| Error::Tls(format!("server name {name:?}: {e}")))?;
                    (
                        Target::Tls {
                            host: host.clone(),
                            port: *port,
                            config: Arc::new(tls_config(opts)?),
                            server_name,
                        },
                        format!("https://{authority}"),
                    )
                } else {
                    (
                        Target::Tcp {
                            host: host.clone(),
                            port: *port,
                        },
                        format!("http://{authority}"),
                    )
                }
            }
        };
        let addr = opts.addr.to_string();
        let connector = Connector {
            target: Arc::new(target),
            addr: addr.clone().into(),
        };
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .timer(TokioTimer::new())
            .build(connector);
        let mut scope = Vec::new();
        if let Some(ns) = &opts.namespace {
            scope.push(format!("ns={}", escape(ns)));
        }
        if let Some(p) = &opts.partition {
            scope.push(format!("partition={}", escape(p)));
        }
        Ok(Client {
            inner,
            base,
            token: opts.token.as_deref().map(Arc::from),
            scope: scope.join("&"),
            addr,
        })
    }

    /// The agent address, for logs.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET path_and_query` (e.g. `/v1/agent/self`), answering within `deadline`.
    pub async fn get(&self, path_and_query: &str, deadline: Duration) -> Result<Response, Error> {
        self.request("GET", path_and_query, None, deadline).await
    }

    /// Sends one request; any status is returned as a [`Response`].
    pub async fn request(
        &self,
        method: &'static str,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        deadline: Duration,
    ) -> Result<Response, Error> {
        let mut pq = path_and_query.to_string();
        if !self.scope.is_empty() {
            pq.push(if pq.contains('?') { '&' } else { '?' });
            pq.push_str(&self.scope);
        }
        let path = strip_query(path_and_query).to_string();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("{}{pq}", self.base))
            .header("user-agent", concat!("veer/", env!("CARGO_PKG_VERSION")))
            .header("accept", "application/json");
        if let Some(t) = &self.token {
            req = req.header("x-consul-token", &**t);
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| {
                Error::Config(format!("{method} {path}: cannot build the request: {e}"))
            })?;
        let fut = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| self.map_err(method, &path, e))?;
            let status = resp.status().as_u16();
            let hdr = |k: &str| {
                resp.headers()
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .map(|s| s.trim().to_string())
            };
            let index = hdr("x-consul-index").and_then(|s| s.parse().ok());
            let hash = hdr("x-consul-contenthash").filter(|s| !s.is_empty());
            let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| Error::Transport {
                    method,
                    path: path.clone(),
                    msg: format!("reading the body: {e}"),
                })?
                .to_bytes();
            Ok(Response {
                status,
                index,
                hash,
                body,
            })
        };
        match tokio::time::timeout(deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                method,
                path,
                after: deadline,
            }),
        }
    }

    fn map_err(
        &self,
        method: &'static str,
        path: &str,
        e: hyper_util::client::legacy::Error,
    ) -> Error {
        if e.is_connect() {
            // The connector's io::Error is in the source chain.
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg = s.to_string();
                src = s.source();
            }
            return Error::Connect {
                addr: self.addr.clone(),
                msg,
            };
        }
        // Consul over its per-client connection limit accepts and at once
        // closes (a reset, as observed with 1.8.7): the connection ends
        // before any byte of the answer.
        let mut msg = e.to_string();
        let mut closed = false;
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            closed |= s
                .downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_incomplete_message());
            closed |= s.downcast_ref::<io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                )
            });
            src = s.source();
        }
        if closed {
            return Error::Closed {
                method,
                path: path.to_string(),
                msg,
            };
        }
        Error::Transport {
            method,
            path: path.to_string(),
            msg,
        }
    }
}

fn strip_query(pq: &str) -> &str {
    pq.split('?').next().unwrap_or(pq)
}

/// Percent-escapes one path segment or query value.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    veer_core::tls::load_certs(path).map_err(|e| Error::Tls(e.to_string()))
}

fn tls_config(opts: &Options) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let mut files: Vec<PathBuf> = opts.ca_file.iter().cloned().collect();
    if let Some(dir) = &opts.ca_path {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| Error::Tls(format!("CA path {}: {e}", dir.display())))?;
        let mut more: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        more.sort();
        files.extend(more);
    }
    for f in &files {
        for c in read_pem_certs(f)? {
            roots
                .add(c)
                .map_err(|e| Error::Tls(format!("{}: {e}", f.display())))?;
        }
    }
    if files.is_empty() {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(Error::Tls(
                "no CA for the https agent: set CONSUL_CACERT or -ca-file (no system roots found)"
                    .into(),
            ));
        }
    }
    let provider = veer_core::tls::crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&opts.client_cert, &opts.client_key) {
        (Some(c), Some(k)) => {
            let chain = read_pem_certs(c)?;
            let key: PrivateKeyDer<'static> =
                veer_core::tls::load_key(k).map_err(|e| Error::Tls(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Tls(format!("client certificate: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

enum Target {
    Tcp {
        host: String,
        port: u16,
    },
    Tls {
        host: String,
        port: u16,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    },
    Unix(PathBuf),
}

/// Connects every pooled connection to the one agent, whatever the URI.
#[derive(Clone)]
struct Connector {
    target: Arc<Target>,
    addr: Arc<str>,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let target = self.target.clone();
        let addr = self.addr.clone();
        Box::pin(async move {
            let fut = async {
                match &*target {
                    Target::Tcp { host, port } => {
                        let s = TcpStream::connect((host.as_str(), *port)).await?;
                        s.set_nodelay(true)?;
                        Ok(Stream::Tcp(TokioIo::new(s)))
                    }
                    Target::Tls {
                        host,
                        port,
                        config,
                        server_name,
                    } => {
                        let s = TcpStream::connect((host.as_str(), *port)).await?;
                        s.set_nodelay(true)?;
                        let tls = tokio_rustls::TlsConnector::from(config.clone())
                            .connect(server_name.clone(), s)
                            .await
                            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
                        Ok(Stream::Tls(Box::new(TokioIo::new(tls))))
                    }
                    Target::Unix(p) => {
                        Ok(Stream::Unix(TokioIo::new(UnixStream::connect(p).await?)))
                    }
                }
            };
            match tokio::time::timeout(CONNECT_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                )),
            }
        })
    }
}

/// A connection to the agent.
enum Stream {
    Tcp(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
    Unix(TokioIo<UnixStream>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes() {
        assert_eq!(escape("web-sidecar-proxy"), "web-sidecar-proxy");
        assert_eq!(escape("a b/c?d"), "a%20b%2Fc%3Fd");
    }

    #[test]
    fn status_mapping() {
        let r = |status| Response {
            status,
            index: None,
            hash: None,
            body: Bytes::from_static(b"Permission denied"),
        };
        assert!(r(200).ok("/p").is_ok());
        assert_eq!(r(403).ok("/p").unwrap_err().classify(), "permission_denied");
        assert_eq!(r(404).ok("/p").unwrap_err().classify(), "not_found");
        assert_eq!(r(400).ok("/p").unwrap_err().classify(), "http_4xx");
        assert_eq!(r(500).ok("/p").unwrap_err().classify(), "http_5xx");
    }

    #[tokio::test]
    async fn unreachable_agent_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let opts = Options::new(
            AgentAddr::Tcp {
                https: false,
                host: "127.0.0.1".into(),
                port,
            },
            crate::ProxyTarget::ProxyId("x".into()),
        );
        let c = Client::new(&opts).unwrap();
        let e = c
            .get("/v1/agent/self", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.classify(), "connect", "{e}");
        let opts = Options::new(
            AgentAddr::Unix("/nonexistent/veer-consul.sock".into()),
            crate::ProxyTarget::ProxyId("x".into()),
        );
        let e = Client::new(&opts)
            .unwrap()
            .get("/v1/agent/self", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.classify(), "connect", "{e}");
    }
}
