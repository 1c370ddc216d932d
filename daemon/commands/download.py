"""`ckptd download`: the serving-side fetch of SPEC §7.

    ckptd download --job J --path 'rank-*/checkpoint-10/' [--path ...] --to DIR
    ckptd download --config FILE      # training_checkpoints: {download_folder, artifact_references}

Files land at `DIR/{job_id}/rank-{N}/{relative path}` (restore/fetch.py: parallel, verified,
atomic, link-proof). Patterns: catalog/patterns.py. `--path` builds one reference from `--job`;
`--path` together with a config's `artifact_references` is refused (exit 2) rather than guessed at.

Exit codes: 0 every file in place; 1 an unknown job, a pattern that matches nothing, a store or
download failure; 2 a malformed pattern, contradictory or missing flags, a job in several projects.

--json prints {"folder", "files", "bytes", "downloaded_files", "downloaded_bytes", "kept_files",
"seconds", "references": [{"job_id", "project", "paths", "files", "bytes", "unverified"}]};
`unverified` lists the checkpoints ("rank-N/name") whose files had no committed manifest to check
their SHA-256 against (size checked only).
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import structlog

from daemon import exits
from daemon.catalog import browse, jobview, layout, patterns
from daemon.commands import show
from daemon.config import Config
from daemon.config.artifacts import ArtifactRef
from daemon.restore.fetch import FetchFailed, Wanted
from daemon.storage import Storage, StorageError

log = structlog.get_logger()
_RANK_DIR = re.compile(r"rank-(0|[1-9][0-9]*)/")


class Refused(Exception):
    """Bad input or nothing to fetch; carries the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Stored:
    """One stored checkpoint file of a job, as the store lists it."""

    rank: int
    relpath: str
    key: str
    size: int
    last_modified: datetime


async def stored_files(storage: Storage, project: str, job_id: str) -> list[Stored]:
    """Every checkpoint file of every rank of the job, by (rank, relpath). One paginated listing.

    A key under a rank folder that is no safe relative path ('..', empty segments) is logged and
    left out: nothing may be written for it."""
    prefix = layout.job_prefix(project, job_id)
    found = []
    async for info in storage.list(prefix):
        if not _RANK_DIR.match(info.key, len(prefix)):
            continue  # manifests/, job.json, status/
        parsed = layout.parse_file_key(info.key)
        if parsed is None or (parsed.project, parsed.job_id) != (project, job_id):
            log.warning("skipping a stored key that is no safe path", key=info.key)
            continue
        found.append(Stored(parsed.rank, parsed.relpath, info.key, info.size, info.last_modified))
    return sorted(found, key=lambda s: (s.rank, s.relpath))


@dataclass
class Selection:
    job_id: str
    project: str
    paths: tuple[str, ...]
    wanted: list[Wanted] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # "rank-N/checkpoint" without a manifest entry


async def resolve_project(storage: Storage, job_id: str, default_project: str, *, only: bool = False) -> str:
    """The project holding the job: `default_project` if it does; unless `only` (the project was
    asked for), the one other project that does, as the reference's job ids name no project."""
    if only:
        if not await browse.job_exists(storage, default_project, job_id):
            raise Refused(f"no job {job_id!r} in project {default_project!r} in {storage.url}", exits.FAILED)
        return default_project
    try:
        project = await browse.project_of(storage, job_id, default_project)
    except browse.AmbiguousJob as exc:
        raise Refused(str(exc), exits.CONFIG) from None
    if project is None:
        raise Refused(f"no job {job_id!r} in project {default_project!r} or any other of {storage.url}", exits.FAILED)
    return project


async def select(storage: Storage, ref: ArtifactRef, default_project: str, *, only: bool = False) -> Selection:
    """The stored files of the reference's job that its paths match; Refused naming a pattern that
    matches nothing."""
    parsed = [patterns.parse(p) for p in ref.paths]  # checked at load or by main: cannot fail here
    project = await resolve_project(storage, ref.job_id, default_project, only=only)
    files = await stored_files(storage, project, ref.job_id)
    job = await jobview.view(storage, project, ref.job_id)
    # (rank, relpath) -> (key, size, sha256): the manifests first, so a committed file is verified
    # (a multi-node job's parts too: each lists what its rank stored).
    known: dict[tuple[int, str], tuple[str, int, str | None]] = {
        (f.rank, f.relpath): (f.key, f.size, None) for f in files
    }
    for ckpt in [*job.committed, *job.parts.values()]:
        for rank, manifest in ckpt.manifests.items():
            for e in manifest["files"]:
                known[(rank, e["path"])] = (e["key"], e["size"], e["sha256"])
    # `latest` as restore means it: of a multi-node job, its latest global commit.
    latest = browse.latest(c for c in job.committed if c.name != layout.ROOT_CHECKPOINT)
    chosen: set[tuple[int, str]] = set()
    for p in parsed:
        if p.uses_latest:
            if latest is None:
                raise Refused(f"{p.text!r}: job {ref.job_id!r} has no committed checkpoint for 'latest'", exits.FAILED)
            p = p.with_latest(latest.name)
        matched = {rp for rp in known if p.matches(*rp)}
        if not matched:
            raise Refused(
                f"{p.text!r} matches no stored file of job {ref.job_id!r} (project {project!r})", exits.FAILED
            )
        chosen |= matched
    sel = Selection(ref.job_id, project, ref.paths)
    for rank, relpath in sorted(chosen):
        key, size, sha256 = known[(rank, relpath)]
        sel.wanted.append(Wanted(key, (ref.job_id, f"rank-{rank}", *relpath.split("/")), size, sha256))
        if sha256 is None:
            sel.unverified.append(f"rank-{rank}/{layout.checkpoint_of(relpath)}")
    sel.unverified = sorted(set(sel.unverified))
    await _refuse_damaged(storage, project, ref.job_id, sel.unverified)
    return sel


