#!/usr/bin/env python3
"""The load benchmark behind benches/load.sh: residency-gateway against HAProxy 2.6 doing the same job, and
against the bare upstream ("direct"), on 127.0.0.1 only, every phase bounded in time.

Phases: generate (or reuse) certificates, keys and tokens; start the upstream, HAProxy and the gateway;
check that both proxies answer a set of tokens identically; warm up; measure RSS at N idle TLS
connections; then rounds of wrk in each token mode, alternating the targets; report a table and JSON.

Run it through benches/load.sh, which builds the gateway and installs haproxy and wrk first.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLK_TCK = os.sysconf("SC_CLK_TCK")
ISS = "https://idp.bench.local/"
AUD = "orders-api"
TARGETS = ("direct", "gateway", "haproxy")


def log(msg):
    print(f"[load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# /proc readings


def cpu_seconds(pid):
    """utime + stime of every thread of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def system_busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])
    idle = v[3] + v[4]
    return (total - idle) / CLK_TCK


def established(port):
    """Established TCP connections whose local port is `port` (the server's side)."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "01" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        n += 1
        except FileNotFoundError:
            pass
    return n


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


# ------------------------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process the benchmark starts, so each one is stopped, whatever happens."""

    def __init__(self, pidfile):
        self.procs = {}
        self.pidfile = pidfile

    def start(self, name, argv, cpus=None, stdout=subprocess.DEVNULL, stderr=None, env=None, stdin=None):
        if cpus is not None:
            argv = ["taskset", "-c", cpus] + argv
        p = subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=stdin, env=env, start_new_session=True)
        self.procs[name] = p
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid}\n")
        return p

    def stop(self, name, grace=5):
        p = self.procs.pop(name, None)
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def stop_all(self):
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                log(f"stopping {name}: {e}")


def pin(pid, cpus):
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], check=True, stdout=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------------------
# Setup


