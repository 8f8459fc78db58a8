//! Keep-alive connections to cluster endpoints, shared by every outbound
//! HTTP connection of the process.
//!
//! Keyed by (SNI, endpoint address, HTTP/2): the SNI names the target
//! (service, subset, datacenter) whose identity the connection checked.
//! An HTTP/2 connection is shared by all requests at once; an HTTP/1.1
//! connection carries one request at a time and comes back to the pool
//! when its response has been read to the end. Closed connections are
//! dropped when next looked at; at most [`MAX_IDLE_H1`] idle HTTP/1.1
//! connections are kept per key.
use super::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};
use veer_core::addr::EndpointAddr;

/// Idle HTTP/1.1 connections kept per endpoint.
pub const MAX_IDLE_H1: usize = 32;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    sni: Arc<str>,
    addr: EndpointAddr,
    h2: bool,
}

impl Key {
    pub(crate) fn new(sni: &str, addr: EndpointAddr, h2: bool) -> Key {
        Key {
            sni: Arc::from(sni),
            addr,
            h2,
        }
    }
}

pub(crate) enum Sender {
    H1(http1::SendRequest<Body>),
    /// `true`: made for this request (not yet in the pool).
    H2(http2::SendRequest<Body>, bool),
}

enum Entry {
    H1(Vec<http1::SendRequest<Body>>),
    H2(http2::SendRequest<Body>),
}

/// The process's pooled upstream HTTP connections.
#[derive(Clone, Default)]
pub struct Pool {
    inner: Arc<Mutex<HashMap<Key, Entry>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} keys)", self.lock().len())
    }
}

impl Pool {
    pub fn new() -> Pool {
        Pool::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Idle HTTP/1.1 plus open HTTP/2 connections held (tests, `/stats`).
    pub fn held(&self) -> usize {
        self.lock()
            .values()
            .map(|e| match e {
                Entry::H1(v) => v.len(),
                Entry::H2(_) => 1,
            })
            .sum()
    }

    /// A usable pooled connection for `key`, if any.
    pub(crate) fn take(&self, key: &Key) -> Option<Sender> {
        let mut map = self.lock();
        let entry = map.get_mut(key)?;
        match entry {
            Entry::H2(s) => {
                if s.is_closed() {
                    map.remove(key);
                    return None;
                }
                Some(Sender::H2(s.clone(), false))
            }
            Entry::H1(v) => {
                while let Some(s) = v.pop() {
                    if s.is_ready() && !s.is_closed() {
                        return Some(Sender::H1(s));
                    }
                }
                None
            }
        }
    }

    /// Sends `req` on `sender`; the connection goes (back) to the pool:
    /// a new HTTP/2 one at once, an HTTP/1.1 one when the response is read.
    pub(crate) async fn send(
        &self,
        key: Key,
        sender: Sender,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match sender {
            Sender::H2(mut s, fresh) => {
                if fresh {
                    let mut map = self.lock();
                    let keep = match map.get(&key) {
                        Some(Entry::H2(old)) => old.is_closed(),
                        _ => true,
                    };
                    if keep {
                        map.insert(key, Entry::H2(s.clone()));
                    }
                }
                s.send_request(req).await
            }
            Sender::H1(mut s) => {
                let r = s.send_request(req).await;
                if r.is_ok() {
                    let pool = self.clone();
                    tokio::spawn(async move {
                        // Ready again once the response body has been read.
                        if s.ready().await.is_ok() {
                            pool.put_h1(key, s);
                        }
                    });
                }
                r
            }
        }
    }

    fn put_h1(&self, key: Key, s: http1::SendRequest<Body>) {
        let mut map = self.lock();
        match map.entry(key).or_insert_with(|| Entry::H1(Vec::new())) {
            Entry::H1(v) => {
                v.retain(|s| !s.is_closed());
                if v.len() < MAX_IDLE_H1 {
                    v.push(s);
                }
            }
            Entry::H2(_) => {}
        }
    }
}

/// The HTTP handshake on a new mTLS connection; its driver runs as a task
/// until the connection closes.
pub(crate) async fn handshake<I>(io: I, h2: bool) -> Result<Sender, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (s, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("HTTP/2 upstream connection ended: {e}");
            }
        });
        Ok(Sender::H2(s, true))
    } else {
        let (s, conn) = http1::handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("HTTP/1.1 upstream connection ended: {e}");
            }
        });
        Ok(Sender::H1(s))
    }
}
