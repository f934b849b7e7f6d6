"""Project rules for deploy/ that the schema validators and hadolint do not know.

Run by scripts/validate_deploy.sh (with .venv's Python): prints each finding and exits 1 if
there is any.

- every pod template in deploy/k8s passes the *restricted* Pod Security Standard;
- the Namespace enforces it; kustomization.yaml lists files that exist;
- every Dockerfile base image is pinned by digest;
- deploy/constraints.txt holds only exact pins, none for torch/pip/dev tools, and pins every
  direct dependency of the project (core and `eval`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# Volume types the restricted profile allows.
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
NOT_IN_CONSTRAINTS = {"torch", "pip", "pytest", "pytest-timeout", "ruff", "iniconfig", "pluggy"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pod_specs(doc: dict) -> list[dict]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind == "Pod":
        return [spec]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    return []


def check_pod(where: str, pod: dict) -> list[str]:
    errors = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            errors.append(f"{where}: {key} is not allowed")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            errors.append(f"{where}: volume {volume['name']} of type {sorted(kinds)}")
    containers = (pod.get("initContainers") or []) + pod["containers"]
    for c in containers:
        csc = c.get("securityContext") or {}
        name = f"{where} container {c['name']}"

        def effective(key: str, csc: dict = csc) -> object:
            return csc.get(key, psc.get(key))

        if effective("runAsNonRoot") is not True:
            errors.append(f"{name}: runAsNonRoot must be true")
        if effective("runAsUser") in (None, 0):
            errors.append(f"{name}: runAsUser must be set and non-zero")
        if effective("runAsGroup") in (None, 0):
            errors.append(f"{name}: runAsGroup must be set and non-zero")
        seccomp = (effective("seccompProfile") or {}).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            errors.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if csc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{name}: allowPrivilegeEscalation must be false")
        if csc.get("privileged"):
            errors.append(f"{name}: privileged")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            errors.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            errors.append(f"{name}: adds capabilities {caps['add']}")
        if csc.get("readOnlyRootFilesystem") is not True:
            errors.append(f"{name}: readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"] for m in c.get("volumeMounts") or []}
        if "/tmp" not in mounts:
            errors.append(f"{name}: needs a writable /tmp (emptyDir) with a read-only root")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                errors.append(f"{name}: hostPort {port['hostPort']}")
    return errors


def check_k8s() -> list[str]:
    errors: list[str] = []
    kustomization = K8S / "kustomization.yaml"
    for listed in yaml.safe_load(kustomization.read_text())["resources"]:
        if not (K8S / listed).is_file():
            errors.append(f"kustomization.yaml lists {listed}, which does not exist")
    namespaces = set()
    for path in sorted(K8S.glob("*.yaml")):
        if path == kustomization:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            where = f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] == "Namespace":
                labels = doc["metadata"].get("labels") or {}
                if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                    errors.append(f"{where}: must enforce the restricted Pod Security Standard")
                namespaces.add(doc["metadata"]["name"])
            for pod in pod_specs(doc):
                errors += check_pod(where, pod)
    for path in sorted(K8S.glob("*.yaml")):
        if path == kustomization:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] != "Namespace":
                ns = doc["metadata"].get("namespace")
                if ns not in namespaces:
                    errors.append(f"{path.relative_to(ROOT)}: namespace {ns!r} is not declared")
    return errors


def check_dockerfiles() -> list[str]:
    errors = []
    pinned = re.compile(r"^FROM\s+(--platform=\S+\s+)?\S+:\S+@sha256:[0-9a-f]{64}(\s+AS\s+\S+)?$")
    for path in sorted(DEPLOY.glob("Dockerfile*")):
        if path.name.endswith(".dockerignore"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.upper().startswith("FROM ") and not pinned.match(line.strip()):
                errors.append(f"{path.relative_to(ROOT)}:{number}: base image not pinned by digest")
    return errors


def check_constraints() -> list[str]:
    errors = []
    path = DEPLOY / "constraints.txt"
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        if not match:
            errors.append(f"deploy/constraints.txt:{number}: not an exact pin: {line!r}")
            continue
        name = canonical(match.group(1))
        if name in NOT_IN_CONSTRAINTS:
            errors.append(f"deploy/constraints.txt:{number}: {name} does not belong here")
        pins[name] = match.group(2)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    direct = project["dependencies"] + project.get("optional-dependencies", {}).get("eval", [])
    for requirement in direct:
        name = canonical(re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0])
        if name not in pins and name not in NOT_IN_CONSTRAINTS:
            errors.append(
                f"deploy/constraints.txt: {name} (a dependency in pyproject.toml) is not "
                "pinned; run bash deploy/update-constraints.sh"
            )
    return errors


def main() -> int:
    errors = check_k8s() + check_dockerfiles() + check_constraints()
    for error in errors:
        print(f"ERROR {error}")
    if not errors:
        print("deploy rules: restricted pods, digests, exact pins: ok")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
