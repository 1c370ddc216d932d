"""Commit manifests: one JSON object per committed checkpoint (SPEC §4), and finding the latest.

A manifest lists every file of the checkpoint with size, full-file SHA-256, key and etag, the
commit time, the step and the evaluation metrics. Restore verifies downloads against it and only
ever restores a checkpoint that has one.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from daemon import logs
from daemon.catalog import layout
from daemon.catalog.jsonio import json_bytes
from daemon.storage import Storage, StorageError

FORMAT = 1
TRAINER_STATE = "trainer_state.json"  # Hugging Face's; the manifest's metrics come from it
_READ_CONCURRENCY = 16
MAX_MANIFEST_BYTES = 64 << 20  # ~250k files; read no more of an object claiming to be a manifest
MAX_FILE_SIZE = 1 << 50  # 1 PiB: more than any object store holds in one object

# Step from checkpoint names, first pattern that matches wins. `step` may appear anywhere as a
# token (Lightning's `epoch=2-step=300`, DeepSpeed's `global_step100`); the others name the folder.
_STEP_PATTERNS = [  # (pattern, whole name only)
    (re.compile(r"(?:^|[^a-z])(?:global_)?step[-_=]?(\d+)", re.IGNORECASE), False),
    (re.compile(r"(?:checkpoint|ckpt)[-_]?(\d+)", re.IGNORECASE), True),
    (re.compile(r"iter_(\d+)"), True),  # Megatron-LM
]
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_FIELDS = {"path": str, "size": int, "sha256": str, "key": str, "etag": str}
_FIELDS = {
    "project": str,
    "job_id": str,
    "rank": int,
    "checkpoint": str,
    "committed_at": str,
    "reason": str,
    "total_bytes": int,
    "file_count": int,
    "files": list,
    "metrics": dict,
}


@dataclass(frozen=True)
class StoredFile:
    """One file durably stored, as its manifest entry will list it."""

    relpath: str
    size: int
    sha256: str
    key: str
    etag: str

    @property
    def checkpoint(self) -> str:
        return layout.checkpoint_of(self.relpath)


def parse_step(checkpoint: str) -> int | None:
    """The training step in a checkpoint's name, or None (see the table-driven test)."""
    for pattern, full in _STEP_PATTERNS:
        match = pattern.fullmatch(checkpoint) if full else pattern.search(checkpoint)
        if match:
            return int(match.group(1))
    return None


