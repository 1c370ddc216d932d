"""Detected → complete → queued: hints go to the settler; what it judges complete is queued, unless
this very version is already stored or on its way; reconciliation scans find what hints missed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import structlog

from daemon import metrics
from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile
from daemon.upload import journal as jr
from daemon.upload import statedir
from daemon.upload.commit import CheckpointTracker
from daemon.upload.complete import Identity, files_open_for_write
from daemon.upload.pin import Pin, Staging
from daemon.upload.queue import Job, UploadQueue
from daemon.upload.scan import scan
from daemon.upload.settle import Settler
from daemon.upload.statedir import is_state

log = structlog.get_logger()


class Intake:
    def __init__(
        self,
        *,
        root: str,
        staging: Staging,
        journal: jr.Journal,
        queue: UploadQueue,
        tracker: CheckpointTracker,
        settle: float,
        ignore: tuple[str, ...],
        key_of: Callable[[str], str],
    ) -> None:
        self.root, self.journal, self.queue, self.tracker, self.key_of = root, journal, queue, tracker, key_of
        self.unlistable: dict[str, str] = {}  # "relpath/" of folders the last scan could not list -> why
        self.settler = Settler(root, staging, settle, ignore, self._noticed, self._complete, self._skip)

    def renotice(self, relpath: str) -> None:
        """A file changed under its upload: settle it again as new."""
        self.settler.notice(os.path.join(self.root, relpath), False)

    async def again(self, lost: list[StoredFile]) -> None:
        """The store lost these stored files (not pruned): their stored records go (journal
        `unstored`, as the start-up check does) and each is handed to the settler as a rescan
        would, pinned at once while it is still the version stored, so it is uploaded again. A
        file gone from the folder meanwhile is dropped, and its checkpoint never proven."""
        known = {f.relpath: self.journal.state.stored.get(f.relpath) for f in lost}
        paths = {relpath: os.path.join(self.root, relpath) for relpath in known}
        now = await asyncio.to_thread(lambda: {r: Identity.stat(p) for r, p in paths.items()})
        for relpath, stored in known.items():
            self.journal.record("unstored", relpath=relpath)
            if relpath in self.settler.candidates or self.queue.known(relpath):
                continue  # a newer version is on its way already
            unchanged = stored is not None and now[relpath] == stored.identity
            self.settler.notice(paths[relpath], unchanged)

    def _noticed(self, relpath: str) -> None:
        """A new candidate: its checkpoint must not commit before it is stored or dropped."""
        self.tracker.noticed(relpath, time.monotonic())

    def _complete(self, pin: Pin) -> None:
        """Settler verdict COMPLETE: skip if this very version is stored or uploading, else queue it."""
        key = self.key_of(pin.relpath)
        known = self.journal.state.stored.get(pin.relpath)
        if known and known.identity == pin.identity and known.key == key:
            pin.release()
            metrics.FILES_SKIPPED.labels(reason="unchanged").inc()
            self.tracker.stored(known.file(), time.monotonic())
            return
        uploading = self.queue.uploading(pin.relpath)
        if uploading is not None and uploading.pin.identity == pin.identity:
            jr.release(self.journal, pin)  # this very version is on its way (noticed again, e.g. by polling)
            return
        self.tracker.noticed(pin.relpath, time.monotonic())
        if pin.stage:
            self.journal.record("pinned", jr.Pinned(pin.relpath, pin.identity, pin.stage))
        replaced = self.queue.put(Job(pin, key))
        if replaced:
            jr.release(self.journal, replaced.pin)

    def _skip(self, relpath: str, reason: str) -> None:
        metrics.FILES_SKIPPED.labels(reason=reason).inc()
        if reason == "vanished":
            self.tracker.dropped(relpath, time.monotonic())
        elif reason == "unsafe_name":  # `relpath` is the absolute path here: it has no safe relpath
            name = printable(os.path.relpath(relpath, self.root))
            self.tracker.unstorable(layout.checkpoint_of(name), name, time.monotonic())

    async def rescan(self, retry_failed: bool = True) -> None:
        """Reconcile with the folder: inotify is a hint, this is the truth."""
        changed, others, unlisted = await asyncio.to_thread(self._changed)
        self._unlisted(unlisted)
        for path in others:  # links and special files: the settler skips them, counted once
            self.settler.notice(path, False)
        for path, closed in changed:
            try:
                relpath = layout.relpath_of(self.root, path)
            except layout.UnsafePath:
                self.settler.notice(path, False)  # it logs and counts the unstorable name
                continue
            if relpath in self.settler.candidates or self.queue.known(relpath):
                continue
            metrics.RESCAN_FOUND.inc()
            # Found by a scan, not by an event: files may have come and gone unseen (written while
            # ckptd was down, or events lost), so its checkpoint commits only once the folder is
            # seen to hold exactly what is stored.
            self.tracker.unproven(layout.checkpoint_of(relpath))
            self.settler.notice(path, closed)
        if retry_failed:
            self.queue.retry_failed()

    def _unlisted(self, found: dict[str, str]) -> None:
        """Folders that cannot be listed hide files nobody can tell are complete: each one is a
        pending entry of its checkpoint (which cannot commit), counted and logged once, and named
        by the drain, until a scan can list it (or it is gone)."""
        now = time.monotonic()
        for relpath, error in found.items():
            if relpath not in self.unlistable:
                log.error("folder cannot be listed: its files cannot be uploaded", path=relpath, error=error)
                metrics.UPLOAD_FAILURES.labels(reason=error.split(" ", 1)[0]).inc()
                self.tracker.noticed(relpath, now)
        for relpath in set(self.unlistable) - set(found):
            log.info("folder can be listed again", path=relpath)
            self.tracker.dropped(relpath, now)
        self.unlistable = found

    def _changed(self) -> tuple[list[tuple[str, bool]], list[str], dict[str, str]]:
        """Files whose current version is not the stored one, each with whether it counts as
        closed (no visible process holds it open for writing: pin it now, before a rotation can
        take it), the entries that are not regular files, and the folders that cannot be listed
        (as "relpath/", with why) (runs in a thread)."""
        stored = self.journal.state.stored
        out: list[str] = []
        others: list[str] = []
        unlisted: dict[str, str] = {}

        def cannot_list(folder: str, e: OSError) -> None:
            unlisted[printable(os.path.relpath(folder, self.root)) + "/"] = statedir.describe(e)

        for path in scan(self.root, skip_dir=is_state, others=others.append, unlisted=cannot_list):
            known = stored.get(os.path.relpath(path, self.root))
            if known is None or Identity.stat(path) != known.identity:
                out.append(path)
        writers = files_open_for_write() if out else None
        return [(path, _closed(path, writers)) for path in out], others, unlisted


def _closed(path: str, writers: frozenset[tuple[int, int]] | None) -> bool:
    if writers is None:  # /proc unreadable: no way to tell, so wait for the settle time as before
        return False
    identity = Identity.stat(path)
    return identity is not None and (identity.dev, identity.ino) not in writers


def printable(name: str) -> str:
    """A file name as logs and reports can show it: undecodable bytes as \\xNN escapes."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
