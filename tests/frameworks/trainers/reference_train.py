"""The training code of the reference docs ("Using Checkpoints in Your Training Code",
loading-checkpoints.md), run by `ckptd run` as a user's trainer.

`train()` is the docs' function verbatim, except what cannot run as written (each marked CHANGED):
1. "your-base-model" -> BASE_MODEL, a tiny local model: nothing can be downloaded here.
2. TrainingArguments: save_steps=1000 -> 2 with max_steps=$REF_MAX_STEPS (a test cannot train 1000
   steps); load_best_model_at_end=True needs evaluations at the save steps: eval_strategy="steps",
   eval_steps=2; a small CPU run: use_cpu, batch sizes, learning rate, seed, no reporters, no tqdm.
3. Trainer(model=model, args=training_args) -> plus train_dataset and eval_dataset: a Trainer
   cannot train without data (`Examples(tokenizer)`, made with the tokenizer train() loaded).
The get_last_checkpoint, from_pretrained and trainer.train lines and the prints are verbatim.

Around it (not part of the docs' code):
- the base model and tokenizer are made at BASE_MODEL if missing: a tiny BERT for sequence
  classification and a word-level tokenizer (the `tokenizers` library);
- REF_SAVE_TOKENIZER=1: the tokenizer is saved at the top of $BT_CHECKPOINT_DIR, as a user's job
  does so that it is stored with the checkpoints (SPEC §4's '.' files);
- REF_OUT: a JSON file where every from_pretrained call is recorded (class, path, and the
  tokenizer's model_max_length), so the test can tell what was loaded from where.
"""

import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

BASE_MODEL = os.environ["REF_BASE_MODEL"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "fine", "bad", "awful", "poor", "movie", "film"]
TEXTS = [("good movie", 1), ("great film", 1), ("fine movie", 1), ("bad film", 0), ("awful movie", 0), ("poor film", 0)]
calls = []


def make_base(model_max_length: int) -> None:
    torch.manual_seed(0)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length,
    )  # fmt: skip
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(BASE_MODEL)
    tokenizer.save_pretrained(BASE_MODEL)


class Examples(torch.utils.data.Dataset):
    def __init__(self, tokenizer) -> None:
        self.rows = [(tokenizer(text, padding="max_length", max_length=8), label) for text, label in TEXTS * 4]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        encoded, label = self.rows[i]
        return {**{k: torch.tensor(v) for k, v in encoded.items()}, "labels": torch.tensor(label)}


def record(cls, what: str) -> None:
    """Note every `cls.from_pretrained(path)` in REF_OUT."""
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, path, *args, **kwargs):
        loaded = original(klass, path, *args, **kwargs)
        calls.append([what, str(path), getattr(loaded, "model_max_length", None)])
        with open(os.environ["REF_OUT"], "w") as f:
            json.dump(calls, f)
        return loaded

    cls.from_pretrained = classmethod(from_pretrained)


def train():
    checkpoint_dir = os.environ.get("BT_LOAD_CHECKPOINT_DIR")
    last_checkpoint = None

    if checkpoint_dir:
        last_checkpoint = get_last_checkpoint(checkpoint_dir)
        if last_checkpoint:
            print(f"✅ Resuming from checkpoint: {last_checkpoint}")
            model = AutoModelForSequenceClassification.from_pretrained(last_checkpoint)
            tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
        else:
            print("⚠️ No checkpoint found, starting from scratch")
            model = AutoModelForSequenceClassification.from_pretrained(BASE_MODEL)  # CHANGED (1)
            tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL)  # CHANGED (1)
    else:
        print("ℹ️ No checkpoint loading configured")
        model = AutoModelForSequenceClassification.from_pretrained(BASE_MODEL)  # CHANGED (1)
        tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL)  # CHANGED (1)

    training_args = TrainingArguments(
        output_dir=os.environ.get("BT_CHECKPOINT_DIR", "/tmp/training_checkpoints"),
        save_strategy="steps",
        save_steps=2,  # CHANGED (2): was 1000
        load_best_model_at_end=True,
        eval_strategy="steps",  # CHANGED (2): the rest of this call
        eval_steps=2,
        max_steps=int(os.environ["REF_MAX_STEPS"]),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        seed=0,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=Examples(tokenizer),  # CHANGED (3)
        eval_dataset=Examples(tokenizer),  # CHANGED (3)
    )
    trainer.train(resume_from_checkpoint=last_checkpoint)


if __name__ == "__main__":
    if not os.path.isdir(BASE_MODEL):
        make_base(model_max_length=64)
    record(AutoModelForSequenceClassification, "model")
    record(AutoTokenizer, "tokenizer")
    if os.environ.get("REF_SAVE_TOKENIZER") == "1":
        # The job's own tokenizer, told apart from the base model's by its model_max_length.
        saved = AutoTokenizer.from_pretrained(BASE_MODEL, model_max_length=48)
        saved.save_pretrained(os.environ["BT_CHECKPOINT_DIR"])
        calls.clear()
    train()
