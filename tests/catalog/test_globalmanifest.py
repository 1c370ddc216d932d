"""Global manifests of multi-node checkpoints: built from the parts, validated, written once, merged."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from daemon.catalog import globalmanifest as gm
from daemon.catalog import layout
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import StoredFile, build_manifest

KIND = "unit"
P, J, CP = "proj", "job-1", "step-3"


def part(rank: int, files: dict[str, bytes], reason: str = "part", at: str = "2026-12-01T10:00:00+00:00") -> dict:
    stored = [
        StoredFile(
            f"{CP}/{name}",
            len(data),
            hashlib.sha256(data).hexdigest(),
            layout.file_key(P, J, rank, f"{CP}/{name}"),
            "e",
        )
        for name, data in files.items()
    ]
    metrics = {"loss": 0.5} if reason == "marker" else {}
    manifest = build_manifest(P, J, rank, CP, stored, reason, metrics)
    return {**manifest, "committed_at": at}


def two_parts() -> dict[int, dict]:
    return {
        0: part(0, {"__0_0.distcp": b"a", ".metadata": b"m"}, "marker", "2026-12-01T10:00:02+00:00"),
        1: part(1, {"__1_0.distcp": b"bb"}, "part", "2026-12-01T10:00:01+00:00"),
    }


def test_built_from_the_parts_the_same_on_every_node():
    parts = two_parts()
    one = gm.build_global(P, J, CP, 2, parts, "shards")
    other = gm.build_global(P, J, CP, 2, dict(reversed(parts.items())), "shards")
    assert json_bytes(one) == json_bytes(other)  # deterministic: two nodes write the same bytes
    assert one["committed_at"] == "2026-12-01T10:00:02+00:00"  # the last part's
    assert (one["step"], one["file_count"], one["total_bytes"], one["metrics"]) == (3, 3, 4, {"loss": 0.5})
    assert [(f["rank"], f["path"]) for f in one["files"]] == [
        (0, "step-3/.metadata"),
        (0, "step-3/__0_0.distcp"),
        (1, "step-3/__1_0.distcp"),
    ]
    assert [r["reason"] for r in one["ranks"]] == ["marker", "part"]
    assert gm.parse_global(json_bytes(one)) == one


def bad(mutate) -> bytes:
    manifest = gm.build_global(P, J, CP, 2, two_parts(), "shards")
    mutate(manifest)
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(
    "data, why",
    [
        (b"[]", "not a global manifest"),
        (bad(lambda m: m.update(kind="rank")), "not a global manifest"),
        (bad(lambda m: m["files"][2].update(rank=2)), "outside the group of 2"),
        (bad(lambda m: m["files"][2].update(rank=True)), "rank is not an integer"),
        (bad(lambda m: m["files"][2].update(key=layout.file_key(P, "other", 1, "step-3/__1_0.distcp"))), "key"),
        (bad(lambda m: m["files"][2].update(path="step-4/__1_0.distcp")), "outside 'step-3'"),
        (bad(lambda m: m["files"][2].update(path="step-3/../../x")), "unsafe path"),
        (bad(lambda m: m["files"].append(dict(m["files"][1]))), "listed twice"),
        (bad(lambda m: m.update(files=[], file_count=0, total_bytes=0)), "lists no file"),
        (bad(lambda m: m.update(file_count=2)), "file_count"),
        (bad(lambda m: m.update(group_size=0)), "group_size"),
    ],
)
def test_a_bad_one_is_refused(data, why):
    with pytest.raises(ValueError, match=why):
        gm.parse_global(data)


def test_merged_gives_each_node_every_rank_files_its_own_first():
    """The table of `merged`: shards of several ranks, one same-bytes copy, one per-node file."""
    parts = {
        0: part(0, {"__0_0.distcp": b"a", ".metadata": b"m", "rng.pt": b"r0", "config.json": b"c"}, "marker"),
        1: part(1, {"__1_0.distcp": b"b", "rng.pt": b"r1!", "config.json": b"c"}),
    }
    manifest = gm.build_global(P, J, CP, 2, parts, "shards")
    for rank, rng_key in ((0, 0), (1, 1), (2, 0)):  # node 2: a bigger job resuming picks the lowest rank
        view, shadowed = gm.merged(manifest, rank)
        by_path = {f["path"]: f["key"] for f in view["files"]}
        assert sorted(by_path) == [
            f"{CP}/{n}" for n in (".metadata", "__0_0.distcp", "__1_0.distcp", "config.json", "rng.pt")
        ]
        assert by_path[f"{CP}/rng.pt"] == layout.file_key(P, J, rng_key, f"{CP}/rng.pt")
        assert by_path[f"{CP}/__1_0.distcp"] == layout.file_key(P, J, 1, f"{CP}/__1_0.distcp")
        assert shadowed == [f"{CP}/rng.pt"]  # config.json: same bytes on both, restored once
        assert (view["file_count"], view["total_bytes"]) == (5, sum(f["size"] for f in view["files"]))


@pytest.mark.parametrize("store", ["local", "moto", "juicefs"], indirect=True)
async def test_two_nodes_finishing_together_leave_one_correct_manifest(store):
    manifest = gm.build_global(P, J, CP, 2, two_parts(), "shards")
    wrote = await asyncio.gather(*(gm.write_global(store, json.loads(json.dumps(manifest))) for _ in range(4)))
    assert any(wrote)
    if store.conditional_writes is not None:  # JuiceFS ignores If-None-Match: then every write "wins"
        assert sum(wrote) == 1
    key = layout.global_key(P, J, CP)
    assert await gm.read_global(store, key) == manifest
    assert await gm.write_global(store, manifest) is False  # already exactly there
    changed = gm.build_global(P, J, CP, 2, {**two_parts(), 1: part(1, {"__1_0.distcp": b"new"})}, "shards")
    assert await gm.write_global(store, changed) is True  # from parts that changed since: replaced
    assert await gm.read_globals(store, P, J) == [changed]
    assert await store.has_any(layout.global_prefix(P, J)) and not await store.has_any(layout.global_prefix(P, "other"))
