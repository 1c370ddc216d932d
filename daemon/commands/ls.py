"""`ckptd ls`: browse the store at four levels (SPEC §2).

    ckptd ls                                  projects
    ckptd ls --project P                      the jobs of P, newest first
    ckptd ls [--project P] --job J            the checkpoints of J, latest first, committed or not
    ckptd ls [--project P] [--job J] --checkpoint C|latest    the files of C on every rank

Without --project the job is looked for in every project (browse.project_of); --checkpoint
without --job takes the most recent job of the project (named on stderr). `--sort FIELD` orders
by any field below (or, for checkpoints, any metric: one named like a field, e.g. `step`, is the
table column and sort field `metric:step`), ascending, rows without it last;
`--reverse` flips the order; `--limit N` keeps the first N rows.

`--json` prints one object per level (sizes in bytes, times ISO 8601 UTC):

    {"projects": [{"project", "jobs"}]}
    {"project", "jobs": [{"job_id", "created_at", "status", "sync_status", "nodes", "checkpoints",
                          "files", "size"}]}
    {"project", "job_id", "checkpoints": [{"name", "step", "size", "files", "ranks", "committed_at",
                          "committed", "uncommitted_ranks", "metrics": {name: value}}]}
    {"project", "job_id", "checkpoint", "files": [{"rank", "path", "size", "sha256", "committed", "stored"}]}

A checkpoint is listed when any rank committed it or stored files for it: `committed` is false
when no rank has its manifest (a save interrupted, or still uploading; restore never picks it),
and `uncommitted_ranks` names the ranks holding files without a manifest. Such folders are shown,
never hidden; their size and files come from listing them. A file is `committed` when a manifest
lists it (then its sha256 is known) and `stored` when the store holds it now.

Multi-node jobs (ckptd's of group size above 1, or with global manifests: daemon.catalog.jobview)
are listed as restore sees them. A checkpoint is `committed` only when its global manifest is
stored (its step, commit time, size and metrics are then the global manifest's); one whose nodes
stored parts (per-rank manifests) but no global manifest yet is waiting, not committed, and its
row shows what the parts hold. The files at the top ('.') stay each node's, committed per rank.
"latest" (`--checkpoint latest`, the jobs' `checkpoints` count) follows the global manifests.
Their JSON adds, and only theirs:

    checkpoints level: "group_size", and per checkpoint "global_commit" ("committed", "waiting",
        "unreadable": a global manifest stored but damaged, which commits nothing; null for '.'),
        "part_ranks" (ranks with a part), "missing_ranks" (ranks 0..group_size-1 without one)
    files level: a file is `committed` when the global manifest lists it; a waiting checkpoint's
        files show the sha256 their part records, and are not committed

Exit codes: 0 listed (an empty list included), 1 unknown project, job or checkpoint, or a store
error, 2 an unknown --sort field (the accepted ones are named) or a job found in several projects.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from daemon import exits
from daemon.catalog import browse, globalmanifest, jobmeta, jobview, layout
from daemon.catalog.manifest import parse_step
from daemon.commands import show
from daemon.config import Config
from daemon.storage import Storage, StorageError

CONCURRENCY = 16


def _columns(spec: str) -> list[show.Column]:
    """ "key:header key ..." (header = key when omitted) as (key, header) pairs."""
    return [(k, h or k) for k, _, h in (word.partition(":") for word in spec.split())]


LEVELS = {  # level: (key of the rows in the JSON, columns of the table)
    "projects": ("projects", _columns("project jobs")),
    "jobs": ("jobs", _columns("job_id:job created_at:created status sync_status:sync nodes checkpoints files size")),
    "checkpoints": (
        "checkpoints",
        _columns("name:checkpoint step size files ranks committed_at:committed_at committed"),
    ),
    "files": ("files", _columns("rank path size sha256 committed stored")),
}


def level_of(c: Config, args: argparse.Namespace) -> str:
    """Which listing the flags ask for.

    | --checkpoint | job asked | project asked | level       |
    |--------------|-----------|---------------|-------------|
    | yes          | any       | any           | files       |
    | no           | yes       | any           | checkpoints |
    | no           | no        | yes           | jobs        |
    | no           | no        | no            | projects    |

    "Asked" means given by flag, environment or config file (Config.explicit).
    """
    if args.checkpoint:
        return "files"
    if "job_id" in c.explicit:
        return "checkpoints"
    return "jobs" if "project" in c.explicit else "projects"


async def find_job(storage: Storage, c: Config, *, say_latest: bool = True) -> tuple[str, str]:
    """(project, job id) the flags name; NotFound / AmbiguousJob as browse raises them.

    No job asked: the most recent job of the project, said on stderr."""
    if "job_id" not in c.explicit:
        job_id = await browse.latest_job(storage, c.project)
        if say_latest:
            show.note(f"job {job_id} (the most recent of project {c.project})")
        return c.project, job_id
    if "project" in c.explicit:
        if not await browse.job_exists(storage, c.project, c.job_id):
            raise browse.NotFound(f"no job {c.job_id!r} in project {c.project!r} in {storage.url}")
        return c.project, c.job_id
    project = await browse.project_of(storage, c.job_id, c.project)
    if project is None:
        raise browse.NotFound(f"no job {c.job_id!r} in any project of {storage.url}")
    return project, c.job_id


async def list_projects(storage: Storage) -> dict[str, Any]:
    names = await browse.projects(storage)
    counts = await asyncio.gather(*(browse.job_ids(storage, p) for p in names))
    return {"projects": [{"project": p, "jobs": len(ids)} for p, ids in zip(names, counts, strict=True)]}


async def list_jobs(storage: Storage, project: str) -> dict[str, Any]:
    jobs = await browse.jobs_newest_first(storage, project)
    if not jobs and project not in await browse.projects(storage):
        raise browse.NotFound(f"no project {project!r} in {storage.url}")
    limit = asyncio.Semaphore(CONCURRENCY)

    async def row(job_id: str, created_at: str | None) -> dict[str, Any]:
        async with limit:
            try:
                meta = await jobmeta.read_job(storage, project, job_id)
            except jobmeta.JobNotFound:
                meta = {}
            whole = await globalmanifest.commits_globally(storage, project, job_id)
            usage = await browse.job_usage(storage, project, job_id, commits_globally=whole)
        return {
            "job_id": job_id,
            "created_at": created_at,
            "status": meta.get("current_status"),
            "sync_status": meta.get("checkpoint_sync_status"),
            "nodes": meta.get("group_size") or len(usage["ranks"]) or None,
            "checkpoints": usage["checkpoints"],
            "files": usage["files"],
            "size": usage["bytes"],
        }

    return {"project": project, "jobs": list(await asyncio.gather(*(row(j, t) for j, t in jobs)))}


async def _stored_files(storage: Storage, project: str, job_id: str, rank: int, name: str) -> list[Any] | None:
    """Objects stored for one checkpoint folder of one rank; None for the root pseudo-checkpoint,
    whose files sit beside every folder (only walking the whole rank would find them)."""
    if name == layout.ROOT_CHECKPOINT:
        return None
    return [info async for info in storage.list(f"{layout.rank_prefix(project, job_id, rank)}{name}/")]


async def _uncommitted_by_status(storage: Storage, project: str, job_id: str) -> dict[int, list[str]]:
    """Per rank, the checkpoints its daemon last reported as not committed (the root '.' too)."""
    try:
        job = await jobmeta.read_job(storage, project, job_id)
    except jobmeta.JobNotFound:
        return {}
    return {
        s["rank"]: [n for n in s["uncommitted"] if n == layout.ROOT_CHECKPOINT or layout.is_segment(n)]
        for s in job["ranks"]
    }


def _checkpoint_row(c: browse.Checkpoint | None, name: str, loose: dict[int, list[Any] | None]) -> dict[str, Any]:
    """One checkpoint's row: what its manifests say, plus what ranks without one have stored
    (size and files None when only a status report says so and nothing could be listed). A rank's
    files that a multi-node job's global manifest lists are in its size already."""
    known = [infos for rank, infos in loose.items() if infos is not None and rank not in (c.ranks if c else ())]
    size, files = (c.total_bytes, c.file_count) if c else (None, None)
    if known:
        size = (size or 0) + sum(info.size for infos in known for info in infos)
        files = (files or 0) + sum(len(infos) for infos in known)
    return {
        "name": name,
        "step": c.step if c else parse_step(name),
        "size": size,
        "files": files,
        "ranks": sorted({*(c.ranks if c else ()), *loose}),
        "committed_at": c.committed_at if c else None,
        "committed": c is not None,
        "uncommitted_ranks": sorted(loose),
        "metrics": c.metrics if c else {},
    }


