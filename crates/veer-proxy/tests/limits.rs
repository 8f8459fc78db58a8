//! The per-listener connection limit, in process: past `max_connections`
//! new connections are reset at once and counted, and the slot comes back
//! when a connection ends.
mod common;
use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veer_proxy::metrics::Direction;

/// Reads until the connection ends; true when it ends (reset or EOF)
/// within `within`.
async fn ends_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Connects and reports whether the connection was closed within `within`
/// (possibly before `connect` returned).
async fn refused(addr: std::net::SocketAddr, within: Duration) -> bool {
    match TcpStream::connect(addr).await {
        Err(_) => true,
        Ok(mut s) => ends_within(&mut s, within).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_resets_new_connections_at_once_and_is_counted() {
    let m = Material::new();
    let app = echo_app().await;
    let (shared, l) = m
        .start(
            app,
            "[limits]\nmax_connections = 3\n\n[timeouts]\nhandshake = \"30s\"\n",
        )
        .await;
    let opened = || {
        shared
            .metrics
            .d(Direction::Inbound)
            .opened
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Three silent peers hold the three slots (waiting in the handshake).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(l.inbound).await.unwrap());
    }
    assert!(eventually(5, || opened() == 3).await);

    // The fourth and fifth are reset at once, not left to a timeout.
    for n in 1..=2 {
        let t = Instant::now();
        assert!(
            refused(l.inbound, Duration::from_secs(2)).await,
            "#{n} not closed"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "#{n} took {:?}",
            t.elapsed()
        );
        assert_eq!(
            shared.metrics.get("connections_overflow_total", "inbound"),
            n
        );
    }
    assert_eq!(
        opened(),
        3,
        "overflowed connections never reach the pipeline"
    );
    let text = shared.metrics.render(&[]);
    assert!(
        text.contains("veer_connections_overflow_total{listener=\"inbound\"} 2"),
        "{text}"
    );

    // One peer leaves: its slot comes back and a real client is served.
    drop(held.pop());
    assert!(eventually(5, || shared.metrics.active() == 2).await);
    let tcp = TcpStream::connect(l.inbound).await.unwrap();
    let mut tls = m.web_connector().connect(server_name(), tcp).await.unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(
        shared.metrics.get("connections_overflow_total", "inbound"),
        2
    );

    // Full again: the limit follows the snapshot, so a reload can raise it.
    assert!(refused(l.inbound, Duration::from_secs(2)).await);
    assert_eq!(
        shared.metrics.get("connections_overflow_total", "inbound"),
        3
    );
    let path = m.dir.join("veer.toml");
    std::fs::write(
        &path,
        m.config(
            app,
            "[limits]\nmax_connections = 4\n\n[timeouts]\nhandshake = \"30s\"\n",
        ),
    )
    .unwrap();
    shared
        .apply(veer_core::config::load(&path).unwrap().spec)
        .unwrap();
    assert_eq!(shared.max_connections(), 4);
    let mut s = TcpStream::connect(l.inbound).await.unwrap();
    assert!(!ends_within(&mut s, Duration::from_millis(500)).await);
    assert_eq!(
        shared.metrics.get("connections_overflow_total", "inbound"),
        3
    );
    drop(tls);
    l.stop_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_counted() {
    let m = Material::new();
    let app = echo_app().await;
    let (shared, l) = m.start(app, "").await;
    // 200 peers that are not TLS at all, as fast as possible.
    for _ in 0..200 {
        let mut s = TcpStream::connect(l.inbound).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let _ = ends_within(&mut s, Duration::from_secs(5)).await;
    }
    assert!(
        eventually(5, || shared
            .metrics
            .get("inbound_handshake_failures_total", "not_tls")
            == 200)
        .await
    );
    l.stop_all();
}
