"""Pinning: hold a completed file's content so the trainer may delete it the next moment.

Checkpoint rotation (`save_total_limit`) deletes a folder about a hundred milliseconds after the
next save. A hard link into a private staging folder on the same file system costs nothing,
survives the deletion and even a crash of ckptd; where links are impossible (another file
system, a policy) an open descriptor keeps the unlinked inode readable instead.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass

from daemon.upload.complete import Identity


@dataclass
class Pin:
    relpath: str
    identity: Identity
    stage: str | None  # name of the hard link in the staging folder, if there is one
    fd: int | None  # an open descriptor, when no link could be made
    staging: str

    def open(self) -> int:
        """A fresh read-only descriptor of the pinned content (caller closes it)."""
        if self.fd is not None:
            return os.dup(self.fd)
        return os.open(os.path.join(self.staging, self.stage), os.O_RDONLY | os.O_CLOEXEC)

    def current(self) -> Identity:
        """The pinned inode's identity now (an in-place rewrite changes it)."""
        if self.fd is not None:
            return Identity.of(os.fstat(self.fd))
        return Identity.stat(os.path.join(self.staging, self.stage)) or self.identity

    def release(self) -> bool:
        """Let go; True when this removed the staging link (no other Pin holds it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.stage is None:
            return False
        link = os.path.join(self.staging, self.stage)
        self.stage = None
        if not _holders.drop(link):
            return False
        try:
            os.unlink(link)
        except FileNotFoundError:
            pass
        return True


class _Holders:
    """How many Pins share each staging link. One file version noticed twice (an event and a
    scan, a poll) gets one link and two Pins; the link goes only when the last one lets go."""

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._lock = threading.Lock()  # pins are taken on the detector's thread too

    def add(self, link: str) -> None:
        with self._lock:
            self._count[link] = self._count.get(link, 0) + 1

    def drop(self, link: str) -> bool:
        """True when nobody holds the link any more."""
        with self._lock:
            left = self._count.get(link, 1) - 1
            if left > 0:
                self._count[link] = left
                return False
            self._count.pop(link, None)
            return True


_holders = _Holders()


def pin(path: str, relpath: str, staging: str) -> Pin | None:
    """Pin the file now at `path`; None if it vanished or is not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink: not ours to follow out of the folder
            return None
        raise
    try:
        st = os.fstat(fd)
        identity = Identity.of(st)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        stage = f"{identity.ino}-{identity.mtime_ns}-{identity.size}"
        if _link(path, os.path.join(staging, stage), identity):
            os.close(fd)
            _holders.add(os.path.join(staging, stage))
            return Pin(relpath, identity, stage, None, staging)
        return Pin(relpath, identity, None, fd, staging)
    except BaseException:
        os.close(fd)
        raise


def adopt(relpath: str, stage: str, staging: str) -> Pin | None:
    """Take over a pin left in the staging folder by an earlier run."""
    identity = Identity.stat(os.path.join(staging, stage))
    if identity is None:
        return None
    _holders.add(os.path.join(staging, stage))
    return Pin(relpath, identity, stage, None, staging)


def _link(path: str, target: str, identity: Identity) -> bool:
    """Hard-link `path` to `target` and check the link is the inode we opened."""
    created = True
    try:
        os.link(path, target, follow_symlinks=False)
    except FileExistsError:
        created = False  # the same inode version pinned before (an earlier run, a repeated event)
    except OSError:
        return False  # EXDEV, EPERM, EMLINK, or the path vanished between open and link
    linked = Identity.stat(target)
    if linked is not None and (linked.dev, linked.ino) == (identity.dev, identity.ino):
        return True
    if created:  # the path was replaced between open and link: this link is another inode
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
    return False
