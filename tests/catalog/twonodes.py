"""A two-node job written straight into a store, as ckptd's nodes leave it (daemon.upload.crossrank):
job.json of group size 2, each rank's shards under `rank-N/`, a part manifest per rank and, for the
checkpoints that committed globally, the global manifest. Used by tests/catalog and tests/commands.

    job = await make_job(store)   # step-10..30 committed globally, step-40 waiting for rank 1
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from daemon.catalog import jobmeta, layout
from daemon.catalog.globalmanifest import PART, build_global, write_global
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.storage import Storage

P, J = "proj", "nodes"
T0 = datetime(2026, 12, 1, 10, tzinfo=UTC)
COMMITTED = ("step-10", "step-20", "step-30")
WAITING = "step-40"  # rank 0 stored its part, rank 1 has not: no global manifest
# The global manifests' eval_loss; the parts say the opposite, so a ranking by the parts is caught.
LOSSES = {"step-10": 0.9, "step-20": 0.5, "step-30": 0.7}


@dataclass
class TwoNodeJob:
    parts: dict[str, dict[int, dict]] = field(default_factory=dict)  # checkpoint -> rank -> part
    wholes: dict[str, dict] = field(default_factory=dict)  # checkpoint -> global manifest


async def save_part(
    store: Storage, rank: int, checkpoint: str, *, at: int, metrics: dict | None = None, job: str = J
) -> dict:
    """One rank's share of `checkpoint` (its shard; rank 0 also DCP's `.metadata`) and its part
    manifest, committed `at` seconds after T0."""
    names = [f"__{rank}_0.distcp", *([".metadata"] if rank == 0 else [])]
    files = []
    for i, name in enumerate(names):
        relpath, data = f"{checkpoint}/{name}", bytes([rank + 1]) * (100 + 10 * rank + i)
        key = layout.file_key(P, job, rank, relpath)
        etag = await store.put(key, data)
        files.append(StoredFile(relpath, len(data), hashlib.sha256(data).hexdigest(), key, etag))
    reason = "marker" if rank == 0 else PART
    manifest = build_manifest(P, job, rank, checkpoint, files, reason, metrics or {}, committed_at=_at(at))
    return await write_manifest(store, manifest)


async def save_root(store: Storage, rank: int, job: str = J) -> dict:
    """The files at the top of a node's checkpoint folder ('.'), committed per rank."""
    data = b'{"vocab": 1}'
    key = layout.file_key(P, job, rank, "tokenizer.json")
    etag = await store.put(key, data)
    stored = [StoredFile("tokenizer.json", len(data), hashlib.sha256(data).hexdigest(), key, etag)]
    return await write_manifest(store, build_manifest(P, job, rank, ".", stored, "final", {}, committed_at=_at(0)))


async def commit_globally(store: Storage, checkpoint: str, parts: dict[int, dict], job: str = J) -> dict:
    whole = build_global(P, job, checkpoint, 2, parts, "shards")
    if checkpoint in LOSSES:
        whole["metrics"] = {"eval_loss": LOSSES[checkpoint]}
    await write_global(store, whole)
    return whole


async def make_job(store: Storage, job: str = J) -> TwoNodeJob:
    """step-10, 20, 30 committed globally (in that order), step-40 stored by rank 0 only."""
    await jobmeta.ensure_job(store, P, job, 2)
    made = TwoNodeJob()
    for rank in (0, 1):
        await save_root(store, rank, job)
    for i, name in enumerate(COMMITTED):
        metrics = {"eval_loss": 1.0 - LOSSES[name]}
        parts = {r: await save_part(store, r, name, at=10 * i + r, metrics=metrics, job=job) for r in (0, 1)}
        made.parts[name] = parts
        made.wholes[name] = await commit_globally(store, name, parts, job)
    made.parts[WAITING] = {0: await save_part(store, 0, WAITING, at=100, metrics={"eval_loss": 0.1}, job=job)}
    return made


def _at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def keys(store: Storage, under: str = "", job: str = J) -> list[str]:
    return [info.key async for info in store.list(layout.job_prefix(P, job) + under)]


async def lies(store: Storage, job: str = J) -> list[str]:
    """The files that a stored global manifest lists but the store no longer holds (must be none)."""
    from daemon.catalog.globalmanifest import read_globals

    return [
        f["key"] for m in await read_globals(store, P, job) for f in m["files"] if await store.head(f["key"]) is None
    ]
