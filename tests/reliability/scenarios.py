"""Scenarios of crashes and store faults: each drives one trial, the runner checks the invariants.

A scenario function takes the trial and whether this is the full run (longer outages, bigger
files); its random choices come from `t.rng`, so a trial's seed replays it.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
from pathlib import Path

from faults import Rule

from reliability.harness import Trial
from reliability.record import History, Recorder

MiB = 1 << 20
UPLOADS = ("PutObject", "UploadPart", "CreateMultipartUpload", "CompleteMultipartUpload")
SMALL_PARTS = ("--multipart-threshold", "5MiB", "--part-size", "5MiB")


def hf(t: Trial, saves: int, interval: float = 0.15, keep: int = 2, model: int | None = None, **more) -> dict:
    model = model or t.rng.choice([300_000, 6 * MiB])  # 6 MiB: two 5 MiB parts with SMALL_PARTS
    return {"mode": "hf", "saves": saves, "interval": interval, "keep": keep, "sizes": {"model": model}, **more}


def sigkill_daemon(t: Trial, full: bool) -> None:
    """SIGKILL ckptd at random moments while an HF trainer saves and rotates; restart each time."""
    t.watch(*SMALL_PARTS)
    writer = t.writer(hf(t, saves=t.rng.randint(8, 14)))
    for _ in range(t.rng.choice([1, 1, 2])):
        t.sleep(t.rng.uniform(0.1, 2.0))
        t.kill_daemon()
        t.sleep(t.rng.choice([0, t.rng.uniform(0, 1.0)]))
        t.watch(*SMALL_PARTS)
    t.wait_writer(writer)
    t.drain()


def sigkill_trainer(t: Trial, full: bool) -> None:
    """`ckptd run`: the trainer dies of SIGKILL mid-save; ckptd drains what was complete, exits 137."""
    t.run(hf(t, saves=10_000, interval=0.1, keep=3, model=2 * MiB))
    saves = t.rng.randint(1, 6)
    t.until(lambda: t.running() and len(History.read(t.record).complete) >= saves, 60, "some saves")
    t.sleep(t.rng.uniform(0, 0.3))
    leader = t.until(lambda: [p for p, r in History.read(t.record).pids.items() if r == "leader"], 10, "trainer pid")
    os.kill(leader[0], signal.SIGKILL)
    t.faults["sigkill_trainer"] += 1
    t.torn_ok = True
    d = t.daemons[-1]
    rc = d.wait(min(60, t.left()))
    t.exit_codes.append(rc)
    if rc != 128 + signal.SIGKILL:
        t.violations.append(f"exit: ckptd run exited {rc} after its trainer died of SIGKILL, expected 137")


# Each fault: (rules during upload, rules during restore). Bursts are bounded (times=) so a
# correct client always gets through within the drain deadline; stalls outlast the 60 s read
# timeout only in the full run.
def fault_rules(kind: str, full: bool, t: Trial) -> tuple[list[Rule], list[Rule]]:
    start = t.rng.uniform(0, 1.5)
    if kind in ("error500", "slowdown503"):
        up = [Rule(kind, ops=UPLOADS, probability=0.4, start=start, stop=start + 3, times=12)]
        return up, [Rule(kind, ops=("GetObject", "ListObjects"), probability=0.4, times=8)]
    if kind == "reset_request":
        up = [Rule(kind, ops=("PutObject", "UploadPart"), probability=0.3, start=start, times=5)]
        return up, []
    if kind == "reset_response":
        up = [Rule(kind, ops=UPLOADS, probability=0.25, start=start, times=5)]
        return up, [Rule(kind, ops=("GetObject",), probability=0.3, times=5)]
    if kind == "stall":
        hold = 65 if full else 2
        return [Rule(kind, ops=("PutObject", "UploadPart"), start=start, times=1, seconds=hold)], [
            Rule(kind, ops=("GetObject",), times=1, seconds=hold)
        ]
    if kind == "truncate":
        return [Rule(kind, ops=("GetObject",), probability=0.5, times=4)], [
            Rule(kind, ops=("GetObject",), probability=0.4, fraction=t.rng.random(), times=6)
        ]
    if kind == "bad_etag":
        up = [Rule(kind, ops=("PutObject", "UploadPart"), probability=0.3, start=start, times=2)]
        return up, [Rule(kind, ops=("GetObject", "HeadObject"), probability=0.5, times=3)]
    if kind == "outage":
        return [], [Rule(kind, ops=("ListObjects",), times=1, seconds=2)]
    raise ValueError(kind)


def store_fault(kind: str):
    def scenario(t: Trial, full: bool) -> None:
        up, down = fault_rules(kind, full, t)
        t.store.proxy.schedule(up)
        t.watch(*SMALL_PARTS, "--drain-timeout", "120" if full else "40")
        writer = t.writer(hf(t, saves=t.rng.randint(4, 8), interval=0.2, keep=0))
        if kind == "outage":
            for _ in range(2):
                t.sleep(t.rng.uniform(0.2, 1.5))
                t.store.proxy.outage(t.rng.uniform(0.5, 3))
        t.wait_writer(writer)
        t.drain(timeout=200 if full else 90)
        t.store.proxy.schedule(down)

    scenario.__doc__ = f"{kind} during upload (random window) and during restore"
    return scenario


def kill_mid_checkpoint(t: Trial, full: bool) -> None:
    """SIGKILL after a checkpoint's marker is stored but before its model is; the trainer rotates the
    checkpoint away while ckptd is down. The restarted ckptd must not commit it without its model."""
    t.watch(*SMALL_PARTS, "--bandwidth-limit", "2MiB")
    t.wait_writer(t.writer(hf(t, saves=1, keep=0, model=12 * MiB)))
    d = t.daemons[-1]
    t.until(lambda: any(e["path"].endswith("trainer_state.json") for e in d.events("uploaded")), 30, "the marker")
    t.kill_daemon()
    _rotate(t, "checkpoint-1")
    t.watch()
    t.drain()


def rotate_at_restart(t: Trial, full: bool) -> None:
    """A checkpoint completed while ckptd was down is rotated away just after the restarted ckptd
    reports it is watching: its start-up scan saw the files, so they must be pinned and stored."""
    t.watch()
    t.kill_daemon()
    t.wait_writer(t.writer(hf(t, saves=1, keep=0)), watched=False)
    t.sleep(0.3)
    t.watch()
    _rotate(t, "checkpoint-1")
    t.drain()


def _rotate(t: Trial, checkpoint: str) -> None:
    rec = Recorder(t.record)
    for path in sorted((t.ckpt / checkpoint).rglob("*")):
        path.unlink()
        rec.emit("deleted", path=path.relative_to(t.ckpt).as_posix())
    (t.ckpt / checkpoint).rmdir()
    rec.close()


def drain_after_save(t: Trial, full: bool) -> None:
    """The trainer's last save closes its files a moment before the sidecar is told to finish (the
    --exit-when file): files closed within the settle time are complete, and must be stored."""
    if t.index % 2:  # the last save rewrites, in place, a file whose upload is under way
        t.watch("--bandwidth-limit", "4MiB")
        plan = {"mode": "rewrite", "ops": ["inplace"], "files": 1, "size": 12 * MiB, "rounds": 1, "interval": 0.3}
        t.wait_writer(t.writer({**plan, "slow": 0.1}))  # held open for writing across settle checks
    else:
        t.watch("--settle-time", "1")
        t.wait_writer(t.writer(hf(t, saves=2, interval=0.05, keep=0, model=300_000)))
    t.drain()


def create_reset(t: Trial, full: bool) -> None:
    """The answer to CreateMultipartUpload is lost (connection reset after the store created the
    upload); the client's retry creates a second one. After a clean drain, none may be left."""
    t.store.proxy.schedule([Rule("reset_response", ops=("CreateMultipartUpload",), times=1)])
    t.watch(*SMALL_PARTS)
    t.wait_writer(t.writer(hf(t, saves=2, interval=0.1, keep=0, model=6 * MiB)))
    t.drain()


