"""One measured upload round for one tool: scenarios 1, 2, 3 and 7 (and 1's cold and fsynced
variants). The data is staged under a temporary name, then renamed into the checkpoint folder:
ckptd is already watching it; a peer's command starts right after the rename.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from . import data, tools
from .ckptd import Watcher, key_prefix
from .procs import drop_caches, run_command
from .store import Store


def run_round(store: Store, tool: str, dataset: data.Dataset, work: Path, opts: dict) -> dict:
    """Time, CPU and peak RSS of `tool` storing `dataset`; `opts`: settle, cold, fsync."""
    rdir = work / f"round-{uuid.uuid4().hex[:8]}"
    watcher, bucket = None, None
    try:
        if tool == "ckptd":
            watcher = Watcher(store, rdir, opts["settle"])
            ckpt, bucket = watcher.ckpt, watcher.bucket
        else:
            ckpt, bucket = rdir / "ckpt", store.new_bucket()
            ckpt.mkdir(parents=True)
        os.sync()  # the previous round's writeback must not run into this one
        moves = data.stage(dataset, ckpt, fsync=opts.get("fsync", False))
        if opts.get("cold"):
            drop_caches()
        store_cpu0 = store.tree.cpu()
        if watcher:
            row = _ckptd(watcher, moves, dataset)
            prefix = key_prefix(watcher.job)
        else:
            row = _peer(store, tool, moves, bucket)
            prefix = "bench/"
        row["store_cpu"] = store.tree.cpu() - store_cpu0
        _verify(store, bucket, prefix, dataset, tool, row)
        if watcher:
            watcher.stop()  # a clean drain, outside the timing
        return {"tool": tool, "bytes": data.total(dataset), "files": len(dataset), **row}
    finally:
        if watcher:
            watcher.kill()  # a failed or interrupted round: no drain of what is left
        shutil.rmtree(rdir, ignore_errors=True)
        if bucket:
            store.drop_bucket(bucket)


def _ckptd(watcher: Watcher, moves: list, dataset: data.Dataset) -> dict:
    cpu0 = watcher.tree.cpu()
    renamed = data.publish(moves)
    stored = watcher.wait_stored([rel for rel, _ in dataset], timeout=1800)
    cpu = watcher.tree.cpu() - cpu0
    return {"wall": stored - renamed, "cpu": cpu, "rss": watcher.tree.peak_rss()}


def _peer(store: Store, tool: str, moves: list, bucket: str) -> dict:
    data.publish(moves)
    assert len(moves) == 1, "peers upload one file or one folder"
    src = moves[0][1]
    usage = run_command(tools.upload(store, tool, src, bucket, "bench/"), store.env)
    return {"wall": usage.wall, "cpu": usage.cpu, "rss": usage.rss}


def _verify(store: Store, bucket: str, prefix: str, dataset: data.Dataset, tool: str, row: dict) -> None:
    """Every file landed with its size; what landed goes into the row (the smoke test checks it)."""
    stored = store.sizes(bucket, prefix)
    want = data.expected(dataset)
    row["stored_bytes"] = sum(stored.get(rel, 0) for rel in want)
    got = {rel: stored.get(rel) for rel in want}
    wrong = {rel: (size, got[rel]) for rel, size in want.items() if got[rel] != size}
    if wrong:
        raise RuntimeError(
            f"{tool}: {len(wrong)} objects missing or of the wrong size, e.g. {next(iter(wrong.items()))}"
        )
