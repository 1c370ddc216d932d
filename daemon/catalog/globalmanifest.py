"""Global manifests: the commit of a checkpoint that several nodes saved, each into its own folder.

Every node stores its files under `rank-N/` and commits its share of the checkpoint as a per-rank
manifest (a "part": `manifests/rank-N/{ckpt}.json`, reason `part` when it holds shards but not
the marker, `empty` when the node has no file of it). Once every part is there and proven complete
(daemon.upload.crossrank), one node writes the global manifest `manifests/global/{ckpt}.json`: every
rank's files with size and SHA-256, written last. For a multi-node job, a checkpoint is committed
exactly when its global manifest exists.

The content is a pure function of the parts, so two nodes that both finish the commit write the
same bytes; stores that support it also refuse the second write (`Storage.put_if_absent`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from daemon.catalog import jobmeta, layout
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import MAX_MANIFEST_BYTES, check_manifest, get_bounded, parse_step, read_or_skip
from daemon.storage import Storage, StorageError

KIND = "global"
PART, EMPTY = "part", "empty"  # reasons of per-rank manifests that are shares, not commits
_READ_CONCURRENCY = 16


def build_global(
    project: str, job_id: str, checkpoint: str, group_size: int, parts: Mapping[int, dict[str, Any]], reason: str
) -> dict[str, Any]:
    """The global manifest of `checkpoint` from its parts (rank -> per-rank manifest); deterministic.

    Its commit time is the last part's: the moment the checkpoint became complete, the same on
    every node that computes it. Metrics come from the part that holds the marker (trainers log
    on the coordinator), else from the lowest rank that records any.
    """
    ranks = sorted(parts)
    files = [{**entry, "rank": rank} for rank in ranks for entry in parts[rank]["files"]]
    with_metrics = [parts[r] for r in ranks if parts[r]["reason"] == "marker"] + [parts[r] for r in ranks]
    metrics = next((p["metrics"] for p in with_metrics if p["metrics"]), {})
    step = parse_step(checkpoint)
    if step is None:
        step = next((parts[r]["step"] for r in ranks if parts[r]["step"] is not None), None)
    return {
        "format": 1,
        "kind": KIND,
        "project": project,
        "job_id": job_id,
        "checkpoint": checkpoint,
        "step": step,
        "committed_at": max((parts[r]["committed_at"] for r in ranks), key=datetime.fromisoformat),
        "reason": reason,
        "group_size": group_size,
        "ranks": [
            {
                "rank": r,
                "reason": parts[r]["reason"],
                "committed_at": parts[r]["committed_at"],
                "file_count": parts[r]["file_count"],
                "total_bytes": parts[r]["total_bytes"],
            }
            for r in ranks
        ],
        "total_bytes": sum(f["size"] for f in files),
        "file_count": len(files),
        "files": files,
        "metrics": metrics,
    }


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"bad global manifest: {what}")


def parse_global(data: bytes) -> dict[str, Any]:
    """Parse and validate a stored global manifest; ValueError saying what is wrong with a bad one.

    Each rank's files are checked as that rank's manifest would be (paths inside the checkpoint,
    keys exactly ckptd's, sizes, SHA-256), so a merged restore is as safe as a per-rank one.
    """
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"bad global manifest: not JSON ({exc})") from None
    _check(isinstance(manifest, dict) and manifest.get("kind") == KIND, "not a global manifest")
    group = manifest.get("group_size")
    _check(isinstance(group, int) and not isinstance(group, bool) and group >= 1, "group_size is not a count")
    _check(isinstance(manifest.get("ranks"), list), "ranks is not a list")
    files = manifest.get("files")
    _check(isinstance(files, list), "files is not a list")
    by_rank: dict[int, list[Any]] = {}
    for i, entry in enumerate(files):
        _check(isinstance(entry, dict), f"files[{i}] is not an object")
        rank = entry.get("rank")
        _check(isinstance(rank, int) and not isinstance(rank, bool), f"files[{i}].rank is not an integer")
        _check(0 <= rank < group, f"files[{i}].rank {rank} is outside the group of {group}")
        by_rank.setdefault(rank, []).append({k: v for k, v in entry.items() if k != "rank"})
    for rank, entries in by_rank.items():  # the per-rank checks, on each rank's share
        share = {**manifest, "format": 1, "rank": rank, "files": entries}
        share.update(file_count=len(entries), total_bytes=sum(e.get("size", 0) for e in entries))
        check_manifest(share)
    if not by_rank:  # parse_manifest checked the common fields on the shares; a checkpoint has files
        raise ValueError("bad global manifest: lists no file")
    _check(manifest.get("file_count") == len(files), "file_count does not match files")
    _check(manifest.get("total_bytes") == sum(f["size"] for f in files), "total_bytes does not match files")
    return manifest


async def read_global(storage: Storage, key: str) -> dict[str, Any]:
    """The global manifest at `key`, validated and refused unless it belongs at that key.
    ValueError for a bad one (naming the key), StorageError when the store fails."""
    data = await get_bounded(storage, key)
    try:
        _check(len(data) <= MAX_MANIFEST_BYTES, f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = parse_global(data)
        at = layout.global_key(manifest["project"], manifest["job_id"], manifest["checkpoint"])
        _check(at == key, f"it describes {at!r}")
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return manifest


async def read_globals(storage: Storage, project: str, job_id: str) -> list[dict[str, Any]]:
    """Every readable global manifest of a job, in key order; unreadable ones are logged and skipped."""
    keys = [i.key async for i in storage.list(layout.global_prefix(project, job_id)) if i.key.endswith(".json")]
    limit = asyncio.Semaphore(_READ_CONCURRENCY)
    found = await asyncio.gather(*(read_or_skip(storage, key, limit, read_global) for key in keys))
    return [m for m in found if m is not None]


async def commits_globally(storage: Storage, project: str, job_id: str) -> bool:
    """Whether a job's checkpoints are committed by global manifests (and only by them).

    | job.json            | a global manifest stored | result                                           |
    |---------------------|--------------------------|--------------------------------------------------|
    | global_commit: true | any                      | yes: a multi-node job                            |
    | anything else       | yes                      | yes                                              |
    | anything else       | no                       | no: one node, or an earlier ckptd's nodes' own commits |
    """
    if says_global_commit(await jobmeta.read_job_record(storage, project, job_id)):
        return True
    return await storage.has_any(layout.global_prefix(project, job_id))


def says_global_commit(job: dict[str, Any] | None) -> bool:
    """Whether job.json (as `jobmeta.read_job_record` returns it) marks a multi-node job."""
    return job is not None and job.get("global_commit") is True


async def write_global(storage: Storage, manifest: dict[str, Any]) -> bool:
    """Store the global manifest; True if this call wrote it, False if the store already held
    exactly it (another node finished the commit first). A different one there (computed from
    parts that changed since) is replaced: the caller computed `manifest` from the parts now.

    Read first: on a store that ignores conditional writes, the second node then sees the first
    one's manifest and writes nothing (and a race of the two writes the same bytes twice).
    """
    key = layout.global_key(manifest["project"], manifest["job_id"], manifest["checkpoint"])
    body = json_bytes(manifest)
    there = await _stored(storage, key)
    if there is None:
        if await storage.put_if_absent(key, body):
            return True
        there = await _stored(storage, key)
    if there == body:
        return False
    await storage.put(key, body)
    return True


async def _stored(storage: Storage, key: str) -> bytes | None:
    try:
        return await get_bounded(storage, key)
    except StorageError as exc:
        if exc.missing:
            return None
        raise


def merged(manifest: dict[str, Any], rank: int) -> tuple[dict[str, Any], list[str]]:
    """What node `rank` restores of a global manifest: one folder with every rank's files, in the
    shape of a per-rank manifest, and the paths whose other ranks' versions were left out.

    | a path is held by             | same bytes | restored                      |
    |-------------------------------|------------|-------------------------------|
    | one rank                      | -          | that rank's                   |
    | several ranks                 | yes        | once                          |
    | several ranks, this one among | no         | this node's own: what it wrote |
    | several ranks, not this one   | no         | the lowest rank's             |

    Shards of sharded savers (DCP's `__R_I.distcp`) never share a name, so a checkpoint restores
    whole on any number of nodes; same-named files with other bytes come from savers that wrote a
    full copy per node (each node then gets back its own).
    """
    chosen: dict[str, dict[str, Any]] = {}
    shadowed = set()
    order = sorted(manifest["files"], key=lambda f: (f["rank"] != rank, f["rank"]))
    for entry in order:
        first = chosen.setdefault(entry["path"], entry)
        if first is not entry and (first["size"], first["sha256"]) != (entry["size"], entry["sha256"]):
            shadowed.add(entry["path"])
    files = [{k: v for k, v in f.items() if k != "rank"} for _, f in sorted(chosen.items())]
    view = {**manifest, "files": files, "file_count": len(files), "total_bytes": sum(f["size"] for f in files)}
    return view, sorted(shadowed)
