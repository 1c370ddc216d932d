"""Checkpoint references of `load_checkpoint_config.checkpoints`, in the reference SDK's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.config import parse

LATEST = "baseten_latest_checkpoint"
NAMED = "baseten_named_checkpoint"
_FIELDS = {"typ", "project_name", "job_id", "checkpoint_name", "required"}


@dataclass(frozen=True)
class CheckpointRef:
    """Latest of a project or job, or a named checkpoint of a job."""

    typ: str
    project_name: str | None = None
    job_id: str | None = None
    checkpoint_name: str | None = None
    # A reference that matches nothing is a warning unless required (then exit 3, no training).
    required: bool = False

    def describe(self) -> str:
        where = " ".join(
            f"{k}={v}"
            for k, v in (("project", self.project_name), ("job", self.job_id), ("checkpoint", self.checkpoint_name))
            if v
        )
        return f"{'latest' if self.typ == LATEST else 'named'} checkpoint of {where}"


def parse_ref(value: Any, index: int) -> CheckpointRef:
    where = f"checkpoints[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping with 'typ', got {parse.show(value)}")
    unknown = sorted(str(k) for k in value if k not in _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown key {parse.show(unknown[0])}; accepted: {', '.join(sorted(_FIELDS))}")
    typ = value.get("typ")
    if typ not in (LATEST, NAMED):
        raise ValueError(f"{where}.typ: expected {LATEST} or {NAMED}, got {parse.show(typ)}")
    try:
        fields = {k: parse.name(value[k]) for k in ("project_name", "job_id") if value.get(k) is not None}
        if value.get("checkpoint_name") is not None:
            fields["checkpoint_name"] = _checkpoint_name(value["checkpoint_name"])
        required = parse.boolean(value.get("required", False))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    ref = CheckpointRef(typ=typ, required=required, **fields)
    if typ == LATEST and not (ref.project_name or ref.job_id):
        raise ValueError(f"{where}: {LATEST} needs project_name, job_id or both")
    if typ == LATEST and ref.checkpoint_name:
        raise ValueError(f"{where}: {LATEST} takes no checkpoint_name (use {NAMED})")
    if typ == NAMED and not (ref.checkpoint_name and ref.job_id):
        raise ValueError(f"{where}: {NAMED} needs checkpoint_name and job_id")
    return ref


def parse_refs(value: Any) -> tuple[CheckpointRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of checkpoint references, got {parse.show(value)}")
    return tuple(parse_ref(item, i) for i, item in enumerate(value))


def _checkpoint_name(value: Any) -> str:
    """A top-level folder of the checkpoint folder: one path segment, nothing that escapes."""
    s = parse.text(value)
    # Control characters: S3 and some stores refuse a newline in a key (moto: 404), and a NUL no
    # path may hold; a name that cannot be restored is better refused before anything starts.
    if not s or "/" in s or s in (".", "..") or any(ord(c) < 32 or ord(c) == 127 for c in s):
        raise ValueError(f"checkpoint_name must be one folder name such as checkpoint-20, got {parse.show(s)}")
    return s
