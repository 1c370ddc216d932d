"""Supervising the start commands: real subprocesses, real process groups, real signals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from engines import config, until

from daemon.supervise import Trainer, commands_of, trainer_env

KIND = "integration"

# A trainer that reports who it is, then waits: how it answers signals is set by its arguments.
CHILD = r"""
import json, os, signal, subprocess, sys, time
out, mode = sys.argv[1], sys.argv[2]
def note(name):
    with open(f"{out}.{name}", "w") as f:
        f.write(str(os.getpid()))
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "exit-on-term":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if mode in ("usr1", "usr1-grandchild"):
    signal.signal(signal.SIGUSR1, lambda *_: (note("usr1"), sys.exit(0)))
if mode == "usr1-grandchild":
    grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[3], out + ".grandchild", "usr1"])
    deadline = time.monotonic() + 30
    while not os.path.exists(out + ".grandchild.ready"):
        assert time.monotonic() < deadline, "the grandchild never got ready"
        time.sleep(0.01)
info = {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0),
        "env": {k: v for k, v in os.environ.items() if k.startswith("BT_") or k == "KEPT"}}
with open(out + ".ready", "w") as f:
    json.dump(info, f)
while True:
    signal.pause()  # until a signal ends it (an ignored one only wakes it)
"""


def child(out: Path, mode: str) -> list[str]:
    argv = [sys.executable, "-c", CHILD, str(out), mode]
    return [*argv, CHILD] if mode == "usr1-grandchild" else argv


def ready(out: Path) -> dict | None:
    path = Path(f"{out}.ready")
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None  # not written yet, or half written


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


@pytest.fixture
async def launch():
    """Start a trainer and wait until its first command reports; whatever still runs is killed after."""
    started: list[tuple[Trainer, asyncio.Future]] = []

    async def start(trainer: Trainer, out: Path) -> asyncio.Future:
        task = asyncio.ensure_future(trainer.run())
        started.append((trainer, task))
        await until(lambda: ready(out), 10, "the trainer to start")
        return task

    yield start
    for trainer, task in started:
        if not task.done():
            trainer.kill("test over")
        await asyncio.wait_for(task, 10)


async def test_commands_run_in_order_and_stop_at_the_first_failure(tmp_path: Path):
    log = tmp_path / "log"
    trainer = Trainer([sh(f"echo one >> {log}"), sh(f"echo two >> {log}; exit 3"), sh(f"echo three >> {log}")], {}, 5)
    assert await trainer.run() == 3
    assert log.read_text() == "one\ntwo\n"


async def test_every_command_runs_when_all_succeed(tmp_path: Path):
    log = tmp_path / "log"
    trainer = Trainer([sh(f"echo one >> {log}"), sh(f"echo two >> {log}")], {}, 5)
    assert await trainer.run() == 0
    assert log.read_text() == "one\ntwo\n"


async def test_a_missing_command_is_127_and_nothing_after_it_runs(tmp_path: Path):
    log = tmp_path / "log"
    trainer = Trainer([[str(tmp_path / "no-such-command")], sh(f"echo after >> {log}")], {}, 5)
    assert await trainer.run() == 127
    assert not log.exists()


async def test_a_command_that_cannot_be_executed_is_126(tmp_path: Path):
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)  # no execute bit, for root too
    assert await Trainer([[str(script)]], {}, 5).run() == 126


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGSEGV])
async def test_death_by_signal_is_128_plus_the_signal_number(sig: signal.Signals):
    assert await Trainer([sh(f"kill -{sig.value} $$")], {}, 5).run() == 128 + sig.value


async def test_the_trainer_has_its_own_session_and_group_and_the_bt_environment(tmp_path: Path, launch):
    c = config(
        tmp_path,
        f"file://{tmp_path / 'store'}",
        node_rank="2",
        group_size="4",
        restore_enabled="true",
        restore_dir=str(tmp_path / "loaded"),
    )
    env = trainer_env(c, {"KEPT": "yes", "PATH": os.environ.get("PATH", "")})
    out = tmp_path / "child"
    trainer = Trainer([child(out, "wait")], env, 5)
    await launch(trainer, out)
    info = ready(out)
    assert info["pid"] == trainer.proc.pid
    assert info["pgid"] == info["pid"] == os.getpgid(trainer.proc.pid)  # leads its own group
    assert info["sid"] == info["pid"]  # and its own session
    assert os.getpgid(trainer.proc.pid) != os.getpgid(0)
    assert info["env"] == {
        "KEPT": "yes",
        "BT_CHECKPOINT_DIR": c.checkpoint_dir,
        "BT_NODE_RANK": "2",
        "BT_GROUP_SIZE": "4",
        "BT_TRAINING_JOB_ID": "job-1",
        "BT_TRAINING_PROJECT_NAME": "proj",
        "BT_LOAD_CHECKPOINT_DIR": str(tmp_path / "loaded"),
    }


@pytest.mark.unit
def test_commands_of_prefers_the_command_line_else_each_start_command_through_sh(tmp_path: Path):
    c = dataclasses.replace(config(tmp_path, "file:///tmp/x"), start_commands=("echo a", "python train.py"))
    assert commands_of(c, ["torchrun", "train.py"]) == [["torchrun", "train.py"]]
    assert commands_of(c, []) == [["/bin/sh", "-c", "echo a"], ["/bin/sh", "-c", "python train.py"]]
    assert commands_of(dataclasses.replace(c, start_commands=()), []) == []


async def test_a_forwarded_signal_reaches_the_whole_group_without_stopping(tmp_path: Path, launch):
    out = tmp_path / "child"
    trainer = Trainer([child(out, "usr1-grandchild")], {"PATH": os.environ.get("PATH", "")}, 5)
    task = await launch(trainer, out)  # the worker is ready before the trainer reports
    trainer.forward(signal.SIGUSR1, stop=False)
    assert await asyncio.wait_for(task, 10) == 0
    await until(lambda: Path(f"{out}.grandchild.usr1").exists(), 10, "the worker to get the signal")
    assert Path(f"{out}.usr1").exists()
    assert not trainer.stopping


async def test_a_trainer_ignoring_sigterm_is_killed_after_the_stop_timeout(tmp_path: Path, launch):
    out = tmp_path / "child"
    trainer = Trainer([child(out, "ignore-term"), sh(f"touch {tmp_path / 'next'}")], {}, 0.3)
    task = await launch(trainer, out)
    forwarded = time.monotonic()
    trainer.forward(signal.SIGTERM, stop=True)
    assert await asyncio.wait_for(task, 10) == 137
    assert time.monotonic() - forwarded >= 0.3
    assert trainer.stopping and not (tmp_path / "next").exists()


async def test_a_stop_signal_ends_the_command_list_even_when_the_command_exits_0(tmp_path: Path, launch):
    out = tmp_path / "child"
    trainer = Trainer([child(out, "exit-on-term"), sh(f"touch {tmp_path / 'next'}")], {}, 30)
    task = await launch(trainer, out)
    trainer.forward(signal.SIGTERM, stop=True)
    assert await asyncio.wait_for(task, 10) == 0
    assert not (tmp_path / "next").exists()


async def test_kill_kills_at_once(tmp_path: Path, launch):
    out = tmp_path / "child"
    trainer = Trainer([child(out, "ignore-term")], {}, 3600)
    task = await launch(trainer, out)
    killed = time.monotonic()
    trainer.kill("test")
    assert await asyncio.wait_for(task, 10) == 137
    assert time.monotonic() - killed < 5
    assert trainer.stopping and not trainer.running
