"""Offline checks of the Kubernetes manifests in deploy/kubernetes (run by the `kubernetes`
test suite with the project's .venv Python): `k8s_check.py SLLM_BINARY`.

1. Renders the base, each overlay, and the base with every component, with a small renderer
   of the kustomize subset the manifests use (below); where `kubectl` is installed it renders
   each with `kubectl kustomize` too and the two must agree object for object.
2. Validates every rendered object against the OpenAPI schemas of the Kubernetes versions in
   K8S_VERSIONS (strict: unknown fields are errors), from the `kubernetes-validate` package.
   Custom resources (ServiceMonitor, PodMonitor) have no schema there; the wiring checks cover
   what of them matters.
3. Checks the wiring schemas cannot see, against the real binary (`sllm serve --help`,
   `sllm worker --help`): every flag and environment variable a container passes exists; no
   setting is given twice; every `$(VAR)` is defined (in env values: before its use); every
   port a probe, a Service, a monitor or a NetworkPolicy names is a port the process listens
   on, on all interfaces, and gRPC probes ask for services the process serves; every file a
   flag names lies in a mounted volume, and in a Secret volume it is a key the Secret has (in
   the rendered objects, or as docs/kubernetes.md tells the operator to create it); worker
   `--gpus` equals its `nvidia.com/gpu` limit; selectors, scale targets and PDBs find their
   pods.

The kustomize subset: `resources` (files and directories), `components`, `namespace`,
`patches` (a file or inline; a list is a JSON 6902 patch and needs a `target`, a mapping is a
strategic merge patch, with or without a target; `null` removes a field, `$patch: delete` a
list item), `replicas`, `images` and
`configMapGenerator` (files, labels, `disableNameSuffixHash: true`). Anything else in a
kustomization is an error here, so the subset cannot grow unnoticed.

Exit status 0 when everything holds; the problems, one a line, otherwise.
"""

import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

import kubernetes_validate
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default
# from 1.30) and a current one.
K8S_VERSIONS = ["1.30.0", "1.34.0"]
DASHBOARD = "deploy/grafana/sllm-dashboard.json"

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


# ------------------------------------------------------------------------------------------
# Rendering

CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "resources", "components", "namespace", "patches", "replicas",
    "images", "configMapGenerator",
}


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization(dirpath):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        p = os.path.join(dirpath, name)
        if os.path.isfile(p):
            with open(p) as f:
                k = yaml.safe_load(f) or {}
            unknown = set(k) - KUSTOMIZATION_FIELDS
            if unknown:
                raise ValueError(f"{p}: fields outside the supported subset: {sorted(unknown)}")
            return k
    raise ValueError(f"{dirpath}: no kustomization.yaml")


def render(dirpath):
    """The objects `kubectl kustomize dirpath` would print (in no particular order)."""
    k = kustomization(dirpath)
    objects = []
    for r in k.get("resources", []):
        p = os.path.normpath(os.path.join(dirpath, r))
        objects.extend(render(p) if os.path.isdir(p) else load_docs(p))
    for c in k.get("components", []):
        p = os.path.normpath(os.path.join(dirpath, c))
        ck = kustomization(p)
        if ck.get("kind") != "Component":
            raise ValueError(f"{p}: not a Component")
        for r in ck.get("resources", []):
            rp = os.path.normpath(os.path.join(p, r))
            objects.extend(render(rp) if os.path.isdir(rp) else load_docs(rp))
        objects.extend(generate(p, ck))
        transform(p, ck, objects)
    objects.extend(generate(dirpath, k))
    transform(dirpath, k, objects)
    return objects


