#!/usr/bin/env bash
# Which veer functions a target's corpus reaches, from libFuzzer's own
# -print_coverage=1 (no extra build, no llvm-tools needed; uses the binaries
# `cargo fuzz build` made (AddressSanitizer: -print_coverage needs a
# sanitizer runtime), and llvm-symbolizer from PATH).
#
#   fuzz/coverage.sh TARGET [FILE_PATTERN]
#
# Replays fuzz/corpus/TARGET and fuzz/seeds/TARGET once (-runs=0) and prints,
# per source file of crates/ matching FILE_PATTERN (default: any), how many
# of its instrumented functions were reached, then the functions never
# reached (derived Debug impls left out). The edge counts libFuzzer prints
# per function include sanitizer and overflow-check edges that a correct
# program never takes, so they are shown only as a total.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
t="${1:?usage: $0 TARGET [FILE_PATTERN]}"
pat="${2:-.}"
host="$(rustc -vV | sed -n 's/^host: //p')"
# -print_coverage needs a sanitizer runtime: use AddressSanitizer builds
# (`cargo fuzz build`, or `FUZZ_SANITIZER=address fuzz/run-short.sh`).
bin=""
for d in target target/short-address; do
    if [[ -x "$d/$host/release/$t" ]]; then bin="$d/$host/release/$t"; break; fi
done
if [[ -z "$bin" ]]; then
    echo "build first (with AddressSanitizer): cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz build $t" >&2
    exit 2
fi
dirs=()
for d in "corpus/$t" "seeds/$t"; do [[ -d "$d" ]] && dirs+=("$d"); done
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
"$bin" "${dirs[@]}" -runs=0 -print_coverage=1 >"$log" 2>&1 || true
grep -E "^(COVERED|UNCOVERED)_FUNC" "$log" |
    grep -E "/crates/[^ ]+:[0-9]+$" |
    grep -vE " as core::fmt::Debug>::fmt " |
    grep -E "$pat" |
    awk '
    {
        kind = $1; split($5, e, "/"); loc = $NF; sub(/:[0-9]+$/, "", loc); sub(/.*\/crates\//, "", loc)
        name = $6; for (i = 7; i < NF; i++) name = name " " $i
        total[loc]++; edges_t[loc] += e[2]; edges_c[loc] += e[1]
        if (kind == "COVERED_FUNC:") cov[loc]++; else miss[loc] = miss[loc] "\n    " name
    }
    END {
        for (f in total) printf "%-40s functions %3d/%-3d edges %4d/%d\n", f, cov[f], total[f], edges_c[f], edges_t[f] | "sort"
        close("sort")
        for (f in miss) printf "never reached in %s:%s\n", f, miss[f]
    }'
