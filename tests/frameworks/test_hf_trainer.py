"""The Hugging Face Trainer through `ckptd run`, end to end on the JuiceFS gateway.

tests/frameworks/trainers/hf_train.py is a user's script: a tiny GPT-2 from a config, output_dir =
$BT_CHECKPOINT_DIR, save and evaluate every 2 steps, save_total_limit=2, and at start
`get_last_checkpoint($BT_LOAD_CHECKPOINT_DIR/rank-0)` + `trainer.train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import json

from daemons import PROJECT
from fwkit import (
    HF_TRAIN,
    checkpoints_of,
    latest_of,
    manifest_files,
    manifests_listed,
    of_checkpoint,
    require,
    stored_files,
    stored_json,
)

KIND = "slow"

CHECKPOINTS = [f"checkpoint-{n}" for n in (2, 4, 6, 8, 10)]  # max_steps 10, save_steps 2


def eval_loss_at(state: dict, step: int) -> float:
    return next(e["eval_loss"] for e in state["log_history"] if e.get("step") == step and "eval_loss" in e)


def test_every_checkpoint_is_stored_and_the_next_job_resumes_where_training_stopped(ckptd_job, juicefs_bucket):
    require("torch", "transformers", "accelerate")
    a = ckptd_job(juicefs_bucket, "hf-a", HF_TRAIN, env={"HF_MAX_STEPS": "10"})
    assert a.wait() == 0, a.daemon.tail()
    first = a.result("hf.json")
    assert first["resumed_from"] is None and first["global_step"] == 10

    # save_total_limit=2 left two checkpoints on disk; storage has every one ever saved.
    assert sorted(p.name for p in a.ckpt.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-8"]
    stored = stored_files(juicefs_bucket, "hf-a")
    assert checkpoints_of(stored) == set(CHECKPOINTS)
    names = {path.split("/", 1)[1] for path in a.local_files("checkpoint-10")}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "training_args.bin"} <= names
    for cp in CHECKPOINTS:  # rotated away or not, each was stored whole
        assert {path.split("/", 1)[1] for path in of_checkpoint(stored, cp)} == names, cp
    for cp in ("checkpoint-8", "checkpoint-10"):
        assert of_checkpoint(stored, cp) == a.local_files(cp)

    # One manifest per checkpoint, committed on its marker, listing exactly what was stored, with the
    # evaluation loss of trainer_state.json.
    for cp in CHECKPOINTS:
        manifest = stored_json(juicefs_bucket, "hf-a", f"manifests/rank-0/{cp}.json")
        step = int(cp.split("-")[1])
        assert (manifest["checkpoint"], manifest["step"], manifest["reason"]) == (cp, step, "marker")
        assert manifest_files(manifest) == of_checkpoint(stored, cp)
        state = stored_json(juicefs_bucket, "hf-a", f"rank-0/{cp}/trainer_state.json")
        assert state["global_step"] == step
        assert manifest["metrics"]["eval_loss"] == eval_loss_at(state, step)

    # A new job restores the project's latest checkpoint and the Trainer resumes from it.
    b = ckptd_job(juicefs_bucket, "hf-b", HF_TRAIN, refs=[latest_of(project=PROJECT)], env={"HF_MAX_STEPS": "16"})
    assert b.wait() == 0, b.daemon.tail()
    second = b.result("hf.json")
    assert second["resumed_from"] == str(b.loaded / "rank-0" / "checkpoint-10")
    assert b.restored_files() == a.local_files("checkpoint-10")
    assert (second["resumed_step"], second["global_step"]) == (10, 16)
    assert [step for step, _ in second["losses"]] == list(range(11, 17))  # no step trained twice

    # Its trainer state continues the restored one: the first job's history, then steps 11..16.
    state = json.loads((b.ckpt / "checkpoint-16" / "trainer_state.json").read_text())
    restored = json.loads((b.loaded / "rank-0" / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 16
    assert state["log_history"][: len(restored["log_history"])] == restored["log_history"]

    # The loss curve goes on from where it stopped: the first loss after resuming is near the last
    # one before, far below the untrained model's.
    initial, last = first["losses"][0][1], first["losses"][-1][1]
    resumed = second["losses"][0][1]
    assert initial - last > 0.5, first["losses"]  # the first job did learn something
    assert abs(resumed - last) < 0.25 * (initial - last), (first["losses"], second["losses"])
    assert max(eval_loss_at(state, s) for s in (12, 14, 16)) < eval_loss_at(restored, 2)
    assert sorted(p.name for p in b.ckpt.glob("checkpoint-*")) == ["checkpoint-14", "checkpoint-16"]
    assert checkpoints_of(stored_files(juicefs_bucket, "hf-b")) == {"checkpoint-12", "checkpoint-14", "checkpoint-16"}


def test_a_trainer_killed_while_saving_resumes_from_the_last_committed_checkpoint(ckptd_job, juicefs_bucket):
    require("torch", "transformers", "accelerate")
    # SIGKILL while saving checkpoint-6: its model, optimizer, scheduler and RNG files are written,
    # trainer_state.json (written last by the Trainer) is not.
    a = ckptd_job(juicefs_bucket, "hf-killed", HF_TRAIN, env={"HF_MAX_STEPS": "10", "HF_KILL_AT_SAVE": "6"})
    assert a.wait() == 137, a.daemon.tail()
    half = a.local_files("checkpoint-6")
    assert half and not (a.ckpt / "checkpoint-6" / "trainer_state.json").exists()
    assert (a.ckpt / "checkpoint-6" / "model.safetensors").exists()

    # The half-written save is stored (nothing written is lost) but never committed.
    stored = stored_files(juicefs_bucket, "hf-killed")
    assert of_checkpoint(stored, "checkpoint-6") == half
    assert of_checkpoint(stored, "checkpoint-4") == a.local_files("checkpoint-4")
    assert manifests_listed(juicefs_bucket, "hf-killed") == ["checkpoint-2.json", "checkpoint-4.json"]

    # The next job gets checkpoint-4, which get_last_checkpoint finds, and trains on from step 4.
    b = ckptd_job(juicefs_bucket, "hf-after", HF_TRAIN, refs=[latest_of(project=PROJECT)], env={"HF_MAX_STEPS": "8"})
    assert b.wait() == 0, b.daemon.tail()
    result = b.result("hf.json")
    assert result["resumed_from"] == str(b.loaded / "rank-0" / "checkpoint-4")
    assert sorted(p.name for p in (b.loaded / "rank-0").iterdir()) == ["checkpoint-4"]
    assert b.restored_files() == a.local_files("checkpoint-4")
    assert (result["resumed_step"], result["global_step"]) == (4, 8)
    assert [step for step, _ in result["losses"]] == [5, 6, 7, 8]
