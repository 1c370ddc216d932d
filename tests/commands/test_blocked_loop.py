"""A third stop signal exits even while the event loop is blocked (issue 10, defect 3's signal half).

For `ckptd` itself the block is real and made from outside, without a test switch: its stdout and
stderr are one small pipe that the test stops reading, as a stalled log collector would. Once it is
full, the next log line blocks the event loop's thread in write(2) for good. For `Signals` alone, a
small program blocks its loop the ways defect 3 did: joining a thread stuck opening a FIFO, or a
blocking call on the loop.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemons import base_env, s3_args, wait_for, watch_args

KIND = "integration"

TRAINER = str(Path(__file__).resolve().parent.parent / "trainers" / "fake_trainer.py")
WRITE = {"x86_64": 1, "aarch64": 64}[platform.machine()]  # the write(2) system call's number
EXITS_PROMPTLY = 5.0  # seconds from the third signal to the exit


class Stalled:
    """`ckptd` whose log is a 4 KiB pipe that the test reads only until it says so."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)  # the smallest a pipe can be: full within a few lines
        argv = [sys.executable, "-m", "daemon", *args]
        self.proc = subprocess.Popen(argv, env=env, stdout=write_end, stderr=write_end)
        os.close(write_end)
        self.read_end, self.seen = read_end, b""

    def read_until(self, event: str, timeout: float = 30) -> None:
        """Read the log until `event` is logged; after this nobody reads it."""

        def logged() -> bool:
            if select.select([self.read_end], [], [], 0.05)[0]:
                self.seen += os.read(self.read_end, 65536)
            return any(event == _event(line) for line in self.seen.splitlines())

        wait_for(logged, timeout, f"log event {event!r}", interval=0)

    def blocked_writing_its_log(self) -> bool:
        """The main thread, which runs the event loop, is inside write(2, ...)."""
        try:
            syscall = Path(f"/proc/{self.proc.pid}/syscall").read_text().split()
        except OSError:
            return False
        return syscall[:2] == [str(WRITE), "0x2"]

    def signal_taken(self, sig: int) -> None:
        send_delivered(self.proc, sig)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.read_end)


