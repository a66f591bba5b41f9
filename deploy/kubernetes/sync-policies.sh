#!/usr/bin/env bash
# Copies the repository's policies/*.toml into deploy/kubernetes/policies/, where kustomize's
# configMapGenerator can read them (kustomize refuses files outside the kustomization root), and
# removes copies whose original is gone. Run it after changing policies/, then commit both.
# `--check` changes nothing and exits 1 when the copies differ (.ci/deploy-checks.sh runs it).
#
# A new or removed policy file also needs its line in kustomization.yaml (configMapGenerator
# residency-gateway-policies) and in deployment.yaml (the projected volume's items); --check says so.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
src="$here/../../policies"
dst="$here/policies"
mode="${1:-sync}"
case "$mode" in sync | --check) ;; *)
  echo "usage: $0 [--check]" >&2
  exit 2
  ;;
esac

status=0
mkdir -p "$dst"
for f in "$src"/*.toml; do
  name="$(basename "$f")"
  if ! cmp -s "$f" "$dst/$name"; then
    if [ "$mode" = --check ]; then
      echo "differs: deploy/kubernetes/policies/$name (run deploy/kubernetes/sync-policies.sh)"
      status=1
    else
      cp "$f" "$dst/$name"
      echo "copied policies/$name"
    fi
  fi
  for list in kustomization.yaml deployment.yaml; do
    if ! grep -q "policies/$name" "$here/$list"; then
      echo "missing: policies/$name is not listed in deploy/kubernetes/$list"
      status=1
    fi
  done
done
for f in "$dst"/*.toml; do
  [ -e "$f" ] || continue
  name="$(basename "$f")"
  if [ ! -e "$src/$name" ]; then
    if [ "$mode" = --check ]; then
      echo "stale: deploy/kubernetes/policies/$name has no original in policies/"
      status=1
    else
      rm "$f"
      echo "removed policies/$name (also drop it from kustomization.yaml and deployment.yaml)"
    fi
  fi
done
exit "$status"
