#!/usr/bin/env python3
"""Generates what the load benchmark needs, with `cryptography` only (no PyJWT):

  ca.crt, server.crt, server.key   a CA and a P-256 certificate for localhost/127.0.0.1, used by both proxies
  jwt.key, jwt.pub.pem, jwks.json   the RS256 signing key, its public key (HAProxy) and a JWKS (gateway)
  pool.txt                          POOL distinct valid tokens, one a line (the reused-token mode)
  fresh-1.txt ... fresh-K.txt       FRESH distinct valid tokens in K equal files (one per fresh round), none
                                    in pool.txt or in another file (the fresh-token mode)
  cases.json                        tokens for the sanity check both proxies must pass before any load:
                                    name -> {token, expect}; the statuses are the gateway's decisions

Tokens: RS256, kid "bench-rsa", iss/aud as given, iat now, exp now + 1 h, allowed_regions ["EEA"], a unique
jti and sub. Signing is spread over every CPU (an RSA-2048 signature is ~0.5-1 ms).

usage: gen.py OUTDIR --pool 1000 --fresh 200000 --fresh-files 1 --iss ISS --aud AUD
"""

import argparse
import base64
import datetime
import ipaddress
import json
import multiprocessing
import os
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

KID = "bench-rsa"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_int(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())
    os.chmod(path, mode)


def make_pki(out):
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "residency-gateway load bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    write(os.path.join(out, "ca.crt"), ca.public_bytes(pem))
    write(os.path.join(out, "server.crt"), leaf.public_bytes(pem))
    write(
        os.path.join(out, "server.key"),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    # HAProxy wants the certificate and its key in one file.
    write(
        os.path.join(out, "server.pem"),
        leaf.public_bytes(pem)
        + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )


def make_jwt_key(out):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write(os.path.join(out, "jwt.key"), pem, 0o600)
    pub = key.public_key()
    write(
        os.path.join(out, "jwt.pub.pem"),
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    nums = pub.public_numbers()
    jwk = {"kty": "RSA", "kid": KID, "use": "sig", "alg": "RS256", "n": b64_int(nums.n), "e": b64_int(nums.e)}
    write(os.path.join(out, "jwks.json"), json.dumps({"keys": [jwk]}))


_KEY = None
_ARGS = None


def _init_worker(key_pem, args):
    global _KEY, _ARGS
    _KEY = serialization.load_pem_private_key(key_pem, password=None)
    _ARGS = args


def _mint(job):
    """Signs tokens [start, end) of series `tag`; returns them joined by newlines."""
    tag, start, end = job
    iss, aud, iat = _ARGS
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": KID}, separators=(",", ":")).encode())
    lines = []
    for i in range(start, end):
        claims = {
            "iss": iss,
            "aud": aud,
            "sub": f"user-{tag}-{i}",
            "iat": iat,
            "exp": iat + 3600,
            "jti": f"{tag}-{i:07d}",
            "allowed_regions": ["EEA"],
        }
        signing_input = header + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
        sig = _KEY.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        lines.append(signing_input + "." + b64(sig))
    return "\n".join(lines) + "\n"


def make_cases(out, iss, aud, key_pem):
    """A few tokens each proxy must answer identically, so the comparison is between equal jobs."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    now = int(time.time())
    header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": KID}, separators=(",", ":")).encode())

    def mint(**over):
        claims = {"iss": iss, "aud": aud, "sub": "case", "iat": now, "exp": now + 3600, "allowed_regions": ["EEA"]}
        claims.update(over)
        claims = {k: v for k, v in claims.items() if v is not None}
        signing_input = header + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
        return signing_input + "." + b64(key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()))

    valid = mint()
    head, payload, sig = valid.split(".")
    forged = head + "." + b64(json.dumps({"iss": iss, "aud": aud, "exp": now + 3600,
                                          "allowed_regions": ["EEA"], "sub": "forged"}).encode()) + "." + sig
    cases = {
        "valid": (valid, 200),
        "regions_us_then_eea": (mint(allowed_regions=["US", "EEA"]), 200),
        "no_token": (None, 401),
        "expired": (mint(iat=now - 7200, exp=now - 600), 401),
        "wrong_aud": (mint(aud="other-api"), 401),
        "wrong_iss": (mint(iss="https://evil.example/"), 401),
        "forged_payload": (forged, 401),
        "regions_us": (mint(allowed_regions=["US"]), 403),
        "no_regions_claim": (mint(allowed_regions=None), 403),
    }
    with open(os.path.join(out, "cases.json"), "w") as f:
        json.dump({k: {"token": t, "expect": e} for k, (t, e) in cases.items()}, f, indent=1)


def make_tokens(out, name, tag, count, pool, chunk=2000):
    jobs = [(tag, s, min(s + chunk, count)) for s in range(0, count, chunk)]
    with open(os.path.join(out, name), "w") as f:
        for text in pool.imap(_mint, jobs):
            f.write(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--fresh", type=int, default=200000)
    ap.add_argument("--fresh-files", type=int, default=1)
    ap.add_argument("--iss", required=True)
    ap.add_argument("--aud", required=True)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    make_pki(a.out)
    make_jwt_key(a.out)
    with open(os.path.join(a.out, "jwt.key"), "rb") as f:
        key_pem = f.read()
    make_cases(a.out, a.iss, a.aud, key_pem)
    iat = int(time.time())
    with multiprocessing.Pool(a.jobs, _init_worker, (key_pem, (a.iss, a.aud, iat))) as pool:
        make_tokens(a.out, "pool.txt", "pool", a.pool, pool, chunk=250)
        per_file = a.fresh // max(1, a.fresh_files)
        for k in range(1, a.fresh_files + 1):
            make_tokens(a.out, f"fresh-{k}.txt", f"fresh{k}", per_file, pool)
    dt = time.time() - t0
    n = a.pool + a.fresh
    print(f"gen: {n} tokens in {dt:.1f} s ({n / dt:.0f}/s), exp {iat + 3600}", file=sys.stderr)


if __name__ == "__main__":
    main()