def _scalar(value: Any) -> Any:
    """A JSON-safe number or string, else None: NaN/inf become None, lists and objects are dropped."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, int | float | str) else None


def is_trainer_state(relpath: str) -> bool:
    return relpath.rsplit("/", 1)[-1] == TRAINER_STATE


def metrics_from_trainer_state(data: bytes) -> dict[str, Any]:
    """Metrics from a Hugging Face `trainer_state.json`; {} for anything unreadable, never raises.

    The summary fields when present, plus the latest `loss` and `eval_*` values of `log_history`.
    """
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(state, dict):
        return {}
    metrics = {
        k: _scalar(state[k]) for k in ("global_step", "epoch", "best_metric", "best_model_checkpoint") if k in state
    }
    history = state.get("log_history")
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict):
            metrics.update(
                {
                    k: _scalar(v)
                    for k, v in entry.items()
                    if isinstance(k, str) and (k == "loss" or k.startswith("eval_"))
                }
            )
    return metrics


def build_manifest(
    project: str,
    job_id: str,
    rank: int,
    checkpoint: str,
    files: list[StoredFile],
    reason: str,
    metrics: dict[str, Any],
    *,
    committed_at: datetime | None = None,
) -> dict[str, Any]:
    """The manifest of one committed checkpoint. Files must all belong to it, each path once."""
    entries = sorted(files, key=lambda f: f.relpath)
    for f in entries:
        if f.checkpoint != checkpoint:
            raise ValueError(f"{f.relpath!r} is not in checkpoint {checkpoint!r}")
    if len({f.relpath for f in entries}) != len(entries):
        raise ValueError(f"checkpoint {checkpoint!r}: a file is listed twice")
    step = parse_step(checkpoint)
    if step is None and _is(metrics.get("global_step"), int):
        step = metrics["global_step"]  # e.g. a `best/` folder: the trainer's state says which step
    return {
        "format": FORMAT,
        "project": project,
        "job_id": job_id,
        "rank": rank,
        "checkpoint": checkpoint,
        "step": step,
        "committed_at": (committed_at or datetime.now(UTC)).astimezone(UTC).isoformat(),
        "reason": reason,
        "total_bytes": sum(f.size for f in entries),
        "file_count": len(entries),
        "files": [
            {"path": f.relpath, "size": f.size, "sha256": f.sha256, "key": f.key, "etag": f.etag} for f in entries
        ],
        "metrics": {str(k): _scalar(v) for k, v in metrics.items()},
    }


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"bad manifest: {what}")


def _is(value: Any, typ: type) -> bool:
    return isinstance(value, typ) and not (typ is int and isinstance(value, bool))


def _check_file(i: int, entry: Any, manifest: dict[str, Any]) -> None:
    _check(isinstance(entry, dict), f"files[{i}] is not an object")
    for name, typ in _FILE_FIELDS.items():
        _check(_is(entry.get(name), typ), f"files[{i}].{name} missing or not {typ.__name__}")
    _check(entry["size"] >= 0, f"files[{i}].size is negative")
    # No store holds an object this big: a lie that must not become a huge download or allocation.
    _check(entry["size"] <= MAX_FILE_SIZE, f"files[{i}].size {entry['size']} is larger than any object")
    _check(bool(_SHA256.fullmatch(entry["sha256"])), f"files[{i}].sha256 is not 64 lowercase hex digits")
    path = layout.check_relpath(entry["path"])  # UnsafePath is a ValueError: restore must never escape
    checkpoint = manifest["checkpoint"]
    _check(layout.checkpoint_of(path) == checkpoint, f"files[{i}].path is outside {checkpoint!r}")
    # ckptd stores a file at exactly this key; any other key (another job's, '..') is not ours to read.
    expected = layout.file_key(manifest["project"], manifest["job_id"], manifest["rank"], path)
    _check(entry["key"] == expected, f"files[{i}].key {entry['key']!r} is not the key of {path!r} ({expected!r})")


def parse_manifest(data: bytes) -> dict[str, Any]:
    """Parse and validate a stored manifest; ValueError saying what is wrong with a bad one."""
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"bad manifest: not JSON ({exc})") from None
    return check_manifest(manifest)


def check_manifest(manifest: Any) -> dict[str, Any]:
    """`manifest` (parsed JSON) if it is a valid manifest; ValueError saying what is wrong."""
    _check(isinstance(manifest, dict), "not a JSON object")
    _check(manifest.get("format") == FORMAT, f"unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    for name, typ in _FIELDS.items():
        _check(_is(manifest.get(name), typ), f"{name} missing or not {typ.__name__}")
    _check(manifest.get("step") is None or _is(manifest["step"], int), "step is not an integer or null")
    _check(manifest["rank"] >= 0, "rank is negative")
    for name in ("project", "job_id"):
        _check(layout.is_segment(manifest[name]), f"{name} {manifest[name]!r} is not a single folder name")
    checkpoint = manifest["checkpoint"]
    _check("/" not in checkpoint, f"checkpoint {checkpoint!r} is not a top-level folder name")
    _key_of(manifest)  # refuses '..' and the like (UnsafePath is a ValueError)
    try:
        stamp = datetime.fromisoformat(manifest["committed_at"])
    except ValueError:
        stamp = None
    _check(stamp is not None and stamp.tzinfo is not None, "committed_at is not an ISO 8601 time with zone")
    paths: set[str] = set()
    for i, entry in enumerate(manifest["files"]):
        _check_file(i, entry, manifest)
        _check(entry["path"] not in paths, f"files[{i}].path {entry['path']!r} is listed twice")
        paths.add(entry["path"])
    _check(manifest["file_count"] == len(manifest["files"]), "file_count does not match files")
    _check(manifest["total_bytes"] == sum(f["size"] for f in manifest["files"]), "total_bytes does not match files")
    return manifest


def _key_of(manifest: dict[str, Any]) -> str:
    return layout.manifest_key(manifest["project"], manifest["job_id"], manifest["rank"], manifest["checkpoint"])


async def write_manifest(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    """Store the manifest at its key; return the manifest the store now holds.

    An existing manifest listing the very same files is kept as it is (and returned): re-committing
    unchanged files (a daemon restart re-reporting them) must not move that checkpoint's commit
    time, which decides what "latest" is.
    """
    key = _key_of(manifest)
    try:
        old = parse_manifest(await storage.get(key))
    except ValueError:
        old = None  # a damaged manifest is simply replaced
    except StorageError as exc:
        if not exc.missing:
            raise
        old = None
    if old is not None and old["files"] == manifest["files"]:
        return old
    await storage.put(key, json_bytes(manifest))
    return manifest


async def read_manifest(storage: Storage, key: str) -> dict[str, Any]:
    """The manifest stored at `key`, validated, and refused unless it belongs at that key (a
    manifest of another job, rank or checkpoint copied there names nothing here).

    ValueError saying what is wrong with a bad one; StorageError when the store fails.
    """
    data = await get_bounded(storage, key)
    try:
        _check(len(data) <= MAX_MANIFEST_BYTES, f"larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = parse_manifest(data)
        _check(_key_of(manifest) == key, f"it describes {_key_of(manifest)!r}")
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    return manifest


async def get_bounded(storage: Storage, key: str) -> bytes:
    """At most MAX_MANIFEST_BYTES + 1 bytes of the object at `key` (one more tells "too large"):
    a huge object under a manifest prefix must not fill the memory. StorageError as `get`."""
    try:
        return await storage.get(key, 0, MAX_MANIFEST_BYTES + 1)
    except StorageError as exc:
        if exc.code != "InvalidRange":  # S3's answer to any range of an empty object
            raise
        return b""


async def read_or_skip(
    storage: Storage, key: str, limit: asyncio.Semaphore, reader: Callable[..., Awaitable[dict[str, Any]]] | None = None
) -> dict[str, Any] | None:
    """The manifest at `key` (read by `reader`, `read_manifest` by default), or None when it
    vanished or is unreadable (logged); a failing store raises."""
    log = logs.get(__name__, key=key)
    async with limit:
        try:
            return await (reader or read_manifest)(storage, key)
        except StorageError as exc:
            if not exc.missing:  # a transient failure must not silently make "latest" older
                raise
            log.info("manifest vanished while listing", error=str(exc))
        except ValueError as exc:
            log.warning("skipping unreadable manifest", error=str(exc))
    return None


async def read_manifests(storage: Storage, project: str, job_id: str, rank: int) -> list[dict[str, Any]]:
    """Every readable manifest of one rank of a job, in key order. Unreadable ones are logged and skipped."""
    prefix = layout.manifest_prefix(project, job_id, rank)
    keys = [info.key async for info in storage.list(prefix) if info.key.endswith(".json")]
    limit = asyncio.Semaphore(_READ_CONCURRENCY)
    found = await asyncio.gather(*(read_or_skip(storage, key, limit) for key in keys))
    return [m for m in found if m is not None]


def recency(manifest: dict[str, Any]) -> tuple[bool, int, datetime]:
    """Sort key for "latest": the highest step wins, then the later commit.

    | a                         | b                          | latest | why                              |
    |---------------------------|----------------------------|--------|----------------------------------|
    | checkpoint-3, at 10:00:01 | checkpoint-2, at 10:00:02  | a      | parallel uploads commit out of order |
    | step-30, at 10:00         | step-9, at 10:00           | a      | same time: higher step           |
    | checkpoint-1, at 09:00    | ".", at 10:00 (no step)    | a      | a named step beats a folder-less save |
    | final, at 10:00 (no step) | best, at 09:00 (no step)   | a      | no steps: the later commit       |

    SPEC §4 says "most recently committed"; taken literally, two checkpoints saved moments apart
    would make "latest" depend on which upload finished first.
    """
    step = manifest["step"]
    return step is not None, -1 if step is None else step, datetime.fromisoformat(manifest["committed_at"])


async def latest_manifest(storage: Storage, project: str, job_id: str, rank: int) -> dict[str, Any] | None:
    """The latest committed checkpoint of one rank (see `recency`), or None."""
    manifests = await read_manifests(storage, project, job_id, rank)
    return max(manifests, key=recency, default=None)