def generate(dirpath, k):
    out = []
    for g in k.get("configMapGenerator", []):
        options = g.get("options", {})
        if not options.get("disableNameSuffixHash"):
            raise ValueError(f"{dirpath}: configMapGenerator {g['name']} needs disableNameSuffixHash")
        data = {}
        for f in g.get("files", []):
            key, _, rel = f.partition("=") if "=" in f else (os.path.basename(f), "", f)
            with open(os.path.join(dirpath, rel)) as fh:
                data[key] = fh.read()
        meta = {"name": g["name"]}
        if options.get("labels"):
            meta["labels"] = dict(options["labels"])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def matches(obj, target):
    if "kind" in target and obj.get("kind") != target["kind"]:
        return False
    if "name" in target and obj["metadata"].get("name") != target["name"]:
        return False
    if "labelSelector" in target:
        labels = obj["metadata"].get("labels", {})
        for term in re.split(r",(?![^()]*\))", target["labelSelector"]):
            term = term.strip()
            m = re.fullmatch(r"(\S+)\s+in\s+\(([^)]*)\)", term)
            if m:
                if labels.get(m.group(1)) not in [v.strip() for v in m.group(2).split(",")]:
                    return False
            else:
                key, _, value = term.partition("=")
                if labels.get(key) != value:
                    return False
    return True


def transform(dirpath, k, objects):
    for p in k.get("patches", []):
        if "path" in p:
            with open(os.path.join(dirpath, p["path"])) as f:
                patch = yaml.safe_load(f)
        else:
            patch = yaml.safe_load(p["patch"])
        target = p.get("target")
        if isinstance(patch, list):
            if not target:
                raise ValueError(f"{dirpath}: a JSON 6902 patch needs a target")
            hit = [o for o in objects if matches(o, target)]
            for o in hit:
                json6902(o, patch)
        else:
            if target is None:
                target = {"kind": patch["kind"], "name": patch["metadata"]["name"]}
            hit = [o for o in objects if matches(o, target)]
            for i, o in enumerate(objects):
                if matches(o, target):
                    merged = strategic_merge(o, {k2: v for k2, v in patch.items() if k2 != "metadata"}, "")
                    merged["metadata"] = o["metadata"]
                    objects[i] = merged
        if not hit:
            raise ValueError(f"{dirpath}: patch {p} matches nothing")
    ns = k.get("namespace")
    if ns:
        for o in objects:
            if o["kind"] not in CLUSTER_SCOPED:
                o["metadata"]["namespace"] = ns
    for image in k.get("images", []):
        for o in objects:
            for c in containers(o):
                name, tag = split_image(c.get("image", ""))
                if name == image["name"]:
                    name = image.get("newName", name)
                    tag = image.get("newTag", tag)
                    c["image"] = f"{name}:{tag}" if tag else name
    for r in k.get("replicas", []):
        for o in objects:
            if o["metadata"]["name"] == r["name"] and o["kind"] in ("Deployment", "StatefulSet", "ReplicaSet"):
                o["spec"]["replicas"] = r["count"]


def split_image(image):
    if "@" in image:
        return image.split("@", 1)[0], None
    head, _, last = image.rpartition("/")
    if ":" in last:
        name, tag = last.split(":", 1)
        return (f"{head}/{name}" if head else name), tag
    return image, None


# Lists merged item by item in a strategic merge patch, by these keys (as Kubernetes' own
# patch strategy says); other lists are replaced. Patch items come first, in patch order, then
# the items the patch does not name, as kustomize orders them; an item with `$patch: delete`
# removes its namesake.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "imagePullSecrets": "name",
}


