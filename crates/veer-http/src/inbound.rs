//! Inbound HTTP: requests from peers after mTLS, authorized one by one and
//! forwarded to the local app.
//!
//! [`serve`] runs HTTP/1.1 or HTTP/2 (by ALPN or the client preface) on one
//! decrypted peer connection. Every request reads the *current* snapshot,
//! so an intention change applies to the next request on an open
//! connection. A denied request gets Envoy's `403 RBAC: access denied` and
//! the connection keeps serving. Allowed requests go, with
//! `X-Forwarded-Client-Cert` as [`Xfcc`] says and hop-by-hop headers
//! removed, to the local app over pooled keep-alive connections
//! ([`AppClient`]): HTTP/1.1 for `http`, HTTP/2 (prior knowledge) for
//! `http2` and `grpc`.
//!
//! Hostile HTTP is bounded by hyper's limits ([`Limits`]): header read
//! timeout (slow headers), header count and size, HTTP/2 concurrent
//! streams, pending-accept and locally-errored reset streams (rapid reset).
//! hyper answers malformed requests (differing `Content-Length`s, an
//! invalid method or target) with 400 and oversized headers with 431, and
//! closes the connection. A request with both `Content-Length` and
//! `Transfer-Encoding` is read as chunked and the connection closed after
//! it (RFC 9112 §6.3), so nothing smuggled behind it is read; every body
//! forwarded to the app is framed anew.
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use veer_core::authz::Peer;
use veer_core::l7::Xfcc;
use veer_core::l7authz::{HttpDecision, RequestView};
use veer_core::route::Protocol;
use veer_core::snapshot::Snapshot;

/// The body type of everything this module sends.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A connection to the local app, as the proxy dials it.
pub trait AppIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> AppIo for T {}

/// A boxed future (the [`Env`] trait stays object-safe).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the proxy gives the engine: the current snapshot, a way to dial
/// the local app, and where requests are counted.
pub trait Env: Send + Sync + 'static {
    /// The current snapshot (read per request).
    fn snapshot(&self) -> Arc<Snapshot>;
    /// Dials the local app (timed out and registered as the proxy does).
    fn dial_app(&self) -> BoxFuture<io::Result<Box<dyn AppIo>>>;
    /// One request is done (or refused).
    fn request_done(&self, r: &RequestRecord<'_>);
    /// A connection-level event of the HTTP server: `protocol_error`
    /// (malformed request, header limits, slow headers, HTTP/2 flood/reset
    /// limits), counted by the proxy.
    fn connection_event(&self, kind: &'static str, detail: &str);
}

/// One request, for metrics and the access log.
#[derive(Debug)]
pub struct RequestRecord<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub version: http::Version,
    pub status: u16,
    /// `allowed` or an [`HttpDecision::classify`] denial label; for an
    /// allowed request that failed, the failure (`local_app_connect`,
    /// `local_app_timeout`, `local_app_reset`).
    pub outcome: &'static str,
    pub source: &'a Peer,
    /// Until the response headers.
    pub duration: Duration,
}

/// Limits on what peers may send (hyper's knobs).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time to receive a request's headers (slow-headers attacks).
    pub header_read_timeout: Duration,
    /// HTTP/1.1 read buffer: bounds the request line + headers.
    pub max_header_bytes: usize,
    /// HTTP/1.1 header count.
    pub max_headers: usize,
    /// HTTP/2 header list size (HPACK-decoded bytes).
    pub h2_max_header_list: u32,
    pub h2_max_concurrent_streams: u32,
    /// Streams reset by the client before being accepted (rapid reset,
    /// CVE-2023-44487) before the connection is closed with GOAWAY.
    pub h2_max_pending_accept_reset: usize,
    /// Streams veer had to reset for protocol errors before it closes the
    /// connection.
    pub h2_max_local_error_reset: usize,
}

impl Default for Limits {
    /// Envoy's defaults where it has them (60 KiB of headers, 100 headers,
    /// 100 concurrent streams on Consul's listeners).
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            h2_max_header_list: 60 * 1024,
            h2_max_concurrent_streams: 100,
            h2_max_pending_accept_reset: 20,
            h2_max_local_error_reset: 100,
        }
    }
}

/// One downstream (peer) connection's facts.
pub struct Downstream {
    pub source: Arc<Peer>,
    /// This hop's `X-Forwarded-Client-Cert` element ([`xfcc_element`]).
    pub xfcc: String,
}

