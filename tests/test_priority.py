"""Uploader priority: `apply` runs in a real child process (this test process keeps its priority),
and every setting is read back from outside, per thread, next to a sibling "trainer" that must not change."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from daemon import priority

KIND = "integration"  # the per-thread effects are checked in child processes

REPO = Path(__file__).resolve().parent.parent
ALL_CPUS = sorted(os.sched_getaffinity(0))
ONE_CPU = ALL_CPUS[-1]

# The child starts a thread before `apply` (must be reached through /proc/self/task) and one after
# (must inherit), and one exempt thread if asked; reports their thread ids, and waits for stdin to close.
# Refusals are injected where psutil hands them over: AccessDenied as psutil 7 ("chained", from the
# kernel's PermissionError) or 5.9 ("implicit", raised inside the except) raises it, or a bare OSError
# (ENOSYS under a seccomp filter or on a kernel without ioprio).
CHILD = """
import errno, json, os, sys, threading
import psutil
from daemon import priority
args = json.loads(sys.argv[1])
if args.get("pre_nice"):
    os.setpriority(os.PRIO_PROCESS, 0, args["pre_nice"])
if args.get("pre_io"):
    priority.ioprio_set(0, priority.encode_ioprio(args["pre_io"]))
ionice = psutil.Process.ionice
def refuse(self, ioclass=None, value=None):
    if args.get("deny") == "chained" and ioclass is not None:
        raise psutil.AccessDenied(self.pid) from PermissionError(errno.EPERM, "Operation not permitted")
    if args.get("deny") == "implicit" and ioclass is not None:
        try:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        except PermissionError:
            raise psutil.AccessDenied(self.pid)
    if args.get("no_syscall"):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    return ionice(self, ioclass, value)
psutil.Process.ionice = refuse
if args.get("deny"):
    def deny(*_):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    os.sched_setaffinity = deny
stop = threading.Event()
before = threading.Thread(target=stop.wait)
before.start()
exempt = []
if args.get("exempt"):
    keep = threading.Thread(target=stop.wait)
    keep.start()
    exempt = [keep.native_id]
result = priority.apply(*args["apply"], exempt=exempt)
after = threading.Thread(target=stop.wait)
after.start()
tids = [threading.get_native_id(), before.native_id, after.native_id]
print(json.dumps({"result": result, "tids": tids, "exempt": exempt}), flush=True)
sys.stdin.read()
stop.set()
"""


def read_line(proc: subprocess.Popen[str], deadline_s: float = 30.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], deadline_s)
    assert ready, f"child printed nothing within {deadline_s}s"
    assert proc.stdout is not None
    return proc.stdout.readline()


@contextlib.contextmanager
def child(code: str, *argv: str) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


@contextlib.contextmanager
def uploader(*apply_args: Any, **options: Any) -> Iterator[dict[str, Any]]:
    """A child that ran `priority.apply(*apply_args)`; yields its report while it is still alive."""
    with child(CHILD, json.dumps({"apply": apply_args, **options})) as proc:
        line = read_line(proc)
        assert line, f"child failed: exit {proc.wait(timeout=30)}"
        report = json.loads(line)
        report["pid"] = proc.pid
        yield report


@pytest.fixture
def trainer() -> Iterator[int]:
    """A sibling process started before the uploader de-prioritises itself."""
    with child("import sys; print('up', flush=True); sys.stdin.read()") as proc:
        assert read_line(proc) == "up\n"
        yield proc.pid


def nice_from_proc(pid: int, tid: int) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    # Field 19 is nice; fields are counted after the command name, which may hold spaces or parens.
    return int(stat.rsplit(")", 1)[1].split()[16])


def ioprio_from_psutil(tid: int) -> str:
    """A thread's I/O priority read with psutil directly, not through the module under test."""
    ioclass, level = psutil.Process(tid).ionice()
    return f"{priority.IOPRIO_CLASSES[int(ioclass)]}/{level}"


def outside_view(pid: int, tid: int) -> tuple[int, str, list[int]]:
    return nice_from_proc(pid, tid), ioprio_from_psutil(tid), sorted(os.sched_getaffinity(tid))


