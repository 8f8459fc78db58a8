//! Outbound HTTP: the app's requests to an http-like upstream, routed one
//! by one over pooled mTLS connections.
//!
//! [`serve`] runs on an outbound connection whose upstream has compiled
//! routes ([`veer_core::l7route::HttpTable`]). It speaks HTTP/1.1 or
//! HTTP/2 with prior knowledge (h2c, gRPC) to the app, whichever the app
//! opens with, and for each request:
//!
//! 1. routes it (the first matching route; none: 503 `no_route`),
//! 2. picks a cluster by the route's weights,
//! 3. takes the cluster's first target (in failover order) with an
//!    endpoint (none: 503 `no_healthy_upstream`) and its endpoints in
//!    round-robin order, failed ones last,
//! 4. sends it over a pooled keep-alive connection to that endpoint (or a
//!    new mTLS one, made by the [`Connector`] the proxy gives: HTTP/1.1 or
//!    HTTP/2 per the cluster's protocol, ALPN `http/1.1` or `h2`), with
//!    the route's prefix rewrite, within the route's timeout (504
//!    `timeout`), retried as the route's retry policy says (connect
//!    failure, reset, status codes; a request body is replayable when it
//!    is at most [`RETRY_BODY_LIMIT`] bytes).
//!
//! Local answers carry `x-veer-reason: <label>`; every request ends in one
//! [`Done`] given to [`Connector::done`] (metrics, access log). Responses,
//! trailers (gRPC status) and streaming bodies pass through as they come.
mod pool;
#[cfg(test)]
mod tests;

pub use pool::Pool;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use veer_core::addr::EndpointAddr;
use veer_core::l7::DEFAULT_REQUEST_TIMEOUT;
use veer_core::l7route::{mix64, CompiledRoute, HttpCluster, RequestHead};
use veer_core::route::Upstream;

/// The body type on both sides of the engine.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The largest request body kept to be sent again on a retry; a longer
/// (or unsized, streaming) body is sent once.
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// The header naming why veer answered a request itself.
pub const REASON_HEADER: &str = "x-veer-reason";

/// How long an endpoint that failed to connect is tried last.
const ENDPOINT_BACKOFF_MS: u64 = 10_000;

/// Why a connection to an endpoint failed, from the [`Connector`].
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// A bounded metric label (`refused`, `timeout`, `server_identity`, ...).
    pub label: &'static str,
    pub msg: String,
}

/// The application protocol offered in the TLS handshake to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Http11,
    H2,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::Http11 => b"http/1.1",
            Alpn::H2 => b"h2",
        }
    }
}

/// A boxed future (the [`Connector`]'s connect).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the proxy gives the engine for one downstream connection: mTLS to
/// an endpoint (with the upstream's identity checks), the clock of the
/// endpoint back-off, the current upstream, and where finished requests go.
pub trait Connector: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// mTLS to `ep`, one endpoint of `target`, offering `alpn`.
    fn connect<'a>(
        &'a self,
        target: &'a Upstream,
        ep: EndpointAddr,
        alpn: Alpn,
    ) -> BoxFuture<'a, Result<Self::Io, ConnectError>>;
    /// Milliseconds on the proxy's clock (endpoint back-off).
    fn now_ms(&self) -> u64;
    /// The upstream as the current snapshot has it (requests follow route
    /// changes on open connections); `None` = keep the one the connection
    /// was routed to.
    fn current(&self) -> Option<Arc<Upstream>>;
    /// One request is answered (or failed): metrics and the access log.
    fn done(&self, d: &Done<'_>);
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Done<'a> {
    pub method: &'a Method,
    /// Path and query as the app sent it.
    pub path: &'a str,
    pub authority: Option<&'a str>,
    /// The route that matched.
    pub route: Option<&'a str>,
    /// The cluster picked, with the target it went to.
    pub cluster: Option<&'a HttpCluster>,
    pub target: Option<&'a Upstream>,
    pub endpoint: Option<EndpointAddr>,
    /// The status sent to the app.
    pub status: u16,
    /// Set when veer answered itself (`no_route`, `no_healthy_upstream`,
    /// `connect_failure`, `upstream_reset`, `timeout`).
    pub reason: Option<&'static str>,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    /// Until the response head (or the local answer).
    pub duration: Duration,
    pub downstream_h2: bool,
}

