"""Supervising the user's start commands: launch, forward signals, stop with a deadline, report.

Each command runs in its own session and process group (so a signal reaches torchrun and all its
workers, and a terminal's Ctrl-C reaches ckptd first), at normal priority, with stdout and stderr
passed through untouched.

A command is over when every process it started is gone, not when its leader exits: children that
ignore SIGTERM and `setsid` grandchildren would otherwise keep writing checkpoints after the drain.
What outlives the leader gets the rest of --stop-timeout (all of it when the leader exited on its
own), then SIGKILL, and is named in the log. ckptd adopts orphans (`become_subreaper`), so a
grandchild that left the trainer's session is still found, and it reaps them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from daemon import exits
from daemon.config import Config
from daemon.logs import redact

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
EXIT_GRACE = 1.0  # seconds in which the leader's children may end with it before they count as left running
LEFTOVER_POLL = 0.1  # seconds between looks at what the trainer left running
REAP_EVERY = 10.0  # seconds between collections of adopted orphans that ended while the trainer runs
KILL_WAIT = 5.0  # seconds for SIGKILLed processes to be gone before they are reported as surviving it
log = structlog.get_logger()


def trainer_env(c: Config, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of SPEC §3: where to write, where restored checkpoints are, who we are.

    BT_LOAD_CHECKPOINT_DIR only when loading is enabled: the reference docs' training code takes
    its "no checkpoint loading configured" branch by its absence, and would otherwise look for
    checkpoints in a folder nobody filled. ckptd owns the variable, so an inherited one goes too.

    Precedence: ckptd's BT_* > the config's environment_variables > ckptd's own environment. The job
    definition's variables win over what ckptd inherited, as the hosted platform sets them in the
    trainer's container; ckptd's BT_* win over both because they say where ckptd watches and restores:
    a trainer told another checkpoint folder would save where nothing is uploaded.
    """
    own = _own_variables(c)
    wanted = c.environment_variables.values()
    overridden = sorted(set(wanted) & ({"BT_LOAD_CHECKPOINT_DIR"} | set(own)))
    if overridden:
        log.warning("environment_variables that ckptd sets itself are overridden", names=overridden)
    env = {**base, **wanted, **own}
    if not c.restore_enabled:
        env.pop("BT_LOAD_CHECKPOINT_DIR", None)
    return env


def _own_variables(c: Config) -> dict[str, str]:
    env = {
        "BT_CHECKPOINT_DIR": c.checkpoint_dir,
        "BT_NODE_RANK": str(c.node_rank),
        "BT_GROUP_SIZE": str(c.group_size),
        "BT_TRAINING_JOB_ID": c.job_id,
        "BT_TRAINING_PROJECT_NAME": c.project,
    }
    if c.restore_enabled:
        env["BT_LOAD_CHECKPOINT_DIR"] = c.restore_dir
    return env


def commands_of(c: Config, argv: Sequence[str]) -> list[list[str]]:
    """CMD after `--` runs as given; otherwise each start command through /bin/sh -c."""
    if argv:
        return [list(argv)]
    return [["/bin/sh", "-c", command] for command in c.start_commands]


def become_subreaper() -> bool:
    """Make orphaned descendants (a `setsid` grandchild whose parent exited) children of this
    process instead of init's, so they can be found, stopped and reaped. Process-wide: only for
    the `ckptd run` process. False (logged) where the kernel refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        error = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as e:
        error = str(e)
    log.warning("orphans of the trainer cannot be adopted: a setsid grandchild may outlive it", error=error)
    return False


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str  # "Z": a zombie, which writes nothing any more


def processes() -> dict[int, Proc]:
    """Every process of this PID namespace, from /proc (ones that end meanwhile are left out)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()  # the name in parentheses may hold anything
        found[int(name)] = Proc(int(name), int(fields[1]), int(fields[2]), int(fields[3]), fields[0].decode())
    return found


def family(procs: Mapping[int, Proc], leader: int, me: int, my_sid: int, adopts: bool) -> set[int]:
    """The processes a command started: the leader's group, session and descendants, and (when
    this process adopts orphans) children of ours that left our session, with their descendants.

    | process                                               | adopts | in family |
    |-------------------------------------------------------|--------|-----------|
    | the leader, or pgid or sid == the leader's pid        | any    | yes       |
    | a descendant of one in the family                     | any    | yes       |
    | our child, in another session than ours (an orphan)   | yes    | yes       |
    | our child, in another session than ours               | no     | no        |
    | our child in our own session (not started as trainer) | any    | no        |
    | this process                                          | any    | no        |
    """
    roots = [
        p.pid
        for p in procs.values()
        if leader in (p.pid, p.pgid, p.sid) or (adopts and p.ppid == me and p.sid != my_sid)
    ]
    children = defaultdict(list)
    for p in procs.values():
        children[p.ppid].append(p.pid)
    found: set[int] = set()
    while roots:
        pid = roots.pop()
        if pid not in found and pid != me:
            found.add(pid)
            roots.extend(children[pid])
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def describe(pids: Iterable[int]) -> list[dict]:
    """For the log: pids and command lines (shortened, signatures and credentials redacted)."""
    return [{"pid": pid, "command": redact(command_line(pid))[:300]} for pid in sorted(pids)[:20]]


