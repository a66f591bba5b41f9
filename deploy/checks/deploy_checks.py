#!/usr/bin/env python3
"""The logic behind .ci/deploy-checks.sh: one subcommand per check, each printing what it looked at
and exiting non-zero on the first problem class it finds (all problems of that class are listed).

Run from the repository root. Needs PyYAML; `k8s-schemas` needs kubernetes-validate. Nothing here
talks to the network except to 127.0.0.1 (the e2e subcommands)."""

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

ROOT = Path.cwd()
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "residency-gateway.json"
README = DEPLOY / "README.md"

# Kinds whose schema is not in Kubernetes itself (Prometheus Operator CRDs): checked structurally.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}


class Problems:
    def __init__(self):
        self.items = []

    def __call__(self, msg):
        self.items.append(msg)

    def done(self, ok_msg):
        if self.items:
            for p in self.items:
                print(f"problem: {p}")
            sys.exit(1)
        print(ok_msg)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def deploy_files(suffixes):
    for p in sorted(DEPLOY.rglob("*")):
        if "target" in p.relative_to(DEPLOY).parts or not p.is_file():
            continue
        if p.suffix in suffixes:
            yield p


# --------------------------------------------------------------------------------------------------
def cmd_parse(_args):
    bad = Problems()
    n = 0
    for p in deploy_files({".yml", ".yaml", ".json"}):
        rel = p.relative_to(ROOT)
        try:
            if p.suffix == ".json":
                json.loads(p.read_text())
                print(f"  {rel}: JSON ok")
            else:
                docs = load_docs(p)
                print(f"  {rel}: YAML ok, {len(docs)} document(s)")
            n += 1
        except Exception as e:  # noqa: BLE001 - report every parser's error the same way
            bad(f"{rel}: {e}")
    bad.done(f"{n} YAML/JSON files parse")


# --------------------------------------------------------------------------------------------------
# Rendering the kustomization: kubectl kustomize / kustomize build, or this assembly when neither
# exists (or DEPLOY_CHECKS_KUSTOMIZE=python): resources, configMapGenerator (without the name hash),
# namespace, labels (metadata only, as includeSelectors: false does) and images.

def python_kustomize(root):
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs = []
    for r in k.get("resources", []):
        docs += load_docs(root / r)
    for g in k.get("configMapGenerator", []):
        data = {}
        for f in g.get("files", []):
            key, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[key] = (root / src).read_text()
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    ns = k.get("namespace")
    images = {i["name"]: i for i in k.get("images", [])}
    for d in docs:
        md = d.setdefault("metadata", {})
        if ns and d["kind"] not in CLUSTER_SCOPED:
            md["namespace"] = ns
        for entry in k.get("labels", []):
            md.setdefault("labels", {}).update(entry.get("pairs", {}))
        for c in pod_containers(d):
            name, _, tag = c["image"].partition(":")
            if name in images:
                i = images[name]
                c["image"] = f"{i.get('newName', name)}:{i.get('newTag', tag or 'latest')}"
    return docs


def cmd_render(args):
    out = Path(args.out)
    mode = os.environ.get("DEPLOY_CHECKS_KUSTOMIZE", "")
    tool = None
    if mode != "python":
        if shutil.which("kubectl"):
            tool = ["kubectl", "kustomize", str(K8S)]
        elif shutil.which("kustomize"):
            tool = ["kustomize", "build", str(K8S)]
    if tool:
        text = subprocess.run(tool, check=True, capture_output=True, text=True, timeout=60).stdout
        out.write_text(text)
        print(f"rendered with: {' '.join(tool[:2])}")
    else:
        docs = python_kustomize(K8S)
        out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        print("rendered with: the Python assembly (no kubectl or kustomize here; ConfigMap names unhashed)")
    docs = load_docs(out)
    for d in docs:
        print(f"  {d['kind']:<24} {d['metadata'].get('namespace', '-'):<18} {d['metadata']['name']}")
    if not docs:
        sys.exit("nothing rendered")


