#!/usr/bin/env bash
# Load benchmark: residency-gateway against HAProxy 2.6 doing the same job (TLS termination, RS256 JWT
# verification, exp/iss/aud checks, a region ACL standing in for the residency decision) and against the bare
# upstream, on 127.0.0.1 only. Bounded in time; stops by itself; cleans up every process it started.
#
#   benches/load.sh [RESULTS_JSON] [driver options]      # default RESULTS_JSON: benches/load-results.json
#
# Examples:
#   benches/load.sh                                      # 3 rounds x 10 s per mode and target, pinned
#   benches/load.sh /tmp/r.json --rounds 1 --duration 5 --fresh-per-round 20000   # a quick look
#   benches/load.sh /tmp/r.json --no-pin                 # let every process use both cores
#   HAPROXY_LOG=0 benches/load.sh                        # HAProxy without its per-request log line
#   benches/load.sh --help                               # every driver option
#
# What it does: installs haproxy and wrk through apt when missing (and python's `cryptography` through pip),
# builds the gateway (`cargo build --release`), then runs benches/load/driver.py, which generates a CA, a
# server certificate, an RSA-2048 signing key, 1,000 pooled tokens and a set of never-reused tokens per
# fresh round (reused from an earlier run while they stay valid > 40 min: a new gateway has seen none of
# them), starts the upstream (HAProxy serving a static 200), HAProxy and the gateway, checks both answer a
# set of tokens identically, measures RSS at 1,000 idle TLS connections, runs the wrk rounds, and prints a
# table (JSON with every round to RESULTS_JSON).
#
# Time bounds: the build gets BUILD_TIMEOUT seconds (default 1800), the benchmark TIME_LIMIT (default 900).
set -euo pipefail
cd "$(dirname "$0")/.."

out=benches/load-results.json
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  out=$1
  shift
fi
BUILD_TIMEOUT=${BUILD_TIMEOUT:-1800}
TIME_LIMIT=${TIME_LIMIT:-900}
work=target/load-bench
mkdir -p "$work"
pidfile=$work/pids
: > "$pidfile"

cleanup() {
  # Only the processes this run started (the driver records each pid; it stops them itself on a normal end).
  if [ -s "$pidfile" ]; then
    while read -r pid; do
      if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; fi
    done < "$pidfile"
    sleep 1
    while read -r pid; do
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done < "$pidfile"
  fi
  if [ -n "${driver_pid:-}" ] && kill -0 "$driver_pid" 2>/dev/null; then kill -TERM "$driver_pid" || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

need=()
command -v haproxy >/dev/null || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "[load] installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
haproxy_build=$(haproxy -vv 2>/dev/null || true)
if [[ $haproxy_build != *USE_OPENSSL=1* ]]; then
  echo "[load] this haproxy has no OpenSSL: jwt_verify needs it" >&2
  exit 1
fi
if ! python3 -c 'import cryptography' 2>/dev/null; then
  echo "[load] installing python cryptography" >&2
  timeout 600 python3 -m pip install -q cryptography
fi
# HAProxy and 1,000 idle connections need file descriptors.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "[load] cargo build --release (slow the first time)" >&2
timeout "$BUILD_TIMEOUT" cargo build --release --quiet

echo "[load] $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg) before the run" >&2
timeout --signal=TERM --kill-after=30 "$((TIME_LIMIT + 60))" \
  python3 benches/load/driver.py --out "$out" --time-limit "$TIME_LIMIT" "$@" &
driver_pid=$!
wait "$driver_pid"
