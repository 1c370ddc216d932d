"""Running part of a test as an unprivileged user: root reads every file (FIELD-NOTES §7), so an
"unreadable file" test run as root proves nothing. The tests themselves run as root."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]


def as_nobody(command: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]


@contextlib.contextmanager
def open_folder(prefix: str) -> Iterator[Path]:
    """A fresh folder that nobody can reach (pytest's tmp_path lies under a root-only folder);
    removed afterwards, whatever modes the test left inside."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def give(*paths: Path) -> None:
    """Make paths nobody's (the folder itself, not what it holds)."""
    for path in paths:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
