//! `veer demo`, the README's first command, run as a user runs it: the real
//! binary, as root, on the embedded default (its development CA, no
//! Consul). It must show the allowed, IPv6, passthrough and denied calls as
//! expected, exit 0, and leave no namespace, process or file behind, also
//! when interrupted with `--keep` and Ctrl-C.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespace names the demo printed ("client namespace NAME: ...").
fn namespaces_in(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("client namespace ")
                .or_else(|| l.strip_prefix("server namespace "))?;
            Some(rest.split(':').next()?.to_string())
        })
        .collect()
}

/// The two tests count the sidecars of UID 5995: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn veer_processes_running_as_proxy() -> usize {
    let out = Command::new("pgrep")
        .args(["-u", "5995", "-x", "veer"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The sidecars are killed before the demo exits; their zombies go to
/// init, which may take a moment to reap them.
fn assert_sidecars_gone(before: usize) {
    let end = Instant::now() + Duration::from_secs(5);
    while veer_processes_running_as_proxy() > before && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("ps")
        .args(["-o", "pid,ppid,user,stat,args", "-u", "5995"])
        .output()
        .unwrap();
    assert_eq!(
        veer_processes_running_as_proxy(),
        before,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn demo_shows_each_call_and_cleans_up() {
    if !veer_testsupport::require_root("demo_shows_each_call_and_cleans_up") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = veer_processes_running_as_proxy();
    let t = Instant::now();
    let out = Command::new(bin()).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}\n{stderr}", out.status);
    assert_eq!(
        stdout.matches("[as expected]").count(),
        4,
        "{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("UNEXPECTED"), "{stdout}");
    assert!(stdout.contains("denied_by_intention"), "{stdout}");
    assert!(stdout.contains("veer demo: done"), "{stdout}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    let names = namespaces_in(&stdout);
    assert_eq!(names.len(), 2, "{stdout}");
    let left = netns_list();
    for n in &names {
        assert!(!left.contains(n.as_str()), "{n} left behind: {left}");
    }
    assert_sidecars_gone(before);
}

#[test]
fn demo_keep_tears_down_on_ctrl_c() {
    if !veer_testsupport::require_root("demo_keep_tears_down_on_ctrl_c") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = veer_processes_running_as_proxy();
    let mut child = Command::new(bin())
        .args(["demo", "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        let Some(Ok(l)) = lines.next() else { break };
        seen.push_str(&l);
        seen.push('\n');
        if l.contains("press Ctrl-C") {
            break;
        }
    }
    assert!(seen.contains("press Ctrl-C"), "{seen}");
    let names = namespaces_in(&seen);
    assert_eq!(names.len(), 2, "{seen}");
    let up = netns_list();
    for n in &names {
        assert!(up.contains(n.as_str()), "{n} not up while kept: {up}");
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "demo did not exit after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.code().is_some(), "{status}");
    let left = netns_list();
    for n in &names {
        assert!(!left.contains(n.as_str()), "{n} left behind: {left}");
    }
    assert_sidecars_gone(before);
}
