"""Fetching selected stored files for serving (`ckptd download`, SPEC §7): in parallel, verified,
each put in place atomically at `{folder}/{job_id}/rank-{N}/{relpath}`.

Unlike restore (restorer.py) there is no checkpoint folder to stage: a serving pod asks for files,
and each file appears whole or not at all. A file is written under a temporary name in its own
folder, verified, fsynced and renamed over its name; the folder is then fsynced.

- Verification: a file of a committed checkpoint against its manifest's size and SHA-256 (a
  mismatch is downloaded again, ATTEMPTS times in all, as restore does); a file of an uncommitted
  checkpoint (no manifest) against the size the store lists only. `Wanted.sha256` says which.
- Kept: a file already in place with the manifest's bytes is not downloaded again. A file without
  a manifest cannot be proven right and is always downloaded.
- Links: every folder below the download folder is walked link-free (safefs); a link or a special
  file where a file or folder must go is refused, never followed. The download folder itself is
  the user's choice and may be a link (a mounted volume).
- Bounds: at most `concurrency` files and `concurrency` ranges of `chunk_size` bytes in flight,
  each streamed to its file a batch at a time (landing.py), whatever the sizes; a size lie costs
  one HEAD, and the free space is checked first.
- A kill leaves at most `.tmp-ckptd-download-*` files beside complete ones, never a torn file
  under a real name; the next download into the folder removes them. Downloads into one folder
  take turns (a lock on it), so the leftovers it removes are never a running download's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from daemon.restore import safefs
from daemon.restore.download import ATTEMPTS, Tally, all_or_cancel
from daemon.restore.landing import Corrupt, Landing, Range, in_thread
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

MiB = 1 << 20
TMP_PREFIX = ".tmp-ckptd-download-"
log = structlog.get_logger()
T = TypeVar("T")


class FetchFailed(Exception):
    """A file could not be fetched, verified or put in place; the message names key and path."""


@dataclass(frozen=True)
class Wanted:
    """One stored file to put in place."""

    key: str
    parts: tuple[str, ...]  # its path below the download folder: (job_id, "rank-N", *relpath segments)
    size: int
    sha256: str | None  # from its committed checkpoint's manifest; None: size-checked only

    @property
    def path(self) -> str:
        return "/".join(self.parts)


class FetchReport(Tally):
    """What `ckptd download` fetched."""


def _kept(root_fd: int, root: str, want: Wanted) -> bool:
    """Whether the file is in place with the manifest's bytes; safefs.Refused if a link is in the way."""
    *dirs, name = want.parts
    with safefs.folder(root_fd, dirs, root) as d:
        if d is None:
            return False
        safefs.check_file_slot(d, name, os.path.join(root, want.path))
        return want.sha256 is not None and safefs.matches(d, name, want.size, want.sha256)


def _create(root_fd: int, root: str, want: Wanted, tmp: str, opened: list[int]) -> None:
    """Open (creating) the file's folder link-free and the temporary file `tmp` in it; the folder's
    and the file's descriptors go into `opened` at once, so the caller closes them (and removes
    `tmp`, whose name it chose) even when cancelled while this runs."""
    with safefs.folder(root_fd, want.parts[:-1], root, create=True) as d:
        assert d is not None
        opened.append(os.dup(d))
    opened.append(safefs.create_file(opened[0], tmp))


def _finish(opened: list[int], landing: Landing, tmp: str, want: Wanted, root: str) -> None:
    """Verify (the digest was computed as the bytes landed), fsync, rename over the file's name,
    fsync the folder."""
    folder = opened[0]
    landing.finish(want.size, want.sha256)
    name = want.parts[-1]
    safefs.check_file_slot(folder, name, os.path.join(root, want.path))  # a link there is refused, never followed
    safefs.rename(folder, tmp, folder, name)
    os.fsync(folder)


