"""Run a rendered pod spec the way the kubelet would, with its containers as local processes.

There is no cluster here, and schema validation cannot tell a wrong port, path, environment
name or start order from a right one. This runs the pod instead, following Kubernetes' documented
order: init containers one by one to completion; a native sidecar (an init container with
`restartPolicy: Always`) is started and probed ready before the next one; then the main
containers; once they have all exited, the sidecars get SIGTERM in reverse order and what is left
of the pod's `terminationGracePeriodSeconds`, then SIGKILL.

Each container runs in a mount namespace of its own (`tests/helm/container.py`): every volume is
a local folder bind-mounted at the container's `mountPath` (read-only where the manifest says
so). The host's tree stands in for the image's file system and is read-only in there: a path that
no volume provides fails as it would with `readOnlyRootFilesystem`, and a container that would
have a writable root gets a private tmpfs at /tmp (what an image's writable layer is mostly used
for), so nothing a container writes lands on this machine outside its volumes. It runs
as the manifest's `runAsUser`/`runAsGroup` with `fsGroup` as a supplementary group. Images are
not pulled: `images` maps the paths a container names in its image (`/opt/ckptd/entrypoint.sh`)
to local files. Every process shares the host's network, as if `hostNetwork`; probes go to
127.0.0.1 on the port the container declares.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helm.podenv import container_env, expand
from tests.helm.podprobe import Prober
from tests.helm.podvolumes import Volumes

LAUNCHER = Path(__file__).with_name("container.py")
UNSHARE = ["unshare", "--mount", "--propagation", "private"]
# What stands in for the images' files: this checkout, its venv and the interpreter that venv uses.
KEEP = sorted({str(Path(__file__).resolve().parents[2]), sys.prefix, os.path.realpath(sys.base_prefix)})


class PodFailed(AssertionError):
    """The pod would not have succeeded on a node; the message says which container and why."""

    run: PodRun | None = None


@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    proc: subprocess.Popen
    log: Path
    started: float
    exit_code: int | None = None
    killed: bool = False  # got SIGKILL because the grace period ran out

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class PodRun:
    """What happened, container by container, in the order they started."""

    containers: dict[str, Container] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    def exit_code(self, name: str) -> int | None:
        return self.containers[name].exit_code

    def logs(self, name: str) -> str:
        return self.containers[name].logs()


@dataclass
class Image:
    """What a container image would bring: files at their paths in the image, and its environment."""

    files: dict[str, str]
    env: dict[str, str]


@dataclass
class Pod:
    """One pod: its spec (`template.spec` of a rendered workload), its metadata and what it mounts."""

    spec: dict[str, Any]
    metadata: dict[str, Any]
    volumes: Volumes
    images: dict[str, Image]
    workdir: Path
    probe_timeout: float = 60.0
    _made: list[Path] = field(default_factory=list)  # mount points this pod had to create

    def run(self, main_timeout: float = 120.0) -> PodRun:
        run = PodRun()
        prober = Prober(run.events)
        try:
            for c in self.spec.get("initContainers", []):
                if c.get("restartPolicy") == "Always":
                    started = self._start(c, run)
                    prober.wait_started_and_ready(started, self.probe_timeout)
                    prober.watch_liveness(started)
                else:
                    self._run_to_completion(c, run, main_timeout)
            mains = [self._start(c, run) for c in self.spec["containers"]]
            for m in mains:
                self._wait(m, main_timeout, run)
            run.events.append("main containers exited")
        except PodFailed as failed:
            failed.run = run  # what had happened by then, for the test to look at
            raise
        finally:
            prober.stop()
            self._terminate_sidecars(run)
            self._remove_mount_points()
        for failure in prober.liveness_failures:
            raise PodFailed(failure)
        return run

    def _run_to_completion(self, spec: dict[str, Any], run: PodRun, timeout: float) -> None:
        c = self._start(spec, run)
        self._wait(c, timeout, run)
        if c.exit_code != 0:
            raise PodFailed(f"init container {c.name} exited {c.exit_code}:\n{c.logs()[-3000:]}")

    def _wait(self, c: Container, timeout: float, run: PodRun) -> None:
        try:
            c.exit_code = c.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_tree(c.proc, signal.SIGKILL)
            c.exit_code, c.killed = c.proc.wait(), True
            raise PodFailed(f"container {c.name} still running after {timeout} s:\n{c.logs()[-3000:]}") from None
        run.events.append(f"{c.name} exited {c.exit_code}")

    def _terminate_sidecars(self, run: PodRun) -> None:
        """Reverse start order, one grace period for all of them (the pod's, from now)."""
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        deadline = time.monotonic() + grace
        sidecars = [c for c in run.containers.values() if c.spec.get("restartPolicy") == "Always"]
        for c in reversed(sidecars):
            if c.proc.poll() is None:
                run.events.append(f"SIGTERM {c.name}")
                c.proc.send_signal(signal.SIGTERM)  # to the container's PID 1, as the runtime does
            try:
                c.exit_code = c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_tree(c.proc, signal.SIGKILL)
                c.exit_code, c.killed = c.proc.wait(), True
            run.events.append(f"{c.name} exited {c.exit_code}" + (" (killed at the grace period)" if c.killed else ""))

    def _start(self, spec: dict[str, Any], run: PodRun) -> Container:
        name = spec["name"]
        if spec["image"] not in self.images:
            raise PodFailed(f"container {name}: image {spec['image']} is not one the test provides")
        image = self.images[spec["image"]]
        env = container_env(spec, self.metadata, self.volumes, image.env)
        image_files = image.files
        argv = [expand(a, env) for a in [*spec.get("command", []), *spec.get("args", [])]]
        if not spec.get("command"):
            raise PodFailed(f"container {name} relies on its image's ENTRYPOINT; the chart must say the command")
        argv = [image_files.get(a, a) for a in argv]  # a file the image ships, named by its path there
        if not argv[0].startswith("/"):
            found = shutil.which(argv[0], path=env.get("PATH", ""))
            if found is None:
                raise PodFailed(f"container {name}: {argv[0]} is not on the container's PATH")
            argv[0] = found
        mounts = self.volumes.mounts(spec)
        self._make_mount_points(mounts)
        plan = {
            "mounts": mounts,
            "keep": KEEP,
            "private_tmp": not _security(self.spec, spec).get("readOnlyRootFilesystem")
            and not any(m["target"] == "/tmp" for m in mounts),
            "workdir": spec.get("workingDir", "/"),
            "user": _user(self.spec, spec),
        }
        log = self.workdir / f"{name}.log"
        plan_file = self.workdir / f"{name}.plan.json"
        plan_file.write_text(json.dumps(plan))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*UNSHARE, sys.executable, str(LAUNCHER), str(plan_file), *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the container's processes form one group we can signal
            )
        c = Container(name, spec, proc, log, time.monotonic())
        run.containers[name] = c
        run.events.append(f"{name} started")
        return c

    def _make_mount_points(self, mounts: list[dict[str, Any]]) -> None:
        """A mount needs its target to exist. The host's tree stands in for the image's, so
        whatever is missing is made here, and removed when the pod is gone."""
        for m in mounts:
            target = Path(m["target"])
            missing = [p for p in [target, *target.parents] if not p.exists()]
            for p in reversed(missing):
                if p == target and Path(m["source"]).is_file():
                    p.touch()
                else:
                    p.mkdir()
                self._made.append(p)

    def _remove_mount_points(self) -> None:
        for p in reversed(self._made):
            if p.is_dir():
                p.rmdir()  # empty: every container sees the host's tree read-only
            elif p.exists():
                p.unlink()
        self._made.clear()


def _security(pod_spec: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {**pod_spec.get("securityContext", {}), **spec.get("securityContext", {})}


def _user(pod_spec: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Who the container's processes are: container settings win over the pod's."""
    sec = _security(pod_spec, spec)
    pod_sec = pod_spec.get("securityContext", {})
    groups = [g for g in [pod_sec.get("fsGroup"), *pod_sec.get("supplementalGroups", [])] if g is not None]
    uid = sec.get("runAsUser", 0)
    if sec.get("runAsNonRoot") and uid == 0:
        raise PodFailed(f"container {spec['name']} says runAsNonRoot but would run as root")
    return {"uid": uid, "gid": sec.get("runAsGroup", 0), "groups": groups}


def _signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Every process of the container (its process group), as the runtime kills a container."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
