//! A keep-alive HTTP/1.1 test app (one thread per connection): every
//! request is answered `<name> <method> <path>` (the path as it arrived,
//! query included), so a test sees which instance a request reached and
//! what a route rewrote. Behaviours by path:
//! - containing `slow`: answered after 3 s;
//! - containing `flaky`: every other such request (the 1st, 3rd, …) gets
//!   a 503.
//!
//! The app records requests and the last `x-forwarded-client-cert` it saw.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What an app has seen.
#[derive(Clone, Default)]
pub struct HttpApp {
    /// Requests whose path contains `flaky`.
    pub flaky: Arc<AtomicUsize>,
    /// All requests.
    pub requests: Arc<AtomicUsize>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// The last `x-forwarded-client-cert` value (`None`: the last request
    /// had none).
    pub xfcc: Arc<Mutex<Option<String>>>,
}

impl HttpApp {
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    pub fn last_xfcc(&self) -> Option<String> {
        self.xfcc.lock().unwrap().clone()
    }
}

/// Starts the app on `addr` inside `ns` (or here when `None`).
pub fn spawn(ns: Option<&crate::netns::Netns>, addr: SocketAddr, name: &str) -> HttpApp {
    let app = HttpApp::default();
    let l = match ns {
        Some(ns) => ns.run(move || TcpListener::bind(addr).expect("app bind")),
        None => TcpListener::bind(addr).expect("app bind"),
    };
    let (a, name) = (app.clone(), name.to_string());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            a.connections.fetch_add(1, Ordering::SeqCst);
            let (a, name) = (a.clone(), name.clone());
            std::thread::spawn(move || serve(c, &name, &a));
        }
    });
    app
}

fn serve(c: TcpStream, name: &str, app: &HttpApp) {
    let Ok(mut w) = c.try_clone() else { return };
    let mut r = BufReader::new(c);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or("").to_string(),
            parts.next().unwrap_or("").to_string(),
        );
        let (mut len, mut xfcc) = (0usize, None);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" || h == "\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    len = v.trim().parse().unwrap_or(0);
                } else if k == "x-forwarded-client-cert" {
                    xfcc = Some(v.trim().to_string());
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        app.requests.fetch_add(1, Ordering::SeqCst);
        *app.xfcc.lock().unwrap() = xfcc;
        if path.contains("slow") {
            std::thread::sleep(Duration::from_secs(3));
        }
        let mut status = "200 OK";
        if path.contains("flaky") && app.flaky.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            status = "503 Service Unavailable";
        }
        let text = format!("{name} {method} {path}");
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
