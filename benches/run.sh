#!/usr/bin/env bash
# Runs the sidecar benchmark (release build) and prints the Markdown table;
# it is also written to bench-results/latest.md. Needs root.
#   benches/run.sh                      # direct, veer and Envoy, 1 worker each
#   benches/run.sh --concurrency 2      # 2 workers each
#   benches/run.sh --only veer --quick  # short phases while developing
# Extra arguments go to the benchmark (see benches/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l >= 0.5) }'; then
  echo "run.sh: load average is $load (>= 0.5): figures will be marked as taken under load" >&2
fi
exec cargo bench --bench sidecars -- "$@"
