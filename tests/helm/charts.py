"""Render the chart with Helm's own library and take the result apart the way Kubernetes would.

`render` returns the parsed manifests; `pod_template` finds the one pod template in a Job, a
PyTorchJob or a JobSet; `validate` checks a manifest against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields are errors). Custom resources have no schema there:
their pod templates are checked as core `PodTemplate`s and the rest by `check_custom`.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "ckptd"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# The oldest Kubernetes the chart supports (native sidecars on by default) and the newest schemas
# the installed kubernetes-validate ships.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# The least a release needs: where to store, and the training image.
BASE: dict[str, Any] = {
    "storage": {"url": "s3://ckpt-bucket/runs"},
    "trainer": {"image": {"repository": "ghcr.io/example/trainer", "tag": "1.0"}, "command": ["python", "train.py"]},
}

CUSTOM_KINDS = {
    ("kubeflow.org/v1", "PyTorchJob"),
    ("jobset.x-k8s.io/v1alpha2", "JobSet"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, later layers win; lists are replaced, as Helm does with values files."""
    out: dict[str, Any] = {}
    for layer in layers:
        out = _merge(out, layer)
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render_raw(values: dict[str, Any], name: str = "demo", namespace: str = "ml") -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), with `values` over BASE."""
    return chart().render(merged(BASE, values), name=name, namespace=namespace, is_install=True)


def render(values: dict[str, Any], name: str = "demo", namespace: str = "ml") -> list[dict[str, Any]]:
    """The manifests a release of these values would apply, parsed."""
    docs = []
    for path, text in sorted(render_raw(values, name, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def load_example(path: Path) -> dict[str, Any]:
    """An example values file, as `helm install -f` reads it (BASE is not added)."""
    return yaml.safe_load(path.read_text())


def render_example(path: Path, name: str = "demo", namespace: str = "ml") -> list[dict[str, Any]]:
    text = chart().render(load_example(path), name=name, namespace=namespace, is_install=True)
    return [d for p, t in sorted(text.items()) if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


WORKLOADS = ("Job", "PyTorchJob", "JobSet")


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] in WORKLOADS]
    assert len(found) == 1, f"expected one workload, got {[d['kind'] for d in found]}"
    return found[0]


def pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template (PodTemplateSpec) a workload holds."""
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "JobSet":
        return [r["template"]["spec"]["template"] for r in doc["spec"]["replicatedJobs"]]
    raise AssertionError(f"{doc['kind']} holds no pod template")


def pod_template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    templates = pod_templates(workload(docs))
    assert len(templates) == 1
    return templates[0]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name!r} in {[c['name'] for c in spec['containers']]}")


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """Name -> value, or the valueFrom mapping where the value comes from elsewhere."""
    names = [e["name"] for e in c.get("env", [])]
    assert len(names) == len(set(names)), f"{c['name']}: an env name is given twice: {names}"
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def validate(doc: dict[str, Any], version: str) -> list[str]:
    """What was validated, as one line per object; raises on the first schema violation."""
    key = (doc["apiVersion"], doc["kind"])
    if key not in CUSTOM_KINDS:
        kubernetes_validate.validate(doc, version, strict=True)
        return [f"{doc['kind']} (strict schema {version})"]
    check_custom(doc)
    checked = [f"{doc['kind']} (structure)"]
    if doc["kind"] in ("PyTorchJob", "JobSet"):
        for template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            kubernetes_validate.validate(wrapped, version, strict=True)
            checked.append(f"{doc['kind']} pod template as PodTemplate (strict schema {version})")
    if doc["kind"] == "JobSet":
        for rjob in doc["spec"]["replicatedJobs"]:
            job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": rjob["template"]["spec"]}
            kubernetes_validate.validate(job, version, strict=True)
            checked.append(f"JobSet replicated Job spec as Job (strict schema {version})")
    return checked


def _keys(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    assert not unknown, f"{where}: unknown fields {sorted(unknown)}"


def check_custom(doc: dict[str, Any]) -> None:
    """The fields of the custom resources the chart writes, from their published API types."""
    kind, spec = doc["kind"], doc["spec"]
    _keys(doc, {"apiVersion", "kind", "metadata", "spec"}, kind)
    assert doc["metadata"]["name"], kind
    if kind == "PyTorchJob":
        _keys(spec, {"runPolicy", "pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode"}, "PyTorchJob.spec")
        run_policy = {"backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "cleanPodPolicy"}
        _keys(spec["runPolicy"], run_policy | {"schedulingPolicy", "suspend", "managedBy"}, "runPolicy")
        assert set(spec["pytorchReplicaSpecs"]) <= {"Master", "Worker"}
        for r in spec["pytorchReplicaSpecs"].values():
            _keys(r, {"replicas", "restartPolicy", "template"}, "ReplicaSpec")
            assert r["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
            names = [c["name"] for c in r["template"]["spec"]["containers"]]
            assert "pytorch" in names, f"the operator needs a container named pytorch, got {names}"
    elif kind == "JobSet":
        fields = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend"}
        _keys(spec, fields | {"coordinator", "managedBy", "ttlSecondsAfterFinished"}, "JobSet.spec")
        _keys(spec["network"], {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}, "network")
        for r in spec["replicatedJobs"]:
            _keys(r, {"name", "replicas", "template", "dependsOn", "groupName"}, "replicatedJob")
            assert isinstance(r["replicas"], int) and r["replicas"] >= 1
    elif kind == "PodMonitor":
        _keys(spec, {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}, kind)
        assert spec["selector"]["matchLabels"]
        for ep in spec["podMetricsEndpoints"]:
            _keys(ep, {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"}, "endpoint")
    elif kind == "PrometheusRule":
        _keys(spec, {"groups"}, kind)
        for g in spec["groups"]:
            _keys(g, {"name", "interval", "rules", "limit", "partial_response_strategy", "labels"}, "group")
            for rule in g["rules"]:
                _keys(rule, {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}, "rule")
                assert rule["expr"] and ("alert" in rule) != ("record" in rule)
