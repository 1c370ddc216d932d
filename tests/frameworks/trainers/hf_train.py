"""A Hugging Face Trainer job written the way a user writes one for ckptd (docs/frameworks.md):
resume from what ckptd restored under $BT_LOAD_CHECKPOINT_DIR/rank-0, save to $BT_CHECKPOINT_DIR.

A tiny GPT-2 built from a config (nothing is downloaded) learns a few fixed random token sequences.

Test knobs (environment): HF_MAX_STEPS (default 10), HF_SAVE_STEPS (2); TRAINER_OUT, a folder
outside the checkpoint folder where the script reports, in hf.json, what it resumed from and the
losses it logged; HF_KILL_AT_SAVE=N: die of SIGKILL while saving checkpoint-N, after the model, optimizer,
scheduler and RNG files are written but before trainer_state.json (a crash in the middle of a save).
"""

import json
import os
import signal

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainerState, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

MAX_STEPS = int(os.environ.get("HF_MAX_STEPS", "10"))
SAVE_STEPS = int(os.environ.get("HF_SAVE_STEPS", "2"))


class Sequences(torch.utils.data.Dataset):
    """`rows` examples cycling over `distinct` fixed random sequences; labels = input_ids."""

    def __init__(self, rows: int, distinct: int = 4, length: int = 16, vocab: int = 101) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.data = torch.randint(0, vocab, (distinct, length), generator=generator)
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict:
        ids = self.data[i % len(self.data)]
        return {"input_ids": ids, "labels": ids.clone()}


class Losses(TrainerCallback):
    """Training losses logged by this run (trainer_state.json also holds those of earlier runs)."""

    def __init__(self) -> None:
        self.logged: list[list] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logged.append([state.global_step, logs["loss"]])


def die_while_saving(step: int) -> None:
    """Test instrumentation: the Trainer writes trainer_state.json last; die just before it."""
    save_to_json = TrainerState.save_to_json

    def dying(self, json_path):
        if self.global_step == step and os.path.basename(os.path.dirname(json_path)) == f"checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        save_to_json(self, json_path)

    TrainerState.save_to_json = dying


def main() -> None:
    # What ckptd restored for this node, as the reference docs show.
    restored = os.path.join(os.environ.get("BT_LOAD_CHECKPOINT_DIR", "/nonexistent"), "rank-0")
    last_checkpoint = get_last_checkpoint(restored) if os.path.isdir(restored) else None
    print(f"hf_train.py: {'resuming from ' + last_checkpoint if last_checkpoint else 'from scratch'}", flush=True)

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=101, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=os.environ["BT_CHECKPOINT_DIR"],
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        save_total_limit=2,
        eval_strategy="steps",
        eval_steps=SAVE_STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    losses = Losses()
    trainer = Trainer(
        model=model, args=args, train_dataset=Sequences(64), eval_dataset=Sequences(8), callbacks=[losses]
    )
    if os.environ.get("HF_KILL_AT_SAVE"):
        die_while_saving(int(os.environ["HF_KILL_AT_SAVE"]))

    resumed_step = 0
    if last_checkpoint:
        with open(os.path.join(last_checkpoint, "trainer_state.json")) as f:
            resumed_step = json.load(f)["global_step"]
    trainer.train(resume_from_checkpoint=last_checkpoint)

    if os.environ.get("TRAINER_OUT"):
        with open(os.path.join(os.environ["TRAINER_OUT"], "hf.json"), "w") as f:
            json.dump(
                {
                    "resumed_from": last_checkpoint,
                    "resumed_step": resumed_step,
                    "global_step": trainer.state.global_step,
                    "losses": losses.logged,
                },
                f,
            )


if __name__ == "__main__":
    main()
