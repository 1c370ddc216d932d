"""What both DCP trainers do alike (dcp_train.py, dcp_nodes_train.py): the state they save, the
resume from the newest step ckptd restored, and one training step. Imported as a sibling module:
the scripts run in place, so their folder is on sys.path."""

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def state_of(model, optimizer, extra: dict) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, **extra}


def resume(model, optimizer, extra: dict, load_root: Path) -> str | None:
    """`dcp.load` the newest step-N under `load_root` into the model, the optimizer and `extra`'s
    tensors (in place); the step's folder name, or None when there is none."""
    steps = sorted(load_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if load_root.is_dir() else []
    if not steps:
        return None
    # Optimizer state exists only after a step: take one so there is state to load into.
    model(torch.zeros(1, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    state = state_of(model, optimizer, extra)
    dcp.load(state, checkpoint_id=str(steps[-1]))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return steps[-1].name


def train_step(model, optimizer, generator: torch.Generator) -> None:
    x = torch.randn(16, 4, generator=generator)
    (model(x) - x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
