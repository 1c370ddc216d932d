"""Pinning: hold a completed file's content so the trainer may delete it the next moment.

Checkpoint rotation (`save_total_limit`) deletes a folder about a hundred milliseconds after the
next save. A hard link into a private staging folder on the same file system costs nothing,
survives the deletion and even a crash of ckptd. The file is opened by a walk from the checkpoint
root that follows no link (scan.open_file), and the link is made from that very descriptor, so
what is staged is what was opened, never what a path resolves to a moment later.

Where links are impossible (a subfolder on another file system, a policy), a small file is copied
into staging instead, which is journaled like a link; a larger one is held by an open descriptor,
which keeps the unlinked inode readable but does not survive a crash (the start-up scan finds the
file again if it is still there).
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

import structlog

from daemon import metrics
from daemon.upload import scan
from daemon.upload.complete import Identity

log = structlog.get_logger()

COPY_LIMIT = 64 << 20  # bytes: files up to this size are copied into staging when links fail
_CHUNK = 1 << 20
COPY_PREFIX = "c"  # stage names of copies: c{dev}-{ino}-{mtime_ns}-{size}; links: {ino}-{mtime_ns}-{size}
_TEMP_PREFIX = ".copy-"


@dataclass
class Pin:
    relpath: str
    identity: Identity  # the original file's, also for a copy
    stage: str | None  # name of the link or copy in the staging folder, if there is one
    fd: int | None  # an open descriptor, when neither a link nor a copy could be made
    staging: Staging | None = None  # holds the stage; None without one
    copied: Identity | None = None  # the staged copy's own identity, for a copy

    def open(self) -> int:
        """A fresh read-only descriptor of the pinned content (caller closes it)."""
        if self.fd is not None:
            return os.dup(self.fd)
        assert self.staging is not None and self.stage is not None
        return os.open(self.staging.path(self.stage), os.O_RDONLY | os.O_CLOEXEC)

    def current(self) -> Identity:
        """The pinned inode's identity now (an in-place rewrite changes it). A copy is our own,
        and answers with the original's identity as long as it is intact."""
        if self.fd is not None:
            return Identity.of(os.fstat(self.fd))
        assert self.staging is not None and self.stage is not None
        now = Identity.stat(self.staging.path(self.stage))
        if now is None or now == self.copied:
            return self.identity
        return now

    def identity_of(self, fd: int) -> Identity:
        """The identity of what `fd` (from open()) holds, in the original's terms: for comparing
        with `identity` after reading (a copy is another inode, with its own dev and ino)."""
        now = Identity.of(os.fstat(fd))
        return self.identity if self.copied is not None and now == self.copied else now

    def release(self) -> bool:
        """Let go; True when this removed the staged file (no other Pin holds it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        stage, self.stage = self.stage, None
        return stage is not None and self.staging is not None and self.staging.drop(stage)


class Staging:
    """The staging folder and how many Pins hold each of its links.

    One file version noticed twice (an event and a scan, a poll) gets one link and two Pins; the
    link goes only when the last one lets go. Pins are taken on the detector's threads too.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()
        self._told: set[tuple[int, str]] = set()  # (device, how) of fallbacks already logged

    def path(self, stage: str) -> str:
        return os.path.join(self.folder, stage)

    def names(self) -> list[str]:
        return os.listdir(self.folder)

    def pin(self, path: str, relpath: str, *, root: str | None = None) -> Pin | None:
        """Pin the file at `path`, which is root/relpath (root: path less relpath, unless given):
        no link below root is followed, and nothing but a regular file is opened. None if it is
        gone, is not a regular file (a link, a FIFO: scan.probe says which), or changed while being
        copied. Raises OSError for errors of this one file (EACCES, EIO)."""
        opened = scan.open_file(root if root is not None else _root_of(path, relpath), relpath)
        if isinstance(opened, scan.Found):
            return None
        fd, st = opened
        kept = False
        try:
            identity = Identity.of(st)
            stage = f"{identity.ino}-{identity.mtime_ns}-{identity.size}"
            failed = _link(fd, self.path(stage), identity)
            if failed is None:
                self._hold(stage)
                return Pin(relpath, identity, stage, None, self)
            if identity.size <= COPY_LIMIT:
                try:
                    return self._copy(fd, identity, relpath, failed)
                except OSError as e:  # staging is full too, say: the descriptor still keeps the file
                    log.warning("cannot copy into staging", path=relpath, op="copy", errno=_name(e), error=e.strerror)
            self._fell_back(identity.dev, "descriptor", relpath, failed)
            kept = True
            return Pin(relpath, identity, None, fd)
        finally:
            if not kept:
                os.close(fd)

    def adopt(self, relpath: str, stage: str) -> Pin | None:
        """Take over a pin left in the staging folder by an earlier run (a link or a copy)."""
        staged = Identity.stat(self.path(stage))
        if staged is None:
            return None
        original = _copy_of(stage)
        if original is not None and original.size != staged.size:
            return None  # not a copy we finished: copies get their name only once complete
        self._hold(stage)
        if original is None:
            return Pin(relpath, staged, stage, None, self)
        return Pin(relpath, original, stage, None, self, copied=staged)

    def _copy(self, fd: int, identity: Identity, relpath: str, why: OSError) -> Pin | None:
        """Copy into staging under the copy's stage name; None if the source changed meanwhile.
        Raises OSError if the copy could not be made."""
        stage = f"{COPY_PREFIX}{identity.dev}-{identity.ino}-{identity.mtime_ns}-{identity.size}"
        made = _copy_file(fd, identity, self.path(stage), self.folder)
        if made is None:
            log.info("file changed while being copied into staging; copy discarded", path=relpath)
            return None
        self._fell_back(identity.dev, "copied", relpath, why)
        self._hold(stage)
        return Pin(relpath, identity, stage, None, self, copied=made)

    def _fell_back(self, dev: int, how: str, relpath: str, why: OSError) -> None:
        metrics.PIN_FALLBACKS.labels(how=how).inc()
        with self._lock:
            first = (dev, how) not in self._told
            self._told.add((dev, how))
        if first:  # once per file system: every file there falls back the same way
            log.warning(
                "cannot hard-link into staging; small files are copied there instead"
                if how == "copied"
                else "cannot hard-link or copy into staging; the file is held open instead, which a crash "
                "of ckptd loses (the start-up scan finds it again only if it is still there)",
                path=relpath,
                how=how,
                copy_limit_bytes=COPY_LIMIT,
                errno=_name(why),
                error=why.strerror,
            )

    def _hold(self, stage: str) -> None:
        with self._lock:
            self._count[stage] = self._count.get(stage, 0) + 1

    def drop(self, stage: str) -> bool:
        """One holder lets go; the last one removes the link (True)."""
        with self._lock:
            left = self._count.get(stage, 1) - 1
            if left > 0:
                self._count[stage] = left
                return False
            self._count.pop(stage, None)
        try:
            os.unlink(self.path(stage))
        except FileNotFoundError:
            pass
        return True


