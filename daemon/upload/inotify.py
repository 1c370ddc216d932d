"""watchdog's observers, made safe for the detector.

The inotify one reports the limits it hits: watchdog swallows a failed watch for every folder but
the root, so a tree bigger than the kernel's limits would be watched partially without a word;
this one reports each limit hit, so the detector can fall back to polling the whole tree
(FIELD-NOTES §1). The polling one lstats: watchdog's own stats, and so walks into a linked folder
(a link to /etc is read, a loop forty levels deep, FIELD-NOTES §7).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask, WatchCallback, WatchDescriptor
from watchdog.observers.polling import PollingObserverVFS

LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE)  # watch limit, instance limit


class _LimitAwareFD(InotifyFD):
    """An inotify instance that reports watch-limit failures: watchdog swallows them for every folder
    but the root, so a tree bigger than the limit would be watched partially without a word."""

    def __init__(self, on_limit: Callable[[OSError, str], None]) -> None:
        super().__init__()  # inotify_init: EMFILE here when the instance limit is reached
        self._on_limit = on_limit

    def add_callback(self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId) -> WatchDescriptor:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as e:
            if e.errno in LIMIT_ERRNOS:
                self._on_limit(e, os.fsdecode(path))
            raise  # keep watchdog's own handling: fatal for the root, skipped for subdirectories


class LimitAwareObserver(BaseObserver):
    """watchdog's InotifyObserver, built on the limit-aware inotify instance."""

    def __init__(self, on_limit: Callable[[OSError, str], None]) -> None:
        self._fd = _LimitAwareFD(on_limit)
        self._fd.start()
        super().__init__(InotifyEmitter, inotify_fd=self._fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._fd.stop()
        self._fd.join()


def no_follow_poller(root: str, interval: float) -> BaseObserver:
    """watchdog's poller with lstat: a linked folder is an entry like a file, never entered. Only
    the root is stat'ed: it is the configured folder, and may itself be a link."""

    def lstat(path: str) -> os.stat_result:
        return os.stat(path, follow_symlinks=path == root)

    return PollingObserverVFS(lstat, os.scandir, polling_interval=interval)


def halt(observer: BaseObserver | None) -> None:
    """Stop an observer and join it (blocking: the detector calls this from a thread it can leave)."""
    if observer is not None:
        observer.stop()
        with contextlib.suppress(RuntimeError):  # never started
            observer.join()
