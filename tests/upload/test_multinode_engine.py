"""Two nodes' upload engines in one process, one store: the cross-rank commit end to end, with the
engine's own part rules, publisher and status (the real-DCP version is tests/frameworks)."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
from engines import config, counter, until
from structlog.testing import capture_logs

from daemon.catalog import globalmanifest as gm
from daemon.catalog import layout
from daemon.storage.local import LocalStorage
from daemon.upload.engine import Engine

KIND = "unit"
J = "job-1"


@dataclass
class _StorageInfo:  # DCP's, pickled the same way: only the shard names are read
    relative_path: str
    offset: int
    length: int


def write(root: Path, relpath: str, data: bytes) -> None:
    """As a trainer saves: a temporary name, renamed into place."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f".{path.name}.tmp").write_bytes(data)
    (path.parent / f".{path.name}.tmp").rename(path)


def metadata(*shards: str) -> bytes:
    return pickle.dumps({"storage_data": {i: _StorageInfo(s, 0, 1) for i, s in enumerate(shards)}})


@pytest.fixture
async def nodes(tmp_path):
    engines = []
    store = tmp_path / "store"
    for rank in (0, 1):
        c = config(tmp_path / f"node-{rank}", f"file://{store}", node_rank=str(rank), group_size="2", job_id=J)
        Path(c.checkpoint_dir).mkdir(parents=True)
        engines.append(Engine(c, LocalStorage(store)))
        await engines[-1].startup()
    yield engines
    for engine in engines:
        if not engine.deadline.is_set:
            await engine.shutdown()


async def globals_of(engine: Engine) -> dict[str, dict]:
    return {m["checkpoint"]: m for m in await gm.read_globals(engine.storage, "proj", J)}


async def committed(engine: Engine, checkpoint: str) -> dict | None:
    return (await globals_of(engine)).get(checkpoint)


def root(engine: Engine) -> Path:
    return Path(engine.root)


async def test_a_checkpoint_saved_on_two_nodes_commits_globally_once_every_shard_is_stored(nodes):
    zero, one = nodes
    write(root(one), "step-1/__1_0.distcp", b"shard one")
    write(root(zero), "step-1/__0_0.distcp", b"shard zero")
    write(root(zero), "step-1/.metadata", metadata("__0_0.distcp", "__1_0.distcp"))
    step_1 = await until(lambda: committed(zero, "step-1"), 30, "step-1 committed globally")
    files = {(f["rank"], f["path"]) for f in step_1["files"]}
    assert files == {(0, "step-1/.metadata"), (0, "step-1/__0_0.distcp"), (1, "step-1/__1_0.distcp")}

    # Step 2: node 1 has not written its shard yet; both nodes report what step 2 waits for.
    write(root(zero), "step-2/__0_0.distcp", b"zero again")
    write(root(zero), "step-2/.metadata", metadata("__0_0.distcp", "__1_0.distcp"))

    def waiting() -> list:  # step-1 may linger until the next poll shows node 1 committed it
        return [(w["checkpoint"], w["missing"], w["parts"]) for w in zero.status.status()["waiting_for_ranks"]]

    await until(lambda: waiting() == [("step-2", ["rank-1"], [0])], 30, "step-2 waiting for rank 1")
    assert counter("ckptd_checkpoints_waiting_for_ranks") == 1
    assert "step-2" not in await globals_of(zero)
    write(root(one), "step-2/__1_0.distcp", b"one again")
    await until(lambda: not zero.status.status()["waiting_for_ranks"], 30, "step-2 committed")
    assert "step-2" in await globals_of(one)
    reports = [await engine.shutdown() for engine in (zero, one)]
    assert all(r.ok for r in reports)
    assert counter("ckptd_oldest_waiting_for_ranks_age_seconds") == 0


async def test_a_checkpoint_only_one_node_saves_commits_once_the_other_said_it_holds_nothing(tmp_path):
    store = tmp_path / "store"
    engines = []
    for rank in (0, 1):
        c = config(tmp_path / f"n{rank}", f"file://{store}", node_rank=str(rank), group_size="2", job_id=J,
                   quiet_commit="1")  # fmt: skip
        Path(c.checkpoint_dir).mkdir(parents=True)
        engines.append(Engine(c, LocalStorage(store)))
        await engines[-1].startup()
    zero, one = engines
    try:
        write(root(zero), "checkpoint-5/training_args.bin", b"args")
        write(root(zero), "checkpoint-5/trainer_state.json", b'{"global_step": 5}')
        whole = await until(lambda: committed(one, "checkpoint-5"), 30, "checkpoint-5 committed globally")
        assert [(r["rank"], r["reason"]) for r in whole["ranks"]] == [(0, "marker"), (1, "empty")]
        key = layout.manifest_key("proj", J, 1, "checkpoint-5")
        assert await one.storage.head(key) is not None
    finally:
        for engine in engines:
            await engine.shutdown()


async def test_a_shard_rewritten_after_the_global_commit_withdraws_it_until_committed_again(nodes):
    zero, one = nodes
    write(root(one), "step-1/__1_0.distcp", b"first")
    write(root(zero), "step-1/__0_0.distcp", b"zero")
    write(root(zero), "step-1/.metadata", metadata("__0_0.distcp", "__1_0.distcp"))

    async def listed_sha() -> str | None:
        whole = await committed(zero, "step-1")
        return None if whole is None else next(f["sha256"] for f in whole["files"] if f["rank"] == 1)

    async def listed(data: bytes) -> bool:
        return await listed_sha() == hashlib.sha256(data).hexdigest()

    await until(lambda: listed(b"first"), 30, "the first bytes committed")
    with capture_logs() as logs:
        write(root(one), "step-1/__1_0.distcp", b"second version")  # the trainer saved step 1 again
        # No global manifest names the new bytes by the old checksum: withdrawn, then written anew.
        await until(lambda: listed(b"second version"), 30, "the second version committed")
    assert "manifest withdrawn until the changed file is stored" in [e["event"] for e in logs]
    key = layout.file_key("proj", J, 1, "step-1/__1_0.distcp")
    assert await one.storage.get(key) == b"second version"
