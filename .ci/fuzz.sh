#!/usr/bin/env bash
# Short, bounded fuzzing of every target in fuzz/ (a cargo-fuzz crate with its own workspace): fails on a
# crash, a failed assertion, a leak, an input slower than FUZZ_TIMEOUT seconds or a memory blow-up.
#
# cargo-fuzz needs nightly flags (-Zsanitizer, -Cpasses=sancov); RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them. The first build of fuzz/ takes several minutes (release build of the gateway and
# its dependencies with coverage instrumentation); after it, the runs take FUZZ_SECONDS per target.
#
# New inputs go to a scratch corpus (the first directory given to libFuzzer), so the seeds in
# fuzz/corpus/<target>/ are read, never rewritten. A crashing input is saved under fuzz/artifacts/<target>/.
#
# Environment:
#   FUZZ_SECONDS    time per target (default 20)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 10)
#   FUZZ_TARGETS    targets to run (default: all of `cargo fuzz list`)
#   FUZZ_SANITIZER  address (default, as cargo-fuzz: also checks the unsafe code in dependencies) or none
#                   (a little faster; the gateway itself forbids unsafe code)
#
# Longer runs, by hand (from the repository root):
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run config -- -max_total_time=3600
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run jwt_pre_verify -j 2 -- -max_total_time=3600   # 2 workers
#   FUZZ_SECONDS=600 .ci/fuzz.sh                                                              # all, 10 min each
# A found crash replays with: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>
# (cargo fuzz run keeps what it finds in fuzz/corpus/<target>/ when no other corpus directory is given:
# do not commit those generated files, only hand-picked seeds).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
seconds=${FUZZ_SECONDS:-20}
per_input=${FUZZ_TIMEOUT:-10}
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --help >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --quiet
fi

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
start=$SECONDS
cargo fuzz build --sanitizer "$sanitizer"
echo "fuzz build: $((SECONDS - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# The `config` target writes its fixture (certificate, key, policies) under the temp directory: keep it
# in the scratch directory too.
export TMPDIR="$scratch"
failed=()
for t in $targets; do
  mkdir -p "$scratch/$t" "corpus/$t"
  echo "== fuzz $t for ${seconds}s"
  if ! cargo fuzz run --sanitizer "$sanitizer" "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout="$per_input" -rss_limit_mb=2048 -print_final_stats=1 \
    >"$scratch/$t.log" 2>&1; then
    failed+=("$t")
    tail -n 60 "$scratch/$t.log"
  else
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb)|^Done ' "$scratch/$t.log" | sed 's/^/   /'
  fi
done
echo "fuzzing: $((SECONDS - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAIL: fuzz targets found a problem: ${failed[*]} (inputs under fuzz/artifacts/)"
  exit 1
fi
echo "fuzz: OK"
