#!/usr/bin/env bash
# POST /admin/reload on every gateway pod, for changes that should take effect without a rollout
# (a renewed TLS certificate, or a ConfigMap applied with disableNameSuffixHash; README.md "Changing
# the configuration"). The image has no shell and no curl, so each pod is reached through
# `kubectl port-forward` to its admin port, with the admin token read from the Secret.
#
#   deploy/kubernetes/reload.sh                 # namespace residency-gateway
#   NAMESPACE=gw-staging deploy/kubernetes/reload.sh
#
# Prints each pod's answer and exits 1 if any pod rejected the reload (its errors are in the answer;
# that pod keeps serving its previous config).
set -euo pipefail
ns="${NAMESPACE:-residency-gateway}"
selector="${SELECTOR:-app.kubernetes.io/name=residency-gateway,app.kubernetes.io/component=gateway}"
admin_port="${ADMIN_PORT:-9090}"

tmp="$(mktemp -d)"
pf=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [ -n "$pf" ]; then kill "$pf" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
# The token goes to curl in a file, never on a command line other users could see.
umask 077
printf 'Authorization: Bearer %s\n' \
  "$(kubectl -n "$ns" get secret residency-gateway-admin -o 'jsonpath={.data.token}' | base64 -d)" \
  >"$tmp/auth"

pods="$(kubectl -n "$ns" get pods -l "$selector" --field-selector=status.phase=Running -o name)"
if [ -z "$pods" ]; then
  echo "no running pods match $selector in namespace $ns" >&2
  exit 1
fi
status=0
for pod in $pods; do
  port=$((20000 + RANDOM % 20000))
  kubectl -n "$ns" port-forward "$pod" "$port:$admin_port" >"$tmp/pf.log" 2>&1 &
  pf=$!
  for _ in $(seq 1 50); do
    if curl -s -o /dev/null "http://127.0.0.1:$port/healthz"; then break; fi
    sleep 0.2
  done
  if out="$(curl -sS --max-time 30 -X POST -H @"$tmp/auth" -w ' (HTTP %{http_code})' \
    "http://127.0.0.1:$port/admin/reload")" && [[ "$out" == *"(HTTP 200)" ]]; then
    echo "$pod: reloaded: $out"
  else
    echo "$pod: reload REJECTED: $out" >&2
    status=1
  fi
  kill "$pf" 2>/dev/null || true
  wait "$pf" 2>/dev/null || true
  pf=""
done
exit "$status"
