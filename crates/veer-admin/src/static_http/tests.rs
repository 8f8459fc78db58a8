use super::*;
use std::io::{Read, Write};

fn exact(p: &str) -> PathMatch {
    PathMatch::Exact(p.into())
}
fn prefix(p: &str) -> PathMatch {
    PathMatch::Prefix(p.into())
}

#[test]
fn rewrite_table() {
    for (m, rw, input, want) in [
        (
            exact("/metrics"),
            Some("/stats/prometheus"),
            "/metrics",
            "/stats/prometheus",
        ),
        // consul-dataplane's custom scrape path with a query.
        (
            exact("/metrics"),
            Some("/stats/prometheus"),
            "/metrics?usedonly",
            "/stats/prometheus?usedonly",
        ),
        (exact("/ready"), Some("/ready"), "/ready", "/ready"),
        (prefix("/a/"), Some("/b/"), "/a/x/y?q=1", "/b/x/y?q=1"),
        (prefix("/a"), Some(""), "/a", "/"),
        (prefix("/"), None, "/anything?x", "/anything?x"),
    ] {
        assert_eq!(rewrite(&m, rw, input), want, "{m:?} {rw:?} {input}");
    }
}

#[test]
fn first_matching_route_wins() {
    let routes = vec![
        Route {
            path: exact("/ready"),
            action: Action::Direct {
                status: 200,
                body: "a".into(),
            },
        },
        Route {
            path: prefix("/"),
            action: Action::Direct {
                status: 404,
                body: "b".into(),
            },
        },
    ];
    assert_eq!(find(&routes, "/ready").unwrap().path, exact("/ready"));
    assert_eq!(find(&routes, "/ready/x").unwrap().path, prefix("/"));
    assert!(find(&routes[..1], "/other").is_none());
}

/// A one-shot HTTP backend that answers each request with its request line.
fn backend() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        for s in l.incoming().take(2) {
            let mut s = s.unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let line = String::from_utf8_lossy(&got)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let body = format!("backend saw: {line}");
            write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (addr, t)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(crate::client::request(
        addr,
        hyper::Method::GET,
        path,
        Duration::from_secs(5),
    ))
    .unwrap()
}

/// The Prometheus listener of consul-dataplane's bootstrap: the scrape path
/// forwards to the merge backend with `prefix_rewrite`, everything else is
/// a direct 404; over real sockets.
#[test]
fn serves_forward_with_rewrite_and_direct_response() {
    let (be, t) = backend();
    let routes = vec![
        Route {
            path: exact("/metrics"),
            action: Action::Forward {
                addr: be,
                prefix_rewrite: Some("/stats/prometheus".into()),
            },
        },
        Route {
            path: prefix("/"),
            action: Action::Direct {
                status: 404,
                body: String::new(),
            },
        },
    ];
    let sl = StaticListeners::start(
        vec![ListenerSpec {
            name: "envoy_prometheus_metrics_listener".into(),
            addr: "127.0.0.1:0".parse().unwrap(),
            routes,
        }],
        Duration::from_secs(1),
    )
    .unwrap();
    let addr = sl.bound[0].1;
    assert_eq!(sl.bound[0].0, "envoy_prometheus_metrics_listener");
    let (status, body) = get(addr, "/metrics?usedonly");
    assert_eq!(status, 200);
    assert_eq!(body, "backend saw: GET /stats/prometheus?usedonly HTTP/1.1");
    assert_eq!(get(addr, "/other").0, 404);
    // A second forward reaches the backend again (it then exits).
    assert_eq!(
        get(addr, "/metrics").1,
        "backend saw: GET /stats/prometheus HTTP/1.1"
    );
    t.join().unwrap();
    // The backend is gone: 503 with the reason, not a hang.
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 503);
    assert!(body.contains("upstream connect error"), "{body}");
    sl.stop();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening after stop"
    );
}

#[test]
fn a_taken_address_is_an_error_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = StaticListeners::start(
        vec![ListenerSpec {
            name: "envoy_ready_listener".into(),
            addr: taken.local_addr().unwrap(),
            routes: vec![],
        }],
        Duration::from_secs(1),
    )
    .err()
    .expect("bind succeeded on a taken address");
    assert!(e.to_string().contains("envoy_ready_listener"), "{e}");
}
