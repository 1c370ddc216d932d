"""Restore: put the referenced committed checkpoints into the restore folder before training (SPEC §5).

Every reference is resolved before a byte is downloaded, so a required reference that matches
nothing fails fast (resolve.py); then the files are planned (plan.py), each checkpoint folder is
checked for links (safefs.py), downloaded into a staging folder (download.py) and put in place
once all of it is verified (stage.py).

What fails, and what then happens (`required` is the reference's; a folder shared by two
references is required if either is):

| failure                                                  | required | optional                      |
|----------------------------------------------------------|----------|-------------------------------|
| matches no committed checkpoint (best: no candidate records its metric) | exit 3 | warning, from scratch |
| a manifest it needs is unusable (resolve.py)             | exit 3   | warning, from scratch         |
| a link or special file where its files or folders go     | exit 3   | error logged, not restored    |
| an object missing, or not the size or bytes listed       | exit 3   | exit 3: the store lies        |
| a file that would land outside its folder                | exit 3   | exit 3                        |
| two references on one folder, or one root file with other bytes | exit 2 | exit 2               |
| too little free space for what must be downloaded        | exit 3   | exit 3                        |
| a link at the top of the restore folder cannot be made (links.py) | exit 3 | exit 3              |

After any failure or a kill, no folder holds a completion marker while missing a file: folders
already put in place are complete, the others were never made visible.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from daemon import metrics
from daemon.catalog.jsonio import json_bytes, utc_now
from daemon.config.refs import CheckpointRef
from daemon.config.schema import DEFAULT_MARKERS
from daemon.files import write_atomic
from daemon.restore import links, safefs, stage
from daemon.restore.download import Downloader, RestoreFailed, Tally, all_or_cancel, in_thread
from daemon.restore.plan import Conflict, Unit, UnsafeManifest, plan
from daemon.restore.resolve import AmbiguousJob, BadManifest, Resolved, Unmatched, resolve
from daemon.restore.stage import STAGING_PREFIX, Inspection, Staging
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

__all__ = ["STAGING_PREFIX", "SUMMARY", "RestoreConflict", "RestoreFailed", "RestoreReport", "restore"]

MiB = 1 << 20
SUMMARY = links.SUMMARY
RETRY_WINDOW = 300.0  # seconds a request is retried on transient errors
log = structlog.get_logger()


class RestoreConflict(RestoreFailed):
    """Two references would land on the same folder: a configuration error (exit 2)."""


@dataclass
class RestoreReport(Tally):
    restored: list[dict[str, Any]]
    missing: list[str]
    refused: list[str] = field(default_factory=list)  # optional references whose folder was in the way
    links: list[str] = field(default_factory=list)  # names linked at the top of the restore folder (links.py)


async def _resolve_all(
    storage: Storage, refs: Sequence[CheckpointRef], default_project: str, rank: int, retry_window: float
) -> tuple[list[Resolved], list[str]]:
    """What every reference names, and the optional ones that name nothing; RestoreFailed if a required one does."""

    async def one(ref: CheckpointRef) -> tuple[Resolved | None, str]:
        try:
            found = await retrying(
                functools.partial(resolve, storage, ref, default_project=default_project, rank=rank),
                deadline=Deadline.after(retry_window),
                context={"ref": ref.describe()},
                counter=None,
            )
            return found, ""
        except Unmatched as exc:  # e.g. a metric no checkpoint records: the reason is the message
            return None, str(exc)
        except AmbiguousJob as exc:
            raise RestoreFailed(str(exc)) from None
        except StorageError as exc:
            raise RestoreFailed(f"cannot resolve {ref.describe()}: {exc}") from exc
        except BadManifest as exc:
            if ref.required:
                raise RestoreFailed(f"required {exc}") from None
            log.warning("checkpoint reference names an unusable manifest; starting from scratch", error=str(exc))
            return None, ""

    resolved, missing = [], []
    for ref, (found, why) in zip(refs, await all_or_cancel(one(ref) for ref in refs), strict=True):
        if found is not None:
            resolved.append(found)
        elif ref.required:
            raise RestoreFailed(f"required {why or f'{ref.describe()} matches no committed checkpoint'}")
        else:
            reason = {"why": why} if why else {}
            log.warning("checkpoint reference matches nothing; starting from scratch", ref=ref.describe(), **reason)
            missing.append(ref.describe())
    return resolved, missing


def _open_rank_folder(restore_dir: str, rank: int) -> tuple[int, str]:
    """The rank folder's descriptor and path, made if missing; Refused if it is a link. The restore
    folder itself is the user's choice (it may well be a link to a volume) and is followed."""
    restore_dir = os.path.abspath(restore_dir)
    os.makedirs(restore_dir, exist_ok=True)
    root = os.open(restore_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        path = os.path.join(restore_dir, f"rank-{rank}")
        fd = safefs.open_dir(root, f"rank-{rank}", path, create=True)
        assert fd is not None
        os.fsync(root)
        return fd, path
    finally:
        os.close(root)


def _refuse(units: Sequence[Unit], exc: safefs.Refused, refused: list[str]) -> None:
    """RestoreFailed if a required reference needs one of `units`; else log and record the refusal."""
    if any(u.required for u in units):
        raise RestoreFailed(f"cannot restore into {exc.path}: {exc}") from None
    for unit in units:
        log.error("checkpoint not restored: its folder is in the way", refs=unit.refs, error=str(exc))
        refused += unit.refs


def _finish(restore_dir: str, rank: int, report: RestoreReport, names: Sequence[str]) -> None:
    """Link what was restored at the top of the restore folder, then write the summary."""
    # The rank folder exists even when nothing was restored: get_last_checkpoint() lists it, and
    # a missing folder would crash the trainer instead of letting it start from scratch.
    rank_folder = os.path.join(restore_dir, f"rank-{rank}")
    if not os.path.lexists(rank_folder):  # a link there was refused and is left alone
        os.makedirs(rank_folder, exist_ok=True)
    try:
        made = links.update(restore_dir, rank, names)
    except OSError as exc:
        # The trainer's get_last_checkpoint(BT_LOAD_CHECKPOINT_DIR) would silently start from scratch.
        raise RestoreFailed(f"cannot link the restored checkpoints at the top of {restore_dir}: {exc}") from exc
    report.links = made.linked
    write_atomic(os.path.join(restore_dir, SUMMARY), json_bytes({**asdict(report), "finished_at": utc_now()}))


class _Placer:
    """Puts units in place in one rank folder: inspect, stage, download, move."""

    def __init__(self, rank_fd: int, rank_path: str, loader: Downloader, markers: Sequence[str]) -> None:
        self.rank_fd, self.rank_path, self.loader, self.markers = rank_fd, rank_path, loader, tuple(markers)

    async def inspect(self, units: Sequence[Unit], refused: list[str]) -> list[tuple[Unit, Inspection]]:
        """What each unit's folder holds; units whose folder is in the way are refused (see `_refuse`)."""

        async def one(unit: Unit) -> tuple[Unit, Inspection] | None:
            try:
                return unit, await in_thread(stage.inspect, self.rank_fd, unit, self.markers)
            except safefs.Refused as exc:
                _refuse([unit], exc, refused)
                return None

        return [found for found in await all_or_cancel(one(u) for u in units) if found is not None]

    def check_space(self, work: Sequence[tuple[Unit, Inspection]]) -> None:
        need = sum(i.size for unit, seen in work for i in unit.items if i.relpath not in seen.kept)
        st = os.statvfs(self.rank_fd)
        free = st.f_bavail * st.f_frsize
        if need > free:  # fail before a byte is written, not after filling the disk
            raise RestoreFailed(f"not enough space in {self.rank_path}: the checkpoints need {need} bytes, {free} free")

    async def put(self, unit: Unit, seen: Inspection) -> None:
        todo = [i for i in unit.items if i.relpath not in seen.kept]
        for item in unit.items:
            if item.relpath in seen.kept:
                self.loader.keep(item)
        if seen.exists and not todo:
            return  # already the checkpoint, byte for byte
        try:
            staging = Staging(self.rank_fd, self.rank_path, unit, self.markers)
        except OSError as exc:
            raise RestoreFailed(f"cannot stage {unit.folder}: {exc}") from exc
        try:
            await self.loader.run(todo, staging)
            steps = stage.moves(seen.exists, [i.relpath for i in todo], staging.markers, seen.kept, seen.present)
            await in_thread(_apply, staging, steps)
        except safefs.Refused as exc:
            raise RestoreFailed(f"cannot put {unit.folder} in place: {exc}") from None
        except OSError as exc:
            raise RestoreFailed(f"cannot put {unit.folder} in place: {exc}") from exc
        finally:
            try:
                staging.remove()  # synchronous: it must happen even while the task is being cancelled
            except OSError as exc:  # the next restore removes it; the outcome is decided already
                log.warning("cannot remove a staging folder", folder=staging.path, error=str(exc))


def _apply(staging: Staging, steps: Sequence[stage.Move]) -> None:
    for step in steps:
        staging.apply(step)


async def _put_all(
    units: Sequence[Unit], restore_dir: str, rank: int, loader: Downloader, markers: Sequence[str], refused: list[str]
) -> None:
    try:
        rank_fd, rank_path = await asyncio.to_thread(_open_rank_folder, restore_dir, rank)
    except safefs.Refused as exc:
        return _refuse(units, exc, refused)
    except OSError as exc:
        raise RestoreFailed(f"cannot open the restore folder {restore_dir}: {exc}") from exc
    try:
        placer = _Placer(rank_fd, rank_path, loader, markers)
        try:
            for name in await asyncio.to_thread(stage.remove_stale, rank_fd, rank_path):
                log.info("removed the staging folder of an interrupted restore", folder=os.path.join(rank_path, name))
            work = await placer.inspect(units, refused)
        except OSError as exc:
            raise RestoreFailed(f"cannot read the restore folder {rank_path}: {exc}") from exc
        loader.total = sum(i.size for unit, _ in work for i in unit.items)  # refused ones are not restored
        placer.check_space(work)
        await all_or_cancel(placer.put(unit, seen) for unit, seen in work)
    finally:
        os.close(rank_fd)
    return None


async def restore(
    storage: Storage,
    *,
    refs: Sequence[CheckpointRef],
    restore_dir: str,
    rank: int,
    default_project: str,
    concurrency: int = 8,
    chunk_size: int = 16 * MiB,
    progress: Callable[[int, int], None] | None = None,
    retry_window: float = RETRY_WINDOW,
    markers: Sequence[str] = DEFAULT_MARKERS,
) -> RestoreReport:
    """Restore every reference into `{restore_dir}/rank-{rank}/`; RestoreFailed (or RestoreConflict) if not.

    `progress(done_bytes, total_bytes)` is called on the event loop as bytes land; `done_bytes`
    goes back when a corrupt download is fetched again. `markers`: the completion-marker globs
    (upload.markers), put in place last.
    """
    started = time.monotonic()
    resolved, missing = await _resolve_all(storage, refs, default_project, rank, retry_window)
    try:
        units, restored = plan(resolved, restore_dir, rank)
    except Conflict as exc:
        raise RestoreConflict(str(exc)) from None
    except UnsafeManifest as exc:
        raise RestoreFailed(str(exc)) from None
    refused: list[str] = []
    items = [item for unit in units for item in unit.items]
    loader = Downloader(storage, concurrency, chunk_size, sum(i.size for i in items), progress, retry_window)
    if units:
        await _put_all(units, restore_dir, rank, loader, markers, refused)
    restored = [r for r in restored if r["ref"] not in refused]
    done = [item for unit in units if not set(unit.refs) & set(refused) for item in unit.items]
    report = RestoreReport(
        len(done),
        sum(i.size for i in done),
        loader.downloaded_files,
        loader.downloaded_bytes,
        loader.kept_files,
        round(time.monotonic() - started, 3),
        restored,
        missing,
        refused,
    )
    try:
        await asyncio.to_thread(_finish, restore_dir, rank, report, links.names_of(units, refused))
    except OSError as exc:
        raise RestoreFailed(f"cannot write {SUMMARY} in {restore_dir}: {exc}") from exc
    metrics.RESTORE_DURATION.set(report.seconds)
    log.info(
        "restore finished",
        restore_dir=restore_dir,
        files=report.files,
        bytes=report.bytes,
        downloaded_files=report.downloaded_files,
        downloaded_bytes=report.downloaded_bytes,
        kept_files=report.kept_files,
        missing=len(missing),
        refused=len(refused),
        seconds=report.seconds,
    )
    return report
