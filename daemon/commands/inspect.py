"""`ckptd inspect [--job J] PATH`: the tensors of stored `.safetensors` files, from their headers only.

    rank-0/checkpoint-10/model.safetensors     one file of one rank
    rank-0/checkpoint-10/                      every .safetensors file of that checkpoint on rank 0
    checkpoint-10  (or checkpoint-10/)         ... on every rank
    rank-0/latest/model.safetensors            `latest` names the job's latest committed checkpoint

--job omitted: the most recent job of the project (named on stderr). Each file costs a HEAD and
one ranged GET of its first 64 KiB; a second ranged GET fetches the rest of a longer header. The
tensor data is never read. A committed checkpoint's files come from its manifests; an uncommitted
one's from listing it (said on stderr).

`--json` prints {"project", "job_id", "checkpoint", "files": [{"rank", "path", "size",
"header_bytes", "metadata", "tensors": [{"name", "dtype", "shape", "parameters", "bytes"}],
"totals"}], "totals"}, where totals are {"tensors", "parameters", "bytes", "by_dtype": {dtype:
{"tensors", "parameters", "bytes"}}} of the file, or of all files (every rank's shards summed).

Exit codes: 0 shown; 1 unknown job, checkpoint or file, no .safetensors file in the checkpoint, a
malformed or absurd header (the error names the file and the key), a store error; 2 a PATH that
is not one of the forms above, or a job found in several projects.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass
from typing import Any

from daemon import exits
from daemon.catalog import browse, jobview, layout
from daemon.catalog import safetensors as st
from daemon.commands import show
from daemon.config import Config
from daemon.storage import Storage, StorageError

FIRST_READ = 64 << 10  # holds the whole header of most files: one GET
CONCURRENCY = 16
SUFFIX = ".safetensors"
_RANK = re.compile(r"rank-(0|[1-9][0-9]*)")


class BadPath(ValueError):
    """A PATH argument that is none of the accepted forms (exit 2)."""


@dataclass(frozen=True)
class Target:
    rank: int | None  # None: every rank
    checkpoint: str  # a folder name, "latest", or "." for files at the top of the rank
    file: str | None  # path inside the checkpoint; None: every .safetensors file of it


def parse_target(path: str) -> Target:
    """What PATH names; BadPath when it is none of the accepted forms.

    | PATH                                      | rank | checkpoint    | file                     |
    |-------------------------------------------|------|---------------|--------------------------|
    | rank-0/checkpoint-10/model.safetensors    | 0    | checkpoint-10 | model.safetensors        |
    | rank-1/checkpoint-10/sub/a.safetensors    | 1    | checkpoint-10 | sub/a.safetensors        |
    | rank-0/checkpoint-10/ or rank-0/checkpoint-10 | 0 | checkpoint-10 | None (all its files)   |
    | checkpoint-10 or checkpoint-10/           | None | checkpoint-10 | None                     |
    | checkpoint-10/model.safetensors           | None | checkpoint-10 | model.safetensors        |
    | rank-0/model.safetensors                  | 0    | .             | model.safetensors        |
    | rank-0, rank-0/, '', /abs, a/../b, a//b   | BadPath                                    |
    | rank-0/checkpoint-10/sub/                 | BadPath (a folder inside a checkpoint)     |
    """
    folder = path.endswith("/")
    try:
        parts = layout.check_relpath(path[:-1] if folder else path).split("/")
    except layout.UnsafePath as e:
        raise BadPath(f"PATH {path!r}: {e}") from None
    rank = None
    if _RANK.fullmatch(parts[0]):
        rank, parts = int(parts[0][5:]), parts[1:]
    if not parts:
        raise BadPath(f"PATH {path!r} names a rank but no checkpoint: e.g. {path.rstrip('/')}/checkpoint-10/")
    if len(parts) == 1 and not folder and parts[0].endswith(SUFFIX) and rank is not None:
        return Target(rank, layout.ROOT_CHECKPOINT, parts[0])
    if len(parts) == 1:
        return Target(rank, parts[0], None)
    if folder:
        raise BadPath(f"PATH {path!r} is a folder inside a checkpoint: name a file, or the checkpoint itself")
    return Target(rank, parts[0], "/".join(parts[1:]))


@dataclass(frozen=True)
class Found:
    rank: int
    relpath: str
    key: str


async def read_header(storage: Storage, key: str, size: int) -> st.Header:
    """The header of the object at `key` (`size` bytes): one ranged GET, two for a long header."""
    if size < st.LENGTH_BYTES:
        st.header_length(b"", size)  # raises: too small
    first = await storage.get(key, 0, min(FIRST_READ, size))
    n = st.header_length(first, size)
    end = st.LENGTH_BYTES + n
    raw = first[st.LENGTH_BYTES : end]
    if end > len(first):
        raw += await storage.get(key, len(first), end)
    if len(raw) != n:
        raise st.HeaderError(f"read {len(raw)} of the header's {n} bytes: the object changed while it was read")
    return st.parse_header(raw, size)


async def resolve(storage: Storage, project: str, job_id: str, target: Target) -> tuple[str, list[Found]]:
    """The checkpoint's name and the files PATH names; NotFound when there are none."""
    # `latest` as restore means it: of a multi-node job, its latest global commit.
    name, chosen = (await jobview.view(storage, project, job_id)).pick(target.checkpoint, project, job_id)
    stored = await browse.stored_folders(storage, project, job_id)
    ranks = browse.ranks_holding(stored, name, chosen)
    if name == layout.ROOT_CHECKPOINT:
        ranks = sorted(stored)  # files at the top of a rank: any rank may have them
    if target.rank is not None:
        ranks = [r for r in ranks if r == target.rank]
    if not ranks:
        where = "" if target.rank is None else f" on rank {target.rank}"
        raise browse.NotFound(f"no checkpoint {target.checkpoint!r}{where} in job {job_id!r} of project {project!r}")
    files: list[Found] = []
    for rank in ranks:
        manifest = chosen.manifests.get(rank) if chosen else None
        if target.file is not None:
            relpath = target.file if name == layout.ROOT_CHECKPOINT else f"{name}/{target.file}"
            files.append(Found(rank, relpath, layout.file_key(project, job_id, rank, relpath)))
        elif manifest is not None:
            files += [Found(rank, f["path"], f["key"]) for f in manifest["files"] if f["path"].endswith(SUFFIX)]
        else:
            show.note(f"checkpoint {name} is not committed on rank {rank}: inspecting the files stored so far")
            prefix = f"{layout.rank_prefix(project, job_id, rank)}{name}/"
            async for info in storage.list(prefix):
                if info.key.endswith(SUFFIX) and (p := layout.parse_file_key(info.key)):
                    files.append(Found(rank, p.relpath, info.key))
    if not files:
        raise browse.NotFound(f"checkpoint {name!r} of job {job_id!r} holds no {SUFFIX} file")
    return name, files


