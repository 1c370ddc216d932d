"""A failed or interrupted restore never leaves a folder that holds its marker but misses files
(issue 10): each checkpoint is staged, verified, then put in place; real files and a real store."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest
from invariants import marked_but_incomplete
from test_resolve import T0, commit
from test_restorer import CHUNK, FILES, leftovers, ref, run, tree

from daemon.catalog import layout
from daemon.config.refs import LATEST, CheckpointRef
from daemon.config.schema import DEFAULT_MARKERS
from daemon.restore import stage
from daemon.restore.download import Downloader
from daemon.restore.plan import plan
from daemon.restore.resolve import resolve
from daemon.restore.restorer import STAGING_PREFIX, RestoreFailed
from daemon.storage import StorageError
from daemon.storage.local import LocalStorage

KIND = "unit"

BIG = layout.file_key("proj", "src", 0, "checkpoint-20/model.safetensors")
ROOT_FILES = {"model.bin": b"final model", "trainer_state.json": b'{"global_step": 9}'}


@pytest.fixture
async def source(tmp_path):
    async with LocalStorage(tmp_path / "store") as store:
        await commit(store, "proj", "src", 0, "checkpoint-20", FILES, T0)
        await commit(store, "proj", "final", 0, ".", ROOT_FILES, T0)
        yield store


@pytest.mark.parametrize(
    "exists, staged, markers, kept, present, expected",
    [
        (False, ["a", "m"], ["m"], set(), set(), [("seal", "m"), ("publish", ".")]),
        (False, ["a"], [], set(), set(), [("publish", ".")]),
        (False, [], [], set(), set(), [("publish", ".")]),  # an empty checkpoint is a folder too
        (True, [], ["m"], {"a", "m"}, {"m"}, []),  # already the checkpoint
        (True, ["a"], ["m"], {"m"}, {"m"}, [("aside", "m"), ("move", "a"), ("return", "m")]),
        (True, ["a", "m"], ["m"], set(), {"m"}, [("drop", "m"), ("move", "a"), ("return", "m")]),
        (True, ["m"], ["m"], {"a"}, {"m"}, [("drop", "m"), ("return", "m")]),
        (True, ["a", "m"], ["m"], set(), set(), [("move", "a"), ("return", "m")]),
        (True, ["a"], [], set(), set(), [("move", "a")]),
        (
            True,
            ["a", "m2"],
            ["m1", "m2"],
            {"m1"},
            {"m1", "m2"},
            [("aside", "m1"), ("drop", "m2"), ("move", "a"), ("return", "m1"), ("return", "m2")],
        ),
    ],
)
def test_moves_table(exists, staged, markers, kept, present, expected):
    assert stage.moves(exists, staged, markers, kept, present) == expected


async def _staged(source, out: Path, ref_: CheckpointRef):
    """Resolve, plan, inspect, stage and download one unit, as restore does, up to the moves."""
    found = await resolve(source, ref_, default_project="proj", rank=0)
    (unit,), _ = plan([found], str(out), 0)
    rank_path = out / "rank-0"
    rank_path.mkdir(parents=True, exist_ok=True)
    rank_fd = os.open(rank_path, os.O_RDONLY | os.O_DIRECTORY)
    seen = stage.inspect(rank_fd, unit, DEFAULT_MARKERS)
    todo = [i for i in unit.items if i.relpath not in seen.kept]
    staging = stage.Staging(rank_fd, str(rank_path), unit, DEFAULT_MARKERS)
    await Downloader(source, 4, CHUNK, 0, None, 30).run(todo, staging)
    steps = stage.moves(seen.exists, [i.relpath for i in todo], staging.markers, seen.kept, seen.present)
    return rank_fd, staging, steps


def _prepare_existing(folder: Path, case: str) -> None:
    if case == "new":
        return
    for name, data in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    if case == "changed-file":
        (folder / "config.json").write_bytes(b"the user's")
        (folder / "sub" / "dir" / "optimizer.pt").write_bytes(b"truncated")
    elif case == "changed-marker":
        (folder / "trainer_state.json").write_bytes(b"{}")
        (folder / "config.json").write_bytes(b"the user's")
    elif case == "partial-without-marker":
        (folder / "trainer_state.json").unlink()
        (folder / "sub" / "dir" / "optimizer.pt").unlink()


@pytest.mark.parametrize("case", ["new", "changed-file", "changed-marker", "partial-without-marker"])
async def test_a_restore_stopped_after_any_step_leaves_no_marked_incomplete_folder(source, tmp_path, case):
    probe = tmp_path / "probe"
    _prepare_existing(probe / "rank-0" / "checkpoint-20", case)
    rank_fd, staging, steps = await _staged(source, probe, ref())
    staging.remove()
    os.close(rank_fd)
    assert steps, "nothing to put in place: the case proves nothing"
    for stop in range(len(steps) + 1):  # a kill after `stop` steps
        out = tmp_path / f"out-{stop}"
        _prepare_existing(out / "rank-0" / "checkpoint-20", case)
        rank_fd, staging, _ = await _staged(source, out, ref())
        try:
            for step in steps[:stop]:
                staging.apply(step)
            assert marked_but_incomplete(out, set(FILES)) == [], f"after {steps[:stop]}"
        finally:
            os.close(staging.fd)  # the kill: the staging folder stays, its lock goes
            os.close(rank_fd)
        # The next restore finishes the job and reclaims what the killed one left.
        report = await run(source, [ref(required=True)], out)
        assert tree(out / "rank-0" / "checkpoint-20") == FILES
        assert leftovers(out) == [] and report.files == len(FILES)


async def test_root_checkpoint_markers_go_in_last(source, tmp_path):
    out = tmp_path / "out"
    (out / "rank-0").mkdir(parents=True)
    (out / "rank-0" / "trainer_state.json").write_bytes(b"stale")  # an older save, complete
    (out / "rank-0" / "model.bin").write_bytes(b"older model")
    rank_fd, staging, steps = await _staged(source, out, CheckpointRef(LATEST, job_id="final"))
    assert steps == [("drop", "trainer_state.json"), ("move", "model.bin"), ("return", "trainer_state.json")]
    try:
        for step in steps:
            assert marked_but_incomplete(out, set(ROOT_FILES)) == []
            staging.apply(step)
    finally:
        staging.remove()
        os.close(rank_fd)
    assert tree(out / "rank-0") == ROOT_FILES


class FailingStore:
    """A real store whose GETs of one object fail for good once some of its chunks were served."""

    def __init__(self, inner, key: str, after: int) -> None:
        self.inner, self.key, self.after, self.served = inner, key, after, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get(self, key, start=0, end=None):
        if key == self.key:
            if self.served >= self.after:
                raise StorageError("get", key, "AccessDenied", "injected mid-body", http_status=403, transient=False)
            self.served += 1
        return await self.inner.get(key, start, end)

    async def get_stream(self, key, start, end):
        if key == self.key:
            if self.served >= self.after:
                raise StorageError("get", key, "AccessDenied", "injected mid-body", http_status=403, transient=False)
            self.served += 1
        async for chunk in self.inner.get_stream(key, start, end):
            yield chunk


@pytest.mark.parametrize("existing", [False, True], ids=["new-folder", "over-an-older-restore"])
async def test_store_failing_mid_download_leaves_nothing_half_done(source, tmp_path, existing):
    out = tmp_path / "out"
    folder = out / "rank-0" / "checkpoint-20"
    if existing:  # a complete earlier restore whose big file the user then changed
        await run(source, [ref()], out)
        (folder / "model.safetensors").write_bytes(b"changed")
    before = tree(out / "rank-0")
    with pytest.raises(RestoreFailed, match=f"cannot download {BIG}"):
        await run(FailingStore(source, BIG, after=3), [ref(required=True)], out)
    assert marked_but_incomplete(out, set(FILES)) == []
    assert tree(out / "rank-0") == before  # the folder as it was: nothing of the failed restore shows
    assert leftovers(out) == []


async def test_stale_staging_folders_are_removed_and_one_in_use_is_kept(source, tmp_path):
    rank = tmp_path / "out" / "rank-0"
    stale, busy = rank / f"{STAGING_PREFIX}stale", rank / f"{STAGING_PREFIX}busy"
    for folder in (stale, busy):
        (folder / "tree").mkdir(parents=True)
        (folder / "tree" / "trainer_state.json").write_bytes(b"{}")
    lock = os.open(busy, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a restore running now, in another process
    try:
        await run(source, [ref()], tmp_path / "out")
        assert sorted(p.name for p in rank.iterdir()) == [busy.name, "checkpoint-20"]
    finally:
        os.close(lock)


async def test_concurrent_restores_of_one_folder_both_end_complete(source, tmp_path):
    # Two init containers racing on one folder: each stages privately; both end with the whole
    # checkpoint in place, and neither removes the other's staging folder while it is in use.
    out = tmp_path / "out"
    results = await asyncio.gather(*(run(source, [ref()], out) for _ in range(2)), return_exceptions=True)
    assert any(not isinstance(r, BaseException) for r in results)
    assert tree(out / "rank-0" / "checkpoint-20") == FILES
    assert marked_but_incomplete(out, set(FILES)) == []
