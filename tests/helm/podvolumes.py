"""A pod's volumes as local folders, and each container's mounts of them.

emptyDir and generic ephemeral volumes are empty folders (mode 0777, as the kubelet makes an
emptyDir; with `fsGroup` they belong to that group, setgid). ConfigMap and Secret volumes hold one
file per key, or the listed `items`, with `defaultMode`. The folders outlive the pod, so a test can
look at what a container wrote, and a second pod can be given the first one's store."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

EMPTY = ("emptyDir", "ephemeral")


class Volumes:
    def __init__(
        self,
        pod_spec: dict[str, Any],
        root: Path,
        configmaps: dict[str, dict[str, str]],
        secrets: dict[str, dict[str, str]],
    ) -> None:
        self.configmaps, self.secrets = configmaps, secrets
        self.fs_group = pod_spec.get("securityContext", {}).get("fsGroup")
        self.folders: dict[str, Path] = {}
        for vol in pod_spec.get("volumes", []):
            self.folders[vol["name"]] = self._make(vol, root / "volumes" / vol["name"])

    def _make(self, vol: dict[str, Any], folder: Path) -> Path:
        folder.mkdir(parents=True)
        if any(k in vol for k in EMPTY):
            folder.chmod(0o777 | (0o2000 if self.fs_group is not None else 0))
            self._own(folder)
            return folder
        for kind, store in (("configMap", self.configmaps), ("secret", self.secrets)):
            if kind in vol:
                src = vol[kind]
                name = src.get("name") or src.get("secretName")
                if name not in store:
                    raise KeyError(f"volume {vol['name']}: {kind} {name} does not exist")
                self._fill(folder, store[name], src)
                return folder
        raise KeyError(f"volume {vol['name']}: {sorted(vol)} is not simulated")

    def _fill(self, folder: Path, data: dict[str, str], src: dict[str, Any]) -> None:
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise KeyError(f"key {item['key']} is not in the volume's source")
            path = folder / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]])
            mode = item.get("mode", src.get("defaultMode", 0o644))
            if self.fs_group is not None:
                mode |= 0o040  # the kubelet lets fsGroup read what it projects
            path.chmod(mode)
            self._own(path)
        folder.chmod(0o755)

    def _own(self, path: Path) -> None:
        if self.fs_group is not None:
            os.chown(path, -1, self.fs_group)

    def mounts(self, spec: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for m in spec.get("volumeMounts", []):
            if m["name"] not in self.folders:
                raise KeyError(f"container {spec['name']} mounts {m['name']}, which the pod does not declare")
            source = self.folders[m["name"]]
            if m.get("subPath"):
                source = source / m["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)  # the kubelet makes a missing subPath folder
            out.append({"source": str(source), "target": m["mountPath"], "read_only": bool(m.get("readOnly"))})
        return out