# --------------------------------------------------------------------------------------------------
def crd_structure(d, bad):
    name = f"{d['kind']}/{d['metadata']['name']}"
    if d.get("apiVersion") != "monitoring.coreos.com/v1":
        bad(f"{name}: apiVersion {d.get('apiVersion')} is not monitoring.coreos.com/v1")
    spec = d.get("spec") or {}
    if d["kind"] == "ServiceMonitor":
        if not isinstance(spec.get("selector", {}).get("matchLabels"), dict):
            bad(f"{name}: spec.selector.matchLabels missing")
        eps = spec.get("endpoints")
        if not isinstance(eps, list) or not eps:
            bad(f"{name}: spec.endpoints missing")
        for ep in eps or []:
            allowed = {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels", "relabelings",
                       "metricRelabelings", "targetPort", "bearerTokenSecret", "authorization", "tlsConfig"}
            for key in ep:
                if key not in allowed:
                    bad(f"{name}: unexpected endpoint key {key}")
            if not isinstance(ep.get("port"), str):
                bad(f"{name}: endpoint port must be a Service port name")
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not re.fullmatch(r"\d+(ms|s|m|h)", str(ep[key])):
                    bad(f"{name}: {key} {ep[key]!r} is not a Prometheus duration")
    elif d["kind"] == "PrometheusRule":
        groups = spec.get("groups")
        if not isinstance(groups, list) or not groups:
            bad(f"{name}: spec.groups missing")
        for g in groups or []:
            for r in g.get("rules", []):
                if ("record" in r) == ("alert" in r) or "expr" not in r:
                    bad(f"{name}: group {g.get('name')}: a rule needs exactly one of record/alert, and expr")


def cmd_k8s_schemas(args):
    from kubernetes_validate import utils as kv  # installed by .ci/deploy-checks.sh

    bad = Problems()
    docs = [(args.rendered, d) for d in load_docs(args.rendered)]
    for extra in args.extra:
        docs += [(extra, d) for d in load_docs(extra)]
    for version in args.versions:
        n = 0
        for src, d in docs:
            name = f"{d['kind']}/{d['metadata']['name']}"
            if d["kind"] in CRD_KINDS:
                continue
            try:
                kv.validate(d, version, strict=True)
                n += 1
            except Exception as e:  # noqa: BLE001
                bad(f"Kubernetes {version}: {name} ({Path(src).name}): {str(e).splitlines()[0]}")
        print(f"  Kubernetes {version} (strict): {n} resources valid")
    for _, d in docs:
        if d["kind"] in CRD_KINDS:
            crd_structure(d, bad)
            print(f"  {d['kind']}/{d['metadata']['name']}: no schema offline, checked structurally")
    bad.done("Kubernetes manifests valid")


# --------------------------------------------------------------------------------------------------
def pod_spec(d):
    if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return d["spec"]["template"]["spec"]
    if d.get("kind") == "Pod":
        return d["spec"]
    return None


