"""What must hold in a restore folder at every moment, whatever failed or was killed (issue 10)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from daemon.config.schema import DEFAULT_MARKERS


def _files_below(folder: str) -> set[str]:
    found = set()
    for dirpath, _, filenames in os.walk(folder):  # links are not followed
        for name in filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return found


def marked_but_incomplete(root: Path, expected: set[str], markers=DEFAULT_MARKERS) -> list[str]:
    """Folders below `root` (staging folders included) that hold a completion marker of the
    checkpoint whose files are `expected` (relative paths) but miss one of them."""
    bad = []
    names = {p.rsplit("/", 1)[-1] for p in expected}
    marker_names = {n for n in names if any(fnmatch.fnmatchcase(n, m) for m in markers)}
    for dirpath, _, filenames in os.walk(root):
        if marker_names & set(filenames) and not expected <= _files_below(dirpath):
            bad.append(os.path.relpath(dirpath, root))
    return sorted(bad)
