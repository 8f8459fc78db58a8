#!/usr/bin/env bash
# veer in Consul-agent mode at mesh scale, against a real Consul 1.8.7 dev
# agent holding N services, each with a sidecar, a passing check on the
# sidecar and a `virtual` tagged address on both (as consul-k8s registers
# them), plus `web` and its sidecar registered with the agent. Runs
# `veer run --sidecar-for web --transparent` and prints one Markdown row:
# time to /ready with every upstream in /config_dump, agent connections,
# idle CPU over 10 s, RSS, how long one health change and one
# deregistration take to reach the snapshot, and what the agent spent.
#
#   benches/agent_scale.sh 2000            # one size
#   benches/agent_scale.sh 500 2000 5000   # several, one row each
#
# Needs: consul (PATH or /opt/veer-tools/bin), python3, ss; builds veer
# (cargo build --bin veer) unless VEER_BIN is set. Everything listens on
# 127.0.0.1; veer's transparent outbound listener takes 127.0.0.1:15001
# and [::1]:15001, which must be free.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${VEER_TOOLS:-/opt/veer-tools}/bin:$PATH"
if [ -z "${VEER_BIN:-}" ]; then
  cargo build --quiet --bin veer
  VEER_BIN="$PWD/target/debug/veer" # the dev profile is optimized (Cargo.toml)
