"""The file:// store's objects reached without following links: every folder below the root is
opened one component at a time with O_NOFOLLOW, so a link anywhere in a key's path is "no such
folder", and only regular files are opened as objects (a FIFO could hang a reader, a device has
side effects). See local.py's docstring for what the store makes of links and special files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from daemon.storage import localfs as fs
from daemon.storage.errors import StorageError

# O_NOFOLLOW: a link below the root is not part of the store. O_NONBLOCK: opening a FIFO that slipped
# past the lstat check must not wait for a writer (the fstat check then refuses it).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What opening a path component reports when it is absent, a file, or a link (O_NOFOLLOW).
NOT_THERE = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)


def open_or_none(path: str | Path, flags: int, dir_fd: int | None = None) -> int | None:
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in NOT_THERE:
            return None
        raise


@contextmanager
def subfolder(name: str, dir_fd: int) -> Iterator[int | None]:
    fd = open_or_none(name, DIR_FLAGS, dir_fd)
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def lstat_mode(name: str, dir_fd: int) -> int | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None


def is_link_or_special(entry: os.DirEntry[str]) -> bool:
    return not entry.is_dir(follow_symlinks=False) and not entry.is_file(follow_symlinks=False)


def not_regular(op: str, key: str) -> StorageError:
    why = "not a regular file: a link or special file in the store is not an object"
    return StorageError(op, key, "NoSuchKey", why, http_status=404, transient=False)


def refuse_linked_folders(root: Path, op: str, key: str) -> None:
    """Refuse a key whose folders include a link: the write would land outside the store.

    A check before the write, not a lock: it stops links that are there, not one made meanwhile.
    """
    path = root
    for name in key.split("/")[:-1]:
        path = path / name
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return  # the write creates the rest as real folders
        if stat.S_ISLNK(mode):
            why = f"{path.relative_to(root)} is a link, not a folder"
            raise StorageError(op, key, "KeyConflict", why, http_status=409, transient=False)


@contextmanager
def folder_fd(root: Path, folder: str) -> Iterator[int | None]:
    """A descriptor of the real folder root/FOLDER ('' for the root), reached one component at
    a time without following links; None when there is none (absent, a file, or a link)."""
    fd = open_or_none(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for name in folder.split("/") if folder else ():
        if fd is None:
            break
        try:
            child = open_or_none(name, DIR_FLAGS, fd)
        finally:
            os.close(fd)
        fd = child
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def open_object(root: Path, op: str, key: str) -> int:
    """A descriptor of the regular file at `key`.

    A link or special file is no object: NoSuchKey, as for a key with no file, since listings
    skip it and S3 has nothing like it. A folder is a KeyConflict, as before (EISDIR).
    """
    folder, _, name = key.rpartition("/")
    with folder_fd(root, folder) as dir_fd:
        mode = None if dir_fd is None else lstat_mode(name, dir_fd)
        if mode is None:
            raise fs.missing(op, key)
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "a folder, not an object")
        if not stat.S_ISREG(mode):  # not opened: opening a device can have side effects
            raise not_regular(op, key)
        fd = open_or_none(name, FILE_FLAGS, dir_fd)
    if fd is None:
        raise fs.missing(op, key)  # deleted, or replaced by a link (ELOOP), since the lstat
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between the lstat and the open
        os.close(fd)
        raise not_regular(op, key)
    return fd


def prune(root: Path, folder: str) -> None:
    """Remove now-empty folders up to (not including) the root, as S3 has no empty folders."""
    while folder:
        parent, _, name = folder.rpartition("/")
        with folder_fd(root, parent) as dir_fd:
            if dir_fd is None:
                return  # pruned by a concurrent delete
            try:
                os.rmdir(name, dir_fd=dir_fd)  # refuses a link (ENOTDIR): never removes outside
            except FileNotFoundError:
                pass  # pruned by a concurrent delete, which may not have reached the parents yet
            except OSError:
                return  # not empty
        folder = parent
