"""What `ckptd download` fetches: the reference's serving config, `training_checkpoints.artifact_references`.

training_checkpoints:
  download_folder: /tmp/training_checkpoints
  artifact_references:
    - training_job_id: run-42
      paths: ["rank-*/checkpoint-10/"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.config import parse

_FIELDS = {"training_job_id", "paths"}


@dataclass(frozen=True)
class ArtifactRef:
    """Files of one job matching any of `paths` (`*`, `?` wildcards; a trailing '/' is a folder)."""

    job_id: str
    paths: tuple[str, ...]


def parse_artifact_ref(value: Any, index: int) -> ArtifactRef:
    where = f"artifact_references[{index}]"
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping with training_job_id and paths, got {parse.show(value)}")
    unknown = sorted(str(k) for k in value if k not in _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown key {parse.show(unknown[0])}; accepted: {', '.join(sorted(_FIELDS))}")
    try:
        job_id = parse.name(value.get("training_job_id"))
        paths = parse.string_list(value.get("paths"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not paths:
        raise ValueError(f"{where}: paths is empty; give at least one pattern such as 'rank-*/checkpoint-10/'")
    return ArtifactRef(job_id, paths)


def parse_artifact_refs(value: Any) -> tuple[ArtifactRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of artifact references, got {parse.show(value)}")
    return tuple(parse_artifact_ref(item, i) for i, item in enumerate(value))
