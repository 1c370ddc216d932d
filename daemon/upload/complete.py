"""Is this file complete? A pure rule, and the identity it compares; and when to look again at a
file whose last look failed.

A file is complete when its writer is done with it: closed after writing or renamed into place,
not open for writing by anyone we can see, and unchanged (size, mtime, inode) for a settle time.
"""

from __future__ import annotations

import enum
import errno
import fnmatch
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """What must stay the same for a file to count as unchanged."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def stat(cls, path: str) -> Identity | None:
        """The identity of a regular file, or None if it is gone, not a regular file, or cannot be
        looked at (EACCES, ELOOP, EIO): a quick comparison only, which must not fail a whole scan
        for one file. Whoever acts on the file finds out why (scan.probe raises)."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        return cls.of(st) if stat.S_ISREG(st.st_mode) else None


RETRY = (0.5, 30.0)  # seconds: first look again at a file whose look failed, and the most between two


class FileError(Exception):
    """An error of one file, with the step that hit it (`op`) and its errno name (`reason`)."""

    def __init__(self, op: str, relpath: str, error: Exception) -> None:
        self.op, self.relpath, self.error = op, relpath, error
        code = getattr(error, "errno", None)
        self.reason = errno.errorcode.get(code, type(error).__name__) if code else type(error).__name__
        detail = getattr(error, "strerror", None) or str(error)
        super().__init__(f"{op}: {self.reason} ({detail})")


def retry_delay(failed: int) -> float:
    """Seconds until the next look at a file whose last `failed` looks failed (1, 2, ...): doubling
    from RETRY[0], at most RETRY[1]."""
    return min(RETRY[0] * 2 ** min(failed - 1, 16), RETRY[1])


class Verdict(enum.Enum):
    COMPLETE = "complete"
    WAIT = "wait"  # look again after the settle time
    VANISHED = "vanished"


def judge(
    *, before: Identity | None, now: Identity | None, open_for_write: bool, quiet_for: float, settle: float
) -> Verdict:
    """Decide what to do with a candidate file (ignored names never become candidates).

    | now   | open for write | now == before | quiet_for >= settle | verdict  |
    |-------|----------------|---------------|---------------------|----------|
    | None  | any            | any           | any                 | VANISHED |
    | file  | yes            | any           | any                 | WAIT     |
    | file  | no             | no            | any                 | WAIT     |
    | file  | no             | yes           | no                  | WAIT     |
    | file  | no             | yes           | yes                 | COMPLETE |

    `before` is the identity seen when the settle time started; a change restarts it.
    """
    if now is None:
        return Verdict.VANISHED
    if open_for_write or now != before or quiet_for < settle:
        return Verdict.WAIT
    return Verdict.COMPLETE


def is_ignored(relpath: str, patterns: Iterable[str]) -> bool:
    """True if any segment of the path matches an ignore glob (a temporary folder hides its files)."""
    segments = relpath.split("/")
    return any(fnmatch.fnmatchcase(seg, pat) for seg in segments for pat in patterns)


def files_open_for_write() -> frozenset[tuple[int, int]] | None:
    """(dev, ino) of every file a visible process holds open for writing, from /proc.

    A file created in a new directory or moved in gets no close event we can wait for, so this
    is how "still being written" is told apart from "done". Processes in another PID namespace
    (a sidecar without shareProcessNamespace) are invisible; the settle time is then the only
    guard. Returns None when /proc cannot be read at all.
    """
    found: set[tuple[int, int]] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                    flags = int(f.read(200).split(b"flags:", 1)[1].split()[0], 8)
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    continue
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except (OSError, IndexError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode):
                found.add((st.st_dev, st.st_ino))
    return frozenset(found)