def send_delivered(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` and wait until the kernel has delivered it: the next one is a delivery of its
    own, not merged with this one while it is pending."""
    proc.send_signal(sig)
    wait_for(lambda: not pending(proc.pid, sig), 10, f"signal {sig} to be delivered", interval=0.005)


def pending(pid: int, sig: int) -> bool:
    bit = 1 << (sig - 1)
    masks = [_mask(f"/proc/{pid}/status", "ShdPnd")]
    try:
        masks += [_mask(task / "status", "SigPnd") for task in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:  # it has exited
        pass
    return any(m & bit for m in masks)


def _event(line: bytes) -> str | None:
    try:
        return json.loads(line).get("event")
    except (ValueError, AttributeError):
        return None


def _mask(path: Path | str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    except OSError:  # a thread that ended meanwhile has nothing pending
        pass
    return 0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def stalled():
    started: list[Stalled] = []

    def start(args: list[str], env: dict[str, str]) -> Stalled:
        started.append(Stalled(args, env))
        return started[-1]

    yield start
    for d in started:
        d.close()


def three_stops_exit_at_once(d: Stalled) -> int:
    """Two stop signals that the blocked loop never acts on, then a third: the exit code."""
    for _ in range(2):
        d.signal_taken(signal.SIGTERM)
    # Back in write(2) once the signal's C-level handler has run: the loop itself never got free.
    wait_for(d.blocked_writing_its_log, 10, "ckptd's loop to be blocked on its log still", interval=0.005)
    d.signal_taken(signal.SIGTERM)
    third = time.monotonic()
    try:
        code = d.proc.wait(EXITS_PROMPTLY)
    except subprocess.TimeoutExpired:
        raise AssertionError("a third stop signal did not exit ckptd while its event loop was blocked") from None
    assert time.monotonic() - third < EXITS_PROMPTLY
    return code


def test_watch_exits_on_a_third_stop_signal_while_its_loop_is_blocked(stalled, moto_bucket, tmp_path):
    ckpt = tmp_path / "ckpt"
    d = stalled(watch_args(moto_bucket, ckpt, tmp_path / "exit"), {**base_env(), **moto_bucket.server.env()})
    d.read_until("watching")
    written = 0

    def log_more_until_blocked() -> bool:  # each stored file is a log line or two
        nonlocal written
        (ckpt / f"step-{written}").mkdir()
        (ckpt / f"step-{written}" / "shard.bin").write_bytes(os.urandom(100))
        written += 1
        return d.blocked_writing_its_log()

    wait_for(log_more_until_blocked, 60, "ckptd's event loop to block on its full log pipe", interval=0.05)
    assert three_stops_exit_at_once(d) == 4  # watch's code for "not everything was stored"


def test_run_kills_the_trainer_and_exits_on_a_third_stop_signal_while_its_loop_is_blocked(
    stalled, moto_bucket, tmp_path
):
    args = [
        "run",
        *s3_args(moto_bucket),
        "--project",
        "proj",
        "--job-id",
        "job-blocked",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--metrics-addr",
        "127.0.0.1:0",
        "--stop-timeout",
        "120",  # only the third signal can end it in time
        "--",
        sys.executable,
        TRAINER,
    ]
    env = {
        **base_env(),
        **moto_bucket.server.env(),
        "TRAINER_RECORD": str(tmp_path / "record.json"),
        "TRAINER_READY": str(tmp_path / "ready"),
        "TRAINER_FLOOD": "yes",  # the trainer shares ckptd's stdout and fills it
        "TRAINER_ON_TERM": "ignore",
        "TRAINER_ON_USR1": "ignore",
    }
    d = stalled(args, env)
    d.read_until("trainer started")
    wait_for(lambda: (tmp_path / "ready").exists(), 30, "the trainer to flood its stdout")
    trainer = json.loads((tmp_path / "record.json").read_text())["pid"]

    def blocked() -> bool:  # a forwarded SIGUSR1 is logged: that line cannot be written
        d.signal_taken(signal.SIGUSR1)
        return d.blocked_writing_its_log()

    wait_for(blocked, 30, "ckptd's event loop to block on its full log pipe", interval=0.05)
    assert three_stops_exit_at_once(d) == 128 + signal.SIGTERM
    wait_for(lambda: not alive(trainer), 10, "the trainer to be killed with ckptd's exit")


BLOCKED = """
import asyncio, os, signal, sys, threading, time
from daemon.commands.signals import Signals
from daemon.storage.retry import Deadline

how, kind, fifo = sys.argv[1:]

async def main():
    signals = Signals(Deadline(), exit_code=lambda sig: 42)
    async with signals.installed((signal.SIGTERM,)):
        print("blocking", flush=True)
        if how == "join":  # opening a FIFO blocks until a writer comes, and the loop waits for that thread
            opener = threading.Thread(target=lambda: open(fifo, "rb"))
            opener.start()
            opener.join()
        else:
            time.sleep(600)  # a blocking call on the loop
    print("the loop got free", flush=True)

if kind == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
@pytest.mark.parametrize("how", ["join", "sleep"], ids=["joining-a-thread-stuck-on-a-fifo", "blocking-call"])
def test_signals_count_and_the_third_exits_while_the_loop_is_blocked(tmp_path, how, kind):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKED, how, kind, str(fifo)], cwd=repo, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "blocking\n"
        wait_for(lambda: _main_thread_state(proc.pid) == "S", 10, "the loop's thread to block")
        for _ in range(3):
            send_delivered(proc, signal.SIGTERM)
        third = time.monotonic()
        assert proc.wait(EXITS_PROMPTLY) == 42
        assert time.monotonic() - third < EXITS_PROMPTLY
    except subprocess.TimeoutExpired:
        raise AssertionError("three stop signals did not exit a process whose loop was blocked") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _main_thread_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
