"""A small Hugging Face-style trainer for the image test, run by the base image's own Python as the
container's command under `ckptd run`. Standard library only: the base has nothing else.

It saves checkpoint-N/ folders into BT_CHECKPOINT_DIR (weights, optimizer, then trainer_state.json
last: the commit marker) and writes what it saw of the container to TRAIN_REPORT as JSON: PID 1, the
ckptd process and its credentials, its own interpreter and process group.

TRAIN_STEPS  checkpoints to save (default 2)
TRAIN_HOLD   if set: after them, write the report and wait for SIGTERM (120 s at most), then save one
             more checkpoint and exit 17, as a trainer that saves when it is preempted
"""

import hashlib
import json
import os
import signal
import sys
import time

PREEMPTED_EXIT = 17
HOLD_SECONDS = 120  # the test sends SIGTERM within seconds; this only bounds a trainer left alone


def weights(step: int) -> bytes:
    """Deterministic content the test can check byte for byte in the store (256 KiB)."""
    return hashlib.sha256(f"step-{step}".encode()).digest() * 8192


def save(step: int) -> None:
    folder = os.path.join(os.environ["BT_CHECKPOINT_DIR"], f"checkpoint-{step}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(weights(step))
    with open(os.path.join(folder, "optimizer.pt"), "wb") as f:
        f.write(os.urandom(4096))
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "log_history": [{"step": step, "eval_loss": 1.0 / step}]}, f)


def status(pid: str) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {k: fields.get(k, "").split() for k in ("Uid", "Gid", "Groups")}


def cmdline(pid: str) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def ckptd_processes() -> list[dict]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = cmdline(pid)
            if "/opt/ckptd/bin/ckptd" in argv:
                found.append({"pid": int(pid), "argv": argv, "pgid": os.getpgid(int(pid)), **status(pid)})
        except (OSError, ProcessLookupError):
            pass  # a process that ended while we looked
    return found


def report(**extra: object) -> None:
    path = os.environ["TRAIN_REPORT"]
    seen = {
        "pid1": cmdline("1"),
        "ckptd": ckptd_processes(),
        "me": {"pid": os.getpid(), "pgid": os.getpgid(0), **status("self")},
        "executable": os.path.realpath(sys.executable),
        "path": os.environ.get("PATH", ""),
        "root_read_only": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        **extra,
    }
    with open(path + ".tmp", "w") as f:
        json.dump(seen, f)
    os.rename(path + ".tmp", path)  # the test waits for this file: it appears whole


def main() -> int:
    steps = int(os.environ.get("TRAIN_STEPS", "2"))
    for step in range(1, steps + 1):
        save(step)
    if not os.environ.get("TRAIN_HOLD"):
        report()
        return 0
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by sigtimedwait, not a handler
    report(holding=True)
    started = time.monotonic()
    if signal.sigtimedwait({signal.SIGTERM}, HOLD_SECONDS) is None:
        print("train.py: no SIGTERM came", file=sys.stderr)
        return 3
    save(steps + 1)
    report(holding=False, stopped_after=round(time.monotonic() - started, 3))
    return PREEMPTED_EXIT


if __name__ == "__main__":
    sys.exit(main())
