//! The Pod consul-k8s 1.x injects, with veer's `dataplane` image in
//! consul-dataplane's place (`deploy/kubernetes/testdata/injected-pod.yaml`,
//! derived from consul-k8s v1.9.11's webhook): everything the kubelet, the
//! init container and Prometheus will use in it is read from the spec, and
//! veer, started the way consul-dataplane starts Envoy for that pod, serves
//! each one in a network namespace standing in for the pod:
//!
//! * the init container's `CONSUL_REDIRECT_TRAFFIC_CONFIG` installs the
//!   redirection rules (inbound to `ProxyInboundPort`, outbound to
//!   `ProxyOutboundPort`, the probe and metrics ports excluded);
//! * veer runs as the sidecar's `runAsUser`/`runAsGroup` with no
//!   capabilities and `no_new_privs` (`allowPrivilegeEscalation: false`);
//! * its argv is consul-dataplane's (HEAD `buildCommand`, with the pod's
//!   `-envoy-concurrency`), its bootstrap consul-dataplane's goldens for the
//!   pod's `-envoy-ready-bind-port` (on the pod IP, from
//!   `DP_ENVOY_READY_BIND_ADDRESS`), admin address and Prometheus port/path;
//! * its xDS are what Consul sends for the registration consul-k8s makes
//!   (public listener on the pod IP, outbound listener, one exposed path
//!   per overwritten HTTP probe, forwarding to the original probe port).
//!
//! Then, from outside the pod (the other namespace, as the kubelet and
//! Prometheus reach the pod IP), each probe of the spec answers as the
//! kubelet requires, the Prometheus annotations find metrics, the inbound
//! port carries mTLS to the app, and the app's outbound traffic goes
//! through the outbound port. Ports the spec gives consul-dataplane itself
//! (graceful 20600, DNS 8600) are consul-dataplane's, not the proxy's, and
//! are not part of this test.
//!
//! Skipped (loudly) without root.
mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::{echo, wait_until};
use veer_testsupport::ca::{TempDir, TestCa, TRUST_DOMAIN};
use veer_testsupport::consul_xds::{self as cx, Certs, Params, SidecarShape};
use veer_testsupport::echo::spawn_app;
use veer_testsupport::mesh::{self, CLIENT_IP, SERVER_IP};
use veer_testsupport::netns::Netns;
use veer_testsupport::xds::XdsServer;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn pod() -> Value {
    let text = std::fs::read_to_string(repo("deploy/kubernetes/testdata/injected-pod.yaml"))
        .expect("injected pod fixture");
    serde_yaml::from_str(&text).expect("pod YAML")
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

/// The value of a Go-style `-name=value` (or `-name value`) argument.
fn arg(args: &[String], name: &str) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        let bare = a.trim_start_matches('-');
        if bare == name {
            return it.next().cloned();
        }
        if let Some(v) = bare.strip_prefix(&format!("{name}=")) {
            return Some(v.to_string());
        }
    }
    None
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

/// An HTTP probe of a container: (probe kind, path, port).
fn http_probes(c: &Value) -> Vec<(&'static str, String, u16)> {
    ["livenessProbe", "readinessProbe", "startupProbe"]
        .into_iter()
        .filter_map(|k| {
            let g = c[k].get("httpGet")?;
            Some((
                k,
                g["path"].as_str().unwrap_or("/").to_string(),
                g["port"].as_u64().expect("numeric probe port") as u16,
            ))
        })
        .collect()
}

