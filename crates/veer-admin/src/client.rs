//! A minimal HTTP/1 client for the admin endpoint (`veer await-ready`).
use http_body_util::{BodyExt, Empty};
use hyper::header::HOST;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

/// Sends `method path` to `addr` and returns the status and the body, all
/// within `timeout`.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, String)> {
    request_with_headers(addr, method, path, timeout)
        .await
        .map(|(s, _, b)| (s, b))
}

/// Like [`request`], with the response headers.
pub async fn request_with_headers(
    addr: SocketAddr,
    method: Method,
    path: &str,
    timeout: Duration,
) -> io::Result<(u16, hyper::HeaderMap, String)> {
    let fut = async {
        let tcp = TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(io::Error::other)?;
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?
}

/// The `/ready` response header naming the service a veer serves.
pub const SERVICE_HEADER: &str = "veer-service";

/// Polls `GET /ready` on the admin endpoint `addr` every `interval` until
/// it answers 200 (returns how long that took) or `timeout` passes (returns
/// the last answer or error). With `service`, a 200 counts only when the
/// `veer-service` header names that service.
pub fn await_ready(
    addr: SocketAddr,
    service: Option<&str>,
    timeout: Duration,
    interval: Duration,
) -> Result<Duration, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let per_try = left.clamp(Duration::from_millis(1), Duration::from_secs(1));
            let last = match request_with_headers(addr, Method::GET, "/ready", per_try).await {
                Ok((200, h, body)) => {
                    let got = h.get(SERVICE_HEADER).and_then(|v| v.to_str().ok());
                    match service {
                        None => return Ok(start.elapsed()),
                        Some(want) if got == Some(want) => return Ok(start.elapsed()),
                        Some(want) => format!(
                            "200 {} from a sidecar of {:?}, not of {want:?}",
                            body.trim(),
                            got.unwrap_or("(unnamed)")
                        ),
                    }
                }
                Ok((code, _, body)) => format!("{code} {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() + interval > deadline {
                return Err(format!(
                    "not ready after {timeout:?}: http://{addr}/ready: {last}"
                ));
            }
            tokio::time::sleep(interval).await;
        }
    })
}
