"""Become one container of a simulated pod, then exec its command (run inside `unshare --mount`).

    container.py PLAN.json ARGV...

The plan says which local folders to bind at which paths (read-only where the manifest says so),
whether the container gets a private /tmp, the working folder and the user. Exec keeps the pid, so
the process the pod runner started is the container's PID 1, the one that gets SIGTERM.
"""

import ctypes
import json
import os
import sys

MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
SPECIAL = ("/proc", "/sys", "/dev")  # a runtime gives every container its own, writable where it matters
libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: str, flags: int, fstype: str | None = None) -> None:
    if libc.mount(source.encode(), target.encode(), fstype and fstype.encode(), flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def bind(source_fd: int, target: str, read_only: bool) -> None:
    # Through the descriptor: a volume mounted earlier (an emptyDir at /tmp) may hide the source's path.
    mount(f"/proc/self/fd/{source_fd}", target, MS_BIND)
    if read_only:
        mount("none", target, MS_BIND | MS_REMOUNT | MS_RDONLY)


def reexpose(path: str, fd: int) -> None:
    """A checkout under /tmp (a CI clone) is hidden by a volume mounted at /tmp; the image's files
    (ckptd, the trainer's script) live there, so put that folder back where it was."""
    try:
        if os.path.samestat(os.stat(path), os.fstat(fd)):
            return
    except FileNotFoundError:
        pass
    os.makedirs(path, exist_ok=True)
    mount(f"/proc/self/fd/{fd}", path, MS_BIND)
    os.close(fd)


def read_only_root(targets: set[str]) -> None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in points:
        if point.startswith(SPECIAL) or point in targets:
            continue
        try:
            mount("none", point, MS_BIND | MS_REMOUNT | MS_RDONLY)
        except OSError:
            pass  # a mount the namespace may not change (locked); it is not the image's file system


def main() -> None:
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    argv = sys.argv[2:]
    mounts = sorted(plan["mounts"], key=lambda m: m["target"].count("/"))  # parents before children
    sources = [os.open(m["source"], os.O_PATH) for m in mounts]
    kept = [(path, os.open(path, os.O_PATH)) for path in plan["keep"]]
    # Volumes first: a bind mount takes the read-only flag of the mount its source lies on.
    for m, fd in zip(mounts, sources, strict=True):
        bind(fd, m["target"], m["read_only"])
        os.close(fd)
    # The host's tree stands in for the image's; it must not take the container's writes. Where the
    # image would be writable, /tmp gets a private tmpfs; any other path no volume provides fails.
    if plan["private_tmp"]:
        mount("tmpfs", "/tmp", 0, "tmpfs")
    for path, fd in kept:
        reexpose(path, fd)
    read_only_root({m["target"] for m in mounts} | ({"/tmp"} if plan["private_tmp"] else set()))
    user = plan["user"]
    os.setgroups(user["groups"])
    os.setgid(user["gid"])
    os.setuid(user["uid"])
    os.chdir(plan["workdir"])
    os.execv(argv[0], argv)


main()
