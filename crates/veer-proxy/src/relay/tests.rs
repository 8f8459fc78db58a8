//! Relay tests over real loopback sockets: client <-> [a | relay | b] <-> server.
use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Returns (client, server, a, b): `a` is the relay's accepted side of the
/// client, `b` the relay's dialled side of the server.
async fn wire() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l1.local_addr().unwrap()).await.unwrap();
    let (a, _) = l1.accept().await.unwrap();
    let b = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
    let (server, _) = l2.accept().await.unwrap();
    (client, server, a, b)
}

fn limits() -> Limits {
    Limits {
        idle: Duration::from_secs(30),
        half_close: Duration::from_secs(30),
    }
}

type Relay = fn(TcpStream, TcpStream, Limits) -> Pin<Box<dyn Future<Output = Outcome> + Send>>;

fn by_copy(a: TcpStream, b: TcpStream, l: Limits) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    Box::pin(copy(a, b, l, None, None))
}
fn by_splice(
    a: TcpStream,
    b: TcpStream,
    l: Limits,
) -> Pin<Box<dyn Future<Output = Outcome> + Send>> {
    Box::pin(splice(a, b, l, None, None))
}
const RELAYS: [(&str, Relay); 2] = [("copy", by_copy), ("splice", by_splice)];

#[tokio::test]
async fn half_close_each_direction_independently() {
    for (name, relay) in RELAYS {
        // Client finishes first; server keeps sending after seeing EOF.
        let (mut client, mut server, a, b) = wire().await;
        let r = tokio::spawn(relay(a, b, limits()));
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request", "{name}");
        server
            .write_all(b"response after client FIN")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after client FIN", "{name}");
        let o = r.await.unwrap();
        assert_eq!(o.reason, CloseReason::Complete, "{name}");
        assert_eq!((o.a_to_b, o.b_to_a), (7, 25), "{name}");
        assert_eq!(o.spliced, name == "splice");

        // Server finishes first; client keeps sending after seeing EOF.
        let (mut client, mut server, a, b) = wire().await;
        let r = tokio::spawn(relay(a, b, limits()));
        server.write_all(b"banner").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"banner", "{name}");
        client.write_all(b"still talking").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"still talking", "{name}");
        assert_eq!(r.await.unwrap().reason, CloseReason::Complete, "{name}");
    }
}

#[tokio::test]
async fn reset_is_propagated() {
    for (name, relay) in RELAYS {
        let (mut client, server, a, b) = wire().await;
        let r = tokio::spawn(relay(a, b, limits()));
        crate::net::reset_on_close(&server);
        drop(server);
        let mut buf = [0u8; 16];
        let e = client.read(&mut buf).await;
        assert!(
            matches!(&e, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{name}: client should see a reset, got {e:?}"
        );
        assert_eq!(
            r.await.unwrap().reason,
            CloseReason::ResetByUpstream,
            "{name}"
        );
    }
}

#[tokio::test]
async fn half_closed_connection_is_not_kept_forever() {
    for (name, relay) in RELAYS {
        let (mut client, _server, a, b) = wire().await;
        let l = Limits {
            idle: Duration::from_secs(30),
            half_close: Duration::from_millis(300),
        };
        let started = std::time::Instant::now();
        let r = tokio::spawn(relay(a, b, l));
        client.shutdown().await.unwrap(); // half-closed; the server never answers
        let o = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("closed by timer")
            .unwrap();
        assert_eq!(o.reason, CloseReason::HalfCloseTimeout, "{name}");
        assert!(started.elapsed() >= Duration::from_millis(300), "{name}");
    }
}

#[tokio::test]
async fn idle_connection_times_out_but_active_one_does_not() {
    for (name, relay) in RELAYS {
        let (mut client, mut server, a, b) = wire().await;
        let l = Limits {
            idle: Duration::from_millis(400),
            half_close: Duration::from_secs(30),
        };
        let r = tokio::spawn(relay(a, b, l));
        // Keep it busy for ~1.2 s, longer than the idle timeout.
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!r.is_finished(), "{name}: active connection must stay open");
        let o = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.reason, CloseReason::Idle, "{name}");
    }
}

#[tokio::test]
async fn revocation_closes() {
    for (name, _) in RELAYS {
        let (_client, _server, a, b) = wire().await;
        let n = Arc::new(Notify::new());
        let r = if name == "copy" {
            tokio::spawn(copy(a, b, limits(), Some(n.clone()), None))
        } else {
            tokio::spawn(splice(a, b, limits(), Some(n.clone()), None))
        };
        n.notify_one();
        let o = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.reason, CloseReason::Revoked, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_is_byte_identical() {
    for (name, relay) in RELAYS {
        let (mut client, mut server, a, b) = wire().await;
        let r = tokio::spawn(relay(a, b, limits()));
        const N: usize = 32 << 20;
        let writer = tokio::spawn(async move {
            let mut x: u32 = 1;
            let mut chunk = vec![0u8; 64 * 1024];
            let mut sent = 0;
            let mut sum: u64 = 0;
            while sent < N {
                for byte in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    *byte = x as u8;
                    sum = sum.wrapping_mul(31).wrapping_add(*byte as u64);
                }
                client.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            client.shutdown().await.unwrap();
            sum
        });
        let mut got = 0usize;
        let mut sum: u64 = 0;
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let n = server.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            for byte in &buf[..n] {
                sum = sum.wrapping_mul(31).wrapping_add(*byte as u64);
            }
            got += n;
        }
        server.shutdown().await.unwrap();
        assert_eq!(got, N, "{name}");
        assert_eq!(sum, writer.await.unwrap(), "{name}: content differs");
        let o = r.await.unwrap();
        assert_eq!(o.a_to_b, N as u64, "{name}");
    }
}