/// Serves the app's HTTP on `io` (HTTP/1.1, or HTTP/2 with prior
/// knowledge) until the app closes it; `upstream` is the upstream the
/// connection was routed to (its `http` table is used unless
/// [`Connector::current`] gives a newer one).
pub async fn serve<C: Connector, I>(
    c: Arc<C>,
    pool: Arc<Pool>,
    io: I,
    upstream: Arc<Upstream>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let c = c.clone();
        let pool = pool.clone();
        let up = c
            .current()
            .filter(|u| u.http.is_some())
            .unwrap_or_else(|| upstream.clone());
        async move { Ok::<_, Infallible>(handle(&*c, &pool, up, req).await) }
    });
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1().keep_alive(true);
    b.http2()
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(Some(64));
    b.serve_connection(TokioIo::new(io), svc).await
}

static PICKS: AtomicU64 = AtomicU64::new(0);

/// A request head as the router sees it.
struct Head<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
}

impl RequestHead for Head<'_> {
    fn method(&self) -> &str {
        self.method.as_str()
    }
    fn path(&self) -> &str {
        self.uri.path()
    }
    fn query(&self) -> Option<&str> {
        self.uri.query()
    }
    fn header(&self, name: &str) -> Option<Cow<'_, str>> {
        match name {
            ":method" => return Some(Cow::Borrowed(self.method.as_str())),
            ":path" => {
                return Some(Cow::Borrowed(
                    self.uri.path_and_query().map_or("/", |p| p.as_str()),
                ))
            }
            ":authority" => return authority(self.uri, self.headers).map(Cow::Borrowed),
            ":scheme" => return Some(Cow::Borrowed(self.uri.scheme_str().unwrap_or("http"))),
            _ => {}
        }
        let mut it = self.headers.get_all(name).iter();
        let first = it.next()?;
        let mut v = String::from_utf8_lossy(first.as_bytes());
        for more in it {
            let s = v.to_mut();
            s.push(',');
            s.push_str(&String::from_utf8_lossy(more.as_bytes()));
        }
        Some(v)
    }
}

fn authority<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// A response veer makes itself.
pub fn local_reply(status: StatusCode, reason: &'static str, text: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|n| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(REASON_HEADER, HeaderValue::from_static(reason));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Why an attempt failed.
enum AttemptError {
    NoTarget,
    Connect(ConnectError),
    Reset(hyper::Error),
}

async fn handle<C: Connector>(
    c: &C,
    pool: &Pool,
    up: Arc<Upstream>,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let h2_down = req.version() == http::Version::HTTP_2;
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let auth = authority(&parts.uri, &parts.headers).map(str::to_string);
    let mut done = Done {
        method: &parts.method,
        path: &path,
        authority: auth.as_deref(),
        route: None,
        cluster: None,
        target: None,
        endpoint: None,
        status: 0,
        reason: None,
        attempts: 0,
        duration: Duration::ZERO,
        downstream_h2: h2_down,
    };
    let Some(table) = up.http.as_deref() else {
        // The connection was routed as L7 but the upstream has no table
        // now: nothing to route with.
        return finish(
            c,
            &mut done,
            started,
            local_reply(StatusCode::SERVICE_UNAVAILABLE, "no_route", "no route"),
        );
    };
    let head = Head {
        method: &parts.method,
        uri: &parts.uri,
        headers: &parts.headers,
    };
    let Some(route) = table.route(&head) else {
        return finish(
            c,
            &mut done,
            started,
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_route",
                "no route matches the request",
            ),
        );
    };
    done.route = Some(&route.name);
    let ci = route.pick(mix64(PICKS.fetch_add(1, Relaxed)));
    let cluster = &table.clusters[ci];
    done.cluster = Some(cluster);
    let timeout = match route.action.timeout {
        None => Some(DEFAULT_REQUEST_TIMEOUT),
        Some(Duration::ZERO) => None,
        Some(t) => Some(t),
    };
    let work = forward(c, pool, route, cluster, &parts, body, &mut done);
    let out = match timeout {
        None => work.await,
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => local_reply(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "upstream request timeout",
            ),
        },
    };
    if out.status() == StatusCode::GATEWAY_TIMEOUT && out.headers().contains_key(REASON_HEADER) {
        done.reason = Some("timeout");
    }
    finish(c, &mut done, started, out)
}

