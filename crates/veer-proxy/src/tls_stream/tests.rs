//! The unbuffered TLS stream against tokio-rustls peers over loopback TCP:
//! bulk both ways through the real relay, half-close each way, TLS 1.2,
//! key updates, small reads, garbage after the handshake, a peer without a
//! certificate, and no buffers held while idle.
use super::*;
use crate::relay::{self, CloseReason, Limits};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use veer_ca::Ca;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

struct Pki {
    roots: Vec<CertificateDer<'static>>,
    api: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    web: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
}

fn pki() -> Pki {
    let ca = Ca::new_root(TD).unwrap();
    let leaf = |svc: &str| {
        let l = ca.service_leaf("dc1", svc).unwrap();
        (
            veer_core::tls::parse_certs(l.chain_pem.as_bytes(), svc).unwrap(),
            veer_core::tls::parse_key(l.key_pem.as_bytes(), svc).unwrap(),
        )
    };
    Pki {
        roots: veer_core::tls::parse_certs(ca.cert_pem.as_bytes(), "roots").unwrap(),
        api: leaf("api"),
        web: leaf("web"),
    }
}

impl Pki {
    fn server(&self) -> Arc<rustls::ServerConfig> {
        veer_core::tls::server_config(self.api.0.clone(), self.api.1.clone_key(), &self.roots)
            .unwrap()
    }
    fn client(&self) -> Arc<rustls::ClientConfig> {
        veer_core::tls::client_config(self.web.0.clone(), self.web.1.clone_key(), &self.roots)
            .unwrap()
    }
}

fn name() -> ServerName<'static> {
    ServerName::try_from("api.mesh").unwrap()
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed ^ (i >> 12) as u8)
        })
        .collect()
}

/// An echo app on loopback; returns its address.
async fn echo_app() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

const LIMITS: Limits = Limits {
    idle: Duration::from_secs(60),
    half_close: Duration::from_secs(60),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_relays_bulk_both_ways_then_half_closes() {
    let p = pki();
    let (c, s) = pair().await;
    let app = echo_app().await;
    let server = tokio::spawn({
        let cfg = p.server();
        async move {
            let mut tls = Box::new(ServerTls::new(
                s,
                UnbufferedServerConnection::new(cfg).unwrap(),
            ));
            tls.handshake().await.unwrap();
            let who = tls.conn().peer_certificates().unwrap()[0].clone();
            let app = TcpStream::connect(app).await.unwrap();
            (relay::copy(tls, app, LIMITS, None, None).await, who)
        }
    });
    let connector = tokio_rustls::TlsConnector::from(p.client());
    let tls = connector.connect(name(), c).await.unwrap();
    let (mut r, mut w) = tokio::io::split(tls);
    let data = pattern(8 << 20, 1);
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        // Odd-sized writes: records of every size cross the relay.
        for chunk in data.chunks(77_777) {
            w.write_all(chunk).await.unwrap();
        }
        // close_notify: the app sees EOF and its echo ends with EOF too.
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "echo differs");
    let (out, who) = server.await.unwrap();
    assert_eq!(out.reason, CloseReason::Complete);
    assert_eq!((out.a_to_b, out.b_to_a), (8 << 20, 8 << 20));
    assert_eq!(veer_core::tls::peer_identity(&who).unwrap().service, "web");
}

/// A TLS 1.2-only server (Envoy's upstream default is TLS 1.2) that sends
/// `n` bytes, half-closes, then counts what it receives until EOF.
async fn tls12_server(p: &Pki, s: TcpStream, n: usize) -> tokio::task::JoinHandle<Vec<u8>> {
    let cfg = rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_no_client_auth()
        .with_single_cert(p.api.0.clone(), p.api.1.clone_key())
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.unwrap();
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        tls.write_all(&pattern(n, 2)).await.unwrap();
        tls.shutdown().await.unwrap();
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        got
    })
}