class Trainer:
    def __init__(
        self, commands: list[list[str]], env: Mapping[str, str], stop_timeout: float, *, adopts: bool = False
    ) -> None:
        """`adopts`: this process is a subreaper (`become_subreaper`), so orphans of the trainer
        become its children and are looked for there."""
        self.commands, self.env, self.stop_timeout, self.adopts = commands, dict(env), stop_timeout, adopts
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.left_running = False  # something outlived a leader (by EXIT_GRACE): it had to be stopped
        self._group: int | None = None  # the process group to signal, while it may have members
        self._kill_at: float | None = None  # monotonic time of the SIGKILL, once a stop has started
        self._killer: asyncio.TimerHandle | None = None
        self._killed = False  # the current command's processes had their SIGKILL
        self.started = asyncio.Event()

    @property
    def running(self) -> bool:
        """Until all a command started is gone, not only its leader."""
        return self._group is not None or (self.proc is not None and self.proc.returncode is None)

    async def run(self) -> int:
        """Run the commands in order, stopping at the first failure or a stop signal. Each is over
        once everything it started is gone."""
        status = exits.OK
        for argv in self.commands:
            if self.stopping:
                break
            try:
                self.proc = await asyncio.create_subprocess_exec(*argv, env=self.env, start_new_session=True)
            except OSError as e:
                log.error("start command could not be started", command=argv, error=e.strerror)
                return exits.NOT_FOUND if e.errno == errno.ENOENT else exits.NOT_EXECUTABLE
            self._group = self.proc.pid
            self.started.set()
            log.info("trainer started", pid=self.proc.pid, command=argv)
            status = exits.of_process(await self._wait(self.proc))
            log.info("trainer exited", pid=self.proc.pid, exit_code=status)
            await self._end_what_is_left(self.proc.pid)
            if status != exits.OK:
                break
        self._cancel_killer()
        return status

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        """The leader's return code. Meanwhile adopted orphans that end are reaped, as init would."""
        leader = asyncio.ensure_future(proc.wait())
        try:
            while not (await asyncio.wait({leader}, timeout=REAP_EVERY))[0]:
                self._reap(proc.pid)
        finally:
            leader.cancel()
        return leader.result()

    def forward(self, sig: signal.Signals, *, stop: bool) -> None:
        """Pass a signal to the running command's whole process group; a stop signal also starts
        the --stop-timeout clock, after which everything the command started is killed."""
        if stop:
            self.stopping = True
            if self._killer is None:
                self._kill_at = min(self._kill_at or float("inf"), time.monotonic() + self.stop_timeout)
                self._killer = asyncio.get_running_loop().call_later(self.stop_timeout, self.kill, "stop timeout")
        self._signal_group(sig)

    def kill(self, reason: str) -> None:
        self.stopping = True
        self._kill_at = time.monotonic()
        if self._group is None:
            return
        log.warning("killing the trainer", reason=reason, processes=describe(self._family()))
        self._killed = True
        self.kill_at_once()

    def kill_at_once(self) -> None:
        """SIGKILL the command's group and every process it started. No logging and no event loop:
        safe from any thread, just before ckptd exits on a third stop signal."""
        members = self._family()  # first: once the leader dies, its setsid children are no longer its descendants
        self._signal_group(signal.SIGKILL)
        for pid in members:
            _signal(pid, signal.SIGKILL)

    def _family(self) -> dict[int, Proc]:
        """What the current command started and is still alive."""
        if self._group is None:
            return {}
        procs = processes()
        pids = family(procs, self._group, os.getpid(), os.getsid(0), self.adopts)
        return {pid: procs[pid] for pid in pids if procs[pid].state != "Z"}

    async def _end_what_is_left(self, leader: int) -> None:
        """After the leader exits: what it left running gets the rest of the stop timeout (all of
        it, after a SIGTERM, when the leader exited on its own), then SIGKILL."""
        if self._killer is not None:  # from here on the deadline is watched below
            self._killer.cancel()
            self._killer = None
        grace = time.monotonic() + EXIT_GRACE  # children ending with their leader are no news
        if not await self._gone(leader, lambda: min(grace, self._kill_at or grace)):
            left = self._family()
            self.left_running = True
            log.warning("the trainer's processes outlived it", leader=leader, processes=describe(left))
            if self._kill_at is None:
                self._kill_at = time.monotonic() + self.stop_timeout
                self._signal_group(signal.SIGTERM)
            for p in left.values():
                if p.pgid != leader:  # a setsid descendant did not get the group's stop signal
                    _signal(p.pid, signal.SIGTERM)
            if await self._gone(leader, lambda: self._kill_at or 0.0):  # a second stop signal brings it forward
                pass
            elif not self._killed:
                self.kill("stop timeout")
            else:
                self.kill_at_once()  # what started since the kill
            killed = time.monotonic()
            if not await self._gone(leader, lambda: killed + KILL_WAIT):
                log.error("the trainer's processes survived SIGKILL", processes=describe(self._family()))
        self._reap(leader)
        self._group, self._kill_at, self._killed = None, None, False

    async def _gone(self, leader: int, until: Callable[[], float]) -> bool:
        """Wait until nothing the command started is alive (True), or the time `until()` says."""
        while await asyncio.to_thread(self._left, leader):  # walks of /proc: off the loop
            if time.monotonic() >= until():
                return False
            await asyncio.sleep(LEFTOVER_POLL)
        return True

    def _left(self, leader: int) -> dict[int, Proc]:
        self._reap(leader)
        return self._family()

    def _reap(self, leader: int) -> None:
        """Collect adopted orphans that have ended (the leader is the event loop's to collect)."""
        if not self.adopts:
            return
        procs, me = processes(), os.getpid()
        for pid in family(procs, leader, me, os.getsid(0), True):
            if pid != leader and procs[pid].ppid == me and procs[pid].state == "Z":
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._group is None:
            return
        try:
            os.killpg(self._group, sig)
        except ProcessLookupError:
            pass

    def _cancel_killer(self) -> None:
        if self._killer is not None:
            self._killer.cancel()
            self._killer = None


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
