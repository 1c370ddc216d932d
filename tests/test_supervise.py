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

from daemon.commands.signals import FORWARDED, listening
from daemon.supervise import EXIT_GRACE, KILL_WAIT, Proc, Trainer, commands_of, family, trainer_env

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
    # This process may have inherited SIGINT ignored (a script's background job), and an ignored
    # signal stays ignored across exec. `ckptd run` starts its trainer with handlers installed for
    # the forwarded signals, which exec resets to the default (and uvloop resets them all): as here.
    with listening(FORWARDED, lambda heard: None):
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
@pytest.mark.parametrize("enabled", [True, False])
def test_bt_load_checkpoint_dir_is_given_only_when_loading_is_enabled(tmp_path: Path, enabled: bool):
    # The reference docs' training code tells "no loading configured" by the variable's absence.
    c = config(tmp_path, "file:///tmp/x", restore_enabled=str(enabled).lower(), restore_dir=str(tmp_path / "loaded"))
    env = trainer_env(c, {"BT_LOAD_CHECKPOINT_DIR": "/inherited", "KEPT": "yes"})
    assert env.get("BT_LOAD_CHECKPOINT_DIR") == (str(tmp_path / "loaded") if enabled else None)
    assert env["KEPT"] == "yes" and env["BT_CHECKPOINT_DIR"] == c.checkpoint_dir


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


ME, MY_SID, LEADER = 100, 100, 200


def proc(pid: int, ppid: int, pgid: int | None = None, sid: int | None = None, state: str = "S") -> Proc:
    return Proc(pid, ppid, pgid if pgid is not None else pid, sid if sid is not None else pid, state)


@pytest.mark.unit
@pytest.mark.parametrize(
    "p, adopts, in_family",
    [
        (proc(LEADER, ME, LEADER, LEADER), False, True),  # the leader
        (proc(201, 1, LEADER, LEADER), False, True),  # in its group, reparented to init
        (proc(202, 1, 202, LEADER), False, True),  # its own group, the leader's session
        (proc(203, ME, 203, 203), True, True),  # our child in another session: an adopted orphan
        (proc(203, ME, 203, 203), False, False),  # ...which only a subreaper can have
        (proc(204, ME, ME, MY_SID), True, False),  # our child in our session: not the trainer's
        (proc(205, 1, 205, 205), True, False),  # unrelated
        (proc(ME, 1, ME, MY_SID), True, False),  # ckptd itself
    ],
    ids=["leader", "group", "session", "adopted", "not-adopted", "ours", "unrelated", "ckptd"],
)
def test_family_table(p: Proc, adopts: bool, in_family: bool):
    procs = {ME: proc(ME, 1, ME, MY_SID), p.pid: p}
    assert (p.pid in family(procs, LEADER, ME, MY_SID, adopts)) is in_family


@pytest.mark.unit
def test_family_holds_every_descendant_of_a_member_whatever_its_group_or_session():
    procs = {
        p.pid: p
        for p in (
            proc(ME, 1, ME, MY_SID),
            proc(LEADER, ME, LEADER, LEADER),
            proc(301, LEADER, 301, 301),  # setsid child of the leader
            proc(302, 301, 302, 301),  # its child, in a group of its own
            proc(303, 302, 303, 303, "Z"),  # a zombie grandchild: still family, to be reaped
            proc(304, ME, ME, MY_SID),  # a sibling of the leader, ours
        )
    }
    assert family(procs, LEADER, ME, MY_SID, adopts=False) == {LEADER, 301, 302, 303}


LEAVES_A_CHILD = (
    r"""
sh -c 'trap "" TERM; echo $$ > "$0"; while :; do sleep 0.05; done' "$1" &
while [ ! -s "$1" ]; do sleep 0.01; done
touch "$1.ready"
"""
    + "{end}"
)


def child_pid(out: Path) -> int | None:
    return int(out.read_text()) if out.exists() and Path(f"{out}.ready").exists() else None


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("end", ["exit 0", "wait"], ids=["leader-exits-0", "leader-stopped"])
async def test_a_child_that_outlives_its_leader_is_killed_before_run_returns(tmp_path: Path, end: str):
    """The leader ends (by itself, or on the forwarded SIGTERM) and leaves a child in its group that
    ignores SIGTERM: run() returns only once it is dead, about the stop timeout later."""
    out = tmp_path / "child.pid"
    trainer = Trainer([["/bin/sh", "-c", LEAVES_A_CHILD.format(end=end), "sh", str(out)]], {}, 0.5)
    task = asyncio.ensure_future(trainer.run())
    await until(lambda: child_pid(out), 10, "the child to start")
    child = child_pid(out)
    stopped = time.monotonic()
    if end == "wait":
        trainer.forward(signal.SIGTERM, stop=True)
    try:
        status = await asyncio.wait_for(task, 15)
        assert not alive(child), "run() returned while the child lived"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
    assert status == (0 if end == "exit 0" else 143)
    assert trainer.left_running and not trainer.running
    assert 0.5 <= time.monotonic() - stopped < 0.5 + EXIT_GRACE + KILL_WAIT


async def test_kill_at_once_from_another_thread_kills_the_group_and_its_setsid_descendants(tmp_path: Path):
    """What a third stop signal does from the signal thread, with no event loop: nothing is left."""
    out = tmp_path / "child.pid"
    script = LEAVES_A_CHILD.replace("sh -c", "setsid sh -c").format(end="wait")
    trainer = Trainer([["/bin/sh", "-c", script, "sh", str(out)]], {}, 3600)
    task = asyncio.ensure_future(trainer.run())
    await until(lambda: child_pid(out), 10, "the setsid child to start")
    child, leader = child_pid(out), trainer.proc.pid
    try:
        assert os.getsid(child) != os.getsid(leader)  # out of reach of the group's signals
        await asyncio.to_thread(trainer.kill_at_once)
        assert await asyncio.wait_for(task, 15) == 137
        await until(lambda: not alive(child), 10, "the setsid child to be killed")
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
