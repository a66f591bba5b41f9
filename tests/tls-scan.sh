#!/usr/bin/env bash
# TLS scan of the data-plane listener with testssl.sh, using the `[server.tls]` section of
# gateway.toml.example as shipped (the default allowlist), on loopback only.
#
# Fails when SSLv2/SSLv3/TLS 1.0/TLS 1.1, a NULL, anonymous, export, LOW (DES/RC2/RC4), 3DES/IDEA or CBC
# suite, or any suite that is not ECDHE + AEAD is offered; when secure renegotiation is missing or
# client-initiated renegotiation is possible; and on any finding of severity MEDIUM, HIGH or CRITICAL that
# is not in the explicit ignore list below.
#
# The gateway gets certificates made here (a CA and, in turn, an ECDSA P-256 and an RSA-2048 leaf valid for
# 90 days), so the scan covers both the ECDSA and the RSA suites of the allowlist. testssl is told about
# the CA (--add-ca), runs with no DNS lookups (--nodns none, the target is an IP) and without
# --phone-out (no CRL/OCSP fetches): it talks to 127.0.0.1 only.
#
# Usage: tests/tls-scan.sh            (2-4 minutes; installs testssl.sh and jq with apt if missing)
#        KEEP=1 tests/tls-scan.sh     keep the work directory (configs, testssl logs and JSON)
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
need=()
command -v testssl >/dev/null || command -v testssl.sh >/dev/null || need+=(testssl.sh)
command -v jq >/dev/null || need+=(jq)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
TESTSSL=$(command -v testssl || command -v testssl.sh)

cargo build --quiet --bin residency-gateway
BIN=${CARGO_TARGET_DIR:-target}/debug/residency-gateway

work=$(mktemp -d)
gw_pid=""
cleanup() {
  if [ -n "$gw_pid" ]; then kill "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$work"; else echo "work directory kept: $work"; fi
}
trap cleanup EXIT

# --- certificates -----------------------------------------------------------------------------------
openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key" 2>/dev/null
openssl req -x509 -new -key "$work/ca.key" -sha256 -days 365 -subj "/CN=tls-scan test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$work/ca.pem" 2>/dev/null
cat >"$work/leaf.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
EOF
issue() { # issue NAME KEYGEN-ARGS...
  local name=$1
  shift
  openssl genpkey "$@" -out "$work/$name.key" 2>/dev/null
  openssl req -new -key "$work/$name.key" -subj "/CN=localhost" -out "$work/$name.csr" 2>/dev/null
  openssl x509 -req -in "$work/$name.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 90 -sha256 -extfile "$work/leaf.ext" -out "$work/$name.crt" 2>/dev/null
  cat "$work/ca.pem" >>"$work/$name.crt"
}
issue ecdsa -algorithm EC -pkeyopt ec_paramgen_curve:P-256
issue rsa -algorithm RSA -pkeyopt rsa_keygen_bits:2048
cp -r policies "$work/policies"

# --- ignore list --------------------------------------------------------------------------------------
# Each entry is a testssl finding id that may be MEDIUM or worse without failing the scan, and why.
#
#  cipher_order     "NOT a cipher order configured" (HIGH in testssl 3.0). The gateway lets the client
#                   pick among the allowlist, as Mozilla's intermediate profile prescribes ("cipher
#                   preference: client chooses"): every suite offered is ECDHE + AEAD, so there is no weak
#                   choice to steer a client away from, and clients without AES hardware can prefer
#                   ChaCha20. Ignored only while that holds: the checks below fail on any offered suite
#                   that is not ECDHE + AEAD, before the ignore list is consulted.
#  cert_revocation  "Neither CRL nor OCSP URI provided" (HIGH). A property of the certificate, which this
#                   script made up with a throwaway CA; operators bring their own certificates. Not a
#                   property of the gateway's TLS settings, which are what this scan checks.
#
# Not ignored, because they do not occur: certificate trust (the CA is passed with --add-ca), validity
# period (90 days), key size. HSTS "not offered" is LOW in testssl 3.0 and so does not fail the scan (an
# API gateway's clients are programs, not browsers; see the report in issue 6).
IGNORE='["cipher_order", "cert_revocation"]'