fn finish<C: Connector>(
    c: &C,
    done: &mut Done<'_>,
    started: Instant,
    r: Response<Body>,
) -> Response<Body> {
    done.status = r.status().as_u16();
    done.duration = started.elapsed();
    if done.reason.is_none() {
        done.reason = r
            .headers()
            .get(REASON_HEADER)
            .and_then(|v| reason_label(v.as_bytes()));
    }
    c.done(done);
    r
}

/// A local reply's reason as a static label.
fn reason_label(v: &[u8]) -> Option<&'static str> {
    [
        "no_route",
        "no_healthy_upstream",
        "connect_failure",
        "upstream_reset",
        "timeout",
    ]
    .into_iter()
    .find(|l| l.as_bytes() == v)
}

/// The request body, replayable when small enough and a retry may need it.
enum ReqBody {
    Once(Option<Incoming>),
    Replay(Bytes),
}

impl ReqBody {
    fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Once(b) => b.take().map(|b| b.boxed()),
            ReqBody::Replay(b) => Some(if b.is_empty() {
                Empty::new().map_err(|n| match n {}).boxed()
            } else {
                Full::new(b.clone()).map_err(|n| match n {}).boxed()
            }),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward<'a, C: Connector>(
    c: &C,
    pool: &Pool,
    route: &CompiledRoute,
    cluster: &'a HttpCluster,
    parts: &http::request::Parts,
    body: Incoming,
    done: &mut Done<'a>,
) -> Response<Body> {
    let retry = route.action.retry.as_ref();
    let mut body = match retry {
        Some(_) if body.is_end_stream() => ReqBody::Replay(Bytes::new()),
        Some(_)
            if body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= RETRY_BODY_LIMIT) =>
        {
            match body.collect().await {
                Ok(b) => ReqBody::Replay(b.to_bytes()),
                Err(_) => {
                    return local_reply(
                        StatusCode::BAD_REQUEST,
                        "downstream_reset",
                        "request body not received",
                    )
                }
            }
        }
        _ => ReqBody::Once(Some(body)),
    };
    let h2 = cluster.is_h2();
    let path = route
        .rewrite(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
        .map(Cow::Owned)
        .unwrap_or_else(|| Cow::Borrowed(parts.uri.path_and_query().map_or("/", |p| p.as_str())));
    let max_attempts = 1 + retry.map_or(0, |r| r.num_retries);
    let mut last: Option<Response<Body>> = None;
    for attempt in 1..=max_attempts {
        done.attempts = attempt;
        let Some(b) = body.take() else { break };
        let more = attempt < max_attempts && matches!(body, ReqBody::Replay(_));
        let req = match upstream_request(parts, &path, h2, b) {
            Ok(r) => r,
            Err(e) => return local_reply(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
        };
        match attempt_once(c, pool, cluster, req, done).await {
            Ok(resp) => {
                let code = resp.status().as_u16();
                if more && retry.is_some_and(|r| r.on_status_codes.contains(&code)) {
                    last = Some(resp.map(|b| b.boxed()));
                    continue;
                }
                return resp.map(|b| b.boxed());
            }
            Err(AttemptError::NoTarget) => {
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no_healthy_upstream",
                    &format!("no healthy upstream in cluster {}", cluster.name),
                )
            }
            Err(AttemptError::Connect(e)) => {
                if more && retry.is_some_and(|r| r.on_connect_failure) {
                    continue;
                }
                last = Some(local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connect_failure",
                    &format!("upstream connect error ({}): {}", e.label, e.msg),
                ));
                break;
            }
            Err(AttemptError::Reset(e)) => {
                if more && retry.is_some_and(|r| r.on_reset) {
                    continue;
                }
                last = Some(local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream_reset",
                    &format!("upstream reset before response: {e}"),
                ));
                break;
            }
        }
    }
    last.unwrap_or_else(|| {
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_reset",
            "no attempt could be made",
        )
    })
}