def strategic_merge(base, patch, path):
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            merge_key = MERGE_KEYS.get(key)
            if key == "ports":
                merge_key = "port" if path.endswith(".spec") else "containerPort"
            if merge_key and all(isinstance(v, dict) for v in value + out[key]):
                originals = {item.get(merge_key): item for item in out[key]}
                merged = [strategic_merge(originals.get(v.get(merge_key), {}), v, f"{path}.{key}")
                          for v in value if v.get("$patch") != "delete"]
                named = {v.get(merge_key) for v in value}
                merged += [item for item in out[key] if item.get(merge_key) not in named]
                out[key] = merged
            else:
                out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value, f"{path}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def json6902(obj, ops):
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = obj
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[index] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[index]
            elif kind == "test":
                if parent[index] != op["value"]:
                    raise ValueError(f"JSON patch test failed at {op['path']}: {parent[index]!r}")
            else:
                raise ValueError(f"unsupported JSON patch op {kind}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and last not in parent:
                    raise ValueError(f"JSON patch replace of a missing {op['path']}")
                parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[last]
            elif kind == "test":
                if parent.get(last) != op["value"]:
                    raise ValueError(f"JSON patch test failed at {op['path']}: {parent.get(last)!r}")
            else:
                raise ValueError(f"unsupported JSON patch op {kind}")


def key_of(o):
    return (o.get("apiVersion"), o.get("kind"), o["metadata"].get("namespace"), o["metadata"]["name"])


def kubectl_render(dirpath):
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    r = subprocess.run([kubectl, "kustomize", dirpath], capture_output=True, text=True)
    if r.returncode != 0:
        raise ValueError(f"kubectl kustomize {dirpath}: {r.stderr.strip()}")
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None]


def first_difference(a, b, path=""):
    if type(a) is not type(b):
        return f"{path}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k}: {'missing' if k not in a else 'present'} here, {'missing' if k not in b else 'present'} in kubectl's"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


# ------------------------------------------------------------------------------------------
# Schemas


def validate_schemas(name, objects):
    no_schema = set()
    for o in objects:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                no_schema.add(f"{o['apiVersion']}/{o['kind']}")
            except kubernetes_validate.ValidationError as e:
                loc = ".".join(str(p) for p in e.path)
                problem(f"{name} {o['kind']}/{o['metadata']['name']}", f"Kubernetes {version}: {loc}: {e.message}")
    return no_schema


# ------------------------------------------------------------------------------------------
# The binary's flags


class Options:
    """What `sllm <subcommand> --help` says: options (long name -> takes a value, env,
    default), environment variables, and the possible values of the positional arguments."""

    def __init__(self, sllm, subcommand):
        env = {"PATH": os.environ.get("PATH", ""), "COLUMNS": "200"}
        out = subprocess.run([sllm, subcommand, "--help"], capture_output=True, text=True, env=env, check=True).stdout
        self.options = {}
        self.env = {}
        self.positional = set()
        current = None
        in_values = False
        for line in out.splitlines():
            m = re.match(r"^\s+(?:-\w, )?--([a-z0-9-]+)(?: <([A-Z0-9_]+)>(\.\.\.)?)?", line)
            if m:
                current = m.group(1)
                self.options[current] = {"value": bool(m.group(2)), "repeat": bool(m.group(3)), "env": None, "default": None}
                in_values = False
                continue
            if "Possible values:" in line and current is None:
                in_values = True
                continue
            if in_values:
                v = re.match(r"^\s+- ([a-z0-9-]+):", line)
                if v:
                    self.positional.add(v.group(1))
                elif line.strip() and not line.startswith(" " * 10):
                    in_values = False
            if current:
                e = re.search(r"\[env: ([A-Z0-9_]+)", line)
                if e:
                    self.options[current]["env"] = e.group(1)
                    self.env[e.group(1)] = current
                d = re.search(r"\[default: ([^\]]*)\]", line)
                if d:
                    self.options[current]["default"] = d.group(1)
        if not self.options:
            raise ValueError(f"no options found in `sllm {subcommand} --help`")


def telemetry_env_names():
    """Environment variables every sllm process reads through its telemetry library."""
    names = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "telemetry", "src")):
        for f in files:
            if f.endswith(".rs"):
                with open(os.path.join(dirpath, f)) as fh:
                    names |= set(re.findall(r"\b(RUST_LOG|OTEL_[A-Z0-9_]+)\b", fh.read()))
    return names


def proto_services():
    names = set()
    for f in os.listdir(os.path.join(ROOT, "proto", "sllm", "v1")):
        with open(os.path.join(ROOT, "proto", "sllm", "v1", f)) as fh:
            names |= {f"sllm.v1.{s}" for s in re.findall(r"^service (\w+)", fh.read(), re.M)}
    return names