# --- one scan per certificate type --------------------------------------------------------------------
scan() { # scan NAME TESTSSL-CHECKS...
  local name=$1 cfg="$work/$1.toml" log="$work/$1.gateway.log" json="$work/$1.testssl.json"
  shift
  {
    printf '[server]\nlisten = "127.0.0.1:0"\nshutdown_grace_seconds = 1\n\n'
    awk '/^\[server\.tls\]/{f=1; print; next} /^\[/{f=0} f' gateway.toml.example |
      sed -E "s|^cert = .*|cert = \"$work/$name.crt\"|; s|^key = .*|key = \"$work/$name.key\"|"
    printf '\n[policy]\ndir = "%s/policies"\n\n[state]\nbackend = "file"\npath = "%s/%s.state.json"\n' \
      "$work" "$work" "$name"
  } >"$cfg"
  grep -q "^cipher_suites" "$cfg" || { echo "FAIL: no [server.tls] cipher_suites taken from the example"; exit 1; }

  "$BIN" check -c "$cfg" >/dev/null
  "$BIN" run -c "$cfg" >"$log" 2>&1 &
  gw_pid=$!
  local addr=""
  for _ in $(seq 1 100); do
    addr=$(grep 'residency-gateway listening' "$log" | grep -oE '127\.0\.0\.1:[0-9]+' | head -n1 || true)
    [ -n "$addr" ] && break
    kill -0 "$gw_pid" 2>/dev/null || { cat "$log"; echo "FAIL: the gateway did not start"; exit 1; }
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$log"; echo "FAIL: no listening address in the gateway's log"; exit 1; }

  echo "== $name certificate: testssl on $addr"
  local start=$SECONDS
  timeout 240 "$TESTSSL" --quiet --color 0 --nodns none --warnings off --connect-timeout 5 \
    --openssl-timeout 5 --add-ca "$work/ca.pem" --jsonfile "$json" "$@" "$addr" \
    >"$work/$name.testssl.txt" 2>&1 || true
  echo "   testssl took $((SECONDS - start)) s"
  kill "$gw_pid" 2>/dev/null || true
  wait "$gw_pid" 2>/dev/null || true
  gw_pid=""
  [ -s "$json" ] || { cat "$work/$name.testssl.txt"; echo "FAIL: testssl wrote no JSON"; exit 1; }

  local fail=0
  check() { # check LABEL JQ-FILTER-THAT-PRINTS-OFFENDING-FINDINGS
    local bad
    bad=$(jq -r "$2" "$json")
    if [ -n "$bad" ]; then
      echo "FAIL ($name): $1"
      printf '   %s\n' "$bad"
      fail=1
    fi
  }
  # Something was scanned at all.
  check "TLS 1.2 / 1.3 not found offered" \
    '[.[] | select(.id == "TLS1_2" or .id == "TLS1_3") | select(.finding | startswith("offered"))]
     | if length == 2 then empty else "TLS 1.2 and 1.3 should both be offered" end'
  check "an obsolete protocol is offered" \
    '.[] | select(.id | IN("SSLv2", "SSLv3", "TLS1", "TLS1_1")) | select(.finding != "not offered")
     | "\(.id): \(.finding)"'
  check "a weak cipher category is offered" \
    '.[] | select(.id | IN("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW",
                           "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"))
     | select(.finding | startswith("not offered") | not) | "\(.id): \(.finding)"'
  check "RC4 is offered" '.[] | select(.id == "RC4") | select(.severity != "OK") | "\(.id): \(.finding)"'
  check "a suite that is not ECDHE + AEAD is offered" \
    '.[] | select(.id | startswith("cipher-tls")) | .finding
     | select((test("TLS_AES_|TLS_CHACHA20_POLY1305_|ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)") | not)
              or test("CBC|RC4|DES|NULL|EXP|anon|PSK"; "i"))'
  check "no per-suite list (the cipher test did not run)" \
    '[.[] | select(.id | startswith("cipher-tls"))] | if length > 0 then empty else "no cipher-tls* findings" end'
  check "renegotiation" \
    '.[] | select((.id == "secure_renego" and .severity != "OK") or (.id == "secure_client_renego" and .severity != "OK"))
     | "\(.id): \(.severity) \(.finding)"'
  local bad
  bad=$(jq -r --argjson ignore "$IGNORE" \
    '.[] | select(.severity | IN("MEDIUM", "HIGH", "CRITICAL")) | select(.id | IN($ignore[]) | not)
     | "\(.severity) \(.id): \(.finding)"' "$json")
  if [ -n "$bad" ]; then
    echo "FAIL ($name): findings of severity MEDIUM or worse"
    printf '   %s\n' "$bad"
    fail=1
  fi
  echo "   offered:"
  jq -r '.[] | select(.id | startswith("cipher-tls")) | .finding | split(" ") | map(select(. != "")) | "     \(.[0]) \(.[1]) \(.[3])"' "$json"
  echo "   not OK / INFO (ignored ones marked):"
  jq -r --argjson ignore "$IGNORE" \
    '.[] | select(.severity | IN("LOW", "MEDIUM", "HIGH", "CRITICAL", "WARN"))
     | "     \(.severity) \(.id): \(.finding)\(if (.id | IN($ignore[])) then "   [ignored, see tests/tls-scan.sh]" else "" end)"' "$json"
  [ "$fail" = 0 ] || { echo "testssl output: $work/$name.testssl.txt"; KEEP=1; exit 1; }
}

# ECDSA: protocols (-p), cipher categories (-s), forward secrecy (-f), every suite per protocol (-E),
# vulnerabilities incl. renegotiation (-U), server defaults and certificate (-S), preference (-P), HTTP
# headers (-h). RSA: only what depends on the key type (suites, FS, ROBOT and the rest of -U), to stay
# within about 4 minutes in all.
scan ecdsa -p -s -f -E -U -S -P -h
scan rsa -p -s -f -E -U
echo "tls-scan took $SECONDS s"
echo "tls-scan: OK"
