"""Start-up recovery: pick up where a crashed or earlier run of this rank left off.

- pins left in staging are handed back to be uploaded (they may be the only copy of a rotated file),
  unless the journal says that very version is stored;
- incomplete multipart uploads of this rank that the journal cannot resume are aborted;
- a new pod of the same job (no journal) reconciles with the manifests already in the store
  instead of uploading everything again; so does a pod whose journal was corrupt and set aside
  (`Journal.open`), adopting only those pins of it whose staging link is still that very file;
- files the journal says are stored, of checkpoints no manifest covers, are looked for in the
  store: those it lost (not pruned) are journaled `unstored`, so the start-up scan uploads them
  again before their checkpoint commits (`_check_stored`).

Nothing here follows a link or opens what is not a regular file: staging entries that are links,
FIFOs or folders are not adopted, and a manifest's path is compared only where it lies inside the
checkpoint folder.

`recover` takes its collaborators and returns what it found; the engine decides what to do with it.
"""

from __future__ import annotations

import asyncio
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.catalog import layout
from daemon.catalog.manifest import read_manifests
from daemon.files import sha256_of
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying
from daemon.upload import journal as jr
from daemon.upload import reconcile
from daemon.upload.complete import Identity
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Pin, Staging
from daemon.upload.scan import open_file
from daemon.upload.statedir import describe, ensure_dir, is_state, kind

CHECK_RETRY = 10.0  # seconds transient store errors are retried while looking for stored files at start
log = structlog.get_logger()


@dataclass
class Recovered:
    pins: list[Pin] = field(default_factory=list)  # adopted from staging: upload them
    committed: list[str] = field(default_factory=list)  # checkpoints a stored manifest covers as they are
    reconciled: int = 0  # local files a stored manifest already held byte for byte
    set_aside: str | None = None  # where a corrupt journal went: this start recovered as a new pod
    listed: dict[str, set[str]] = field(default_factory=dict)  # checkpoint -> files its stored manifest names
    unstored: list[str] = field(default_factory=list)  # files the store lost: uploaded again


@dataclass(frozen=True)
class Rank:
    """Whose uploads these are: the store's files and manifests of one rank of one job."""

    project: str
    job_id: str
    rank: int


async def recover(
    *, root: str, journal: jr.Journal, staging: Staging, storage: Storage, health: StoreHealth, rank: Rank
) -> Recovered:
    found = Recovered(pins=_adopt_pins(journal, staging), set_aside=journal.set_aside)
    found.pins = _not_stored(journal, found.pins, rank)
    try:
        await _clean_multipart(root, journal, storage, rank, {p.relpath for p in found.pins})
        manifests = await read_manifests(storage, rank.project, rank.job_id, rank.rank)
        health.observe(None)
    except StorageError as e:
        # Not fatal: the trainer must not wait on the store. Uploads will retry or report.
        health.observe(e)
        health.failed(e)
        log.error("storage not usable at start", storage=storage.url, code=e.code, error=e.message)
        manifests = None
    if not journal.state.stored and manifests:
        found.reconciled = await asyncio.to_thread(_reconcile, root, journal, manifests)
    found.committed = _already_committed(journal.state.stored, manifests or [])
    found.listed = {m["checkpoint"]: {f["path"] for f in m["files"]} for m in manifests or []}
    if manifests is not None:  # else the store is not usable: the publisher checks before committing
        found.unstored = await _check_stored(root, journal, storage, health, rank, set(found.committed))
    return found


def _adopt_pins(journal: jr.Journal, staging: Staging) -> list[Pin]:
    try:
        ensure_dir(staging.folder)  # a link there would have us adopt, and delete, files elsewhere
        names = set(staging.names())
    except OSError as e:
        log.error("staging folder not usable: no pin adopted", folder=staging.folder, error=describe(e))
        names = set()
    pins = []
    for stage, pinned in list(journal.state.pinned.items()):
        pin = _adopt(staging, pinned) if stage in names else None
        if pin is None:
            journal.record("unpinned", stage=stage)
        else:
            pins.append(pin)
    for stage, pinned in journal.salvaged.items():  # a corrupt journal's: only the very same file
        pin = _adopt(staging, pinned) if stage in names and stage not in journal.state.pinned else None
        if pin is not None and _same_file(pin.identity, pinned.identity):
            journal.record("pinned", jr.Pinned(pinned.relpath, pin.identity, stage))
            pins.append(pin)
        elif pin is not None:
            pin.release()
    for name in names:
        if name not in journal.state.pinned:  # linked, then crashed before the journal line was written
            _remove_stray(staging.path(name))
    return pins


def _not_stored(journal: jr.Journal, pins: list[Pin], rank: Rank) -> list[Pin]:
    """The pins whose very version the journal does not say is stored; the others are released,
    as intake releases a version it finds stored: uploading it again could undo a prune."""
    out = []
    for pin in pins:
        known = journal.state.stored.get(pin.relpath)
        key = layout.file_key(rank.project, rank.job_id, rank.rank, pin.relpath)
        if known is not None and known.identity == pin.identity and known.key == key:
            jr.release(journal, pin)
        else:
            out.append(pin)
    return out


def _adopt(staging: Staging, pinned: jr.Pinned) -> Pin | None:
    """The staging link as a Pin; None (logged) unless it is a regular file (never followed)."""
    try:
        pin = staging.adopt(pinned.relpath, pinned.stage)  # lstat: links, FIFOs, folders are None
        what = "" if pin is not None else kind(os.lstat(staging.path(pinned.stage)).st_mode)
    except OSError as e:
        pin, what = None, describe(e)
    if pin is None:
        log.warning("pinned file not adopted", path=pinned.relpath, stage=pinned.stage, found=what)
    return pin


