"""The durable record of what this rank has pinned, is uploading, and has stored.

An append-only JSON-lines file: one line per fact, handed to the OS at once, fsynced in groups,
replayed at start, rewritten compactly (temp name, fsync, rename) at start and at clean shutdown.
Losing the newest lines only costs a repeated upload, never a file.

It is the daemon's own state, so its failures never reach the callers of `record()`: a failed
write keeps the unwritten lines in memory, in order; `not_ready()` says why, and `sync()` retries
until the disk takes them. A bad journal at start is set aside (see `replay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import stat
import time
from collections import deque
from dataclasses import asdict

import structlog

from daemon import metrics
from daemon.files import write_atomic
from daemon.upload import statedir
from daemon.upload.pin import Pin
from daemon.upload.records import (  # the record types are part of the journal's interface
    MAX_LINE,
    Corrupt,
    Multipart,
    Pinned,
    State,
    Stored,
    parse,
    replay,
    salvage_pins,
)

__all__ = ["MAX_LINE", "Journal", "Multipart", "Pinned", "State", "Stored", "release"]

RETRY = (0.2, 2.0)  # seconds before retrying a failed write: the first wait, and the longest (doubling)
MAX_PENDING = 10_000  # unwritten lines kept; past that the retry rewrites the whole state instead
log = structlog.get_logger()


class Journal:
    """Blocking file I/O, except `sync`: `open` and `close` in a thread; `record` costs one write(2)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.state = State()
        self.set_aside: str | None = None  # where a corrupt journal was moved at open
        self.salvaged: dict[str, Pinned] = {}  # its pins, for recovery to check against staging
        self._fd: int | None = None
        self._pending: deque[tuple[int, bytes]] = deque()  # (number, line) not yet taken by the OS
        self._recorded = self._written = self._durable = 0  # numbers of the last record so
        self._rewrite = False  # the file may lack what the OS took (a failed fsync): write it anew
        self._error: OSError | None = None
        self._since = self._retry_at = 0.0
        self._backoff, self._repairing, self._opened, self._closed = RETRY[0], False, False, False
        self._tmp_prefix = f".{os.path.basename(path)}.tmp-"

    # --- start and stop ----------------------------------------------------------------------------

    def open(self) -> State:
        """Replay, compact and open for appending. Never raises for a bad or unwritable journal:
        a corrupt one is set aside and the state starts empty, as a new pod's; one that cannot be
        written leaves `not_ready()` saying so and `sync()` retrying."""
        self._opened = True
        try:
            statedir.ensure_dir(os.path.dirname(self.path))
            statedir.remove_temporaries(os.path.dirname(self.path), self._tmp_prefix)
            self.state = self._load()
        except Corrupt as e:
            self._put_aside(e)
        except OSError as e:
            self._fail(e, "open", rewrite=True)
        if self._error is None:
            try:
                self._fd = self._rewrite_file(self.state)
            except OSError as e:  # a full disk must not stop the start: keep the old file, append
                self._count(e)
                log.warning(
                    "journal not compacted at start: appending to it", path=self.path, error=statedir.describe(e)
                )
                try:
                    self._fd = statedir.open_append(self.path, trim_after=MAX_LINE + 1)
                except OSError as e2:
                    self._fail(e2, "open", rewrite=True)
        return self.state

    def close(self) -> bool:
        """Blocking: compact (every record, durably), else append what is pending and fsync; let go
        of the file. Never raises for I/O: False, logged, when records could not be saved (the next
        start re-uploads, or reconciles, what they said). A second call is a no-op."""
        if self._closed or not self._opened:
            return self._error is None
        self._closed, saved = True, False
        try:
            self._replace_fd(self._rewrite_file(self.state))
            saved = True
        except OSError as e:
            self._count(e)
            try:
                if self._rewrite:  # the old file cannot be trusted to hold what the OS took
                    raise e
                self._flush()
                os.fsync(self._fd)  # type: ignore[arg-type] - _flush raised if there is none
                saved = True
                log.warning("journal not compacted at shutdown", path=self.path, error=statedir.describe(e))
            except OSError as e2:
                self._fail(e2, "close")
                log.error("journal not saved at shutdown", path=self.path, unsaved=self._recorded - self._durable)
        finally:
            self._replace_fd(None)
        if saved:
            self._pending.clear()
            self._durable = self._written = self._recorded
            if self._error is not None:
                self._recovered()
        return saved

    # --- records -----------------------------------------------------------------------------------

    def record(self, op: str, value: object | None = None, **fields: object) -> None:
        """Apply a fact and append it. Never raises: a record this journal could not replay is
        refused (logged); a failed write keeps the line for `sync()` to retry."""
        record = {"op": op, **(asdict(value) if value is not None else {}), **fields}  # type: ignore[call-overload]
        try:
            kind, parsed = parse(record)
        except ValueError as e:
            log.error("journal record refused", op=op, error=str(e))
            return
        self.state.apply(kind, parsed)
        self._recorded += 1
        self._pending.append((self._recorded, _line(record)))
        if self._error is None and not self._rewrite and not self._closed:
            try:
                self._flush()
            except OSError as e:
                self._fail(e, "write")
        elif len(self._pending) > MAX_PENDING:  # the state holds them all: rewrite it instead
            self._pending.clear()
            self._rewrite = True

    async def sync(self) -> None:
        """Make every record so far durable (group commit: one fsync for many records); while the
        journal is failing, retry writing it instead (backing off to RETRY[1]). Never raises for I/O.

        For the event loop: the fsync, which can take as long as the disk wants, runs in a thread,
        on its own descriptor so that a journal compacted or closed meanwhile cannot have the
        number reused under it.
        """
        if self._error is not None or self._rewrite:
            await self._repair()
            return
        if self._pending:  # lines recorded while a retry was in flight
            try:
                self._flush()
            except OSError as e:
                self._fail(e, "write")
                return
        target = self._written
        if self._fd is None or self._durable >= target:
            return
        # Its own fsync even while another is in flight: returning early could mean returning
        # before the records this caller depends on are on disk.
        try:
            await asyncio.to_thread(_fsync_and_close, os.dup(self._fd))
        except OSError as e:  # Linux may drop pages it failed to write: what the file holds is unknown
            self._fail(e, "fsync", rewrite=True)
            return
        self._durable = max(self._durable, target)

    # --- what /readyz and /status show -------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the journal is not being written, or None while it is."""
        return None if self._error is None else f"journal not writable: {statedir.describe(self._error)}"

    def not_ready(self) -> list[str]:
        return [] if self.error is None else [self.error]

    @property
    def unsaved(self) -> int:
        """Records applied in memory but not yet durable on disk."""
        return self._recorded - self._durable

    # --- failing and retrying ----------------------------------------------------------------------

    async def _repair(self) -> None:
        if self._repairing or self._closed or time.monotonic() < self._retry_at:
            return
        self._repairing, rewriting = True, self._rewrite or self._fd is None
        try:
            if rewriting:
                self._rewrite, upto = False, self._recorded
                self._rewritten(await asyncio.to_thread(self._rewrite_file, self.state.copy()), upto)
            rewriting = False
            self._flush()
            target = self._written
            await asyncio.to_thread(_fsync_and_close, os.dup(self._fd))  # type: ignore[arg-type]
            self._durable = max(self._durable, target)
        except OSError as e:
            self._fail(e, "retry", rewrite=rewriting)
            return
        finally:
            self._repairing = False
        if self._rewrite:  # too many lines piled up meanwhile: the next round rewrites
            self._retry_at = 0.0
        else:
            self._recovered()

    def _fail(self, e: OSError, op: str, *, rewrite: bool = False) -> None:
        self._count(e)
        self._rewrite = self._rewrite or rewrite
        now = time.monotonic()
        if self._error is None or statedir.describe(self._error) != statedir.describe(e):  # once per streak and reason
            log.error(
                "journal write failed: records kept in memory, retrying",
                op=op,
                path=self.path,
                error=statedir.describe(e),
                unsaved=self._recorded - self._durable,
            )
            self._since = self._since if self._error is not None else now
        self._error = e
        self._retry_at, self._backoff = now + self._backoff, min(self._backoff * 2, RETRY[1])

    def _recovered(self) -> None:
        log.info("journal writable again", path=self.path, after_seconds=round(time.monotonic() - self._since, 3))
        self._error, self._backoff, self._retry_at = None, RETRY[0], 0.0

    @staticmethod
    def _count(e: OSError) -> None:
        metrics.STATE_WRITE_ERRORS.labels(reason=statedir.errno_name(e)).inc()

    # --- the file ----------------------------------------------------------------------------------

    def _flush(self) -> None:
        """Hand the pending lines to the OS, oldest first; a short write keeps the rest of its line,
        so the next write finishes it and the file never holds a torn line but at a crash."""
        if self._fd is None:
            raise OSError(errno.EBADF, "journal not open", self.path)
        while self._pending:
            number, line = self._pending[0]
            n = os.write(self._fd, line)
            if n < len(line):
                self._pending[0] = (number, line[n:])
                continue
            self._pending.popleft()
            self._written = number

    def _rewritten(self, fd: int, upto: int) -> None:
        """A new file holding every record up to number `upto`, durably, now appended to."""
        self._replace_fd(fd)
        while self._pending and self._pending[0][0] <= upto:
            self._pending.popleft()
        self._written, self._durable = max(self._written, upto), max(self._durable, upto)

    def _rewrite_file(self, state: State) -> int:
        """Write `state` as the whole journal (temp, fsync, rename); a descriptor appending to it."""
        statedir.ensure_dir(os.path.dirname(self.path))
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(self.path).st_mode):  # a folder put there meanwhile, say
                self.set_aside = statedir.set_aside(self.path)
        write_atomic(self.path, b"".join(_line(r) for r in state.records()), tmp_prefix=self._tmp_prefix)
        return statedir.open_append(self.path)

    def _replace_fd(self, fd: int | None) -> None:
        old, self._fd = self._fd, fd
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)

    def _load(self) -> State:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return State()
        except OSError as e:
            raise Corrupt(0, f"cannot stat: {statedir.describe(e)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise Corrupt(0, f"a {statedir.kind(st.st_mode)}, not a regular file")
        try:
            with statedir.open_read(self.path) as f:
                return replay(f)
        except OSError as e:
            raise Corrupt(0, f"unreadable: {statedir.describe(e)}") from None

    def _put_aside(self, e: Corrupt) -> None:
        """Set a corrupt journal aside, keeping what pins it names: recovery starts as a new pod's."""
        self.state = State()
        with contextlib.suppress(OSError), statedir.open_read(self.path) as f:
            self.salvaged = salvage_pins(f)
        try:
            self.set_aside = statedir.set_aside(self.path)
        except OSError as err:
            log.error("journal corrupt and not set aside", path=self.path, line=e.line, reason=e.why)
            self._fail(err, "set aside", rewrite=True)
            return
        log.error(
            "journal corrupt: set aside, recovering from the store's manifests",
            path=self.path,
            moved_to=self.set_aside,
            line=e.line,
            reason=e.why,
            pins_salvaged=len(self.salvaged),
        )


def release(journal: Journal, pin: Pin) -> None:
    """Let go of a pin; journal it when that removed its staging link (no other job holds it)."""
    stage = pin.stage
    if pin.release():
        journal.record("unpinned", stage=stage)


def _line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
