"""Between detection and upload: track candidate files until each is judged complete.

Hints arrive from inotify and scans. A file closed after writing is pinned at once (rotation may
delete it any moment); every candidate is then re-checked after the settle time and handed on
once `complete.judge` says so. Candidates live only in memory: after a crash the start-up scan
finds them again.

Every look at a file goes through scan.probe / Staging.pin, which follow no link below the root
and open nothing but regular files: links, FIFOs, sockets and devices are skipped, logged and
counted once. An error on one file (EACCES, EIO) stays that file's: it is logged, counted in
UPLOAD_FAILURES, shown by `failures()`, and retried with a backoff; the candidate stays, so its
checkpoint does not commit without it and a drain reports it as not stored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon import metrics
from daemon.catalog import layout
from daemon.upload import complete, scan
from daemon.upload.complete import FileError, Identity, Verdict
from daemon.upload.pin import Pin, Staging

log = structlog.get_logger()

PATIENCE = 3  # failed looks after which a drain stops waiting for the file (it reports it instead)


@dataclass
class Candidate:
    relpath: str
    path: str
    closed: bool  # closed after writing or renamed into place since it last changed
    identity: Identity | None
    since: float  # when `identity` was first seen as it is
    due: float
    pin: Pin | None = None
    writing: bool = False  # someone held it open for writing at the last check
    error: FileError | None = None  # why the last look at it failed, if it did
    failed: int = 0  # looks that failed in a row


class Settler:
    def __init__(
        self,
        root: str,
        staging: Staging,
        settle: float,
        ignore: tuple[str, ...],
        on_notice: Callable[[str], None],
        on_complete: Callable[[Pin], None],
        on_skip: Callable[[str, str], None],
    ) -> None:
        self.root, self.staging, self.settle, self.ignore = root, staging, settle, ignore
        self.on_notice, self.on_complete, self.on_skip = on_notice, on_complete, on_skip
        self.candidates: dict[str, Candidate] = {}
        self._wake = asyncio.Event()
        self._skipped_seen: set[str] = set()

    def pin_early(self, path: str) -> Pin | None:
        """Pin a just-closed file on the detector's thread, which keeps normal priority: when the
        CPUs are busy, the event loop may get to it only after rotation has deleted it."""
        try:
            relpath = layout.relpath_of(self.root, path)
        except layout.UnsafePath:
            return None
        if complete.is_ignored(relpath, self.ignore):
            return None
        try:
            return self.staging.pin(path, relpath, root=self.root)
        except OSError:
            return None  # notice() tries again on the loop, and reports the error there

    def notice(self, path: str, closed: bool, early: Pin | None = None) -> None:
        """A hint that `path` may be complete (called on the event loop), maybe already pinned."""
        try:
            relpath = layout.relpath_of(self.root, path)
        except layout.UnsafePath as e:
            if self._first_time(path):
                log.warning("file name cannot be stored", path=path, reason=str(e))
                self.on_skip(path, "unsafe_name")
            return
        if complete.is_ignored(relpath, self.ignore):
            if self._first_time(relpath):
                self.on_skip(relpath, "ignored")
            return
        now = time.monotonic()
        c = self.candidates.get(relpath)
        if c is None:
            c = self._new(relpath, path, closed, now)
            if c is None:
                if early is not None:
                    early.release()
                return
        c.closed |= closed
        c.due = now + self.settle
        try:
            if early is not None:
                self._adopt(c, early)
            elif c.closed and c.pin is None:
                c.pin = self._pin(c)
        except FileError as e:
            self._failed(c, e, now)
        self._wake.set()

    def _new(self, relpath: str, path: str, closed: bool, now: float) -> Candidate | None:
        """A new candidate, or None for what is never one (a link, a FIFO, a socket, a device)."""
        c = Candidate(relpath, path, closed, None, now, now + self.settle)
        try:
            found = self._probe(c)
        except FileError as e:
            found = None
            self._failed(c, e, now)
        if found is not None and found.kind in (scan.SYMLINK, scan.NOT_REGULAR):
            self._special(relpath, found)
            return None
        c.identity = found.identity if found else None
        self.candidates[relpath] = c
        self.on_notice(relpath)
        return c

    @staticmethod
    def _adopt(c: Candidate, early: Pin) -> None:
        if c.pin is None:
            c.pin = early
        elif early.stage is not None and early.stage == c.pin.stage:
            early.release()  # the same link, pinned twice: one hold is enough
        else:
            c.pin.release()  # a newer version, pinned at its own close
            c.pin = early

    def _first_time(self, name: str) -> bool:
        """Count and log a skipped name once, not at every event and scan (bounded memory)."""
        if name in self._skipped_seen:
            return False
        if len(self._skipped_seen) >= 100_000:
            self._skipped_seen.clear()
        self._skipped_seen.add(name)
        return True

    def _special(self, relpath: str, found: scan.Found) -> None:
        """A link, FIFO, socket or device: never read, never followed; said and counted once."""
        if self._first_time(relpath):
            log.warning(
                "not a regular file: skipped, never read" if found.kind == scan.NOT_REGULAR else "symlink not followed",
                path=relpath,
                kind=found.what,
                **({"target": found.target} if found.kind == scan.SYMLINK else {}),
            )
            self.on_skip(relpath, found.kind)

    def busy(self) -> bool:
        """True while some candidate may still become complete: not merely held open by a writer,
        nor failing for a while (a drain does not wait on a file that cannot be read: it reports it)."""
        return any(not c.writing and c.failed < PATIENCE for c in self.candidates.values())

    def recheck(self) -> None:
        """Look again at every candidate now, with a fresh look at who holds it open: at the drain,
        a file last seen open may have been closed since, and must not be left unjudged."""
        now = time.monotonic()
        for c in self.candidates.values():
            c.writing, c.due = False, min(c.due, now)
        self._wake.set()

    def settling(self) -> list[str]:
        """Candidates that may be complete but were not yet judged so, failing ones included."""
        return sorted(c.relpath for c in self.candidates.values() if not c.writing)

    def still_writing(self) -> list[str]:
        return sorted(c.relpath for c in self.candidates.values() if c.writing)

    def failures(self) -> dict[str, str]:
        """relpath -> why the last look at it failed, for every candidate failing now."""
        return {c.relpath: str(c.error) for c in self.candidates.values() if c.error is not None}

    async def run(self) -> None:
        """Check candidates as they come due, forever (cancel to stop). One file's error is that
        file's: this never ends because of it."""
        while True:
            now = time.monotonic()
            due = [c for c in self.candidates.values() if c.due <= now]
            if due:
                writers = None
                if any(not c.closed for c in due):
                    writers = await asyncio.to_thread(complete.files_open_for_write)
                for c in due:
                    self._check_one(c, writers, time.monotonic())
                continue
            self._wake.clear()
            timeout = min((c.due for c in self.candidates.values()), default=now + 3600) - now
            try:
                async with asyncio.timeout(max(timeout, 0.001)):  # not wait_for: see Publisher.run
                    await self._wake.wait()
            except TimeoutError:
                pass

    def release_all(self) -> None:
        for c in self.candidates.values():
            if c.pin:
                c.pin.release()
        self.candidates.clear()

    def _check_one(self, c: Candidate, writers: frozenset[tuple[int, int]] | None, now: float) -> None:
        if self.candidates.get(c.relpath) is not c:
            return
        try:
            self._check(c, writers, now)
        except FileError as e:
            self._failed(c, e, now)
            return
        except Exception as e:  # a bug must not end settling for every other file
            log.exception("settle check failed", path=c.relpath)
            self._failed(c, FileError("check", c.relpath, e), now)
            return
        self._ok(c, "check")

    def _failed(self, c: Candidate, e: FileError, now: float) -> None:
        """Log and count a failure once, not at every retry (again if its errno changes); look
        again after a backoff."""
        c.failed += 1
        delay = complete.retry_delay(c.failed)
        if c.error is None or e.reason != c.error.reason:
            log.warning("cannot read file", path=c.relpath, op=e.op, errno=e.reason, error=str(e), retry_in=delay)
            metrics.UPLOAD_FAILURES.labels(reason=e.reason).inc()
        c.error, c.due = e, now + delay
        self._wake.set()

    @staticmethod
    def _ok(c: Candidate, op: str) -> None:
        """The step that failed worked now (a pin also proves the stat it needs)."""
        if c.error is not None and (c.error.op == op or (op, c.error.op) == ("pin", "stat")):
            log.info("file readable again", path=c.relpath, was=str(c.error))
            c.error, c.failed = None, 0

    def _probe(self, c: Candidate) -> scan.Found:
        try:
            found = scan.probe(self.root, c.relpath)
        except OSError as e:
            raise FileError("stat", c.relpath, e) from e
        self._ok(c, "stat")
        return found

    def _pin(self, c: Candidate) -> Pin | None:
        try:
            pin = self.staging.pin(c.path, c.relpath, root=self.root)
        except OSError as e:
            raise FileError("pin", c.relpath, e) from e
        self._ok(c, "pin")
        return pin

    def _content(self, c: Candidate) -> Identity | None:
        """Identity of what would be uploaded: the pinned inode if pinned, else the path's file."""
        if c.pin is None:
            return self._probe(c).identity
        current = c.pin.current()
        try:
            on_path = self._probe(c).identity
        except FileError:  # the pin holds the content: a path we cannot look at only hides a rename
            on_path = None
        replaced = on_path is not None and (on_path.dev, on_path.ino) != (current.dev, current.ino)
        # A copy (another file system) does not see the original change in place: compare it all.
        rewritten = on_path is not None and c.pin.copied is not None and on_path != current
        if replaced or rewritten:
            # Superseded by the file now there (renamed over it, or rewritten after the copy).
            c.pin.release()
            c.pin = None
            c.pin = self._pin(c) if c.closed else None
            return on_path
        return current

    def _check(self, c: Candidate, writers: frozenset[tuple[int, int]] | None, now: float) -> None:
        current = self._content(c)
        if current != c.identity:
            c.identity, c.since = current, now
        c.writing = bool(current and not c.closed and writers and (current.dev, current.ino) in writers)
        verdict = complete.judge(
            before=c.identity, now=current, open_for_write=c.writing, quiet_for=now - c.since, settle=self.settle
        )
        if verdict is Verdict.WAIT:
            # A file held open may stay so for minutes: look again at a pace that keeps /proc cheap.
            c.due = now + max(self.settle, 0.5) if c.writing else max(c.since + self.settle, now + self.settle / 4)
            return
        if verdict is Verdict.VANISHED:
            del self.candidates[c.relpath]
            if c.pin:
                c.pin.release()
            self._gone(c)
            return
        if c.pin is None:
            pin = self._pin(c)  # a FileError leaves the candidate in place, to be retried
            if pin is None or pin.identity != current:
                del self.candidates[c.relpath]
                if pin:
                    pin.release()
                    self.notice(c.path, False)  # changed between the check and the pin: settle again
                else:
                    self._gone(c)
                return
            c.pin = pin
        del self.candidates[c.relpath]
        c.pin.identity = current
        self.on_complete(c.pin)

    def _gone(self, c: Candidate) -> None:
        """The regular file is no longer there: dropped as vanished, and if a link, FIFO or the like
        took its place, that is skipped too (once)."""
        try:
            found = scan.probe(self.root, c.relpath)
        except OSError:
            found = None
        if found is not None and found.kind == scan.FILE:
            self.notice(c.path, False)  # a new version appeared meanwhile: settle it
            return
        self.on_skip(c.relpath, "vanished")
        if found is not None and found.kind in (scan.SYMLINK, scan.NOT_REGULAR):
            self._special(c.relpath, found)
