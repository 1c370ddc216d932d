"""Restore: put the referenced committed checkpoints into the restore folder before training (SPEC §5).

Every reference is resolved before a byte is downloaded, so a required reference that matches
nothing fails fast (resolve.py); then the files are planned (plan.py) and downloaded (download.py).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from daemon import metrics
from daemon.catalog.jsonio import json_bytes, utc_now
from daemon.config.refs import CheckpointRef
from daemon.files import fsync_dir, write_atomic
from daemon.restore.download import PART_SUFFIX, Downloader, RestoreFailed, all_or_cancel
from daemon.restore.plan import Conflict, Item, UnsafeManifest, plan
from daemon.restore.resolve import AmbiguousJob, Resolved, resolve
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

__all__ = ["PART_SUFFIX", "SUMMARY", "RestoreConflict", "RestoreFailed", "RestoreReport", "restore"]

MiB = 1 << 20
SUMMARY = "ckptd-restore.json"
RETRY_WINDOW = 300.0  # seconds a request is retried on transient errors
log = structlog.get_logger()


class RestoreConflict(RestoreFailed):
    """Two references would land on the same folder: a configuration error (exit 2)."""


@dataclass
class RestoreReport:
    files: int
    bytes: int
    downloaded_files: int
    downloaded_bytes: int
    kept_files: int
    seconds: float
    restored: list[dict[str, Any]]
    missing: list[str]


async def _resolve_all(
    storage: Storage, refs: Sequence[CheckpointRef], default_project: str, rank: int, retry_window: float
) -> tuple[list[Resolved], list[str]]:
    """What every reference names, and the optional ones that name nothing; RestoreFailed if a required one does."""

    async def one(ref: CheckpointRef) -> Resolved | None:
        try:
            return await retrying(
                functools.partial(resolve, storage, ref, default_project=default_project, rank=rank),
                deadline=Deadline.after(retry_window),
                context={"ref": ref.describe()},
                counter=None,
            )
        except AmbiguousJob as exc:
            raise RestoreFailed(str(exc)) from None
        except StorageError as exc:
            raise RestoreFailed(f"cannot resolve {ref.describe()}: {exc}") from exc

    resolved, missing = [], []
    for ref, found in zip(refs, await all_or_cancel(one(ref) for ref in refs), strict=True):
        if found is not None:
            resolved.append(found)
        elif ref.required:
            raise RestoreFailed(f"required {ref.describe()} matches no committed checkpoint")
        else:
            log.warning("checkpoint reference matches nothing; starting from scratch", ref=ref.describe())
            missing.append(ref.describe())
    return resolved, missing


def _fsync_dirs(items: Iterable[Item], restore_dir: str) -> None:
    # Renames and new folders are durable only once their parent folders are synced.
    root = os.path.abspath(restore_dir)
    dirs: set[str] = set()
    for item in items:
        d = os.path.dirname(item.target)
        while (d == root or d.startswith(root + os.sep)) and d not in dirs:
            dirs.add(d)
            d = os.path.dirname(d)
    for d in sorted(dirs, reverse=True):
        fsync_dir(d)


def _write_summary(restore_dir: str, rank: int, summary: dict[str, Any]) -> None:
    # The rank folder exists even when nothing was restored: get_last_checkpoint() lists it, and
    # a missing folder would crash the trainer instead of letting it start from scratch.
    os.makedirs(os.path.join(restore_dir, f"rank-{rank}"), exist_ok=True)
    write_atomic(os.path.join(restore_dir, SUMMARY), json_bytes(summary))


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
) -> RestoreReport:
    """Restore every reference into `{restore_dir}/rank-{rank}/`; RestoreFailed (or RestoreConflict) if not.

    `progress(done_bytes, total_bytes)` is called on the event loop as bytes land; `done_bytes`
    goes back when a corrupt download is fetched again.
    """
    started = time.monotonic()
    resolved, missing = await _resolve_all(storage, refs, default_project, rank, retry_window)
    try:
        items, restored = plan(resolved, restore_dir, rank)
    except Conflict as exc:
        raise RestoreConflict(str(exc)) from None
    except UnsafeManifest as exc:
        raise RestoreFailed(str(exc)) from None
    total = sum(item.size for item in items)
    loader = Downloader(storage, concurrency, chunk_size, total, progress, retry_window)
    await loader.run(items)
    await asyncio.to_thread(_fsync_dirs, items, restore_dir)
    report = RestoreReport(
        len(items),
        total,
        loader.downloaded_files,
        loader.downloaded_bytes,
        loader.kept_files,
        round(time.monotonic() - started, 3),
        restored,
        missing,
    )
    await asyncio.to_thread(_write_summary, restore_dir, rank, {**asdict(report), "finished_at": utc_now()})
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
        seconds=report.seconds,
    )
    return report
