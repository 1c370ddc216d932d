"""Multi-node jobs in the catalog: what is committed (global manifests only), retention on the
globally committed checkpoints, and prunes that delete a global manifest before anything it lists,
stopped anywhere and finished by the next prune. Pure rules, then real stores (a local folder,
moto, the JuiceFS gateway) holding a two-node job written as ckptd's nodes leave one (twonodes.py)."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from twonodes import COMMITTED, LOSSES, T0, WAITING, P, commit_globally, keys, lies, make_job, save_part

from daemon.catalog import browse, jobmeta, jobview, layout, prune, retention
from daemon.catalog.browse import Checkpoint
from daemon.catalog.globalmanifest import build_global
from daemon.catalog.jsonio import json_bytes
from daemon.catalog.manifest import StoredFile, build_manifest
from daemon.storage import Storage, StorageError
from daemon.storage.local import LocalStorage
from daemon.storage.retry import Deadline

KIND = "unit"  # the S3 cases are integration tests (conftest marks them)

J = "nodes"


def pruner(store: Storage) -> prune.Pruner:
    return prune.Pruner(store, P, J, deadline=Deadline.after(30), multi_node=True)


# --- pure rules ---------------------------------------------------------------------------------


def _part(rank: int, name: str, at: int, loss: float) -> dict:
    """A part manifest in memory (nothing stored): one shard of 100 bytes."""
    rel = f"{name}/__{rank}_0.distcp"
    stored = StoredFile(rel, 100, hashlib.sha256(bytes(100)).hexdigest(), layout.file_key(P, J, rank, rel), "e")
    when = T0 + timedelta(seconds=at)
    return build_manifest(P, J, rank, name, [stored], "marker", {"eval_loss": loss}, committed_at=when)


def plan(found, rules: retention.Rules, stored) -> dict[str, retention.Decision]:
    return {d.name: d for d in retention.plan(found, rules, stored_ranks=stored)}


def committed_globally(name: str, at: int, loss: float) -> Checkpoint:
    """A globally committed checkpoint whose parts say 1 - loss and whose global manifest says loss."""
    parts = {r: _part(r, name, at + r, 1 - loss) for r in (0, 1)}
    whole = build_global(P, J, name, 2, parts, "ranks") | {"metrics": {"eval_loss": loss}}
    return Checkpoint(name, parts, whole)


FOUND = [committed_globally(f"step-{10 * i}", 10 * i, loss) for i, loss in ((1, 0.9), (2, 0.5), (3, 0.7), (4, 0.6))]
STORED = {f"step-{10 * i}": {0, 1} for i in (1, 2, 3, 4)} | {"step-50": {0}}  # step-50: parts, no global


@pytest.mark.parametrize(
    ("rules", "deleted"),
    [
        (retention.Rules(keep_last=1), {"step-10", "step-20", "step-30"}),
        (retention.Rules(keep_last=2), {"step-10", "step-20"}),
        (retention.Rules(keep_best=1, metric="eval_loss"), {"step-10", "step-30"}),  # the global's 0.5, not 1-0.9
        (retention.Rules(keep_best=1, metric="eval_loss", mode="max"), {"step-20", "step-30"}),
        (retention.Rules(keep_every_steps=20), {"step-10", "step-30"}),
    ],
)
def test_rules_judge_the_globally_committed_checkpoints(rules, deleted):
    decisions = plan(FOUND, rules, STORED)
    assert {n for n, d in decisions.items() if d.delete} == deleted
    assert decisions["step-40"].keep and retention.LATEST in decisions["step-40"].reasons  # latest global
    # Parts with a higher step but no global manifest: not committed, so neither the latest nor deleted.
    assert decisions["step-50"].reasons == (retention.UNCOMMITTED,)
    assert decisions["step-50"].checkpoint is None and decisions["step-50"].uncommitted_ranks == (0,)


def test_a_checkpoint_is_what_its_global_manifest_says():
    c = FOUND[1]
    assert (c.step, c.committed_at, c.metrics) == (20, c.whole["committed_at"], {"eval_loss": 0.5})
    assert (c.ranks, c.total_bytes, c.file_count) == ([0, 1], 200, 2)
    assert [f["path"] for f in c.files_of(1)] == ["step-20/__1_0.distcp"]
    assert "rank" not in c.files_of(1)[0]


def test_a_rank_storing_files_without_a_part_keeps_a_global_checkpoint():
    only_rank_0 = Checkpoint("step-10", {0: FOUND[0].manifests[0]}, FOUND[0].whole)  # rank 1's part gone
    decisions = plan([only_rank_0, *FOUND[1:]], retention.Rules(keep_last=1), STORED)
    assert decisions["step-10"].reasons == (retention.UNCOMMITTED,) and decisions["step-10"].uncommitted_ranks == (1,)


# --- a two-node job in a real store -------------------------------------------------------------


async def test_the_view_of_a_two_node_job(store):
    made = await make_job(store)
    view = await jobview.view(store, P, J)
    assert (view.multi_node, view.group_size) == (True, 2)
    assert [c.name for c in view.committed] == [".", *COMMITTED]
    assert [view.global_state(n) for n in (".", "step-10", WAITING)] == [None, jobview.COMMITTED, jobview.WAITING]
    assert (view.part_ranks(WAITING), view.missing_ranks(WAITING)) == ([0], [1])
    assert view.named("step-30").whole == made.wholes["step-30"]
    assert view.named("step-30").metrics == {"eval_loss": LOSSES["step-30"]}
    assert view.pick("latest", P, J)[0] == "step-30"  # not step-40: only parts of it
    assert (await browse.job_usage(store, P, J))["checkpoints"] == 4  # three global ones and '.'


async def test_what_makes_a_job_multi_node(store):
    await save_part(store, 0, "step-1", at=0, job="old")  # an earlier ckptd's group of 2: per-rank commits
    await store.put(layout.job_metadata_key(P, "old"), json_bytes({"group_size": 2}))
    old = await jobview.view(store, P, "old")
    assert not old.multi_node and [c.name for c in old.committed] == ["step-1"]
    assert old.global_state("step-1") is None and old.missing_ranks("step-1") == []

    parts = {r: await save_part(store, r, "step-1", at=r, job="bare") for r in (0, 1)}
    await commit_globally(store, "step-1", parts, job="bare")  # a global manifest, and no job.json
    bare = await jobview.view(store, P, "bare")
    assert (bare.multi_node, bare.group_size, [c.name for c in bare.committed]) == (True, 2, ["step-1"])

    await jobmeta.ensure_job(store, P, "fresh", 2)  # ckptd's new multi-node job, nothing committed yet
    await save_part(store, 1, "step-1", at=0, job="fresh")
    fresh = await jobview.view(store, P, "fresh")
    assert (fresh.multi_node, fresh.committed, fresh.global_state("step-1")) == (True, [], jobview.WAITING)
    assert fresh.pick("step-1", P, "fresh") == ("step-1", None)
    with pytest.raises(browse.NotFound):
        fresh.pick("latest", P, "fresh")


async def test_an_unreadable_global_manifest_commits_nothing_and_is_kept(store):
    await make_job(store)
    await store.put(layout.global_key(P, J, "step-20"), b"{not json")
    view = await jobview.view(store, P, J)
    assert view.global_state("step-20") == jobview.UNREADABLE and view.named("step-20") is None
    found = await prune.survey(store, P, J)
    decisions = plan(found.checkpoints, retention.Rules(keep_last=1), found.stored_ranks)
    assert decisions["step-20"].reasons == (retention.UNCOMMITTED,)
    assert {n for n, d in decisions.items() if d.delete} == {"step-10"}


def record_deletes(store: Storage, monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[str]:
    """Every key the store deletes, in order; with `fail_after`, deletes after that many fail for good."""
    deleted: list[str] = []
    real = store.delete

    async def delete(key: str) -> None:
        if fail_after is not None and len(deleted) >= fail_after:
            raise StorageError("delete", key, "AccessDenied", "denied", http_status=403, transient=False)
        await real(key)
        deleted.append(key)

    monkeypatch.setattr(store, "delete", delete)
    return deleted


async def test_prune_deletes_the_global_manifest_before_anything_it_lists(store, monkeypatch):
    made = await make_job(store)
    found = await prune.survey(store, P, J)
    assert found.multi_node and [c.name for c in found.checkpoints] == [".", *COMMITTED]
    decisions = retention.plan(found.checkpoints, retention.Rules(keep_last=2), stored_ranks=found.stored_ranks)
    assert [d.name for d in decisions if d.delete] == ["step-10"]
    deleted = record_deletes(store, monkeypatch)
    freed = await prune.execute(pruner(store), found, decisions)
    assert [(f.checkpoint, f.ranks, f.files) for f in freed] == [("step-10", [0, 1], 3)]
    ours = [k for k in deleted if "/pruning/" not in k]
    assert ours[0] == layout.global_key(P, J, "step-10")  # first, before any part, tombstone or file
    assert set(ours[1:3]) == {layout.manifest_key(P, J, r, "step-10") for r in (0, 1)}
    assert set(ours[3:]) == {f["key"] for f in made.wholes["step-10"]["files"]}
    assert not [k for k in await keys(store) if "step-10" in k and "/pruned/" not in k]
    assert await keys(store, "pruned/") == [prune.tombstone_key(P, J, r, "step-10") for r in (0, 1)]
    assert [c.name for c in (await jobview.view(store, P, J)).committed] == [".", "step-20", "step-30"]
    assert await lies(store) == []


async def test_a_prune_stopped_after_the_global_manifest_is_finished_by_the_next(store, monkeypatch):
    made = await make_job(store)
    found = await prune.survey(store, P, J)
    decisions = retention.plan(found.checkpoints, retention.Rules(keep_last=2), stored_ranks=found.stored_ranks)
    deleted = record_deletes(store, monkeypatch, fail_after=1)
    with pytest.raises(StorageError, match="AccessDenied"):
        await prune.execute(pruner(store), found, decisions)
    monkeypatch.undo()  # the store works again
    assert deleted == [layout.global_key(P, J, "step-10")]
    # Not committed any more (restore no longer sees it), every file still there: no lie at any point.
    view = await jobview.view(store, P, J)
    assert view.global_state("step-10") == jobview.WAITING and view.part_ranks("step-10") == [0, 1]
    assert await lies(store) == []
    assert await keys(store, "pruning/") == [prune.record_key(P, J, r, "step-10") for r in (0, 1)]

    again = await prune.survey(store, P, J)
    assert [(i.rank, again.action(i, now)) for i, now in again.interrupted] == [(0, prune.FINISH), (1, prune.FINISH)]
    decisions = retention.plan(again.checkpoints, retention.Rules(keep_last=2), stored_ranks=again.stored_ranks)
    assert {d.name: d.reasons for d in decisions}["step-10"] == (retention.UNCOMMITTED,)  # the records finish it
    freed = await prune.execute(pruner(store), again, decisions)
    assert [(f.checkpoint, f.ranks) for f in freed] == [("step-10", [0]), ("step-10", [1])]
    assert not [k for k in await keys(store) if "step-10" in k and "/pruned/" not in k]
    assert {k for k in await keys(store) if "step-20" in k} >= {f["key"] for f in made.wholes["step-20"]["files"]}


async def test_records_left_before_the_global_manifest_went_finish_it_first(store, monkeypatch):
    made = await make_job(store)
    for rank in (0, 1):  # a prune that wrote its records and stopped
        record = {"checkpoint": "step-20", "rank": rank, "committed_at": made.parts["step-20"][rank]["committed_at"]}
        await store.put(prune.record_key(P, J, rank, "step-20"), json_bytes(record))
    found = await prune.survey(store, P, J)
    assert [c.name for c in found.checkpoints] == [".", "step-10", "step-30"]  # being deleted: not a candidate
    deleted = record_deletes(store, monkeypatch)
    await prune.execute(pruner(store), found, [])
    assert deleted[0] == layout.global_key(P, J, "step-20")
    assert not [k for k in await keys(store) if "step-20" in k and "/pruned/" not in k]
    assert await lies(store) == []


async def test_a_record_of_one_rank_only_still_takes_the_global_manifest_first(store, monkeypatch):
    made = await make_job(store)
    record = {"checkpoint": "step-20", "rank": 1, "committed_at": made.parts["step-20"][1]["committed_at"]}
    await store.put(prune.record_key(P, J, 1, "step-20"), json_bytes(record))  # stopped between two records
    deleted = record_deletes(store, monkeypatch)
    await prune.execute(pruner(store), await prune.survey(store, P, J), [])
    assert deleted[0] == layout.global_key(P, J, "step-20")
    assert await lies(store) == []
    # Rank 0's share is left as parts without a global manifest: not committed, kept by the rules.
    view = await jobview.view(store, P, J)
    assert (view.global_state("step-20"), view.part_ranks("step-20")) == (jobview.WAITING, [0])
    found = await prune.survey(store, P, J)
    decisions = plan(found.checkpoints, retention.Rules(keep_last=1), found.stored_ranks)
    assert decisions["step-20"].reasons == (retention.UNCOMMITTED,)


async def test_delete_job_deletes_the_global_manifests_before_the_parts_and_files(store, monkeypatch):
    await make_job(store)
    deleted = record_deletes(store, monkeypatch)
    await pruner(store).delete_job()
    assert await keys(store) == []
    wholes = [i for i, k in enumerate(deleted) if k.startswith(layout.global_prefix(P, J))]
    parts = [i for i, k in enumerate(deleted) if "/manifests/rank-" in k]
    files = [i for i, k in enumerate(deleted) if layout.parse_file_key(k) is not None]
    assert len(wholes) == 3 and max(wholes) < min(parts) and max(parts) < min(files)


async def test_a_single_node_job_is_pruned_as_before(tmp_path):
    store = LocalStorage(tmp_path / "store")
    await jobmeta.ensure_job(store, P, J, 1)
    for i in (1, 2):
        await save_part(store, 0, f"step-{i}", at=i)
    view = await jobview.view(store, P, J)
    assert (view.multi_node, view.parts, [c.whole for c in view.committed]) == (False, {}, [None, None])
    found = await prune.survey(store, P, J)
    assert not found.multi_node
    decisions = retention.plan(found.checkpoints, retention.Rules(keep_last=1), stored_ranks=found.stored_ranks)
    freed = await prune.execute(prune.Pruner(store, P, J, deadline=Deadline.after(30)), found, decisions)
    assert [(f.checkpoint, f.ranks) for f in freed] == [("step-1", [0])]
