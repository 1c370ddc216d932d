"""The README's demo command works: train, store, then restore the latest and resume."""

from __future__ import annotations

import subprocess
from pathlib import Path

KIND = "slow"

REPO = Path(__file__).resolve().parent.parent


def test_demo_trains_then_resumes_from_the_stored_checkpoint():
    out = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "train.py: starting from scratch at step 0" in out.stdout
    assert "resuming from" in out.stdout and "checkpoint-5 at step 5" in out.stdout
    stored = [line for line in out.stdout.splitlines() if "/rank-0/checkpoint-" in line]
    assert len([s for s in stored if s.endswith("model.safetensors")]) == 10  # rotated ones included