#[tokio::test]
async fn client_over_tls12_sees_the_servers_close_and_still_sends() {
    let p = pki();
    let (c, s) = pair().await;
    let server = tls12_server(&p, s, 300_000).await;
    let mut tls = ClientTls::new(
        c,
        UnbufferedClientConnection::new(p.client(), name()).unwrap(),
    );
    tls.handshake().await.unwrap();
    // Small reads: most of each record is set aside, then handed out.
    let mut got = Vec::new();
    let mut small = [0u8; 10];
    loop {
        let n = tls.read(&mut small).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&small[..n]);
    }
    assert!(got == pattern(300_000, 2), "{} bytes, differing", got.len());
    // The server half-closed; our direction stays open.
    let data = pattern(1 << 20, 3);
    tls.write_all(&data).await.unwrap();
    tls.shutdown().await.unwrap();
    assert!(server.await.unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_from_the_peer_are_answered_mid_stream() {
    let p = pki();
    let (c, s) = pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(p.server());
    let server = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        for round in 0..4 {
            // Ask for a key update, then keep talking both ways.
            tls.get_mut().1.refresh_traffic_keys().unwrap();
            tls.write_all(&pattern(100_000, round)).await.unwrap();
            let mut want = 100_000;
            while want > 0 {
                let n = tls.read(&mut buf[..want.min(65536)]).await.unwrap();
                assert!(n > 0);
                want -= n;
                total += n;
            }
        }
        tls.shutdown().await.unwrap();
        total
    });
    let mut tls = ClientTls::new(
        c,
        UnbufferedClientConnection::new(p.client(), name()).unwrap(),
    );
    tls.handshake().await.unwrap();
    for round in 0..4u8 {
        let mut got = vec![0u8; 100_000];
        tls.read_exact(&mut got).await.unwrap();
        assert!(got == pattern(100_000, round), "round {round}");
        tls.write_all(&pattern(100_000, round)).await.unwrap();
        tls.flush().await.unwrap();
    }
    let mut rest = Vec::new();
    tls.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(server.await.unwrap(), 400_000);
}

#[tokio::test]
async fn an_idle_stream_holds_no_buffers() {
    let p = pki();
    let (c, s) = pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(p.server());
    let server = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.unwrap();
        tls.write_all(&pattern(100_000, 4)).await.unwrap();
        let mut buf = vec![0u8; 100_000];
        tls.read_exact(&mut buf).await.unwrap();
        tls // held open, quiet
    });
    let mut tls = ClientTls::new(
        c,
        UnbufferedClientConnection::new(p.client(), name()).unwrap(),
    );
    tls.handshake().await.unwrap();
    let mut got = vec![0u8; 100_000];
    tls.read_exact(&mut got).await.unwrap();
    tls.write_all(&got).await.unwrap();
    tls.flush().await.unwrap();
    let _server_side = server.await.unwrap();
    // Quiet now: a read waits, and waiting holds nothing.
    let mut one = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(100), tls.read(&mut one))
            .await
            .is_err()
    );
    assert_eq!(
        (tls.rx.capacity(), tls.tx.capacity(), tls.plain.capacity()),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn garbage_after_the_handshake_is_an_error_every_time() {
    let p = pki();
    let (c, s) = pair().await;
    let acceptor = tokio_rustls::TlsAcceptor::from(p.server());
    let server = tokio::spawn(async move {
        let mut tls = acceptor.accept(s).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        // Bytes that are not a TLS record, straight on the socket.
        tls.get_mut()
            .0
            .write_all(b"\x17\x03\x03\x00\x10garbage-garbage!")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let mut tls = ClientTls::new(
        c,
        UnbufferedClientConnection::new(p.client(), name()).unwrap(),
    );
    tls.handshake().await.unwrap();
    let mut five = [0u8; 5];
    tls.read_exact(&mut five).await.unwrap();
    assert_eq!(&five, b"hello");
    let mut buf = [0u8; 100];
    for _ in 0..2 {
        let e = tls.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            veer_core::tls::rustls_error(&e).is_some(),
            "a rustls error inside: {e}"
        );
    }
    assert!(tls.write_all(b"more").await.is_err());
    server.await.unwrap();
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_with_an_alert() {
    let p = pki();
    let (c, s) = pair().await;
    let server = tokio::spawn({
        let cfg = p.server();
        async move {
            let mut tls = ServerTls::new(s, UnbufferedServerConnection::new(cfg).unwrap());
            tls.handshake().await
        }
    });
    // A client that offers no certificate (and trusts anything).
    let cfg = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let client = async move {
        // TLS 1.3: the client finishes first and learns of the refusal
        // from the alert on its first read.
        let mut tls = connector.connect(name(), c).await?;
        let mut buf = [0u8; 1];
        tls.read(&mut buf).await
    };
    let e = client.await.unwrap_err();
    assert!(
        e.to_string().contains("CertificateRequired"),
        "the client heard the alert: {e}"
    );
    let e = server.await.unwrap().unwrap_err();
    assert_eq!(
        veer_core::tls::rustls_error(&e).map(veer_core::tls::classify_tls_error),
        Some("no_client_cert"),
        "{e}"
    );
}

#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        veer_core::tls::crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