/// What the test reads from the pod spec.
#[derive(Debug)]
struct Facts {
    uid: u32,
    gid: u32,
    concurrency: u32,
    admin: SocketAddr,
    ready_port: u16,
    prom_port: u16,
    prom_path: String,
    redirect_config: String,
    inbound_port: u16,
    outbound_port: u16,
    app_port: u16,
    /// (kind, path, overwritten port, original port).
    app_probes: Vec<(&'static str, String, u16, u16)>,
    /// The sidecar's own readiness probe.
    sidecar_probe: (String, u16),
}

fn facts(pod: &Value) -> Facts {
    let dp = container(pod, "consul-dataplane");
    assert_eq!(
        dp["image"], "veer-consul-dataplane:0.1.0",
        "the fixture carries veer's image"
    );
    let sc = &dp["securityContext"];
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let args: Vec<String> = serde_json::from_value(dp["args"].clone()).unwrap();
    let admin_ip: IpAddr = arg(&args, "envoy-admin-bind-address")
        .unwrap()
        .parse()
        .unwrap();
    // consul-dataplane's default admin port (consul-k8s sets it only for
    // multi-port pods).
    let admin_port: u16 = arg(&args, "envoy-admin-bind-port")
        .map(|p| p.parse().unwrap())
        .unwrap_or(19000);
    let ready_addr = dp["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DP_ENVOY_READY_BIND_ADDRESS")
        .expect("DP_ENVOY_READY_BIND_ADDRESS");
    assert_eq!(
        ready_addr["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP",
        "the ready listener is on the pod IP"
    );
    let ready = &dp["readinessProbe"]["httpGet"];
    let ann = &pod["metadata"]["annotations"];
    let init = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "consul-connect-inject-init")
        .unwrap();
    let redirect_config = env(init, "CONSUL_REDIRECT_TRAFFIC_CONFIG")
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    let rc: Value = serde_json::from_str(&redirect_config).unwrap();
    let app = container(pod, "web");
    let original: Value = serde_json::from_str(
        ann["consul.hashicorp.com/original-pod"]
            .as_str()
            .expect("original-pod annotation"),
    )
    .unwrap();
    let originalapp = container(&original, "web");
    let app_probes = http_probes(app)
        .into_iter()
        .map(|(k, path, port)| {
            let orig = http_probes(originalapp)
                .into_iter()
                .find(|(ok, _, _)| *ok == k)
                .expect("an overwritten probe was in the original pod");
            assert_eq!(orig.1, path, "the path is kept");
            (k, path, port, orig.2)
        })
        .collect();
    Facts {
        uid: sc["runAsUser"].as_u64().unwrap() as u32,
        gid: sc["runAsGroup"].as_u64().unwrap() as u32,
        concurrency: arg(&args, "envoy-concurrency").unwrap().parse().unwrap(),
        admin: SocketAddr::new(admin_ip, admin_port),
        ready_port: arg(&args, "envoy-ready-bind-port")
            .unwrap()
            .parse()
            .unwrap(),
        prom_port: ann["prometheus.io/port"].as_str().unwrap().parse().unwrap(),
        prom_path: ann["prometheus.io/path"].as_str().unwrap().to_string(),
        inbound_port: rc["ProxyInboundPort"].as_u64().unwrap() as u16,
        outbound_port: rc["ProxyOutboundPort"].as_u64().unwrap() as u16,
        redirect_config,
        app_port: app["ports"][0]["containerPort"].as_u64().unwrap() as u16,
        app_probes,
        sidecar_probe: (
            ready["path"].as_str().unwrap().to_string(),
            ready["port"].as_u64().unwrap() as u16,
        ),
    }
}

fn golden(name: &str) -> Value {
    let p = repo(&format!(
        "crates/veer-xds/tests/fixtures/bootstrap/dataplane-28a963a/{name}"
    ));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn socket_address(v: &mut Value) -> &mut Value {
    &mut v["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
        ["socket_address"]
}

/// The bootstrap consul-dataplane generates for this pod. Its goldens
/// (consul-dataplane HEAD 28a963a, `pkg/consuldp/testdata/
/// TestBootstrapConfig/`) have the Prometheus listener
/// (`custom-prometheus-scrape-path`) and the ready listener
/// (`ready-listener`) in separate files; the rest of the two is identical
/// and Consul's template writes both sections independently, so the pod's
/// bootstrap is the first plus the ready listener and its `self_admin`
/// cluster from the second. One change: `prometheus_backend` goes to the
/// admin address. consul-dataplane points it at its own merged-metrics
/// server (127.0.0.1:20100, which scrapes the proxy's admin
/// `/stats/prometheus`); that server is consul-dataplane's, not the
/// proxy's, and does not run here.
fn bootstrap(f: &Facts, pod_ip: &str, xds: SocketAddr, node_id: &str) -> String {
    let mut b = golden("custom-prometheus-scrape-path.json");
    let r = golden("ready-listener.json");
    b["node"]["id"] = node_id.into();
    b["node"]["cluster"] = "web".into();
    b["admin"]["address"]["socket_address"] =
        serde_json::json!({"address": f.admin.ip().to_string(), "port_value": f.admin.port()});
    let sr = &mut b["static_resources"];
    let clusters = sr["clusters"].as_array_mut().unwrap();
    assert_eq!(clusters[0]["name"], "consul-dataplane");
    *socket_address(&mut clusters[0]) =
        serde_json::json!({"address": xds.ip().to_string(), "port_value": xds.port()});
    assert_eq!(clusters[1]["name"], "prometheus_backend");
    *socket_address(&mut clusters[1]) =
        serde_json::json!({"address": f.admin.ip().to_string(), "port_value": f.admin.port()});
    let mut self_admin = r["static_resources"]["clusters"][1].clone();
    assert_eq!(self_admin["name"], "self_admin");
    *socket_address(&mut self_admin) =
        serde_json::json!({"address": f.admin.ip().to_string(), "port_value": f.admin.port()});
    clusters.push(self_admin);
    let listeners = sr["listeners"].as_array_mut().unwrap();
    let prom = &mut listeners[0];
    assert_eq!(prom["name"], "envoy_prometheus_metrics_listener");
    prom["address"]["socket_address"]["port_value"] = f.prom_port.into();
    let route = &mut prom["filter_chains"][0]["filters"][0]["typedConfig"]["route_config"]
        ["virtual_hosts"][0]["routes"][0];
    route["match"]["path"] = f.prom_path.clone().into();
    let mut ready = r["static_resources"]["listeners"][0].clone();
    assert_eq!(ready["name"], "envoy_ready_listener");
    ready["address"]["socket_address"] =
        serde_json::json!({"address": pod_ip, "port_value": f.ready_port});
    listeners.push(ready);
    b.to_string()
}

/// consul-dataplane's Envoy argv (HEAD `pkg/envoy/proxy.go` buildCommand
/// and `pkg/consuldp/consul_dataplane.go` envoyProxyConfig, defaults
/// drain 30 s / immediate), for `-log-level=info -log-json=false`.
fn dataplane_argv(bootstrap: String, f: &Facts) -> Vec<String> {
    vec![
        "--config-yaml".into(),
        bootstrap,
        "--log-format".into(),
        "%Y-%m-%dT%T.%eZ%z [%l] envoy.%n(%t) %v".into(),
        "--log-level".into(),
        "info".into(),
        "--disable-hot-restart".into(),
        format!("--concurrency {}", f.concurrency),
        "--drain-time-s 30".into(),
        "--drain-strategy immediate".into(),
    ]
}

/// `GET path` from `ns` to `addr`: (status, body).
fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.get(9..12)?.parse().ok()?;
        Some((status, out.split_once("\r\n\r\n")?.1.to_string()))
    })
}

