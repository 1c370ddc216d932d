"""The retention policy's truth table: the union of keep_last, keep_best and keep_every_steps,
and the protections no rule set overrides (root, in progress, uncommitted, latest)."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.catalog import retention
from daemon.catalog.browse import Checkpoint, MissingMetric
from daemon.catalog.manifest import parse_step
from daemon.catalog.retention import NoRules, Rules, plan

KIND = "unit"


def ckpt(name: str, loss: float | None = None, *, ranks: tuple[int, ...] = (0,), minute: int = 0) -> Checkpoint:
    def manifest(rank: int) -> dict[str, Any]:
        return {
            "step": parse_step(name),
            "committed_at": f"2026-01-01T10:{minute:02d}:00+00:00",
            "total_bytes": 100,
            "file_count": 2,
            "metrics": {} if loss is None else {"eval_loss": loss},
        }

    return Checkpoint(name, {r: manifest(r) for r in ranks})


# The trained job of the CLI tests: best two by eval_loss (min) are 20 and 40; the latest is 40.
TRAINED = [
    ckpt("checkpoint-10", 0.9),
    ckpt("checkpoint-20", 0.5),
    ckpt("checkpoint-30", 0.7),
    ckpt("checkpoint-40", 0.6),
]

CASES = [
    # (name, found, rules, options, {checkpoint: reasons}; absent means deleted)
    (
        "issue acceptance: best 2 by eval_loss and last 1",
        TRAINED,
        Rules(keep_last=1, keep_best=2, metric="eval_loss", mode="min"),
        {},
        {"checkpoint-20": ("keep_best",), "checkpoint-40": ("latest", "keep_last", "keep_best")},
    ),
    (
        "max mode keeps the highest",
        TRAINED,
        Rules(keep_best=1, metric="eval_loss", mode="max"),
        {},
        {"checkpoint-10": ("keep_best",), "checkpoint-40": ("latest",)},
    ),
    (
        "keep_last counts back from the latest by step",
        TRAINED,
        Rules(keep_last=2),
        {},
        {"checkpoint-30": ("keep_last",), "checkpoint-40": ("latest", "keep_last")},
    ),
    (
        "keep_every_steps keeps multiples of S only",
        TRAINED,
        Rules(keep_every_steps=20),
        {},
        {"checkpoint-20": ("keep_every_steps",), "checkpoint-40": ("latest", "keep_every_steps")},
    ),
    (
        "more kept than exist: nothing deleted",
        TRAINED,
        Rules(keep_last=10),
        {},
        dict.fromkeys(("checkpoint-10", "checkpoint-20", "checkpoint-30"), ("keep_last",))
        | {"checkpoint-40": ("latest", "keep_last")},
    ),
    (
        "root pseudo-checkpoint is never deleted nor counted",
        [ckpt("."), *TRAINED],
        Rules(keep_last=1),
        {},
        {".": ("root",), "checkpoint-40": ("latest", "keep_last")},
    ),
    (
        "in progress is kept, and counted: keep_last 2 keeps it and the one before",
        TRAINED,
        Rules(keep_last=2),
        {"in_progress": {"checkpoint-40", "checkpoint-10"}},
        {
            "checkpoint-40": ("in_progress", "latest", "keep_last"),
            "checkpoint-30": ("keep_last",),
            "checkpoint-10": ("in_progress",),
        },
    ),
    (
        "files on a rank without its manifest: uncommitted, kept; latest is the fully committed one",
        [*TRAINED[:3], ckpt("checkpoint-40", 0.6, ranks=(0,))],
        Rules(keep_last=1),
        {"stored_ranks": {"checkpoint-40": {0, 1}, "checkpoint-30": {0}}},
        {"checkpoint-40": ("uncommitted",), "checkpoint-30": ("latest", "keep_last")},
    ),
    (
        "stored on no committed rank at all: uncommitted, kept",
        TRAINED[:1],
        Rules(keep_last=1),
        {"stored_ranks": {"checkpoint-50": {0}}},
        {"checkpoint-10": ("latest", "keep_last"), "checkpoint-50": ("uncommitted",)},
    ),
    (
        "a checkpoint without the metric cannot be judged by it: kept, as Orbax's BestN does",
        [ckpt("checkpoint-5"), *TRAINED],
        Rules(keep_best=1, metric="eval_loss"),
        {},
        {"checkpoint-5": ("no_metric",), "checkpoint-20": ("keep_best",), "checkpoint-40": ("latest",)},
    ),
    (
        "metrics recorded by another rank rank this rank's checkpoints",
        [ckpt(c.name, ranks=(1,)) for c in TRAINED],
        Rules(keep_best=1, metric="eval_loss"),
        {"ranked_by": TRAINED},
        {"checkpoint-20": ("keep_best",), "checkpoint-40": ("latest",)},
    ),
    (
        "same step: the later commit is the latest",
        [ckpt("step-7", minute=1), ckpt("global_step7", minute=2)],
        Rules(keep_every_steps=1000),
        {},
        {"global_step7": ("latest",)},
    ),
    (
        "no steps: the latest is the last committed, keep_every_steps keeps nothing",
        [ckpt("best", minute=5), ckpt("final", minute=9)],
        Rules(keep_every_steps=2),
        {},
        {"final": ("latest",)},
    ),
    (
        "nothing stored: an empty plan, even with keep_best",
        [],
        Rules(keep_best=2, metric="eval_loss"),
        {},
        {},
    ),
]


@pytest.mark.parametrize("name, found, rules, options, kept", CASES, ids=[c[0] for c in CASES])
def test_truth_table(name, found, rules, options, kept):
    decisions = plan(found, rules, **options)
    names = {c.name for c in found} | set(options.get("stored_ranks", {}))
    assert [d.name for d in decisions] == sorted(names)
    assert {d.name: d.reasons for d in decisions if d.keep} == kept
    assert all(d.reasons == () for d in decisions if d.delete)


def test_uncommitted_ranks_are_named():
    found = [ckpt("checkpoint-40", ranks=(0, 2)), ckpt("checkpoint-10", ranks=(0,))]
    decisions = {d.name: d for d in plan(found, Rules(keep_last=1), stored_ranks={"checkpoint-40": {0, 1, 2, 3}})}
    assert decisions["checkpoint-40"].uncommitted_ranks == (1, 3)
    assert decisions["checkpoint-40"].keep
    assert decisions["checkpoint-10"].reasons == (retention.LATEST, retention.KEEP_LAST)


def test_no_rule_is_an_error():
    with pytest.raises(NoRules, match="no retention rule"):
        plan(TRAINED, Rules())


def test_missing_metric_is_an_error():
    with pytest.raises(MissingMetric, match=r"'accuracy'.*recorded: eval_loss"):
        plan(TRAINED, Rules(keep_last=1, keep_best=1, metric="accuracy"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"keep_last": 0}, "keep_last must be a whole number of at least 1"),
        ({"keep_every_steps": -5}, "keep_every_steps must be"),
        ({"keep_last": True}, "keep_last must be"),
        ({"keep_best": 2}, "keep_best and metric go together"),
        ({"metric": "eval_loss"}, "keep_best and metric go together"),
        ({"keep_best": 1, "metric": "eval_loss", "mode": "lowest"}, "mode must be min or max"),
    ],
)
def test_bad_rules_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        Rules(**fields)
