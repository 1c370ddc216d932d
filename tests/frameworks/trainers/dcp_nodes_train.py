"""A multi-node PyTorch Distributed Checkpoint (DCP) job, the way a user writes one for ckptd: every
node runs `torchrun --nnodes N --node-rank R ...` of this script (gloo); every step, all processes of
all nodes `dcp.save` one checkpoint to their own node's $BT_CHECKPOINT_DIR/step-N. Each process
(global rank G) writes its own `__G_0.distcp` into its node's folder; the coordinator (global rank 0,
on node 0) writes `.metadata` last, so node 0 holds the metadata and its shards, other nodes shards
only. At start, it `dcp.load`s the newest step-N that ckptd restored under
$BT_LOAD_CHECKPOINT_DIR/rank-$BT_NODE_RANK: a folder holding every node's files, merged, which
loads on any number of nodes and processes (DCP reshards).

State: a model replicated on every process, its optimizer state, a step counter, and a 16x4 table
sharded by rows across all processes of all nodes (a DTensor: each process holds its own rows).

Test knobs (environment):
- DCP_STEPS (default 3): the step training stops at.
- TRAINER_OUT: a folder outside the checkpoint folder where each process (global rank G) writes with
  torch.save the state it saved at step N (saved-step-N-rank-G.pt; saved-rank-G.pt: the last one)
  and the state it loaded (loaded-rank-G.pt), as full tensors (a DTensor gathered with
  `.full_tensor()`, so any world size compares), and result-rank-G.json: {"resumed_from", "step",
  "world"}.
- DCP_PG_TIMEOUT (seconds, default 30): the process-group timeout, so that a process whose peers
  died fails instead of waiting forever.
- DCP_HANG_AT=N with DCP_HANG_RANK=G: in the save of step N, global rank G hangs before writing its
  shard, while the others write theirs (a node dying in the middle of a save), until the file
  TRAINER_OUT/release-step-N-rank-G appears (at most 10 min, then it exits 1). At that step each
  process writes TRAINER_OUT/wrote-step-N-rank-G once its shard file is written and closed, and the
  hanging one TRAINER_OUT/hanging-step-N-rank-G when it starts to hang.
"""

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dcp_common import resume, state_of, train_step
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("DCP_PG_TIMEOUT", "30"))))
rank, world = dist.get_rank(), dist.get_world_size()
node = os.environ.get("BT_NODE_RANK", "0")
save_root = Path(os.environ["BT_CHECKPOINT_DIR"])
load_root = Path(os.environ.get("BT_LOAD_CHECKPOINT_DIR", "/nonexistent")) / f"rank-{node}"
out = Path(os.environ["TRAINER_OUT"]) if os.environ.get("TRAINER_OUT") else None
HANG_LIMIT = 600  # seconds: longer than any test waits on a hanging rank


class HangBeforeShard(dcp.FileSystemWriter):
    """Test instrumentation: one rank hangs before writing its shard (until released); the others
    write theirs."""

    def __init__(self, path: str, step: int, hang_rank: int) -> None:
        super().__init__(path)
        self.step, self.hang_rank = step, hang_rank

    def write_data(self, plan, planner):
        if rank == self.hang_rank:
            if out:
                (out / f"hanging-step-{self.step}-rank-{rank}").touch()
            print(f"dcp_nodes_train.py rank {rank}: hanging before writing the shard of step {self.step}", flush=True)
            release = out / f"release-step-{self.step}-rank-{rank}" if out else None
            deadline = time.monotonic() + HANG_LIMIT
            while not (release and release.exists()):
                if time.monotonic() > deadline:  # the test that set the hang is gone: do not outlive it
                    sys.exit(f"dcp_nodes_train.py rank {rank}: never released in {HANG_LIMIT} s")
                time.sleep(0.05)
        written = super().write_data(plan, planner)
        written.wait()  # the file is written and closed
        if out:
            (out / f"wrote-step-{self.step}-rank-{rank}").touch()
        return written


def full(value):
    """The state as plain full tensors (a DTensor gathered from every rank: a collective)."""
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if hasattr(value, "full_tensor"):
        return value.full_tensor().clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


def main() -> None:
    torch.manual_seed(100)  # every replica of the model agrees
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    table = distribute_tensor(torch.zeros(16, 4), init_device_mesh("cpu", (world,)), [Shard(0)])
    step = torch.tensor(0)
    extra = {"table": table, "step": step}

    resumed_from = resume(model, optimizer, extra, load_root)
    if resumed_from:
        loaded = full(state_of(model, optimizer, extra))  # a collective: every rank takes part
        if out:
            torch.save(loaded, out / f"loaded-rank-{rank}.pt")
    start = int(step)
    print(
        f"dcp_nodes_train.py rank {rank}/{world} (node {node}): "
        + (f"resuming from {resumed_from}" if resumed_from else "from scratch"),
        flush=True,
    )

    hang_at, hang_rank = os.environ.get("DCP_HANG_AT"), int(os.environ.get("DCP_HANG_RANK", "-1"))
    generator = torch.Generator().manual_seed(7 + start)
    for n in range(start + 1, int(os.environ.get("DCP_STEPS", "3")) + 1):
        train_step(model, optimizer, generator)
        table.to_local().add_(n * (rank + 1))  # this rank's rows: different on every rank
        step.fill_(n)
        state = state_of(model, optimizer, extra)
        folder = save_root / f"step-{n}"
        writer = HangBeforeShard(str(folder), n, hang_rank) if hang_at == str(n) else None
        dcp.save(state, checkpoint_id=str(folder), storage_writer=writer)
        saved = full(state)
        if out:
            torch.save(saved, out / f"saved-step-{n}-rank-{rank}.pt")
            torch.save(saved, out / f"saved-rank-{rank}.pt")
    if out:
        result = {"resumed_from": resumed_from, "step": int(step), "world": world}
        (out / f"result-rank-{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # no rank tears its connections down while another still talks to it
    dist.destroy_process_group()
    # Skip the interpreter's finalization: gloo's worker threads still referenced there (the device
    # mesh keeps its group) can end in std::terminate, a SIGABRT after the job's work is all done
    # (seen once in ~20 runs of a two-node job on a loaded 2-core machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
