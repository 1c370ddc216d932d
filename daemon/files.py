"""Local file helpers every part shares: durable atomic writes, whole-file SHA-256, free space.

All of them block: call them from a worker thread when on the event loop.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import uuid
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
HASH_CHUNK = 4 << 20


class ShortRead(OSError):
    """The file ended before the number of bytes it was expected to hold."""


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries durable: a rename or a new file survives a crash only after this."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    dest: str | os.PathLike[str], fill: bytes | Callable[[int], T], *, tmp_prefix: str = ".ckptd-tmp-"
) -> T | None:
    """Create or replace `dest` so that a crash leaves the old content or the new, never a mix.

    The content is written under a unique temporary name in the same folder (`fill` is the bytes,
    or a function writing to the descriptor and returning what the caller wants back), fsynced,
    renamed over `dest`, and the folder fsynced. The temporary file is removed on any failure.
    """
    folder = os.path.dirname(os.fspath(dest)) or "."
    tmp = os.path.join(folder, f"{tmp_prefix}{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            result = write_all(fd, fill) if isinstance(fill, bytes) else fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)
    return result


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def sha256_of(fd: int, size: int | None = None) -> str:
    """SHA-256 of the file's first `size` bytes (ShortRead if it has fewer), or of all of it.

    Positional reads: the descriptor's offset is left alone, so others may share it.
    """
    digest, offset = hashlib.sha256(), 0
    while size is None or offset < size:
        want = HASH_CHUNK if size is None else min(HASH_CHUNK, size - offset)
        chunk = os.pread(fd, want, offset)
        if not chunk:
            if size is None:
                break
            raise ShortRead(f"file ended at byte {offset} of {size}")
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a regular file; OSError for anything else (a link, or a FIFO that would block)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return sha256_of(fd)
    finally:
        os.close(fd)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
