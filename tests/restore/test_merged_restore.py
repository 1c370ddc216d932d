"""Restoring multi-node checkpoints: only globally committed ones, merged into one folder per node."""

from __future__ import annotations

import hashlib
import json

import pytest

from daemon.catalog import globalmanifest as gm
from daemon.catalog import layout
from daemon.catalog.jobmeta import ensure_job
from daemon.catalog.manifest import StoredFile, build_manifest, read_manifest, write_manifest
from daemon.config.refs import BEST, LATEST, NAMED, CheckpointRef
from daemon.restore.resolve import resolve
from daemon.restore.restorer import restore

KIND = "unit"
P, J = "proj", "nodes"
in_every_store = pytest.mark.parametrize("store", ["local", "moto"], indirect=True)


def shards(checkpoint: str, rank: int) -> dict[str, bytes]:
    files = {f"__{rank}_0.distcp": f"{checkpoint} shard {rank}".encode(), "extra.txt": f"node {rank}".encode()}
    return files | ({".metadata": f"{checkpoint} metadata".encode()} if rank == 0 else {})


async def save(store, checkpoint: str, ranks=(0, 1), commit: bool = True, loss: float | None = None) -> None:
    """Both nodes' parts of a checkpoint, and (`commit`) its global manifest, as ckptd writes them."""
    parts = {}
    for rank in ranks:
        stored = []
        for name, data in shards(checkpoint, rank).items():
            key = layout.file_key(P, J, rank, f"{checkpoint}/{name}")
            stored.append(
                StoredFile(
                    f"{checkpoint}/{name}", len(data), hashlib.sha256(data).hexdigest(), key, await store.put(key, data)
                )
            )
        metrics = {"eval_loss": loss} if loss is not None and rank == 0 else {}
        part = build_manifest(P, J, rank, checkpoint, stored, "marker" if rank == 0 else "part", metrics)
        parts[rank] = await write_manifest(store, part)
    if commit:
        await gm.write_global(store, gm.build_global(P, J, checkpoint, 2, parts, "shards"))


async def job(store) -> None:
    await ensure_job(store, P, J, 2)
    await save(store, "step-1", loss=0.5)
    await save(store, "step-2", loss=0.2)
    await save(store, "step-3", loss=0.1, commit=False)  # parts only: a node died in its save


def latest() -> CheckpointRef:
    return CheckpointRef(LATEST, project_name=P, job_id=J)


@in_every_store
@pytest.mark.parametrize("rank", [0, 1, 2])
async def test_latest_is_the_latest_global_commit_whatever_the_parts(store, rank):
    await job(store)
    found = await resolve(store, latest(), default_project=P, rank=rank)
    assert (found.checkpoint, found.merged_ranks) == ("step-2", (0, 1))
    assert sorted(f["path"] for f in found.manifest["files"]) == [
        "step-2/.metadata", "step-2/__0_0.distcp", "step-2/__1_0.distcp", "step-2/extra.txt"
    ]  # fmt: skip
    project_wide = await resolve(store, CheckpointRef(LATEST, project_name=P), default_project=P, rank=rank)
    assert project_wide.checkpoint == "step-2"
    named = CheckpointRef(NAMED, project_name=P, job_id=J, checkpoint_name="step-3")
    assert await resolve(store, named, default_project=P, rank=rank) is None  # never committed globally
    best = CheckpointRef(BEST, project_name=P, job_id=J, metric="eval_loss", mode="min")
    assert (await resolve(store, best, default_project=P, rank=rank)).checkpoint == "step-2"  # step-3 is not one


@in_every_store
async def test_a_multi_node_job_without_a_global_commit_restores_nothing(store):
    await ensure_job(store, P, J, 2)
    await save(store, "step-1", commit=False)
    assert await read_manifest(store, layout.manifest_key(P, J, 0, "step-1"))  # rank 0's part says "marker"
    assert await resolve(store, latest(), default_project=P, rank=0) is None


@in_every_store
@pytest.mark.parametrize("rank", [0, 1])
async def test_each_node_restores_the_whole_checkpoint_its_own_files_first(store, tmp_path, rank):
    await job(store)
    report = await restore(store, refs=[latest()], restore_dir=str(tmp_path / "load"), rank=rank, default_project=P)
    folder = tmp_path / "load" / f"rank-{rank}" / "step-2"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {
        ".metadata": b"step-2 metadata",
        "__0_0.distcp": b"step-2 shard 0",
        "__1_0.distcp": b"step-2 shard 1",
        "extra.txt": f"node {rank}".encode(),  # both nodes wrote one: each gets back its own
    }
    assert [(r["checkpoint"], r["merged_ranks"]) for r in report.restored] == [("step-2", [0, 1])]
    summary = json.loads((tmp_path / "load" / "ckptd-restore.json").read_text())
    assert summary["restored"][0]["merged_ranks"] == [0, 1]
