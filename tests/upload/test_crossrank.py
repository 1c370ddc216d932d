"""The cross-rank commit of multi-node checkpoints: the pure rule, then real parts in real stores."""

from __future__ import annotations

import hashlib
import pickle
import time
from dataclasses import dataclass

import pytest
from engines import config, counter, until
from structlog.testing import capture_logs

from daemon.catalog import globalmanifest as gm
from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile, build_manifest, read_manifest, write_manifest
from daemon.storage.retry import Deadline
from daemon.upload.crossrank import CrossRank, global_ready
from daemon.upload.health import StoreHealth

KIND = "unit"
P, J, CP = "proj", "job-1", "step-3"
WAITING, OLDEST = "ckptd_checkpoints_waiting_for_ranks", "ckptd_oldest_waiting_for_ranks_age_seconds"
in_every_store = pytest.mark.parametrize("store", ["local", "moto", "juicefs"], indirect=True)


@pytest.mark.parametrize(
    "parts, marker_in, awaits, named, expected",
    [
        ({0: {"a/.metadata", "a/__0_0.distcp"}, 1: {"a/__1_0.distcp"}}, {0}, True, {"a/__0_0.distcp", "a/__1_0.distcp"},
         ("shards", [])),
        ({0: {"a/.metadata", "a/__0_0.distcp"}, 1: set()}, {0}, True, {"a/__0_0.distcp", "a/__1_0.distcp"},
         (None, ["a/__1_0.distcp"])),  # a shard the metadata names is not stored (yet)
        ({0: {"a/.metadata", "a/__0_0.distcp", "a/__1_0.distcp"}}, {0}, False, {"a/__0_0.distcp", "a/__1_0.distcp"},
         (None, ["rank-1"])),  # every rank speaks for its own share, even when the shards are all there
        ({1: {"a/__1_0.distcp"}}, set(), True, None, (None, ["rank-0"])),
        ({0: {"a/__0_0.distcp"}, 1: {"a/__1_0.distcp"}}, set(), True, None, (None, ["the completion marker"])),
        ({0: {"a/model.bin"}, 1: {"a/opt.bin"}}, set(), False, None, ("ranks", [])),  # no marker anywhere: quiet parts
        ({0: {"a/trainer_state.json"}, 1: set()}, {0}, False, None, ("ranks", [])),  # rank 1 said "empty"
        ({0: {"a/trainer_state.json"}}, {0}, False, None, (None, ["rank-1"])),
        ({0: {"a/trainer_state.json", "a/m/.metadata"}, 1: {"a/m/__1_0.distcp", "a/rng_1.pth"}}, {0}, True,
         {"a/m/__0_0.distcp", "a/m/__1_0.distcp"}, (None, ["a/m/__0_0.distcp"])),
    ],
)  # fmt: skip
def test_global_ready(parts, marker_in, awaits, named, expected):
    assert global_ready(2, parts, marker_in, awaits, named) == expected


@dataclass
class _StorageInfo:  # DCP's, pickled the same way: only the shard names are read
    relative_path: str
    offset: int
    length: int


def dcp_metadata(*shards: str) -> bytes:
    return pickle.dumps({"storage_data": {i: _StorageInfo(name, 0, 1) for i, name in enumerate(shards)}})


async def save_part(store, rank: int, files: dict[str, bytes], reason: str = "part", checkpoint: str = CP) -> None:
    """What a node's daemon leaves in the store: its files under rank-N/, then its part."""
    stored = []
    for name, data in files.items():
        key = layout.file_key(P, J, rank, f"{checkpoint}/{name}")
        stored.append(
            StoredFile(
                f"{checkpoint}/{name}", len(data), hashlib.sha256(data).hexdigest(), key, await store.put(key, data)
            )
        )
    await write_manifest(store, build_manifest(P, J, rank, checkpoint, stored, reason, {}))


