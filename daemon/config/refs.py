"""Checkpoint references of `load_checkpoint_config.checkpoints`, in the reference SDK's shape, plus
ckptd's own "best by a metric" and a one-line text form for `--load` / `$CKPTD_LOAD`.

Config file (a list of mappings):

    - {typ: baseten_latest_checkpoint, project_name: P, job_id: J}       # either or both
    - {typ: baseten_named_checkpoint, job_id: J, checkpoint_name: checkpoint-20}
    - {typ: ckptd_best_checkpoint, project_name: P, job_id: J, metric: eval_loss, mode: min}
    # every one may say `required: true` (matches nothing -> exit 3 instead of a warning)

`ckptd_best_checkpoint` is ckptd's: the reference SDK has no such type. `mode` is min (the
default: a loss) or max (an accuracy), as for `ckptd prune --mode`. The SDK's `loops_checkpoint`
(a Baseten Loops run) lives on the hosted service, not in a ckptd store: refused with a message
saying so.

Text (`parse_refs` of a string): references separated by ';', each a list of `key=value` separated
by ','; the type is implied by the keys:

| keys                          | type    | example                                   |
|-------------------------------|---------|-------------------------------------------|
| checkpoint (with job)         | named   | `job=J,checkpoint=checkpoint-20`          |
| metric (mode optional)        | best    | `project=P,metric=eval_loss,mode=min`     |
| neither                       | latest  | `job=J` or `project=P`                    |
| `required` or `required=true` | any     | `job=J,required`                          |

The SDK's field names (job_id, project_name, checkpoint_name) are accepted as keys too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.config import parse

LATEST = "baseten_latest_checkpoint"
NAMED = "baseten_named_checkpoint"
BEST = "ckptd_best_checkpoint"
LOOPS = "loops_checkpoint"  # the reference SDK's; not supported
TYPES = (LATEST, NAMED, BEST)
MODES = ("min", "max")
_FIELDS = {"typ", "project_name", "job_id", "checkpoint_name", "metric", "mode", "required"}
# Text keys -> the mapping's fields.
_TEXT_KEYS = {
    "job": "job_id",
    "job_id": "job_id",
    "project": "project_name",
    "project_name": "project_name",
    "checkpoint": "checkpoint_name",
    "checkpoint_name": "checkpoint_name",
    "metric": "metric",
    "mode": "mode",
    "required": "required",
}


@dataclass(frozen=True)
class CheckpointRef:
    """Latest of a project or job, a named checkpoint of a job, or the best of either by a metric."""

    typ: str
    project_name: str | None = None
    job_id: str | None = None
    checkpoint_name: str | None = None
    # A reference that matches nothing is a warning unless required (then exit 3, no training).
    required: bool = False
    metric: str | None = None  # BEST only
    mode: str | None = None  # BEST only: min or max

    def describe(self) -> str:
        where = " ".join(
            f"{k}={v}"
            for k, v in (("project", self.project_name), ("job", self.job_id), ("checkpoint", self.checkpoint_name))
            if v
        )
        if self.typ == BEST:
            return f"best checkpoint by {self.metric} ({self.mode}) of {where}"
        return f"{'latest' if self.typ == LATEST else 'named'} checkpoint of {where}"


def _typ(value: dict[Any, Any], where: str) -> str:
    typ = value.get("typ")
    if typ == LOOPS:
        run = f", run_id {parse.show(value['run_id'])}" if value.get("run_id") is not None else ""
        raise ValueError(
            f"{where}.typ: {LOOPS} (a Baseten Loops run{run}) is not supported: Loops checkpoints live on "
            f"Baseten's hosted service, not in a ckptd store; use {', '.join(TYPES)}"
        )
    if "typ" not in value:
        raise ValueError(f"{where}: typ missing; expected {', '.join(TYPES)}")
    if typ not in TYPES:
        raise ValueError(f"{where}.typ: expected {', '.join(TYPES)}, got {parse.show(typ)}")
    return typ


def parse_ref(value: Any, index: int, where: str | None = None) -> CheckpointRef:
    """One reference from its mapping; ValueError naming `where` (default `checkpoints[index]`)."""
    where = where or f"checkpoints[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping with 'typ', got {parse.show(value)}")
    typ = _typ(value, where)
    unknown = sorted(str(k) for k in value if k not in _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown key {parse.show(unknown[0])}; accepted: {', '.join(sorted(_FIELDS))}")
    try:
        fields = {k: parse.name(value[k]) for k in ("project_name", "job_id") if value.get(k) is not None}
        if value.get("checkpoint_name") is not None:
            fields["checkpoint_name"] = _checkpoint_name(value["checkpoint_name"])
        if value.get("metric") is not None:
            fields["metric"] = parse.metric_name(value["metric"])
        if value.get("mode") is not None:
            fields["mode"] = parse.choice(*MODES)(value["mode"])
        required = parse.boolean(value.get("required", False))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if typ == BEST:
        fields.setdefault("mode", "min")
    ref = CheckpointRef(typ=typ, required=required, **fields)
    _check_fields(ref, where)
    return ref


def _check_fields(ref: CheckpointRef, where: str) -> None:
    if ref.typ in (LATEST, BEST) and not (ref.project_name or ref.job_id):
        raise ValueError(f"{where}: {ref.typ} needs project_name, job_id or both")
    if ref.typ in (LATEST, BEST) and ref.checkpoint_name:
        raise ValueError(f"{where}: {ref.typ} takes no checkpoint_name (use {NAMED})")
    if ref.typ == NAMED and not (ref.checkpoint_name and ref.job_id):
        raise ValueError(f"{where}: {NAMED} needs checkpoint_name and job_id")
    if ref.typ == BEST and not ref.metric:
        raise ValueError(f"{where}: {BEST} needs metric, e.g. eval_loss")
    if ref.typ != BEST and (ref.metric or ref.mode):
        raise ValueError(f"{where}: {ref.typ} takes no metric or mode (use {BEST})")


def parse_refs(value: Any) -> tuple[CheckpointRef, ...]:
    """A config file's list of mappings, or the text form of `--load` (see the module docstring)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return parse_text(value)
    if not isinstance(value, list):
        raise ValueError(f"expected a list of checkpoint references, got {parse.show(value)}")
    return tuple(parse_ref(item, i) for i, item in enumerate(value))


