"""`ckptd urls`: download URLs of every stored file of a job, all ranks, as the reference's JSON (SPEC §7).

    ckptd urls [--job J] [--expires 7d] [--output FILE] [--json]

Without --job: the most recently created job of the project. The JSON is written atomically to
--output (default `ckptd-urls-{job_id}.json` in the current folder), then printed; --json prints
it as the only output on stdout, without it a one-line summary follows on stderr.

    {"timestamp": ISO time of generation,
     "job": {"id", "created_at", "current_status": TRAINING_JOB_RUNNING|COMPLETED|FAILED|STOPPED,
             "error_message", "instance_type": null, "updated_at", "training_project_id",
             "training_project": {"id", "name"}},
     "checkpoint_artifacts": [{"url", "relative_file_name" (inside the rank folder, e.g.
             checkpoint-24/tokenizer_config.json), "node_rank", "size_bytes", "last_modified"}],
     "presigned": true on S3 (presigned GETs), false on the local backend,
     "expires_at": when the URLs expire (null on the local backend)}

The local (file://) backend has no server to sign for: `url` is the stored file's file:// URL, each
artifact gets `path` (the file's absolute path) too, and stderr says so. Those work only where the
store's folder is mounted, and never expire.

Exit codes: 0 written; 1 unknown job or project, store failure, output not writable; 2 a bad or
too long --expires (presigned URLs live at most 7 days), and nothing is written.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

from daemon import exits
from daemon.catalog import browse, jobmeta
from daemon.commands import show
from daemon.commands.download import stored_files
from daemon.config import Config
from daemon.config.quantities import duration
from daemon.files import write_atomic
from daemon.storage import Storage, StorageError, StorageURL

MAX_EXPIRY = 7 * 86400  # S3's limit for a presigned URL (SigV4)
PRESIGN_CONCURRENCY = 64
REFERENCE_STATUS = {s: f"TRAINING_JOB_{s}" for s in jobmeta.STATUSES}


def parse_expiry(text: str) -> int:
    """Whole seconds from 1s to 7d; ValueError saying what is accepted."""
    try:
        return math.ceil(duration(1, MAX_EXPIRY)(text))
    except ValueError as exc:
        raise ValueError(f"--expires: {exc} (presigned URLs live at most 7 days)") from None


def job_object(project: str, job_id: str, meta: dict[str, Any] | None) -> dict[str, Any]:
    """The reference's `job` object from jobmeta.read_job (None: the job has files but no metadata)."""
    meta = meta or {}
    status = meta.get("current_status")
    failed = [r for r in meta.get("ranks", []) if r.get("status") == jobmeta.FAILED]
    error = "; ".join(f"rank {r['rank']} failed (exit code {r.get('exit_code')})" for r in failed) or None
    return {
        "id": job_id,
        "created_at": meta.get("created_at"),
        "current_status": REFERENCE_STATUS.get(status) if isinstance(status, str) else None,
        "error_message": error,
        "instance_type": None,  # no instance catalogue here
        "updated_at": meta.get("updated_at") or meta.get("created_at"),
        "training_project_id": project,  # projects are named, not numbered: the name is the id
        "training_project": {"id": project, "name": project},
    }


async def build(storage: Storage, c: Config, expires: int, local: bool) -> dict[str, Any]:
    from daemon.commands.ls import find_job

    project, job_id = await find_job(storage, c, say_latest=False)  # as ls and inspect find it
    try:
        meta = await jobmeta.read_job(storage, project, job_id)
    except jobmeta.JobNotFound:
        meta = None
    files = await stored_files(storage, project, job_id)
    limit = asyncio.Semaphore(PRESIGN_CONCURRENCY)

    async def artifact(f: Any) -> dict[str, Any]:
        async with limit:
            url = await storage.presign_get(f.key, expires)
        out = {
            "url": url,
            "relative_file_name": f.relpath,
            "node_rank": f.rank,
            "size_bytes": f.size,
            "last_modified": f.last_modified.astimezone(UTC).isoformat(),
        }
        return {**out, "path": storage_path(url)} if local else out

    now = datetime.now(UTC)
    return {
        "timestamp": now.isoformat(),
        "job": job_object(project, job_id, meta),
        "checkpoint_artifacts": list(await asyncio.gather(*(artifact(f) for f in files))),
        "presigned": not local,
        "expires_at": None if local else (now + timedelta(seconds=expires)).isoformat(),
    }


def storage_path(url: str) -> str:
    return unquote(url.removeprefix("file://"))


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.commands.common import storage_for

    try:
        expires = parse_expiry(args.expires)
    except ValueError as exc:
        return show.fail(str(exc), exits.CONFIG)
    local = StorageURL.parse(c.storage).scheme == "file"

    async def go() -> dict[str, Any]:
        async with storage_for(c) as storage:
            return await build(storage, c, expires, local)

    try:
        out = uvloop.run(go())
    except browse.AmbiguousJob as exc:
        return show.fail(str(exc), exits.CONFIG)
    except browse.NotFound as exc:
        return show.fail(str(exc))
    except StorageError as exc:
        return show.fail(f"cannot list the job's files: {exc}")
    target = args.output or f"ckptd-urls-{out['job']['id']}.json"
    text = show.json_text(out, "utf-8")
    try:
        write_atomic(os.path.abspath(target), (text + "\n").encode("utf-8", "backslashreplace"))
    except OSError as exc:
        return show.fail(f"cannot write {target}: {exc}")
    if local:
        show.fail(
            f"the local store {c.storage} has no presigned URLs: the JSON lists file:// URLs and paths, "
            "which work only where that folder is mounted and never expire",
            exits.OK,
        )
    show.print_json(out)
    if not args.json:
        n = len(out["checkpoint_artifacts"])
        print(f"ckptd: {n} URLs of job {out['job']['id']} written to {target}", file=sys.stderr)
    return exits.OK
