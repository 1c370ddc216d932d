"""Is what an earlier run stored still in the store? Checked before a manifest lists it.

The journal says which files are stored; the store may have lost some since: `ckptd prune` (or
this daemon's retention, before a restart) deletes checkpoints, and a person may delete objects by
hand. A manifest listing a missing object is a torn commit (restore fails on it), so a checkpoint
this run did not see stored in full is checked first: every key HEADed (`absent`), and when some
are missing, the tombstone a finished prune leaves (daemon.catalog.prune) read for evidence that
these very files were pruned. `decide` says what follows.
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
from collections.abc import Callable, Iterable, Mapping

import structlog

from daemon.catalog import prune
from daemon.catalog.manifest import MAX_FILE_SIZE, MAX_MANIFEST_BYTES, StoredFile
from daemon.storage import Storage, StorageError
from daemon.storage.retry import Deadline, retrying

HEADS = 16  # HEAD requests in flight
_SHA256 = re.compile(r"[0-9a-f]{64}")
log = structlog.get_logger()

Tombstone = Mapping[str, tuple[int, str]]  # key -> (size, sha256) of what a prune deleted


class Outcome(enum.Enum):
    COMMIT = "commit"
    FORGET = "forget"
    REUPLOAD = "reupload"


def decide(*, all_present: bool, pruned: bool) -> Outcome:
    """What to do with a checkpoint whose stored files were checked against the store.

    | every key present | pruned (a tombstone lists these very files) | outcome  |
    |-------------------|---------------------------------------------|----------|
    | yes               | any                                         | COMMIT   |
    | no                | yes                                         | FORGET   |
    | no                | no                                          | REUPLOAD |

    COMMIT: the manifest may list them. FORGET: a prune deleted exactly these files: never
    committed, nor uploaded again while they are unchanged (that would undo the prune), and no
    failure either. REUPLOAD: lost, not pruned (or the files are other bytes now: new content):
    the missing files are uploaded again (they are still here), then it commits.
    """
    if all_present:
        return Outcome.COMMIT
    return Outcome.FORGET if pruned else Outcome.REUPLOAD


def same_files(tombstone: Tombstone | None, files: Iterable[StoredFile]) -> bool:
    """Whether the tombstone lists exactly these files (keys, sizes, contents): a file changed
    since, or one added, makes it another checkpoint than the one pruned."""
    return tombstone is not None and dict(tombstone) == {f.key: (f.size, f.sha256) for f in files}


async def absent(
    storage: Storage,
    files: Iterable[StoredFile],
    *,
    deadline: Deadline,
    observe: Callable[[StorageError | None], None] | None = None,
    concurrency: int = HEADS,
) -> list[StoredFile]:
    """The files the store does not hold as they were stored: no object at the key, or one of
    another size or etag. Each HEAD retried until `deadline`; StorageError (naming the key) when
    the store keeps failing; cancellation passes through."""
    limit = asyncio.Semaphore(concurrency)

    async def gone(f: StoredFile) -> bool:
        async with limit:
            info = await retrying(lambda: storage.head(f.key), deadline=deadline, observe=observe)
        return info is None or info.size != f.size or bool(f.etag and info.etag != f.etag)

    files = list(files)
    results = await asyncio.gather(*(gone(f) for f in files), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [f for f, missing in zip(files, results, strict=True) if missing]


async def check(
    storage: Storage,
    project: str,
    job_id: str,
    rank: int,
    checkpoint: str,
    files: list[StoredFile],
    *,
    deadline: Deadline,
    observe: Callable[[StorageError | None], None] | None = None,
) -> tuple[Outcome, list[StoredFile]]:
    """HEAD every file, read the tombstone if any is missing, `decide`; with the missing files."""
    missing = await absent(storage, files, deadline=deadline, observe=observe)
    pruned = False
    if missing:
        tombstone = await retrying(
            lambda: read_tombstone(storage, project, job_id, rank, checkpoint), deadline=deadline, observe=observe
        )
        pruned = same_files(tombstone, files)
    return decide(all_present=not missing, pruned=pruned), missing


async def read_tombstone(storage: Storage, project: str, job_id: str, rank: int, checkpoint: str) -> Tombstone | None:
    """What a finished prune deleted of the rank's `checkpoint`; None when no tombstone says so,
    or a damaged one (logged: it is no evidence). StorageError when the store fails: a failing
    store must not read as "never pruned"."""
    key = prune.tombstone_key(project, job_id, rank, checkpoint)
    try:  # bounded: a huge object there must not fill the memory
        data = await storage.get(key, 0, MAX_MANIFEST_BYTES + 1)
    except StorageError as e:
        if e.missing:
            return None
        if e.code != "InvalidRange":  # S3's answer to any range of an empty object
            raise
        data = b""
    try:
        return parse_tombstone(data, rank, checkpoint)
    except (ValueError, RecursionError) as e:
        log.warning("damaged tombstone: no evidence of a prune", key=key, error=str(e)[:200])
        return None


def parse_tombstone(data: bytes, rank: int, checkpoint: str) -> Tombstone:
    """key -> (size, sha256) of a tombstone's files; ValueError saying what is wrong with it."""

    def ensure(ok: bool, why: str) -> None:
        if not ok:
            raise ValueError(why)

    ensure(len(data) <= MAX_MANIFEST_BYTES, f"larger than {MAX_MANIFEST_BYTES} bytes")
    body = json.loads(data)  # ValueError (UnicodeDecodeError is one), RecursionError
    ensure(isinstance(body, dict) and isinstance(body.get("files"), list), "not an object with a files list")
    ensure((body.get("rank"), body.get("checkpoint")) == (rank, checkpoint), "of another rank or checkpoint")
    found: dict[str, tuple[int, str]] = {}
    for i, f in enumerate(body["files"]):
        ensure(isinstance(f, dict), f"files[{i}] is not an object")
        key, size, sha = f.get("key"), f.get("size"), f.get("sha256")
        ensure(isinstance(key, str) and key not in found, f"files[{i}].key missing, not a string or listed twice")
        ensure(type(size) is int and 0 <= size <= MAX_FILE_SIZE, f"files[{i}].size is not a plausible size")
        ensure(isinstance(sha, str) and bool(_SHA256.fullmatch(sha)), f"files[{i}].sha256 is not 64 hex digits")
        found[key] = (size, sha)
    return found
