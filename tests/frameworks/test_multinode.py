"""Two nodes each saving on its own: one `ckptd run` per node (same job id, --node-rank 0/1,
--group-size 2, each its own checkpoint folder, one store), each node's trainer saving its own state
with `dcp.save` and no process group across nodes (the plain-process mode of
tests/frameworks/trainers/dcp_train.py, seeded by BT_NODE_RANK). Both nodes write `step-N/.metadata`
and `step-N/__0_0.distcp` with their own bytes: each step still commits globally, and each node
restores its own rank's files (globalmanifest.merged). One process group across nodes is
tests/frameworks/test_multinode_dcp.py.
"""

from __future__ import annotations

from fwkit import (
    DCP_TRAIN,
    assert_equal_states,
    checkpoints_of,
    latest_of,
    manifest_files,
    of_checkpoint,
    require,
    stored_files,
    stored_json,
)

KIND = "slow"


def test_each_node_stores_and_restores_its_own_rank(ckptd_job, juicefs_bucket):
    require("torch")
    import torch

    first = [ckptd_job(juicefs_bucket, "mn-a", DCP_TRAIN, rank=r, group=2, env={"DCP_STEPS": "2"}) for r in (0, 1)]
    assert [n.wait() for n in first] == [0, 0], first[0].daemon.tail() + "\n" + first[1].daemon.tail()
    for node in first:
        stored = stored_files(juicefs_bucket, "mn-a", node.rank)
        assert checkpoints_of(stored) == {"step-1", "step-2"}
        for cp in ("step-1", "step-2"):
            assert of_checkpoint(stored, cp) == node.local_files(cp)
            manifest = stored_json(juicefs_bucket, "mn-a", f"manifests/rank-{node.rank}/{cp}.json")
            assert (manifest["rank"], manifest["reason"]) == (node.rank, "marker")
            assert manifest_files(manifest) == of_checkpoint(stored, cp)
        status = stored_json(juicefs_bucket, "mn-a", f"status/rank-{node.rank}.json")
        assert status["status"] == "COMPLETED", status  # neither node's update lost
    assert stored_files(juicefs_bucket, "mn-a", 0) != stored_files(juicefs_bucket, "mn-a", 1)  # same names, own bytes

    # A new two-node job: each node gets its own rank's files, and its trainer loads its own state.
    second = [
        ckptd_job(
            juicefs_bucket, "mn-b", DCP_TRAIN, rank=r, group=2, refs=[latest_of(job_id="mn-a")], env={"DCP_STEPS": "3"}
        )
        for r in (0, 1)
    ]
    assert [n.wait() for n in second] == [0, 0], second[0].daemon.tail() + "\n" + second[1].daemon.tail()
    for old, new in zip(first, second, strict=True):
        assert sorted(p.name for p in new.loaded.glob("rank-*")) == [f"rank-{new.rank}"]
        assert new.restored_files() == old.local_files("step-2")
        assert new.result(f"result-rank-{new.rank}.json") == {"resumed_from": "step-2", "step": 3}
        saved = torch.load(old.out / f"saved-rank-{old.rank}.pt", weights_only=True)
        loaded = torch.load(new.out / f"loaded-rank-{new.rank}.pt", weights_only=True)
        assert_equal_states(saved, loaded, f"node {new.rank}")
    tables = [torch.load(n.out / f"loaded-rank-{n.rank}.pt", weights_only=True)["table"] for n in second]
    assert not torch.equal(*tables)

    # A one-node job restoring from the two-node job gets rank 0's files.
    single = ckptd_job(juicefs_bucket, "mn-c", DCP_TRAIN, refs=[latest_of(job_id="mn-a")], env={"DCP_STEPS": "2"})
    assert single.wait() == 0, single.daemon.tail()
    assert single.restored_files() == first[0].local_files("step-2")
    saved = torch.load(first[0].out / "saved-rank-0.pt", weights_only=True)
    assert_equal_states(saved, torch.load(single.out / "loaded-rank-0.pt", weights_only=True), "one node")
