"""Keep the uploader off the trainer's critical path: lower its own CPU niceness and I/O priority, pin it.

ckptd only ever changes itself; the trainer is a separate process and keeps whatever priority it
was started with. On Linux niceness, I/O priority and CPU affinity are per-thread attributes
(whatever POSIX says), inherited by threads created later, so `apply` sets them on every thread that
exists when it runs and should run before any worker thread pool is started.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Collection
from typing import Any, TypeVar

# psutil carries the ioprio syscall numbers for every architecture it builds on (ppc64le, s390x, ...),
# so none are kept here.
import psutil

IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASSES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}
IO_PRIORITIES = {"best-effort": (2, 7), "idle": (3, 0), "normal": None}
# Failures that mean "not allowed or not available here": reported, never fatal.
_SOFT_ERRNOS = {errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS}
T = TypeVar("T")


def encode_ioprio(io_priority: str) -> int | None:
    """The ioprio value for a setting name; None for "normal" (leave unchanged).

    | io_priority   | class    | level | value |
    |---------------|----------|-------|-------|
    | "best-effort" | BE (2)   | 7     | 16391 |
    | "idle"        | IDLE (3) | 0     | 24576 |
    | "normal"      | -        | -     | None  |
    | anything else | ValueError                |
    """
    if io_priority not in IO_PRIORITIES:
        raise ValueError(f"io_priority must be one of {', '.join(IO_PRIORITIES)}, got {io_priority!r}")
    pair = IO_PRIORITIES[io_priority]
    return None if pair is None else pair[0] << IOPRIO_CLASS_SHIFT | pair[1]


def decode_ioprio(value: int) -> tuple[str, int]:
    """(class name, level) of an ioprio value, e.g. 16391 -> ("best-effort", 7), 0 -> ("none", 0)."""
    return IOPRIO_CLASSES.get(value >> IOPRIO_CLASS_SHIFT, "unknown"), value & ((1 << IOPRIO_CLASS_SHIFT) - 1)


def ioprio_lowers(current: int, wanted: int | None) -> bool:
    """Whether setting `wanted` lowers the I/O priority of a thread whose ioprio is `current`.

    Lower means a later class, or a higher level within best-effort. Class "none" (the default,
    derived from niceness) counts as normal. We only ever lower, like niceness, so a thread that
    someone already made idle stays idle.

    | current          | wanted        | lowers |
    |------------------|---------------|--------|
    | any              | None (normal) | False  |
    | none/0           | best-effort/7 | True   |
    | best-effort/4    | best-effort/7 | True   |
    | best-effort/7    | best-effort/7 | False  |
    | realtime/0       | best-effort/7 | True   |
    | idle             | best-effort/7 | False  |
    | best-effort/7    | idle          | True   |
    | idle             | idle          | False  |
    """
    return wanted is not None and _lowness(wanted) > _lowness(current)


def _lowness(value: int) -> tuple[int, int]:
    cls, level = value >> IOPRIO_CLASS_SHIFT, value & ((1 << IOPRIO_CLASS_SHIFT) - 1)
    rank = {1: 0, 0: 1, 2: 1, 3: 2}.get(cls, 1)
    return rank, (-1 if cls == 0 else level)


def nice_raises(current: int, wanted: int) -> bool:
    """Whether to set niceness `wanted` on a thread at `current`: only ever raise it.

    Unprivileged processes cannot lower niceness, and one already higher was chosen by someone.

    | current | wanted | set   |
    |---------|--------|-------|
    | 0       | 10     | True  |
    | 10      | 10     | False |
    | 15      | 10     | False |
    | -5      | 0      | True  |
    """
    return wanted > current


def check_cpus(cpus: tuple[int, ...] | None, universe: set[int]) -> set[int] | None:
    """The CPU set to pin to, or None for no pinning; ValueError for CPUs this process may not use.

    | cpus   | universe  | result               |
    |--------|-----------|----------------------|
    | None   | any       | None                 |
    | (0, 1) | {0, 1, 2} | {0, 1}               |
    | ()     | any       | ValueError (empty)   |
    | (0, 7) | {0, 1}    | ValueError (7)       |
    | (-1,)  | {0, 1}    | ValueError (-1)      |
    """
    if cpus is None:
        return None
    if not cpus:
        raise ValueError("cpu_affinity is empty: give at least one CPU, or none to leave affinity unchanged")
    unknown = sorted(set(cpus) - universe)
    if unknown:
        raise ValueError(
            f"cpu_affinity names CPUs {unknown} that this process cannot use (available: {_cpu_ranges(universe)})"
        )
    return set(cpus)


def apply(
    nice: int, io_priority: str, cpu_affinity: tuple[int, ...] | None, exempt: Collection[int] = ()
) -> dict[str, Any]:
    """Lower this process's CPU and I/O priority and pin it to CPUs, on every existing thread.

    Call it early, before the event loop starts worker threads (default executor, aiobotocore,
    watchdog): threads inherit these settings from their creator, and a thread that starts while
    `apply` walks /proc/self/task may be missed.

    Niceness and I/O priority are only ever lowered. Invalid settings (unknown io_priority, CPUs
    outside this process's affinity) raise ValueError before anything changes; failures of the
    system calls themselves (EPERM in a locked-down container, ENOSYS where seccomp or the kernel
    lacks ioprio) are returned under "warnings", never raised.
    """
    wanted_io = encode_ioprio(io_priority)
    cpus = check_cpus(cpu_affinity, os.sched_getaffinity(0))
    warnings: list[str] = []
    tids = [tid for tid in _thread_ids() if tid not in exempt]  # exempt: threads that must keep up
    for tid in tids:
        _soft(warnings, f"nice of thread {tid}", _set_nice, tid, nice)
        if wanted_io is not None:
            _soft(warnings, f"io priority of thread {tid}", _set_ioprio, tid, wanted_io)
        if cpus is not None:
            _soft(warnings, f"cpu affinity of thread {tid}", os.sched_setaffinity, tid, cpus)
    return {**current(), "threads": len(tids), "warnings": warnings}


def current(tid: int = 0) -> dict[str, Any]:
    """Niceness, I/O priority ("class/level", or an error text) and CPU affinity of a thread (0: this one)."""
    try:
        cls, level = decode_ioprio(ioprio_get(tid))
        io = f"{cls}/{level}"
    except OSError as e:
        io = f"unknown ({e.strerror})"
    return {
        "nice": os.getpriority(os.PRIO_PROCESS, tid),
        "io_priority": io,
        "cpu_affinity": sorted(os.sched_getaffinity(tid)),
    }


def ioprio_get(tid: int = 0) -> int:
    """The raw ioprio value of a thread (0: the calling thread); OSError if unavailable."""
    ioclass, level = _on_thread(tid, lambda thread: thread.ionice())
    return int(ioclass) << IOPRIO_CLASS_SHIFT | level


def ioprio_set(tid: int, value: int) -> None:
    """Set the raw ioprio value of one thread (0: the calling thread only, not its siblings)."""
    ioclass, level = value >> IOPRIO_CLASS_SHIFT, value & ((1 << IOPRIO_CLASS_SHIFT) - 1)
    _on_thread(tid, lambda thread: thread.ionice(ioclass, level))


def _on_thread(tid: int, call: Callable[[psutil.Process], T]) -> T:
    """`call(psutil.Process(tid))`, with psutil's errors turned back into the OSErrors callers expect.

    On Linux a thread id names that one thread to ioprio_get/ioprio_set, and psutil.Process accepts
    one even though psutil.pid_exists says False for it (psutil issue #687).
    """
    tid = tid or threading.get_native_id()
    try:
        return call(psutil.Process(tid))
    except psutil.AccessDenied as e:
        cause = e.__cause__ or e.__context__  # psutil 7 chains the OSError with "from", 5.9 implicitly
        if isinstance(cause, OSError) and cause.errno:
            raise OSError(cause.errno, cause.strerror) from e
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM)) from e
    except psutil.NoSuchProcess as e:
        if tid == threading.get_native_id():
            # The caller cannot have ended: psutil cannot see threads, as without /proc.
            raise OSError(errno.ENOSYS, "psutil cannot reach this thread (is /proc mounted?)") from e
        raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH)) from e


def _set_nice(tid: int, nice: int) -> None:
    # The standard library is enough here: PRIO_PROCESS with a thread id is per-thread on Linux, the
    # same call psutil's Process.nice makes.
    if nice_raises(os.getpriority(os.PRIO_PROCESS, tid), nice):
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def _set_ioprio(tid: int, value: int) -> None:
    if ioprio_lowers(ioprio_get(tid), value):
        ioprio_set(tid, value)


def _soft(warnings: list[str], what: str, call: Any, *args: Any) -> None:
    try:
        call(*args)
    except ProcessLookupError:
        pass  # the thread ended while we walked the list: nothing left to lower
    except OSError as e:
        if e.errno not in _SOFT_ERRNOS:
            raise
        warnings.append(f"could not set {what}: {e.strerror or e}")


def _thread_ids() -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir("/proc/self/task"))
    except FileNotFoundError:
        return [0]  # no /proc mounted: the calling thread is all we can reach


def _cpu_ranges(cpus: set[int]) -> str:
    ranges: list[tuple[int, int]] = []
    for cpu in sorted(cpus):
        if ranges and ranges[-1][1] == cpu - 1:
            ranges[-1] = (ranges[-1][0], cpu)
        else:
            ranges.append((cpu, cpu))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
