"""The storage key layout of SPEC §4, in one place.

    training_projects/{project}/jobs/{job_id}/rank-{N}/{relative path}        checkpoint files
    training_projects/{project}/jobs/{job_id}/manifests/rank-{N}/{ckpt}.json  commit manifests
    training_projects/{project}/jobs/{job_id}/manifests/global/{ckpt}.json    multi-node commits
    training_projects/{project}/jobs/{job_id}/job.json                        job metadata
    training_projects/{project}/jobs/{job_id}/status/rank-{N}.json            per-rank status

Keys are relative to the store's prefix. Relative paths keep their exact characters (unicode,
spaces) so path -> key -> path round-trips; anything that could escape a prefix or a download
folder is refused here, once, rather than checked by each caller.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

ROOT = "training_projects"
ROOT_CHECKPOINT = "."  # files directly in the checkpoint folder form this pseudo-checkpoint
_RANK_DIR = re.compile(r"rank-(0|[1-9][0-9]*)")


class UnsafePath(ValueError):
    """A relative path or key that would escape its prefix or folder, or that no store can hold."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        super().__init__(f"unsafe path {path!r}: {why}")


def check_relpath(relpath: str) -> str:
    """Return `relpath` unchanged if it is a safe relative POSIX path, else raise UnsafePath."""
    if not relpath:
        raise UnsafePath(relpath, "empty")
    if relpath.startswith("/"):
        raise UnsafePath(relpath, "absolute")
    if "\0" in relpath:
        raise UnsafePath(relpath, "contains NUL")
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(relpath, "not valid UTF-8 (S3 keys must be)") from None
    for segment in relpath.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafePath(relpath, "empty, '.' or '..' segment")
    return relpath


def is_segment(name: object) -> bool:
    """Whether `name` can be one folder name in a key (a project, a job id, a checkpoint): a safe
    relative path of a single segment. Listings of a hostile store can hold anything."""
    if not isinstance(name, str) or "/" in name:
        return False
    try:
        check_relpath(name)
    except UnsafePath:
        return False
    return True


def job_prefix(project: str, job_id: str) -> str:
    return f"{ROOT}/{project}/jobs/{job_id}/"


def rank_prefix(project: str, job_id: str, rank: int) -> str:
    return f"{job_prefix(project, job_id)}rank-{rank}/"


def file_key(project: str, job_id: str, rank: int, relpath: str) -> str:
    return rank_prefix(project, job_id, rank) + check_relpath(relpath)


def manifest_prefix(project: str, job_id: str, rank: int) -> str:
    return f"{job_prefix(project, job_id)}manifests/rank-{rank}/"


def manifest_key(project: str, job_id: str, rank: int, checkpoint: str) -> str:
    # The root pseudo-checkpoint '.' becomes ".json": no folder has an empty name, so no clash.
    name = "" if checkpoint == ROOT_CHECKPOINT else check_relpath(checkpoint)
    return f"{manifest_prefix(project, job_id, rank)}{name}.json"


def global_prefix(project: str, job_id: str) -> str:
    return f"{job_prefix(project, job_id)}manifests/global/"


def global_key(project: str, job_id: str, checkpoint: str) -> str:
    # Only checkpoint folders commit globally: files at the top ('.') stay each node's own.
    return f"{global_prefix(project, job_id)}{check_relpath(checkpoint)}.json"


def job_metadata_key(project: str, job_id: str) -> str:
    return f"{job_prefix(project, job_id)}job.json"


def rank_status_key(project: str, job_id: str, rank: int) -> str:
    # One object per rank: nodes never overwrite each other's status.
    return f"{job_prefix(project, job_id)}status/rank-{rank}.json"


@dataclass(frozen=True)
class FileKey:
    project: str
    job_id: str
    rank: int
    relpath: str

    @property
    def checkpoint(self) -> str:
        return checkpoint_of(self.relpath)


def parse_file_key(key: str) -> FileKey | None:
    """Split a checkpoint file's key into its parts; None for keys that are not checkpoint files."""
    parts = key.split("/", 5)
    if len(parts) != 6 or parts[0] != ROOT or parts[2] != "jobs" or not _RANK_DIR.fullmatch(parts[4]):
        return None
    try:
        relpath = check_relpath(parts[5])
    except UnsafePath:
        return None
    return FileKey(parts[1], parts[3], int(parts[4][5:]), relpath)


def checkpoint_of(relpath: str) -> str:
    """The checkpoint a file belongs to: its top-level folder, or '.' for files at the top."""
    head, sep, _ = relpath.partition("/")
    return head if sep else ROOT_CHECKPOINT


def relpath_of(folder: str, path: str) -> str:
    """The key-ready relative path of `path` inside `folder` (both absolute)."""
    rel = os.path.relpath(path, folder)
    if rel == "." or rel.startswith("../") or rel == "..":
        raise UnsafePath(path, f"not inside {folder}")
    return check_relpath(rel.replace(os.sep, "/"))


def local_path(folder: str, relpath: str) -> str:
    """Where a stored relative path lands inside `folder`; refuses anything that would escape it."""
    check_relpath(relpath)
    target = os.path.normpath(os.path.join(folder, relpath))
    if os.path.commonpath([os.path.normpath(folder), target]) != os.path.normpath(folder):
        raise UnsafePath(relpath, f"escapes {folder}")
    return target
