"""Where the uploader keeps its own state: `.ckptd/` inside the checkpoint folder.

On the checkpoints' own file system, so staging can hard-link them; never scanned, never uploaded,
never removed to free space.
"""

from __future__ import annotations

import os

STATE_DIR = ".ckptd"


def is_state(relpath: str) -> bool:
    """Whether a path relative to the checkpoint folder is, or lies in, the state folder."""
    return relpath.split("/", 1)[0] == STATE_DIR


def staging_dir(root: str, rank: int) -> str:
    return os.path.join(root, STATE_DIR, f"staging-rank-{rank}")


def journal_path(root: str, rank: int) -> str:
    return os.path.join(root, STATE_DIR, f"journal-rank-{rank}.jsonl")
