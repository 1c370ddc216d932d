"""Durable file-system primitives for the local backend (blocking: call them from a thread).

A write is visible under its final name only once its bytes and its directory entry are on disk:
write a temporary name in the same directory, fsync, rename, fsync the directory. A crash leaves
either the old object or the new one, plus at worst a temporary file the listing ignores.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from daemon import files
from daemon.files import fsync_dir, write_all
from daemon.storage.base import Body, ObjectInfo, Part
from daemon.storage.bodies import iter_chunks
from daemon.storage.errors import StorageError

RESERVED = ".ckptd-"  # names the store keeps for itself; never part of a key
TMP_PREFIX = ".ckptd-tmp-"
ETAG_XATTR = "user.ckptd.etag"
_NO_XATTR = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA, errno.EPERM, errno.E2BIG)
# errno -> (code, the HTTP status S3 would use, transient)
_ERRNO = {
    errno.ENOSPC: ("StorageFull", 507, True),  # space may be freed; giving up would lose data
    errno.EDQUOT: ("StorageFull", 507, True),
    errno.EACCES: ("AccessDenied", 403, False),
    errno.EPERM: ("AccessDenied", 403, False),
    errno.EROFS: ("ReadOnlyStore", 403, False),
    errno.ENOTDIR: ("KeyConflict", 409, False),  # a key is both an object and a folder
    errno.EISDIR: ("KeyConflict", 409, False),
    errno.ENAMETOOLONG: ("KeyTooLongError", 400, False),
}


def translate(op: str, key: str, exc: OSError) -> StorageError:
    code, status, transient = _ERRNO.get(exc.errno or 0, ("IOError", None, True))
    return StorageError(op, key, code, exc.strerror or str(exc), http_status=status, transient=transient)


def missing(op: str, key: str, code: str = "NoSuchKey") -> StorageError:
    return StorageError(op, key, code, "not found", http_status=404, transient=False)


def check_key(op: str, key: str, *, prefix: bool = False) -> None:
    """Refuse keys that would escape the root or collide with the store's own files."""
    segments = key.split("/")
    if prefix:  # "" and "a/b/" are fine as prefixes
        segments = segments[:-1] + ([segments[-1]] if segments[-1] else [])
    bad = (
        (not key and not prefix)
        or key.startswith("/")
        or "\0" in key
        or any(s in ("", ".", "..") or s.startswith(RESERVED) for s in segments)
    )
    if bad:
        why = f"keys are relative, without '.', '..' or empty segments, and no name starts with {RESERVED!r}"
        raise StorageError(op, key, "InvalidKey", why, transient=False)


def makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entries changed so new folders survive a crash."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue  # a concurrent writer made it; it fsyncs the parent itself
        fsync_dir(folder.parent)


def stat_etag(st: os.stat_result) -> str:
    """Stand-in etag where user xattrs are unsupported: changes whenever the content is replaced."""
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def read_etag(path: Path, st: os.stat_result) -> str:
    try:
        return os.getxattr(path, ETAG_XATTR).decode("ascii")
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return stat_etag(st)
        raise


def _store_etag(fd: int, etag: str) -> str:
    """Attach the etag to the file; return the etag `read_etag` will report for it."""
    try:
        os.setxattr(fd, ETAG_XATTR, etag.encode("ascii"))
        return etag
    except OSError as exc:
        if exc.errno in _NO_XATTR:
            return stat_etag(os.fstat(fd))
        raise


def write_atomic(dest: Path, fill: Callable[[int], str], *, make_parents: bool = True) -> str:
    """Create `dest` atomically with what `fill(fd)` writes; `fill` returns the content's etag.

    Returns the etag stored with the file (see `read_etag`).
    """
    for attempt in range(3):
        if make_parents:
            makedirs_durable(dest.parent)
        try:
            return files.write_atomic(dest, lambda fd: _store_etag(fd, fill(fd)), tmp_prefix=TMP_PREFIX)
        except FileNotFoundError:
            # A concurrent delete pruned the (then empty) folder between mkdir and open.
            if not make_parents or attempt == 2:
                raise
    raise AssertionError("unreachable")


def append_file(dst_fd: int, src: Path) -> None:
    """Append the whole of `src` to `dst_fd` in the kernel where possible (no user-space copy)."""
    with open(src, "rb") as f:
        remaining = os.fstat(f.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(f.fileno(), dst_fd, min(remaining, 1 << 30))
                if copied == 0:
                    break
                remaining -= copied
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        while remaining > 0:  # older kernels and exotic file systems: plain copy
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                raise OSError(errno.EIO, f"part {src.name} shrank while assembling")
            write_all(dst_fd, chunk)
            remaining -= len(chunk)


def prune_empty_dirs(folder: Path, root: Path) -> None:
    """Remove now-empty folders up to (not including) root, as S3 has no empty folders."""
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def object_info(key: str, path: Path, st: os.stat_result) -> ObjectInfo:
    mtime = datetime.fromtimestamp(st.st_mtime, tz=UTC)
    return ObjectInfo(key, st.st_size, read_etag(path, st), mtime)


def fill_from(body: Body, key: str = "", expected_md5: bytes | None = None) -> Callable[[int], str]:
    """Write the body; with `expected_md5`, refuse (before the rename makes it visible) a body
    that differs from what the caller hashed, as S3 refuses a bad Content-MD5."""

    def fill(fd: int) -> str:
        md5 = hashlib.md5()
        for chunk in iter_chunks(body):
            md5.update(chunk)
            write_all(fd, chunk)
        if expected_md5 is not None and md5.digest() != expected_md5:
            raise StorageError(
                "put", key, "BadDigest", "the body read differs from the bytes hashed", http_status=400, transient=False
            )
        return md5.hexdigest()

    return fill


def multipart_etag(parts: list[Part]) -> str:
    """S3's convention: md5 of the parts' binary md5s, then '-N'."""
    try:
        joined = b"".join(bytes.fromhex(p.etag) for p in parts)
    except ValueError:  # stat-derived etags (no xattrs): still stable and content-dependent
        joined = "".join(p.etag for p in parts).encode()
    return f"{hashlib.md5(joined).hexdigest()}-{len(parts)}"