async def _refuse_damaged(storage: Storage, project: str, job_id: str, unverified: list[str]) -> None:
    """Refused when a checkpoint to be fetched unverified has a manifest after all: one that cannot
    be read (browse left it out). Its files cannot be checked against it; serving them is refused."""
    folders = [folder.split("/", 1) for folder in unverified]
    keys = [layout.manifest_key(project, job_id, int(rank[5:]), name) for rank, name in folders]
    found = await asyncio.gather(*(storage.head(k) for k in keys))
    damaged = [f"{rank}/{name}" for (rank, name), info in zip(folders, found, strict=True) if info is not None]
    if damaged:
        raise Refused(
            f"the manifest of {', '.join(damaged)} cannot be read: its files cannot be verified, and are not fetched",
            exits.FAILED,
        )


def references(c: Config, args: argparse.Namespace) -> list[ArtifactRef]:
    """What to fetch: one reference from --job/--path, or the config's; Refused (exit 2) otherwise."""
    if args.path:
        if c.artifact_references:
            raise Refused(
                "give either --path (with --job) or training_checkpoints.artifact_references in the config, not both",
                exits.CONFIG,
            )
        if "job_id" not in c.explicit:
            raise Refused("--path needs --job JOB_ID: the job whose files to download", exits.CONFIG)
        for p in args.path:
            try:
                patterns.check_pattern(p)
            except ValueError as exc:
                raise Refused(f"--path: {exc}", exits.CONFIG) from None
        return [ArtifactRef(c.job_id, tuple(args.path))]
    if not c.artifact_references:
        raise Refused(
            "nothing to download: give --job JOB --path 'rank-*/checkpoint-10/' --to DIR, or --config FILE "
            "with training_checkpoints.artifact_references",
            exits.CONFIG,
        )
    return list(c.artifact_references)


def _merge(selections: Sequence[Selection]) -> list[Wanted]:
    """Every wanted file once (two references may name the same job and overlap)."""
    out: dict[tuple[str, ...], Wanted] = {}
    for sel in selections:
        for w in sel.wanted:
            out.setdefault(w.parts, w)
    return list(out.values())


def report(c: Config, selections: Sequence[Selection], done: Any) -> dict[str, Any]:
    refs = [
        {
            "job_id": s.job_id,
            "project": s.project,
            "paths": list(s.paths),
            "files": len(s.wanted),
            "bytes": sum(w.size for w in s.wanted),
            "unverified": s.unverified,
        }
        for s in selections
    ]
    return {"folder": c.download_folder, **asdict(done), "references": refs}


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.commands.common import storage_for
    from daemon.progress import Bar
    from daemon.restore.fetch import fetch

    async def go() -> dict[str, Any]:
        refs = references(c, args)
        async with storage_for(c) as storage:
            only = "project" in c.explicit
            selections = [await select(storage, ref, c.project, only=only) for ref in refs]
            unverified = [f"{s.job_id}:{u}" for s in selections for u in s.unverified]
            if unverified:
                log.warning(
                    "downloading files of uncommitted checkpoints: their sizes are checked, their bytes cannot be",
                    checkpoints=unverified,
                )
            done = await fetch(storage, _merge(selections), c.download_folder, progress=Bar("downloading"))
        return report(c, selections, done)

    try:
        out = uvloop.run(go())
    except Refused as exc:
        return show.fail(str(exc), exc.code)
    except (FetchFailed, StorageError) as exc:
        return show.fail(f"download failed: {exc}")
    if args.json:
        show.print_json(out)
        return exits.OK
    show.print_table(
        [{**r, "paths": " ".join(r["paths"]), "bytes": show.human_bytes(r["bytes"])} for r in out["references"]],
        [("job_id", "job"), ("project", "project"), ("paths", "paths"), ("files", "files"), ("bytes", "size")],
    )
    show.write_out(
        f"{out['files']} files ({show.human_bytes(out['bytes'])}) in {out['folder']}: "
        f"{out['downloaded_files']} downloaded, {out['kept_files']} already there, {out['seconds']} s\n"
    )
    return exits.OK
