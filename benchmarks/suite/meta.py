"""The machine and the versions a report was measured with."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from .store import REPO, Store, servers


def _out(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
        return (done.stdout or done.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / (1 << 20)
    return float("nan")


def collect(store: Store) -> dict:
    from daemon import __version__

    rev = _out(["git", "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(["git", "status", "--porcelain", "--", "daemon"], capture_output=True, text=True, cwd=REPO)
    dirty = " + uncommitted changes in daemon/" if changed.stdout.strip() else ""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cores": os.cpu_count(),
            "memory_gib": round(_mem_gib(), 1),
            "kernel": " ".join(platform.uname()[0:3:2]),
            "cpu": _cpu_model(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "ckptd": f"{__version__} (git {rev}{dirty})",
            "s5cmd": _out([store.peer("s5cmd"), "version"]),
            "aws": _out([store.peer("aws"), "--version"]),
            "juicefs": _out([servers.juicefs_binary(), "version"]),
        },
    }
