"""Detection: turn file-system activity in the checkpoint folder into "maybe complete" hints.

inotify is a latency hint, never the source of truth (SPEC §5): the engine also calls scan() at
start, periodically and at drain, so a hint lost here costs latency, not data. Hints are
`on_path(abs_path, closed)`, always called on the event loop's thread; `closed` means the file was
closed after writing or renamed into place, not merely seen. If the inotify limits are too low for
the tree, the detector falls back to polling rather than watch part of it (FIELD-NOTES §1).

No mode follows a link: polling lstats (watchdog's own poller stats, and walks into a linked
folder, FIELD-NOTES §7), and links, FIFOs and the like are hinted like files, so that the settler
says once that they are skipped. stop() is bounded: a thread stuck in a system call is reported
and left behind, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from daemon.upload.complete import files_open_for_write
from daemon.upload.inotify import LIMIT_ERRNOS, LimitAwareObserver, halt, no_follow_poller
from daemon.upload.scan import SkipDir, needs_polling, walk

log = structlog.get_logger()

STOP_WAIT = 5.0  # seconds stop() waits for the watcher threads before leaving them behind

# watchdog re-adds the watch of a folder made with its parent (makedirs a/b) and warns; harmless.
warnings.filterwarnings("ignore", "Callback with id .* already exists", RuntimeWarning, __name__)


class _Handler(FileSystemEventHandler):
    """Runs on the observer thread: an exception escaping here would end the observer silently."""

    def __init__(self, on_event: Callable[[FileSystemEvent], None]) -> None:
        self._on_event = on_event

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("detect handler failed", fs_event=repr(event))


class Detector:
    """Recursive watch of `root` that hands "maybe complete" hints to the event loop."""

    def __init__(
        self,
        root: str,
        loop: asyncio.AbstractEventLoop,
        on_path: Callable[[str, bool], None],
        *,
        mode: str = "auto",
        poll_interval: float = 1.0,
        skip_dir: SkipDir = lambda relpath: False,
        pin: Callable[[str], object] | None = None,
    ) -> None:
        if mode not in ("auto", "inotify", "poll"):
            raise ValueError(f"mode must be auto, inotify or poll, not {mode!r}")
        self._root = os.path.abspath(root)
        self._loop, self._on_path, self._skip_dir, self._poll_interval = loop, on_path, skip_dir, poll_interval
        # With `pin`, closed files are pinned right here on the detector's thread and on_path gets
        # the pin as a third argument.
        self._pin = pin
        self._threads: set[int] = set()
        self._requested = self._mode = mode
        self._reason: str | None = None
        self._observer: BaseObserver | None = None
        self._switch = threading.Lock()  # held while observers start or stop
        self._state = threading.Lock()  # held for flag updates only: inotify threads take it
        self._started = self._stopped = False
        self._limit_hit: str | None = None
        self._fallback: threading.Thread | None = None
        self._stopper: threading.Thread | None = None
        self._observers: list[BaseObserver] = []  # every one started, for naming stuck threads

    @property
    def mode(self) -> str:
        """ "inotify" or "poll" once started (the requested mode before)."""
        return self._mode

    @property
    def degraded_reason(self) -> str | None:
        return self._reason

    def start(self) -> None:
        before = _task_ids()
        self._start()
        # Every thread this start created (observer, emitter, inotify reader), for thread_ids().
        self._threads = _task_ids() - before

    def _start(self) -> None:
        with self._switch:
            if self._started or self._stopped:
                raise RuntimeError("a Detector starts once")
            os.makedirs(self._root, exist_ok=True)
            mode = self._requested
            fs = needs_polling(self._root) if mode == "auto" else None
            if fs:
                self._reason = f"{fs} file system: inotify cannot see other machines' writes"
            mode = ("poll" if fs else "inotify") if mode == "auto" else mode
            if mode == "inotify":
                self._observer = self._start_inotify()
            with self._state:
                self._started = True
                hit = self._limit_hit
            if mode == "poll" or hit:
                halt(self._observer)
                self._reason = self._reason or hit
                self._observer = self._start_observer(poll=True)
                mode = "poll"
            self._mode = mode
        log.info("detector started", root=self._root, mode=self._mode, degraded_reason=self._reason)

    def stop(self, timeout: float = STOP_WAIT) -> bool:
        """Stop watching and join the watcher threads, waiting at most `timeout` seconds: a thread
        stuck in a system call (a hung network file system) is logged and left behind (they are
        daemon threads). Hints still queued on the loop are dropped. True if every thread ended.
        Idempotent. Not from an observer thread (it joins them)."""
        with self._state:
            self._stopped = True
            if self._stopper is None:  # watchdog's stop() takes a lock its dispatch thread may hold
                self._stopper = threading.Thread(target=self._halt_all, name="ckptd-detector-stop", daemon=True)
                self._stopper.start()
            stopper = self._stopper
        stopper.join(timeout)
        if not stopper.is_alive():
            return True
        log.error("detector threads did not stop; left behind", threads=self._alive(), waited_seconds=timeout)
        return False

    def _halt_all(self) -> None:
        with self._switch:
            halt(self._observer)
            self._observer = None
        with self._state:
            fallback = self._fallback
        if fallback is not None:
            fallback.join()

    def _alive(self) -> list[str]:
        threads: list[threading.Thread] = [t for t in (self._fallback, self._stopper) if t is not None]
        for observer in self._observers:
            threads.append(observer)
            with contextlib.suppress(RuntimeError):  # the stopper may be clearing the set right now
                threads += list(observer.emitters)
        return sorted({t.name for t in threads if t.is_alive()})

    def _start_inotify(self) -> BaseObserver | None:
        try:
            return self._start_observer(poll=False)
        except OSError as e:
            if e.errno not in LIMIT_ERRNOS:
                raise
            self._on_limit(e, self._root)  # inotify_init or the root's own watch failed
            return None

    def _start_observer(self, *, poll: bool) -> BaseObserver:
        observer = no_follow_poller(self._root, self._poll_interval) if poll else LimitAwareObserver(self._on_limit)
        self._observers.append(observer)
        observer.schedule(_Handler(lambda event: self._emit(self._hints(event, poll=poll))), self._root, recursive=True)
        try:
            observer.start()  # the polling one takes its first snapshot before returning
        except BaseException:
            halt(observer)  # closes the inotify instance too
            raise
        return observer

    def _on_limit(self, e: OSError, path: str) -> None:
        """Any thread, possibly inside watchdog's locks: record, and switch to polling elsewhere."""
        code = errno.errorcode.get(e.errno or 0, str(e.errno))
        fallback = None
        with self._state:
            first = self._limit_hit is None
            if first:
                self._limit_hit = f"inotify limit reached ({code}: {e.strerror})"
            if first and self._started and not self._stopped:  # at start, start() itself falls back
                fallback = self._fallback = threading.Thread(target=self._fall_back, daemon=True)
        if first:
            log.warning(
                "inotify limit reached, falling back to polling",
                path=path,
                error=str(e),
                hint="raise fs.inotify.max_user_watches / max_user_instances",
            )
        if fallback is not None:
            fallback.start()

    def _fall_back(self) -> None:
        """A new subdirectory could not be watched: poll the whole tree from now on."""
        with self._switch:
            if self._stopped or self._mode == "poll":
                return
            old = self._observer
            try:
                self._observer = self._start_observer(poll=True)  # its snapshot + the rescan below: no gap
            except Exception:
                log.exception("cannot start polling; staying on a partial inotify watch")
                return
            self._mode, self._reason = "poll", self._limit_hit
            halt(old)
        log.warning("detector switched to polling", root=self._root, reason=self._reason)
        # Events inotify had not delivered yet are gone, and the first snapshot already holds their
        # files, so polling will not report them either: hint the whole tree once.
        self._emit(self._walk(self._root, closed=False))

    def _hints(self, event: FileSystemEvent, *, poll: bool) -> Iterable[tuple[str, bool]]:
        kind = event.event_type
        src = os.fsdecode(event.src_path)
        dest = os.fsdecode(event.dest_path) if kind == EVENT_TYPE_MOVED else ""
        if event.is_directory:
            if kind in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED) and os.path.islink(dest or src):
                return self._file(dest or src, closed=False)  # watchdog calls a linked folder a folder
            if kind == EVENT_TYPE_CREATED:  # watched by now: catch files written before the watch
                return self._walk_created(src)
            if kind == EVENT_TYPE_MOVED:  # e.g. tmp-checkpoint-N renamed to checkpoint-N
                return self._walk_new(dest, closed=True)
            return ()
        if kind == EVENT_TYPE_CLOSED:
            return self._file(src, closed=True)
        if kind == EVENT_TYPE_MOVED:
            return self._file(dest, closed=True)
        if kind == EVENT_TYPE_CREATED or (kind == EVENT_TYPE_MODIFIED and poll):  # polling never sees a close
            return self._file(src, closed=False)
        return ()

    def _file(self, path: str, *, closed: bool) -> Iterable[tuple[str, bool]]:
        return () if self._ignored(os.path.dirname(path)) else ((path, closed),)

    def _walk_created(self, folder: str) -> Iterable[tuple[str, bool]]:
        """Files written into a new folder before its watch existed: their close events are lost.
        Those no visible process holds open for writing count as closed, so they are pinned
        now: Hugging Face writes config.json first, and rotation may delete the folder soon."""
        writers = files_open_for_write() if self._pin else None
        for path, _ in self._walk_new(folder, closed=False):
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            regular = stat.S_ISREG(st.st_mode)
            yield path, regular and writers is not None and (st.st_dev, st.st_ino) not in writers

    def _walk_new(self, folder: str, *, closed: bool) -> Iterable[tuple[str, bool]]:
        return () if self._ignored(folder) else self._walk(folder, closed=closed)

    def _walk(self, top: str, *, closed: bool) -> Iterator[tuple[str, bool]]:
        """Files under top as hints; links, FIFOs and the like too, never closed (never pinned)."""
        others: list[str] = []
        for path in walk(self._root, top, self._skip_dir, others.append):
            yield path, closed
            yield from ((o, False) for o in others)
            others.clear()
        yield from ((o, False) for o in others)

    def _ignored(self, folder: str) -> bool:
        """Whether folder is outside the root, or is or lies in a folder that skip_dir excludes."""
        if folder == self._root:
            return False
        if not folder.startswith(self._root + os.sep):
            return True
        parts = os.path.relpath(folder, self._root).split(os.sep)
        return any(self._skip_dir(os.sep.join(parts[: i + 1])) for i in range(len(parts)))

    def _emit(self, hints: Iterable[tuple[str, bool]]) -> None:
        for path, closed in hints:
            if self._stopped:  # a long walk must not hold stop() up
                return
            early = self._pin_now(path) if closed and self._pin else None
            try:
                self._loop.call_soon_threadsafe(self._deliver, path, closed, early)
            except RuntimeError:  # the loop is closed: nobody is left to take hints
                return

    def _pin_now(self, path: str) -> object | None:
        try:
            return self._pin(path)
        except OSError as e:
            log.warning("early pin failed", path=path, error=str(e))
            return None

    def _deliver(self, path: str, closed: bool, early: object | None) -> None:
        if self._stopped:
            return
        if self._pin is not None:
            self._on_path(path, closed, early)
        else:
            self._on_path(path, closed)

    def thread_ids(self) -> set[int]:
        """Native ids of the threads that read events and pin, which must keep normal priority
        (threads they start later, such as a switch to polling, inherit it)."""
        return set(self._threads)


def _task_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}