@contextlib.contextmanager
def spare_thread() -> Iterator[int]:
    """A thread of this test process that ends afterwards, taking whatever was set on it along."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert thread.native_id is not None
        yield thread.native_id
    finally:
        stop.set()
        thread.join()


def test_apply_lowers_every_thread_and_leaves_the_trainer_alone(trainer: int):
    trainer_before = outside_view(trainer, trainer)
    us_before = priority.current()
    with uploader(10, "best-effort", [ONE_CPU]) as report:
        for tid in report["tids"]:
            assert outside_view(report["pid"], tid) == (10, "best-effort/7", [ONE_CPU]), f"thread {tid}"
        assert report["result"]["warnings"] == []
        assert report["result"]["threads"] >= 2
        assert outside_view(trainer, trainer) == trainer_before
    assert trainer_before[0] == 0
    assert priority.current() == us_before


# pre-existing state | apply(nice, io, cpus) | what every thread ends with
CASES = [
    ({}, (10, "best-effort", [ONE_CPU]), (10, "best-effort/7", [ONE_CPU])),
    ({}, (5, "idle", None), (5, "idle/0", ALL_CPUS)),
    ({}, (0, "normal", None), (0, "none/0", ALL_CPUS)),
    ({"pre_nice": 15}, (10, "best-effort", None), (15, "best-effort/7", ALL_CPUS)),
    ({"pre_io": "idle"}, (10, "best-effort", None), (10, "idle/0", ALL_CPUS)),
    ({"pre_io": "best-effort"}, (0, "idle", None), (0, "idle/0", ALL_CPUS)),
]


@pytest.mark.parametrize(("pre", "args", "expected"), CASES)
def test_apply_only_ever_lowers(trainer: int, pre: dict[str, Any], args: tuple[Any, ...], expected: tuple[Any, ...]):
    trainer_before = outside_view(trainer, trainer)
    with uploader(*args, **pre) as report:
        for tid in report["tids"]:
            assert outside_view(report["pid"], tid) == expected, f"thread {tid}"
        result = report["result"]
        assert (result["nice"], result["io_priority"], result["cpu_affinity"]) == expected
        assert outside_view(trainer, trainer) == trainer_before


def test_exempt_threads_keep_their_priority():
    with uploader(10, "idle", [ONE_CPU], exempt=True) as report:
        (keep,) = report["exempt"]
        assert outside_view(report["pid"], keep) == (0, "none/0", ALL_CPUS)
        for tid in report["tids"]:
            assert outside_view(report["pid"], tid) == (10, "idle/0", [ONE_CPU]), f"thread {tid}"
        assert keep not in report["tids"]


@pytest.mark.parametrize("deny", ["chained", "implicit"])
def test_refused_system_calls_are_warnings_not_errors(deny: str):
    with uploader(10, "best-effort", [ONE_CPU], deny=deny) as report:
        warnings = report["result"]["warnings"]
        assert any("io priority" in w and "not permitted" in w for w in warnings), warnings
        assert any("cpu affinity" in w for w in warnings), warnings
        assert report["result"]["nice"] == 10
        for tid in report["tids"]:
            assert outside_view(report["pid"], tid) == (10, "none/0", ALL_CPUS), f"thread {tid}"


def test_missing_ioprio_syscall_is_a_warning():
    with uploader(10, "idle", None, no_syscall=True) as report:
        assert any("io priority" in w and "not implemented" in w for w in report["result"]["warnings"])
        assert report["result"]["io_priority"].startswith("unknown")
        assert nice_from_proc(report["pid"], report["pid"]) == 10


def test_ioprio_set_and_get_act_on_one_thread_only():
    # Done in this process: only spare threads change, and they end with the test.
    me = threading.get_native_id()
    mine = priority.ioprio_get(me)
    with spare_thread() as a, spare_thread() as b:
        priority.ioprio_set(a, priority.encode_ioprio("idle"))
        priority.ioprio_set(b, priority.encode_ioprio("best-effort"))
        assert (priority.ioprio_get(a), ioprio_from_psutil(a)) == (3 << 13, "idle/0")
        assert (priority.ioprio_get(b), ioprio_from_psutil(b)) == (2 << 13 | 7, "best-effort/7")
        if shutil.which("ionice"):  # util-linux calls ioprio_get itself: a reading independent of psutil
            cli = {
                tid: subprocess.run(
                    ["ionice", "-p", str(tid)], capture_output=True, text=True, check=True
                ).stdout.strip()
                for tid in (a, b)
            }
            assert cli == {a: "idle", b: "best-effort: prio 7"}
        assert priority.ioprio_get(me) == priority.ioprio_get(0) == mine


def test_ended_thread_is_process_lookup_error():
    with spare_thread() as tid:
        pass
    # join() returns before the OS thread has quite exited; its /proc entry goes when it has.
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{tid}") and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(ProcessLookupError):
        priority.ioprio_get(tid)


def test_calling_thread_unreachable_is_enosys(monkeypatch: pytest.MonkeyPatch):
    # What psutil says without /proc: the calling thread "does not exist". That is a soft failure,
    # not a thread that ended under us.
    def gone(pid: int) -> psutil.Process:
        raise psutil.NoSuchProcess(pid)

    monkeypatch.setattr(psutil, "Process", gone)
    with pytest.raises(OSError) as raised:
        priority.ioprio_get()
    assert raised.value.errno == errno.ENOSYS
    assert priority.current()["io_priority"].startswith("unknown")


# Realtime I/O priority needs CAP_SYS_ADMIN/CAP_SYS_NICE (or RLIMIT_RTPRIO on new kernels): asking
# for it unprivileged is a real EPERM from the kernel, through psutil's AccessDenied.
REFUSED = """
import errno, os, resource
from daemon import priority


