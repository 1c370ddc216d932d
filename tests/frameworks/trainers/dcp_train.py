"""A PyTorch Distributed Checkpoint (DCP) job written the way a user writes one for ckptd
(docs/frameworks.md): every step, `dcp.save` to $BT_CHECKPOINT_DIR/step-N; at start, `dcp.load` the
newest step-N that ckptd restored under $BT_LOAD_CHECKPOINT_DIR/rank-$BT_NODE_RANK.

Under torchrun (several processes, gloo) a model replicated on every rank, its optimizer state, and
a table sharded across ranks (a DTensor, one shard per rank) are saved: each rank writes its own
`.distcp` file and the coordinator writes `.metadata` last. Run as a plain process (one per node
in the multi-node test), it saves the same kind of state on its own, seeded by its node rank.

Test knobs (environment): DCP_STEPS (default 3), the step training stops at; TRAINER_OUT, a folder
outside the checkpoint folder where each rank writes, with torch.save, the state it saved last
(saved-rank-R.pt), the state it loaded (loaded-rank-R.pt) and result-rank-R.json;
DCP_DIE_AT=N: every rank writes its shard of step-N, then the coordinator dies of SIGKILL before
.metadata (a crash in the middle of a save).
"""

import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from dcp_common import resume, state_of, train_step

distributed = "LOCAL_RANK" in os.environ  # started by torchrun
if distributed:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
else:
    rank, world = int(os.environ.get("BT_NODE_RANK", "0")), 1  # one process per node
node = os.environ.get("BT_NODE_RANK", "0")
save_root = Path(os.environ["BT_CHECKPOINT_DIR"])
load_root = Path(os.environ.get("BT_LOAD_CHECKPOINT_DIR", "/nonexistent")) / f"rank-{node}"
out = Path(os.environ["TRAINER_OUT"]) if os.environ.get("TRAINER_OUT") else None


class DieBeforeMetadata(dcp.FileSystemWriter):
    """Test instrumentation: shards are written by every rank, then the coordinator dies in finish()."""

    def finish(self, metadata, results):
        os.kill(os.getpid(), signal.SIGKILL)


def table() -> torch.Tensor:
    """A table sharded across the ranks (a DTensor) under torchrun, a plain tensor otherwise."""
    full = torch.zeros(8 * world, 4)
    if not distributed:
        return full
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    return distribute_tensor(full, init_device_mesh("cpu", (world,)), [Shard(0)])


def plain(value):
    """What a rank holds, as plain tensors (a DTensor's local shard), for the test to compare."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if hasattr(value, "to_local"):
        return value.to_local().clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


def main() -> None:
    torch.manual_seed(100 + rank if not distributed else 100)  # replicas agree; nodes differ
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    emb = table()
    step = torch.tensor(0)
    extra = {"table": emb, "step": step}

    resumed_from = resume(model, optimizer, extra, load_root)
    if resumed_from and out:
        torch.save(plain(state_of(model, optimizer, extra)), out / f"loaded-rank-{rank}.pt")
    start = int(step)
    print(
        f"dcp_train.py rank {rank}: {'resuming from ' + resumed_from if resumed_from else 'from scratch'}", flush=True
    )

    generator = torch.Generator().manual_seed(7 + start)
    for n in range(start + 1, int(os.environ.get("DCP_STEPS", "3")) + 1):
        train_step(model, optimizer, generator)
        local = emb.to_local() if hasattr(emb, "to_local") else emb
        local += n * (rank + 1)  # this rank's shard: different on every rank
        step.fill_(n)
        state = state_of(model, optimizer, extra)
        folder = save_root / f"step-{n}"
        dying = DieBeforeMetadata(str(folder)) if os.environ.get("DCP_DIE_AT") == str(n) else None
        dcp.save(state, checkpoint_id=str(folder), storage_writer=dying)
        if out:
            torch.save(plain(state), out / f"saved-rank-{rank}.pt")
    if out:
        (out / f"result-rank-{rank}.json").write_text(json.dumps({"resumed_from": resumed_from, "step": int(step)}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
