//! Consul's discovery chain across two datacenters, for real (issue 12):
//! two Consul 1.8.7 dev agents WAN-joined as dc1 (primary) and dc2
//! (secondary, its CA an intermediate of dc1's root), veer sidecars in
//! three network namespaces on one Ethernet segment, each with Consul's
//! redirect rules and configured only by its own agent:
//!
//! ```text
//!  ns web  (dc1) 10.78.0.1  test client → 127.0.0.1:10000 (api)  127.0.0.1:10002 (api in dc2)
//!  ns api1 (dc1) 10.78.0.2  api v1: app 127.0.0.1:8080, sidecar :20000
//!  ns api2 (dc2) 10.78.0.3  api v2: app 127.0.0.1:8080, sidecar :20000,
//!                           upstream 127.0.0.1:10001 = api in dc1
//!  10.78.0.9: a black hole (a static neighbour no one answers for)
//! ```
//!
//! Resolver entries are written to dc1 (replicated to dc2) while the
//! sidecars run; each step measures how long until new connections follow.
use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use veer_testsupport::ca::TempDir;
use veer_testsupport::consul::Agent;
use veer_testsupport::echo::{spawn_app, App};
use veer_testsupport::mesh::{redirect, Sidecar};
use veer_testsupport::netns::{first_link, star, Netns};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

const WEB_IP: &str = "10.78.0.1";
const API1_IP: &str = "10.78.0.2";
const API2_IP: &str = "10.78.0.3";
const HOLE_IP: &str = "10.78.0.9";
const GW_IP: &str = "10.78.0.5";

/// A stand-in for dc2's mesh gateway (Consul 1.8's is Envoy routing on the
/// SNI at L4, TLS passing through): forwards every connection to dc2's api
/// sidecar and records the SNI of each ClientHello it saw.
fn gateway(ns: &Netns, to: SocketAddr) -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let path = ns.path();
    let log = seen.clone();
    std::thread::spawn(move || {
        veer_testsupport::netns::enter(&path).unwrap();
        let l = std::net::TcpListener::bind((GW_IP, 8443)).unwrap();
        tx.send(()).unwrap();
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let n = c.read(&mut buf).unwrap_or(0);
                let hello = &buf[..n];
                let sni = sni_of(hello).unwrap_or_default();
                log.lock().unwrap().push(sni);
                let Ok(mut up) = TcpStream::connect(to) else {
                    return;
                };
                let _ = up.write_all(hello);
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up2, &mut c2);
                    let _ = c2.shutdown(Shutdown::Write);
                });
                let _ = std::io::copy(&mut c, &mut up);
                let _ = up.shutdown(Shutdown::Write);
            });
        }
    });
    rx.recv().unwrap();
    seen
}

/// The server_name of a TLS ClientHello record (enough of the format for a
/// test's gateway).
fn sni_of(b: &[u8]) -> Option<String> {
    let get = |i: usize| b.get(i).copied().map(usize::from);
    // record(5) handshake(4) version(2) random(32)
    let mut i = 5 + 4 + 2 + 32;
    i += 1 + get(i)?; // session id
    i += 2 + (get(i)? << 8 | get(i + 1)?); // cipher suites
    i += 1 + get(i)?; // compression
    let end = i + 2 + (get(i)? << 8 | get(i + 1)?);
    i += 2;
    while i + 4 <= end {
        let (typ, len) = (get(i)? << 8 | get(i + 1)?, get(i + 2)? << 8 | get(i + 3)?);
        if typ == 0 {
            // list len(2) type(1) name len(2) name
            let n = get(i + 7)? << 8 | get(i + 8)?;
            return String::from_utf8(b.get(i + 9..i + 9 + n)?.to_vec()).ok();
        }
        i += 4 + len;
    }
    None
}

