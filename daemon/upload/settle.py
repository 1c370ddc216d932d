"""Between detection and upload: track candidate files until each is judged complete.

Hints arrive from inotify and scans. A file closed after writing is pinned at once (rotation may
delete it any moment); every candidate is then re-checked after the settle time and handed on
once `complete.judge` says so. Candidates live only in memory: after a crash the start-up scan
finds them again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from daemon.catalog import layout
from daemon.upload.complete import Identity, Verdict, files_open_for_write, is_ignored, judge
from daemon.upload.pin import Pin, Staging

log = structlog.get_logger()


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
        return None if is_ignored(relpath, self.ignore) else self.staging.pin(path, relpath)

    def notice(self, path: str, closed: bool, early: Pin | None = None) -> None:
        """A hint that `path` may be complete (called on the event loop), maybe already pinned."""
        try:
            relpath = layout.relpath_of(self.root, path)
        except layout.UnsafePath as e:
            if self._first_time(path):
                log.warning("file name cannot be stored", path=path, reason=str(e))
                self.on_skip(path, "unsafe_name")
            return
        if is_ignored(relpath, self.ignore):
            if self._first_time(relpath):
                self.on_skip(relpath, "ignored")
            return
        now = time.monotonic()
        c = self.candidates.get(relpath)
        if c is None:
            c = self.candidates[relpath] = Candidate(relpath, path, closed, None, now, now + self.settle)
            c.identity = self._content(c)
            self.on_notice(relpath)
        c.closed |= closed
        c.due = now + self.settle
        if early is not None:
            self._adopt(c, early)
        elif c.closed and c.pin is None:
            c.pin = self.staging.pin(path, relpath)
        self._wake.set()

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

    def busy(self) -> bool:
        """True while some candidate may still become complete (not merely held open by a writer)."""
        return any(not c.writing for c in self.candidates.values())

    def settling(self) -> list[str]:
        """Candidates that may be complete but were not yet judged so."""
        return sorted(c.relpath for c in self.candidates.values() if not c.writing)

    def still_writing(self) -> list[str]:
        return sorted(c.relpath for c in self.candidates.values() if c.writing)

    async def run(self) -> None:
        """Check candidates as they come due, forever (cancel to stop)."""
        while True:
            now = time.monotonic()
            due = [c for c in self.candidates.values() if c.due <= now]
            if due:
                writers = None
                if any(not c.closed for c in due):
                    writers = await asyncio.to_thread(files_open_for_write)
                for c in due:
                    self._check(c, writers, time.monotonic())
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

    def _content(self, c: Candidate) -> Identity | None:
        """Identity of what would be uploaded: the pinned inode if pinned, else the path's file."""
        if c.pin is None:
            return Identity.stat(c.path)
        current = c.pin.current()
        on_path = Identity.stat(c.path)
        if on_path is not None and (on_path.dev, on_path.ino) != (current.dev, current.ino):
            # Replaced by a rename over it: this version is superseded by the file now there.
            c.pin.release()
            c.pin = self.staging.pin(c.path, c.relpath) if c.closed else None
            return on_path
        return current

    def _check(self, c: Candidate, writers: frozenset[tuple[int, int]] | None, now: float) -> None:
        if self.candidates.get(c.relpath) is not c:
            return
        current = self._content(c)
        if current != c.identity:
            c.identity, c.since = current, now
        c.writing = bool(current and not c.closed and writers and (current.dev, current.ino) in writers)
        verdict = judge(
            before=c.identity, now=current, open_for_write=c.writing, quiet_for=now - c.since, settle=self.settle
        )
        if verdict is Verdict.WAIT:
            # A file held open may stay so for minutes: look again at a pace that keeps /proc cheap.
            c.due = now + max(self.settle, 0.5) if c.writing else max(c.since + self.settle, now + self.settle / 4)
            return
        del self.candidates[c.relpath]
        if verdict is Verdict.VANISHED:
            if c.pin:
                c.pin.release()
            self.on_skip(c.relpath, "vanished")
            return
        if c.pin is None:
            c.pin = self.staging.pin(c.path, c.relpath)
            if c.pin is None or c.pin.identity != current:
                if c.pin:
                    c.pin.release()
                self.on_skip(c.relpath, "vanished") if c.pin is None else self.notice(c.path, False)
                return
        c.pin.identity = current
        self.on_complete(c.pin)