def pod_containers(d):
    spec = pod_spec(d)
    return (spec.get("initContainers", []) + spec.get("containers", [])) if spec else []


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def gateway_toml(rendered_docs):
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib

    for d in rendered_docs:
        if d["kind"] == "ConfigMap" and "gateway.toml" in d.get("data", {}):
            return tomllib.loads(d["data"]["gateway.toml"]), d["metadata"]["name"]
    return None, None


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def cmd_k8s_consistency(args):
    bad = Problems()
    docs = load_docs(args.rendered)
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    gw = deployments.get("residency-gateway")
    if not gw:
        bad("no Deployment residency-gateway")
        bad.done("")
    cfg, cfg_name = gateway_toml(docs)
    if cfg is None:
        bad("no ConfigMap with gateway.toml")
        bad.done("")

    def pods_for(selector):
        return [dep for dep in deployments.values()
                if matches(selector, dep["spec"]["template"]["metadata"].get("labels", {}))]

    # Every workload: non-root, read-only root, no capabilities, resources.
    for dep in deployments.values():
        name = dep["metadata"]["name"]
        ps = pod_spec(dep)
        if not matches(dep["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"]):
            bad(f"Deployment {name}: selector does not match its pod labels")
        psc = ps.get("securityContext", {})
        for c in pod_containers(dep):
            sc = c.get("securityContext", {})
            where = f"Deployment {name} container {c['name']}"
            if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot"))):
                bad(f"{where}: runAsNonRoot is not set")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad(f"{where}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                bad(f"{where}: capabilities.drop is not [ALL]")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                if "memory" not in res.get(kind, {}) or "cpu" not in res.get(kind, {}):
                    bad(f"{where}: resources.{kind} needs cpu and memory")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad(f"Deployment {name}: pod seccompProfile is not RuntimeDefault")

    # The gateway container against gateway.toml.
    ps = pod_spec(gw)
    c = ps["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    listen, admin = cfg["server"]["listen"], cfg["server"].get("admin_listen")
    if ports.get("https") != port_of(listen):
        bad(f"containerPort https {ports.get('https')} != server.listen {listen}")
    if not admin or ports.get("admin") != port_of(admin):
        bad(f"containerPort admin {ports.get('admin')} != server.admin_listen {admin}")
    for addr in (listen, admin or ""):
        if addr and not (addr.startswith("0.0.0.0:") or addr.startswith("[::]:")):
            bad(f"{addr}: the pod must listen on all interfaces for the Service and the probes")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("admin", ports.get("admin")):
            bad(f"{probe} must GET {path} on the admin port, not {get}")
    grace = float(cfg["server"].get("shutdown_grace_seconds", 30))
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    tgps = ps.get("terminationGracePeriodSeconds", 30)
    if tgps < pre_stop + grace + 1:
        bad(f"terminationGracePeriodSeconds {tgps} < preStop sleep {pre_stop} + shutdown_grace_seconds {grace} + 1")
    print(f"  termination: preStop sleep {pre_stop}s + drain {grace:g}s <= terminationGracePeriodSeconds {tgps}s")
    args_ = c.get("args", [])
    mount = next((m for m in c.get("volumeMounts", []) if m["name"] == "config"), None)
    if not mount or "-c" not in args_ or not args_[args_.index("-c") + 1].startswith(mount["mountPath"] + "/"):
        bad(f"the -c path in args {args_} is not inside the config volume mount")
    volumes = {v["name"]: v for v in ps.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        if m["name"] not in volumes:
            bad(f"volumeMount {m['name']} has no volume")
    if c.get("image", "").split(":")[0] == "residency-gateway":
        bad("the image was not replaced by kustomization.yaml's images entry")
    print(f"  image {c.get('image')}")

    # The projected volume against the rendered ConfigMaps and the Secret template.
    cms = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    secrets = {d["metadata"]["name"]: d for d in load_docs(K8S / "secret.example.yaml")}
    paths = []
    for src in volumes.get("config", {}).get("projected", {}).get("sources", []):
        if "configMap" in src:
            ref = src["configMap"]
            cm = cms.get(ref["name"])
            if not cm:
                bad(f"projected configMap {ref['name']} is not rendered")
                continue
            keys = set(cm.get("data", {}))
            items = {i["key"] for i in ref.get("items", [])}
            if keys != items:
                bad(f"ConfigMap {ref['name']}: keys {sorted(keys)} but projected items {sorted(items)}")
            paths += [i["path"] for i in ref.get("items", [])]
        if "secret" in src:
            ref = src["secret"]
            sec = secrets.get(ref["name"])
            if not sec:
                bad(f"projected Secret {ref['name']} is not in secret.example.yaml")
                continue
            keys = set(sec.get("stringData", {})) | set(sec.get("data", {}))
            for i in ref.get("items", []):
                if i["key"] not in keys:
                    bad(f"Secret {ref['name']} has no key {i['key']}")
            paths += [i["path"] for i in ref.get("items", [])]
    for need in (cfg["server"]["tls"]["cert"], cfg["server"]["tls"]["key"], cfg["admin"].get("token_file")):
        if need and need not in paths:
            bad(f"gateway.toml names {need}, which the projected volume does not provide")
    policy_dir = cfg.get("policy", {}).get("dir", "policies")
    policy_files = sorted(p for p in paths if p.startswith(policy_dir + "/"))
    repo_policies = sorted(f"{policy_dir}/{p.name}" for p in (ROOT / "policies").glob("*.toml"))
    if policy_files != repo_policies:
        bad(f"projected policies {policy_files} != policies/ {repo_policies}")
    print(f"  projected into {mount['mountPath'] if mount else '?'}: {', '.join(paths)}")

    # State backend against the Redis Service.
    state = cfg.get("state", {})
    services = {d["metadata"]["name"]: d for d in by_kind.get("Service", [])}
    if state.get("backend") != "redis":
        bad("several replicas need [state] backend = \"redis\"")
    else:
        u = urllib.parse.urlparse(state["url"])
        svc = services.get(u.hostname)
        if not svc or (u.port or 6379) not in [p["port"] for p in svc["spec"]["ports"]]:
            bad(f"[state] url {state['url']} names no rendered Service and port")
        elif not pods_for(svc["spec"]["selector"]):
            bad(f"Service {u.hostname} selects no pod")
        print(f"  [state] {state['url']} -> Service {u.hostname}")

    # Services: selectors and target ports.
    for name, svc in services.items():
        targets = pods_for(svc["spec"].get("selector", {}))
        if not targets:
            bad(f"Service {name} selects no pod")
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for dep in targets:
                names = {cp.get("name") for c2 in pod_containers(dep) for cp in c2.get("ports", [])}
                nums = {cp["containerPort"] for c2 in pod_containers(dep) for cp in c2.get("ports", [])}
                if tp not in names and tp not in nums:
                    bad(f"Service {name} targetPort {tp} is not a port of {dep['metadata']['name']}")
        print(f"  Service {name} ({svc['spec'].get('type', 'ClusterIP')}): "
              + ", ".join(f"{p['port']}->{p.get('targetPort')}" for p in svc["spec"]["ports"]))
    data_svc = services.get("residency-gateway")
    if data_svc and any(p.get("targetPort") in ("admin", ports.get("admin")) for p in data_svc["spec"]["ports"]):
        bad("the data Service exposes the admin port")

    # ServiceMonitor -> admin Service -> port.
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"]["matchLabels"]
        chosen = [s for s in services.values() if matches(sel, s["metadata"].get("labels", {}))]
        if len(chosen) != 1:
            bad(f"ServiceMonitor selects {len(chosen)} Services, not 1")
        for s in chosen:
            names = {p.get("name") for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if ep["port"] not in names:
                    bad(f"ServiceMonitor port {ep['port']} is not a port of Service {s['metadata']['name']}")
                if ep.get("path") != "/metrics":
                    bad("ServiceMonitor path is not /metrics")
            print(f"  ServiceMonitor -> Service {s['metadata']['name']} port {sm['spec']['endpoints'][0]['port']}")

    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for d in by_kind.get(kind, []):
            sel = (d["spec"].get("selector") or d["spec"].get("podSelector") or {}).get("matchLabels", {})
            if not pods_for(sel):
                bad(f"{kind} {d['metadata']['name']} selects no pod")
    for h in by_kind.get("HorizontalPodAutoscaler", []):
        ref = h["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            bad(f"HPA targets {ref}, not a rendered Deployment")
        if h["spec"].get("minReplicas", 1) < 2:
            bad("HPA minReplicas < 2: one pod cannot drain without an outage")
        if "replicas" in deployments.get(ref["name"], {}).get("spec", {}):
            bad(f"Deployment {ref['name']} sets replicas although the HPA owns them (every apply resets the count)")
        print(f"  HPA {ref['name']}: {h['spec'].get('minReplicas')}..{h['spec']['maxReplicas']} replicas")
    bad.done("manifests consistent with each other and with gateway.toml")


# --------------------------------------------------------------------------------------------------
def cmd_materialize(args):
    """Lays out the gateway pod's projected volume from the rendered ConfigMaps and the Secret files
    in --secrets (DIR/<secret name>/<key>), and prints the config path to check."""
    docs = load_docs(args.rendered)
    gw = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "residency-gateway")
    ps = pod_spec(gw)
    c = ps["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    vol = next(v for v in ps["volumes"] if v["name"] == "config")
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    out = Path(args.out)
    for src in vol["projected"]["sources"]:
        if "configMap" in src:
            ref = src["configMap"]
            for i in ref["items"]:
                dst = out / i["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_text(cms[ref["name"]]["data"][i["key"]])
        if "secret" in src:
            ref = src["secret"]
            for i in ref["items"]:
                dst = out / i["path"]
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(args.secrets) / ref["name"] / i["key"], dst)
    config = c["args"][c["args"].index("-c") + 1]
    rel = Path(config).relative_to(mount["mountPath"])
    print(out / rel)


# --------------------------------------------------------------------------------------------------
def github_slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def readme_anchors():
    anchors = set()
    in_code = False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            anchors.add(github_slug(m.group(1)))
    return anchors


def exported_metrics():
    """Metric names src/metrics.rs registers, with the namespace prefix."""
    text = (ROOT / "src" / "metrics.rs").read_text()
    ns = re.search(r'const NS: &str = "([a-z_]+)"', text).group(1)
    names = set(re.findall(r'"([a-z][a-z0-9_]*_(?:total|seconds|entries))"', text))
    return {f"{ns}_{n}" for n in names}


RECORD_NAME = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")


def metric_refs(expr):
    """Raw metric names an expression reads (recording rule names taken out first)."""
    refs = set()
    for m in re.findall(r"\bresidency_gateway_[a-z0-9_]+", RECORD_NAME.sub(" ", expr)):
        refs.add(re.sub(r"_(bucket|sum|count)$", "", m))
    return refs


def cmd_rules_meta(_args):
    bad = Problems()
    metrics = exported_metrics()
    anchors = readme_anchors()
    records, alerts = set(), []
    for f in sorted(PROM.glob("*.yml")):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                if "record" in r:
                    records.add(r["record"])
                else:
                    alerts.append((f.name, r))
                for m in metric_refs(r["expr"]):
                    if m not in metrics:
                        bad(f"{f.name}: {r.get('record') or r.get('alert')} reads {m}, which src/metrics.rs does not export")
    for f, r in alerts:
        name = r["alert"]
        sev = r.get("labels", {}).get("severity")
        if sev not in ("critical", "warning", "info"):
            bad(f"{name}: severity {sev!r}")
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                bad(f"{name}: no {key} annotation")
        frag = urllib.parse.urlparse(ann.get("runbook_url", "")).fragment
        if not ann.get("runbook_url", "").split("#")[0].endswith("deploy/README.md"):
            bad(f"{name}: runbook_url does not point at deploy/README.md")
        if frag != name.lower():
            bad(f"{name}: runbook anchor #{frag} is not #{name.lower()}")
        if frag not in anchors:
            bad(f"{name}: deploy/README.md has no heading for #{frag}")
        for rec in RECORD_NAME.findall(r["expr"]):
            if rec not in records:
                bad(f"{name}: reads recording rule {rec}, which no rule file records")
        print(f"  {name} ({sev}) -> README#{frag}")
    print(f"  {len(records)} recording rules, {len(alerts)} alerts; metrics read exist in src/metrics.rs")
    bad.done("alert metadata, runbook anchors and metric names ok")


def cmd_prometheusrule_same(_args):
    """prometheusrule.yaml holds exactly the groups of the rule files."""
    pr = load_docs(K8S / "prometheusrule.yaml")[0]
    groups = []
    for f in ("recording-rules.yml", "alerts.yml"):
        groups += yaml.safe_load((PROM / f).read_text())["groups"]
    if pr["spec"]["groups"] != groups:
        sys.exit("prometheusrule.yaml groups differ from deploy/prometheus/*.yml")
    print(f"prometheusrule.yaml has the same {len(groups)} groups as deploy/prometheus/*.yml")


# --------------------------------------------------------------------------------------------------
def dashboard_queries():
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["refId"], t["expr"]))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            out.append((f"annotation {a['name']}", "-", a["expr"]))
    return dash, out


def substitute(expr):
    for var, val in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h")):
        expr = expr.replace(var, val)
    return re.sub(r"\$\{?(namespace|job|route)\}?", ".*", expr)


def cmd_dashboard(args):
    bad = Problems()
    dash, queries = dashboard_queries()
    if not 36 <= dash.get("schemaVersion", 0) <= 41:
        bad(f"schemaVersion {dash.get('schemaVersion')} is not ~39")
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource" and v.get("query") == "prometheus"]
    if len(ds_vars) != 1:
        bad("no Prometheus datasource variable")
    ds = "${" + ds_vars[0]["name"] + "}" if ds_vars else None
    ids = [p["id"] for p in dash["panels"]]
    if len(ids) != len(set(ids)):
        bad("panel ids are not unique")
    for p in dash["panels"]:
        if "gridPos" not in p:
            bad(f"panel {p['title']}: no gridPos")
        if p["type"] != "row" and p.get("datasource", {}).get("uid") != ds:
            bad(f"panel {p['title']}: datasource is not {ds}")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != ds:
                bad(f"panel {p['title']} {t['refId']}: datasource is not {ds}")
    titles = " | ".join(p["title"] for p in dash["panels"] if p["type"] != "row")
    for want in ("outcome", "jurisdiction and reason", "monitor mode", "hit ratio", "Token service latency",
                 "Upstream latency"):
        if want.lower() not in titles.lower():
            bad(f"no panel about {want!r}")
    records = set()
    for f in PROM.glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            records |= {r["record"] for r in g["rules"] if "record" in r}
    metrics = exported_metrics()
    for title, ref, expr in queries:
        for rec in RECORD_NAME.findall(expr):
            if rec not in records:
                bad(f"{title} {ref}: recording rule {rec} is not recorded by deploy/prometheus")
        for m in metric_refs(expr):
            if m not in metrics:
                bad(f"{title} {ref}: {m} is not exported by src/metrics.rs")
    # Every query as a recording rule, for `promtool check rules` to parse.
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}:check", "expr": substitute(e)} for i, (_, _, e) in enumerate(queries)]}]}
    Path(args.rules_out).write_text(yaml.safe_dump(rules, sort_keys=False))
    Path(args.queries_out).write_text(json.dumps([{"title": t, "ref": r, "expr": substitute(e)} for t, r, e in queries]))
    print(f"  {len([p for p in dash['panels'] if p['type'] != 'row'])} panels, {len(queries)} queries, "
          f"datasource variable {ds}, schemaVersion {dash['schemaVersion']}")
    bad.done("dashboard structure ok")


# --------------------------------------------------------------------------------------------------
def dockerfile_instructions(path):
    lines, cur = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        lines.append(cur)
        cur = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def ignore_regex(pattern):
    pattern = pattern.strip().rstrip("/")
    if pattern.startswith("/"):
        pattern = pattern[1:]
    res, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            res += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            res += ".*"
            i += 2
            continue
        res += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
        i += 1
    return re.compile(res + r"\Z")


def docker_context(files, ignore_file):
    """Files of the build context under Docker's .dockerignore rules: patterns in order, the last
    that matches the path or one of its parent directories decides; `!` re-includes."""
    pats = []
    for line in ignore_file.read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        neg = s.startswith("!")
        pats.append((neg, ignore_regex(s[1:] if neg else s)))
    keep = []
    for f in files:
        parts = f.split("/")
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        excluded = False
        for neg, rx in pats:
            if any(rx.match(c) for c in candidates):
                excluded = not neg
        if not excluded:
            keep.append(f)
    return keep


def cmd_dockerfile(_args):
    bad = Problems()
    df = DEPLOY / "Dockerfile"
    ins = dockerfile_instructions(df)
    froms = [rest for word, rest in ins if word == "FROM"]
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), f) for f in froms]
    print(f"  stages: {resolved}")
    if len(froms) < 2:
        bad("not a multi-stage build")
    if not resolved[0].startswith("rust:1-bookworm"):
        bad(f"build stage is {resolved[0]}, not rust:1-bookworm")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    if "cargo build --release --locked" not in runs:
        bad("the build stage does not run cargo build --release --locked")
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    words = {w for w, _ in final}
    for need in ("USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "VOLUME"):
        if need not in words:
            bad(f"the runtime stage has no {need}")
    user = next((r for w, r in final if w == "USER"), "")
    if not re.fullmatch(r"[1-9]\d*(:\d+)?", user):
        bad(f"USER {user!r} is not a numeric non-root user (runAsNonRoot can only verify numbers)")
    expose = set(next((r for w, r in final if w == "EXPOSE"), "").split())
    if expose != {"8443", "9090"}:
        bad(f"EXPOSE {expose}, not 8443 9090")
    if any(w == "RUN" for w, _ in final):
        bad("RUN in the runtime stage: distroless has no shell")
    # The context BuildKit sends, and the COPY sources in it.
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], check=True, capture_output=True,
                           text=True).stdout.split()
    files = [f for f in files if (ROOT / f).is_file()]
    ctx = docker_context(files, DEPLOY / "Dockerfile.dockerignore")
    size = sum((ROOT / f).stat().st_size for f in ctx)
    print(f"  build context: {len(ctx)} of {len(files)} files, {size / 1024:.0f} KiB "
          "(deploy/Dockerfile.dockerignore)")
    for w, rest in ins:
        if w != "COPY" or "--from=" in rest:
            continue
        srcs = [s for s in rest.split() if not s.startswith("--")][:-1]
        for s in srcs:
            s = s.rstrip("/")
            if not any(f == s or f.startswith(s + "/") for f in ctx):
                bad(f"COPY {s}: not in the build context")
    for must_not in ("target/", ".git/"):
        if any(f.startswith(must_not) for f in ctx):
            bad(f"{must_not} is in the build context")
    cargo = (ROOT / "Cargo.toml").read_text()
    for bench in re.findall(r'\[\[bench\]\]\s*name\s*=\s*"([^"]+)"', cargo):
        if f"benches/{bench}.rs" not in ctx:
            bad(f"benches/{bench}.rs (declared in Cargo.toml) is not in the build context")
    for inc in re.findall(r'include_str!\("\.\./([^"]+)"\)', (ROOT / "src" / "dev.rs").read_text()):
        if inc not in ctx:
            bad(f"{inc} (include_str! in src/dev.rs) is not in the build context")
    bad.done("Dockerfile structure and build context ok")