if os.geteuid() == 0:  # imported as root (the interpreter may live in /root); now become nobody
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
try:
    priority.ioprio_set(0, 1 << 13)
    print("allowed")
except PermissionError as e:
    print(errno.errorcode[e.errno], e.strerror)
"""


def test_kernel_refusal_is_a_permission_error():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", REFUSED], check=False, capture_output=True, text=True, timeout=30, env=env, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "EPERM Operation not permitted"


@pytest.mark.parametrize(("cpus", "message"), [((max(ALL_CPUS) + 1,), "cannot use"), ((), "empty"), ((-1,), "-1")])
@pytest.mark.unit
def test_invalid_cpus_raise_before_anything_changes(cpus: tuple[int, ...], message: str):
    # Validation precedes every change, so this can run in the test process itself.
    before = priority.current()
    with pytest.raises(ValueError, match=message):
        priority.apply(10, "best-effort", cpus)
    assert priority.current() == before


@pytest.mark.unit
def test_unknown_io_priority_raises():
    with pytest.raises(ValueError, match="best-effort, idle, normal"):
        priority.apply(10, "realtime", None)


@pytest.mark.parametrize(("name", "value"), [("best-effort", 2 << 13 | 7), ("idle", 3 << 13), ("normal", None)])
@pytest.mark.unit
def test_encode_ioprio(name: str, value: int | None):
    assert priority.encode_ioprio(name) == value
    if value is not None:
        assert priority.decode_ioprio(value)[0] == name


@pytest.mark.parametrize("name", ["realtime", "none", "", "Idle"])
@pytest.mark.unit
def test_encode_ioprio_rejects_anything_else(name: str):
    with pytest.raises(ValueError, match="best-effort, idle, normal"):
        priority.encode_ioprio(name)


@pytest.mark.parametrize(
    ("value", "decoded"),
    [
        (0, ("none", 0)),
        (16391, ("best-effort", 7)),
        (24576, ("idle", 0)),
        (1 << 13 | 3, ("realtime", 3)),
        (7 << 13, ("unknown", 0)),
    ],
)
@pytest.mark.unit
def test_decode_ioprio(value: int, decoded: tuple[str, int]):
    assert priority.decode_ioprio(value) == decoded


BE = 2 << 13
IDLE = 3 << 13


@pytest.mark.parametrize(
    ("current", "wanted", "lowers"),
    [
        (0, None, False),
        (IDLE, None, False),
        (0, BE | 7, True),
        (BE | 4, BE | 7, True),
        (BE | 7, BE | 7, False),
        (1 << 13, BE | 7, True),
        (IDLE, BE | 7, False),
        (BE | 7, IDLE, True),
        (IDLE, IDLE, False),
        (0, IDLE, True),
    ],
)
@pytest.mark.unit
def test_ioprio_lowers(current: int, wanted: int | None, lowers: bool):
    assert priority.ioprio_lowers(current, wanted) is lowers


@pytest.mark.parametrize(
    ("current", "wanted", "raises"), [(0, 10, True), (10, 10, False), (15, 10, False), (-5, 0, True)]
)
@pytest.mark.unit
def test_nice_raises(current: int, wanted: int, raises: bool):
    assert priority.nice_raises(current, wanted) is raises


@pytest.mark.parametrize(
    ("cpus", "universe", "result"),
    [
        (None, {0}, None),
        ((0, 1), {0, 1, 2}, {0, 1}),
        ((2,), {0, 1, 2}, {2}),
        ((), {0}, "empty"),
        ((0, 7), {0, 1}, r"\[7\].*available: 0-1"),
        ((5, 6), {0, 1, 3}, r"available: 0-1,3"),
        ((-1,), {0, 1}, r"\[-1\]"),
    ],
)
@pytest.mark.unit
def test_check_cpus(cpus: tuple[int, ...] | None, universe: set[int], result: Any):
    if isinstance(result, str):
        with pytest.raises(ValueError, match=result):
            priority.check_cpus(cpus, universe)
    else:
        assert priority.check_cpus(cpus, universe) == result


@pytest.mark.unit
def test_current_reports_this_thread():
    now = priority.current()
    assert now["nice"] == os.getpriority(os.PRIO_PROCESS, 0)
    assert now["cpu_affinity"] == ALL_CPUS
    assert "/" in now["io_priority"]
