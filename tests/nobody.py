"""Tests that drop to uid 65534 ("nobody", via setpriv: root reads every file, so an unreadable-file
test run as root proves nothing) run ckptd from this checkout, so nobody must be able to reach it.
A clone under `mktemp -d` sits in a 0700 folder: every folder above the checkout that does not
let others through is granted search permission (traverse only: nothing becomes listable or
readable) for the run, and given back its mode afterwards."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout_reachable() -> Iterator[None]:
    changed: list[tuple[Path, int]] = []
    if os.geteuid() == 0:
        for folder in [REPO, *REPO.parents]:
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
                changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)
