"""The first lines of the reference docs' training code ("Using Checkpoints in Your Training Code",
loading-checkpoints.md), run by `ckptd run` as a trainer: which branch it takes and what it finds.
The lines that decide are verbatim; loading a model is left to tests/frameworks/test_reference_example.py.

PROBE_OUT: JSON file (outside the checkpoint folder) for {branch, checkpoint_dir, last_checkpoint,
real_path, tokenizer_config}.
"""

import json
import os

from transformers.trainer_utils import get_last_checkpoint

checkpoint_dir = os.environ.get("BT_LOAD_CHECKPOINT_DIR")
last_checkpoint = None
tokenizer_config = None

if checkpoint_dir:
    last_checkpoint = get_last_checkpoint(checkpoint_dir)
    if last_checkpoint:
        print(f"✅ Resuming from checkpoint: {last_checkpoint}")
        branch = "resume"
        # What AutoTokenizer.from_pretrained(checkpoint_dir) reads first.
        with open(os.path.join(checkpoint_dir, "tokenizer_config.json")) as f:
            tokenizer_config = json.load(f)
    else:
        print("⚠️ No checkpoint found, starting from scratch")
        branch = "scratch"
else:
    print("ℹ️ No checkpoint loading configured")
    branch = "not configured"

with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump(
        {
            "branch": branch,
            "checkpoint_dir": checkpoint_dir,
            "last_checkpoint": last_checkpoint,
            "real_path": last_checkpoint and os.path.realpath(last_checkpoint),
            "tokenizer_config": tokenizer_config,
        },
        f,
    )
