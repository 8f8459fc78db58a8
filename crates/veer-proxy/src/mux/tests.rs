use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn veer_mux_env_values() {
    for (v, off) in [
        (None, false),
        (Some("1"), false),
        (Some("on"), false),
        (Some(""), false),
        (Some("0"), true),
        (Some(" off "), true),
        (Some("FALSE"), true),
        (Some("no"), true),
    ] {
        assert_eq!(env_says_off(v), off, "{v:?}");
    }
}

/// A client and a server MuxStream over an in-memory HTTP/2 connection with
/// veer's settings.
async fn pair() -> (MuxStream, MuxStream) {
    let (c, s) = tokio::io::duplex(256 * 1024);
    let server = tokio::spawn(async move {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME);
        let mut conn = b.handshake::<_, Bytes>(s).await.unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        let send = respond
            .send_response(Response::builder().status(200).body(()).unwrap(), false)
            .unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        MuxStream::new(send, req.into_body(), None)
    });
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_frame_size(MAX_FRAME);
    let (send, conn) = b.handshake::<_, Bytes>(c).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let client = match open(send, "10.0.0.1:80", Duration::from_secs(5)).await {
        Ok((s, r)) => MuxStream::new(s, r, None),
        Err(_) => panic!("open failed"),
    };
    (client, server.await.unwrap())
}

#[tokio::test]
async fn bytes_flow_both_ways_and_half_close_is_kept() {
    let (mut c, mut s) = pair().await;
    // More than one window's worth, so flow control must move.
    let big: Vec<u8> = (0..3 * STREAM_WINDOW as usize).map(|i| i as u8).collect();
    let want = big.clone();
    let writer = tokio::spawn(async move {
        c.write_all(&big).await.unwrap();
        c.shutdown().await.unwrap();
        // Still reads after its own half-close.
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        back
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert!(got == want, "byte-identical after {} bytes", got.len());
    s.write_all(b"after EOF").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(writer.await.unwrap(), b"after EOF");
}

#[tokio::test]
async fn a_reset_reaches_the_other_side_as_an_error() {
    let (mut c, mut s) = pair().await;
    c.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    c.reset();
    let mut rest = Vec::new();
    let e = s.read_to_end(&mut rest).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
}

#[test]
fn the_bulk_rule_marks_an_upstream_for_the_hold_and_renews() {
    let mux = Mux::default();
    let m = crate::metrics::Metrics::default();
    mux.set_bulk_rule(1000, Duration::from_millis(500));
    assert!(!mux.is_bulk("api", 0));
    // Under the threshold: nothing.
    mux.note_bulk(&m, "api", 999, 10);
    assert!(!mux.is_bulk("api", 10));
    // Past it: marked until 10 + 500, only that upstream; counted once.
    mux.note_bulk(&m, "api", 1000, 10);
    assert!(mux.is_bulk("api", 11));
    assert!(mux.is_bulk("api", 509));
    assert!(!mux.is_bulk("db", 11));
    mux.note_bulk(&m, "api", 5000, 400);
    assert!(mux.is_bulk("api", 899), "renewed at 400");
    assert_eq!(m.get("mux_bulk_switches_total", "api"), 1);
    // Expired: multiplexed again; the next bulk switches again.
    assert!(!mux.is_bulk("api", 900));
    assert!(!mux.any_bulk.load(Relaxed));
    mux.note_bulk(&m, "api", 1000, 1000);
    assert!(mux.is_bulk("api", 1001));
    assert_eq!(m.get("mux_bulk_switches_total", "api"), 2);
    // Off.
    mux.set_bulk_rule(u64::MAX, Duration::from_millis(500));
    mux.note_bulk(&m, "db", u64::MAX - 1, 1000);
    assert!(!mux.is_bulk("db", 1001));
}