# --------------------------------------------------------------------------------------------------
def cmd_dev_traffic(args):
    """Runs the curl commands `residency-gateway dev` printed, --rounds times, and checks each status."""
    text = Path(args.dev_stdout).read_text().splitlines()
    cases, expect, what = [], None, ""
    for line in text:
        if m := re.match(r"# (.*)\(expect (\d{3})\)", line):
            what, expect = m.group(1).strip(), m.group(2)
        elif line.startswith("curl ") and expect:
            cases.append((what, expect, shlex.split(line)))
            expect = None
    if len(cases) < 5:
        sys.exit(f"only {len(cases)} curl commands found in the dev output")
    bad = Problems()
    for rnd in range(args.rounds):
        for what, status, argv in cases:
            got = subprocess.run(argv[:1] + ["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"]
                                 + argv[1:], capture_output=True, text=True, timeout=10).stdout.strip()
            if rnd == 0:
                print(f"  {'ok ' if got == status else 'BAD'} {got} (expect {status}) {what}")
            if got != status:
                bad(f"round {rnd + 1}: {what}: got {got}, expected {status}")
        if rnd + 1 < args.rounds:
            time.sleep(args.pause)
    bad.done(f"{len(cases)} requests x {args.rounds} rounds answered as dev said")


def prom_get(base, path, **params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path}: {body}")
    return body["data"]