def tokens_ready(tdir, want):
    """Reuses tokens from an earlier run when they were made for the same counts and stay valid long enough:
    each run starts a new gateway, whose cache has seen none of them."""
    try:
        with open(os.path.join(tdir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    fresh_left = meta.get("exp", 0) - time.time()
    return {k: meta.get(k) for k in want} == want and fresh_left > 40 * 60


def generate(tdir, a):
    want = {"pool": a.pool, "fresh": a.fresh_tokens, "iss": ISS, "aud": AUD}
    if not a.regenerate and tokens_ready(tdir, want):
        log(f"reusing certificates, keys and tokens in {tdir} (from an earlier run, still valid > 40 min)")
        return
    shutil.rmtree(tdir, ignore_errors=True)
    n = a.fresh_tokens
    log(f"generating a CA, a certificate, an RSA-2048 key, {a.pool} pool tokens and {n} fresh tokens")
    t0 = time.time()
    subprocess.run(
        [sys.executable, os.path.join(HERE, "gen.py"), tdir, "--pool", str(a.pool), "--fresh", str(n),
         "--fresh-files", "1", "--iss", ISS, "--aud", AUD],
        check=True, timeout=a.gen_timeout,
    )
    with open(os.path.join(tdir, "meta.json"), "w") as f:
        json.dump(dict(want, exp=int(t0) + 3600), f)


def fill(template, out, values):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise RuntimeError(f"{template}: no value for {sorted(set(left))}")
    with open(out, "w") as f:
        f.write(text)


def gateway_config(path, tdir, ports, a):
    text = f"""# Written by benches/load/driver.py.
[server]
listen = "127.0.0.1:{ports['gateway']}"
admin_listen = "127.0.0.1:{ports['admin']}"

[server.tls]
# The default allowlist (TLS 1.2 + 1.3, Mozilla intermediate suites, X25519MLKEM768/X25519/P-256/P-384).
cert = "{tdir}/server.crt"
key = "{tdir}/server.key"

[policy]
dir = "{ROOT}/policies"

[cache]
# Room for every token of the run; entries live until the token's exp (1 h), so the pool stays cached.
max_entries = {a.pool + a.fresh_tokens + 100000}
max_ttl_seconds = 3600

[state]
backend = "file"
path = "state/gateway-state.json"

[[issuers]]
name = "bench"
issuer = "{ISS}"
audiences = ["{AUD}"]
jwks_file = "{tdir}/jwks.json"
algorithms = ["RS256"]

[[routes]]
name = "orders-de"
path_prefix = "/orders"
upstream = "http://127.0.0.1:{ports['upstream']}"
jurisdiction = "DE"
issuers = ["bench"]
"""
    with open(path, "w") as f:
        f.write(text)


def https_get(port, ca, token, path="/orders/sanity"):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            status = int(data.split(b" ", 2)[1])
            return status, s.version(), s.cipher()[0]


def scrape(admin_port):
    """The gateway's token-cache counters from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"hit": 0.0, "miss": 0.0, "valid": 0.0, "forwarded": 0.0}
    for line in text.splitlines():
        if line.startswith("residency_gateway_token_cache_requests_total{"):
            for k in ("hit", "miss"):
                if f'result="{k}"' in line:
                    out[k] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("residency_gateway_token_validations_total{") and 'result="valid"' in line:
            out["valid"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("residency_gateway_requests_total{") and 'outcome="forwarded"' in line:
            out["forwarded"] += float(line.rsplit(" ", 1)[1])
    return out


# ------------------------------------------------------------------------------------------------------
# Measurement


class RssSampler(threading.Thread):
    def __init__(self, pid, every=0.25):
        super().__init__(daemon=True)
        self.pid, self.every, self.max_kib, self.stop = pid, every, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.max_kib = max(self.max_kib, status_kib(self.pid))
            except OSError:
                return
            self.stop.wait(self.every)


def wait_quiet(ctx, label):
    """This machine may be shared (builds, tests): before a run, wait up to --quiet-wait seconds (and
    --quiet-wait-total over the whole benchmark) for the CPU use of everything else to drop below
    --quiet-pct. Returns the seconds waited and the last reading."""
    a = ctx["args"]
    waited, pct = 0.0, 0.0
    while True:
        b0, t0 = system_busy_seconds(), time.time()
        time.sleep(0.5)
        pct = (system_busy_seconds() - b0) / ((time.time() - t0) * os.cpu_count()) * 100
        if pct <= a.quiet_pct or waited >= a.quiet_wait or ctx["quiet_waited"] >= a.quiet_wait_total:
            break
        waited += 0.5
        ctx["quiet_waited"] += 0.5
    if waited:
        log(f"{label}: waited {waited:.0f} s for other load to settle (now {pct:.0f}% of the machine busy)")
    return waited, round(pct, 1)


def run_wrk(ctx, target, mode, tokens, seconds, label):
    a, pids, ports = ctx["args"], ctx["pids"], ctx["ports"]
    waited, idle_pct = wait_quiet(ctx, label) if a.quiet_wait > 0 else (0.0, None)
    url = f"https://localhost:{ports[target]}/orders/{mode}"
    out = os.path.join(ctx["run"], f"wrk-{label}.json")
    env = dict(os.environ, WRK_MODE=mode, WRK_TOKENS=tokens, WRK_THREADS=str(a.threads), WRK_RESULT=out)
    argv = ["wrk", "-t", str(a.threads), "-c", str(a.connections), "-d", f"{seconds}s", "--timeout", "5s",
            "--latency", "-s", os.path.join(HERE, "tokens.lua"), url]
    if a.pin:
        argv = ["taskset", "-c", a.loadgen_cpus] + argv
    tpid = pids[target]
    upid = pids["direct"]
    if a.pin and target == "direct":
        pin(upid, a.target_cpus)
    gw_before = scrape(ports["admin"]) if target == "gateway" else None
    sampler = RssSampler(tpid)
    sampler.start()
    t_cpu0, u_cpu0, c_cpu0, busy0, wall0 = (cpu_seconds(tpid), cpu_seconds(upid), children_cpu(),
                                            system_busy_seconds(), time.time())
    try:
        p = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=seconds + 60)
    finally:
        t_cpu1, u_cpu1, c_cpu1, busy1, wall1 = (cpu_seconds(tpid), cpu_seconds(upid), children_cpu(),
                                                system_busy_seconds(), time.time())
        sampler.stop.set()
        sampler.join()
        if a.pin and target == "direct":
            pin(upid, a.loadgen_cpus)
    with open(os.path.join(ctx["run"], f"wrk-{label}.txt"), "w") as f:
        f.write(p.stdout)
    if p.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"wrk failed on {target} ({p.returncode}):\n{p.stdout}")
    with open(out) as f:
        w = json.load(f)
    secs = w["duration_us"] / 1e6
    req = max(1, w["requests"])
    target_cpu = t_cpu1 - t_cpu0
    up_cpu = u_cpu1 - u_cpu0
    wrk_cpu = c_cpu1 - c_cpu0
    ours = target_cpu + wrk_cpu + (0 if target == "direct" else up_cpu)
    wall = wall1 - wall0
    background = max(0.0, (busy1 - busy0) - ours) / (wall * os.cpu_count()) * 100
    r = {
        "target": target,
        "mode": mode,
        "label": label,
        "requests": w["requests"],
        "seconds": round(secs, 3),
        "rps": round(w["requests"] / secs, 1),
        "latency_ms": {k: round(v / 1000, 3) for k, v in w["latency_us"].items()},
        "errors": w["errors"],
        "non_2xx": w["errors"]["status"],
        "tokens_reused_wraps": w["reused_wraps"],
        "cpu_s": round(target_cpu, 3),
        "cpu_s_per_10k": round(target_cpu / req * 10000, 4),
        "upstream_cpu_s_per_10k": round(up_cpu / req * 10000, 4),
        "loadgen_cpu_s_per_10k": round(wrk_cpu / req * 10000, 4),
        "target_rss_max_mib": round(sampler.max_kib / 1024, 1),
        "background_cpu_pct": round(background, 1),
        "waited_for_quiet_s": waited,
        "busy_pct_before": idle_pct,
    }
    if gw_before is not None:
        after = scrape(ports["admin"])
        r["gateway_cache"] = {k: int(after[k] - gw_before[k]) for k in after}
    bad = sum(w["errors"].values())
    flag = []
    if bad:
        flag.append(f"errors {w['errors']}")
    if w["reused_wraps"] and target == "gateway":
        # Only the gateway caches verdicts: a wrap there means cache hits in what should be a miss-only run.
        flag.append(f"tokens wrapped {w['reused_wraps']}x")
    if mode == "fresh" and gw_before is not None and r["gateway_cache"]["hit"] > 0:
        flag.append(f"{r['gateway_cache']['hit']} cache hits in fresh mode")
    if background > 10:
        flag.append(f"background load {background:.0f}%")
    r["flags"] = flag
    log(f"{label:<22} {r['rps']:>9.0f} req/s  p50 {r['latency_ms']['p50']:>7.2f} ms  "
        f"p99 {r['latency_ms']['p99']:>7.2f} ms  cpu {r['cpu_s_per_10k']:.3f} s/10k  "
        f"rss {r['target_rss_max_mib']} MiB  bg {background:.0f}%" + (f"  !! {'; '.join(flag)}" if flag else ""))
    return r


def perf_run(ctx, mode, tokens):
    """One extra gateway run (not in the results) under `perf record -e cpu-clock -g`; writes the flat
    profile and the inclusive one to the run directory."""
    a, run = ctx["args"], ctx["run"]
    data = os.path.join(run, f"perf-gateway-{mode}.data")
    secs = max(3, a.duration - 2)
    perf = ctx["procs"].start(f"perf-{mode}", ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-g",
                                               "-p", str(ctx["pids"]["gateway"]), "-o", data, "--", "sleep",
                                               str(secs)], stderr=subprocess.DEVNULL)
    r = run_wrk(ctx, "gateway", mode, tokens, a.duration, f"perf-{mode}")
    perf.wait(30)
    out = {}
    for kind, extra in (("self", ["--no-children"]), ("inclusive", ["--children"])):
        text = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "dso,sym", "-g", "none",
                               "--percent-limit", "0.5"] + extra, capture_output=True, text=True,
                              timeout=300).stdout
        path = os.path.join(run, f"perf-gateway-{mode}-{kind}.txt")
        with open(path, "w") as f:
            f.write(text)
        out[kind] = path
    log(f"perf profile of the gateway in {mode} mode ({r['rps']:.0f} req/s while profiled): {out['self']}")
    return out


def idle_rss(ctx, target):
    a, pids, ports, tdir = ctx["args"], ctx["pids"], ctx["ports"], ctx["tokens"]
    pid = pids[target]
    before = status_kib(pid)
    argv = [sys.executable, os.path.join(HERE, "idle.py"), "127.0.0.1", str(ports[target]),
            os.path.join(tdir, "ca.crt"), os.path.join(tdir, "pool.txt"), "-n", str(a.idle_conns),
            "--hold", "90"]
    name = f"idle-{target}"
    p = ctx["procs"].start(name, argv, cpus=a.loadgen_cpus if a.pin else None, stdout=subprocess.PIPE,
                           stdin=subprocess.PIPE)
    result = {}
    try:
        line = [None]

        def read():
            line[0] = p.stdout.readline()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(120)
        if not line[0]:
            raise RuntimeError(f"idle connections to {target} did not open within 120 s")
        opened = json.loads(line[0])
        time.sleep(2)
        at = status_kib(pid)
        result = {
            "target": target,
            "connections_requested": a.idle_conns,
            "connections_opened": opened["opened"],
            "connections_ok": opened["ok"],
            "established_at_server": established(ports[target]),
            "seconds_to_open": opened["seconds"],
            "rss_before_mib": round(before / 1024, 1),
            "rss_idle_mib": round(at / 1024, 1),
            "rss_per_conn_kib": round((at - before) / max(1, opened["opened"]), 1),
            "threads": threads_of(pid),
        }
        if opened.get("error"):
            result["first_error"] = opened["error"]
    finally:
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            pass
        ctx["procs"].stop(name)
    time.sleep(1)
    result["rss_after_close_mib"] = round(status_kib(pid) / 1024, 1)
    log(f"idle {target}: {result['connections_opened']} TLS connections "
        f"({result['established_at_server']} established at the server), RSS {result['rss_before_mib']} -> "
        f"{result['rss_idle_mib']} MiB ({result['rss_per_conn_kib']} KiB/conn), after close "
        f"{result['rss_after_close_mib']} MiB")
    return result


# ------------------------------------------------------------------------------------------------------
# Report


def summarize(rounds):
    out = {}
    for mode in ("pool", "fresh"):
        for target in TARGETS:
            rs = [r for r in rounds if r["mode"] == mode and r["target"] == target]
            if not rs:
                continue
            med = lambda f: round(statistics.median(f(r) for r in rs), 3)  # noqa: E731
            out[f"{mode}/{target}"] = {
                "rounds": len(rs),
                "rps": med(lambda r: r["rps"]),
                "rps_min": min(r["rps"] for r in rs),
                "rps_max": max(r["rps"] for r in rs),
                "p50_ms": med(lambda r: r["latency_ms"]["p50"]),
                "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
                "cpu_s_per_10k": med(lambda r: r["cpu_s_per_10k"]),
                "rss_max_mib": max(r["target_rss_max_mib"] for r in rs),
                "non_2xx": sum(r["non_2xx"] for r in rs),
                "errors": sum(sum(r["errors"].values()) for r in rs),
                "background_cpu_pct_max": max(r["background_cpu_pct"] for r in rs),
            }
    return out


def ratios(summary):
    out = {}
    for mode in ("pool", "fresh"):
        g, h, d = (summary.get(f"{mode}/{t}") for t in ("gateway", "haproxy", "direct"))
        if not g:
            continue
        entry = {}
        for other, name in ((h, "haproxy"), (d, "direct")):
            if other:
                entry[f"gateway/{name}"] = {
                    "rps": round(g["rps"] / other["rps"], 3),
                    "p50": round(g["p50_ms"] / other["p50_ms"], 3),
                    "p99": round(g["p99_ms"] / other["p99_ms"], 3),
                    "cpu_per_req": round(g["cpu_s_per_10k"] / other["cpu_s_per_10k"], 3)
                    if other["cpu_s_per_10k"] else None,
                }
        out[mode] = entry
    return out


def targets_check(summary, rat, idle):
    checks = []
    p = rat.get("pool", {}).get("gateway/haproxy")
    if p:
        checks.append(("pool: gateway rps >= 1.5 x haproxy", p["rps"] >= 1.5, f"{p['rps']:.2f}x"))
        checks.append(("pool: gateway p99 <= haproxy p99", p["p99"] <= 1.0,
                       f"{summary['pool/gateway']['p99_ms']:.2f} vs {summary['pool/haproxy']['p99_ms']:.2f} ms"))
    f = rat.get("fresh", {}).get("gateway/haproxy")
    if f:
        checks.append(("fresh: gateway rps >= 1.0 x haproxy", f["rps"] >= 1.0, f"{f['rps']:.2f}x"))
    gi = next((i for i in idle if i["target"] == "gateway"), None)
    if gi:
        checks.append((f"gateway RSS <= 64 MiB at {gi['connections_opened']} idle TLS conns",
                       gi["rss_idle_mib"] <= 64, f"{gi['rss_idle_mib']} MiB"))
    return [{"target": n, "met": m, "value": v} for n, m, v in checks]


def table(result):
    s, rat, lines = result["summary"], result["ratios"], []
    a = result["settings"]
    lines.append("")
    lines.append(f"residency-gateway vs HAProxy {result['env']['haproxy']} — {a['rounds']} rounds x {a['duration']} s, "
                 f"wrk -t{a['threads']} -c{a['connections']}, "
                 + (f"pinned: target on CPU {a['target_cpus']}, wrk + upstream on CPU {a['loadgen_cpus']}"
                    if a["pin"] else "not pinned"))
    lines.append("medians over rounds; cpu = CPU seconds of the target process per 10k requests")
    hdr = f"{'mode':<6} {'target':<8} {'req/s':>9} {'(min-max)':>17} {'p50 ms':>8} {'p99 ms':>8} " \
          f"{'cpu/10k':>8} {'rss MiB':>8} {'non2xx':>7} {'bg%':>4}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for key, v in s.items():
        mode, target = key.split("/")
        rng = f"{v['rps_min']:.0f}-{v['rps_max']:.0f}"
        lines.append(f"{mode:<6} {target:<8} {v['rps']:>9.0f} {rng:>17} {v['p50_ms']:>8.2f} {v['p99_ms']:>8.2f} "
                     f"{v['cpu_s_per_10k']:>8.3f} {v['rss_max_mib']:>8.1f} {v['non_2xx'] + v['errors']:>7} "
                     f"{v['background_cpu_pct_max']:>4.0f}")
    lines.append("")
    lines.append(f"{'ratio':<26} {'req/s':>7} {'p50':>7} {'p99':>7} {'cpu/req':>8}")
    for mode, entry in rat.items():
        for name, r in entry.items():
            cpu = f"{r['cpu_per_req']:.2f}" if r["cpu_per_req"] is not None else "-"
            lines.append(f"{mode + ' ' + name:<26} {r['rps']:>7.2f} {r['p50']:>7.2f} {r['p99']:>7.2f} {cpu:>8}")
    lines.append("")
    for i in result["idle"]:
        lines.append(f"idle: {i['target']:<8} {i['connections_opened']:>5} TLS conns ({i['established_at_server']} "
                     f"established): RSS {i['rss_before_mib']} -> {i['rss_idle_mib']} MiB "
                     f"({i['rss_per_conn_kib']} KiB/conn)")
    lines.append("")
    for c in result["targets"]:
        lines.append(f"[{'met' if c['met'] else 'MISSED':>6}] {c['target']}: {c['value']}")
    if result["flags"]:
        lines.append("")
        lines.append("flags (results to read with care):")
        for f in result["flags"]:
            lines.append(f"  - {f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benches", "load-results.json"))
    ap.add_argument("--binary", default=os.path.join(ROOT, "target", "release", "residency-gateway"))
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target", "load-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--warmup", type=int, default=3, help="seconds of pool-mode warm-up per target")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--fresh-tokens", type=int, default=200000,
                    help="distinct tokens for the fresh mode; the gateway is restarted (empty cache) before each "
                         "of its fresh rounds, so it never sees a token twice; a round that sends more wraps "
                         "around and is flagged")
    ap.add_argument("--modes", default="pool,fresh")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--no-pin", dest="pin", action="store_false")
    ap.add_argument("--target-cpus", default="1")
    ap.add_argument("--loadgen-cpus", default="0")
    ap.add_argument("--haproxy-log", type=int, default=int(os.environ.get("HAPROXY_LOG", "1")))
    ap.add_argument("--quiet-pct", type=float, default=10,
                    help="before each run, wait while more than this %% of the machine is busy with other work")
    ap.add_argument("--quiet-wait", type=float, default=20, help="at most this long per run")
    ap.add_argument("--quiet-wait-total", type=float, default=150, help="and this long over the whole benchmark")
    ap.add_argument("--perf", action="store_true",
                    help="after the rounds, profile the gateway in each mode with perf (cpu-clock), extra runs")
    ap.add_argument("--regenerate", action="store_true", help="new tokens even if an earlier run's are valid")
    ap.add_argument("--time-limit", type=int, default=900, help="seconds for the whole run, generation included")
    ap.add_argument("--gen-timeout", type=int, default=420)
    a = ap.parse_args()
    if os.cpu_count() < 2 and a.pin:
        log("one CPU only: not pinning")
        a.pin = False

    def bail(signum, _frame):
        raise SystemExit(f"stopped by signal {signum} (time limit {a.time_limit} s or SIGTERM)")

    signal.signal(signal.SIGALRM, bail)
    signal.signal(signal.SIGTERM, bail)
    signal.signal(signal.SIGINT, bail)
    signal.alarm(a.time_limit)

    started = time.time()
    run = os.path.join(a.workdir, "run")
    tdir = os.path.join(a.workdir, "tokens")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    os.makedirs(a.workdir, exist_ok=True)
    procs = Procs(os.path.join(a.workdir, "pids"))
    try:
        generate(tdir, a)
        ports = {"upstream": free_port(), "direct": free_port(), "gateway": free_port(), "admin": free_port(),
                 "haproxy": free_port()}
        fill("upstream.cfg", os.path.join(run, "upstream.cfg"),
             {"DIR": tdir, "UPSTREAM_PORT": ports["upstream"], "DIRECT_PORT": ports["direct"]})
        log_global = "    log stdout format raw local0" if a.haproxy_log else ""
        log_defaults = "    log global\n    option httplog" if a.haproxy_log else "    no log"
        fill("haproxy.cfg", os.path.join(run, "haproxy.cfg"),
             {"DIR": tdir, "UPSTREAM_PORT": ports["upstream"], "HAPROXY_PORT": ports["haproxy"], "ISS": ISS,
              "AUD": AUD, "LOG_GLOBAL": log_global, "LOG_DEFAULTS": log_defaults})
        gateway_config(os.path.join(run, "gateway.toml"), tdir, ports, a)
        for cfg in ("upstream.cfg", "haproxy.cfg"):
            subprocess.run(["haproxy", "-c", "-q", "-f", os.path.join(run, cfg)], check=True, timeout=30)

        tcpu = a.target_cpus if a.pin else None
        lcpu = a.loadgen_cpus if a.pin else None
        errf = lambda n: open(os.path.join(run, f"{n}.err"), "w")  # noqa: E731
        # Started first so the others never wait on it; the gateway is started below (and restarted before
        # each of its fresh rounds).
        up = procs.start("upstream", ["haproxy", "-db", "-f", os.path.join(run, "upstream.cfg")], cpus=lcpu,
                         stderr=errf("upstream"))
        hap = procs.start("haproxy", ["haproxy", "-db", "-f", os.path.join(run, "haproxy.cfg")], cpus=tcpu,
                          stderr=errf("haproxy"))
        for name, p in (("upstream", up), ("haproxy", hap)):
            wait_port(ports["direct" if name == "upstream" else name], 30, p)
        pids = {"direct": up.pid, "haproxy": hap.pid}
        gw_env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        gw_starts = [0]

        def start_gateway():
            procs.stop("gateway")
            gw_starts[0] += 1
            # Audit lines (one JSON line per request) go to stdout: /dev/null, as production would ship them.
            p = procs.start("gateway", [a.binary, "run", "-c", os.path.join(run, "gateway.toml")], cpus=tcpu,
                            stderr=open(os.path.join(run, f"gateway-{gw_starts[0]}.err"), "w"), env=gw_env)
            wait_port(ports["gateway"], 30, p)
            wait_port(ports["admin"], 30, p)
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{ports['admin']}/readyz", timeout=2)
                    break
                except OSError:
                    time.sleep(0.1)
            pids["gateway"] = p.pid
            return p

        gw = start_gateway()
        ctx = {"args": a, "pids": pids, "ports": ports, "run": run, "tokens": tdir, "procs": procs,
               "quiet_waited": 0.0}

        # Both proxies must make the same decisions, over the same TLS.
        with open(os.path.join(tdir, "cases.json")) as f:
            cases = json.load(f)
        sanity, tls = {}, {}
        for target in ("gateway", "haproxy"):
            for name, c in cases.items():
                status, version, cipher = https_get(ports[target], os.path.join(tdir, "ca.crt"), c["token"])
                sanity[f"{target}/{name}"] = status
                tls[target] = f"{version} {cipher}"
                if status != c["expect"]:
                    raise RuntimeError(f"{target} answered {status} to `{name}`, expected {c['expect']}")
        tls["direct"] = " ".join(https_get(ports["direct"], os.path.join(tdir, "ca.crt"), None)[1:])
        log(f"sanity: both proxies answered all {len(cases)} cases as expected; TLS negotiated: {tls}")

        for target in TARGETS:
            run_wrk(ctx, target, "pool", os.path.join(tdir, "pool.txt"), a.warmup, f"warmup-{target}")

        idle = [idle_rss(ctx, t) for t in ("gateway", "haproxy")] if a.idle_conns > 0 else []

        rounds = []
        for mode in a.modes.split(","):
            for r in range(a.rounds):
                order = TARGETS[r % 3:] + TARGETS[:r % 3]
                for target in order:
                    tokens = os.path.join(tdir, "pool.txt" if mode == "pool" else "fresh-1.txt")
                    if mode == "fresh" and target == "gateway":
                        # A new process, an empty cache: every token of the round is one it never saw.
                        gw = start_gateway()
                    rounds.append(run_wrk(ctx, target, mode, tokens, a.duration, f"{mode}-{r + 1}-{target}"))
        profiles = {}
        if a.perf:
            for mode in a.modes.split(","):
                gw = start_gateway()
                tokens = os.path.join(tdir, "pool.txt" if mode == "pool" else "fresh-1.txt")
                if mode == "pool":
                    run_wrk(ctx, "gateway", "pool", tokens, a.warmup, "perf-warmup")
                profiles[mode] = perf_run(ctx, mode, tokens)
        gw_threads = threads_of(gw.pid)
        hap_threads = threads_of(hap.pid)
        gw_rss_end = round(status_kib(gw.pid) / 1024, 1)
        gw_hwm = round(status_kib(gw.pid, "VmHWM") / 1024, 1)
        final_metrics = scrape(ports["admin"])
    finally:
        procs.stop_all()
        signal.alarm(0)

    summary = summarize(rounds)
    rat = ratios(summary)
    flags = sorted({f"{r['label']}: {f}" for r in rounds for f in r["flags"]
                    if not f.startswith("background load")})
    busy = [r for r in rounds if r["background_cpu_pct"] > 10]
    if busy:
        lo, hi = min(r["background_cpu_pct"] for r in busy), max(r["background_cpu_pct"] for r in busy)
        flags.insert(0, f"other processes used {lo:.0f}-{hi:.0f}% of the machine during {len(busy)} of "
                        f"{len(rounds)} runs (a shared machine?): absolute numbers are low, ratios noisy")
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml"],
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        rev, dirty = "", ""
    hv = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()
    result = {
        "settings": {k: getattr(a, k) for k in ("rounds", "duration", "warmup", "threads", "connections", "pool",
                                                "fresh_tokens", "idle_conns", "pin", "target_cpus",
                                                "loadgen_cpus", "haproxy_log", "quiet_pct", "quiet_wait",
                                                "quiet_wait_total")},
        "env": {
            "nproc": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
            "kernel": platform.release(),
            "haproxy": hv[2] if len(hv) > 2 else "",
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0].strip(),
            "gateway_rev": rev + ("+dirty" if dirty else ""),
            "tls": tls,
            "gateway_threads": gw_threads,
            "haproxy_threads": hap_threads,
        },
        "sanity": sanity,
        "idle": idle,
        "summary": summary,
        "ratios": rat,
        "targets": targets_check(summary, rat, idle),
        "gateway_end": {"rss_mib": gw_rss_end, "vm_hwm_mib": gw_hwm, "metrics": final_metrics},
        "flags": flags,
        "profiles": profiles,
        "rounds": rounds,
        "elapsed_s": round(time.time() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    print(f"\nJSON: {a.out}   (per-round data, wrk output: {run}/)   elapsed {result['elapsed_s']} s")


if __name__ == "__main__":
    main()
