"""Scenario 6: interference. A CPU-bound training loop pinned to core 0 (the store pinned to core
1); its median step time idle, while ckptd at its DEFAULT priority (no --nice/--io-priority)
uploads scenario 2, and while s5cmd at its defaults uploads it. The uploaders are not pinned: they
compete for both cores, as they would beside a real trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import data, tools
from .ckptd import Watcher
from .procs import run_command, set_affinity
from .store import Store

TRAINER_CORE, STORE_CORE = 0, 1


def run_round(store: Store, dataset: data.Dataset, work: Path, opts: dict) -> dict:
    rdir = work / "interfere"
    watcher = Watcher(store, rdir / "ckptd", opts["settle"], default_priority=True)
    peer_bucket = store.new_bucket()
    steps_log = rdir / "steps.jsonl"
    trainer = None
    try:
        ckptd_moves = data.stage(dataset, watcher.ckpt)
        peer_moves = data.stage(dataset, rdir / "peer")
        os.sync()  # the staging's writeback is not the uploads' doing
        with open(steps_log, "wb") as out:
            argv = ["taskset", "-c", str(TRAINER_CORE), sys.executable, "-m", "benchmarks.suite.trainloop"]
            trainer = subprocess.Popen([*argv, "--seconds", "3600"], stdout=out, env=store.env)
        _wait_steps(steps_log, trainer)
        windows = {"idle": (time.time(), _sleep(opts["idle_seconds"]))}
        start = data.publish(ckptd_moves)
        windows["ckptd"] = (start, watcher.wait_stored([rel for rel, _ in dataset], 1800) + 0.0)
        data.publish(peer_moves)
        start = time.time()
        run_command(tools.upload(store, "s5cmd", peer_moves[0][1], peer_bucket, "bench/"), store.env)
        windows["s5cmd"] = (start, time.time())
    finally:
        if trainer:
            trainer.terminate()
            trainer.wait()
        watcher.stop()
        for bucket in (watcher.bucket, peer_bucket):
            store.drop_bucket(bucket)
    steps = [json.loads(line) for line in steps_log.read_text().splitlines() if line.strip()]
    shutil.rmtree(rdir, ignore_errors=True)
    return {name: _median_in(steps, a, b) | {"wall": b - a} for name, (a, b) in windows.items()}


def _sleep(seconds: float) -> float:
    time.sleep(seconds)  # the idle window itself: a measurement period, not a wait for a condition
    return time.time()


def _wait_steps(log: Path, trainer: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while log.stat().st_size == 0:
        if trainer.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the training loop did not start (exit {trainer.returncode})")
        time.sleep(0.05)


def _median_in(steps: list[dict], start: float, end: float) -> dict:
    inside = [s["step"] for s in steps if s["t"] - s["step"] >= start and s["t"] <= end]
    return {"steps": len(inside), "median_step": statistics.median(inside) if inside else float("nan")}


def pin_store(store: Store) -> None:
    set_affinity(store.process.proc.pid, {STORE_CORE})


def unpin_store(store: Store) -> None:
    set_affinity(store.process.proc.pid, set(range(os.cpu_count() or 1)))
