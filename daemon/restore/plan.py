"""Where the files of resolved checkpoints land, with no I/O: every path checked to stay inside
the restore folder, and two references landing on one folder refused (SPEC §5)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.catalog import layout
from daemon.restore.resolve import Resolved


class UnsafeManifest(ValueError):
    """A manifest whose files would land outside their checkpoint's folder."""


class Conflict(ValueError):
    """Two references would land on the same folder."""


@dataclass(frozen=True)
class Item:
    """One file to put in place."""

    key: str
    target: str
    size: int
    sha256: str


def _target_folder(rank_folder: str, res: Resolved) -> str:
    if res.checkpoint == layout.ROOT_CHECKPOINT:
        return rank_folder
    try:
        return layout.local_path(rank_folder, res.checkpoint)
    except layout.UnsafePath as exc:
        raise UnsafeManifest(f"{res.ref.describe()}: refusing checkpoint name: {exc}") from None


def _items_of(res: Resolved, rank_folder: str) -> list[Item]:
    items = []
    for entry in res.manifest["files"]:
        path, key = entry["path"], entry["key"]
        try:
            target = layout.local_path(rank_folder, path)
        except layout.UnsafePath as exc:
            raise UnsafeManifest(f"refusing key {key!r} of {res.ref.describe()}: {exc}") from None
        if layout.checkpoint_of(path) != res.checkpoint:
            raise UnsafeManifest(
                f"refusing key {key!r} of {res.ref.describe()}: {path!r} is outside {res.checkpoint!r}"
            )
        items.append(Item(key, target, entry["size"], entry["sha256"]))
    return items


def _source(res: Resolved) -> tuple[str, str, int, str]:
    return res.project, res.job_id, res.source_rank, res.checkpoint


def plan(resolved: Sequence[Resolved], restore_dir: str, rank: int) -> tuple[list[Item], list[dict[str, Any]]]:
    """The files to put in place and what each reference restores; no I/O.

    Raises UnsafeManifest for a file that would escape the folder, Conflict for two references
    landing on one folder. Two references naming the very same checkpoint are one.
    """
    # This node's rank, even when the files come from rank 0 of the source job: the trainer always
    # finds them with get_last_checkpoint(f"{BT_LOAD_CHECKPOINT_DIR}/rank-{BT_NODE_RANK}").
    rank_folder = os.path.join(os.path.abspath(restore_dir), f"rank-{rank}")
    claimed: dict[str, Resolved] = {}
    items: dict[str, Item] = {}
    restored = []
    for res in resolved:
        folder = _target_folder(rank_folder, res)
        first = claimed.setdefault(folder, res)
        if first is not res and _source(first) != _source(res):
            raise Conflict(
                f"{first.ref.describe()} and {res.ref.describe()} would both restore to {folder}; "
                "give one of them another checkpoint or remove it"
            )
        mine = _items_of(res, rank_folder)
        if first is res:
            for item in mine:
                if items.setdefault(item.target, item) is not item:
                    raise UnsafeManifest(f"{res.ref.describe()}: manifest lists {item.target} twice")
        restored.append(
            {
                "ref": res.ref.describe(),
                "project": res.project,
                "job_id": res.job_id,
                "source_rank": res.source_rank,
                "checkpoint": res.checkpoint,
                "step": res.manifest.get("step"),
                "committed_at": res.manifest.get("committed_at"),
                "target": folder,
                "files": len(mine),
                "bytes": sum(i.size for i in mine),
            }
        )
    return list(items.values()), restored
