"""Where the files of resolved checkpoints land, with no I/O: every path checked to stay inside
the restore folder, and two references landing on one folder refused (SPEC §5).

The unit of restore is a checkpoint folder (`Unit`): it is staged and put in place as a whole
(stage.py), so that the trainer never finds a folder that holds a marker but misses files.

Root files (the `.` pseudo-checkpoint: a tokenizer saved at the top of the checkpoint folder) of
every reference's job land together at the top of the rank folder, one unit. Two references
bringing one root file:

| same path | same size and SHA-256 | outcome                                            |
|-----------|-----------------------|----------------------------------------------------|
| no        | -                     | both restored                                      |
| yes       | yes                   | restored once (e.g. two checkpoints of one job)    |
| yes       | no                    | Conflict (exit 2): which one the trainer reads would be an accident |
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    target: str  # absolute, for messages and the report; written only through its Unit's folder
    size: int
    sha256: str
    relpath: str  # inside its checkpoint's folder: 'sub/optimizer.pt'


@dataclass
class Unit:
    """One checkpoint folder to put in place, and whether a reference requires it."""

    name: str  # the folder's name in the rank folder, or '.' for the files at the rank folder's top
    folder: str  # absolute
    required: bool
    refs: list[str]
    items: list[Item] = field(default_factory=list)


def _target_folder(rank_folder: str, res: Resolved) -> str:
    try:
        folder = layout.local_path(rank_folder, res.checkpoint)
    except layout.UnsafePath as exc:
        raise UnsafeManifest(f"{res.ref.describe()}: refusing checkpoint name: {exc}") from None
    if os.path.dirname(folder) != rank_folder:
        raise UnsafeManifest(f"{res.ref.describe()}: refusing checkpoint name {res.checkpoint!r}: not one folder")
    return folder


def _items_of(res: Resolved, manifest: dict[str, Any], rank_folder: str) -> list[Item]:
    """The files of one manifest (a checkpoint's or the root's), each path checked and listed once."""
    checkpoint, items, seen = manifest["checkpoint"], [], set()
    for entry in manifest["files"]:
        path, key = entry["path"], entry["key"]
        try:
            target = layout.local_path(rank_folder, path)
        except layout.UnsafePath as exc:
            raise UnsafeManifest(f"refusing key {key!r} of {res.ref.describe()}: {exc}") from None
        if layout.checkpoint_of(path) != checkpoint:
            raise UnsafeManifest(f"refusing key {key!r} of {res.ref.describe()}: {path!r} is outside {checkpoint!r}")
        if path in seen:
            raise UnsafeManifest(f"{res.ref.describe()}: manifest lists {target} twice")
        seen.add(path)
        inside = path if checkpoint == layout.ROOT_CHECKPOINT else path.partition("/")[2]
        items.append(Item(key, target, entry["size"], entry["sha256"], inside))
    return items


def _source(res: Resolved) -> tuple[str, str, int, str]:
    return res.project, res.job_id, res.source_rank, res.checkpoint


def _check_root_names(units: dict[str, Unit]) -> None:
    # A file at the rank folder's top named like another reference's checkpoint folder.
    root = next((u for u in units.values() if u.name == layout.ROOT_CHECKPOINT), None)
    for item in root.items if root else ():
        if (other := units.get(os.path.join(root.folder, item.relpath))) is not None:
            raise Conflict(f"{', '.join(root.refs)} and {', '.join(other.refs)} would both restore to {other.folder}")


class _Root:
    """The root unit, filled by every reference that brings root files (see the table above)."""

    def __init__(self, rank_folder: str) -> None:
        self.unit = Unit(layout.ROOT_CHECKPOINT, rank_folder, False, [])
        self.brought: dict[str, tuple[Item, str]] = {}  # relpath -> the item and who brought it

    def add(self, res: Resolved, items: list[Item]) -> None:
        # Labelled apart from the reference when its checkpoint is elsewhere: refusing the root
        # folder's files (a link in the way) must not report that checkpoint as not restored.
        ref = res.ref.describe()
        label = ref if res.checkpoint == layout.ROOT_CHECKPOINT else f"{ref} (root files)"
        for item in items:
            first = self.brought.setdefault(item.relpath, (item, label))
            if first[0] is item:
                self.unit.items.append(item)
            elif (first[0].size, first[0].sha256) != (item.size, item.sha256):
                raise Conflict(
                    f"{first[1]} and {label} would both restore {item.target} with different bytes; "
                    "remove one of the references"
                )
        self.unit.required |= res.ref.required
        if label not in self.unit.refs:
            self.unit.refs.append(label)


def _entry(res: Resolved, folder: str, items: list[Item], root_files: int) -> dict[str, Any]:
    return {
        "ref": res.ref.describe(),
        "project": res.project,
        "job_id": res.job_id,
        "source_rank": res.source_rank,
        "checkpoint": res.checkpoint,
        "step": res.manifest.get("step"),
        "committed_at": res.manifest.get("committed_at"),
        "target": folder,
        "files": len(items),
        "bytes": sum(i.size for i in items),
        "root_files": root_files,
        "merged_ranks": list(res.merged_ranks),  # a multi-node checkpoint: every rank's files, merged
    }


def plan(resolved: Sequence[Resolved], restore_dir: str, rank: int) -> tuple[list[Unit], list[dict[str, Any]]]:
    """The checkpoint folders to put in place and what each reference restores; no I/O.

    Raises UnsafeManifest for a file that would escape the folder, Conflict for two references
    landing on one folder or one root file. Two references naming the very same checkpoint are one
    unit, required if either is. Each entry of the report: ref, project, job_id, source_rank,
    checkpoint, step, committed_at, target, files, bytes (of the checkpoint), root_files (brought
    along with it).
    """
    # This node's rank, even when the files come from rank 0 of the source job: the trainer always
    # finds them with get_last_checkpoint(f"{BT_LOAD_CHECKPOINT_DIR}/rank-{BT_NODE_RANK}").
    rank_folder = os.path.join(os.path.abspath(restore_dir), f"rank-{rank}")
    claimed: dict[str, Resolved] = {}
    units: dict[str, Unit] = {}
    root = _Root(rank_folder)
    restored = []
    for res in resolved:
        if res.checkpoint == layout.ROOT_CHECKPOINT:
            mine = _items_of(res, res.manifest, rank_folder)
            root.add(res, mine)
            restored.append(_entry(res, rank_folder, mine, 0))
            continue
        folder = _target_folder(rank_folder, res)
        first = claimed.setdefault(folder, res)
        if first is not res and _source(first) != _source(res):
            raise Conflict(
                f"{first.ref.describe()} and {res.ref.describe()} would both restore to {folder}; "
                "give one of them another checkpoint or remove it"
            )
        mine = _items_of(res, res.manifest, rank_folder)
        unit = units.setdefault(folder, Unit(res.checkpoint, folder, False, []))
        unit.required |= res.ref.required
        unit.refs.append(res.ref.describe())
        if first is res:
            unit.items = mine
        tops = _items_of(res, res.root, rank_folder) if res.root is not None else []
        if tops:
            root.add(res, tops)
        restored.append(_entry(res, folder, mine, len(tops)))
    if root.unit.refs:
        units[rank_folder] = root.unit
    _check_root_names(units)
    return list(units.values()), restored
