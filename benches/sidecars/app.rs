//! The benchmark's local app: a minimal HTTP/1.1 server on one thread (the
//! role nginx with one worker plays), run as a child process
//! (`<bench exe> __app <addr>`) inside the server namespace.
//!
//! Every request gets the same small answer (`RESPONSE`, 13-byte body).
//! Keep-alive by default; a request with `Connection: close` is answered
//! with `Connection: close` and the app closes first, as nginx does.
use std::io::Write;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub const BODY: &str = "Hello, world\n";

fn response(close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nServer: veer-bench\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{BODY}",
        BODY.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// Position just past the first `\r\n\r\n` in `buf`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fn wants_close(head: &[u8]) -> bool {
    let needle = b"connection: close";
    head.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

async fn serve(mut s: TcpStream, keep: &[u8], close: &[u8]) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut out = Vec::with_capacity(1024);
    loop {
        let n = match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Answer every complete request (pipelining works too).
        let mut done = 0;
        let mut closing = false;
        while let Some(end) = head_end(&buf[done..]) {
            let head = &buf[done..done + end];
            closing = wants_close(head);
            out.extend_from_slice(if closing { close } else { keep });
            done += end;
            if closing {
                break;
            }
        }
        buf.drain(..done);
        if !out.is_empty() {
            if s.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if closing {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// `__app <addr>`: serve forever on one thread; prints `listening` once bound.
pub fn main(addr: &str) {
    let addr: SocketAddr = addr.parse().expect("app address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_reuseaddr(true).expect("reuseaddr");
        sock.bind(addr).expect("app bind");
        let listener = sock.listen(16384).expect("listen");
        println!("listening");
        let _ = std::io::stdout().flush();
        let keep: &'static [u8] = response(false).leak();
        let close: &'static [u8] = response(true).leak();
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve(s, keep, close));
                }
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    });
}