/// A service with a sidecar on port 20000, a passing TTL check `<id>-up`
/// (the agent cannot reach into the namespaces) and explicit upstreams.
fn register(agent: &Agent, id: &str, name: &str, addr: &str, version: &str, upstreams: &str) {
    let body = format!(
        r#"{{"Name":"{name}","ID":"{id}","Address":"{addr}","Port":8080,"Meta":{{"version":"{version}"}},
        "Connect":{{"SidecarService":{{"Port":20000,
          "Checks":[{{"CheckID":"{id}-up","Name":"up","TTL":"24h","Status":"passing"}}],
          "Proxy":{{"LocalServiceAddress":"127.0.0.1","LocalServicePort":8080,"Upstreams":[{upstreams}]}}}}}}}}"#
    );
    agent.call("PUT", "/v1/agent/service/register", Some(&body));
}

fn resolver(agent: &Agent, body: &str) {
    let entry = format!(r#"{{"Kind":"service-resolver","Name":"api"{body}}}"#);
    agent.call("PUT", "/v1/config", Some(&entry));
}

/// One echo exchange through `addr` in `ns`.
fn echo(ns: &Netns, addr: &str, msg: &str) -> std::io::Result<String> {
    let a: SocketAddr = addr.parse().unwrap();
    let msg = msg.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&a, Duration::from_secs(10))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        s.write_all(format!("E{msg}").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

struct Dcs<'a> {
    dc1: &'a App,
    dc2: &'a App,
}

impl Dcs<'_> {
    /// Which datacenter's app one new connection through `addr` reached.
    fn lands(&self, ns: &Netns, addr: &str) -> &'static str {
        let (a, b) = (self.dc1.accepted(), self.dc2.accepted());
        let r = echo(ns, addr, "x");
        match (
            r.as_deref(),
            self.dc1.accepted() > a,
            self.dc2.accepted() > b,
        ) {
            (Ok("x"), true, false) => "dc1",
            (Ok("x"), false, true) => "dc2",
            _ => "none",
        }
    }

    /// Polls until new connections land in `want`; the time it took.
    fn until_lands(&self, ns: &Netns, addr: &str, want: &str, what: &str) -> Duration {
        let t0 = Instant::now();
        let mut last = "";
        while t0.elapsed() < Duration::from_secs(20) {
            last = self.lands(ns, addr);
            if last == want {
                let took = t0.elapsed();
                eprintln!(
                    "chain test: {what}: new connections to {addr} reach {want} after {took:?}"
                );
                return took;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what}: connections to {addr} still reach {last}, not {want}");
    }
}

