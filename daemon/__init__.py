"""ckptd: restore checkpoints, supervise the trainer, upload every completed checkpoint file."""

__version__ = "0.1.0"
