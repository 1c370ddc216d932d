"""A job's committed checkpoints as restore sees them (SPEC §4), for `ls` and `prune`.

A job is multi-node as restore decides it (globalmanifest.commits_globally: a ckptd job of group
size above 1, or one with any global manifest stored). Its nodes commit shares of a checkpoint as
per-rank "parts", and the checkpoint is committed exactly when its global manifest is stored
(daemon.catalog.globalmanifest). Files at the top of the checkpoint folder ('.') never commit
globally: they stay each node's own, committed per rank as in a single-node job.

| job         | committed                                                 | parts                     |
|-------------|-----------------------------------------------------------|---------------------------|
| single-node | every checkpoint some rank has a manifest of              | {}                        |
| multi-node  | those with a readable global manifest (with their parts), | every checkpoint with a   |
|             | and '.' as its ranks committed it                         | part, committed or not    |

A multi-node checkpoint with parts but no global manifest is waiting: the missing ranks have not
stored their share yet (or never will: a node that crashed). An unreadable global manifest commits
nothing either (restore skips it), but is stored: `stored_globals` names it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from daemon.catalog import browse, globalmanifest, jobmeta, layout
from daemon.catalog.browse import Checkpoint
from daemon.catalog.manifest import read_or_skip
from daemon.storage import Storage

COMMITTED, WAITING, UNREADABLE = "committed", "waiting", "unreadable"  # global commit states


@dataclass(frozen=True)
class JobView:
    committed: list[Checkpoint]  # by name
    group_size: int | None = None  # multi-node: the job's group size; None: a single-node job
    parts: dict[str, Checkpoint] = field(default_factory=dict)  # multi-node: every rank's manifests, by name
    stored_globals: frozenset[str] = frozenset()  # multi-node: names whose global manifest is stored

    @property
    def multi_node(self) -> bool:
        return self.group_size is not None

    def named(self, name: str) -> Checkpoint | None:
        return browse.checkpoint_named(self.committed, name)

    def global_state(self, name: str) -> str | None:
        """COMMITTED, UNREADABLE or WAITING; None for a single-node job and for '.' (per node)."""
        if not self.multi_node or name == layout.ROOT_CHECKPOINT:
            return None
        if self.named(name) is not None:
            return COMMITTED
        return UNREADABLE if name in self.stored_globals else WAITING

    def part_ranks(self, name: str) -> list[int]:
        found = self.parts.get(name)
        return sorted(found.manifests) if found is not None else []

    def missing_ranks(self, name: str) -> list[int]:
        """The ranks of the group without a part of `name` (none for a single-node job)."""
        have = set(self.part_ranks(name))
        return [r for r in range(self.group_size or 0) if r not in have]

    def pick(self, wanted: str, project: str, job_id: str) -> tuple[str, Checkpoint | None]:
        """browse.pick, with restore's "latest" of a multi-node job: a global one, never '.'."""
        found = self.committed
        if self.multi_node and wanted == "latest":
            found = [c for c in found if c.name != layout.ROOT_CHECKPOINT]
        return browse.pick(found, wanted, project, job_id)


async def view(storage: Storage, project: str, job_id: str) -> JobView:
    """The job's checkpoints: its manifests, job.json and global manifests read concurrently."""
    found, job, (stored, wholes) = await asyncio.gather(
        browse.checkpoints(storage, project, job_id),
        jobmeta.read_job_record(storage, project, job_id),
        _globals(storage, project, job_id),
    )
    group = _group_size(job)
    if not stored and not globalmanifest.says_global_commit(job):  # as globalmanifest.commits_globally
        return JobView(found)
    group = max([group, *(m["group_size"] for m in wholes)])
    parts = {c.name: c for c in found}
    committed = [Checkpoint(m["checkpoint"], _parts_of(parts, m["checkpoint"]), m) for m in wholes]
    committed += [c for c in found if c.name == layout.ROOT_CHECKPOINT]
    return JobView(sorted(committed, key=lambda c: c.name), group, parts, frozenset(stored))


def _parts_of(parts: dict[str, Checkpoint], name: str) -> dict[int, dict]:
    found = parts.get(name)
    return dict(found.manifests) if found is not None else {}


def _group_size(job: dict | None) -> int:
    """job.json's group_size; 1 when it is missing or not a count (the global manifests' then)."""
    group = job.get("group_size") if job is not None else None
    return group if isinstance(group, int) and not isinstance(group, bool) and group > 1 else 1


async def _globals(storage: Storage, project: str, job_id: str) -> tuple[set[str], list[dict]]:
    """(names with a global manifest stored, the readable global manifests); unreadable ones are
    logged (manifest.read_or_skip)."""
    prefix = layout.global_prefix(project, job_id)
    keys = {}
    async for info in storage.list(prefix):
        name = info.key[len(prefix) :].removesuffix(".json")
        if info.key.endswith(".json") and layout.is_segment(name):
            keys[name] = info.key
    limit = asyncio.Semaphore(browse.READ_CONCURRENCY)
    found = await asyncio.gather(*(read_or_skip(storage, k, limit, globalmanifest.read_global) for k in keys.values()))
    return set(keys), [m for m in found if m is not None]
