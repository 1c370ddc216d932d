"""Link-proof file operations below one trusted folder (issue 10, defect 2).

A path below the trusted folder is never handed to the kernel whole: each folder is opened from
its parent's descriptor with O_NOFOLLOW (an openat walk), files are created with
O_CREAT|O_EXCL|O_NOFOLLOW and renamed with both folders' descriptors. A link anywhere below the
trusted folder (a symlinked checkpoint folder or subfolder, a link planted at a file's name) is
therefore refused, never followed: O_NOFOLLOW on a whole path checks only its last component.

Every function blocks: call them from a worker thread when on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterator, Sequence

from daemon.files import sha256_of

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE, FOLDER = "a file", "a folder"


class Refused(Exception):
    """Something other than a plain folder or file sits where restore must write."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(f"{path}: {why}; restore never writes through links or over special files")


def kind(dir_fd: int, name: str) -> str | None:
    """What `name` in the folder is, without following a link: FILE, FOLDER, another word, or None."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return FOLDER
    return "a link" if stat.S_ISLNK(mode) else "a special file"


def open_dir(dir_fd: int, name: str, shown: str, *, create: bool = False) -> int | None:
    """A descriptor of the folder `name` in `dir_fd`, created if asked (else None when missing).

    Refused if `name` is a link or anything but a folder; `shown` is its path, for messages.
    """
    for _ in range(2):
        try:
            return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                return None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise Refused(shown, f"is {kind(dir_fd, name)}, not a folder") from None
        with contextlib.suppress(FileExistsError):  # made meanwhile: the next open decides what it is
            os.mkdir(name, 0o755, dir_fd=dir_fd)
    raise Refused(shown, "keeps changing")


@contextlib.contextmanager
def folder(root_fd: int, parts: Sequence[str], shown: str, *, create: bool = False) -> Iterator[int | None]:
    """The folder at `parts` below `root_fd`, walked one link-free component at a time (None when
    missing and not created). `shown` is the root's path, for messages."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            shown = os.path.join(shown, part)
            child = open_dir(fd, part, shown, create=create)
            os.close(fd)
            fd = child
            if fd is None:
                break
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def create_file(dir_fd: int, name: str) -> int:
    """A new, empty file `name` open for writing; FileExistsError (never a followed link) if taken."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, 0o644, dir_fd=dir_fd)


def matches(dir_fd: int, name: str, size: int, sha256: str) -> bool:
    """Whether a regular file with exactly these bytes is `name` in the folder (never a link)."""
    try:  # O_NONBLOCK: opening a FIFO for reading would wait for a writer
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and st.st_size == size and sha256_of(fd) == sha256
    finally:
        os.close(fd)


def check_file_slot(dir_fd: int, name: str, shown: str) -> None:
    """Refused unless `name` is free or a regular file that a rename may replace."""
    found = kind(dir_fd, name)
    if found not in (None, FILE):
        raise Refused(shown, f"is {found}, not a file")


def rename(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    # With descriptors on both sides: no folder on either path is looked up through a link, and
    # a rename replaces a link at `dst` itself, never what it points at.
    os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)


def remove_tree(dir_fd: int, name: str) -> None:
    """Delete `name` in the folder and everything below it; links are removed, never followed."""
    if kind(dir_fd, name) == FOLDER:
        shutil.rmtree(name, dir_fd=dir_fd)  # the fd-based, symlink-attack-proof variant on Linux
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
