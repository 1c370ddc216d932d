"""Tests that drop to uid 65534 ("nobody", via setpriv: root reads every file, so an unreadable-file
test run as root proves nothing) run ckptd from this checkout, so nobody must be able to reach it.
A clone under `mktemp -d` sits in a 0700 folder: every folder above the checkout that does not
let others through is granted search permission (traverse only: nothing becomes listable or
readable) for the run, and given back its mode afterwards. The same goes for the folders above the
interpreter the venv links to."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _folders_to_reach() -> list[Path]:
    """The checkout, and the interpreter the venv links to (a pyenv Python lies under /root, which
    is 0700: a script's `#!.venv/bin/python` then fails for any other user with EACCES)."""
    interpreter = Path(os.path.realpath(sys.executable)).parent
    prefix = Path(os.path.realpath(sys.base_prefix))
    folders = [REPO, *REPO.parents, interpreter, *interpreter.parents, prefix, *prefix.parents]
    return list(dict.fromkeys(folders))


@contextlib.contextmanager
def checkout_reachable() -> Iterator[None]:
    changed: list[tuple[Path, int]] = []
    if os.geteuid() == 0:
        for folder in _folders_to_reach():
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH:
                folder.chmod(mode | stat.S_IXOTH)
                changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode)
