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
| best      | one of several of the job or project     | skipped, a warning names its key (browse.checkpoints) |
| any       | its job's root files' (`.`) manifest     | BadManifest naming the key (see Root files) |
| any       | not `*.json`, or under a folder name no key may hold | ignored                       |

BadManifest is exit 3 for a required reference, a warning and training from scratch for an
optional one (restorer.py). So is Unmatched: a best reference whose metric no candidate records
matches nothing, and the message names the metric and those that are recorded.

Root files: whatever checkpoint C of job J a reference resolves to, J's committed `.` files (the
tokenizer a trainer saves at the top of its checkpoint folder) of the same source rank come with
it (`Resolved.root`).

Best by a metric (`ckptd_best_checkpoint`): candidates are the committed checkpoints of the source
rank (never `.`), ranked by `browse.best` on the metrics of rank 0, completed by the source rank's
(trainers log on rank 0): every node of a job then ranks alike and picks the same checkpoint.
- of a job: the best of that job;
- of a project: the best across all of its jobs (a sweep's best run), not only the newest job's:
  the metric is what compares them; a tie goes to the later checkpoint (higher step, then later
  commit). To restrict it to one job, name the job.

Multi-node jobs (globalmanifest.commits_globally: job.json says so, or a global manifest is stored):
only globally committed checkpoints are candidates, whatever parts of others were stored,
and each node restores the whole checkpoint merged into one folder: every rank's files, this
node's own first where two ranks hold one path (globalmanifest.merged). Root files stay per node.

A manifest that parses but lies about its files' bytes is caught when downloading (download.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from daemon.catalog import browse, globalmanifest, layout
from daemon.catalog.manifest import latest_manifest, read_manifest, recency
from daemon.config.refs import BEST, NAMED, CheckpointRef
from daemon.storage import Storage, StorageError

log = structlog.get_logger()
JOBS_AT_ONCE = 4  # a project's jobs searched at once for the best; each reads its manifests 32 at a time


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


class Unmatched(LookupError):
    """The reference matches no committed checkpoint, for a reason the user must read (a metric)."""

    def __init__(self, ref: CheckpointRef, why: str) -> None:
        super().__init__(f"{ref.describe()} matches nothing: {why}")


@dataclass(frozen=True)
class Resolved:
    ref: CheckpointRef
    project: str
    job_id: str
    source_rank: int  # the rank whose files are downloaded: this node's, or 0 (see pick_rank)
    checkpoint: str
    manifest: dict[str, Any]
    root: dict[str, Any] | None = None  # the job's committed '.' (files at the top), same source rank
    merged_ranks: tuple[int, ...] = ()  # a multi-node checkpoint: the ranks whose files it merges


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


async def _ranks_with_manifests(storage: Storage, project: str, job_id: str, rank: int) -> set[int]:
    candidates = sorted({rank, 0})
    found = await asyncio.gather(
        *(storage.has_any(layout.manifest_prefix(project, job_id, r), ".json") for r in candidates)
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


async def _merged(storage: Storage, ref: CheckpointRef, project: str, manifest: dict[str, Any], rank: int) -> Resolved:
    view, shadowed = globalmanifest.merged(manifest, rank)
    if shadowed:
        log.warning(
            "several ranks stored these files with other bytes: this node restores its own, else the lowest rank's",
            ref=ref.describe(),
            checkpoint=manifest["checkpoint"],
            paths=shadowed[:20],
            count=len(shadowed),
        )
    root_rank = await _source_rank(storage, project, manifest["job_id"], rank)
    ranks = tuple(sorted({f["rank"] for f in manifest["files"]}))
    source = rank if root_rank is None else root_rank
    return Resolved(ref, project, manifest["job_id"], source, manifest["checkpoint"], view, merged_ranks=ranks)


async def _latest_of_job(storage: Storage, ref: CheckpointRef, project: str, job_id: str, rank: int) -> Resolved | None:
    if await globalmanifest.commits_globally(storage, project, job_id):
        found = await globalmanifest.read_globals(storage, project, job_id)
        latest = max(found, key=recency, default=None)
        return None if latest is None else await _merged(storage, ref, project, latest, rank)
    source = await _source_rank(storage, project, job_id, rank)
    if source is None:
        return None
    manifest = await latest_manifest(storage, project, job_id, source)
    if manifest is None:
        return None
    return Resolved(ref, project, job_id, source, manifest["checkpoint"], manifest)


async def _manifest_at(
    storage: Storage, ref: CheckpointRef, key: str, reader: Callable[..., Awaitable[dict[str, Any]]] = read_manifest
) -> dict[str, Any] | None:
    """The manifest at `key`; None when there is none, BadManifest when it is unusable."""
    try:
        return await reader(storage, key)  # refuses one stored under another name's key
    except StorageError as exc:
        if exc.missing:
            return None
        raise
    except ValueError as exc:  # its message names the key
        raise BadManifest(ref, key, str(exc)) from None


async def _named(storage: Storage, ref: CheckpointRef, project: str, rank: int) -> Resolved | None:
    assert ref.job_id is not None and ref.checkpoint_name is not None
    if ref.checkpoint_name != layout.ROOT_CHECKPOINT and await globalmanifest.commits_globally(
        storage, project, ref.job_id
    ):
        return await _named_global(storage, ref, project, rank)
    source = await _source_rank(storage, project, ref.job_id, rank)
    if source is None:
        return None
    try:
        key = layout.manifest_key(project, ref.job_id, source, ref.checkpoint_name)
    except layout.UnsafePath as exc:
        raise BadManifest(ref, "", str(exc)) from None
    manifest = await _manifest_at(storage, ref, key)
    if manifest is None:
        return None
    return Resolved(ref, project, ref.job_id, source, manifest["checkpoint"], manifest)


async def _named_global(storage: Storage, ref: CheckpointRef, project: str, rank: int) -> Resolved | None:
    assert ref.job_id is not None and ref.checkpoint_name is not None
    try:
        key = layout.global_key(project, ref.job_id, ref.checkpoint_name)
    except layout.UnsafePath as exc:
        raise BadManifest(ref, "", str(exc)) from None
    manifest = await _manifest_at(storage, ref, key, globalmanifest.read_global)
    return None if manifest is None else await _merged(storage, ref, project, manifest, rank)


async def _latest_of_project(storage: Storage, ref: CheckpointRef, project: str, rank: int) -> Resolved | None:
    """The latest checkpoint of the most recently created job of the project that has one."""
    for job_id, _ in await browse.jobs_newest_first(storage, project):
        found = await _latest_of_job(storage, ref, project, job_id, rank)
        if found is not None:
            return found
    return None


_Candidate = tuple[browse.Checkpoint, str, int]  # checkpoint, its job, the source rank there


async def _candidates(storage: Storage, project: str, job_id: str, rank: int) -> list[_Candidate]:
    """The source rank's committed checkpoints of a job, '.' excepted, with rank 0's metrics; the
    globally committed ones of a multi-node job (`whole`: resolved by `_merged`)."""
    if await globalmanifest.commits_globally(storage, project, job_id):
        found = await globalmanifest.read_globals(storage, project, job_id)
        return [(browse.Checkpoint(m["checkpoint"], {}, whole=m), job_id, rank) for m in found]
    source = await _source_rank(storage, project, job_id, rank)
    if source is None:
        return []
    found = await browse.checkpoints(storage, project, job_id, ranks={0, source})
    return [(c, job_id, source) for c in found if source in c.manifests and c.name != layout.ROOT_CHECKPOINT]


async def _best(storage: Storage, ref: CheckpointRef, project: str, jobs: list[str], rank: int) -> Resolved | None:
    """The best of the jobs' candidates by the reference's metric; Unmatched when none records it."""
    assert ref.metric is not None and ref.mode is not None
    limit = asyncio.Semaphore(JOBS_AT_ONCE)

    async def of(job_id: str) -> list[_Candidate]:
        async with limit:
            return await _candidates(storage, project, job_id, rank)

    candidates = [c for found in await asyncio.gather(*(of(j) for j in jobs)) for c in found]
    if not candidates:
        return None
    try:
        winner = browse.best([c for c, _, _ in candidates], ref.metric, ref.mode)[0]
    except browse.MissingMetric as exc:
        raise Unmatched(ref, str(exc)) from None
    _, job_id, source = next(c for c in candidates if c[0] is winner)
    if winner.whole is not None:
        return await _merged(storage, ref, project, winner.whole, rank)
    return Resolved(ref, project, job_id, source, winner.name, winner.manifests[source])


async def _with_root(storage: Storage, found: Resolved | None) -> Resolved | None:
    """`found` with its job's committed root files of the same source rank, when it has any."""
    if found is None or found.checkpoint == layout.ROOT_CHECKPOINT:
        return found
    key = layout.manifest_key(found.project, found.job_id, found.source_rank, layout.ROOT_CHECKPOINT)
    root = await _manifest_at(storage, found.ref, key)
    return found if root is None else dataclasses.replace(found, root=root)


async def resolve(storage: Storage, ref: CheckpointRef, *, default_project: str, rank: int) -> Resolved | None:
    """The committed checkpoint `ref` names for a node of rank `rank`, with its job's root files;
    None when nothing matches.

    Raises AmbiguousJob when the job id is found in several projects and the reference names
    none, BadManifest for an unusable manifest it needs, Unmatched when a best reference's metric
    is recorded by no candidate, StorageError when the store fails.
    """
    return await _with_root(storage, await _resolve(storage, ref, default_project, rank))


async def _resolve(storage: Storage, ref: CheckpointRef, default_project: str, rank: int) -> Resolved | None:
    if ref.job_id is None:
        assert ref.project_name is not None  # parse_ref guarantees one of them
        if ref.typ == BEST:
            jobs = [job_id for job_id, _ in await browse.jobs_newest_first(storage, ref.project_name)]
            return await _best(storage, ref, ref.project_name, jobs, rank)
        return await _latest_of_project(storage, ref, ref.project_name, rank)
    project = await _project_of(storage, ref, default_project)
    if project is None:
        return None
    if ref.typ == NAMED:
        return await _named(storage, ref, project, rank)
    if ref.typ == BEST:
        return await _best(storage, ref, project, [ref.job_id], rank)
    return await _latest_of_job(storage, ref, project, ref.job_id, rank)
