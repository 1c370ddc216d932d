"""Retention: which stored checkpoints a policy keeps, and why. Pure: no store, no clock.

Orbax's CheckpointManager preservation policies are the model: each rule keeps a set of
checkpoints (LatestN, BestN, EveryNSteps) and the policy keeps their union (AnyPreservationPolicy).
On top of the rules, some checkpoints are never deleted whatever the rules say (`PROTECTIONS`).

`plan` decides for every checkpoint of a job; `ckptd prune` prints and executes the plan, and
`upload.retain` applies the same policy to one rank while training.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from daemon.catalog import browse, layout
from daemon.catalog.browse import Checkpoint

# Reasons a checkpoint is kept. The first four are protections: no rule set can delete them.
ROOT, IN_PROGRESS, UNCOMMITTED, LATEST = "root", "in_progress", "uncommitted", "latest"
KEEP_LAST, KEEP_BEST, KEEP_EVERY_STEPS = "keep_last", "keep_best", "keep_every_steps"
NO_METRIC = "no_metric"  # keep_best cannot rank it: kept, as Orbax's BestN keeps it by default
PROTECTIONS = (ROOT, IN_PROGRESS, UNCOMMITTED, LATEST)


class NoRules(ValueError):
    def __init__(self) -> None:
        super().__init__("no retention rule: give --keep-last, --keep-best with --metric, or --keep-every-steps")


@dataclass(frozen=True)
class Rules:
    """The union of what each given rule keeps. None: the rule is not used."""

    keep_last: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"
    keep_every_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best", "keep_every_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if (self.keep_best is None) != (self.metric is None):
            raise ValueError("keep_best and metric go together: keep how many, ranked by which metric?")
        if self.mode not in browse.MODES:
            raise ValueError(f"mode must be min or max, got {self.mode!r}")

    @property
    def empty(self) -> bool:
        return self.keep_last is None and self.keep_best is None and self.keep_every_steps is None

    def not_kept(self) -> list[str]:
        """Why a deleted checkpoint goes: each rule, as not keeping it."""
        why = [f"not among the last {self.keep_last}"] if self.keep_last is not None else []
        if self.keep_best is not None:
            why.append(f"not among the best {self.keep_best} by {self.metric} ({self.mode})")
        if self.keep_every_steps is not None:
            why.append(f"step not a multiple of {self.keep_every_steps}")
        return why

    def describe(self) -> dict[str, object]:
        return {
            "keep_last": self.keep_last,
            "keep_best": self.keep_best,
            "metric": self.metric,
            "mode": self.mode if self.keep_best is not None else None,
            "keep_every_steps": self.keep_every_steps,
        }


@dataclass(frozen=True)
class Decision:
    """One checkpoint's fate. `reasons`: what keeps it (empty when it is deleted)."""

    name: str
    keep: bool
    reasons: tuple[str, ...]
    checkpoint: Checkpoint | None  # None: stored but committed on no rank
    uncommitted_ranks: tuple[int, ...] = ()  # ranks holding files of it but no manifest

    @property
    def delete(self) -> bool:
        return not self.keep


