//! The expose-path HTTP handling (`veer_admin::expose`, Consul's probe
//! overwrite) on arbitrary bytes from a client: what kubelet, a scanner or
//! an attacker on the pod network can send to a plain-HTTP expose listener.
//!
//! The input is written, whole, to one HTTP/1 connection served by
//! `expose::serve_connection` (the listeners' own request handling) with
//! the routes `/healthz` → 8080 and `/ready` → 8081; the write side is then
//! closed. The "local app" is an in-memory hyper server that answers 200
//! and records what it was sent. Time is tokio's paused clock, so the
//! 10 s header timeout and the 30 s request timeout cost nothing.
//!
//! Invariants:
//! - nothing panics, and the connection ends (within a minute of virtual
//!   time) once the client has closed its side;
//! - whatever veer writes back is HTTP/1.x responses (`HTTP/1.` first);
//! - the app only ever sees requests for exactly a configured path, on the
//!   port of that path, in origin form, without hop-by-hop headers
//!   (`Connection`, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//!   `Transfer-Encoding` as sent by the client, `Upgrade`) and with a `Host`.
#![no_main]

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &[(&str, u16)] = &[("/healthz", 8080), ("/ready", 8081)];

/// What the app saw: (port, problem) for every request that broke a rule.
type Seen = Arc<Mutex<Vec<String>>>;

fn check_app_request<B>(port: u16, req: &Request<B>) -> Option<String> {
    let path = req.uri().path();
    if !ROUTES.iter().any(|(p, n)| *p == path && *n == port) {
        return Some(format!("app port {port} got path {path:?}"));
    }
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return Some(format!("not origin form: {}", req.uri()));
    }
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        if req.headers().contains_key(h) {
            return Some(format!("hop-by-hop header {h} forwarded"));
        }
    }
    if !req.headers().contains_key("host") {
        return Some("no Host".into());
    }
    None
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

async fn one(input: Vec<u8>) -> (Vec<u8>, Vec<String>) {
    let seen: Seen = Arc::default();
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let routes: Vec<(String, u16)> = ROUTES.iter().map(|(p, n)| (p.to_string(), *n)).collect();
    let app_seen = seen.clone();
    let dial = move |port: u16| {
        let seen = app_seen.clone();
        async move {
            let (veer_side, app_side) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    if let Some(p) = check_app_request(port, &req) {
                        seen.lock().unwrap().push(p);
                    }
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(app_side), svc)
                    .await;
            });
            Ok::<_, std::io::Error>(veer_side)
        }
    };
    let served = tokio::spawn(veer_admin::expose::serve_connection(server, routes, dial));
    let mut out = Vec::new();
    let talk = async {
        // A peer that stops reading must not deadlock the write: the
        // response is read concurrently.
        let (mut r, mut w) = tokio::io::split(&mut client);
        let write = async {
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        };
        let read = async {
            let _ = r.read_to_end(&mut out).await;
        };
        tokio::join!(write, read);
    };
    tokio::time::timeout(Duration::from_secs(60), talk)
        .await
        .expect("the expose connection did not end after the client closed");
    let _ = tokio::time::timeout(Duration::from_secs(60), served)
        .await
        .expect("serve_connection did not return");
    let problems = seen.lock().unwrap().clone();
    (out, problems)
}

fuzz_target!(|data: &[u8]| {
    let (out, problems) = runtime().block_on(one(data.to_vec()));
    assert!(problems.is_empty(), "{problems:?}");
    if !out.is_empty() {
        assert!(
            out.starts_with(b"HTTP/1."),
            "not an HTTP response: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    }
});
