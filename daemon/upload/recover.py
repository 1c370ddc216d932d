"""Start-up recovery: pick up where a crashed or earlier run of this rank left off.

- pins left in staging are handed back to be uploaded (they may be the only copy of a rotated file);
- incomplete multipart uploads of this rank that the journal cannot resume are aborted;
- a new pod of the same job (no journal) reconciles with the manifests already in the store
  instead of uploading everything again.

`recover` takes its collaborators and returns what it found; the engine decides what to do with it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.catalog import layout
from daemon.catalog.manifest import read_manifests
from daemon.files import sha256_path
from daemon.storage import Storage, StorageError
from daemon.upload import journal as jr
from daemon.upload.complete import Identity
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Pin, Staging

log = structlog.get_logger()


@dataclass
class Recovered:
    pins: list[Pin] = field(default_factory=list)  # adopted from staging: upload them
    committed: list[str] = field(default_factory=list)  # checkpoints a stored manifest covers as they are
    reconciled: int = 0  # local files a stored manifest already held byte for byte


@dataclass(frozen=True)
class Rank:
    """Whose uploads these are: the store's files and manifests of one rank of one job."""

    project: str
    job_id: str
    rank: int


async def recover(
    *, root: str, journal: jr.Journal, staging: Staging, storage: Storage, health: StoreHealth, rank: Rank
) -> Recovered:
    found = Recovered(pins=_adopt_pins(journal, staging))
    try:
        await _clean_multipart(root, journal, storage, rank, {p.relpath for p in found.pins})
        manifests = await read_manifests(storage, rank.project, rank.job_id, rank.rank)
        health.observe(None)
    except StorageError as e:
        # Not fatal: the trainer must not wait on the store. Uploads will retry or report.
        health.observe(e)
        health.failed(e)
        log.error("storage not usable at start", storage=storage.url, code=e.code, error=e.message)
        manifests = []
    if not journal.state.stored and manifests:
        found.reconciled = await asyncio.to_thread(_reconcile, root, journal, manifests)
    found.committed = _already_committed(journal.state.stored, manifests)
    return found


def _adopt_pins(journal: jr.Journal, staging: Staging) -> list[Pin]:
    pins = []
    for stage, pinned in list(journal.state.pinned.items()):
        pin = staging.adopt(pinned.relpath, stage)
        if pin is None:
            journal.record("unpinned", stage=stage)
        else:
            pins.append(pin)
    for name in staging.names():
        if name not in journal.state.pinned:  # linked, then crashed before the journal line was written
            os.unlink(staging.path(name))
    return pins


async def _clean_multipart(root: str, journal: jr.Journal, storage: Storage, rank: Rank, adopted: set[str]) -> None:
    mine = journal.state.multipart
    resumable = {m.upload_id for m in mine.values()}
    for upload in await storage.list_multipart_uploads(layout.rank_prefix(rank.project, rank.job_id, rank.rank)):
        if upload.upload_id not in resumable:
            await storage.abort_multipart(upload.key, upload.upload_id)
            log.info("stale multipart upload aborted", key=upload.key)
    for relpath, m in list(mine.items()):
        gone = not os.path.exists(os.path.join(root, relpath))  # noqa: ASYNC240 - a few stats at start
        if gone and relpath not in adopted:
            await storage.abort_multipart(m.key, m.upload_id)
            journal.record("multipart_done", relpath=relpath)


def _reconcile(root: str, journal: jr.Journal, manifests: list[dict[str, Any]]) -> int:
    """Record as stored every local file a committed manifest already holds, byte for byte."""
    adopted = 0
    for manifest in manifests:
        for f in manifest["files"]:
            path = os.path.join(root, f["path"])
            identity = Identity.stat(path)
            if identity is None or identity.size != f["size"] or sha256_path(path) != f["sha256"]:
                continue
            journal.record("stored", jr.Stored(f["path"], identity, f["sha256"], f["key"], f["etag"]))
            adopted += 1
    if adopted:
        log.info("reconciled with stored manifests", files=adopted)
    return adopted


def _already_committed(stored: dict[str, jr.Stored], manifests: list[dict[str, Any]]) -> list[str]:
    """Checkpoints whose stored manifest lists exactly the versions the journal says are stored."""
    committed = []
    for manifest in manifests:
        listed = {f["path"]: f["sha256"] for f in manifest["files"]}
        mine = {r: s.sha256 for r, s in stored.items() if layout.checkpoint_of(r) == manifest["checkpoint"]}
        if mine and all(listed.get(r) == sha for r, sha in mine.items()):
            committed.append(manifest["checkpoint"])
    return committed
