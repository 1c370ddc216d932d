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
    staging: Staging | None = None  # holds the link; None without one

    def open(self) -> int:
        """A fresh read-only descriptor of the pinned content (caller closes it)."""
        if self.fd is not None:
            return os.dup(self.fd)
        assert self.staging is not None and self.stage is not None
        return os.open(self.staging.path(self.stage), os.O_RDONLY | os.O_CLOEXEC)

    def current(self) -> Identity:
        """The pinned inode's identity now (an in-place rewrite changes it)."""
        if self.fd is not None:
            return Identity.of(os.fstat(self.fd))
        assert self.staging is not None and self.stage is not None
        return Identity.stat(self.staging.path(self.stage)) or self.identity

    def release(self) -> bool:
        """Let go; True when this removed the staging link (no other Pin holds it)."""
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

    def path(self, stage: str) -> str:
        return os.path.join(self.folder, stage)

    def names(self) -> list[str]:
        return os.listdir(self.folder)

    def pin(self, path: str, relpath: str) -> Pin | None:
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
            if _link(path, self.path(stage), identity):
                os.close(fd)
                self._hold(stage)
                return Pin(relpath, identity, stage, None, self)
            return Pin(relpath, identity, None, fd)
        except BaseException:
            os.close(fd)
            raise

    def adopt(self, relpath: str, stage: str) -> Pin | None:
        """Take over a pin left in the staging folder by an earlier run."""
        identity = Identity.stat(self.path(stage))
        if identity is None:
            return None
        self._hold(stage)
        return Pin(relpath, identity, stage, None, self)

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