fi
export VEER_BIN
[ $# -gt 0 ] || set -- 2000
exec python3 - "$@" <<'PY'
import http.client, json, os, shutil, socket, subprocess, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor

CLK = os.sysconf("SC_CLK_TCK")
NODES = 20  # Kubernetes nodes the services are spread over

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

def rss_mib(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"):
            return int(l.split()[1]) / 1024
    return 0.0

def conns(pid, port):
    """Established TCP connections of `pid` to 127.0.0.1:port."""
    out = subprocess.run(["ss", "-tnpH", "state", "established", f"dport = :{port}"],
                         capture_output=True, text=True).stdout
    return sum(1 for l in out.splitlines() if f"pid={pid}," in l)

class Api:
    def __init__(self, port):
        self.port = port; self.local = threading.local()
    def call(self, method, path, body=None):
        c = getattr(self.local, "c", None)
        if c is None:
            c = self.local.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = None if body is None else json.dumps(body)
        try:
            c.request(method, path, body=data)
            r = c.getresponse(); b = r.read()
        except (http.client.HTTPException, OSError):
            self.local.c = None
            raise
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: {r.status} {b[:200]!r}")
        return json.loads(b) if b else None

def get(port, path, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path); r = c.getresponse(); return r.status, r.read()
    finally:
        c.close()

def addr(i, base):
    return f"{base}.{i // 250}.{i % 250 + 1}"

def service(i):
    node = f"k8s-node-{i % NODES}"
    pod, vip = addr(i, "10.21"), addr(i, "10.96")
    tagged = {"virtual": {"Address": vip, "Port": 80}}
    svc = {"Node": node, "Address": f"10.20.0.{i % NODES + 1}", "SkipNodeUpdate": True,
           "Service": {"ID": f"svc-{i}", "Service": f"svc-{i}", "Port": 8080,
                       "Address": pod, "TaggedAddresses": tagged}}
    side = {"Node": node, "Address": f"10.20.0.{i % NODES + 1}", "SkipNodeUpdate": True,
            "Service": {"ID": f"svc-{i}-sidecar-proxy", "Service": f"svc-{i}-sidecar-proxy",
                        "Kind": "connect-proxy", "Port": 20000, "Address": pod,
                        "TaggedAddresses": tagged,
                        "Proxy": {"DestinationServiceName": f"svc-{i}",
                                  "DestinationServiceID": f"svc-{i}", "LocalServicePort": 8080}},
            "Check": check(i, "passing")}
    return svc, side

def check(i, status):
    return {"Node": f"k8s-node-{i % NODES}", "CheckID": f"svc-{i}-sidecar-proxy-ready",
            "Name": "ready", "ServiceID": f"svc-{i}-sidecar-proxy", "Status": status}

def run(n):
    tmp = tempfile.mkdtemp(prefix="veer-agent-scale-")
    hp = free_port()
    args = ["consul", "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
            "-http-port", str(hp), "-grpc-port", "-1", "-dns-port", "-1",
            "-serf-lan-port", str(free_port()), "-serf-wan-port", str(free_port()),
            "-server-port", str(free_port()),
            "-hcl", "limits { http_max_conns_per_client = 200 }"]  # Consul's default, stated
    agent = subprocess.Popen(args, stdout=open(f"{tmp}/consul.log", "w"), stderr=subprocess.STDOUT)
    veer = None
    try:
        api = Api(hp)
        for _ in range(200):
            try:
                if get(hp, "/v1/status/leader")[1].strip(b'"\n'): break
            except OSError: pass
            time.sleep(0.1)
        inbound, admin = free_port(), free_port()
        api.call("PUT", "/v1/agent/service/register", {
            "Name": "web", "ID": "web", "Port": free_port(), "Address": "127.0.0.1",
            "Connect": {"SidecarService": {"Port": inbound}}})
        t = time.time()
        for i in range(NODES):
            api.call("PUT", "/v1/catalog/register",
                     {"Node": f"k8s-node-{i}", "Address": f"10.20.0.{i + 1}"})
        def reg(i):
            for body in service(i):
                api.call("PUT", "/v1/catalog/register", body)
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(reg, range(n)))
        reg_s = time.time() - t
        names = api.call("GET", "/v1/catalog/services")
        assert len(names) == 2 * n + 3, len(names)  # + consul, web, web-sidecar-proxy
        time.sleep(1)
        agent_t0 = cpu_ticks(agent.pid)
        log = open(f"{tmp}/veer.log", "w")
        t0 = time.time()
        veer = subprocess.Popen([os.environ["VEER_BIN"], "run", "--sidecar-for", "web",
                                 "--transparent", "--http-addr", f"http://127.0.0.1:{hp}",
                                 "--admin-bind", f"127.0.0.1:{admin}"],
                                stdout=log, stderr=subprocess.STDOUT)
        peak = 0
        while True:
            if veer.poll() is not None:
                raise RuntimeError(f"veer exited {veer.returncode}; see {tmp}/veer.log")
            peak = max(peak, conns(veer.pid, hp))
            try:
                if get(admin, "/ready", 2)[0] == 200: break
            except OSError: pass
            if time.time() - t0 > 120: raise RuntimeError("not ready within 120 s")
            time.sleep(0.02)
        ready_s = time.time() - t0
        agent_start_cpu = (cpu_ticks(agent.pid) - agent_t0) / CLK
        veer_start_cpu = cpu_ticks(veer.pid) / CLK
        dump = json.loads(get(admin, "/config_dump", 30)[1])
        ups = {u["name"]: u for u in dump["upstreams"]}
        present = sum(1 for i in range(n) if ups.get(f"svc-{i}", {}).get("endpoints")
                      and ups[f"svc-{i}"]["virtual_ips"])
        for _ in range(30):  # a second to settle, watching connections
            peak = max(peak, conns(veer.pid, hp)); time.sleep(0.1)
        time.sleep(2)
        idle_conns = conns(veer.pid, hp)
        v0, a0 = cpu_ticks(veer.pid), cpu_ticks(agent.pid)
        time.sleep(10)
        idle_cpu = (cpu_ticks(veer.pid) - v0) / CLK / 10 * 100
        agent_idle = (cpu_ticks(agent.pid) - a0) / CLK / 10 * 100
        rss, agent_rss = rss_mib(veer.pid), rss_mib(agent.pid)

        def applied():
            return open(f"{tmp}/veer.log").read().count("snapshot applied (consul)")
        def wait_change(what, ok):
            before = applied(); t1 = time.time(); what()
            while time.time() - t1 < 30:
                if applied() > before:
                    d = json.loads(get(admin, "/config_dump", 30)[1])
                    if ok({u["name"]: u for u in d["upstreams"]}):
                        return time.time() - t1
                    before = applied()
                time.sleep(0.005)
            return float("nan")
        k = n // 2
        health_s = wait_change(
            lambda: api.call("PUT", "/v1/catalog/register",
                             {"Node": f"k8s-node-{k % NODES}", "Address": f"10.20.0.{k % NODES + 1}",
                              "SkipNodeUpdate": True, "Check": check(k, "critical")}),
            lambda u: u.get(f"svc-{k}") is not None and not u[f"svc-{k}"]["endpoints"])
        j = n // 3
        dereg_s = wait_change(
            lambda: [api.call("PUT", "/v1/catalog/deregister",
                              {"Node": f"k8s-node-{j % NODES}", "ServiceID": sid})
                     for sid in (f"svc-{j}-sidecar-proxy", f"svc-{j}")],
            lambda u: f"svc-{j}" not in u)
        peak = max(peak, conns(veer.pid, hp))
        print(f"| {n} | {ready_s:.2f} s ({veer_start_cpu:.2f} s CPU) | {present}/{n} | {peak} (idle {idle_conns}) | "
              f"{idle_cpu:.2f} % | {rss:.1f} MiB | {health_s * 1000:.0f} ms | {dereg_s * 1000:.0f} ms | "
              f"{agent_start_cpu:.2f} s | {agent_idle:.2f} % | {agent_rss:.0f} MiB | {reg_s:.0f} s |",
              flush=True)
    finally:
        for p in (veer, agent):
            if p is not None and p.poll() is None:
                p.terminate()
                try: p.wait(10)
                except subprocess.TimeoutExpired: p.kill(); p.wait()
        if os.environ.get("KEEP"):
            print(f"(logs kept in {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

print("| services | ready (veer CPU until then) | upstreams present at ready | veer→agent connections, peak | "
      "veer idle CPU (10 s) | veer RSS | health change applied | deregistration applied | "
      "agent CPU until ready | agent idle CPU | agent RSS | registering took |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
load = open("/proc/loadavg").read().split()[0]
for n in sys.argv[1:]:
    run(int(n))
print(f"\nload average before the runs: {load} on {os.cpu_count()} CPUs")
PY
