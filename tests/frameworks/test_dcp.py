"""PyTorch Distributed Checkpoint through `ckptd run`, end to end on the JuiceFS gateway.

tests/frameworks/trainers/dcp_train.py is a user's script, started with torchrun: two processes
(gloo) save a replicated model, its optimizer state and a table sharded across the ranks (a
DTensor) with `dcp.save` to $BT_CHECKPOINT_DIR/step-N, and `dcp.load` the newest restored step.
Each rank writes its own `.distcp` shard; the coordinator writes `.metadata` last.
"""

from __future__ import annotations

import sys

from fwkit import (
    DCP_TORCHRUN,
    assert_equal_states,
    checkpoints_of,
    latest_of,
    manifest_files,
    manifests_listed,
    of_checkpoint,
    require,
    stored_files,
    stored_json,
)

KIND = "slow"

SHARDS = {".metadata", "__0_0.distcp", "__1_0.distcp"}


def test_sharded_saves_commit_on_metadata_and_load_exactly_in_the_next_job(ckptd_job, juicefs_bucket):
    require("torch")
    import torch

    a = ckptd_job(juicefs_bucket, "dcp-a", DCP_TORCHRUN, env={"DCP_STEPS": "3"})
    assert a.wait() == 0, a.daemon.tail()
    stored = stored_files(juicefs_bucket, "dcp-a")
    assert checkpoints_of(stored) == {"step-1", "step-2", "step-3"}
    for n in (1, 2, 3):
        cp = f"step-{n}"
        assert of_checkpoint(stored, cp) == a.local_files(cp)
        assert {p.split("/", 1)[1] for p in of_checkpoint(stored, cp)} == SHARDS
        manifest = stored_json(juicefs_bucket, "dcp-a", f"manifests/rank-0/{cp}.json")
        assert (manifest["checkpoint"], manifest["step"], manifest["reason"]) == (cp, n, "marker")
        assert manifest_files(manifest) == of_checkpoint(stored, cp)  # .metadata and both shards
    # Committed only once .metadata was stored: each commit comes after that upload in ckptd's log.
    events = [(e["event"], e.get("path") or e.get("checkpoint")) for e in a.daemon.events()]
    for n in (1, 2, 3):
        assert events.index(("uploaded", f"step-{n}/.metadata")) < events.index(("checkpoint committed", f"step-{n}"))

    # A new job restores the latest checkpoint of that job; both ranks load it and train on.
    b = ckptd_job(juicefs_bucket, "dcp-b", DCP_TORCHRUN, refs=[latest_of(job_id="dcp-a")], env={"DCP_STEPS": "4"})
    assert b.wait() == 0, b.daemon.tail()
    assert b.restored_files() == a.local_files("step-3")
    for rank in (0, 1):
        assert b.result(f"result-rank-{rank}.json") == {"resumed_from": "step-3", "step": 4}
        saved = torch.load(a.out / f"saved-rank-{rank}.pt", weights_only=True)
        loaded = torch.load(b.out / f"loaded-rank-{rank}.pt", weights_only=True)
        assert_equal_states(saved, loaded, f"rank {rank}")
        assert int(loaded["step"]) == 3 and loaded["optim"]["state"], "a trained state, not a fresh one"
    tables = [torch.load(a.out / f"saved-rank-{r}.pt", weights_only=True)["table"] for r in (0, 1)]
    assert not torch.equal(tables[0], tables[1])  # each rank's shard is its own
    assert manifests_listed(juicefs_bucket, "dcp-b") == ["step-4.json"]


def test_shards_without_metadata_are_stored_but_never_committed_nor_restored(ckptd_job, juicefs_bucket):
    require("torch")
    # Both ranks write their shard of step-2, then the coordinator is killed before `.metadata`.
    a = ckptd_job(juicefs_bucket, "dcp-cut", DCP_TORCHRUN, env={"DCP_STEPS": "3", "DCP_DIE_AT": "2"})
    assert a.wait() == 1, a.daemon.tail()  # torchrun's exit code for a failed worker
    half = a.local_files("step-2")
    assert {p.split("/", 1)[1] for p in half} == {"__0_0.distcp", "__1_0.distcp"}
    stored = stored_files(juicefs_bucket, "dcp-cut")
    assert checkpoints_of(stored) == {"step-1", "step-2"}
    assert of_checkpoint(stored, "step-2") == half  # stored: nothing written is lost
    assert manifests_listed(juicefs_bucket, "dcp-cut") == ["step-1.json"]  # never committed

    # Restoring the job's latest gives step-1, never the incomplete step-2.
    b = ckptd_job(juicefs_bucket, "dcp-cut-next", [sys.executable, "-c", "pass"], refs=[latest_of(job_id="dcp-cut")])
    assert b.wait() == 0, b.daemon.tail()
    assert b.restored_files() == a.local_files("step-1")
