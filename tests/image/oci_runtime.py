"""Build the image with buildah and run it as a container runtime would, with the host's own tools.

A base image comes from debootstrap (Debian with Python, as the slim Python images have), committed
with `buildah from scratch`. The Dockerfile is built with `buildah bud` into a storage folder of the
test's own (vfs: no kernel overlay needed). A container is the image mounted by buildah and entered
with util-linux's `unshare`: its own mount and PID namespaces (so the image's entrypoint is PID 1),
/proc and /dev, the image's Entrypoint, Cmd, User, Env and WorkingDir, HOME from its passwd as
Docker sets it, volumes bound in, optionally a read-only root. The network is the host's, so the
container reaches the test's S3 server on 127.0.0.1.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = "python3,python3-venv,python-is-python3"  # python3-venv: the builder's pip
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # pip in the build trusts what the host trusts


def tool(name: str) -> str:
    """A host tool by absolute path: the container's PATH is in force where these run."""
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: the image tests need it (see docs/image.md)")
    return path


class Buildah:
    """`buildah` on a storage folder of its own, so nothing of the machine's images is touched."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.base = ["buildah", "--root", str(storage / "root"), "--runroot", str(storage / "run")]
        self.base += ["--storage-driver", "vfs"]

    def __call__(self, *args: str, log: Path | None = None, timeout: float = 600) -> str:
        if log is None:
            done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout)
            output = done.stdout + done.stderr
        else:
            with log.open("a") as out:
                done = subprocess.run([*self.base, *args], stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            output = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        if done.returncode != 0:
            raise RuntimeError(f"buildah {' '.join(args[:2])} failed ({done.returncode}):\n{output}")
        return done.stdout.strip() if log is None else ""

    def inspect(self, image: str) -> dict:
        return json.loads(self("inspect", "--type", "image", image))

    def remove_everything(self) -> None:
        subprocess.run([*self.base, "rm", "--all"], capture_output=True)
        subprocess.run([*self.base, "rmi", "--all", "--force"], capture_output=True)
        shutil.rmtree(self.storage, ignore_errors=True)


def debootstrap_base(buildah: Buildah, workdir: Path, tag: str) -> None:
    """A minimal Debian with python3, configured like the official Python images (PATH, CMD python3)."""
    rootfs = workdir / "rootfs"
    log = workdir / "debootstrap.log"
    with log.open("w") as out:
        done = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, str(rootfs), MIRROR],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    container = buildah("from", "scratch")
    mounted = Path(buildah("mount", container))
    subprocess.run(["cp", "-a", f"{rootfs}/.", str(mounted)], check=True)
    buildah("umount", container)
    shutil.rmtree(rootfs)
    buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container)
    buildah("config", "--cmd", "python3", container)
    buildah("commit", "--quiet", "--rm", container, tag)


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str]
    cmd: list[str]
    user: str
    env: dict[str, str]
    workdir: str
    labels: dict[str, str]

    @classmethod
    def of(cls, inspected: dict) -> ImageConfig:
        config = inspected["OCIv1"]["config"]
        return cls(
            entrypoint=config.get("Entrypoint") or [],
            cmd=config.get("Cmd") or [],
            user=config.get("User") or "0:0",
            env=dict(e.split("=", 1) for e in config.get("Env") or []),
            workdir=config.get("WorkingDir") or "/",
            labels=config.get("Labels") or {},
        )


@dataclass
class Running:
    """A started container: `init_pid()` is the host's pid of its PID 1; `wait()` its exit code."""

    proc: subprocess.Popen
    entrypoint: str
    log: Path

    def init_pid(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            for pid in children.read_text().split() if children.exists() else []:
                try:
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() == self.entrypoint:
                        return int(pid)
                except OSError:
                    pass  # exec'ing or gone: look again
            if self.proc.poll() is not None:
                raise RuntimeError(f"the container exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)  # polling for the exec, bounded by the deadline
        raise RuntimeError(f"no PID 1 running {self.entrypoint} after {timeout:.0f}s:\n{self.output()}")

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # --kill-child: the container's PID 1 dies, and with it all
            self.proc.wait()


@dataclass
class Container:
    """A writable container of an image (`buildah from`), its root file system mounted on the host."""

    buildah: Buildah
    image: str
    config: ImageConfig
    name: str = ""
    rootfs: Path = field(default_factory=Path)
    runs: list[Running] = field(default_factory=list)

    def __enter__(self) -> Container:
        self.name = self.buildah("from", "--pull-never", self.image)
        self.rootfs = Path(self.buildah("mount", self.name))
        return self

    def __exit__(self, *_: object) -> None:
        for running in self.runs:
            running.kill()
        self.buildah("umount", self.name)
        self.buildah("rm", self.name)

    def start(
        self,
        cmd: list[str] | None = None,
        *,
        env: dict[str, str],
        volumes: dict[str, tuple[Path, bool]],
        log: Path,
        entrypoint: list[str] | None = None,
        read_only: bool = False,
    ) -> Running:
        """Run Entrypoint + (cmd or Cmd) as the image's user in new mount and PID namespaces.
        `volumes`: container path -> (host folder, read-only?)."""
        entry = self.config.entrypoint if entrypoint is None else entrypoint
        argv = [*entry, *(self.config.cmd if cmd is None else cmd)]
        uid, gid = self.ids()
        root = shlex.quote(str(self.rootfs))
        mount = tool("mount")
        script = ["set -eu"]
        for target in volumes:
            (self.rootfs / target.lstrip("/")).mkdir(parents=True, exist_ok=True)  # before a read-only root
        if read_only:
            script += [f"{mount} --bind {root} {root}", f"{mount} -o remount,bind,ro {root}"]
        script.append(f"{mount} --rbind /dev {root}/dev")
        for target, (source, ro) in volumes.items():
            where = shlex.quote(f"{self.rootfs}{target}")
            script.append(f"{mount} --bind {shlex.quote(str(source))} {where}")
            if ro:
                script.append(f"{mount} -o remount,bind,ro {where}")
        inner = [tool("unshare"), "--pid", "--fork", "--kill-child", "--mount-proc", f"--root={self.rootfs}"]
        inner += [f"--wd={self.config.workdir}", f"--setgid={gid}", f"--setuid={uid}", "--", *argv]
        script.append("exec " + shlex.join(inner))
        with log.open("w") as out:
            proc = subprocess.Popen(
                [tool("unshare"), "--mount", "--propagation=private", "--", tool("sh"), "-c", "\n".join(script)],
                env={**self.config.env, "HOME": self.home(uid), **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.runs.append(Running(proc, argv[0], log))
        return self.runs[-1]

    def ids(self) -> tuple[int, int]:
        """The image's USER as numbers (names looked up in the image's own passwd and group)."""
        user, _, group = self.config.user.partition(":")
        uid = int(user) if user.isdigit() else self._lookup("passwd", user)[2]
        if group:
            return uid, int(group) if group.isdigit() else self._lookup("group", group)[2]
        return uid, next((e[3] for e in self._entries("passwd") if e[2] == uid), 0)

    def home(self, uid: int) -> str:
        """HOME as Docker sets it: the user's passwd entry, else /."""
        return next((e[5] for e in self._entries("passwd") if e[2] == uid and len(e) > 5), "/")

    def _entries(self, db: str) -> list[list]:
        path = self.rootfs / "etc" / db
        lines = path.read_text().splitlines() if path.exists() else []
        return [[int(f) if i in (2, 3) and f.isdigit() else f for i, f in enumerate(line.split(":"))] for line in lines]

    def _lookup(self, db: str, name: str) -> list:
        return next(e for e in self._entries(db) if e[0] == name)
