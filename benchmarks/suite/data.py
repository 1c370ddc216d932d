"""Checkpoint data written the way a trainer writes it: random bytes into a temporary name on the
same file system, not fsynced (dirty in the page cache), then renamed into place.

A data set is a list of (relative path, size). A set whose files share one top-level folder is
staged as `tmp-checkpoint-*` and renamed in one step, as the Hugging Face Trainer does; top-level
files are staged as `NAME.tmp` each. ckptd ignores both temporary names by default.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30
_BLOCK = os.urandom(4 * MiB)

Dataset = list[tuple[str, int]]


def single(size: int, name: str = "model.bin") -> Dataset:
    return [(name, size)]


def hf_checkpoint(big: int, big_n: int, mid: int, mid_n: int, json_n: int, step: int = 100) -> Dataset:
    """Weights shards, optimizer/RNG shards and small JSON files; trainer_state.json is the marker."""
    top = f"checkpoint-{step}"
    files = [(f"{top}/model-{i + 1:05}-of-{big_n:05}.safetensors", big) for i in range(big_n)]
    files += [(f"{top}/optimizer-{i:03}.pt", mid) for i in range(mid_n)]
    files += [(f"{top}/config-{i:03}.json", 2000) for i in range(max(0, json_n - 1))]
    return [*files, (f"{top}/trainer_state.json", 2000)]


def many(count: int, size: int, step: int = 200) -> Dataset:
    return [(f"checkpoint-{step}/shard-{i:05}.bin", size) for i in range(count)]


def total(dataset: Dataset) -> int:
    return sum(size for _, size in dataset)


def folder_of(dataset: Dataset) -> str | None:
    """The one top-level folder holding every file, or None for top-level files."""
    tops = {rel.split("/", 1)[0] if "/" in rel else None for rel, _ in dataset}
    return tops.pop() if len(tops) == 1 else None


def _write(path: Path, size: int, fsync: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        if path.suffix == ".json":  # text, as a trainer's JSON is
            text = json.dumps({"global_step": 100, "log_history": [{"loss": 1.0, "step": 100}]}).encode()
            f.write(text.ljust(size, b" "))  # trailing blanks keep it valid JSON of the stated size
        else:
            seed = os.urandom(8)  # every block differs: no store or file system can deduplicate
            for i in range(0, size, len(_BLOCK)):
                n = min(len(_BLOCK), size - i)
                f.write(seed + i.to_bytes(8, "little") + _BLOCK[16:n] if n > 16 else _BLOCK[:n])
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def stage(dataset: Dataset, ckpt: Path, fsync: bool = False) -> list[tuple[Path, Path]]:
    """Write the data under temporary names in `ckpt`; return the renames that publish it."""
    top = folder_of(dataset)
    if top is not None:
        tmp = ckpt / f"tmp-{top}"
        for rel, size in dataset:
            _write(tmp / rel.split("/", 1)[1], size, fsync)
        return [(tmp, ckpt / top)]
    moves = []
    for rel, size in dataset:
        tmp = ckpt / f"{rel}.tmp"
        _write(tmp, size, fsync)
        moves.append((tmp, ckpt / rel))
    return moves


def publish(moves: list[tuple[Path, Path]]) -> float:
    """Rename into place; returns the wall-clock time of the last rename (the 'close' of the issue)."""
    for src, dst in moves:
        os.rename(src, dst)
    return time.time()


def expected(dataset: Dataset) -> dict[str, int]:
    return dict(dataset)