def documented_secrets():
    """Secret name -> keys, as docs/kubernetes.md tells the operator to create them."""
    with open(os.path.join(ROOT, "docs", "kubernetes.md")) as f:
        text = f.read().replace("\\\n", " ")
    secrets = {}
    for m in re.finditer(r"create secret (generic|tls) ([a-z0-9-]+)([^\n`]*)", text):
        kind, name, rest = m.groups()
        keys = secrets.setdefault(name, set())
        if kind == "tls":
            keys |= {"tls.crt", "tls.key"}
        keys |= set(re.findall(r"--from-(?:file|literal)=([A-Za-z0-9._-]+)=", rest))
        if "--from-file=ca.crt" in rest:
            keys.add("ca.crt")
    return secrets


# ------------------------------------------------------------------------------------------
# Wiring

WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")


def containers(o):
    spec = o.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def selected(selector, labels):
    if not selector:
        return False
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        value = labels.get(e["key"])
        if e["operator"] == "In" and value not in e["values"]:
            return False
        if e["operator"] == "NotIn" and value in e["values"]:
            return False
        if e["operator"] == "Exists" and value is None:
            return False
    return True


def listen(value):
    """(host, port) of an address flag's value; None for "off"."""
    if value in (None, "off"):
        return None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def check_wiring(name, objects, help_by_cmd, telemetry_env, services, docs_secrets):
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], []).append(o)
    configmaps = {o["metadata"]["name"]: o for o in by_kind.get("ConfigMap", [])}
    secrets = {o["metadata"]["name"]: o for o in by_kind.get("Secret", [])}

    def secret_keys(secret_name, where):
        if secret_name in secrets:
            s = secrets[secret_name]
            return set(s.get("data", {})) | set(s.get("stringData", {}))
        if secret_name in docs_secrets:
            return docs_secrets[secret_name]
        problem(where, f"Secret {secret_name} is neither in the manifests nor created in docs/kubernetes.md")
        return set()

    # Each sllm container: what it listens on, by port number -> (host, kind of listener).
    pods = []  # (workload, labels, container, listening)
    for o in [o for k in WORKLOADS for o in by_kind.get(k, [])]:
        wname = f"{name} {o['kind']}/{o['metadata']['name']}"
        template = o["spec"]["template"]
        labels = template["metadata"].get("labels", {})
        if not selected(o["spec"].get("selector"), labels):
            problem(wname, "its selector does not select its own pods")
        pod_spec = template["spec"]
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                for item in v["secret"].get("items", []):
                    keys = secret_keys(v["secret"]["secretName"], wname)
                    if keys and item["key"] not in keys:
                        problem(wname, f"volume {v['name']} mounts key {item['key']} that Secret {v['secret']['secretName']} lacks")
        for c in pod_spec["containers"]:
            where = f"{wname} container {c['name']}"
            args = list(c.get("command", [])[1:] if c.get("command") else []) + list(c.get("args", []))
            listening = {}
            pods.append((o, labels, c, listening))
            if not args or args[0] not in help_by_cmd:
                # Not an sllm process (Redis): its ports are what it declares.
                for p in c.get("ports", []):
                    listening[p["containerPort"]] = ("0.0.0.0", "other")
                continue
            cmd, opts = args[0], help_by_cmd[args[0]]
            env_list = c.get("env", [])
            env_names = [e["name"] for e in env_list]
            from_configmaps = {}
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    cm = configmaps.get(ef["configMapRef"]["name"])
                    if cm is None:
                        problem(where, f"envFrom ConfigMap {ef['configMapRef']['name']} does not exist")
                        continue
                    from_configmaps.update(cm.get("data", {}))
                else:
                    problem(where, "envFrom other than a ConfigMap: its names cannot be checked")
            all_env = list(from_configmaps) + env_names
            # $(VAR) references.
            text_args = " ".join(args)
            referenced = set(re.findall(r"\$\(([A-Za-z0-9_]+)\)", text_args))
            for var in referenced:
                if var not in all_env:
                    problem(where, f"an argument uses $({var}), which the container does not define")
            defined = list(from_configmaps)
            for e in env_list:
                for var in re.findall(r"\$\(([A-Za-z0-9_]+)\)", str(e.get("value", ""))):
                    referenced.add(var)
                    if var not in defined:
                        problem(where, f"env {e['name']} uses $({var}) before it is defined")
                defined.append(e["name"])
            # Every name is an option's, read by telemetry, or a variable for $(...).
            for n in all_env:
                if n not in opts.env and n not in telemetry_env and n not in referenced:
                    problem(where, f"environment variable {n} is read by nothing in `sllm {cmd}`")
            if len(set(env_names)) != len(env_names):
                problem(where, "an environment variable is set twice")
            # Flags.
            settings = {}  # option -> value
            i = 1
            while i < len(args):
                a = args[i]
                if a.startswith("--"):
                    flag, eq, value = a[2:].partition("=")
                    if flag not in opts.options:
                        problem(where, f"`sllm {cmd}` has no flag --{flag}")
                        i += 1
                        continue
                    if opts.options[flag]["value"] and not eq:
                        i += 1
                        value = args[i] if i < len(args) else None
                    if flag in settings and not opts.options[flag]["repeat"]:
                        problem(where, f"--{flag} is given twice")
                    settings[flag] = value
                elif cmd == "serve":
                    if a not in opts.positional:
                        problem(where, f"`sllm serve` has no service {a!r}")
                else:
                    problem(where, f"`sllm {cmd}` takes no argument {a!r}")
                i += 1
            for n in all_env:
                flag = opts.env.get(n)
                if flag is None:
                    continue
                if flag in settings:
                    problem(where, f"--{flag} is set both as a flag and as {n}")
                e = next((e for e in env_list if e["name"] == n), None)
                settings[flag] = e.get("value") if e is not None else from_configmaps.get(n)
                if e is not None and "valueFrom" in e:
                    ref = e["valueFrom"].get("secretKeyRef")
                    if ref and ref["key"] not in secret_keys(ref["name"], where):
                        problem(where, f"{n} reads key {ref['key']} that Secret {ref['name']} lacks")
            # What it listens on.
            for flag, o2 in opts.options.items():
                if flag.endswith("-addr") and o2["value"]:
                    value = settings.get(flag, o2["default"])
                    if value is not None and "$(" not in str(value):
                        addr = listen(value)
                        if addr:
                            listening[addr[1]] = (addr[0], flag)
            served = set()
            if cmd == "serve":
                names = [a for a in args[1:] if not a.startswith("--")]
                if "all" in names:
                    names = sorted(opts.positional - {"all"})
                served = {"sllm.v1." + "".join(w.capitalize() for w in n.split("-")) for n in names}
                for s in served - services:
                    problem(where, f"serves {s}, which no proto file defines")
            # Ports it declares are ports it listens on, reachable from outside the pod.
            ports_by_name = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            for p in c.get("ports", []):
                check_port(where, f"containerPort {p['containerPort']}", p["containerPort"], listening)
            # Probes.
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c.get(probe_name)
                if not probe:
                    continue
                pw = f"{where} {probe_name}"
                if "grpc" in probe:
                    port = probe["grpc"]["port"]
                    if check_port(pw, "gRPC probe", port, listening) and listening[port][1] not in ("grpc-addr", "health-addr"):
                        problem(pw, f"port {port} ({listening[port][1]}) serves no gRPC health")
                    service = probe["grpc"].get("service", "")
                    if service and service not in served:
                        problem(pw, f"asks for {service}, which this process does not serve ({sorted(served)})")
                elif "httpGet" in probe:
                    port = probe["httpGet"]["port"]
                    port = ports_by_name.get(port, port)
                    if check_port(pw, "HTTP probe", port, listening) and probe["httpGet"].get("path") == "/metrics" and listening[port][1] != "metrics-addr":
                        problem(pw, f"/metrics is not served on port {port}")
                elif "tcpSocket" in probe:
                    port = probe["tcpSocket"]["port"]
                    check_port(pw, "TCP probe", ports_by_name.get(port, port), listening)
            # Files the process reads: inside a mount; in a Secret, a key it has.
            mounts = c.get("volumeMounts", [])
            for flag, value in settings.items():
                if not isinstance(value, str) or not value.startswith("/"):
                    continue
                mount = max((m for m in mounts if value == m["mountPath"] or value.startswith(m["mountPath"].rstrip("/") + "/")),
                            key=lambda m: len(m["mountPath"]), default=None)
                if mount is None:
                    problem(where, f"--{flag}={value} is in no mounted volume")
                    continue
                volume = volumes.get(mount["name"])
                if volume is None:
                    problem(where, f"volumeMount {mount['name']} has no volume")
                    continue
                if "secret" not in volume:
                    continue
                rel = os.path.relpath(value, mount["mountPath"])
                secret_name = volume["secret"]["secretName"]
                items = volume["secret"].get("items")
                if items:
                    item = next((it for it in items if it["path"] == rel), None)
                    if item is None:
                        problem(where, f"--{flag}={value}: Secret volume {mount['name']} has no file {rel}")
                else:
                    key = rel.split("/")[0]
                    if not re.fullmatch(r"\$\([A-Za-z0-9_]+\)", key) and key not in secret_keys(secret_name, where):
                        problem(where, f"--{flag}={value}: Secret {secret_name} has no key {key}")
            # A worker's GPUs are the ones it asks Kubernetes for.
            if cmd == "worker":
                limit = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                gpus = settings.get("gpus", opts.options["gpus"]["default"])
                if limit is None or str(limit) != str(gpus):
                    problem(where, f"--gpus={gpus} but the container's nvidia.com/gpu limit is {limit}")

    def pods_of(selector, namespace_kind=None):
        return [(o, labels, c, l) for (o, labels, c, l) in pods if selected(selector, labels)]

    for s in by_kind.get("Service", []):
        where = f"{name} Service/{s['metadata']['name']}"
        chosen = pods_of({"matchLabels": s["spec"].get("selector", {})})
        if not chosen:
            problem(where, "selects no pods")
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for (_, _, c, listening) in chosen:
                by_name = {cp["name"]: cp["containerPort"] for cp in c.get("ports", []) if "name" in cp}
                port = by_name.get(target, target)
                if isinstance(port, str):
                    problem(where, f"port {p['name']}: container {c['name']} has no port named {target}")
                else:
                    check_port(where, f"port {p['name']} -> {target}", port, listening)
    for kind in ("ServiceMonitor", "PodMonitor"):
        for m in by_kind.get(kind, []):
            where = f"{name} {kind}/{m['metadata']['name']}"
            if kind == "ServiceMonitor":
                targets = [s for s in by_kind.get("Service", []) if selected(m["spec"]["selector"], s["metadata"].get("labels", {}))]
                names = [{p.get("name") for p in s["spec"]["ports"]} for s in targets]
                endpoints = m["spec"]["endpoints"]
            else:
                targets = pods_of(m["spec"]["selector"])
                names = [{p.get("name") for p in c.get("ports", [])} for (_, _, c, _) in targets]
                endpoints = m["spec"]["podMetricsEndpoints"]
            if not targets:
                problem(where, "selects nothing")
            for e in endpoints:
                for n in names:
                    if e["port"] not in n:
                        problem(where, f"a target has no port named {e['port']}")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if not any(o["kind"] == ref["kind"] and o["metadata"]["name"] == ref["name"] for o in objects):
            problem(f"{name} HPA/{hpa['metadata']['name']}", f"scales {ref['kind']}/{ref['name']}, which does not exist")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not pods_of(pdb["spec"]["selector"]):
            problem(f"{name} PDB/{pdb['metadata']['name']}", "selects no pods")
    for np in by_kind.get("NetworkPolicy", []):
        where = f"{name} NetworkPolicy/{np['metadata']['name']}"
        chosen = pods_of(np["spec"]["podSelector"])
        if not chosen:
            problem(where, "selects no pods")
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if isinstance(p.get("port"), str):
                    for (o, _, c, _) in chosen:
                        if p["port"] not in {cp.get("name") for cp in c.get("ports", [])}:
                            problem(where, f"{o['metadata']['name']} has no port named {p['port']}")


