"""The records a prune leaves in the store, and what an interrupted prune's record says to do.

A pruning record (`jobs/{job}/pruning/rank-N/{checkpoint}.json`) is written on every rank before
anything of the checkpoint is deleted, and deleted last; a whole-job delete writes
`pruning/job.json`. A tombstone (`jobs/{job}/pruned/rank-N/{checkpoint}.json`) stays after the
manifest it replaces. daemon.catalog.prune writes and finishes them; split from it to keep each
module readable.

A record is finished only while the checkpoint is still the one it recorded: when that rank has
committed the checkpoint again since (another manifest, another commit time), the record is dropped
and the new checkpoint left alone. Finishing deletes only the files stored no later than the record
itself: a file stored after it is a re-save of the same name (the trainer saved it again after the
manifest went), not one the stopped prune was deleting, and it is kept. A record that cannot be read
says nothing about what it was deleting, so it is dropped and nothing else goes (see
`resume_action`). Finishing the record of a multi-node checkpoint deletes its global manifest
first, whether or not the stopped prune had got that far: the checkpoint was being deleted, and
no global manifest may outlive the files it lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from daemon.catalog import layout


def records_prefix(project: str, job_id: str) -> str:
    return layout.job_prefix(project, job_id) + "pruning/"


def _per_checkpoint(prefix: str, rank: int, checkpoint: str) -> str:
    if checkpoint == layout.ROOT_CHECKPOINT:
        raise ValueError("the root pseudo-checkpoint '.' is never pruned")
    return f"{prefix}rank-{rank}/{layout.check_relpath(checkpoint)}.json"


def record_key(project: str, job_id: str, rank: int, checkpoint: str) -> str:
    return _per_checkpoint(records_prefix(project, job_id), rank, checkpoint)


def tombstone_key(project: str, job_id: str, rank: int, checkpoint: str) -> str:
    return _per_checkpoint(layout.job_prefix(project, job_id) + "pruned/", rank, checkpoint)


def job_record_key(project: str, job_id: str) -> str:
    return records_prefix(project, job_id) + "job.json"


@dataclass(frozen=True)
class Interrupted:
    """A pruning record left by a prune that did not finish."""

    rank: int
    checkpoint: str
    committed_at: str | None  # of the manifest it was deleting; None: it had none, or unreadable
    # When the store wrote the record (its last-modified, the store's clock like every file's);
    # None: the record is unreadable (damaged, not an object), so it vouches for nothing.
    written_at: datetime | None = None


FINISH, DROP = "finish", "drop"
Action = Literal["finish", "drop"]


def resume_action(readable: bool, committed_now: str | None, recorded: str | None) -> Action:
    """What to do with an interrupted prune's record: finish it, or drop only the record.

    `committed_now`: the rank's manifest of the checkpoint now (its committed_at; None: none).
    `recorded`: the committed_at the record holds (None: the checkpoint had no manifest).

    | record readable | manifest now      | action | why                                          |
    |-----------------|-------------------|--------|----------------------------------------------|
    | no              | any               | drop   | it vouches for nothing: delete nothing       |
    | yes             | none              | finish | (files stored after the record are kept)     |
    | yes             | == recorded       | finish | the prune stopped before withdrawing it      |
    | yes             | != recorded       | drop   | committed again since: a new checkpoint      |

    The rank's manifest of a multi-node checkpoint is its part; finishing deletes the global
    manifest first (prune.Pruner._finish), as the prune it finishes did.
    """
    if not readable:
        return DROP
    if committed_now is None or committed_now == recorded:
        return FINISH
    return DROP


def was_being_deleted(file_modified: datetime, record_written: datetime) -> bool:
    """Whether a stored file is one an interrupted prune was deleting: stored no later than its
    record. Equal times count as older: S3 stamps whole seconds, and the checkpoint a prune was
    deleting was stored before its record, often within the same second in tests and small jobs.

    | file stored          | being deleted |
    |----------------------|---------------|
    | before the record    | yes           |
    | same stamp           | yes           |
    | after the record     | no (a re-save)|
    """
    return file_modified <= record_written