async def summarize(storage: Storage, files: list[Found]) -> tuple[list[dict[str, Any]], list[str]]:
    """One summary per file, and one error line per file that could not be read."""
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(f: Found) -> dict[str, Any] | str:
        where = f"rank-{f.rank}/{f.relpath}"
        async with limit:
            info = await storage.head(f.key)
            if info is None:
                return f"{where}: no such file in the store"
            try:
                header = await read_header(storage, f.key, info.size)
            except st.HeaderError as e:
                return f"{where}: not a valid safetensors file: {e}"
        tensors = [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "parameters": t.parameters, "bytes": t.nbytes}
            for t in header.tensors
        ]
        return {
            "rank": f.rank,
            "path": f.relpath,
            "size": info.size,
            "header_bytes": header.length,
            "metadata": header.metadata,
            "tensors": tensors,
            "totals": st.totals(header.tensors),
        }

    results = await asyncio.gather(*(one(f) for f in files))
    return [r for r in results if isinstance(r, dict)], [r for r in results if isinstance(r, str)]


def print_tables(doc: dict[str, Any]) -> None:
    files = doc["files"]
    if len(files) == 1:
        rows = [{**t, "shape": "x".join(map(str, t["shape"])) or "scalar"} for t in files[0]["tensors"]]
        cols = [("name", "tensor"), ("dtype", "dtype"), ("shape", "shape"), ("parameters", "parameters")]
        show.print_table(
            _readable(rows), [*cols, ("bytes", "bytes")], title=f"rank-{files[0]['rank']}/{files[0]['path']}"
        )
    else:
        rows = [{**f, **{k: f["totals"][k] for k in ("tensors", "parameters")}} for f in files]
        cols = [("rank", "rank"), ("path", "file"), ("tensors", "tensors"), ("parameters", "parameters")]
        show.print_table(_readable(rows), [*cols, ("size", "size")], title=f"{doc['job_id']} {doc['checkpoint']}")
    show.write_out("\n")
    totals = doc["totals"]
    rows = [{"dtype": d, **row} for d, row in totals["by_dtype"].items()]
    rows.append({"dtype": "total", **{k: totals[k] for k in ("tensors", "parameters", "bytes")}})
    show.print_table(
        _readable(rows), [("dtype", "dtype"), ("tensors", "tensors"), ("parameters", "parameters"), ("bytes", "bytes")]
    )


def _readable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        row = dict(row)
        if "parameters" in row:
            row["parameters"] = f"{row['parameters']:,}"
        for k in ("bytes", "size"):
            if k in row:
                row[k] = show.human_bytes(row[k])
        out.append(row)
    return out


def main(c: Config, args: argparse.Namespace) -> int:
    import uvloop

    from daemon.commands.common import storage_for
    from daemon.commands.ls import find_job

    try:
        target = parse_target(args.path)
    except BadPath as e:
        return show.fail(str(e), exits.CONFIG)

    async def go() -> tuple[dict[str, Any], list[str]]:
        async with storage_for(c) as storage:
            project, job_id = await find_job(storage, c)
            name, files = await resolve(storage, project, job_id, target)
            summaries, errors = await summarize(storage, files)
        doc = {"project": project, "job_id": job_id, "checkpoint": name, "files": summaries}
        return doc | {"totals": st.add_totals(s["totals"] for s in summaries)}, errors

    try:
        doc, errors = uvloop.run(go())
    except browse.AmbiguousJob as e:
        return show.fail(str(e), exits.CONFIG)
    except browse.NotFound as e:
        return show.fail(str(e))
    except StorageError as e:
        return show.fail(f"inspecting {args.path} in {c.storage} failed: {e}")
    if errors:
        for line in errors[:-1]:
            show.note(line)
        return show.fail(errors[-1])
    if args.json:
        show.print_json(doc)
    else:
        print_tables(doc)
    return exits.OK
