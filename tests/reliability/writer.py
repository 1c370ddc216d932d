"""The trainer simulator: writes checkpoints as real trainers do and records every completed file.

Run as a script (by a trial in `watch` mode, or by `ckptd run` as its start command), steered by
the JSON plan in WRITER_PLAN: `mode` is one of

    hf        Hugging Face style checkpoint-N/ folders, trainer_state.json last, rotation (keep)
    shards    marker-less step-N/ folders of shards; `hold` shards of one more, then wait forever
    rewrite   checkpoint-1/ committed, then its files rewritten in place, truncated and deleted
    many      many small files at once (lost inotify events)
    big       checkpoint-1/ with one big model file (multipart), then its marker
    children  hf, plus a child in our process group that ignores SIGTERM and a setsid grandchild

and `record` is where the events go (see record.py). The folder is `folder`, or BT_CHECKPOINT_DIR.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reliability.record import Recorder

MiB = 1 << 20


class Writer:
    def __init__(self, folder: Path, rec: Recorder, plan: dict) -> None:
        self.folder, self.rec, self.plan = folder, rec, plan
        self.rng = random.Random(plan.get("seed", 0))
        self.block = self.rng.randbytes(MiB)

    def write(self, rel: str, size: int, pause: float = 0.0, in_place: bool = False) -> bool:
        """Write a new version of `rel` (`size` bytes); False if the disk was full."""
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rec.emit("begin", path=rel)
        sha, left, n = hashlib.sha256(), size, 0
        try:
            with open(path, "r+b" if in_place and path.exists() else "wb") as f:
                while left:
                    c = min(left, MiB)
                    chunk = self.numbered(n, c) if size > 8 * MiB else self.rng.randbytes(c)
                    f.write(chunk)
                    sha.update(chunk)
                    left, n = left - len(chunk), n + 1
                    if pause:
                        f.flush()
                        time.sleep(pause)  # the writer's pace: a slow save the daemon can read mid-way
                f.truncate(size)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            path.unlink(missing_ok=True)
            self.rec.emit("failed", path=rel, error="ENOSPC")
            return False
        self.rec.emit("done", path=rel, sha=sha.hexdigest(), size=size)
        return True

    def numbered(self, n: int, size: int) -> bytes:
        return (n.to_bytes(8, "little") + self.rng.randbytes(8) + self.block[16:])[:size]

    def remove(self, rel: str) -> None:
        path = self.folder / rel
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        for p in files:
            self.rec.emit("deleted", path=p.relative_to(self.folder).as_posix())

    def save_hf(self, name: str, step: int) -> bool:
        sizes = self.plan.get("sizes", {})
        files = [
            ("training_args.bin", 2048),
            ("model.safetensors", sizes.get("model", 300_000)),
            ("optimizer.pt", sizes.get("optimizer", 150_000)),
            ("rng_state.pth", 14_000),
        ]
        for file, size in files:
            if not self.write(f"{name}/{file}", size):
                return False
        if step == self.plan.get("odd_step"):
            for odd in self.plan.get("odd_names", []):  # names no store can hold (surrogate-escaped bytes)
                (self.folder / name / odd).write_bytes(b"a file with a name no key can hold")
                self.rec.emit("unstorable", path=f"{name}/{odd}", why="name")
        state = json.dumps({"global_step": step, "log_history": [{"loss": 1 / step, "step": step}]}).encode()
        if not self.write_bytes(f"{name}/trainer_state.json", state):
            return False
        self.rec.emit("complete", checkpoint=name)
        return True

    def write_bytes(self, rel: str, data: bytes) -> bool:
        path = self.folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rec.emit("begin", path=rel)
        try:
            path.write_bytes(data)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            path.unlink(missing_ok=True)
            self.rec.emit("failed", path=rel, error="ENOSPC")
            return False
        self.rec.emit("done", path=rel, sha=hashlib.sha256(data).hexdigest(), size=len(data))
        return True

    def pause(self) -> None:
        interval = self.plan.get("interval", 0.1)
        time.sleep(interval * self.rng.uniform(0.5, 1.5))


def hf(w: Writer) -> None:
    keep, prefix = w.plan.get("keep", 0), w.plan.get("prefix", "checkpoint-")
    saved: list[str] = []
    step, last = w.plan.get("start", 1), w.plan.get("start", 1) + w.plan.get("saves", 10)
    while step < last or w.plan.get("forever"):
        name = f"{prefix}{step}"
        if w.save_hf(name, step):
            saved.append(name)
        while keep and len(saved) > keep:
            w.remove(saved.pop(0))
        step += 1
        w.pause()


def shards(w: Writer) -> None:
    count, size = w.plan.get("shards", 4), w.plan.get("shard_size", 100_000)
    for c in range(1, w.plan.get("checkpoints", 2) + 1):
        for s in range(count):
            w.write(f"step-{c}/shard-{s}.bin", size)
        w.rec.emit("complete", checkpoint=f"step-{c}")
        w.pause()
    if w.plan.get("hold"):
        c = w.plan.get("checkpoints", 2) + 1
        for s in range(w.plan["hold"]):
            w.write(f"step-{c}/shard-{s}.bin", size)
        Path(w.plan["holding"]).touch()
        while True:
            signal.pause()  # half a checkpoint, until the trial kills us


def rewrite(w: Writer) -> None:
    """checkpoint-1 commits, then its files change under the daemon: rewritten in place (slowly),
    truncated to a new shorter version, or deleted while their upload may be under way."""
    size = w.plan.get("size", 2 * MiB)
    names = [f"checkpoint-1/part-{i}.bin" for i in range(w.plan.get("files", 3))]
    for rel in names:
        w.write(rel, size)
    w.write_bytes("checkpoint-1/trainer_state.json", b'{"global_step": 1}')
    w.rec.emit("complete", checkpoint="checkpoint-1")
    time.sleep(w.plan.get("first_pause", 0))  # time for this version to be stored and committed
    alive = list(names)
    for _ in range(w.plan.get("rounds", 6)):
        w.pause()
        op = w.rng.choice(w.plan.get("ops", ["inplace", "truncate", "delete"])) if alive else "new"
        rel = w.rng.choice(alive) if alive else f"checkpoint-1/late-{w.rng.randrange(1 << 30)}.bin"
        if op == "inplace":
            w.write(rel, size, pause=w.plan.get("slow", 0.05), in_place=True)
        elif op == "truncate":
            w.write(rel, w.rng.randrange(1, size))
        elif op == "delete":
            w.remove(rel)
            alive.remove(rel)
        else:
            w.write(rel, size)
            alive.append(rel)


def many(w: Writer) -> None:
    for i in range(w.plan.get("files", 6000)):
        rel = f"bulk/d{i % 50}/f{i}.bin"
        w.write_bytes(rel, i.to_bytes(4, "little"))
        for _ in range(w.plan.get("reads", 0)):  # IN_OPEN + IN_CLOSE_NOWRITE each
            (w.folder / rel).read_bytes()
    w.rec.emit("complete", checkpoint="bulk")


def big(w: Writer) -> None:
    w.write("checkpoint-1/model.safetensors", w.plan["size"])
    w.write_bytes("checkpoint-1/trainer_state.json", b'{"global_step": 1}')
    w.rec.emit("complete", checkpoint="checkpoint-1")


def children(w: Writer) -> None:
    """The leader saves and exits on SIGTERM; a child in its group ignores TERM, a grandchild in its
    own session too, and both keep saving until they are killed."""
    base = {**w.plan, "mode": "hf", "forever": True, "keep": 0}
    env = dict(os.environ)
    for role, setsid in (("child", False), ("grandchild", True)):
        env["WRITER_PLAN"] = json.dumps({**base, "role": role, "prefix": f"{role}-step-", "ignore_term": True})
        subprocess.Popen([sys.executable, __file__], env=env, start_new_session=setsid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    hf(w)
    while True:
        signal.pause()


MODES = {"hf": hf, "shards": shards, "rewrite": rewrite, "many": many, "big": big, "children": children}


def main() -> None:
    plan = json.loads(os.environ["WRITER_PLAN"])
    if plan.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    folder = Path(plan.get("folder") or os.environ["BT_CHECKPOINT_DIR"])
    rec = Recorder(plan["record"])
    rec.emit("pid", pid=os.getpid(), role=plan.get("role", "leader"))
    MODES[plan["mode"]](Writer(folder, rec, plan))
    rec.emit("end")


if __name__ == "__main__":
    main()
