//! `veer demo`: a local mesh on the embedded default.
//!
//! An embedded development CA issues Consul-style leaves; two network
//! namespaces get Consul's redirect rules; two veer sidecars (UID 5995) and
//! two tiny apps start; the demo shows an allowed call through both
//! sidecars, a passthrough call, and a call denied by an intention change
//! applied without a restart; then it tears everything down (also on Ctrl-C).
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use veer_testsupport::mesh::{self, Mesh, API_VIP, PLAIN_IP};
use veer_testsupport::netns::Netns;

/// What to undo if the demo is interrupted: process ids and namespace names.
#[derive(Default)]
struct Undo {
    pids: Vec<u32>,
    namespaces: Vec<String>,
    dirs: Vec<std::path::PathBuf>,
}

fn get(ns: &Netns, addr: &str) -> Result<String, String> {
    let a: std::net::SocketAddr = addr.parse().unwrap();
    ns.run(move || {
        let mut s =
            TcpStream::connect_timeout(&a, Duration::from_secs(6)).map_err(|e| e.to_string())?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(6)));
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) if out.is_empty() => Err("connection closed with no answer".into()),
            Ok(_) => Ok(out
                .rsplit("\r\n\r\n")
                .next()
                .unwrap_or("")
                .trim()
                .to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
}

fn check_tools() -> Result<(), String> {
    if !veer_testsupport::is_root() {
        return Err(
            "veer demo needs root (network namespaces and iptables): run it with sudo".into(),
        );
    }
    for tool in [
        "ip",
        "iptables-restore",
        "ip6tables-restore",
        "setpriv",
        "nsenter",
    ] {
        if veer_testsupport::tool(tool).is_none()
            && !std::path::Path::new("/usr/sbin").join(tool).exists()
        {
            return Err(format!(
                "veer demo needs `{tool}`; install it with: apt-get install -y iptables iproute2 util-linux"
            ));
        }
    }
    Ok(())
}

pub fn demo(keep: bool) -> ExitCode {
    if let Err(e) = check_tools() {
        eprintln!("veer demo: {e}");
        return ExitCode::FAILURE;
    }
    let bin = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("veer demo: cannot find my own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let undo = Arc::new(Mutex::new(Undo::default()));
    watch_signals(undo.clone());

    println!("veer demo: building a two-namespace mesh (embedded development CA, Consul's redirect rules)");
    let m = Mesh::new(&bin);
    {
        let mut u = undo.lock().unwrap();
        u.pids.extend(m.web.pid());
        u.pids.extend(m.api.pid());
        u.namespaces.push(m.client.name().to_string());
        u.namespaces.push(m.server.name().to_string());
        u.dirs.push(m.files.path().to_path_buf());
        u.dirs.push(m.ca.dir.path().to_path_buf());
    }
    println!(
        "  client namespace {}: app \"web\" + veer sidecar (UID 5995, outbound 127.0.0.1:15001)",
        m.client.name()
    );
    println!(
        "  server namespace {}: veer sidecar (inbound :20000) + app \"api\" on 127.0.0.1:8080",
        m.server.name()
    );
    println!(
        "  api's virtual IPs: {API_VIP}, fd00::20; intentions on api: allow web, default deny"
    );
    println!();

    let mut ok = true;
    let mut step = |n: u32, what: &str, r: Result<String, String>, want_ok: bool| {
        let shown = match &r {
            Ok(body) => format!("answered {body:?}"),
            Err(e) => format!("refused ({e})"),
        };
        let good = r.is_ok() == want_ok;
        ok &= good;
        println!(
            "{n}. {what}\n   -> {shown} {}",
            if good {
                "[as expected]"
            } else {
                "[UNEXPECTED]"
            }
        );
    };
    step(
        1,
        &format!(
            "allowed: web calls api at its virtual IP {API_VIP}:80 (mTLS between the sidecars)"
        ),
        get(&m.client, &format!("{API_VIP}:80")),
        true,
    );
    step(
        2,
        "allowed over IPv6: web calls api at [fd00::20]:80",
        get(&m.client, "[fd00::20]:80"),
        true,
    );
    step(3, &format!("passthrough: web calls {PLAIN_IP}:9000, a server outside the mesh (plain TCP, spliced)"), get(&m.client, &format!("{PLAIN_IP}:9000")), true);
    m.reconfigure_api("deny", &mesh::deny("web"));
    step(
        4,
        "denied: api's intentions now deny web (file changed, applied without a restart)",
        get(&m.client, &format!("{API_VIP}:80")),
        false,
    );
    if m.api
        .wait_log("reason=denied_by_intention", Duration::from_secs(3))
    {
        if let Some(line) = m
            .api
            .log_text()
            .lines()
            .rev()
            .find(|l| l.contains("reason=denied_by_intention"))
        {
            println!(
                "   api sidecar logged: {}",
                line.split_once("WARN ").map(|x| x.1).unwrap_or(line)
            );
        }
    }
    m.reconfigure_api("deny", &mesh::allow("web"));
    println!();
    if keep {
        println!("The mesh stays up; try it yourself, then press Ctrl-C to tear it down:");
        println!("  ip netns exec {} curl http://{API_VIP}/", m.client.name());
        println!(
            "  logs: {} and {}",
            m.web.log.display(),
            m.api.log.display()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("tearing down");
    drop(m);
    if ok {
        println!("veer demo: done");
        ExitCode::SUCCESS
    } else {
        println!("veer demo: some steps did not behave as expected (see above)");
        ExitCode::FAILURE
    }
}

/// On Ctrl-C or SIGTERM: stop the sidecars, delete the namespaces, exit.
fn watch_signals(undo: Arc<Mutex<Undo>>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        });
        eprintln!("\nveer demo: interrupted; tearing down");
        let u = undo.lock().unwrap_or_else(|e| e.into_inner());
        for pid in &u.pids {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        for ns in &u.namespaces {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
        for d in &u.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        std::process::exit(130);
    });
}