/// A kubelet HTTP probe succeeds on 200..=399.
fn probe_ok(r: &Option<(u16, String)>) -> bool {
    matches!(r, Some((s, _)) if (200..400).contains(s))
}

struct Killed(Child, PathBuf);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::env::var_os("VEER_SHOW_LOGS").is_some() {
            eprintln!("{}", std::fs::read_to_string(&self.1).unwrap_or_default());
        }
    }
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[test]
fn injected_pod_is_served_by_veer_as_its_spec_says() {
    if !veer_testsupport::require_root("injected_pod_is_served_by_veer_as_its_spec_says") {
        return;
    }
    let pod = pod();
    let f = facts(&pod);
    assert_eq!((f.uid, f.gid), (5995, 5995));
    let rc: Value = serde_json::from_str(&f.redirect_config).unwrap();
    assert_eq!(
        rc["ProxyUserID"],
        f.uid.to_string(),
        "rules exempt the proxy"
    );

    let (client, server) = mesh::namespaces();
    let pod_ip = SERVER_IP;
    // The init container: connect-init applies exactly this JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(["redirect-traffic", "-netns"])
        .arg(server.path())
        .env("CONSUL_REDIRECT_TRAFFIC_CONFIG", &f.redirect_config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "redirect-traffic: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The app (answers any GET with 200, echoes `E…`), and a server outside
    // the mesh for the app's outbound call.
    let app = spawn_app(
        Some(&server),
        SocketAddr::from(([127, 0, 0, 1], f.app_port)),
        "web",
    );
    let _outside = spawn_app(
        Some(&client),
        format!("{CLIENT_IP}:9000").parse().unwrap(),
        "outside",
    );

    // "Consul": the xDS consul-dataplane relays for this registration.
    let ca = TestCa::new(TRUST_DOMAIN);
    let mut p = Params::golden(Certs::issue(&ca.ca, "dc1", "web"));
    p.public = format!("{pod_ip}:{}", f.inbound_port).parse().unwrap();
    p.local_app = SocketAddr::from(([127, 0, 0, 1], f.app_port));
    p.outbound = SocketAddr::from(([127, 0, 0, 1], f.outbound_port));
    p.vips.clear();
    p.instances.clear();
    p.endpoints.clear();
    let mut x = cx::sidecar(
        &p,
        &SidecarShape {
            passthrough: true,
            rbac: Some(cx::rbac_allow(TRUST_DOMAIN, &["frontend"])),
            ..Default::default()
        },
    );
    for (_, path, port, orig) in &f.app_probes {
        assert_eq!(*orig, f.app_port, "probes go to the app's port");
        x.listeners.push(cx::exposed_path_listener(
            format!("{pod_ip}:{port}").parse().unwrap(),
            path,
            "local_app",
        ));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // `-xds-bind-addr=127.0.0.1`: consul-dataplane's xDS server in the pod.
    let l = server.run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let xds_addr = l.local_addr().unwrap();
    let ads = {
        let _g = rt.enter();
        XdsServer::tcp_listener(l).unwrap()
    };
    let items = x.resources();
    ads.set_all(
        items
            .iter()
            .map(|(t, n, a)| (t.as_str(), n.as_str(), a.clone()))
            .collect(),
    );

    // veer as the image runs it: consul-dataplane execs `envoy` (veer),
    // as the container's user, no capabilities, no privilege escalation.
    let files = TempDir::new("veer-k8s-pod-");
    let link = files.join("envoy");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_veer"), &link).unwrap();
    let log = files.join("veer.log");
    let node_id = format!(
        "{}-web-sidecar-proxy",
        pod["metadata"]["name"].as_str().unwrap()
    );
    let child = server
        .command("setpriv")
        .args([
            &format!("--reuid={}", f.uid),
            &format!("--regid={}", f.gid),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
        ])
        .arg(&link)
        .args(dataplane_argv(
            bootstrap(&f, pod_ip, xds_addr, &node_id),
            &f,
        ))
        .env_remove("VEER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let veer = Killed(child, log.clone());
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The sidecar's readiness probe, from outside the pod, as the kubelet.
    let (rpath, rport) = f.sidecar_probe.clone();
    let ready_at = SocketAddr::new(pod_ip.parse().unwrap(), rport);
    assert_eq!(rport, f.ready_port);
    let ok = wait_until(Duration::from_secs(20), || {
        probe_ok(&http_get(&client, ready_at, &rpath))
    });
    assert!(
        ok,
        "readiness probe {rpath} on {ready_at} failed:\n{}",
        log_text()
    );
    assert!(ads.requests().iter().any(|r| r.is_ack()), "ACKed");
    assert!(
        ads.requests().iter().all(|r| !r.is_nack()),
        "NACK: {:?}",
        ads.requests()
            .iter()
            .find_map(|r| r.error().map(str::to_string))
    );

    // The inbound port itself on the pod IP, as a `tcpSocket` readiness
    // probe (consul-k8s' default for the sidecar) and Consul's TCP check
    // reach it: the connection is accepted, and counted as a probe.
    let probes = |t: &str| -> u64 {
        t.lines()
            .filter(|l| l.starts_with("veer_inbound_probes_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let admin_scrape = || http_get(&server, f.admin, "/stats/prometheus").unwrap().1;
    let p0 = probes(&admin_scrape());
    let inbound_at = SocketAddr::new(pod_ip.parse().unwrap(), f.inbound_port);
    assert!(
        client
            .run(move || TcpStream::connect_timeout(&inbound_at, Duration::from_secs(2)))
            .is_ok(),
        "tcpSocket probe on {inbound_at}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || probes(&admin_scrape()) > p0),
        "the TCP probe was not seen as one"
    );

    // The container's user and capabilities, as its securityContext says.
    let uids = status_field(pid, "Uid");
    assert!(
        uids.split_whitespace().all(|u| u == f.uid.to_string()),
        "{uids}"
    );
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // The app's overwritten probes: each reaches the app through its exposed
    // path on the pod IP; any other path on that port is not forwarded.
    assert!(f.app_probes.len() >= 2, "{:?}", f.app_probes);
    let before = app.accepted();
    for (kind, path, port, _) in &f.app_probes {
        let at = SocketAddr::new(pod_ip.parse().unwrap(), *port);
        let r = http_get(&client, at, path);
        assert!(probe_ok(&r), "{kind} {path} on {at}: {r:?}\n{}", log_text());
        assert!(r.unwrap().1.contains("hello from web"));
        let other = http_get(&client, at, "/admin").map(|r| r.0);
        assert_eq!(other, Some(404), "{kind}: only {path} is exposed");
    }
    assert_eq!(app.accepted() - before, f.app_probes.len());

    // Prometheus, as the pod annotations tell it to scrape.
    let prom_at = SocketAddr::new(pod_ip.parse().unwrap(), f.prom_port);
    let r = http_get(&client, prom_at, &f.prom_path).expect("scrape");
    assert_eq!(r.0, 200, "{r:?}");
    assert!(r.1.contains("# TYPE"), "{}", &r.1[..r.1.len().min(400)]);

    // The admin address, inside the pod only.
    let r = http_get(&server, f.admin, "/ready");
    assert_eq!(r.map(|r| r.0), Some(200));

    // Every listening socket is veer's and on the address the spec implies:
    // the pod IP for what the kubelet and peers reach, loopback for the
    // admin and outbound ports, all addresses for Prometheus.
    let ss = server.sh_ok("ss -Hltnp").unwrap();
    let pod = |port: u16| format!("{pod_ip}:{port}");
    let mut want = vec![
        pod(f.inbound_port),
        format!("127.0.0.1:{}", f.outbound_port),
        f.admin.to_string(),
        pod(f.ready_port),
        format!("0.0.0.0:{}", f.prom_port),
    ];
    want.extend(f.app_probes.iter().map(|(_, _, port, _)| pod(*port)));
    for addr in &want {
        let line = ss
            .lines()
            .find(|l| l.split_whitespace().nth(3) == Some(addr.as_str()))
            .unwrap_or_else(|| panic!("nothing listens on {addr}:\n{ss}"));
        assert!(
            line.contains(&format!("pid={pid},")),
            "{addr} is not veer's: {line}"
        );
    }
    let veers: std::collections::BTreeSet<&str> = ss
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    let want: std::collections::BTreeSet<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(
        veers, want,
        "veer listens on more than the spec says:\n{ss}"
    );

    // The inbound port on the pod IP: mTLS from a mesh peer to the app (any
    // port of the pod IP is redirected there, e.g. the Service's 8080).
    let (cert, key) = ca.service("frontend");
    let mut s = client
        .command("timeout")
        .args(["10", "openssl", "s_client", "-quiet", "-connect"])
        .arg(format!("{pod_ip}:{}", f.app_port))
        .arg("-CAfile")
        .arg(ca.roots())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    s.stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        .unwrap();
    let out = s.wait_with_output().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("HTTP/1.1 200 ") && answer.contains("hello from web"),
        "{answer}\n{}",
        log_text()
    );
    // ... and plain TCP to the app's port never reaches the app.
    let before = app.accepted();
    let _ = echo(&client, &format!("{pod_ip}:{}", f.app_port), "plain");
    assert_eq!(app.accepted(), before, "plaintext got through");

    // The outbound port: the app's call to a server outside the mesh goes
    // through veer (passthrough), not around it.
    let scrape = |ns: &Netns| http_get(ns, f.admin, "/stats/prometheus").unwrap().1;
    let outbound = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("veer_connections_opened_total") && l.contains("outbound"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let n0 = outbound(&scrape(&server));
    assert_eq!(
        echo(&server, &format!("{CLIENT_IP}:9000"), "out").unwrap(),
        "out"
    );
    let n1 = outbound(&scrape(&server));
    assert_eq!(n1, n0 + 1, "the call did not go through the outbound port");
    drop(veer);
}