async def list_checkpoints(storage: Storage, project: str, job_id: str) -> dict[str, Any]:
    job, stored, reported = await asyncio.gather(
        jobview.view(storage, project, job_id),
        browse.stored_folders(storage, project, job_id),
        _uncommitted_by_status(storage, project, job_id),
    )
    # What each row shows: the committed checkpoint, else (multi-node) the parts stored of it.
    by_name = {**job.parts, **{c.name: c for c in job.committed}}
    # (rank, name) stored or reported without that rank's manifest: uncommitted there.
    loose_keys = sorted(
        {
            (rank, name)
            for source in (stored, reported)
            for rank, names in source.items()
            for name in names
            if name not in by_name or rank not in by_name[name].manifests
        }
    )
    limit = asyncio.Semaphore(CONCURRENCY)

    async def listed(rank: int, name: str) -> list[Any] | None:
        async with limit:
            return await _stored_files(storage, project, job_id, rank, name)

    listings = await asyncio.gather(*(listed(r, n) for r, n in loose_keys))
    loose: dict[str, dict[int, list[Any] | None]] = {}
    for (rank, name), infos in zip(loose_keys, listings, strict=True):
        loose.setdefault(name, {})[rank] = infos
    rows = [_checkpoint_row(by_name.get(n), n, loose.get(n, {})) for n in sorted({*by_name, *loose})]
    if not job.multi_node:
        rows.sort(key=_recency, reverse=True)
        return {"project": project, "job_id": job_id, "checkpoints": rows}
    rows = [_global_row(row, job) for row in rows]
    rows.sort(key=_recency, reverse=True)
    return {"project": project, "job_id": job_id, "group_size": job.group_size, "checkpoints": rows}