class _Fetcher:
    """Downloads into place: at most `concurrency` files and `concurrency` ranges at once."""

    def __init__(
        self,
        storage: Storage,
        root: tuple[int, str],
        concurrency: int,
        chunk_size: int,
        progress: Callable[[int, int], None] | None,
        retry_window: float,
    ) -> None:
        self.storage, (self.root_fd, self.root), self.chunk_size = storage, root, chunk_size
        self.concurrency, self.progress, self.retry_window = concurrency, progress, retry_window
        self.files, self.chunks = asyncio.Semaphore(concurrency), asyncio.Semaphore(concurrency)
        self.done = self.total = 0

    def advance(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    async def _retrying(self, call: Callable[[], Awaitable[T]], want: Wanted) -> T:
        deadline = Deadline.after(self.retry_window)
        return await retrying(call, deadline=deadline, context={"file": want.path}, counter=None)

    async def one(self, want: Wanted) -> None:
        """Download, verify and put one file in place; FetchFailed naming its key if that fails."""
        async with self.files:
            try:
                await self._download(want)
            except StorageError as exc:
                raise FetchFailed(f"cannot download {want.key}: {exc}") from exc
            except safefs.Refused as exc:
                raise FetchFailed(f"cannot write {want.key}: {exc}") from None
            except OSError as exc:
                raise FetchFailed(f"cannot write {os.path.join(self.root, want.path)} (key {want.key}): {exc}") from exc

    async def _download(self, want: Wanted) -> None:
        if want.size > self.chunk_size:  # one cheap request before several big ones
            info = await self._retrying(functools.partial(self.storage.head, want.key), want)
            if info is None:
                raise FetchFailed(f"cannot download {want.key}: no such object")
            if info.size != want.size:
                raise FetchFailed(f"{want.key} is {info.size} bytes, expected {want.size}")
        for attempt in range(1, ATTEMPTS + 1):
            landed = [0]
            try:
                await self._attempt(want, landed)
                return
            except Corrupt as exc:
                self.advance(-landed[0])  # the bar goes back: fetched again
                log.warning("downloaded file does not match", key=want.key, attempt=attempt, error=str(exc))
                if attempt == ATTEMPTS:
                    raise FetchFailed(f"{want.key} does not match after {ATTEMPTS} downloads: {exc}") from None

    async def _attempt(self, want: Wanted, landed: list[int]) -> None:
        opened: list[int] = []
        tmp: str | None = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            await in_thread(_create, self.root_fd, self.root, want, tmp, opened)
            landing = Landing(opened[1], verify=want.sha256 is not None)
            offsets = iter(range(0, want.size, self.chunk_size))  # shared: each range is taken by one worker

            async def worker() -> None:
                for start in offsets:
                    await self._range(want, landing, start, min(start + self.chunk_size, want.size), landed)

            await all_or_cancel(worker() for _ in range(min(self.concurrency, -(-want.size // self.chunk_size))))
            await in_thread(_finish, opened, landing, tmp, want, self.root)
            tmp = None
        finally:
            if tmp is not None and len(opened) == 2:  # synchronous: it must happen even while being cancelled
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=opened[0])
            for fd in opened:  # every writer thread has ended: in_thread and all_or_cancel wait for them
                os.close(fd)

    async def _range(self, want: Wanted, landing: Landing, start: int, end: int, landed: list[int]) -> None:
        def advance(n: int) -> None:
            landed[0] += n
            self.advance(n)

        async with self.chunks:
            part = Range(self.storage, want.key, landing, start, end)
            await self._retrying(functools.partial(part.pull, advance), want)


def _open_root(folder: str) -> int:
    os.makedirs(folder, exist_ok=True)
    return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


async def _take_turn(root_fd: int, root: str) -> None:
    """Hold the download folder's lock (released with `root_fd`), waiting while another download has it.
    Polled, never a blocking flock in a thread: a cancelled wait must end at once."""
    waiting = False
    while True:
        try:
            fcntl.flock(root_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not waiting:
                log.info("waiting for another download into the same folder", folder=root)
                waiting = True
            await asyncio.sleep(0.2)


def _sweep(root_fd: int, root: str, wanted: Sequence[Wanted]) -> int:
    """Remove the temporary files a killed download left in the folders of `wanted` (never a wanted
    file, whatever its name); how many were removed."""
    removed = 0
    folders: dict[tuple[str, ...], set[str]] = {}
    for w in wanted:
        folders.setdefault(w.parts[:-1], set()).add(w.parts[-1])
    for dirs, names in sorted(folders.items()):
        with safefs.folder(root_fd, dirs, root) as d:
            for name in os.listdir(d) if d is not None else ():
                if name.startswith(TMP_PREFIX) and name not in names and stat.S_ISREG(os.lstat(name, dir_fd=d).st_mode):
                    os.unlink(name, dir_fd=d)
                    removed += 1
    return removed


def disk_bytes(todo: Sequence[Wanted], block: int) -> int:
    """What the files take on a disk of `block`-byte blocks: whole blocks per file, and a block per
    folder that may be created (an empty file takes none).

    | files (sizes) in folders   | block | bytes |
    |----------------------------|-------|-------|
    | 1 in a                     | 4096  | 8192  |
    | 4097 in a                  | 4096  | 12288 |
    | 0 in a                     | 4096  | 4096  |
    | 1 in a, 1 in a, 1 in b     | 4096  | 20480 |
    """
    return sum(-(-w.size // block) * block for w in todo) + block * len({w.parts[:-1] for w in todo})


def _check_space(root_fd: int, root: str, todo: Sequence[Wanted]) -> None:
    st = os.statvfs(root_fd)
    free, need = st.f_bavail * st.f_frsize, disk_bytes(todo, st.f_frsize or 4096)
    if need > free:  # fail before a byte is written, not after filling the disk
        raise FetchFailed(f"not enough space in {root}: the files need {need} bytes on disk, {free} free")


async def fetch(
    storage: Storage,
    wanted: Sequence[Wanted],
    folder: str,
    *,
    concurrency: int = 8,
    chunk_size: int = 16 * MiB,
    progress: Callable[[int, int], None] | None = None,
    retry_window: float = 300.0,
) -> FetchReport:
    """Put every wanted file in place below `folder`; FetchFailed (naming key and path) if one cannot be.

    `progress(done_bytes, total_bytes)` is called on the event loop as bytes land. Files already in
    place with their manifest's bytes count as done at once.
    """
    started = time.monotonic()
    if len({w.parts for w in wanted}) != len(wanted):
        raise ValueError("a file is wanted twice")
    folder = os.path.abspath(folder)  # noqa: ASYNC240 - no I/O: the current folder is known
    try:
        root_fd = await asyncio.to_thread(_open_root, folder)
    except OSError as exc:
        raise FetchFailed(f"cannot open the download folder {folder}: {exc}") from exc
    try:
        loader = _Fetcher(storage, (root_fd, folder), concurrency, chunk_size, progress, retry_window)
        loader.total = sum(w.size for w in wanted)
        await _take_turn(root_fd, folder)
        try:
            if removed := await in_thread(_sweep, root_fd, folder, wanted):
                log.info("removed what a killed download left", folder=folder, files=removed)
            kept = await all_or_cancel(in_thread(_kept, root_fd, folder, w) for w in wanted)
        except safefs.Refused as exc:
            raise FetchFailed(f"cannot download into {exc.path}: {exc}") from None
        except OSError as exc:
            raise FetchFailed(f"cannot read the download folder {folder}: {exc}") from exc
        todo = [w for w, k in zip(wanted, kept, strict=True) if not k]
        loader.advance(loader.total - sum(w.size for w in todo))
        _check_space(root_fd, folder, todo)
        await all_or_cancel(loader.one(w) for w in todo)
    finally:
        os.close(root_fd)
    return FetchReport(
        files=len(wanted),
        bytes=loader.total,
        downloaded_files=len(todo),
        downloaded_bytes=sum(w.size for w in todo),
        kept_files=len(wanted) - len(todo),
        seconds=round(time.monotonic() - started, 3),
    )
