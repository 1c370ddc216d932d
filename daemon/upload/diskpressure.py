"""Opt-in disk pressure relief: remove local copies of older checkpoints that are safely committed.

Only when free space falls below the watermark; never the newest checkpoint (the trainer may
resume from it), never one that is not committed (its only complete copy may be local).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.catalog.manifest import parse_step
from daemon.files import free_bytes
from daemon.upload.statedir import is_state

log = structlog.get_logger()


@dataclass(frozen=True)
class LocalCheckpoint:
    name: str
    committed: bool
    order: tuple[int, float]  # (step or -1, newest mtime): what "older" means
    size: int


def victims(checkpoints: list[LocalCheckpoint], free: int, min_free: int) -> list[str]:
    """Which checkpoints to remove, oldest first, until `free` reaches `min_free`.

    | free < min_free | newest | committed | removed                      |
    |-----------------|--------|-----------|------------------------------|
    | no              | any    | any       | no                           |
    | yes             | yes    | any       | no                           |
    | yes             | no     | no        | no                           |
    | yes             | no     | yes       | yes, oldest first, until enough is free |
    """
    if min_free <= 0 or free >= min_free:
        return []
    ordered = sorted(checkpoints, key=lambda c: c.order)
    chosen = []
    for c in ordered[:-1]:
        if free >= min_free:
            break
        if c.committed:
            chosen.append(c.name)
            free += c.size
    return chosen


def local_checkpoints(root: str, committed: Callable[[str], bool]) -> list[LocalCheckpoint]:
    """Top-level folders of the checkpoint folder with their size and age (blocking: use a thread)."""
    out = []
    for entry in os.scandir(root):
        if not entry.is_dir(follow_symlinks=False) or is_state(entry.name):
            continue
        size, newest = 0, entry.stat(follow_symlinks=False).st_mtime
        for folder, _, files in os.walk(entry.path):
            for name in files:
                try:
                    st = os.stat(os.path.join(folder, name), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                size, newest = size + st.st_blocks * 512, max(newest, st.st_mtime)
        step = parse_step(entry.name)
        out.append(LocalCheckpoint(entry.name, committed(entry.name), (-1 if step is None else step, newest), size))
    return out


def relieve(root: str, min_free: int, committed: Callable[[str], bool]) -> list[str]:
    """Remove what `victims` picks; return the names removed (blocking: use a thread)."""
    free = free_bytes(root)
    if free >= min_free:
        return []
    removed = []
    for name in victims(local_checkpoints(root, committed), free, min_free):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
        log.info("local checkpoint removed for disk space", checkpoint=name, free_bytes=free, min_free_bytes=min_free)
    return removed
