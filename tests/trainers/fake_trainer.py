"""A trainer for tests, run by `ckptd run`: what it finds, writes and does is steered by env vars.

TRAINER_RECORD   JSON file (outside the checkpoint folder) where it reports what it restored and wrote
TRAINER_STEPS    checkpoints to write, Hugging Face style (trainer_state.json last)
TRAINER_SIZE     bytes of model.safetensors per checkpoint
TRAINER_EXIT     exit code at the end; "kill" dies of SIGKILL instead
TRAINER_WAIT     "yes": after writing, wait for a signal (TRAINER_READY file says it is waiting)
TRAINER_ON_TERM  "save": on SIGTERM write checkpoint-final and exit 0; "ignore": ignore SIGTERM
TRAINER_ON_USR1  "ignore": ignore SIGUSR1 (else it ends the trainer, as it would a real one)
TRAINER_NOTE     "yes": SIGHUP, SIGUSR1 and SIGUSR2 are noted in the record ("signals", in order), and
                 the trainer goes on
TRAINER_FLOOD    "yes": after writing, say it is ready (TRAINER_READY), then write to stdout forever
                 (a pipe nobody reads fills up and blocks whoever writes to it, ckptd too)

The record also holds the trainer's pid, to check after the test that it is gone.
"""

import hashlib
import json
import os
import re
import signal
import sys
from pathlib import Path

env = os.environ
record_path = Path(env["TRAINER_RECORD"])
record: dict = {"env": {k: v for k, v in env.items() if k.startswith("BT_")}, "written": {}, "pid": os.getpid()}
save_dir = Path(env["BT_CHECKPOINT_DIR"])
# Absent when checkpoint loading is not enabled (SPEC §3); the record tells the test which.
load_dir = Path(env.get("BT_LOAD_CHECKPOINT_DIR", "/nonexistent")) / f"rank-{env['BT_NODE_RANK']}"


def save_record() -> None:
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)


def restored() -> dict:
    """Every restored file with its SHA-256, and the last checkpoint as get_last_checkpoint finds it."""
    files = (
        {
            str(p.relative_to(load_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in load_dir.rglob("*")
            if p.is_file()
        }
        if load_dir.is_dir()
        else {}
    )
    names = (
        [p.name for p in load_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)]
        if load_dir.is_dir()
        else []
    )
    last = max(names, key=lambda n: int(n.split("-")[1]), default=None)
    return {"files": files, "last": last}


def write(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    record["written"][f"{folder.name}/{name}"] = hashlib.sha256(data).hexdigest()


def save(name: str, step: int) -> None:
    folder = save_dir / name
    write(folder, "training_args.bin", b"args")
    write(folder, "model.safetensors", os.urandom(int(env.get("TRAINER_SIZE", "50000"))))
    write(folder, "trainer_state.json", json.dumps({"global_step": step}).encode())
    save_record()


def on_term(signum, frame) -> None:
    save("checkpoint-final", 10_000)
    record["terminated"] = True
    save_record()
    sys.exit(0)


record["restored"] = restored()
save_record()
if env.get("TRAINER_ON_TERM") == "save":
    signal.signal(signal.SIGTERM, on_term)
elif env.get("TRAINER_ON_TERM") == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if env.get("TRAINER_ON_USR1") == "ignore":
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def note(signum, frame) -> None:
    record.setdefault("signals", []).append(signal.Signals(signum).name)
    save_record()


if env.get("TRAINER_NOTE") == "yes":
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, note)
for step in range(1, int(env.get("TRAINER_STEPS", "0")) + 1):
    save(f"checkpoint-{step}", step)
if env.get("TRAINER_FLOOD") == "yes":
    Path(env["TRAINER_READY"]).touch()
    while True:
        print("x" * 200, flush=True)
if env.get("TRAINER_WAIT") == "yes":
    Path(env["TRAINER_READY"]).touch()
    while True:
        signal.pause()  # until a signal
if env.get("TRAINER_EXIT") == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(env.get("TRAINER_EXIT", "0")))