def node(tmp_path, store, rank: int, has_files=lambda cp: False, quiet: str = "60", lag: str = "600") -> CrossRank:
    c = config(
        tmp_path / f"node-{rank}",
        "file:///unused",
        node_rank=str(rank),
        group_size="2",
        job_id=J,
        quiet_commit=quiet,
        rank_lag_alert=lag,
    )
    return CrossRank(c, store, Deadline.after(30), StoreHealth(), has_files)


async def global_of(store, checkpoint: str = CP) -> dict | None:
    found = [m for m in await gm.read_globals(store, P, J) if m["checkpoint"] == checkpoint]
    return found[0] if found else None


async def checked(crossrank: CrossRank, store, checkpoint: str) -> dict | None:
    """The checkpoint's global manifest, after one more check by this node."""
    await crossrank.check()
    return await global_of(store, checkpoint)


@in_every_store
async def test_a_dcp_checkpoint_commits_once_every_shard_its_metadata_names_is_stored(tmp_path, store):
    zero, one = node(tmp_path, store, 0), node(tmp_path, store, 1)
    await save_part(store, 1, {"__1_0.distcp": b"one"})
    await one.check()
    assert [(w["checkpoint"], w["missing"], w["parts"]) for w in one.status()] == [(CP, ["rank-0"], [1])]
    assert counter(WAITING) == 1 and counter(OLDEST) > 0
    await save_part(
        store, 0, {"__0_0.distcp": b"zero", ".metadata": dcp_metadata("__0_0.distcp", "__1_0.distcp")}, "marker"
    )
    commits = counter("ckptd_global_commits_total")
    with capture_logs() as logs:
        await zero.check()  # the node whose part came last finishes the commit
    assert counter("ckptd_global_commits_total") == commits + 1
    assert counter("ckptd_last_committed_step") == 3
    manifest = await global_of(store)
    assert manifest is not None and manifest["reason"] == "shards"
    assert sorted((f["rank"], f["path"]) for f in manifest["files"]) == [
        (0, f"{CP}/.metadata"), (0, f"{CP}/__0_0.distcp"), (1, f"{CP}/__1_0.distcp")
    ]  # fmt: skip
    assert [e["checkpoint"] for e in logs if e["event"] == "checkpoint committed globally"] == [CP]
    with capture_logs() as logs:
        await one.check()  # the other node finds it done: nothing written twice
        await zero.check()
    assert not [e for e in logs if e["event"] == "checkpoint committed globally"]
    assert one.status() == [] and counter(WAITING) == 0 and counter(OLDEST) == 0
    assert counter("ckptd_global_commits_total") == commits + 2  # node 1 waited for it: its commit too


@in_every_store
async def test_a_shard_the_metadata_names_but_no_part_lists_keeps_it_waiting(tmp_path, store):
    zero = node(tmp_path, store, 0)
    await save_part(store, 1, {"__1_0.distcp": b"one"})  # a node killed before its second shard
    meta = dcp_metadata("__0_0.distcp", "__1_0.distcp", "__2_0.distcp")
    await save_part(store, 0, {"__0_0.distcp": b"zero", ".metadata": meta}, "marker")
    await zero.check()
    assert await global_of(store) is None
    assert [w["missing"] for w in zero.status()] == [[f"{CP}/__2_0.distcp"]]


@in_every_store
async def test_a_save_a_node_died_in_never_commits(tmp_path, store):
    # Both nodes stored shards; the coordinator never wrote .metadata.
    await save_part(store, 0, {"__0_0.distcp": b"zero"})
    await save_part(store, 1, {"__1_0.distcp": b"one"})
    zero = node(tmp_path, store, 0)
    await zero.check()
    assert await global_of(store) is None
    assert [w["missing"] for w in zero.status()] == [["the completion marker"]]