/// The pooled keep-alive clients to the local app, one per protocol, made
/// on first use. Shared by all inbound connections.
pub struct AppClient {
    env: Arc<dyn Env>,
    h1: OnceLock<Client<AppConnector, Body>>,
    h2: OnceLock<Client<AppConnector, Body>>,
}

impl AppClient {
    pub fn new(env: Arc<dyn Env>) -> Arc<AppClient> {
        Arc::new(AppClient {
            env,
            h1: OnceLock::new(),
            h2: OnceLock::new(),
        })
    }

    fn client(&self, protocol: Protocol) -> &Client<AppConnector, Body> {
        let h2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc);
        let cell = if h2 { &self.h2 } else { &self.h1 };
        cell.get_or_init(|| {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64)
                .pool_timer(TokioTimer::new())
                .http2_only(h2);
            b.timer(TokioTimer::new());
            b.build(AppConnector {
                env: self.env.clone(),
            })
        })
    }
}

/// Dials the local app through the [`Env`], whatever the URI says.
#[derive(Clone)]
pub struct AppConnector {
    env: Arc<dyn Env>,
}

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<AppStream>;
    type Error = io::Error;
    type Future = BoxFuture<io::Result<TokioIo<AppStream>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let dial = self.env.dial_app();
        Box::pin(async move { Ok(TokioIo::new(AppStream(dial.await?))) })
    }
}

/// A connection to the local app.
pub struct AppStream(Box<dyn AppIo>);

impl Connection for AppStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for AppStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for AppStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// This hop's `X-Forwarded-Client-Cert` element, as Envoy writes it with
/// Consul's `set_current_client_cert_details` (`By`, `Hash`, `Subject`,
/// `URI`): `By` is our SPIFFE ID, `Hash` the hex SHA-256 of the peer's
/// leaf (DER), `Subject` quoted, `URI` the peer's URI SAN.
pub fn xfcc_element(by: &str, peer_leaf_der: &[u8], peer: &Peer) -> String {
    let hash = ring::digest::digest(&ring::digest::SHA256, peer_leaf_der);
    let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let subject = peer.subject.replace('\\', "\\\\").replace('"', "\\\"");
    let mut s = format!("By={by};Hash={hex};Subject=\"{subject}\"");
    if let Some(uri) = peer.uris.first() {
        s.push_str(";URI=");
        s.push_str(uri);
    }
    s
}

/// Serves HTTP/1.1 and HTTP/2 on one decrypted peer connection until it
/// ends.
pub async fn serve<IO>(io: IO, down: Downstream, app: Arc<AppClient>, limits: &Limits)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.h2_max_header_list)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset);
    let down = Arc::new(down);
    let env = app.env.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (down, app) = (down.clone(), app.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(req, &down, &app).await) }
    });
    if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
        let mut detail = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            src = s.source();
        }
        env.connection_event(classify_conn_error(&*e, &detail), &detail);
    }
}

/// A bounded label for why hyper ended a connection.
fn classify_conn_error(e: &(dyn std::error::Error + 'static), detail: &str) -> &'static str {
    match e.downcast_ref::<hyper::Error>() {
        // A peer that closes mid-request is not hostile.
        Some(h) if h.is_incomplete_message() || h.is_canceled() => "closed_mid_request",
        Some(h) if h.is_timeout() => "header_timeout",
        Some(h) if h.is_parse_too_large() => "headers_too_large",
        Some(h) if h.is_parse() => "bad_request",
        _ if detail.contains("http2") || detail.contains("GOAWAY") => "h2_protocol",
        _ => "protocol_error",
    }
}

/// A request as [`RequestView`] sees it.
struct View<'a> {
    method: &'a str,
    path: &'a str,
    authority: &'a str,
    headers: &'a HeaderMap,
}

impl RequestView for View<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn authority(&self) -> &str {
        self.authority
    }
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut it = self.headers.get_all(name).iter();
        let first = it.next()?.to_str().ok()?;
        match it.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut s = format!("{first},{}", second.to_str().ok()?);
                for v in it {
                    s.push(',');
                    s.push_str(v.to_str().ok()?);
                }
                Some(Cow::Owned(s))
            }
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers the `Connection` header names are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP.iter()) {
        h.remove(n);
    }
    // `TE: trailers` is end-to-end for gRPC; any other TE is not.
    if h.get(header::TE).is_some_and(|v| v != "trailers") {
        h.remove(header::TE);
    }
}

