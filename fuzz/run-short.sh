#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time.
#
#   fuzz/run-short.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 10; TARGET defaults to all of them.
# For each target it first replays fuzz/regressions/<target>/* (inputs that
# once crashed), then fuzzes from fuzz/seeds/<target>/ (committed, read only)
# into fuzz/corpus/<target>/ (git-ignored, grows across runs), with
# fuzz/dicts/<target>.dict when there is one. Crashes land in
# fuzz/artifacts/<target>/ (git-ignored).
#
# Exits 1 if any target crashed (or a regression input still crashes), 2 if
# the build failed. Prints executions ("iterations") and coverage per target.
#
# Works on a stable toolchain: installs cargo-fuzz if it is missing and sets
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z flags) unless rustc is a nightly.
#
# Environment:
#   FUZZ_SANITIZER          none (default: the code under test is safe Rust,
#                           and AddressSanitizer makes the cold build about
#                           twice as slow) or address (what `cargo fuzz run`
#                           uses; for long runs). Debug assertions and
#                           overflow checks are on either way.
#
# Binaries go to fuzz/target/short[-<sanitizer>]/, apart from the ones
# `cargo fuzz run` builds, so that neither rebuilds the other's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

secs="${1:-10}"
if [[ $# -gt 0 ]]; then shift; fi
all_targets=(spiffe_parse uri_san config_parse intentions route duration consul_api expose_http)
if [[ $# -gt 0 ]]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [[ "$secs" -lt 1 ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi

start_all=$SECONDS

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep nightly >/dev/null; then
    export RUSTC_BOOTSTRAP=1
fi
host="$(rustc -vV | sed -n 's/^host: //p')"

san="${FUZZ_SANITIZER:-none}"
tdir="$here/target/short"
[[ "$san" == none ]] || tdir="$here/target/short-$san"

echo "== building ${#all_targets[@]} fuzz targets (cargo fuzz build, $host, sanitizer $san)"
build_start=$SECONDS
if ! cargo fuzz build --target "$host" --sanitizer "$san" --codegen-units 16 --target-dir "$tdir"; then
    echo "BUILD FAILED" >&2
    exit 2
fi
build_secs=$((SECONDS - build_start))
bindir="$tdir/$host/release"

logdir="$here/target/run-short-logs"
mkdir -p "$logdir"
failed=()
summary=()
for t in "${targets[@]}"; do
    bin="$bindir/$t"
    if [[ ! -x "$bin" ]]; then
        echo "no such fuzz target: $t" >&2
        failed+=("$t(missing)")
        continue
    fi
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$logdir/$t.log"

    # 1. Regression inputs: must not crash any more.
    if compgen -G "regressions/$t/*" >/dev/null; then
        if ! "$bin" -artifact_prefix="artifacts/$t/" regressions/"$t"/* >"$logdir/$t.regressions.log" 2>&1; then
            echo "== $t: a regression input crashes:"
            grep -m1 -A4 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer" "$logdir/$t.regressions.log" || tail -20 "$logdir/$t.regressions.log"
            echo "   (log: $logdir/$t.regressions.log)"
            failed+=("$t(regression)")
            summary+=("$(printf '%-14s %12s %10s %8s %6s  %s' "$t" "-" "-" "-" "-" "REGRESSION CRASHES")")
            continue
        fi
    fi

    # 2. Fuzz.
    dict=()
    if [[ -f "dicts/$t.dict" ]]; then dict=("-dict=dicts/$t.dict"); fi
    seeds=()
    if [[ -d "seeds/$t" ]]; then seeds=("seeds/$t"); fi
    echo "== $t: fuzzing for ${secs}s"
    rc=0
    "$bin" "corpus/$t" "${seeds[@]}" "${dict[@]}" \
        -max_total_time="$secs" -timeout=25 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1 || rc=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    [[ -n "$runs" ]] || runs="$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)"
    cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | sed 's/cov: //')"
    ft="$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | sed 's/ft: //')"
    status=ok
    if [[ $rc -ne 0 ]]; then
        status="CRASH (exit $rc)"
        failed+=("$t")
        echo "== $t crashed:"
        grep -m1 -A6 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" || tail -30 "$log"
        grep -E "Test unit written to" "$log" || true
        echo "   (log: $log)"
    fi
    summary+=("$(printf '%-14s %12s %10s %8s %6s  %s' "$t" "${runs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$status")")
done

echo
echo "build: ${build_secs}s, total: $((SECONDS - start_all))s, ${secs}s per target"
printf '%-14s %12s %10s %8s %6s  %s\n' target iterations exec/s "cov" "ft" status
printf '%s\n' "${summary[@]}"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}" >&2
    exit 1
fi