def long_outage(t: Trial, full: bool) -> None:
    """The store is unreachable for a minute (a few seconds in the short run) while training saves."""
    seconds = 60 if full else 3
    t.watch("--drain-timeout", "120")
    writer = t.writer(hf(t, saves=int((seconds + 3) / 0.3), interval=0.3, keep=2, model=200_000))
    t.sleep(t.rng.uniform(0.5, 2))
    t.store.proxy.outage(seconds)
    t.wait_writer(writer, timeout=seconds + 60)
    t.drain(timeout=180)


def disk_full(t: Trial, full: bool) -> None:
    """The checkpoint file system fills up (a 64 MiB tmpfs): saves fail with ENOSPC, the journal
    cannot be written; once space is freed, every later save must still be stored."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(t.ckpt)], check=True)
    t.cleanups.append(lambda: subprocess.run(["umount", "-l", str(t.ckpt)], check=False))
    ballast = t.ckpt / "ballast.tmp"  # an ignored name: the trainer's own scratch
    ballast.write_bytes(b"\0" * (44 * MiB))
    t.watch()
    writer = t.writer(hf(t, saves=36, interval=0.1, keep=0, model=MiB))
    t.until(lambda: History.read(t.record).failed, 60, "the disk to fill up")
    t.faults["enospc"] += 1
    t.sleep(t.rng.uniform(0.2, 2))
    ballast.unlink()
    t.wait_writer(writer)
    t.drain()


def rotation(t: Trial, full: bool) -> None:
    """Hugging Face rotation every ~100 ms (save_total_limit=2): rotated checkpoints must be stored."""
    t.watch()
    t.wait_writer(t.writer(hf(t, saves=30 if full else 15, interval=0.1, keep=2, model=MiB)))
    t.drain()


def rewrites(t: Trial, full: bool) -> None:
    """Files rewritten in place, truncated and deleted while their upload is under way."""
    multipart = t.rng.random() < 0.5
    extra = SMALL_PARTS if multipart else ()
    t.watch(*extra, "--bandwidth-limit", "24MiB")
    size = (8 if multipart else 3) * MiB
    t.wait_writer(t.writer({"mode": "rewrite", "size": size, "files": 3, "rounds": 8, "interval": 0.2}))
    t.drain()


def lost_events(t: Trial, full: bool) -> None:
    """The daemon is stopped (SIGSTOP) while files are written, 8 inotify events each (create, open,
    modify, close, then two reads), 25% more than the kernel queues (fs.inotify.max_queued_events,
    read at run time; not lowered: it is machine-wide): events are lost, and reconciliation must find
    every file before the drain, within a few rescan periods."""
    files = int(int(Path("/proc/sys/fs/inotify/max_queued_events").read_text()) / 8 * 1.25)
    d = t.watch("--rescan-interval", "2")
    d.signal(signal.SIGSTOP)
    t.faults["sigstop"] += 1
    writer = t.writer({"mode": "many", "files": files, "reads": 2})
    t.until(lambda: not writer.alive(), 120, "the writer")
    d.signal(signal.SIGCONT)
    try:
        t.until(lambda: _all_uploaded(t, files), 60, "every file found without a drain", interval=0.5)
    except AssertionError:
        t.violations.append("stall: files written during the overflow were not found within 60 s (rescan every 2 s)")
    t.drain()


def _all_uploaded(t: Trial, count: int) -> bool:
    return sum(1 for e in t.daemons[-1].events("uploaded") if e.get("path", "").startswith("bulk/")) >= count


def clock_jumps(t: Trial, full: bool) -> None:
    """The wall clock jumps back and forth (libfaketime: an NTP step, a VM restore) while ckptd
    uploads, is killed mid-multipart and restarts."""
    lib = glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1") or glob.glob("/usr/lib/faketime/libfaketimeMT.so.1")
    if not lib:
        raise AssertionError("libfaketime is not installed (apt-get install faketime)")
    t.fake_clock = True
    clock = t.dir / "faketime"
    clock.write_text("+0\n")
    env = {"LD_PRELOAD": lib[0], "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1",
           "DONT_FAKE_MONOTONIC": "1"}  # fmt: skip
    t.watch(*SMALL_PARTS, env=env)
    # Rotation slower than elsewhere: under libfaketime on a busy CPU the detector acts on a close
    # up to ~1 s late (measured), and a checkpoint rotated away faster than that tests the
    # preload's overhead, not the clock jumps this scenario is about (sigkill_daemon covers fast
    # rotation).
    writer = t.writer(hf(t, saves=10 if full else 7, interval=0.3, keep=5, model=6 * MiB))
    for jump in t.rng.sample(["-3h", "+2d", "-400d", "+30d", "-1m"], 3):
        t.sleep(t.rng.uniform(0.2, 1.0))
        clock.write_text(jump + "\n")
        t.faults["clock_jump"] += 1
        if t.rng.random() < 0.3:
            t.kill_daemon()
            t.watch(*SMALL_PARTS, env=env)
    t.wait_writer(writer)
    t.drain()


def wait_parts(t: Trial, count: int, timeout: float = 120) -> None:
    t.until(lambda: len(t.store.proxy.requests("UploadPart")) >= count, timeout, f"{count} parts sent")
