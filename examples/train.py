"""A training-like script for the demo: resumes from the latest restored checkpoint, trains a few
steps, saves a checkpoint every step the way Hugging Face does (trainer_state.json last) and keeps
only the two newest locally (save_total_limit=2). ckptd stores every one of them."""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

save_dir = Path(os.environ["BT_CHECKPOINT_DIR"])
load_dir = Path(os.environ["BT_LOAD_CHECKPOINT_DIR"]) / f"rank-{os.environ['BT_NODE_RANK']}"


def last_checkpoint(folder: Path) -> Path | None:
    """What transformers.trainer_utils.get_last_checkpoint does: the highest checkpoint-N."""
    found = (
        [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)] if folder.is_dir() else []
    )
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


resume = last_checkpoint(load_dir)
state = json.loads((resume / "trainer_state.json").read_text()) if resume else {"global_step": 0, "loss": 4.0}
print(
    f"train.py: {'resuming from ' + str(resume) if resume else 'starting from scratch'} "
    f"at step {state['global_step']}, loss {state['loss']:.3f}",
    flush=True,
)

for _ in range(5):
    time.sleep(0.2)  # "training"
    state["global_step"] += 1
    state["loss"] *= 0.8
    folder = save_dir / f"checkpoint-{state['global_step']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_args.bin").write_bytes(b"args")
    (folder / "model.safetensors").write_bytes(random.randbytes(256 * 1024))
    (folder / "trainer_state.json").write_text(json.dumps(state))
    for old in sorted((p for p in save_dir.glob("checkpoint-*")), key=lambda p: int(p.name.split("-")[1]))[:-2]:
        shutil.rmtree(old)  # rotation: ckptd has pinned and will store them anyway
    print(f"train.py: step {state['global_step']}, loss {state['loss']:.3f}, saved {folder.name}", flush=True)
