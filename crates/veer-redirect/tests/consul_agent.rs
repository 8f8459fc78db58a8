//! `-proxy-id` against a real Consul 1.8.7 dev agent (skips loudly when the
//! binary is missing), and the HTTP client against a scripted fake agent.
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use veer_redirect::consul::{parse_addr, Agent, Derived};

const NO_PATH: (&str, &str) = ("PATH", "/nonexistent-veer-path");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `consul agent -dev` in a temp dir, killed on drop.
struct DevAgent {
    child: Child,
    dir: PathBuf,
    http: String,
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_agent(bin: &std::path::Path) -> DevAgent {
    let dir = std::env::temp_dir().join(veer_testsupport::unique("veer-redirect-consul"));
    std::fs::create_dir_all(&dir).unwrap();
    let http_port = free_port();
    let port = |p: u16| p.to_string();
    let child = Command::new(bin)
        .args([
            "agent",
            "-dev",
            "-bind",
            "127.0.0.1",
            "-client",
            "127.0.0.1",
        ])
        .args([
            "-http-port",
            &port(http_port),
            "-grpc-port",
            "-1",
            "-dns-port",
            "-1",
        ])
        .args([
            "-serf-lan-port",
            &port(free_port()),
            "-serf-wan-port",
            &port(free_port()),
        ])
        .args(["-server-port", &port(free_port())])
        .arg("-data-dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let agent = DevAgent {
        child,
        dir,
        http: format!("127.0.0.1:{http_port}"),
    };
    let client = Agent::new(parse_addr(&agent.http).unwrap(), None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, body)) = client.get("/v1/status/leader") {
            if body.len() > 2 {
                return agent;
            }
        }
        assert!(
            Instant::now() < deadline,
            "consul agent did not elect a leader"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn put(addr: &str, path: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn proxy_id_from_consul_187() {
    let Some(bin) = veer_testsupport::tool("consul") else {
        veer_testsupport::skip(
            "veer-redirect proxy_id_from_consul_187",
            "consul binary not found (/opt/veer-tools/bin/consul); run .ci/install-deps",
        );
        return;
    };
    let agent = start_agent(&bin);
    let reg = r#"{"Name":"web","Port":8080,
        "Connect":{"SidecarService":{"Port":21000,"Proxy":{
            "Config":{"bind_port":21001,"envoy_prometheus_bind_addr":"0.0.0.0:20200","envoy_stats_bind_addr":"0.0.0.0:9102"},
            "Expose":{"Checks":true,"Paths":[{"ListenerPort":21500,"Path":"/metrics","LocalPathPort":8080}]}}}}}"#;
    assert_eq!(put(&agent.http, "/v1/agent/service/register", reg), 200);

    // The library call.
    let client = Agent::new(
        parse_addr(&format!("http://{}", agent.http)).unwrap(),
        Some("anything".into()),
    )
    .unwrap();
    let d = client.proxy_settings("web-sidecar-proxy").unwrap();
    assert_eq!(
        d,
        Derived {
            inbound_port: 21001,
            outbound_port: None,
            exclude_inbound_ports: vec!["20200".into(), "9102".into(), "21500".into()],
            destination_service_name: "web".into(),
            expose_checks: true,
        }
    );

    // Through the command line (dry run; no iptables binaries on PATH).
    let addr = format!("http://{}", agent.http);
    let o = veer(
        &[
            "-proxy-id",
            "web-sidecar-proxy",
            "-proxy-uid",
            "5995",
            "-exclude-inbound-port",
            "8081",
            "-dry-run",
        ],
        &[
            NO_PATH,
            ("CONSUL_HTTP_ADDR", &addr),
            ("CONSUL_HTTP_TOKEN", "t"),
        ],
    );
    assert_eq!(o.code, 0, "{o:?}");
    let inbound: Vec<&str> = o
        .out
        .lines()
        .filter(|l| l.contains("CONSUL_PROXY_IN"))
        .collect();
    assert_eq!(
        inbound,
        [
            ":CONSUL_PROXY_INBOUND - [0:0]",
            ":CONSUL_PROXY_IN_REDIRECT - [0:0]",
            "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 21001",
            "-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND",
            "-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT",
            "-I CONSUL_PROXY_INBOUND -p tcp --dport 20200 -j RETURN",
            "-I CONSUL_PROXY_INBOUND -p tcp --dport 9102 -j RETURN",
            "-I CONSUL_PROXY_INBOUND -p tcp --dport 21500 -j RETURN",
            "-I CONSUL_PROXY_INBOUND -p tcp --dport 8081 -j RETURN",
        ]
    );
    assert!(o
        .out
        .contains("-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001"));

    // Errors: unknown ID, not a proxy.
    let o = veer(
        &["-proxy-id", "nope", "-proxy-uid", "1", "-http-addr", &addr],
        &[NO_PATH],
    );
    assert_eq!(o.code, 1);
    assert!(
        o.err.contains("HTTP 404: unknown service ID: nope"),
        "{o:?}"
    );
    let o = veer(
        &["-proxy-id", "web", "-proxy-uid", "1", "-http-addr", &addr],
        &[NO_PATH],
    );
    assert_eq!(o.code, 1);
    assert!(
        o.err.contains("service web is not a proxy service"),
        "{o:?}"
    );
}

/// A one-shot fake agent: returns the request it saw and answers with `reply`.
fn fake_agent(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(reply.as_bytes()).unwrap();
        String::from_utf8(req).unwrap()
    });
    (addr, h)
}

#[test]
fn client_sends_token_and_reads_chunked() {
    let (addr, h) = fake_agent(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         15\r\n{\"Port\":20000,\"Proxy\"\r\n\
         1d\r\n:{\"TransparentProxy\":{\"Outbou\r\n\
         18\r\nndListenerPort\":15002}}}\r\n\
         0\r\n\r\n",
    );
    let token_file = std::env::temp_dir().join(veer_testsupport::unique("veer-token"));
    std::fs::write(&token_file, "secret-token\n").unwrap();
    let o = veer(
        &[
            "-proxy-id",
            "a b",
            "-proxy-uid",
            "5995",
            "-dry-run",
            "-token-file",
            token_file.to_str().unwrap(),
        ],
        &[NO_PATH, ("CONSUL_HTTP_ADDR", &addr)],
    );
    let _ = std::fs::remove_file(&token_file);
    let req = h.join().unwrap();
    assert!(
        req.starts_with("GET /v1/agent/service/a%20b HTTP/1.1\r\n"),
        "{req}"
    );
    assert!(
        req.contains("\r\nX-Consul-Token: secret-token\r\n"),
        "{req}"
    );
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.out
            .contains("-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15002"),
        "{o:?}"
    );
    assert!(
        o.out
            .contains("-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 20000"),
        "{o:?}"
    );
}

#[test]
fn agent_unreachable_is_reported() {
    let port = free_port(); // nothing listens there any more
    let o = veer(
        &[
            "-proxy-id",
            "x",
            "-proxy-uid",
            "1",
            "-http-addr",
            &format!("127.0.0.1:{port}"),
        ],
        &[NO_PATH],
    );
    assert_eq!(o.code, 1);
    assert!(
        o.err.contains(&format!(
            "GET /v1/agent/service/x from the Consul agent at 127.0.0.1:{port}"
        )),
        "{o:?}"
    );
}
