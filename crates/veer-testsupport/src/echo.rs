//! A scriptable TCP test app. The first byte of each connection picks the
//! behaviour, so one local app serves every test:
//! - `E`: echo everything back; on EOF shut down writing (FIN client→server,
//!   then server→client).
//! - `B`: send `BANNER\n`, shut down writing at once, then read to EOF and
//!   record how many bytes arrived (FIN server→client first).
//! - `S`: read to EOF, then answer `<bytes> <checksum>\n` ([`Checksum`]; bulk transfers).
//! - `H`: hold: read to EOF without answering.
//! - `G` (an HTTP `GET`): answer `HTTP/1.1 200` with body `hello from <name>`.
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The checksum `S` mode answers with: order-sensitive, over 8-byte
/// little-endian words, independent of how the stream was chunked.
#[derive(Default)]
pub struct Checksum {
    sum: u64,
    carry: Vec<u8>,
}

impl Checksum {
    fn word(&mut self, v: u64) {
        self.sum = self
            .sum
            .rotate_left(5)
            .wrapping_add(v)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    pub fn update(&mut self, mut data: &[u8]) {
        if !self.carry.is_empty() {
            let take = (8 - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < 8 {
                return;
            }
            let v = u64::from_le_bytes(self.carry[..].try_into().unwrap());
            self.carry.clear();
            self.word(v);
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().unwrap()));
        }
        self.carry.extend_from_slice(words.remainder());
    }
    pub fn finish(mut self) -> u64 {
        for b in std::mem::take(&mut self.carry) {
            self.word(b as u64);
        }
        self.sum
    }
}

/// A deterministic byte stream for bulk tests (xorshift64, 8 bytes a step).
pub struct Stream(u64);
impl Stream {
    pub fn new() -> Stream {
        Stream(0x9e37_79b9_7f4a_7c15)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            w.copy_from_slice(&self.0.to_le_bytes()[..w.len()]);
        }
    }
}
impl Default for Stream {
    fn default() -> Self {
        Stream::new()
    }
}

/// A running app; it stops when its namespace goes away.
#[derive(Clone)]
pub struct App {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Bytes received by `B` connections, in order.
    pub banner_received: Arc<Mutex<Vec<usize>>>,
}

impl App {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn serve(mut s: TcpStream, name: &str, app: &App) {
    let mut first = [0u8; 1];
    if s.read_exact(&mut first).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    match first[0] {
        b'E' => loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = s.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        },
        b'B' => {
            let _ = s.write_all(b"BANNER\n");
            let _ = s.shutdown(Shutdown::Write);
            let mut total = 0;
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
            }
            app.banner_received.lock().unwrap().push(total);
        }
        b'S' => {
            let (mut total, mut sum) = (0u64, Checksum::default());
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
                sum.update(&buf[..n]);
            }
            let _ = s.write_all(format!("{total} {}\n", sum.finish()).as_bytes());
        }
        b'H' => {
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }
        b'G' => {
            // Read the request head (up to a blank line), then answer.
            let mut head = vec![b'G'];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                match s.read(&mut buf[..1]) {
                    Ok(1) => head.push(buf[0]),
                    _ => break,
                }
            }
            let body = format!("hello from {name}\n");
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
        _ => {}
    }
}

/// Starts the app on `addr` inside `ns` (or here when `None`).
pub fn spawn_app(ns: Option<&crate::netns::Netns>, addr: SocketAddr, name: &str) -> App {
    let path = ns.map(|n| n.path());
    let (tx, rx) = std::sync::mpsc::channel();
    let name = name.to_string();
    std::thread::spawn(move || {
        if let Some(p) = path {
            crate::netns::enter(&p).expect("enter netns");
        }
        let l = TcpListener::bind(addr).expect("app bind");
        let app = App {
            addr: l.local_addr().unwrap(),
            accepted: Arc::new(AtomicUsize::new(0)),
            banner_received: Arc::new(Mutex::new(Vec::new())),
        };
        tx.send(app.clone()).unwrap();
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            app.accepted.fetch_add(1, Ordering::SeqCst);
            let app = app.clone();
            let name = name.clone();
            std::thread::spawn(move || serve(s, &name, &app));
        }
    });
    rx.recv().expect("app started")
}