#[test]
fn discovery_chain_across_two_datacenters() {
    let name = "discovery_chain_across_two_datacenters";
    if !veer_testsupport::require_root(name) {
        return;
    }
    let Some(dc1) = Agent::start_dc("dc1", None) else {
        veer_testsupport::skip(name, "consul not installed (run .ci/install-deps)");
        return;
    };
    let dc2 = Agent::start_dc("dc2", Some(&dc1)).expect("consul");
    let files = TempDir::new("veer-chain-");
    let web = Netns::new("cw").unwrap();
    let api1 = Netns::new("c1").unwrap();
    let api2 = Netns::new("c2").unwrap();
    let gw = Netns::new("cg").unwrap();
    let _hub = star(&[
        (&gw, &[&format!("{GW_IP}/24")]),
        (&web, &[&format!("{WEB_IP}/24")]),
        (&api1, &[&format!("{API1_IP}/24")]),
        (&api2, &[&format!("{API2_IP}/24")]),
    ])
    .unwrap();
    let link = first_link(&web).unwrap();
    web.ip(&[
        "neigh",
        "add",
        HOLE_IP,
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        &link,
        "nud",
        "permanent",
    ])
    .unwrap();
    for ns in [&web, &api1, &api2] {
        redirect(&bin(), ns, &[]);
    }
    let app1 = spawn_app(Some(&api1), "127.0.0.1:8080".parse().unwrap(), "api-dc1");
    let app2 = spawn_app(Some(&api2), "127.0.0.1:8080".parse().unwrap(), "api-dc2");
    register(&dc1, "api1", "api", API1_IP, "v1", "");
    register(
        &dc1,
        "web",
        "web",
        WEB_IP,
        "v1",
        r#"{"DestinationName":"api","LocalBindPort":10000},
           {"DestinationName":"api","Datacenter":"dc2","LocalBindPort":10002}"#,
    );
    register(
        &dc2,
        "api2",
        "api",
        API2_IP,
        "v2",
        r#"{"DestinationName":"api","Datacenter":"dc1","LocalBindPort":10001}"#,
    );
    let start = |ns: &Netns, agent: &Agent, id: &str| {
        let args: Vec<OsString> = vec!["--proxy-id".into(), id.into()];
        Sidecar::start_with(
            &bin(),
            ns,
            &args,
            &[("CONSUL_HTTP_ADDR", agent.addr.as_str())],
            PathBuf::new(),
            files.join(&format!("{id}.log")),
        )
    };
    let web_sc = start(&web, &dc1, "web-sidecar-proxy");
    let api1_sc = start(&api1, &dc1, "api1-sidecar-proxy");
    let api2_sc = start(&api2, &dc2, "api2-sidecar-proxy");
    let dcs = Dcs {
        dc1: &app1,
        dc2: &app2,
    };
    let local = "127.0.0.1:10000";

    // Cross-DC mTLS both ways, no config entries: the explicit upstream
    // with Datacenter dc2 (web's dc1 leaf, checked by dc2's sidecar; dc2's
    // leaf and intermediate checked by web's), and dc2 → dc1.
    dcs.until_lands(&web, "127.0.0.1:10002", "dc2", "explicit upstream to dc2");
    dcs.until_lands(
        &api2,
        "127.0.0.1:10001",
        "dc1",
        "explicit upstream from dc2 to dc1",
    );
    assert!(
        api2_sc.wait_log("dc/dc1/svc/web", Duration::from_secs(3)),
        "{}",
        api2_sc.log_text()
    );
    assert!(
        api1_sc.wait_log("dc/dc2/svc/api", Duration::from_secs(3)),
        "{}",
        api1_sc.log_text()
    );
    assert_eq!(dcs.lands(&web, local), "dc1");

    // An open connection through the upstream the chain changes.
    let mut open = web.run(move || TcpStream::connect(local).unwrap());
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    open.write_all(b"E1").unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).unwrap();
    assert_eq!(app1.accepted(), 3);

    // Redirect to dc2.
    resolver(&dc1, r#","Redirect":{"Datacenter":"dc2"}"#);
    let redirect_took = dcs.until_lands(&web, local, "dc2", "resolver redirect to dc2");
    open.write_all(b"2").unwrap();
    open.read_exact(&mut one).unwrap();
    assert_eq!(
        &one, b"2",
        "the open connection kept working through the change"
    );

    // Failover to dc2 when dc1's instance turns critical, and back.
    resolver(&dc1, r#","Failover":{"*":{"Datacenters":["dc2"]}}"#);
    dcs.until_lands(&web, local, "dc1", "resolver failover (dc1 healthy)");
    let t = Instant::now();
    dc1.call("PUT", "/v1/agent/check/fail/api1-up", None);
    let to_dc2 = dcs.until_lands(&web, local, "dc2", "dc1's instance critical: failover");
    dc1.call("PUT", "/v1/agent/check/pass/api1-up", None);
    let back = dcs.until_lands(&web, local, "dc1", "dc1's instance passing again: failback");
    eprintln!("chain test: failover round trip {:?}", t.elapsed());

    // A default subset by Service.Meta.version: v2 is only in dc2.
    let subsets = r#""Subsets":{"v1":{"Filter":"Service.Meta.version == v1"},"v2":{"Filter":"Service.Meta.version == v2"}}"#;
    resolver(
        &dc1,
        &format!(r#","DefaultSubset":"v2",{subsets},"Failover":{{"*":{{"Datacenters":["dc2"]}}}}"#),
    );
    dcs.until_lands(&web, local, "dc2", "default subset v2 (only in dc2)");
    resolver(&dc1, &format!(r#","DefaultSubset":"v1",{subsets}"#));
    dcs.until_lands(&web, local, "dc1", "default subset v1");
    open.write_all(b"3").unwrap();
    open.read_exact(&mut one).unwrap();
    assert_eq!(
        &one, b"3",
        "the open connection survived every chain change"
    );

    // Through dc2's mesh gateway (mode remote): the gateway sees the
    // target's SNI and passes the TLS through to dc2's sidecar. It is
    // found by its kind: its name is not `mesh-gateway`.
    let seen = gateway(&gw, format!("{API2_IP}:20000").parse().unwrap());
    dc2.call(
        "PUT",
        "/v1/agent/service/register",
        Some(&format!(
            r#"{{"Kind":"mesh-gateway","Name":"dc2-gateway","ID":"mgw","Address":"{GW_IP}","Port":8443,
            "TaggedAddresses":{{"wan":{{"Address":"{GW_IP}","Port":8443}}}},
            "Check":{{"TTL":"24h","Status":"passing"}}}}"#
        )),
    );
    dc1.call(
        "PUT",
        "/v1/config",
        Some(r#"{"Kind":"service-defaults","Name":"api","MeshGateway":{"Mode":"remote"}}"#),
    );
    resolver(&dc1, r#","Redirect":{"Datacenter":"dc2"}"#);
    let t = Instant::now();
    while seen.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(20) {
        dcs.lands(&web, local);
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    assert_eq!(dcs.lands(&web, local), "dc2");
    let snis = seen.lock().unwrap().clone();
    eprintln!("chain test: mesh gateway (mode remote) used after {took:?}, SNIs it saw: {snis:?}");
    // One TLS connection or more: new app connections to the same
    // gateway and SNI ride as streams over a pooled veer <-> veer
    // connection (multiplexing), which the gateway passes through by SNI
    // like any other.
    assert!(
        !snis.is_empty()
            && snis
                .iter()
                .all(|s| s.starts_with("api.default.dc2.internal.")),
        "{snis:?}"
    );
    dc1.call("DELETE", "/v1/config/service-defaults/api", None);

    // ConnectTimeout 1 s to a black-holed instance closes the client in
    // about a second (Consul's default would be 5 s).
    register(&dc1, "api-hole", "api", HOLE_IP, "hole", "");
    resolver(
        &dc1,
        r#","ConnectTimeout":"1s","DefaultSubset":"hole","Subsets":{"hole":{"Filter":"Service.Meta.version == hole"}}"#,
    );
    let t0 = Instant::now();
    let mut closed_in = None;
    while t0.elapsed() < Duration::from_secs(20) {
        let t = Instant::now();
        if dcs.lands(&web, local) == "none" {
            closed_in = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_in = closed_in.expect("the black-holed subset was never used");
    // (the first try may have raced the update; measure a clean one)
    let t = Instant::now();
    assert_eq!(dcs.lands(&web, local), "none");
    let clean = t.elapsed();
    eprintln!("chain test: ConnectTimeout 1s to a black hole: client closed after {closed_in:?}, then {clean:?}");
    assert!(
        clean >= Duration::from_millis(900) && clean < Duration::from_millis(2500),
        "closed after {clean:?}"
    );
    assert!(
        web_sc.log_text().contains("reason=timeout") || web_sc.log_text().contains("timed out")
    );
    eprintln!(
        "chain test: summary: redirect {redirect_took:?}, failover {to_dc2:?}, failback {back:?}; \
         dc1 app accepted {}, dc2 app accepted {}",
        app1.accepted(),
        app2.accepted()
    );
    drop(open);
    std::thread::sleep(Duration::from_millis(200));
    for (dc, sc) in [("dc1 api", &api1_sc), ("dc2 api", &api2_sc)] {
        let seen = inbound_sources(&sc.log_text());
        eprintln!("chain test: {dc} sidecar accepted (mTLS source: connections): {seen:?}");
        assert!(!seen.is_empty(), "{dc} saw no connection");
    }
    drop((web_sc, api1_sc, api2_sc));
}

/// Inbound connections closed, by the client's SPIFFE ID, from a sidecar log.
fn inbound_sources(log: &str) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in log
        .lines()
        .filter(|l| l.contains("inbound") && l.contains("connection closed"))
    {
        if let Some(s) = l.split("source=").nth(1) {
            let s = s.split_whitespace().next().unwrap_or("").trim_matches('"');
            *m.entry(s.to_string()).or_insert(0) += 1;
        }
    }
    m
}