def check_port(where, what, port, listening):
    if port not in listening:
        problem(where, f"{what}: nothing listens on port {port} (it listens on {sorted(listening)})")
        return False
    host = listening[port][0]
    if host not in ("0.0.0.0", "::", ""):
        problem(where, f"{what}: port {port} listens on {host} only, out of the kubelet's and other pods' reach")
        return False
    return True


# ------------------------------------------------------------------------------------------


def main():
    sllm = sys.argv[1]
    help_by_cmd = {cmd: Options(sllm, cmd) for cmd in ("serve", "worker")}
    telemetry_env = telemetry_env_names()
    services = proto_services()
    docs_secrets = documented_secrets()
    notes = []
    with tempfile.TemporaryDirectory(prefix="sllm-k8s-") as tmp:
        # A copy, so that the check can add what it renders without touching the tree.
        deploy = os.path.join(tmp, "deploy")
        shutil.copytree(os.path.join(ROOT, "deploy"), deploy)
        dashboard = os.path.join(tmp, DASHBOARD)
        if not os.path.isfile(os.path.join(ROOT, DASHBOARD)):
            with open(dashboard, "w") as f:
                f.write('{"title": "placeholder"}\n')
            notes.append(f"{DASHBOARD} is missing: the dashboard component was rendered with a placeholder")
        k8s = os.path.join(deploy, "kubernetes")
        components = sorted(os.listdir(os.path.join(k8s, "components")))
        every = os.path.join(k8s, "overlays", "check-every-component")
        os.makedirs(every)
        with open(os.path.join(every, "kustomization.yaml"), "w") as f:
            yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": ["../../base"],
                "components": [f"../../components/{c}" for c in components] + ["../../../grafana"],
            }, f)
        targets = ["base"] + [f"overlays/{o}" for o in sorted(os.listdir(os.path.join(k8s, "overlays")))]
        no_schema = set()
        for t in targets:
            path = os.path.join(k8s, t)
            try:
                objects = render(path)
            except (ValueError, KeyError, OSError) as e:
                problem(t, f"cannot render: {e}")
                continue
            keys = [key_of(o) for o in objects]
            if len(set(keys)) != len(keys):
                problem(t, "an object is rendered twice")
            try:
                theirs = kubectl_render(path)
            except ValueError as e:
                problem(t, str(e))
                theirs = None
            if theirs is None:
                notes.append(f"{t}: kubectl is not installed: rendered with the built-in renderer only")
            else:
                ours = {key_of(o): o for o in objects}
                kube = {key_of(o): o for o in theirs}
                for k in sorted(set(ours) ^ set(kube), key=str):
                    problem(t, f"{k} rendered {'only here' if k in ours else 'only by kubectl'}")
                for k in set(ours) & set(kube):
                    d = first_difference(ours[k], kube[k])
                    if d:
                        problem(t, f"{k[1]}/{k[3]} differs from kubectl kustomize: {d}")
            no_schema |= validate_schemas(t, objects)
            check_wiring(t, objects, help_by_cmd, telemetry_env, services, docs_secrets)
            kinds = {}
            for o in objects:
                kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            print(f"{t}: {len(objects)} objects ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    print(f"schemas: Kubernetes {', '.join(K8S_VERSIONS)} (strict); no schema for {sorted(no_schema)}")
    for n in notes:
        print(f"note: {n}")
    if problems:
        print(f"{len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print("manifests: every check holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