def _same_file(now: Identity, then: Identity) -> bool:
    # Not the device number: it may change when the volume is mounted again in a new pod.
    return (now.ino, now.size, now.mtime_ns) == (then.ino, then.size, then.mtime_ns)


def _remove_stray(path: str) -> None:
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            log.warning("staging holds a folder: left alone", path=path)
            return
        os.unlink(path)  # a link itself, never its target
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("staging entry not removed", path=path, error=describe(e))


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
            try:
                identity = _holds(root, f)
            except (OSError, ValueError) as e:  # unreadable, or a path no folder may hold: upload it
                log.warning("local file not compared with its manifest", path=f["path"], error=str(e))
                continue
            if identity is not None:
                journal.record("stored", jr.Stored(f["path"], identity, f["sha256"], f["key"], f["etag"]))
                adopted += 1
    if adopted:
        log.info("reconciled with stored manifests", files=adopted)
    return adopted


def _holds(root: str, f: dict[str, Any]) -> Identity | None:
    """The local file's identity if it is, byte for byte, what the manifest entry `f` lists."""
    relpath = f["path"]
    layout.local_path(root, relpath)  # UnsafePath: absolute, '..'
    if is_state(relpath):
        return None
    opened = open_file(root, relpath)  # no link below root is followed, nothing but a file opened
    if not isinstance(opened, tuple):
        return None
    fd, st = opened
    try:
        if st.st_size != f["size"] or sha256_of(fd) != f["sha256"]:
            return None
        return Identity.of(st)
    finally:
        os.close(fd)


async def _check_stored(
    root: str, journal: jr.Journal, storage: Storage, health: StoreHealth, rank: Rank, committed: set[str]
) -> list[str]:
    """Journal `unstored` the files the store lost of checkpoints no manifest covers, so that the
    start-up scan uploads them again; the relpaths. Only files still here unchanged are looked
    for (others are uploaded again anyway, or cannot be). Left as they are: the files of a
    checkpoint a prune deleted as it is here (its tombstone lists exactly its stored files, all
    unchanged): uploading them again would undo the prune, and the publisher forgets it. A store
    that fails here is logged; the publisher still checks before it commits anything."""
    candidates: dict[str, list[jr.Stored]] = {}
    for s in journal.state.stored.values():
        checkpoint = layout.checkpoint_of(s.relpath)
        if checkpoint not in committed and s.key == layout.file_key(rank.project, rank.job_id, rank.rank, s.relpath):
            candidates.setdefault(checkpoint, []).append(s)
    deadline = Deadline.after(CHECK_RETRY)
    try:
        here = await asyncio.to_thread(_unchanged, root, candidates)
        unchanged = [cp for cp, stored in here.items() if stored == candidates[cp]]
        tombstones = await _tombstones(storage, rank, unchanged, deadline)
        wanted = [
            f.file()
            for cp, stored in here.items()
            if not reconcile.same_files(tombstones.get(cp), [c.file() for c in candidates[cp]])
            for f in stored
        ]
        missing = await reconcile.absent(storage, wanted, deadline=deadline, observe=health.observe)
    except StorageError as e:
        log.error("stored files not checked at start", op=e.op, key=e.key, code=e.code, error=e.message)
        return []
    for f in missing:
        journal.record("unstored", relpath=f.relpath)
    if missing:
        log.warning(
            "the store lost stored files: uploading them again",
            keys=[f.key for f in missing][:20],
            count=len(missing),
            checkpoints=sorted({f.checkpoint for f in missing})[:20],
        )
    return [f.relpath for f in missing]


def _unchanged(root: str, candidates: dict[str, list[jr.Stored]]) -> dict[str, list[jr.Stored]]:
    """Per checkpoint, its stored files still here as they were stored (blocking: a stat each)."""
    out: dict[str, list[jr.Stored]] = {}
    for checkpoint, stored in candidates.items():
        same = [s for s in stored if Identity.stat(os.path.join(root, s.relpath)) == s.identity]
        if same:
            out[checkpoint] = same
    return out


async def _tombstones(
    storage: Storage, rank: Rank, checkpoints: list[str], deadline: Deadline
) -> dict[str, reconcile.Tombstone]:
    """The readable tombstones of these checkpoints, `reconcile.HEADS` reads at a time."""
    limit = asyncio.Semaphore(reconcile.HEADS)
    named = [cp for cp in checkpoints if cp != layout.ROOT_CHECKPOINT]  # never pruned

    async def one(checkpoint: str) -> reconcile.Tombstone | None:
        async with limit:
            return await retrying(
                lambda: reconcile.read_tombstone(storage, rank.project, rank.job_id, rank.rank, checkpoint),
                deadline=deadline,
            )

    found = await asyncio.gather(*(one(cp) for cp in named), return_exceptions=True)
    for result in found:
        if isinstance(result, BaseException):
            raise result
    return {cp: t for cp, t in zip(named, found, strict=True) if t is not None}  # type: ignore[misc]


def _already_committed(stored: dict[str, jr.Stored], manifests: list[dict[str, Any]]) -> list[str]:
    """Checkpoints whose stored manifest lists exactly the versions the journal says are stored."""
    committed = []
    for manifest in manifests:
        listed = {f["path"]: f["sha256"] for f in manifest["files"]}
        mine = {r: s.sha256 for r, s in stored.items() if layout.checkpoint_of(r) == manifest["checkpoint"]}
        if mine and all(listed.get(r) == sha for r, sha in mine.items()):
            committed.append(manifest["checkpoint"])
    return committed
