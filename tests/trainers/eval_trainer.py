"""A trainer that leaves what the user CLI works on: Hugging Face style checkpoints with real
safetensors weights and evaluation metrics, and a tokenizer at the top of the checkpoint folder.

TRAINER_STEPS   comma-separated steps, e.g. "10,20,30,40": one checkpoint-N per step, in order
TRAINER_LOSSES  comma-separated eval_loss per step (same order), recorded in trainer_state.json
TRAINER_SIZE    bytes of float32 weights in model.safetensors (default 40000)
TRAINER_RECORD  JSON file where it writes {relpath: sha256} of every file it saved

Files differ per rank (BT_NODE_RANK) so that a test can tell which rank's bytes it got.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

env = os.environ
rank = int(env["BT_NODE_RANK"])
root = Path(env["BT_CHECKPOINT_DIR"])
steps = [int(s) for s in env["TRAINER_STEPS"].split(",")]
losses = [float(v) for v in env["TRAINER_LOSSES"].split(",")]
floats = int(env.get("TRAINER_SIZE", "40000")) // 4
written: dict[str, str] = {}


def keep(path: Path) -> None:
    written[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()


def save(step: int, loss: float, history: list) -> None:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(step * 100 + rank)
    tensors = {
        "embed.weight": rng.standard_normal(floats - 96, dtype=np.float32).reshape(-1, 8)
        if (floats - 96) % 8 == 0
        else rng.standard_normal(floats - 96, dtype=np.float32),
        "head.bias": rng.standard_normal(32, dtype=np.float32),
        "head.weight": rng.standard_normal((8, 8), dtype=np.float32).astype(np.float16),
        "step": np.array([step], dtype=np.int64),
    }
    # Written under a temporary name and renamed, as safetensors' own writers do.
    save_file(tensors, str(folder / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.rename(folder / "model.safetensors.tmp", folder / "model.safetensors")
    (folder / "optimizer.pt").write_bytes(rng.bytes(2048))
    history.append({"step": step, "loss": loss + 0.1})
    history.append({"step": step, "eval_loss": loss})
    state = {"global_step": step, "epoch": step / 10, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))  # the marker, last
    for path in sorted(folder.iterdir()):
        keep(path)


root.mkdir(parents=True, exist_ok=True)
for name, text in (("tokenizer.json", '{"model": "bpe"}'), ("tokenizer_config.json", json.dumps({"rank": rank}))):
    (root / name).write_text(text)
    keep(root / name)
history: list = []
for step, loss in zip(steps, losses, strict=True):
    save(step, loss, history)
Path(env["TRAINER_RECORD"]).write_text(json.dumps(written))
