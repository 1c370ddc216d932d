"""The invariants every trial ends with, checked by downloading and hashing every stored byte.

1. stored: every file the writer completed is stored byte-identical, its last version (files
   rotated away count too; only a file completed and deleted while no daemon could pin it is
   excused, see harness.PIN_MARGIN);
2. manifests: every committed manifest matches its objects (size and SHA-256), names only versions
   the writer completed, lists every file of its checkpoint, and only complete checkpoints commit;
3. nothing extra: nothing incomplete, ignored, planted (FIFO, link, outside file) or unstorable is
   stored, and no object anywhere holds the secret planted outside the folder (a write cut short by
   a kill or ENOSPC leaves a closed file no uploader can tell from a finished one: it may be stored,
   but never committed);
4. no incomplete multipart upload is left after a clean drain (exit 0);
5. restore (see restorecheck.py) hands the trainer exactly the manifest's bytes.
"""

from __future__ import annotations

import collections
import fnmatch
import json
from datetime import datetime

from daemon.config.schema import DEFAULT_IGNORE
from reliability.harness import JOB, PROJECT, Trial
from reliability.record import History
from reliability.stores import Blob

RANK = f"training_projects/{PROJECT}/jobs/{JOB}/rank-0/"
MANIFESTS = f"training_projects/{PROJECT}/jobs/{JOB}/manifests/rank-0/"
Counts = collections.Counter


def checkpoint_of(path: str) -> str:
    head, sep, _ = path.partition("/")
    return head if sep else "."


def ignored(path: str) -> bool:
    return any(fnmatch.fnmatchcase(part, pattern) for part in path.split("/") for pattern in DEFAULT_IGNORE)


def excused(trial: Trial, done_at: float, deleted_at: float | None) -> bool:
    """A completed version deleted before any daemon could pin it: inside one blind window."""
    return deleted_at is not None and any(b0 <= done_at and deleted_at <= b1 for b0, b1 in trial.blind)


def manifests(trial: Trial) -> dict[str, dict]:
    found = {}
    for name in trial.store.scan(MANIFESTS):
        data = trial.store.read(MANIFESTS + name)
        if data is not None:  # else withdrawn since it was listed
            m = json.loads(data)
            found[m["checkpoint"]] = m
    return found


def drain_began(trial: Trial) -> float:
    """When the last daemon began its drain (its final scan): files completed later cannot be
    expected in the store. Without a trustworthy log clock (libfaketime), never."""
    events = trial.daemons[-1].events("draining") if trial.daemons and not trial.fake_clock else []
    if not events:
        return float("inf")
    return datetime.fromisoformat(events[-1]["timestamp"]).timestamp()


def verify(trial: Trial, counts: Counts) -> tuple[History, dict[str, dict]]:
    """Check invariants 1-4; violations go to `trial.violations`, figures to `counts`."""
    h = History.read(trial.record)
    objects = trial.store.scan(RANK, trial.secret)
    counts["bytes_stored"] += sum(blob.size for blob in objects.values())
    committed = manifests(trial)
    v = trial.violations
    _stored(trial, h, objects, counts, v)
    _manifests(trial, h, objects, committed, counts, v)
    _extra(trial, h, objects, committed, counts, v)
    if trial.exit_codes and trial.exit_codes[-1] == 0:
        orphans = trial.store.incomplete_uploads()
        counts["orphaned_uploads"] += len(orphans)
        if orphans:
            v.append(f"orphaned: {len(orphans)} incomplete multipart upload(s) after a clean drain: {orphans[:3]}")
    counts["committed_checkpoints"] += len(committed)
    return h, committed


def _stored(trial: Trial, h: History, objects: dict[str, Blob], counts: Counts, v: list[str]) -> None:
    late = drain_began(trial)
    for path, (sha, size, done_at) in sorted(h.last_done.items()):
        if path in h.unstorable or path in h.begun:
            continue  # never storable, or its last write never completed
        if done_at > late:
            counts["completed_after_drain"] += 1
            continue
        if excused(trial, done_at, h.deleted_after_done(path)):
            counts["excused_files"] += 1
            continue
        counts["files_checked"] += 1
        blob = objects.get(path)
        if blob is None:
            counts["files_lost"] += 1
            v.append(f"lost: {path!r} ({size} bytes) was completed but is not stored")
        elif blob.sha256 != sha:
            older = blob.sha256 in h.versions[path][:-1]
            counts["files_lost" if older else "files_corrupt"] += 1
            what = "an older version" if older else "bytes the writer never completed"
            v.append(f"{'lost' if older else 'corrupt'}: {path!r} is stored as {what}")
        else:
            counts["bytes_verified"] += size


def _manifests(
    trial: Trial, h: History, objects: dict[str, Blob], committed: dict[str, dict], counts: Counts, v: list[str]
) -> None:
    for name, m in sorted(committed.items()):
        listed = {f["path"]: f for f in m["files"]}
        if name not in h.complete:
            v.append(f"corrupt: checkpoint {name!r} committed ({m.get('reason')}) but the writer never completed it")
            counts["torn_commits"] += 1
        for path, f in listed.items():
            blob = objects.get(path)
            if blob is None or (blob.size, blob.sha256) != (f["size"], f["sha256"]):
                counts["manifest_mismatches"] += 1
                v.append(f"corrupt: manifest of {name!r} names {path!r} {f['size']}B, stored {blob}")
            elif f["sha256"] not in h.versions.get(path, ()):
                counts["manifest_mismatches"] += 1
                v.append(f"corrupt: manifest of {name!r} lists a version of {path!r} the writer never completed")
        for path, (sha, _size, _t) in h.last_done.items():
            if checkpoint_of(path) != name or path in h.unstorable:
                continue
            if path not in listed:
                counts["torn_commits"] += 1
                v.append(f"corrupt: committed {name!r} lacks {path!r}, which the writer completed")
            elif not h.deleted_after_done(path) and path not in h.begun and listed[path]["sha256"] != sha:
                counts["manifest_mismatches"] += 1
                v.append(f"corrupt: manifest of {name!r} lists an older version of {path!r} than the last completed")
        for path in h.unstorable:
            if checkpoint_of(path) == name:
                counts["torn_commits"] += 1
                v.append(f"corrupt: {name!r} committed without {path!r}, which cannot be stored")


def _extra(
    trial: Trial, h: History, objects: dict[str, Blob], committed: dict[str, dict], counts: Counts, v: list[str]
) -> None:
    listed = {f["path"]: f["sha256"] for m in committed.values() for f in m["files"]}
    for path, blob in sorted(objects.items()):
        why = None
        if ignored(path):
            why = "an ignored (temporary) name"
        elif path in h.planted or path in h.unstorable:
            why = f"planted or unstorable ({h.planted.get(path) or h.unstorable.get(path)})"
        elif blob.sha256 not in h.versions.get(path, ()):
            # A write cut short (writer killed, or ENOSPC) leaves a closed file the daemon cannot tell
            # from a finished one: it may be stored, but no committed manifest may name it.
            cut = (trial.torn_ok and path in h.begun) or path in h.failed
            torn = cut and listed.get(path) != blob.sha256
            if not torn:
                why = "never completed by the writer" if path not in h.versions else "a torn mix of versions"
        if why:
            counts["files_leaked"] += 1
            v.append(f"leaked: {path!r} is stored: {why}")
    if trial.secret:
        for key, blob in trial.store.scan("", trial.secret).items():
            if blob.has_secret:
                counts["files_leaked"] += 1
                v.append(f"leaked: object {key!r} holds the secret planted outside the checkpoint folder")