fn set_xfcc(h: &mut HeaderMap, mode: Xfcc, element: &str) {
    const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
    let joined = |prev: Option<String>| match prev {
        Some(p) if !p.is_empty() => format!("{p},{element}"),
        _ => element.to_string(),
    };
    match mode {
        Xfcc::Sanitize => {
            h.remove(&XFCC);
        }
        Xfcc::SanitizeSet => {
            if let Ok(v) = HeaderValue::from_str(element) {
                h.insert(XFCC, v);
            } else {
                h.remove(&XFCC);
            }
        }
        Xfcc::AppendForward => {
            let prev: Vec<String> = h
                .get_all(&XFCC)
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_string))
                .collect();
            let prev = (!prev.is_empty()).then(|| prev.join(","));
            match HeaderValue::from_str(&joined(prev)) {
                Ok(v) => {
                    h.insert(XFCC, v);
                }
                Err(_) => {
                    h.remove(&XFCC);
                }
            }
        }
    }
}

async fn handle(req: Request<Incoming>, down: &Downstream, app: &AppClient) -> Response<Body> {
    let started = Instant::now();
    let env = &app.env;
    let snap = env.snapshot();
    let (mut parts, body) = req.into_parts();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let version = parts.version;
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let record = |status: u16, outcome: &'static str| {
        env.request_done(&RequestRecord {
            method: &method,
            path: &path,
            version,
            status,
            outcome,
            source: &down.source,
            duration: started.elapsed(),
        })
    };
    // Authorization on the current snapshot. A snapshot that turned the
    // listener back to L4 still authorizes this connection's requests, by
    // the connection-level decision.
    let (allowed, label, why, protocol, xfcc, timeout) = match &snap.inbound_http {
        Some(l7) => {
            let view = View {
                method: &method,
                path: &path,
                authority: &authority,
                headers: &parts.headers,
            };
            let d: HttpDecision = l7.authz.evaluate(&down.source, &view);
            (
                d.allowed(),
                d.classify(),
                if d.allowed() {
                    String::new()
                } else {
                    l7.authz.explain(&d)
                },
                l7.spec.protocol,
                l7.spec.xfcc,
                l7.spec.request_timeout,
            )
        }
        None => {
            let d = snap.authz.evaluate(&down.source);
            (
                d.allowed(),
                d.classify(),
                snap.authz.explain(&d),
                Protocol::Http,
                Xfcc::Sanitize,
                None,
            )
        }
    };
    drop(snap);
    if !allowed {
        tracing::debug!(source = %down.source, method = %method, path = %path, reason = label, "request denied: {why}");
        record(403, label);
        return text(StatusCode::FORBIDDEN, "RBAC: access denied");
    }

    strip_hop_by_hop(&mut parts.headers);
    set_xfcc(&mut parts.headers, xfcc, &down.xfcc);
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let host = if authority.is_empty() {
        "local-app"
    } else {
        authority.as_str()
    };
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(host)
        .path_and_query(pq)
        .build()
    {
        Ok(u) => u,
        Err(_) => {
            record(400, "bad_authority");
            return text(StatusCode::BAD_REQUEST, "bad request authority");
        }
    };
    let h2 = matches!(protocol, Protocol::Http2 | Protocol::Grpc);
    parts.version = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let req = Request::from_parts(parts, body.boxed());
    let timeout = match timeout {
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
        None => Some(veer_core::l7::DEFAULT_REQUEST_TIMEOUT),
    };
    let call = app.client(protocol).request(req);
    let res = match timeout {
        Some(t) => match tokio::time::timeout(t, call).await {
            Ok(r) => r,
            Err(_) => {
                record(504, "local_app_timeout");
                return text(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
            }
        },
        None => call.await,
    };
    match res {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            record(parts.status.as_u16(), "allowed");
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            let outcome = if e.is_connect() {
                "local_app_connect"
            } else {
                "local_app_reset"
            };
            tracing::debug!(source = %down.source, method = %method, path = %path, "local app: {e}");
            record(503, outcome);
            let mut r = text(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers",
            );
            r.headers_mut()
                .insert("x-veer-reason", HeaderValue::from_static(outcome));
            r
        }
    }
}

#[cfg(test)]
mod tests;