def wait_for(what, fn, timeout):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(0.5)
    sys.exit(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def cmd_prom_ready(args):
    wait_for("Prometheus to answer", lambda: prom_get(args.prom, "/api/v1/status/buildinfo"), args.timeout)
    up = wait_for("the gateway target to be scraped (up == 1)",
                  lambda: [r for r in prom_get(args.prom, "/api/v1/query", query="up")["result"]
                           if r["value"][1] == "1"], args.timeout)
    print(f"Prometheus scrapes {up[0]['metric'].get('instance')} (job {up[0]['metric'].get('job')})")


def cmd_prom_verify(args):
    bad = Problems()
    base = args.prom
    # 1. The blocked transfer arrived with its labels.
    want = {"route": "orders-us-ca", "jurisdiction": "US-CA", "reason": "region_not_allowed", "data_class": "personal"}

    def blocked():
        res = prom_get(base, "/api/v1/query", query="residency_gateway_transfers_blocked_total")["result"]
        return [r for r in res if all(r["metric"].get(k) == v for k, v in want.items())]

    series = wait_for("the blocked-transfer series", blocked, args.timeout)
    for r in prom_get(base, "/api/v1/query", query="residency_gateway_transfers_blocked_total")["result"]:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(r["metric"].items()) if k != "__name__")
        print(f"  residency_gateway_transfers_blocked_total{{{labels}}} {r['value'][1]}")
    if float(series[0]["value"][1]) < 1:
        bad("the blocked-transfer counter is 0")

    # 2. Every rule loaded and evaluated without error.
    def rules_evaluated():
        groups = prom_get(base, "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return groups if rules and all(r.get("health") != "unknown" for r in rules) else None

    groups = wait_for("every rule to be evaluated once", rules_evaluated, args.timeout)
    n_alerts = n_records = 0
    for g in groups:
        kinds = {}
        for r in g["rules"]:
            kinds[r["type"]] = kinds.get(r["type"], 0) + 1
            if r.get("health") != "ok":
                bad(f"rule {r['name']} in {g['name']}: health {r.get('health')}: {r.get('lastError')}")
        n_alerts += kinds.get("alerting", 0)
        n_records += kinds.get("recording", 0)
        print(f"  rule group {g['name']} ({Path(g['file']).name}): {kinds}, all evaluated")
    expected_alerts = sum(1 for f in PROM.glob("*.yml") for g in yaml.safe_load(f.read_text())["groups"]
                          for r in g["rules"] if "alert" in r)
    if n_alerts != expected_alerts:
        bad(f"{n_alerts} alerting rules loaded, {expected_alerts} in deploy/prometheus")
    alerts = prom_get(base, "/api/v1/alerts")["alerts"]
    print(f"  alerts now: {[(a['labels']['alertname'], a['state']) for a in alerts] or 'none'}")

    # 3. Recording rules the dashboard reads have data from the dev traffic.
    def recorded(q):
        return lambda: [r for r in prom_get(base, "/api/v1/query", query=q)["result"] if float(r["value"][1]) > 0]

    for q in ('route_outcome:residency_gateway_requests:rate5m{outcome="forwarded"}',
              'route_outcome:residency_gateway_requests:rate5m{outcome="blocked"}',
              'route_jurisdiction_reason:residency_gateway_transfers_blocked:rate5m{route="orders-us-ca",jurisdiction="US-CA",reason="region_not_allowed"}',
              'cache:residency_gateway_token_cache_hit:ratio_rate5m'):
        res = wait_for(q, recorded(q), args.timeout)
        print(f"  {q} = {float(res[0]['value'][1]):.3g}")

    # 4. Every dashboard query runs; say which return data.
    for qd in json.loads(Path(args.queries).read_text()):
        try:
            res = prom_get(base, "/api/v1/query", query=qd["expr"])["result"]
            print(f"  dashboard {qd['title']} [{qd['ref']}]: {len(res)} series")
        except Exception as e:  # noqa: BLE001
            bad(f"dashboard {qd['title']} [{qd['ref']}]: {e}")
    bad.done("Prometheus scraped the gateway, loaded and evaluated every rule, dashboard queries run")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("parse")
    p = sub.add_parser("render")
    p.add_argument("--out", required=True)
    p = sub.add_parser("k8s-schemas")
    p.add_argument("--rendered", required=True)
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--versions", nargs="+", required=True)
    p = sub.add_parser("k8s-consistency")
    p.add_argument("--rendered", required=True)
    p = sub.add_parser("materialize")
    p.add_argument("--rendered", required=True)
    p.add_argument("--secrets", required=True)
    p.add_argument("--out", required=True)
    sub.add_parser("rules-meta")
    sub.add_parser("prometheusrule-same")
    p = sub.add_parser("dashboard")
    p.add_argument("--rules-out", required=True)
    p.add_argument("--queries-out", required=True)
    sub.add_parser("dockerfile")
    p = sub.add_parser("dev-traffic")
    p.add_argument("--dev-stdout", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pause", type=float, default=1.5)
    for name in ("prom-ready", "prom-verify"):
        p = sub.add_parser(name)
        p.add_argument("--prom", required=True)
        p.add_argument("--timeout", type=float, default=30)
        if name == "prom-verify":
            p.add_argument("--queries", required=True)
    args = ap.parse_args()
    {
        "parse": cmd_parse, "render": cmd_render, "k8s-schemas": cmd_k8s_schemas,
        "k8s-consistency": cmd_k8s_consistency, "materialize": cmd_materialize, "rules-meta": cmd_rules_meta,
        "prometheusrule-same": cmd_prometheusrule_same, "dashboard": cmd_dashboard, "dockerfile": cmd_dockerfile,
        "dev-traffic": cmd_dev_traffic, "prom-ready": cmd_prom_ready, "prom-verify": cmd_prom_verify,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