def _global_row(row: dict[str, Any], job: jobview.JobView) -> dict[str, Any]:
    """A multi-node job's row: committed only with its global manifest (a row of parts alone
    has neither commit nor commit time), with the ranks whose parts are stored and missing."""
    name, state = row["name"], job.global_state(row["name"])
    if state not in (None, jobview.COMMITTED):
        row.update(committed=False, committed_at=None)
    per_node = state is None  # '.': each node's own files, committed per rank
    return row | {
        "global_commit": state,
        "part_ranks": [] if per_node else job.part_ranks(name),
        "missing_ranks": [] if per_node else job.missing_ranks(name),
    }


def _recency(row: dict[str, Any]) -> tuple[bool, int, str, str]:
    """Latest first, as browse.latest decides; an uncommitted folder sorts by its step alone."""
    step = row["step"]
    return step is not None, -1 if step is None else step, row["committed_at"] or "", row["name"]


async def _rank_files(storage: Storage, key_of: Any, name: str, entries: dict[str, Any], listing: Any) -> dict:
    """{relpath: ObjectInfo | None} of one rank: the folder's listing, or for the root '.' (which
    cannot be listed alone) a HEAD of each file its manifest names."""
    if listing is not None:
        return {p.relpath: i for i in listing if (p := layout.parse_file_key(i.key))}
    heads = await asyncio.gather(*(storage.head(key_of(path)) for path in entries))
    return {path: info for path, info in zip(entries, heads, strict=True) if info is not None}


async def list_files(storage: Storage, project: str, job_id: str, wanted: str) -> dict[str, Any]:
    job, stored = await asyncio.gather(
        jobview.view(storage, project, job_id), browse.stored_folders(storage, project, job_id)
    )
    name, chosen = job.pick(wanted, project, job_id)
    shown = chosen or job.parts.get(name)  # a waiting multi-node checkpoint: its parts know the sha256
    ranks = browse.ranks_holding(stored, name, shown)
    if not ranks:
        raise browse.NotFound(f"no checkpoint {wanted!r} in job {job_id!r} of project {project!r}")
    rows = []
    for rank in ranks:
        entries = {f["path"]: f for f in shown.files_of(rank)} if shown else {}
        committed = {f["path"] for f in chosen.files_of(rank)} if chosen else set()
        listing = await _stored_files(storage, project, job_id, rank, name)
        key_of = lambda path, rank=rank: layout.file_key(project, job_id, rank, path)  # noqa: E731
        there = await _rank_files(storage, key_of, name, entries, listing)
        for path in sorted({*there, *entries}):
            entry, info = entries.get(path), there.get(path)
            rows.append(
                {
                    "rank": rank,
                    "path": path,
                    "size": entry["size"] if entry else info.size,
                    "sha256": entry["sha256"] if entry else None,
                    "committed": path in committed,
                    "stored": info is not None,
                }
            )
    return {"project": project, "job_id": job_id, "checkpoint": name, "files": rows}


