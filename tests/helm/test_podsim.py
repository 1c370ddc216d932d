"""The pod runner itself (tests/helm/podsim.py) catches what it is there to catch: start order,
probes on undeclared ports, paths no volume provides, read-only mounts, users, the grace period."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helm.podprobe import ProbeError
from tests.helm.podsim import Image, Pod, PodRun
from tests.helm.podvolumes import Volumes
from tests.servers import free_port

KIND = "integration"

PY = sys.executable
SERVER = (
    "import http.server as h, sys;"
    " h.HTTPServer(('127.0.0.1', int(sys.argv[1])), h.SimpleHTTPRequestHandler).serve_forever()"
)
IMAGE = {"img": Image(files={}, env={"PATH": "/usr/bin:/bin"})}


def sidecar(port: int, probe_port: Any = "http", **extra: Any) -> dict[str, Any]:
    return {
        "name": "side",
        "image": "img",
        "restartPolicy": "Always",
        "command": [PY, "-c", SERVER, str(port)],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": probe_port}},
        **extra,
    }


def main(script: str, **extra: Any) -> dict[str, Any]:
    return {"name": "main", "image": "img", "command": ["sh", "-c", script], **extra}


def run(root: Path, spec: dict[str, Any], configmaps: dict | None = None) -> PodRun:
    meta = {"name": "p-0", "annotations": {"batch.kubernetes.io/job-completion-index": "3"}}
    volumes = Volumes(spec, root, configmaps or {}, {})
    return Pod(spec, meta, volumes, IMAGE, root, probe_timeout=10).run(main_timeout=30)


def test_init_then_sidecar_ready_then_main_then_sigterm(pod_root):
    port = free_port()
    spec = {
        "terminationGracePeriodSeconds": 5,
        "initContainers": [main("echo init", name="init"), sidecar(port)],
        "containers": [main(f"{PY} -c \"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/')\"")],
    }
    r = run(pod_root, spec)
    assert r.events[:4] == ["init started", "init exited 0", "side started", "side readinessProbe passed"]
    assert r.events[4:7] == ["main started", "main exited 0", "main containers exited"]
    assert r.events[7] == "SIGTERM side" and not r.containers["side"].killed


def test_a_probe_on_a_port_the_container_does_not_declare_fails(pod_root):
    spec = {"initContainers": [sidecar(free_port(), probe_port="metrics")], "containers": [main("true")]}
    with pytest.raises(ProbeError, match="'metrics' is not a declared container port"):
        run(pod_root, spec)


def test_a_path_no_volume_provides_is_not_writable_and_nothing_reaches_the_host(pod_root):
    target = Path("/var/lib/ckptd-podsim-nowhere")
    spec = {"containers": [main(f"mkdir -p {target} && echo x > {target}/f; echo rc=$?; echo t > /tmp/t; cat /tmp/t")]}
    r = run(pod_root, spec)
    assert "rc=1" in r.logs("main") or "rc=2" in r.logs("main"), r.logs("main")
    assert "Read-only file system" in r.logs("main") and not target.exists()
    assert r.logs("main").rstrip().endswith("t")  # a writable image would still have /tmp


def test_volumes_users_and_downward_env(pod_root):
    spec = {
        "securityContext": {"fsGroup": 4321},
        "containers": [
            main(
                "id -u; id -G; echo idx=$JOB_COMPLETION_INDEX; cat /etc/cfg/k; echo; echo w > /etc/cfg/x || echo ro;"
                " echo data > /data/f && echo rw",
                securityContext={"runAsUser": 1234, "runAsGroup": 1234},
                volumeMounts=[
                    {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                    {"name": "data", "mountPath": "/data"},
                ],
            )
        ],
        "volumes": [{"name": "cfg", "configMap": {"name": "c"}}, {"name": "data", "emptyDir": {}}],
    }
    r = run(pod_root, spec, configmaps={"c": {"k": "value"}})
    out = r.logs("main").split()
    assert out[:2] == ["1234", "1234"] and "4321" in out and "idx=3" in out, out
    assert "value" in out and "ro" in out and "rw" in out, out
    assert (pod_root / "volumes" / "data" / "f").read_text() == "data\n"


def test_a_sidecar_that_ignores_sigterm_is_killed_at_the_grace_period(pod_root):
    port = free_port()
    ignore = f"import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); {SERVER}"
    side = sidecar(port, command=[PY, "-c", ignore, str(port)])
    r = run(pod_root, {"terminationGracePeriodSeconds": 1, "initContainers": [side], "containers": [main("true")]})
    assert r.containers["side"].killed and r.exit_code("side") == -9
