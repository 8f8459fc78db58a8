//! The small HTTP/1 server plumbing shared by the admin, Prometheus and
//! expose listeners: an accept loop with a connection cap, header-read
//! timeouts, and graceful shutdown that lets in-flight responses finish.
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|n| match n {}).boxed()
}

pub(crate) fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

/// Counts the connections a server has open, to wait for them at shutdown.
#[derive(Clone, Default)]
pub(crate) struct Tracker(Arc<()>);

impl Tracker {
    fn token(&self) -> Arc<()> {
        self.0.clone()
    }
    /// Resolves when no connection is open.
    pub(crate) async fn idle(&self) {
        while Arc::strong_count(&self.0) > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The HTTP/1 server settings every listener here uses.
pub(crate) fn server_builder() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    b
}

/// Serves HTTP/1 on `listener` with `handler` until `stop`; then open
/// connections finish their in-flight request and close.
pub(crate) async fn serve<H, F>(
    listener: TcpListener,
    what: &'static str,
    handler: H,
    stop: watch::Receiver<bool>,
    tracker: Tracker,
    max_conns: usize,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_conns));
    let mut stop_accept = stop.clone();
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        tracing::warn!(listener = what, error = %e, "accept failed");
                        last_warn = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop_accept) => break,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::debug!(listener = what, %peer, "too many connections; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let token = tracker.token();
        let mut stop = stop.clone();
        let h = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let f = h(req, peer);
                async move { Ok::<_, Infallible>(f.await) }
            });
            let conn = server_builder().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(listener = what, %peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
            drop(token);
        });
    }
}
