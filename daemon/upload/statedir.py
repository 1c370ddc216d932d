"""Where the uploader keeps its own state: `.ckptd/` inside the checkpoint folder.

On the checkpoints' own file system, so staging can hard-link them; never scanned, never uploaded,
never removed to free space. Whatever sits where a state folder or file should be and is not what
we wrote (a link, a FIFO, a corrupt journal) is set aside under `<name>.corrupt-<UTC time>`, never
opened or followed, and kept for a post-mortem (the newest few of each name).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from datetime import UTC, datetime
from typing import BinaryIO

import structlog

STATE_DIR = ".ckptd"
ASIDE = ".corrupt-"
KEEP_ASIDE = 3  # set-aside copies kept per name: evidence, not a landfill
log = structlog.get_logger()


def is_state(relpath: str) -> bool:
    """Whether a path relative to the checkpoint folder is, or lies in, the state folder (or a
    state folder set aside: it may be a link to anywhere, and is ours either way)."""
    head = relpath.split("/", 1)[0]
    return head == STATE_DIR or head.startswith(STATE_DIR + ASIDE)


def staging_dir(root: str, rank: int) -> str:
    return os.path.join(root, STATE_DIR, f"staging-rank-{rank}")


def journal_path(root: str, rank: int) -> str:
    return os.path.join(root, STATE_DIR, f"journal-rank-{rank}.jsonl")


def prepare(root: str, rank: int) -> None:
    """Make the state folder and this rank's staging folder real folders of ours (blocking).

    Call before anything is created inside them: `os.makedirs` through a `.ckptd` that is a link
    would create, and later delete, files wherever it points. OSError if the folder cannot be made.
    """
    ensure_dir(os.path.join(root, STATE_DIR))
    ensure_dir(staging_dir(root, rank))


def ensure_dir(path: str) -> str | None:
    """Create `path` (mode 0700) if missing; a link or anything but a folder in its place is set
    aside first. Returns where that went, or None. The parent must already be trusted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    moved = set_aside(path)
    log.error("state folder was not a folder: set aside", path=path, kind=kind(st.st_mode), moved_to=moved)
    os.mkdir(path, 0o700)
    return moved


def set_aside(path: str) -> str:
    """Rename `path`, whatever it is, to `<path>.corrupt-<UTC time>` beside it; never opens or
    follows it. Returns the new name; OSError if it cannot be renamed."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target, n = f"{path}{ASIDE}{stamp}", 0
    while os.path.lexists(target):  # rename would silently replace an earlier one
        n += 1
        target = f"{path}{ASIDE}{stamp}-{n}"
    os.rename(path, target)
    _prune(path)
    return target


def _prune(path: str) -> None:
    """Keep the newest KEEP_ASIDE set-aside copies of `path` (the names sort by time)."""
    folder, name = os.path.split(path)
    try:
        old = sorted(e for e in os.listdir(folder or ".") if e.startswith(name + ASIDE))[:-KEEP_ASIDE]
    except OSError:
        return
    for entry in old:
        victim = os.path.join(folder, entry)
        try:
            if stat.S_ISDIR(os.lstat(victim).st_mode):
                shutil.rmtree(victim)  # does not follow links inside it
            else:
                os.unlink(victim)
        except OSError as e:
            log.warning("old set-aside state not removed", path=victim, error=str(e))


def kind(mode: int) -> str:
    """What a file type is called in a log line."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "folder"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "unknown file type"


def open_read(path: str) -> BinaryIO:
    """A state file for reading; never follows a link, never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return os.fdopen(fd, "rb")


def open_append(path: str, *, trim_after: int = 0) -> int:
    """A descriptor appending to a state file of lines (created if missing); never a link or a FIFO.

    `trim_after` > 0: cut a torn last line (at most that long) off first, so that the next line
    written starts a line of its own instead of gluing onto half of one.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        want = min(st.st_size, trim_after)
        tail = os.pread(fd, want, st.st_size - want) if want else b""
        if tail and not tail.endswith(b"\n"):
            os.ftruncate(fd, st.st_size - len(tail) + tail.rfind(b"\n") + 1)
        return fd
    except BaseException:
        os.close(fd)
        raise


def remove_temporaries(folder: str, prefix: str) -> None:
    """Temporary files that a crash left behind mid atomic write (only those named `prefix`...)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def errno_name(e: OSError) -> str:
    """ENOSPC, EIO, ...: a metric label and the start of a reason."""
    return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__


def describe(e: OSError) -> str:
    """For a reason or a log line: "ENOSPC (No space left on device)"."""
    return f"{errno_name(e)} ({e.strerror or e})"
