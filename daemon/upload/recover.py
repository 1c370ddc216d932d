"""Start-up recovery: pick up where a crashed or earlier run of this rank left off.

- pins left in staging are uploaded (they may be the only copy of a rotated file);
- incomplete multipart uploads of this rank that the journal cannot resume are aborted;
- a new pod of the same job (no journal) reconciles with the manifests already in the store
  instead of uploading everything again.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import TYPE_CHECKING

import structlog

from daemon.catalog import layout
from daemon.upload import journal as jr
from daemon.upload.commit import StoredFile
from daemon.upload.complete import Identity
from daemon.catalog.manifest import read_manifests
from daemon.upload.pin import adopt
from daemon.upload.queue import Job
from daemon.storage import StorageError

if TYPE_CHECKING:
    from daemon.upload.engine import Engine

log = structlog.get_logger()


async def recover(engine: Engine) -> None:
    _adopt_pins(engine)
    try:
        await _clean_multipart(engine)
        manifests = await read_manifests(engine.storage, engine.c.project, engine.c.job_id, engine.c.node_rank)
        engine.observe(None)
    except StorageError as e:
        # Not fatal: the trainer must not wait on the store. Uploads will retry or report.
        engine.observe(e)
        engine.permanent_error = None if e.transient else e
        log.error("storage not usable at start", storage=engine.storage.url, code=e.code, error=e.message)
        manifests = []
    if not engine.journal.state.stored and manifests:
        await asyncio.to_thread(_reconcile, engine, manifests)
    _load_commits(engine, manifests)


def _adopt_pins(engine: Engine) -> None:
    state = engine.journal.state
    for stage, pinned in list(state.pinned.items()):
        pin = adopt(pinned.relpath, stage, engine.staging)
        if pin is None:
            engine.journal.record("unpinned", stage=stage)
            continue
        engine.tracker.noticed(pin.relpath, time.monotonic())
        engine.queue.put(Job(pin, engine.key(pin.relpath)))
    for name in os.listdir(engine.staging):
        if name not in state.pinned:  # linked, then crashed before the journal line was written
            os.unlink(os.path.join(engine.staging, name))


async def _clean_multipart(engine: Engine) -> None:
    c = engine.c
    mine = engine.journal.state.multipart
    resumable = {m.upload_id for m in mine.values()}
    prefix = layout.rank_prefix(c.project, c.job_id, c.node_rank)
    for upload in await engine.storage.list_multipart_uploads(prefix):
        if upload.upload_id not in resumable:
            await engine.storage.abort_multipart(upload.key, upload.upload_id)
            log.info("stale multipart upload aborted", key=upload.key)
    for relpath, m in list(mine.items()):
        if not os.path.exists(os.path.join(engine.root, relpath)) and not engine.queue.queued(relpath):
            await engine.storage.abort_multipart(m.key, m.upload_id)
            engine.journal.record("multipart_done", relpath=relpath)


def _reconcile(engine: Engine, manifests: list[dict]) -> None:
    """Record as stored every local file a committed manifest already holds, byte for byte."""
    adopted = 0
    for manifest in manifests:
        for f in manifest["files"]:
            path = os.path.join(engine.root, f["path"])
            identity = Identity.stat(path)
            if identity is None or identity.size != f["size"] or _sha256(path) != f["sha256"]:
                continue
            engine.journal.record("stored", jr.Stored(f["path"], identity, f["sha256"], f["key"], f["etag"]))
            adopted += 1
    if adopted:
        log.info("reconciled with stored manifests", files=adopted)


def _load_commits(engine: Engine, manifests: list[dict]) -> None:
    """Tell the tracker what is stored and which checkpoints are already committed as they are."""
    now = time.monotonic()
    for s in engine.journal.state.stored.values():
        engine.tracker.stored(StoredFile(s.relpath, s.identity.size, s.sha256, s.key, s.etag), now)
    stored = engine.journal.state.stored
    for manifest in manifests:
        listed = {f["path"]: f["sha256"] for f in manifest["files"]}
        mine = {r: s.sha256 for r, s in stored.items() if layout.checkpoint_of(r) == manifest["checkpoint"]}
        if mine and all(listed.get(r) == sha for r, sha in mine.items()):
            engine.tracker.already_committed(manifest["checkpoint"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()