@in_every_store
async def test_a_node_without_files_says_so_once_quiet_and_the_checkpoint_commits(tmp_path, store):
    await save_part(store, 0, {"trainer_state.json": b"{}", "model.bin": b"w"}, "marker")
    one = node(tmp_path, store, 1, quiet="1")
    started = time.monotonic()
    await until(lambda: checked(one, store, CP), 15, "the global commit")
    assert time.monotonic() - started >= 1  # not before the quiet time
    empty = await read_manifest(store, layout.manifest_key(P, J, 1, CP))
    assert (empty["reason"], empty["files"]) == ("empty", [])
    assert (await global_of(store))["reason"] == "ranks"


@in_every_store
async def test_a_node_that_holds_files_of_it_never_says_empty(tmp_path, store):
    # A control checkpoint node 1 holds nothing of: its empty part shows the quiet time has passed.
    control = "step-4"
    for checkpoint in (CP, control):
        await save_part(store, 0, {"trainer_state.json": b"{}"}, "marker", checkpoint=checkpoint)
    busy = node(tmp_path, store, 1, has_files=lambda cp: cp == CP, quiet="1")
    # Files of it stored by an earlier run of node 1, whose part was never written:
    await store.put(layout.file_key(P, J, 1, f"{CP}/opt.bin"), b"o")
    restarted = node(tmp_path, store, 1, quiet="1")
    await until(lambda: checked(busy, store, control), 15, "the control checkpoint's global commit")
    for _ in range(2):  # past the quiet time for the checkpoint of both nodes too
        await busy.check()
        await restarted.check()
    assert await global_of(store) is None
    assert [(w["checkpoint"], w["missing"]) for w in busy.status()] == [(CP, ["rank-1"])]


@in_every_store
async def test_a_rank_lagging_past_the_threshold_is_warned_about_once(tmp_path, store):
    await save_part(store, 1, {"__1_0.distcp": b"one"})
    one = node(tmp_path, store, 1, lag="1")
    assert counter("ckptd_rank_lag_threshold_seconds") == 1
    with capture_logs() as logs:

        async def warned() -> bool:  # 1 s after the part's commit
            await one.check()
            return any(e["event"].startswith("a rank lags") for e in logs)

        await until(warned, 15, "the lag warning")
        await one.check()
        await one.check()
    lagging = [e for e in logs if e["event"].startswith("a rank lags")]
    assert [(e["checkpoint"], e["missing"], e["parts"]) for e in lagging] == [(CP, ["rank-0"], [1])]
    assert counter(OLDEST) > 1


@in_every_store
async def test_a_damaged_part_is_no_part_and_damaged_metadata_commits_nothing(tmp_path, store):
    await save_part(store, 0, {"__0_0.distcp": b"zero", ".metadata": b"not a pickle"}, "marker")
    await store.put(layout.manifest_key(P, J, 1, CP), b'{"format": 1, "files": "all of them"}')
    zero = node(tmp_path, store, 0)
    with capture_logs() as logs:
        await zero.check()
        assert [w["missing"] for w in zero.status()] == [["rank-1"]]
        await save_part(store, 1, {"__1_0.distcp": b"one"})  # rank 1's part, stored anew
        await zero.check()
    assert [w["missing"] for w in zero.status()] == [[f"a readable {CP}/.metadata"]]
    events = [e["event"] for e in logs]
    assert "unreadable part of a checkpoint" in events
    assert events.count("DCP metadata unreadable: the checkpoint cannot commit") == 1  # read once, remembered
    assert await global_of(store) is None


@in_every_store
async def test_an_empty_metadata_commits_nothing_and_stops_no_check(tmp_path, store):
    await save_part(store, 0, {"__0_0.distcp": b"zero", ".metadata": b""}, "marker")
    await save_part(store, 1, {"__1_0.distcp": b"one"})
    zero = node(tmp_path, store, 0)
    await zero.check()  # S3 answers InvalidRange to any range of an empty object: never asked
    assert [w["missing"] for w in zero.status()] == [[f"a readable {CP}/.metadata"]]
    assert await global_of(store) is None