def parse_text(text: str) -> tuple[CheckpointRef, ...]:
    """`job=J;project=P,metric=eval_loss,mode=min;...`; ValueError naming the bad part."""
    parts = [p.strip() for p in text.split(";")]
    if not any(parts):
        raise ValueError("expected references such as job=J or project=P,metric=eval_loss; got nothing")
    refs = []
    for i, part in enumerate(parts):
        if not part and i == len(parts) - 1:
            continue  # a trailing ';'
        where = f"reference {i + 1} {parse.show(part)}"
        refs.append(parse_ref(_text_fields(part, where), i, where))
    return tuple(refs)


def _text_fields(part: str, where: str) -> dict[str, Any]:
    """One text reference as the mapping parse_ref takes, its type implied by its keys."""
    if not part:
        raise ValueError(f"{where}: empty; separate references with one ';'")
    fields: dict[str, Any] = {}
    for pair in part.split(","):
        key, sep, val = (s.strip() for s in pair.partition("="))
        if not sep and key == "required":
            val, sep = "true", "="
        if not sep or not key:
            raise ValueError(f"{where}: expected key=value, got {parse.show(pair.strip())}")
        name = _TEXT_KEYS.get(key)
        if name is None:
            accepted = "job, project, checkpoint, metric, mode, required"
            raise ValueError(f"{where}: unknown key {parse.show(key)}; accepted: {accepted}")
        if name in fields:
            raise ValueError(f"{where}: {key} given twice")
        fields[name] = val
    if "checkpoint_name" in fields and "metric" in fields:
        raise ValueError(f"{where}: checkpoint= names one checkpoint, metric= asks for the best: give one of them")
    typ = NAMED if "checkpoint_name" in fields else BEST if "metric" in fields or "mode" in fields else LATEST
    return {"typ": typ, **fields}


def _checkpoint_name(value: Any) -> str:
    """A top-level folder of the checkpoint folder: one path segment, nothing that escapes."""
    s = parse.text(value)
    # Control characters: S3 and some stores refuse a newline in a key (moto: 404), and a NUL no
    # path may hold; a name that cannot be restored is better refused before anything starts.
    if not s or "/" in s or s in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise ValueError(f"checkpoint_name must be one folder name such as checkpoint-20, got {parse.show(s)}")
    return s
