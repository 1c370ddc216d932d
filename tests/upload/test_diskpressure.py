"""Disk pressure relief (SPEC §5, opt-in): which checkpoints go (the table), and removal on real folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.upload.diskpressure import LocalCheckpoint, local_checkpoints, relieve, victims

KIND = "unit"


def cp(name: str, step: int, committed: bool = True, size: int = 100) -> LocalCheckpoint:
    return LocalCheckpoint(name, committed, (step, 0.0), size)


@pytest.mark.parametrize(
    "checkpoints, free, min_free, removed",
    [
        # free < min_free: no -> nothing removed, whatever the checkpoints
        ([cp("c1", 1), cp("c2", 2), cp("c3", 3)], 500, 500, []),
        ([cp("c1", 1), cp("c2", 2), cp("c3", 3)], 900, 500, []),
        ([cp("c1", 1), cp("c2", 2)], 0, 0, []),  # a watermark of 0 is off
        # yes | newest: never, committed or not
        ([cp("c1", 1)], 0, 500, []),
        ([cp("c1", 1, committed=False), cp("c2", 2)], 0, 500, []),
        # yes | not newest | not committed: never
        ([cp("c1", 1, committed=False), cp("c2", 2, committed=False), cp("c3", 3)], 0, 500, []),
        # yes | not newest | committed: oldest first, until enough is free
        ([cp("c3", 3), cp("c1", 1), cp("c2", 2)], 0, 50, ["c1"]),
        ([cp("c3", 3), cp("c1", 1), cp("c2", 2)], 0, 150, ["c1", "c2"]),
        ([cp("c3", 3), cp("c1", 1), cp("c2", 2)], 0, 10_000, ["c1", "c2"]),  # all but the newest, if need be
        ([cp("c1", 1), cp("c2", 2, committed=False), cp("c3", 3), cp("c4", 4)], 0, 150, ["c1", "c3"]),
        ([cp("c1", 1, size=10), cp("c2", 2, size=10), cp("c9", 9)], 480, 500, ["c1", "c2"]),  # counts what is free
    ],
)
def test_victims_table(checkpoints: list[LocalCheckpoint], free: int, min_free: int, removed: list[str]):
    assert victims(checkpoints, free, min_free) == removed


def test_victims_orders_by_step_then_time():
    same_step = [LocalCheckpoint("later", True, (-1, 20.0), 10), LocalCheckpoint("earlier", True, (-1, 10.0), 10)]
    assert victims([*same_step, cp("step-1", 1)], 0, 15) == ["earlier", "later"]


def make_checkpoint(root: Path, name: str, mtime: float, size: int = 4096) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(os.urandom(size))
    os.utime(folder / "model.bin", (mtime, mtime))
    os.utime(folder, (mtime, mtime))
    return folder


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """checkpoint-1 (committed), checkpoint-2 (not committed), checkpoint-3 (newest, committed),
    the uploader's own `.ckptd/` state and a file at the top."""
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        make_checkpoint(root, f"checkpoint-{step}", 1_000_000 + step)
    state = root / ".ckptd" / "staging-rank-0"
    state.mkdir(parents=True)
    (state / "123-456-7").write_bytes(b"pinned")
    (root / "top.bin").write_bytes(b"top")
    return root


def committed_but_2(name: str) -> bool:
    return name != "checkpoint-2"  # says yes to `.ckptd` too: it must be left alone by itself


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_relieve_removes_nothing_while_free_space_is_above_the_watermark(ckpt: Path):
    before = listing(ckpt)
    assert relieve(str(ckpt), 1, committed_but_2) == []
    assert listing(ckpt) == before


def test_relieve_removes_only_committed_checkpoints_that_are_not_the_newest(ckpt: Path):
    assert relieve(str(ckpt), 1 << 60, committed_but_2) == ["checkpoint-1"]
    assert sorted(p.name for p in ckpt.iterdir()) == [".ckptd", "checkpoint-2", "checkpoint-3", "top.bin"]
    assert (ckpt / ".ckptd" / "staging-rank-0" / "123-456-7").read_bytes() == b"pinned"
    assert (ckpt / "checkpoint-2" / "model.bin").exists() and (ckpt / "checkpoint-3" / "model.bin").exists()


def test_local_checkpoints_are_ordered_by_step_then_mtime_and_skip_symlinks(tmp_path: Path):
    root = tmp_path / "ckpt"
    make_checkpoint(root, "step-10", 1_000)  # older on disk, later step
    make_checkpoint(root, "step-9", 5_000)
    make_checkpoint(root, "best", 3_000)  # no step: older than any stepped one, then by time
    make_checkpoint(root, "final", 2_000)
    elsewhere = make_checkpoint(tmp_path, "elsewhere", 9_000)
    os.symlink(elsewhere, root / "step-99")
    (root / ".ckptd").mkdir()
    (root / "top.bin").write_bytes(b"x")
    found = local_checkpoints(str(root), lambda name: name.startswith("step"))
    by_age = sorted(found, key=lambda c: c.order)
    assert [c.name for c in by_age] == ["final", "best", "step-9", "step-10"]
    assert [c.order for c in by_age] == [(-1, 2_000), (-1, 3_000), (9, 5_000), (10, 1_000)]
    assert {c.name: c.committed for c in found} == {"final": False, "best": False, "step-9": True, "step-10": True}
    assert all(c.size >= 4096 for c in found)


def test_the_newest_mtime_of_any_file_inside_counts(tmp_path: Path):
    root = tmp_path / "ckpt"
    folder = make_checkpoint(root, "best", 1_000)
    (folder / "sub").mkdir()
    (folder / "sub" / "late.bin").write_bytes(b"x")
    os.utime(folder / "sub" / "late.bin", (7_000, 7_000))
    os.utime(folder, (1_000, 1_000))  # making `sub` touched the folder itself
    [found] = local_checkpoints(str(root), lambda name: True)
    assert found.order == (-1, 7_000)
