//! Network namespaces made by a test, removed when dropped.
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A named network namespace (`ip netns add`), loopback up, deleted on drop.
pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

impl Netns {
    /// Creates `<prefix><unique>` with `lo` up.
    pub fn new(prefix: &str) -> io::Result<Netns> {
        let name = crate::unique(prefix);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle for a thread that already entered a namespace with
    /// [`enter`]: `run`/`spawn` then stay in it. Not deleted on drop.
    pub fn attach_current() -> Netns {
        Netns {
            name: String::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`, as `-netns` and `nsenter --net=` take it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `ip <args>` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs a shell command line inside the namespace and returns its output.
    pub fn sh(&self, script: &str) -> io::Result<Output> {
        self.command("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()
    }

    /// Like [`Netns::sh`] but fails with the command's stderr when it exits non-zero.
    pub fn sh_ok(&self, script: &str) -> io::Result<String> {
        let out = self.sh(script)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "in {}: `{script}` failed: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a new thread that has entered this namespace; sockets made
    /// there (and by threads it spawns, such as a tokio runtime's workers)
    /// belong to the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        if self.name.is_empty() {
            // Attached: enter the namespace of the calling thread.
            let path = std::path::PathBuf::from(format!("/proc/self/task/{}/ns/net", unsafe {
                libc::gettid()
            }));
            return std::thread::spawn(move || {
                enter(&path).expect("setns");
                f()
            });
        }
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path).expect("setns");
            f()
        })
    }

    /// Runs `f` in the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("thread in netns panicked")
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &std::path::Path) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns with a valid open namespace fd only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        // Kill anything left running in the namespace, then delete it.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Connects two namespaces with a veth pair and gives each end the addresses
/// given (CIDR notation, IPv4 or IPv6; IPv6 without DAD so it is usable at once).
pub fn veth(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> io::Result<()> {
    let ia = crate::unique("va");
    let ib = crate::unique("vb");
    ip(&["link", "add", &ia, "type", "veth", "peer", "name", &ib])?;
    ip(&["link", "set", &ia, "netns", a.name()])?;
    ip(&["link", "set", &ib, "netns", b.name()])?;
    for (ns, ifname, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", ifname, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", addr, "dev", ifname])?;
            }
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// Joins namespaces on one Ethernet segment: a bridge in a hub namespace
/// (returned; keep it alive) and a veth pair per member, the member's end
/// with its addresses.
pub fn star(members: &[(&Netns, &[&str])]) -> io::Result<Netns> {
    let hub = Netns::new("vh")?;
    hub.ip(&["link", "add", "br0", "type", "bridge"])?;
    hub.ip(&["link", "set", "br0", "up"])?;
    for (ns, addrs) in members {
        let ia = crate::unique("va");
        let ib = crate::unique("vb");
        ip(&["link", "add", &ia, "type", "veth", "peer", "name", &ib])?;
        ip(&["link", "set", &ia, "netns", ns.name()])?;
        ip(&["link", "set", &ib, "netns", hub.name()])?;
        for addr in addrs.iter() {
            ns.ip(&["addr", "add", addr, "dev", &ia])?;
        }
        ns.ip(&["link", "set", &ia, "up"])?;
        hub.ip(&["link", "set", &ib, "master", "br0"])?;
        hub.ip(&["link", "set", &ib, "up"])?;
    }
    Ok(hub)
}

/// The interface name used inside `ns` for the veth end (first non-lo link).
pub fn first_link(ns: &Netns) -> io::Result<String> {
    let out = ns.sh_ok("ip -o link show | awk -F': ' '$2 !~ /^lo/ {print $2; exit}'")?;
    Ok(out.trim().split('@').next().unwrap_or("").to_string())
}
