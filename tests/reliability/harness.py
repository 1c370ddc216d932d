"""One trial's world: its folders, its store, the ckptd and writer processes, and its time bound.

Every wait is bounded by the trial's deadline; a watchdog kills every process of the trial when
the deadline passes, so a hung daemon costs one trial, never the run. Kills and restarts are
recorded as "blind" windows (wall-clock), during which no daemon could pin a file: a file completed
and deleted inside one is the only kind a trial excuses for not being stored.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reliability.record import History

PROJECT, JOB = "proj", "job-1"
WRITER = str(Path(__file__).resolve().parent / "writer.py")
PIN_MARGIN = 1.0  # seconds a daemon may need to see and pin a completed file
# Under libfaketime (clock-jumps) every clock read goes through the preload, and on a busy CPU a
# daemon in its first seconds was measured to pin a closed file 1-2 s late.
FAKE_CLOCK_PIN_MARGIN = 3.0
ROOT = Path(__file__).resolve().parents[2]


class TrialTimeout(Exception):
    """The trial's hard time bound passed; its processes were killed."""


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no strays if we die


class Proc:
    """A subprocess whose stdout and stderr go to a log file (JSON lines for ckptd)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, session: bool = False) -> None:
        self.log, self.argv = log, argv
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=session,
                preexec_fn=_die_with_parent,
            )
        self.pid = self.proc.pid

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                out.append(event)
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(max(timeout, 0))
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Trial:
    def __init__(self, scenario: str, index: int, seed: int, workdir: Path, store: Any, budget: float) -> None:
        self.scenario, self.index, self.seed = scenario, index, seed
        self.rng = random.Random(seed)
        self.dir, self.store = workdir, store
        self.ckpt, self.record = workdir / "ckpt", workdir / "record.jsonl"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.daemons: list[Proc] = []
        self.others: list[Proc] = []
        self.blind: list[tuple[float, float]] = [(0.0, time.time())]  # nothing watches before the first start
        self.faults: collections.Counter[str] = collections.Counter()
        self.notes: list[str] = []
        self.violations: list[str] = []
        self.secret = b""  # bytes planted outside the folder: no object may contain them
        self.fake_clock = False  # the daemon runs under libfaketime: its log times are not ours
        self.torn_ok = False  # the writer was killed mid-write: a torn file may be stored, never committed
        self.exit_codes: list[int | None] = []
        self.cleanups: list[Callable[[], object]] = []
        self.figures: collections.Counter[str] = collections.Counter()  # scenario-specific counts for the report
        self.restore_args: tuple[str, ...] = ()
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.timed_out = threading.Event()
        self._watchdog = threading.Timer(budget, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    # -- time ---------------------------------------------------------------------------------

    def left(self) -> float:
        if self.timed_out.is_set():
            raise TrialTimeout(f"trial exceeded its {self.budget:.0f}s bound")
        return self.deadline - time.monotonic()

    def until(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
        end = time.monotonic() + min(timeout, self.left())
        while not (value := condition()):
            if time.monotonic() > end:
                self.left()
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)  # polling interval; the deadline bounds the loop
        return value

    def sleep(self, seconds: float) -> None:
        self.timed_out.wait(max(0.0, min(seconds, self.left())))

    def _expire(self) -> None:
        self.timed_out.set()
        for p in [*self.daemons, *self.others]:
            if p.alive():
                p.proc.kill()

    def finish(self) -> None:
        self._watchdog.cancel()
        for p in [*self.daemons, *self.others]:
            p.kill()
        for pid in self.strays():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for cleanup in reversed(self.cleanups):
            cleanup()

    def strays(self) -> list[int]:
        """This trial's writer processes (recorded pids, checked to be ours) still alive."""
        return [pid for pid in History.read(self.record).pids if _ours(pid, str(self.record))]

    # -- processes ----------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "BT_", "AWS_"))}
        return {**env, **self.store.env(), "HOME": str(self.dir), "PYTHONPATH": str(ROOT)}

    def common_args(self, serve: bool = True) -> list[str]:
        serving = ["--metrics-addr", "127.0.0.1:0"] if serve else []
        return [*self.store.args(), "--project", PROJECT, "--job-id", JOB, *serving]

    def watch(self, *extra: str, prefix: tuple[str, ...] = (), env: dict | None = None, ready: bool = True) -> Proc:
        """Start `ckptd watch` on the checkpoint folder; wait until it watches (its startup scan done)."""
        args = ["watch", *self.common_args(), "--checkpoint-dir", str(self.ckpt), "--settle-time", "0.1"]
        args += ["--exit-when", str(self.dir / "exit"), "--drain-timeout", "40", *extra]
        return self._daemon(args, prefix, env, ready)

    def run(self, plan: dict, *extra: str, prefix: tuple[str, ...] = (), env: dict | None = None) -> Proc:
        """Start `ckptd run` with the writer as its trainer (restore off)."""
        args = ["run", *self.common_args(), "--checkpoint-dir", str(self.ckpt), "--settle-time", "0.1"]
        args += ["--drain-timeout", "40", "--stop-timeout", "5", *extra, "--", sys.executable, WRITER]
        env = {**(env or {}), "WRITER_PLAN": json.dumps(self.plan(plan))}
        return self._daemon(args, prefix, env, ready=False)

    def _daemon(self, args: list[str], prefix: tuple[str, ...], env: dict | None, ready: bool) -> Proc:
        (self.dir / "exit").unlink(missing_ok=True)  # the last one's drain request, not this one's
        argv = [*prefix, sys.executable, "-m", "daemon", *args]
        proc = Proc(argv, {**self.base_env(), **(env or {})}, self.dir / f"ckptd-{len(self.daemons)}.log")
        self.daemons.append(proc)
        if ready:
            self.until(lambda: proc.events("watching") or _dead(proc), 60, "ckptd watching")
        self.blind[-1] = (self.blind[-1][0], time.time())  # watching (or at least started) from here on
        return proc

    def plan(self, plan: dict) -> dict:
        return {"seed": self.rng.randrange(1 << 30), "record": str(self.record), "folder": str(self.ckpt), **plan}

    def writer(self, plan: dict, prefix: tuple[str, ...] = ()) -> Proc:
        env = {**self.base_env(), "WRITER_PLAN": json.dumps(self.plan(plan))}
        proc = Proc([*prefix, sys.executable, WRITER], env, self.dir / f"writer-{len(self.others)}.log")
        self.others.append(proc)
        return proc

    def running(self) -> bool:
        """True while the current ckptd runs: one that exits on its own fails the wait at once."""
        d = self.daemons[-1]
        if not d.alive():
            raise AssertionError(f"ckptd exited {d.proc.returncode} unexpectedly:\n{d.tail()}")
        return True

    def wait_writer(self, proc: Proc, timeout: float = 120, watched: bool = True) -> None:
        """Wait for the writer; while `watched`, a ckptd that exits on its own fails the wait."""
        self.until(lambda: (not watched or self.running()) and not proc.alive(), timeout, "the writer to finish")
        if proc.proc.returncode != 0:
            raise AssertionError(f"writer exited {proc.proc.returncode}:\n{proc.tail()}")

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        d = self.daemons[-1]
        margin = FAKE_CLOCK_PIN_MARGIN if self.fake_clock else PIN_MARGIN
        self.blind.append((time.time() - margin, float("inf")))
        d.signal(sig)
        d.wait(max(1.0, self.left()))
        self.exit_codes.append(d.proc.returncode)
        self.faults[signal.Signals(sig).name.lower()] += 1

    def drain(self, proc: Proc | None = None, timeout: float = 90, by_signal: int | None = None) -> int | None:
        """Ask the daemon to finish (exit file, or a signal) and wait; a daemon that does not exit
        in time is a hang: killed, and a violation."""
        d = proc or self.daemons[-1]
        if by_signal is None:
            (self.dir / "exit").touch()
        else:
            d.signal(by_signal)
        rc = d.wait(min(timeout, self.left()))
        if rc is None:
            self.left()
            self.violations.append(f"hang: ckptd did not exit within {timeout:.0f}s of the drain request")
            d.kill()
        self.exit_codes.append(rc)
        return rc

    def restore(self, refs: list[dict], folder: Path, *extra: str) -> tuple[int | None, Proc]:
        config = self.dir / f"restore-{len(self.others)}.yaml"
        config.write_text(yaml.safe_dump({"load_checkpoint_config": {"enabled": True, "checkpoints": refs}}))
        args = ["restore", "--config", str(config), *self.common_args(False), "--restore-dir", str(folder), *extra]
        proc = Proc(
            [sys.executable, "-m", "daemon", *args], self.base_env(), self.dir / f"restore-{len(self.others)}.log"
        )
        self.others.append(proc)
        rc = proc.wait(min(120, self.left()))
        if rc is None:
            self.left()
            self.violations.append("hang: ckptd restore did not exit within 120s")
            proc.kill()
        return rc, proc


def _ours(pid: int, record: str) -> bool:
    """Alive, and one of our writers (a pid can be reused by anyone once its process is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        ours = WRITER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        ours = ours and record.encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, IndexError):
        return False
    return ours and state not in ("Z", "X")


def _dead(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"ckptd exited {proc.proc.returncode} before it was ready:\n{proc.tail()}")
    return False