def _root_of(path: str, relpath: str) -> str:
    suffix = os.sep + relpath.replace("/", os.sep)
    if not path.endswith(suffix):
        raise ValueError(f"{path!r} does not end with {relpath!r}")
    return path[: -len(suffix)] or os.sep


def _link(fd: int, target: str, identity: Identity) -> OSError | None:
    """Hard-link the opened file to `target` (through /proc/self/fd, so the very inode opened, not
    whatever its path names now) and check the link is that inode; the error if it could not be."""
    created = True
    try:
        folder = os.open(os.path.dirname(target), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # with a dir_fd, os.link calls linkat(AT_SYMLINK_FOLLOW), which follows the magic link
            os.link(f"/proc/self/fd/{fd}", os.path.basename(target), dst_dir_fd=folder)
        finally:
            os.close(folder)
    except FileExistsError:
        created = False  # the same inode version pinned before (an earlier run, a repeated event)
    except OSError as e:
        return e  # EXDEV, EPERM, EMLINK, ENOSPC, or ENOENT: deleted since we opened it
    linked = Identity.stat(target)
    if linked is not None and (linked.dev, linked.ino) == (identity.dev, identity.ino):
        return None
    if created:  # cannot happen with a link made from the descriptor; never keep a wrong one
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
    return OSError(0, "staging link is another inode")


def _copy_file(fd: int, identity: Identity, target: str, folder: str) -> Identity | None:
    """Copy the opened file to target atomically (temp, fsync, link into place, fsync the folder);
    the staged copy's identity, or None if the source changed while it was copied."""
    temp = os.path.join(folder, f"{_TEMP_PREFIX}{os.getpid()}-{threading.get_native_id()}")
    out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            if not _copy_bytes(fd, out, identity.size) or Identity.of(os.fstat(fd)) != identity:
                return None
            os.fsync(out)
            made = Identity.of(os.fstat(out))
        finally:
            os.close(out)
        _link_in_place(temp, target)
    finally:
        os.unlink(temp)
    staged = Identity.stat(target)  # ours, or the same version copied by another holder
    return staged if staged is not None and staged.size == made.size else None


def _copy_bytes(src: int, dst: int, size: int) -> bool:
    """Copy the first `size` bytes; False if the source is shorter now."""
    offset = 0
    while offset < size:
        chunk = os.pread(src, min(_CHUNK, size - offset), offset)
        if not chunk:
            return False
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        offset += len(chunk)
    return True


def _link_in_place(temp: str, target: str) -> None:
    """Give the finished copy its stage name; an existing one is the same version, complete."""
    try:
        os.link(temp, target)
    except FileExistsError:
        return
    dfd = os.open(os.path.dirname(target), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _copy_of(stage: str) -> Identity | None:
    """The original's identity from a copy's stage name; None for a link's name."""
    if not stage.startswith(COPY_PREFIX):
        return None
    try:
        dev, ino, mtime_ns, size = (int(x) for x in stage[len(COPY_PREFIX) :].split("-"))
    except ValueError:
        return None
    return Identity(dev, ino, size, mtime_ns)


def _name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, type(e).__name__)
