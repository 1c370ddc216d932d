"""The reference docs' own training code ("Using Checkpoints in Your Training Code",
loading-checkpoints.md) resumes through `ckptd run`, on the JuiceFS gateway.

tests/frameworks/trainers/reference_train.py holds the docs' `train()` verbatim except what cannot
run as written, each change marked CHANGED there:
1. "your-base-model" -> a tiny local BERT for sequence classification (nothing can be downloaded);
2. TrainingArguments: save_steps 1000 -> 2, max_steps from the test; load_best_model_at_end=True
   needs evaluations at the save steps (eval_strategy="steps", eval_steps=2); a small CPU run
   (use_cpu, batch sizes, learning rate, seed, no reporters, no tqdm);
3. Trainer(...) gets train_dataset and eval_dataset: a Trainer cannot train without data.
The get_last_checkpoint(checkpoint_dir), from_pretrained(last_checkpoint),
AutoTokenizer.from_pretrained(checkpoint_dir) and trainer.train(resume_from_checkpoint=...) lines
and the prints are verbatim. Around train(), the script saves its tokenizer at the top of
$BT_CHECKPOINT_DIR (REF_SAVE_TOKENIZER), as a user's job does, and records every from_pretrained.

Job A has no loading configured: ckptd gives it no BT_LOAD_CHECKPOINT_DIR and the code takes its
"No checkpoint loading configured" branch. Job B restores job A's latest checkpoint; the same code
finds it in the restore folder itself (a link to rank-0/checkpoint-4), loads the tokenizer from that
folder (a link to the restored root file) and resumes at step 4.
"""

from __future__ import annotations

import json
import os
import sys

from fwkit import TRAINERS, latest_of, require

KIND = "slow"
REFERENCE_TRAIN = [sys.executable, str(TRAINERS / "reference_train.py")]


def test_the_reference_training_code_resumes_through_ckptd_run(ckptd_job, juicefs_bucket, tmp_path):
    require("torch", "transformers", "tokenizers")
    command = REFERENCE_TRAIN
    base = str(tmp_path / "base-model")
    a = ckptd_job(
        juicefs_bucket,
        "ref-a",
        command,
        env={
            "REF_BASE_MODEL": base,
            "REF_MAX_STEPS": "4",
            "REF_SAVE_TOKENIZER": "1",
            "REF_OUT": str(tmp_path / "a.json"),
        },
    )
    assert a.wait(300) == 0, a.daemon.tail()
    log = a.daemon.log.read_text()
    assert "ℹ️ No checkpoint loading configured" in log and "Resuming" not in log
    assert json.loads((tmp_path / "a.json").read_text()) == [["model", base, None], ["tokenizer", base, 64]]
    assert sorted(p.name for p in a.ckpt.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (a.ckpt / "tokenizer.json").is_file()

    b = ckptd_job(
        juicefs_bucket,
        "ref-b",
        command,
        refs=[latest_of(job_id="ref-a")],
        env={"REF_BASE_MODEL": base, "REF_MAX_STEPS": "6", "REF_OUT": str(tmp_path / "b.json")},
    )
    assert b.wait(300) == 0, b.daemon.tail()
    last = b.loaded / "checkpoint-4"
    assert f"✅ Resuming from checkpoint: {last}\n" in b.daemon.log.read_text()
    assert os.path.realpath(last) == str(b.loaded / "rank-0" / "checkpoint-4")  # this rank's, linked
    # The model from the restored checkpoint, the tokenizer from the folder itself: job A's own
    # (model_max_length 48), not the base model's (64).
    assert json.loads((tmp_path / "b.json").read_text()) == [
        ["model", str(last), None],
        ["tokenizer", str(b.loaded), 48],
    ]
    assert os.readlink(b.loaded / "tokenizer_config.json") == "rank-0/tokenizer_config.json"
    # Resumed, not restarted: it saved only step 6, and its state continues job A's.
    assert sorted(p.name for p in b.ckpt.glob("checkpoint-*")) == ["checkpoint-6"]
    state = json.loads((b.ckpt / "checkpoint-6" / "trainer_state.json").read_text())
    restored = json.loads((b.loaded / "rank-0" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and restored["global_step"] == 4
    assert state["log_history"][: len(restored["log_history"])] == restored["log_history"]
    assert a.local_files("checkpoint-4") == {
        k: v for k, v in b.restored_files().items() if k.startswith("checkpoint-4/")
    }
