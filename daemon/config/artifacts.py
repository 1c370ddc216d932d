"""What `ckptd download` fetches: the reference's serving config, `training_checkpoints.artifact_references`.

training_checkpoints:
  download_folder: /tmp/training_checkpoints
  artifact_references:
    - training_job_id: run-42
      paths: ["rank-*/checkpoint-10/"]

Every path is checked here, at load, so a malformed pattern is a configuration error (exit 2)
before anything is listed or downloaded. The syntax is checked here because config sits below
catalog in the layers; what a pattern matches is daemon/catalog/patterns.py's business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from daemon.config import parse

_FIELDS = {"training_job_id", "paths"}
MAX_PATTERN = 1024  # an S3 key is at most 1024 bytes: a longer pattern can match nothing
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RANK = re.compile(r"rank-(0|[1-9][0-9]*)")
EXAMPLE = "rank-*/checkpoint-10/"


def check_pattern(pattern: Any) -> str:
    """Return `pattern` if it is a well-formed wildcard path (SPEC §7), else raise ValueError saying why.

    | pattern                         | verdict                                                    |
    |---------------------------------|------------------------------------------------------------|
    | rank-*/checkpoint-10/           | ok: a folder of every rank                                 |
    | rank-0/checkpoint-1?/model.*    | ok                                                         |
    | rank-1 , rank-1/ , *            | ok: the whole rank folder(s)                               |
    | "" or blanks                    | empty                                                      |
    | /rank-0/x                       | absolute                                                   |
    | rank-0/../x , rank-0/./x        | '.' or '..' segment                                        |
    | rank-0//x , rank-0/x//          | empty segment                                              |
    | text with NUL, newline, tab     | control character                                          |
    | checkpoint-10/                  | must start with a rank folder (rank-0, rank-*)             |
    | longer than 1024 characters     | too long for any key                                       |
    """
    if not isinstance(pattern, str):
        raise ValueError(f"a path pattern must be a string, got {parse.show(pattern)}")
    if not pattern.strip():
        raise ValueError(f"empty path pattern; give one such as {EXAMPLE!r}")
    if _CONTROL.search(pattern):
        raise ValueError(f"path pattern {parse.show(pattern)} contains a control character (NUL, newline, tab...)")
    if len(pattern) > MAX_PATTERN:
        raise ValueError(f"path pattern is {len(pattern)} characters long; no stored key is longer than {MAX_PATTERN}")
    if pattern.startswith("/"):
        raise ValueError(f"path pattern {parse.show(pattern)} is absolute; patterns are relative, e.g. {EXAMPLE!r}")
    segments = pattern.removesuffix("/").split("/")
    if any(s in (".", "..") for s in segments):
        raise ValueError(f"path pattern {parse.show(pattern)} has a '.' or '..' segment")
    if any(s == "" for s in segments):
        raise ValueError(f"path pattern {parse.show(pattern)} has an empty segment ('//')")
    head = segments[0]
    if not (_RANK.fullmatch(head) or "*" in head or "?" in head):
        raise ValueError(
            f"path pattern {parse.show(pattern)} must start with a rank folder (rank-0, rank-*), e.g. {EXAMPLE!r}"
        )
    return pattern


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
        paths = _paths(value.get("paths"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not paths:
        raise ValueError(f"{where}: paths is empty; give at least one pattern such as {EXAMPLE!r}")
    return ArtifactRef(job_id, paths)


def _paths(value: Any) -> tuple[str, ...]:
    # A YAML list only: parse.string_list would split text at commas, which a key may hold.
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"paths: expected a list of patterns, got {parse.show(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(check_pattern(item))
        except ValueError as e:
            raise ValueError(f"paths[{i}]: {e}") from None
    return tuple(out)


def parse_artifact_refs(value: Any) -> tuple[ArtifactRef, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"expected a list of artifact references, got {parse.show(value)}")
    return tuple(parse_artifact_ref(item, i) for i, item in enumerate(value))