def plan(
    found: Iterable[Checkpoint],
    rules: Rules,
    *,
    stored_ranks: Mapping[str, Collection[int]] | None = None,
    in_progress: Collection[str] = (),
    ranked_by: Iterable[Checkpoint] | None = None,
) -> list[Decision]:
    """Keep or delete, for every checkpoint of `found` (committed on some rank) and of
    `stored_ranks` (checkpoint -> ranks that store files of it), in name order.

    | checkpoint                                  | kept by                      | deleted |
    |---------------------------------------------|------------------------------|---------|
    | '.' (files at the checkpoint folder's top)  | root                         | never   |
    | named by the caller as in progress          | in_progress                  | never   |
    | files on a rank that has no manifest of it  | uncommitted                  | never   |
    | the latest of the fully committed ones      | latest                       | never   |
    | among the N latest ranked                   | keep_last                    | no      |
    | among the K best ranked by metric (mode)    | keep_best                    | no      |
    | step is a multiple of S                     | keep_every_steps             | no      |
    | keep_best given, no value of its metric     | no_metric                    | no      |
    | ranked, and no rule keeps it                | -                            | yes     |
    | ranked, no step, no metric given            | only keep_last may keep it   | likely  |

    Ranked: the named checkpoints committed on every rank that stores files of them, in-progress
    ones included (Orbax counts every finalized checkpoint; they are kept anyway), so keep_last 2
    right after a commit keeps that one and the one before. Uncommitted ones are neither counted
    nor ranked: they may never commit. The latest is chosen as restore chooses it (browse.latest)
    among the ranked ones. A checkpoint without a value of keep_best's metric cannot be judged by
    it, so it is kept (an eval that did not run at that step says nothing against it). The values
    come from `ranked_by` when given: the same checkpoints seen on every rank, for a caller that
    decides for one rank while the metrics are recorded by another (often rank 0 only). NoRules
    when no rule is given; browse.MissingMetric when keep_best is given, there are checkpoints to
    rank, and none records the metric (the caller must then delete nothing).

    Multi-node jobs: `found` holds the globally committed checkpoints (daemon.catalog.jobview),
    each with its global manifest, whose step, commit time and metrics rank it, and its parts
    (its `manifests`): a rank storing files of it without a part makes it uncommitted, as above.
    A checkpoint with parts but no global manifest is not in `found`: its stored files make it
    uncommitted, never deleted by rules, and never the latest.
    """
    if rules.empty:
        raise NoRules()
    by_name = {c.name: c for c in found}
    stored = {name: set(ranks) for name, ranks in (stored_ranks or {}).items()}
    busy = set(in_progress)
    protected: dict[str, list[str]] = {}
    missing: dict[str, tuple[int, ...]] = {}
    for name in sorted(by_name.keys() | stored.keys()):
        checkpoint = by_name.get(name)
        # Ranks with files but no manifest (for a multi-node job: no part, even where the global
        # manifest lists them): still uploading, or damaged; either way not for rules to delete.
        missing[name] = tuple(sorted(stored.get(name, set()) - set(checkpoint.manifests if checkpoint else ())))
        why = [ROOT] if name == layout.ROOT_CHECKPOINT else []
        why += [IN_PROGRESS] if name in busy else []
        why += [UNCOMMITTED] if checkpoint is None or missing[name] else []
        protected[name] = why
    complete = [c for c in by_name.values() if c.name != layout.ROOT_CHECKPOINT and not missing[c.name]]
    newest = browse.latest(complete)
    if newest is not None:
        protected[newest.name].append(LATEST)
    kept = _kept_by_rules(complete, rules, {c.name: c for c in ranked_by or ()})
    decisions = []
    for name, why in protected.items():
        reasons = (*why, *kept.get(name, ()))
        decisions.append(Decision(name, bool(reasons), tuple(reasons), by_name.get(name), missing[name]))
    return decisions


def _kept_by_rules(ranked: list[Checkpoint], rules: Rules, seen: Mapping[str, Checkpoint]) -> dict[str, list[str]]:
    kept: dict[str, list[str]] = {}
    if rules.keep_last is not None:
        for c in sorted(ranked, key=Checkpoint.recency, reverse=True)[: rules.keep_last]:
            kept.setdefault(c.name, []).append(KEEP_LAST)
    if rules.keep_best is not None and rules.metric is not None and ranked:
        judged = [seen.get(c.name, c) for c in ranked]
        for c in browse.best(judged, rules.metric, rules.mode)[: rules.keep_best]:
            kept.setdefault(c.name, []).append(KEEP_BEST)
        for c in judged:
            if c.name != layout.ROOT_CHECKPOINT and c.metric(rules.metric) is None:
                kept.setdefault(c.name, []).append(NO_METRIC)
    if rules.keep_every_steps is not None:
        for c in ranked:
            if c.step is not None and c.step % rules.keep_every_steps == 0:
                kept.setdefault(c.name, []).append(KEEP_EVERY_STEPS)
    return kept
