"""A container's environment as the kubelet builds it: `env` in order with `$(VAR)` expansion,
`valueFrom` (downward API fields, Secret and ConfigMap keys), `envFrom`, over the image's own."""

from __future__ import annotations

import re
from typing import Any

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' rule: `$(VAR)` becomes VAR's value when VAR is defined, else stays as written;
    `$$` is a literal `$`."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(one, text)


def field_value(path: str, metadata: dict[str, Any]) -> str:
    m = _FIELD.fullmatch(path)
    if m:
        values = metadata.get(m.group(1), {})
        if m.group(2) not in values:
            # The kubelet gives "" for a missing label; for the fields the chart relies on that is a bug.
            raise KeyError(f"fieldRef {path}: the pod has no such {m.group(1)[:-1]}")
        return values[m.group(2)]
    simple = {
        "metadata.name": metadata["name"],
        "metadata.namespace": metadata.get("namespace", "default"),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": "node-local",
        "spec.serviceAccountName": metadata.get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }
    if path not in simple:
        raise KeyError(f"fieldRef {path} is not a field the downward API offers")
    return simple[path]


def _value_from(src: dict[str, Any], metadata: dict[str, Any], volumes: Any) -> str | None:
    if "fieldRef" in src:
        return field_value(src["fieldRef"]["fieldPath"], metadata)
    for kind, store in (("secretKeyRef", volumes.secrets), ("configMapKeyRef", volumes.configmaps)):
        if kind in src:
            ref = src[kind]
            value = store.get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise KeyError(f"{kind} {ref['name']}/{ref['key']} does not exist")
            return value
    raise KeyError(f"valueFrom {sorted(src)} is not simulated")


def container_env(
    spec: dict[str, Any], metadata: dict[str, Any], volumes: Any, image_env: dict[str, str]
) -> dict[str, str]:
    env = dict(image_env)
    env["HOSTNAME"] = metadata.get("hostname", metadata["name"])
    index = metadata.get("annotations", {}).get("batch.kubernetes.io/job-completion-index")
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = index  # the Job controller adds it to every container
    for src in spec.get("envFrom", []):
        for kind, store in (("configMapRef", volumes.configmaps), ("secretRef", volumes.secrets)):
            if kind in src:
                for k, v in store[src[kind]["name"]].items():
                    env[src.get("prefix", "") + k] = v
    for item in spec.get("env", []):
        if "valueFrom" in item:
            value = _value_from(item["valueFrom"], metadata, volumes)
            if value is not None:
                env[item["name"]] = value
        else:
            env[item["name"]] = expand(str(item.get("value", "")), env)
    return env
