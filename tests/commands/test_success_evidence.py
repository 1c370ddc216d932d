"""SPEC §4 "Success evidence": a checkpoint without a completion marker commits at the end only on
evidence of success (the trainer's exit 0 in `run`, the --exit-when file in `watch`); a stop signal
is no evidence and commits nothing that lacks its marker. Real `ckptd` subprocesses, a file:// store."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from daemons import JOB, PROJECT, Daemon, base_env

KIND = "integration"

# A writer without markers (plain `torch.save` into step folders), never quiet long enough to commit.
QUIET = "600"


def common(tmp_path: Path) -> list[str]:
    return [
        "--storage",
        f"file://{tmp_path / 'store'}",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--project",
        PROJECT,
        "--job-id",
        JOB,
        "--settle-time",
        "0.05",
        "--quiet-commit",
        QUIET,
        "--metrics-addr",
        "127.0.0.1:0",
        "--drain-timeout",
        "30",
    ]


def manifest(tmp_path: Path, checkpoint: str) -> dict | None:
    path = tmp_path / "store" / "training_projects" / PROJECT / "jobs" / JOB / "manifests" / "rank-0"
    try:
        return json.loads((path / f"{checkpoint}.json").read_text())
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("stop, committed", [("exit-file", True), ("sigterm", False)])
def test_watch_commits_a_markerless_checkpoint_only_on_the_exit_file(tmp_path: Path, stop: str, committed: bool):
    exit_file = tmp_path / "exit"
    d = Daemon(["watch", *common(tmp_path), "--exit-when", str(exit_file)], base_env(), tmp_path / "watch.log")
    try:
        d.wait_event("watching")
        (tmp_path / "ckpt" / "step-3").mkdir()
        (tmp_path / "ckpt" / "step-3" / "weights.bin").write_bytes(b"weights")
        d.wait_event("uploaded", where=lambda e: e["path"] == "step-3/weights.bin")
        if stop == "exit-file":
            exit_file.touch()
        else:
            d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.tail()
    finally:
        d.kill()
    found = manifest(tmp_path, "step-3")
    assert (found is not None) is committed, d.tail()
    if committed:
        assert found["reason"] == "final"


TRAINER = r"""
import os, signal, sys, time
ckpt = os.environ["BT_CHECKPOINT_DIR"]
os.makedirs(f"{ckpt}/step-3", exist_ok=True)
with open(f"{ckpt}/step-3/weights.bin", "wb") as f:
    f.write(b"weights")
if sys.argv[1] == "exit-0":
    sys.exit(0)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a trainer that stops cleanly when asked
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("how, committed", [("exit-0", True), ("sigterm", False)])
def test_run_commits_a_markerless_checkpoint_only_when_the_trainer_succeeds_unasked(
    tmp_path: Path, how: str, committed: bool
):
    args = ["run", *common(tmp_path), "--stop-timeout", "10", "--", sys.executable, "-c", TRAINER, how]
    d = Daemon(args, base_env(), tmp_path / "run.log")
    try:
        if how == "sigterm":
            d.wait_event("uploaded", where=lambda e: e["path"] == "step-3/weights.bin")
            d.signal(signal.SIGTERM)
        assert d.wait(60) == 0, d.tail()
    finally:
        d.kill()
    found = manifest(tmp_path, "step-3")
    assert (found is not None) is committed, d.tail()
    if committed:
        assert found["reason"] == "final"
