"""CPU (user + system) and peak memory of process trees, as the operating system counts them.

A peer is a command we start and reap: wait4 gives its whole tree's CPU and peak RSS. The ckptd
daemon and the store are long-running trees (the uploader is a child process): their CPU is the
sum of utime+stime+cutime+cstime over every live process of the tree, read before and after a
round, and their peak RSS the largest VmHWM any of their processes reached.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Usage:
    wall: float  # seconds
    cpu: float  # user + system seconds of the whole tree
    rss: int  # peak resident bytes of the largest process


class CommandFailed(RuntimeError):
    pass


def run_command(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> Usage:
    """Run a command to its end; raise with its stderr when it fails.

    CPU from wait4. Peak RSS from VmHWM sampled every 20 ms, not ru_maxrss: a child forked from
    this (large) Python process inherits its high-water mark across exec.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        sampler = RssSampler(Tree(proc.pid), interval=0.02)
        sampler.start()
        # wait4, not Popen.wait: its rusage covers the command and every descendant it reaped.
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop_event.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-3000:].decode(errors="replace")
            raise CommandFailed(f"{argv[0]} exited {proc.returncode}: {' '.join(argv)}\n{tail}")
    return Usage(wall, ru.ru_utime + ru.ru_stime, max(sampler.tree.peaks.values(), default=0))


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Tree:
    """A running process tree: its CPU so far, and the peak RSS of its processes (sampled)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks: dict[int, int] = {}

    def cpu(self) -> float:
        total = 0.0
        for p in _tree(self.pid):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue  # exited between listing and reading: its parent's cutime has it once reaped
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def sample_rss(self) -> None:
        for p in _tree(self.pid):
            self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), _hwm(p.pid))

    def peak_rss(self) -> int:
        self.sample_rss()
        return max(self.peaks.values(), default=0)


class RssSampler(threading.Thread):
    """Samples a tree's VmHWM every `interval` s: a child that exits takes its high-water mark along."""

    def __init__(self, tree: Tree, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.tree, self.interval, self.stop_event = tree, interval, threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.tree.sample_rss()
            self.stop_event.wait(self.interval)

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return self.tree.peak_rss()


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of every process of a tree (taskset -a, recursively)."""
    for p in _tree(pid):
        for task in Path(f"/proc/{p.pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), cpus)
            except OSError:
                pass  # the thread ended meanwhile


def drop_caches() -> None:
    """Cold page cache: write dirty pages back, then drop clean ones (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
