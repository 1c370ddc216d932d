"""Invariant 5: restore never hands the trainer a wrong file.

`ckptd restore` (through the trial's proxy and its faults, for S3 stores) restores "latest" and a
sample of other committed checkpoints by name into a fresh folder. Every restored file must match
its manifest entry and be a version the writer completed; every manifest file must be there; and
"latest" must be the committed checkpoint with the highest step (then the latest commit).
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path

from reliability.checks import Counts
from reliability.harness import JOB, PROJECT, Trial
from reliability.record import History

SAMPLE = 4  # named checkpoints restored besides latest


def latest_of(committed: dict[str, dict]) -> str | None:
    def key(name: str) -> tuple:
        m = committed[name]
        return m["step"] is not None, m["step"] or -1, datetime.fromisoformat(m["committed_at"])

    return max(committed, key=key, default=None)


def restored_files(folder: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, size) of every regular file under `folder`, links not followed."""
    found = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath, name)
            if path.is_symlink() or not path.is_file():
                continue
            sha, size = hashlib.sha256(), 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
                    size += len(chunk)
            found[path.relative_to(folder).as_posix()] = (sha.hexdigest(), size)
    return found


def check_restore(trial: Trial, h: History, committed: dict[str, dict], counts: Counts, *extra: str) -> None:
    latest = latest_of(committed)
    if latest is None or latest == ".":
        return
    others = sorted(c for c in committed if c not in (latest, "."))
    named = trial.rng.sample(others, min(SAMPLE, len(others)))
    refs = [{"typ": "baseten_latest_checkpoint", "project_name": PROJECT, "job_id": JOB, "required": True}]
    refs += [{"typ": "baseten_named_checkpoint", "checkpoint_name": c, "job_id": JOB} for c in named]
    folder = trial.dir / f"restored-{trial.rng.randrange(1 << 20)}"
    rc, proc = trial.restore(refs, folder, *extra)
    counts["restores"] += 1
    v = trial.violations
    if rc != 0:
        counts["restore_failures"] += 1
        v.append(f"restore: ckptd restore exited {rc}:\n{proc.tail(6)}")
    got = restored_files(folder / "rank-0")
    expected = {f["path"]: f for c in [latest, *named] for f in committed[c]["files"]}
    for path, (sha, size) in sorted(got.items()):
        f = expected.get(path)
        if f is None:
            counts["wrong_restores"] += 1
            v.append(f"restore: {path!r} was restored but no restored manifest names it (latest is {latest!r})")
        elif (sha, size) != (f["sha256"], f["size"]) or sha not in h.versions.get(path, ()):
            counts["wrong_restores"] += 1
            v.append(f"restore: {path!r} handed to the trainer does not match its manifest or any written version")
        else:
            counts["bytes_restored"] += size
            counts["files_restored"] += 1
    if rc == 0:
        for path in sorted(set(expected) - set(got)):
            counts["wrong_restores"] += 1
            v.append(f"restore: {path!r} is in a restored manifest but missing after a successful restore")
