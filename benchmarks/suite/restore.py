"""Scenario 4: restore of scenarios 1 and 2 with `ckptd restore`, from process start to exit (what
the GPUs wait for), against s5cmd and the AWS CLI downloading the same objects; page cache
dropped before every run, so neither the local disk nor the store serves from memory.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from . import data, tools
from .ckptd import PROJECT, Watcher, ckptd_args, key_prefix
from .procs import drop_caches, run_command
from .store import Store


def as_checkpoint(dataset: data.Dataset, step: int) -> data.Dataset:
    """Top-level files become a committed checkpoint folder (restore takes committed ones only)."""
    if data.folder_of(dataset):
        return dataset
    return [
        *((f"checkpoint-{step}/{rel}", size) for rel, size in dataset),
        (f"checkpoint-{step}/trainer_state.json", 2000),
    ]


def seed(store: Store, work: Path, sets: dict[str, data.Dataset], settle: float) -> str:
    """Store each set as the committed checkpoint of its own job (named as the set); the bucket."""
    bucket = store.new_bucket()
    for name, dataset in sets.items():
        watcher = Watcher(store, work / f"seed-{name}", settle, job=name, bucket=bucket)
        try:
            data.publish(data.stage(dataset, watcher.ckpt))
            watcher.wait_event("checkpoint committed", timeout=1800)
        finally:
            watcher.stop()
            shutil.rmtree(work / f"seed-{name}", ignore_errors=True)
    return bucket


def run_round(store: Store, tool: str, bucket: str, job: str, dataset: data.Dataset, work: Path) -> dict:
    dest = work / "restored"
    try:
        drop_caches()
        store_cpu0 = store.tree.cpu()
        if tool == "ckptd":
            argv = [sys.executable, "-m", "daemon", "restore", *ckptd_args(store, bucket), "--project", PROJECT]
            argv += ["--load", f"job={job}", "--restore-dir", str(dest)]
            usage = run_command(argv, store.env)
            root = dest / "rank-0"
        else:
            dest.mkdir(parents=True)
            usage = run_command(tools.download(store, tool, bucket, key_prefix(job), dest), store.env)
            root = dest
        store_cpu = store.tree.cpu() - store_cpu0
        wrong = [rel for rel, size in dataset if not _has(root / rel, size)]
        if wrong:
            raise RuntimeError(f"{tool} restore: {len(wrong)} files missing or of the wrong size, e.g. {wrong[0]}")
        row = {"wall": usage.wall, "cpu": usage.cpu, "rss": usage.rss, "store_cpu": store_cpu}
        return {"tool": tool, "bytes": data.total(dataset), "files": len(dataset), **row}
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _has(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False
