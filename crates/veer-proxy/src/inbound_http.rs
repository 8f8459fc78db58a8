//! The inbound pipeline's L7 branch: after mTLS and the peer identity, a
//! connection to an http-like local service is served by
//! [`veer_http::inbound`], which authorizes each request on the current
//! snapshot. This module is the glue: the engine's [`Env`] (snapshot,
//! local-app dials, metrics, access log) on [`Shared`].
//!
//! Metrics: Envoy's `envoy_http_downstream_rq_xx` / `_rq_total` /
//! `_rq_time` for `public_listener`, and
//! `veer_inbound_http_requests_total{code_class, outcome}`
//! (outcome `allowed`, a denial reason, or a local-app failure),
//! `veer_http_denials_total{reason}` for 403s, and
//! `veer_inbound_http_errors_total{kind}` for connections hyper ended
//! (malformed requests, header limits and timeouts, HTTP/2 floods).
use crate::net;
use crate::state::Shared;
use std::io;
use std::sync::{Arc, Weak};
use tokio::sync::watch;
use veer_core::addr::EndpointAddr;
use veer_core::snapshot::Snapshot;
use veer_http::inbound::{AppClient, AppIo, BoxFuture, Env, RequestRecord};

/// The engine's view of the proxy. Holds the proxy weakly (the app client
/// lives in [`Shared`]).
struct ProxyEnv {
    snap: watch::Receiver<Arc<Snapshot>>,
    own_dials: net::OwnDials,
    shared: Weak<Shared>,
}

impl Env for ProxyEnv {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.borrow().clone()
    }

    fn dial_app(&self) -> BoxFuture<io::Result<Box<dyn AppIo>>> {
        let snap = self.snapshot();
        let own = self.own_dials.clone();
        let shared = self.shared.clone();
        Box::pin(async move {
            let envoy = shared.upgrade();
            let cluster = envoy
                .as_ref()
                .map(|s| s.metrics.envoy.inbound().cluster.clone());
            if let Some(c) = &cluster {
                c.attempt();
            }
            let t0 = std::time::Instant::now();
            let r = net::dial(
                EndpointAddr(snap.local_app),
                snap.timeouts.local_connect,
                &own,
                0,
            )
            .await;
            match r {
                Ok(d) => {
                    if let Some(c) = &cluster {
                        c.connect_ms.observe(t0.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(Box::new(d) as Box<dyn AppIo>)
                }
                Err(e) => {
                    if let Some(c) = &cluster {
                        c.failed(e.classify() == "timeout");
                    }
                    if let Some(s) = &envoy {
                        s.metrics
                            .count("local_app_connect_failures_total", "reason", e.classify());
                    }
                    Err(io::Error::other(e.to_string()))
                }
            }
        })
    }

    fn request_done(&self, r: &RequestRecord<'_>) {
        let class = match r.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        if let Some(s) = self.shared.upgrade() {
            s.metrics
                .envoy
                .inbound_http()
                .request(r.status, r.duration.as_secs_f64() * 1e3);
            s.metrics.count_labels(
                "inbound_http_requests_total",
                &[("code_class", class), ("outcome", r.outcome)],
            );
            if r.status == 403 {
                s.metrics.count("http_denials_total", "reason", r.outcome);
            }
        }
        tracing::info!(
            target: "veer::access",
            direction = "inbound",
            source = %r.source,
            method = %r.method,
            path = %r.path,
            protocol = ?r.version,
            status = r.status,
            outcome = r.outcome,
            duration_ms = r.duration.as_millis() as u64,
            "request"
        );
    }

    fn connection_event(&self, kind: &'static str, detail: &str) {
        if let Some(s) = self.shared.upgrade() {
            s.metrics.count("inbound_http_errors_total", "kind", kind);
            if kind != "closed_mid_request" {
                if let Some(suppressed) = s.may_warn() {
                    tracing::warn!(kind, suppressed, "inbound HTTP connection ended: {detail}");
                }
            }
        }
    }
}

/// The process's pooled clients to the local app, made on first use.
pub fn app_client(shared: &Arc<Shared>) -> Arc<AppClient> {
    shared
        .inbound_app
        .get_or_init(|| {
            AppClient::new(Arc::new(ProxyEnv {
                snap: shared.subscribe(),
                own_dials: shared.own_dials.clone(),
                shared: Arc::downgrade(shared),
            }))
        })
        .clone()
}

/// Serves one inbound connection at L7 until it ends.
pub async fn serve<IO>(shared: &Arc<Shared>, io: IO, down: veer_http::inbound::Downstream)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let limits = veer_http::inbound::Limits::default();
    veer_http::inbound::serve(io, down, app_client(shared), &limits).await;
}
