"""Which committed checkpoint a reference of `load_checkpoint_config.checkpoints` names (SPEC §4, §5).

Only commit manifests are consulted: a checkpoint without one (a save cut short by a crash) is
never a candidate, whatever files of it were stored. What the store holds may be hostile; a bad
manifest is one that fails `manifest.read_manifest` (not JSON, not an object, a missing or
mistyped field, an unsafe or foreign path or key, a duplicate path, an impossible size, a manifest
of another job, rank or checkpoint stored at this key):

| reference | bad manifest is                          | outcome                                   |
|-----------|------------------------------------------|-------------------------------------------|
| latest    | one of several of the job                | skipped, a warning names its key; the latest valid one serves |
| latest    | every one of the job                     | skipped; the job has no committed checkpoint |
| named     | the one the name points at               | BadManifest naming the key                |
| any       | not `*.json`, or under a folder name no key may hold | ignored                       |

BadManifest is exit 3 for a required reference, a warning and training from scratch for an
optional one (restorer.py).

A manifest that parses but lies about its files' bytes is caught when downloading (download.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from daemon.catalog import browse, layout
from daemon.catalog.manifest import latest_manifest, read_manifest
from daemon.config.refs import NAMED, CheckpointRef
from daemon.storage import Storage, StorageError


class AmbiguousJob(LookupError):
    """A job id found in several projects: the reference must say which."""

    def __init__(self, ref: CheckpointRef, projects: list[str]) -> None:
        self.projects = projects
        super().__init__(
            f"{ref.describe()}: job {ref.job_id!r} exists in several projects ({', '.join(projects)}); "
            "set project_name in the reference"
        )


class BadManifest(ValueError):
    """The manifest a named reference points at is damaged or not what it claims: it names nothing."""

    def __init__(self, ref: CheckpointRef, key: str, why: str) -> None:
        self.key = key
        super().__init__(f"{ref.describe()}: unusable manifest {why}")


@dataclass(frozen=True)
class Resolved:
    ref: CheckpointRef
    project: str
    job_id: str
    source_rank: int  # the rank whose files are downloaded: this node's, or 0 (see pick_rank)
    checkpoint: str
    manifest: dict[str, Any]


def pick_rank(rank: int, ranks_with_manifests: set[int]) -> int | None:
    """The rank of the source job whose checkpoints this node restores.

    | own rank has manifests | rank 0 has manifests | result |
    |------------------------|----------------------|--------|
    | yes                    | any                  | rank   |
    | no                     | yes                  | 0      |
    | no                     | no                   | None   |

    Falling back to rank 0 lets a multi-node job start from a single-node job's checkpoint; a rank
    that has checkpoints of its own never takes rank 0's (its shards would be wrong).
    """
    if rank in ranks_with_manifests:
        return rank
    return 0 if 0 in ranks_with_manifests else None


async def _any_key(storage: Storage, prefix: str, suffix: str = "") -> bool:
    # aclosing: stop after the first page instead of listing everything under the prefix.
    async with contextlib.aclosing(storage.list(prefix)) as listing:
        async for info in listing:
            if info.key.endswith(suffix):
                return True
    return False


async def _ranks_with_manifests(storage: Storage, project: str, job_id: str, rank: int) -> set[int]:
    candidates = sorted({rank, 0})
    found = await asyncio.gather(
        *(_any_key(storage, layout.manifest_prefix(project, job_id, r), ".json") for r in candidates)
    )
    return {r for r, yes in zip(candidates, found, strict=True) if yes}


async def _source_rank(storage: Storage, project: str, job_id: str, rank: int) -> int | None:
    return pick_rank(rank, await _ranks_with_manifests(storage, project, job_id, rank))


async def _project_of(storage: Storage, ref: CheckpointRef, default_project: str) -> str | None:
    """The project holding the reference's job: as given, the default one, else the only one that has it."""
    assert ref.job_id is not None
    if ref.project_name:
        return ref.project_name
    try:
        return await browse.project_of(storage, ref.job_id, default_project)
    except browse.AmbiguousJob as exc:
        raise AmbiguousJob(ref, exc.projects) from None


async def _latest_of_job(storage: Storage, ref: CheckpointRef, project: str, job_id: str, rank: int) -> Resolved | None:
    source = await _source_rank(storage, project, job_id, rank)
    if source is None:
        return None
    manifest = await latest_manifest(storage, project, job_id, source)
    if manifest is None:
        return None
    return Resolved(ref, project, job_id, source, manifest["checkpoint"], manifest)


async def _named(storage: Storage, ref: CheckpointRef, project: str, rank: int) -> Resolved | None:
    assert ref.job_id is not None and ref.checkpoint_name is not None
    source = await _source_rank(storage, project, ref.job_id, rank)
    if source is None:
        return None
    try:
        key = layout.manifest_key(project, ref.job_id, source, ref.checkpoint_name)
    except layout.UnsafePath as exc:
        raise BadManifest(ref, "", str(exc)) from None
    try:
        manifest = await read_manifest(storage, key)  # refuses one stored under another name's key
    except StorageError as exc:
        if exc.missing:
            return None
        raise
    except ValueError as exc:  # its message names the key
        raise BadManifest(ref, key, str(exc)) from None
    return Resolved(ref, project, ref.job_id, source, manifest["checkpoint"], manifest)


async def _latest_of_project(storage: Storage, ref: CheckpointRef, project: str, rank: int) -> Resolved | None:
    """The latest checkpoint of the most recently created job of the project that has one."""
    for job_id, _ in await browse.jobs_newest_first(storage, project):
        found = await _latest_of_job(storage, ref, project, job_id, rank)
        if found is not None:
            return found
    return None


async def resolve(storage: Storage, ref: CheckpointRef, *, default_project: str, rank: int) -> Resolved | None:
    """The committed checkpoint `ref` names for a node of rank `rank`; None when nothing matches.

    Raises AmbiguousJob when the job id is found in several projects and the reference names
    none, StorageError when the store fails.
    """
    if ref.job_id is None:
        assert ref.project_name is not None  # parse_ref guarantees one of them
        return await _latest_of_project(storage, ref, ref.project_name, rank)
    project = await _project_of(storage, ref, default_project)
    if project is None:
        return None
    if ref.typ == NAMED:
        return await _named(storage, ref, project, rank)
    return await _latest_of_job(storage, ref, project, ref.job_id, rank)