/// The request as sent to a cluster: the (rewritten) path; HTTP/2 with
/// `:authority` from the app's `Host`, HTTP/1.1 in origin form with a
/// `Host`; hop-by-hop headers dropped.
fn upstream_request(
    parts: &http::request::Parts,
    path: &str,
    h2: bool,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let auth = authority(&parts.uri, &parts.headers).unwrap_or("localhost");
    let uri = if h2 {
        Uri::builder()
            .scheme("http")
            .authority(auth)
            .path_and_query(path)
            .build()?
    } else {
        Uri::builder().path_and_query(path).build()?
    };
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        });
    let headers = b.headers_mut().expect("a fresh builder");
    *headers = parts.headers.clone();
    strip_hop_by_hop(headers);
    if h2 {
        headers.remove(header::HOST);
    } else if !headers.contains_key(header::HOST) {
        headers.insert(header::HOST, HeaderValue::from_str(auth)?);
    }
    b.body(body)
}

/// Removes connection-specific headers (RFC 9110 §7.6.1), keeping
/// `te: trailers` (gRPC needs it).
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        h.remove(n);
    }
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// One attempt: the cluster's current target, its endpoints in order until
/// one takes the request (a pooled connection or a new one).
async fn attempt_once<'a, C: Connector>(
    c: &C,
    pool: &Pool,
    cluster: &'a HttpCluster,
    req: Request<Body>,
    done: &mut Done<'a>,
) -> Result<Response<Incoming>, AttemptError> {
    let Some(target) = cluster.target.target() else {
        return Err(AttemptError::NoTarget);
    };
    done.target = Some(target);
    let h2 = cluster.is_h2();
    let now = c.now_ms();
    let mut last = None;
    for ep in target.pick_order(now) {
        let key = pool::Key::new(&target.sni, ep.addr, h2);
        let sender = match pool.take(&key) {
            Some(s) => s,
            None => {
                let alpn = if h2 { Alpn::H2 } else { Alpn::Http11 };
                match c.connect(target, ep.addr, alpn).await {
                    Ok(io) => {
                        target.mark_ok(ep);
                        match pool::handshake(io, h2).await {
                            Ok(s) => s,
                            Err(e) => {
                                last = Some(ConnectError {
                                    label: "http_handshake",
                                    msg: e.to_string(),
                                });
                                continue;
                            }
                        }
                    }
                    Err(e) => {
                        target.mark_failed(ep, c.now_ms() + ENDPOINT_BACKOFF_MS);
                        tracing::debug!(endpoint = %ep.addr, reason = e.label, "HTTP upstream endpoint failed: {}", e.msg);
                        last = Some(e);
                        continue;
                    }
                }
            }
        };
        done.endpoint = Some(ep.addr);
        return pool
            .send(key, sender, req)
            .await
            .map_err(AttemptError::Reset);
    }
    Err(AttemptError::Connect(last.unwrap_or(ConnectError {
        label: "no_endpoint",
        msg: "no endpoint".into(),
    })))
}
