"""The trainer of the simulated pod (its image's /workspace/train.py): resumes from the last
restored checkpoint of its rank, as `get_last_checkpoint(f"{BT_LOAD_CHECKPOINT_DIR}/rank-N")`
would, saves Hugging Face style checkpoints (`trainer_state.json` last), and prints one JSON line
saying what it found and wrote.

POD_TRAINER_STEPS   checkpoints to write after the one it resumed from
"""

import json
import os
import re
from pathlib import Path


def last_checkpoint(folder: Path) -> Path | None:
    """As `transformers.trainer_utils.get_last_checkpoint`: the highest checkpoint-N folder."""
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def main() -> None:
    env = os.environ
    report = {"env": {k: v for k, v in env.items() if k.startswith(("BT_", "MASTER_"))}, "uid": os.getuid()}
    done = 0
    load = env.get("BT_LOAD_CHECKPOINT_DIR")  # absent when no loading is configured
    if load:
        resumed = last_checkpoint(Path(load) / f"rank-{env['BT_NODE_RANK']}")  # restore's layout
        report["resumed_from"] = resumed.name if resumed else None
        if resumed:
            done = json.loads((resumed / "trainer_state.json").read_text())["global_step"]
            report["restored_weights"] = (resumed / "model.safetensors").read_text()
    out = Path(env["BT_CHECKPOINT_DIR"])
    report["wrote"] = []
    for step in range(done + 1, done + 1 + int(env.get("POD_TRAINER_STEPS", "2"))):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_text(f"weights after step {step}")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        report["wrote"].append(folder.name)
    print(json.dumps(report), flush=True)


main()
