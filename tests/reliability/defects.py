"""One scenario per defect of issue 10, replayed for real; each passes once its fix has landed.

(Defect 4's disk-full half is scenarios.disk_full.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time

from reliability.checks import RANK, manifests
from reliability.harness import Trial
from reliability.record import History, Recorder
from reliability.scenarios import hf

NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def plant(t: Trial, rel: str, why: str) -> None:
    rec = Recorder(t.record)
    rec.emit("planted", path=rel, why=why)
    rec.close()


def symlinks_out(t: Trial, full: bool) -> None:
    """1: links to a folder and a file outside, and a loop, made before the start, while watching,
    and renamed in; nothing outside may be read, in either watch mode (odd trials poll, as on NFS)."""
    outside = t.dir / "outside"
    outside.mkdir()
    t.secret = os.urandom(32).hex().encode()
    (outside / "shadow").write_bytes(b"root:" + t.secret * 64)
    (t.ckpt / "checkpoint-0").mkdir()
    links = [("etc", outside), ("checkpoint-0/leak.bin", outside / "shadow"), ("loop", t.ckpt)]
    for rel, target in links:
        _link(t, rel, target)
    t.watch("--watch-mode", "poll" if t.index % 2 else "inotify")
    writer = t.writer(hf(t, saves=4, interval=0.2, keep=0))
    t.sleep(0.2)
    made = time.monotonic()
    for rel, target in [("late-etc", outside), ("late-loop", t.ckpt), ("checkpoint-1/late.bin", outside / "shadow")]:
        _link(t, rel, target)
    staged = t.dir / "staged-link"  # made outside, then renamed in
    staged.symlink_to(outside)
    plant(t, "renamed-in", "symlink")
    os.rename(staged, t.ckpt / "renamed-in")
    t.wait_writer(writer)
    t.sleep(made + 3 - time.monotonic())  # three poll periods with the late links in place
    t.drain()


def _link(t: Trial, rel: str, target: os.PathLike) -> None:
    (t.ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
    (t.ckpt / rel).symlink_to(target)
    plant(t, rel, "symlink")


def restore_links(t: Trial, full: bool) -> None:
    """2: the restore folder holds a link where a checkpoint goes, and one at a temporary name."""
    t.watch()
    t.wait_writer(t.writer(hf(t, saves=2, interval=0.1, keep=0)))
    t.drain()
    dest, elsewhere = t.dir / "restore-links", t.dir / "elsewhere"
    (dest / "rank-0" / "checkpoint-1").mkdir(parents=True)
    elsewhere.mkdir()
    victims = {elsewhere / "model.safetensors": b"victim one", t.dir / "victim-two": b"victim two"}
    for path, data in victims.items():
        path.write_bytes(data)
    (dest / "rank-0" / "checkpoint-2").symlink_to(elsewhere)
    (dest / "rank-0" / "checkpoint-1" / ".model.safetensors.ckptd-part").symlink_to(t.dir / "victim-two")
    refs = [{"typ": "baseten_named_checkpoint", "checkpoint_name": f"checkpoint-{n}", "job_id": "job-1",
             "required": True} for n in (1, 2)]  # fmt: skip
    rc, proc = t.restore(refs, dest)
    if any(path.read_bytes() != data for path, data in victims.items()):
        t.violations.append("restore: a file outside the restore folder was overwritten through a link")
    if sorted(p.name for p in elsewhere.iterdir()) != ["model.safetensors"]:
        t.violations.append("restore: files were written into a folder outside the restore folder")
    if rc != 3:
        t.violations.append(f"exit: restore through a conflicting link exited {rc}, expected 3:\n{proc.tail(5)}")


def special_files(t: Trial, full: bool) -> None:
    """3: a FIFO, a socket and a device file in the folder; then SIGTERM must stop the daemon."""
    (t.ckpt / "checkpoint-0").mkdir()
    os.mkfifo(t.ckpt / "checkpoint-0" / "pipe")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(t.ckpt / "sock"))
    os.mknod(t.ckpt / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    for rel, why in (("checkpoint-0/pipe", "fifo"), ("sock", "socket"), ("null", "device")):
        plant(t, rel, why)
    t.watch("--watch-mode", "poll" if t.index % 2 else "inotify")
    writer = t.writer(hf(t, saves=4, interval=0.2, keep=0))
    t.sleep(0.3)
    os.mkfifo(t.ckpt / "late.fifo")
    plant(t, "late.fifo", "fifo")
    fd = os.open(t.ckpt / "late.fifo", os.O_RDWR)  # written to and closed: a close-write event, no reader
    os.write(fd, b"x")
    os.close(fd)
    t.wait_writer(writer)
    t.drain(timeout=60, by_signal=signal.SIGTERM)


def unreadable(t: Trial, full: bool) -> None:
    """4: one unreadable file (EACCES, as nobody: root reads everything); every other file is still
    stored, the file is reported, its checkpoint does not commit, and the exit code is 4."""
    for path in (t.dir, t.ckpt, t.store.root):
        os.chown(path, NOBODY, NOBODY)
    bad = t.ckpt / "checkpoint-1" / "unreadable.bin"
    bad.parent.mkdir()
    os.chown(bad.parent, NOBODY, NOBODY)
    bad.write_bytes(b"secret weights")
    os.chown(bad, NOBODY, NOBODY)
    bad.chmod(0)
    t.record.touch()
    os.chown(t.record, NOBODY, NOBODY)
    rec = Recorder(t.record)
    rec.emit("unstorable", path="checkpoint-1/unreadable.bin", why="EACCES")
    rec.close()
    t.watch(prefix=AS_NOBODY)
    t.wait_writer(t.writer(hf(t, saves=4, interval=0.2, keep=0), prefix=AS_NOBODY))
    rc = t.drain()
    if rc != 4:
        t.violations.append(f"exit: ckptd exited {rc} with an unreadable file not stored, expected 4")


def rewrite_committed(t: Trial, full: bool) -> None:
    """5: committed files rewritten in place while they are re-uploaded (single PUT): at every
    moment (sampled while it runs, and right after a SIGKILL) each committed manifest must match its
    objects."""
    t.watch("--multipart-threshold", "64MiB")  # one PUT that takes a while: 24 MiB
    plan = {"mode": "rewrite", "ops": ["inplace"], "files": 1, "size": 24 << 20, "rounds": 8, "interval": 0.2}
    writer = t.writer({**plan, "slow": 0.02, "first_pause": 1.5})
    t.until(lambda: t.running() and t.daemons[-1].events("checkpoint committed"), 30, "the first commit")
    kill_at = time.monotonic() + t.rng.uniform(1.5, 4.0)
    while writer.alive() and time.monotonic() < kill_at:
        snapshot(t, "while rewriting")
    t.kill_daemon()
    snapshot(t, "right after SIGKILL")
    t.watch()
    t.wait_writer(writer)
    t.drain()


def snapshot(t: Trial, when: str) -> None:
    """Committed manifests against their objects. A manifest read the same before and after the
    objects were read was committed all along: a mismatch is then a torn store, not our timing."""
    before = manifests(t)
    objects = t.store.scan(RANK)
    after = manifests(t)
    for name, m in before.items():
        if after.get(name) != m:
            continue
        for f in m["files"]:
            blob = objects.get(f["path"])
            if blob is None or (blob.size, blob.sha256) != (f["size"], f["sha256"]):
                held = "nothing" if blob is None else f"{blob.size} B, sha256 {blob.sha256[:12]}"
                line = f"corrupt: {when}, committed {name!r} names {f['path']!r}; the store holds {held}"
                if not any(v.startswith(line[:60]) for v in t.violations):
                    t.violations.append(line)


def sigterm_markerless(t: Trial, full: bool) -> None:
    """6: SIGTERM while a marker-less checkpoint is half written (1 of 4 shards): it must not commit."""
    t.watch()
    holding = t.dir / "holding"
    t.writer({"mode": "shards", "checkpoints": 2, "hold": 1, "holding": str(holding), "interval": 0.1})
    t.until(holding.exists, 60, "half a checkpoint")
    d = t.daemons[-1]
    t.until(lambda: any(e.get("path") == "step-3/shard-0.bin" for e in d.events("uploaded")), 30, "shard stored")
    t.drain(by_signal=signal.SIGTERM)


def unstorable_name(name: str):
    def scenario(t: Trial, full: bool) -> None:
        t.watch()
        t.wait_writer(t.writer(hf(t, saves=3, interval=0.2, keep=0, odd_step=2, odd_names=[name])))
        rc = t.drain()
        if rc != 4:
            t.violations.append(f"exit: ckptd exited {rc} with a file it cannot store, expected 4")
        drained = json.dumps(t.daemons[-1].events("drained"))
        if "checkpoint-2" not in drained:
            t.violations.append("report: the drain report does not name the checkpoint it could not store")

    scenario.__doc__ = f"7: a file named {name!r} in checkpoint-2: not committed, named, exit 4"
    return scenario


JOURNAL = ".ckptd/journal-rank-0.jsonl"


def corrupt_journal(t: Trial) -> str:
    journal = t.ckpt / JOURNAL
    how = ["garbage", "not-an-object", "escaping-path", "directory"][t.index % 4]
    if how == "garbage":
        with open(journal, "ab") as f:
            f.write(os.urandom(512))
    elif how == "not-an-object":
        with open(journal, "a") as f:
            f.write('["stored", 1]\n')
    elif how == "escaping-path":
        lines = [json.loads(line) for line in journal.read_text().splitlines() if '"stored"' in line]
        bad = {**lines[0], "relpath": "../../../etc/passwd"} if lines else {"op": "stored", "relpath": "../x"}
        with open(journal, "a") as f:
            f.write(json.dumps(bad) + "\n")
    else:
        journal.unlink()
        journal.mkdir()
    return how


def garbage_journal(t: Trial, full: bool) -> None:
    """8: a corrupt journal is set aside; the daemon recovers from the store's manifests."""
    t.watch()
    t.wait_writer(t.writer(hf(t, saves=3, interval=0.1, keep=0)))
    t.drain()
    t.notes.append(f"journal: {corrupt_journal(t)}")
    first = set(History.read(t.record).last_done)
    t.watch()
    t.wait_writer(t.writer(hf(t, saves=3, interval=0.1, keep=0, start=4)))
    t.drain()
    again = [e["path"] for e in t.daemons[-1].events("uploaded") if e.get("path") in first]
    t.figures["reuploaded_after_recovery"] += len(again)
    if again:
        t.violations.append(f"resume: {len(again)} file(s) provably stored were uploaded again, e.g. {again[0]!r}")


def trainer_children(t: Trial, full: bool) -> None:
    """9: the trainer's leader exits on SIGTERM; a child in its group that ignores TERM and a setsid
    grandchild keep writing. None may outlive ckptd unreported."""
    d = t.run({"mode": "children", "saves": 3, "interval": 0.2}, "--stop-timeout", "2")
    roles = lambda: set(History.read(t.record).pids.values())  # noqa: E731
    t.until(lambda: {"leader", "child", "grandchild"} <= roles(), 60, "the trainer's children")
    t.until(lambda: any(c.startswith("child-") for c in History.read(t.record).complete), 30, "a child's save")
    t.drain(d, timeout=60, by_signal=signal.SIGTERM)
    pids = History.read(t.record).pids
    log = d.log.read_text(errors="replace")
    for pid in t.strays():
        role = pids[pid]
        if role != "grandchild" or str(pid) not in log:
            t.violations.append(f"stray: the trainer's {role} (pid {pid}) outlived ckptd and was not reported")
    t.torn_ok = True  # the children were killed, maybe mid-write
