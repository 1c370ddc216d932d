"""Restore never writes through a link (issue 10, defect 2): real symlinks, FIFOs and files planted
in the restore folder, a real file:// store. A link in the way is an error naming its path
(exit 3 for a required reference), an optional reference is then skipped, and the link's target
is never read, truncated or written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from test_resolve import T0, commit
from test_restorer import FILES, leftovers, ref, run, tree

from daemon.config.refs import LATEST, CheckpointRef
from daemon.restore.restorer import STAGING_PREFIX, RestoreFailed
from daemon.storage.local import LocalStorage

KIND = "unit"

PRECIOUS = {"keep.txt": b"precious", "sub/deep.txt": b"also precious"}


@pytest.fixture
async def source(tmp_path):
    """A file:// store holding committed checkpoint-20 of proj/src and a root checkpoint of proj/final."""
    async with LocalStorage(tmp_path / "store") as store:
        await commit(store, "proj", "src", 0, "checkpoint-20", FILES, T0)
        await commit(store, "proj", "final", 0, ".", {"model.bin": b"final model"}, T0)
        yield store


@pytest.fixture
def victim(tmp_path) -> Path:
    """A folder outside the restore folder that links point at."""
    folder = tmp_path / "victim"
    for name, data in PRECIOUS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def untouched(victim: Path) -> bool:
    return tree(victim) == PRECIOUS and sorted(p.name for p in victim.iterdir()) == ["keep.txt", "sub"]


def ckpt(rank: Path) -> Path:
    folder = rank / "checkpoint-20"
    folder.mkdir(parents=True)
    return folder


# Each plants something in rank-0 and returns the path the error must name.
Plant = Callable[[Path, Path], Path]


def _link(at: Path, to: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(to)
    return at


def _fifo(at: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(at)
    return at


def _file(at: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.write_bytes(b"in the way")
    return at


IN_THE_WAY: dict[str, Plant] = {
    "checkpoint-folder-is-a-link": lambda r, v: _link(r / "checkpoint-20", v),
    "checkpoint-folder-is-a-dangling-link": lambda r, v: _link(r / "checkpoint-20", v / "nothing"),
    "subfolder-is-a-link": lambda r, v: _link(ckpt(r) / "sub", v),
    "deep-subfolder-is-a-link": lambda r, v: _link(ckpt(r) / "sub" / "dir", v / "sub"),
    "file-is-a-link": lambda r, v: _link(ckpt(r) / "config.json", v / "keep.txt"),
    "marker-is-a-link": lambda r, v: _link(ckpt(r) / "trainer_state.json", v / "keep.txt"),
    "file-is-a-fifo": lambda r, v: _fifo(ckpt(r) / "config.json"),
    "checkpoint-folder-is-a-file": lambda r, v: _file(r / "checkpoint-20"),
    "subfolder-is-a-file": lambda r, v: _file(ckpt(r) / "sub"),
    "file-is-a-folder": lambda r, v: (ckpt(r) / "config.json").mkdir() or r / "checkpoint-20" / "config.json",
}


@pytest.mark.parametrize("plant", IN_THE_WAY.values(), ids=IN_THE_WAY.keys())
async def test_required_reference_fails_naming_the_path(source, tmp_path, victim, plant):
    out = tmp_path / "out"
    shown = plant(out / "rank-0", victim)
    with pytest.raises(RestoreFailed, match=str(shown)):
        await run(source, [ref(required=True)], out)
    assert untouched(victim)
    assert leftovers(out) == []


@pytest.mark.parametrize("plant", IN_THE_WAY.values(), ids=IN_THE_WAY.keys())
async def test_optional_reference_is_refused_and_the_others_restore(source, tmp_path, victim, plant):
    out = tmp_path / "out"
    plant(out / "rank-0", victim)
    final = CheckpointRef(LATEST, job_id="final")
    report = await run(source, [ref(), final], out)
    assert report.refused == [ref().describe()]
    assert [r["ref"] for r in report.restored] == [final.describe()]
    assert (out / "rank-0" / "model.bin").read_bytes() == b"final model"
    assert untouched(victim)
    assert leftovers(out) == []


async def test_rank_folder_that_is_a_link_is_refused(source, tmp_path, victim):
    out = tmp_path / "out"
    _link(out / "rank-0", victim)
    with pytest.raises(RestoreFailed, match=str(out / "rank-0")):
        await run(source, [ref(required=True)], out)
    report = await run(source, [ref()], out)
    assert report.refused == [ref().describe()] and report.restored == []
    assert untouched(victim)


async def test_root_checkpoint_file_that_is_a_link_is_refused(source, tmp_path, victim):
    out = tmp_path / "out"
    shown = _link(out / "rank-0" / "model.bin", victim / "keep.txt")
    with pytest.raises(RestoreFailed, match=str(shown)):
        await run(source, [CheckpointRef(LATEST, job_id="final", required=True)], out)
    assert untouched(victim)


async def test_link_planted_at_a_temporary_download_name_is_never_followed(source, tmp_path, victim):
    # The temporary names of earlier versions (.NAME.ckptd-part next to the file) and a stale
    # staging folder that is really a link: neither is written through, and restore succeeds.
    rank = tmp_path / "out" / "rank-0"
    folder = ckpt(rank)
    _link(folder / ".model.safetensors.ckptd-part", victim / "keep.txt")
    _link(rank / f"{STAGING_PREFIX}planted", victim)
    stale = rank / f"{STAGING_PREFIX}stale"
    _link(stale / "tree", victim)
    _link(stale / "markers" / "0", victim / "keep.txt")
    await run(source, [ref(required=True)], tmp_path / "out")
    assert {k: v for k, v in tree(folder).items() if not k.endswith(".ckptd-part")} == FILES
    assert (folder / ".model.safetensors.ckptd-part").is_symlink()
    assert untouched(victim)
    assert sorted(p.name for p in rank.iterdir()) == ["checkpoint-20"]  # stale staging names reclaimed


async def test_restore_folder_that_is_a_file_fails_cleanly(source, tmp_path):
    out = _file(tmp_path / "out")
    with pytest.raises(RestoreFailed, match=f"cannot open the restore folder {out}"):
        await run(source, [ref(required=True)], out)
    assert out.read_bytes() == b"in the way"