async def gather(c: Config, args: argparse.Namespace, storage: Storage, level: str) -> dict[str, Any]:
    if level == "projects":
        return await list_projects(storage)
    if level == "jobs":
        return await list_jobs(storage, c.project)
    project, job_id = await find_job(storage, c)
    if level == "checkpoints":
        return await list_checkpoints(storage, project, job_id)
    return await list_files(storage, project, job_id, args.checkpoint)


def _field(row: dict[str, Any], name: str) -> Any:
    return row[name] if name in row else row.get("metrics", {}).get(name.removeprefix(METRIC_PREFIX))


# The fields of a checkpoint row (see _checkpoint_row), which no metric may shadow in the table.
_ROW_FIELDS = frozenset(
    ["name", "step", "size", "files", "ranks", "committed_at", "committed", "uncommitted_ranks", "metrics"]
) | {"global_commit", "part_ranks", "missing_ranks"}  # a multi-node job's
METRIC_PREFIX = "metric:"


def metric_column(name: str) -> str:
    """The table column of a metric: its name, or "metric:NAME" when a row field has that name.

    A metric called `step` or `name` (trainers log what they like) must not replace the real
    column, and skipping it would hide data, so it gets a prefixed column instead. Only the
    table needs this: --json keeps metrics under "metrics", apart from the row's fields.
    """
    return f"{METRIC_PREFIX}{name}" if name in _ROW_FIELDS else name


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """A row as a person reads it: sizes in KiB/MiB, ranks as "0,1", metrics as columns."""
    out = {**{metric_column(m): v for m, v in row.get("metrics", {}).items()}, **row}
    out["size"] = show.human_bytes(row.get("size"))
    if isinstance(row.get("ranks"), list):
        out["ranks"] = ",".join(map(str, row["ranks"]))
    if "uncommitted_ranks" in row:
        partial = row["committed"] and row["uncommitted_ranks"]
        out["committed"] = f"partial (not rank {','.join(map(str, partial))})" if partial else row["committed"]
    for name in ("committed", "stored"):
        if isinstance(out.get(name), bool):
            out[name] = "yes" if out[name] else "NO"
    if row.get("global_commit") not in (None, jobview.COMMITTED):
        have, missing = (",".join(map(str, row[k])) or "none" for k in ("part_ranks", "missing_ranks"))
        out["global_commit"] = f"{row['global_commit']} (parts: {have}; missing: {missing})"
    return out


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.commands.common import storage_for

    level = level_of(c, args)
    key, columns = LEVELS[level]

    async def go() -> dict[str, Any]:
        async with storage_for(c) as storage:
            return await gather(c, args, storage, level)

    try:
        doc = uvloop.run(go())
    except browse.AmbiguousJob as e:
        return show.fail(str(e), exits.CONFIG)
    except browse.NotFound as e:
        return show.fail(str(e))
    except StorageError as e:
        return show.fail(f"listing {c.storage} failed: {e}")
    metrics = sorted({m for row in doc[key] for m in row.get("metrics", {})})
    metric_names = [metric_column(m) for m in metrics]
    if "group_size" in doc:  # a multi-node job's checkpoints
        columns = [*columns, ("global_commit", "global")]
    extra = ["uncommitted_ranks"] if level == "checkpoints" else []
    extra += ["part_ranks", "missing_ranks"] if "group_size" in doc else []
    accepted = [k for k, _ in columns] + extra + metric_names
    try:
        rows = show.sort_rows(doc[key], args.sort, accepted, reverse=args.reverse, value=_field)
    except show.UnknownField as e:
        return show.fail(str(e), exits.CONFIG)
    doc[key] = rows[: args.limit] if args.limit else rows
    if args.json:
        show.print_json(doc)
    else:
        metric_columns = [(m, m) for m in metric_names]
        show.print_table([_display(r) for r in doc[key]], columns + metric_columns, title=_title(doc))
    return exits.OK


def _title(doc: dict[str, Any]) -> str | None:
    parts = [f"{k} {doc[k]}" for k in ("project", "job_id", "checkpoint", "group_size") if k in doc]
    return ", ".join(parts) or None
