"""Validate rendered Kubernetes objects without an API server.

Built-in kinds go through `kubernetes-validate` (the Kubernetes OpenAPI schemas, strict: unknown fields are errors,
as `kubectl apply --validate=strict` would report them). Custom resources (RayJob, RayCluster, Argo CD's
Application, ...) go through `jsonschema` on their CRD's `spec.versions[].schema.openAPIV3Schema`, translated
the way the API server reads it:

- `x-kubernetes-int-or-string: true` -> an integer or a string (the schema carries no `type` then);
- `x-kubernetes-preserve-unknown-fields: true` -> any extra keys; elsewhere an object with `properties` and no
  `additionalProperties` gets `additionalProperties: false` (the API server would silently prune the unknown key:
  a typo such as `submiterConfig` would simply vanish, so here it is an error);
- `x-kubernetes-embedded-resource: true` -> apiVersion/kind/metadata allowed;
- `format: int32` / `int64` -> the integer range.
CEL rules (`x-kubernetes-validations`) are not evaluated (no CEL interpreter on these machines).

    from k8s_validate import load_crds, validate_objects     # tests/ is on sys.path under pytest
    crds = load_crds(shared_dir / "crds" / "kuberay-v1.7.0")
    errors = validate_objects(objs, crds, k8s_version="1.30")   # [] when all are valid
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate
import yaml

# libyaml's loader when present: the KubeRay CRDs are 2.3 MB of YAML (~13 s in pure Python, ~1 s in C).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class CRDVersion:
    group: str
    kind: str
    version: str
    source: Path
    schema: dict  # plain JSON Schema, translated from openAPIV3Schema

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


def to_jsonschema(node: Any) -> Any:
    """Translate a CRD openAPIV3Schema (structural schema with x-kubernetes-* extensions) into JSON Schema."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("format") in INT_RANGES and node.get("type") == "integer":
        lo, hi = INT_RANGES[node["format"]]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    props = out.get("properties")
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if props is not None and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    # `nullable: true` lets an explicit null through (the API server drops it).
    if node.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = types + ["null"]
    out.pop("nullable", None)
    return out


def load_crds(*dirs: Path | str) -> dict[tuple[str, str], CRDVersion]:
    """Every served version of every CRD in the given directories' *.yaml files, keyed by (apiVersion, kind)."""
    found: dict[tuple[str, str], CRDVersion] = {}
    for d in dirs:
        files = sorted(Path(d).glob("*.yaml"))
        if not files:
            raise FileNotFoundError(f"{d}: no CRD *.yaml files")
        for path in files:
            for doc in yaml.load_all(path.read_text(), Loader=_LOADER):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                spec = doc["spec"]
                for v in spec["versions"]:
                    if not v.get("served", True):
                        continue
                    crd = CRDVersion(spec["group"], spec["names"]["kind"], v["name"], path,
                                     to_jsonschema(v["schema"]["openAPIV3Schema"]))
                    found[(crd.api_version, crd.kind)] = crd
    return found


def _path(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".") or "<root>"


def validate_custom(obj: dict, crd: CRDVersion) -> list[str]:
    """Errors of one custom resource against its CRD version, each naming the field path."""
    # The API server fills in metadata; the CRD schema says only `type: object` for it.
    validator = jsonschema.Draft7Validator(crd.schema)
    return [f"{_path(e)}: {e.message}" for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))]


def validate_builtin(obj: dict, k8s_version: str = "1.30") -> list[str]:
    """Errors of one built-in object against the Kubernetes OpenAPI schema of that version (strict)."""
    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    return []


def describe(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def validate_objects(objs: Iterable[dict], crds: dict[tuple[str, str], CRDVersion] | None = None,
                     k8s_version: str = "1.30") -> list[str]:
    """Validate each object: a CRD schema when one is loaded for its (apiVersion, kind), else the built-in schema.
    An object that is neither (a CRD that was not loaded) is an error too, never silently passed."""
    crds = crds or {}
    errors: list[str] = []
    for obj in objs:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in crds:
            errs = validate_custom(obj, crds[key])
        else:
            try:
                errs = validate_builtin(obj, k8s_version)
            except kubernetes_validate.SchemaNotFoundError:
                errs = [f"no schema for {key[0]} {key[1]}: not a Kubernetes {k8s_version} kind and no CRD loaded for it"]
        errors += [f"{describe(obj)}: {e}" for e in errs]
    return errors


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) of a Job, RayJob or RayCluster: each one is a pod the cluster will create."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    found: list[tuple[str, dict]] = []
    if kind == "Job":
        found.append(("spec.template", spec["template"]))
    cluster, prefix = (spec.get("rayClusterSpec"), "spec.rayClusterSpec") if kind == "RayJob" else (spec, "spec")
    if kind in ("RayJob", "RayCluster") and cluster:
        found.append((f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"]))
        for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
            found.append((f"{prefix}.workerGroupSpecs[{i}].template", g["template"]))
    if kind == "RayJob" and spec.get("submitterPodTemplate"):
        found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"]))
    return found


def validate_pod_templates(obj: dict, k8s_version: str = "1.30") -> list[str]:
    """A CRD embeds the PodSpec schema without the built-in schema's checks of some fields; validate each pod
    template of a custom resource again as a core/v1 PodTemplate."""
    errors = []
    for where, tmpl in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                   "template": copy.deepcopy(tmpl)}
        errors += [f"{describe(obj)} {where}: {e}" for e in validate_builtin(wrapped, k8s_version)]
    return errors


REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """helm or kubectl: `.tools/bin` (what `make tools` fills), else PATH, else fetched the way make does
    (`scripts/tools.sh`); a failed fetch fails the test."""
    local = REPO / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    subprocess.run(["bash", str(REPO / "scripts" / "tools.sh"), str(local.parent)], check=True, cwd=REPO)
    return str(local)
