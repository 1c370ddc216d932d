"""A job made for the user CLI's tests the way users make one: `ckptd run` on two ranks, each
saving several Hugging Face style checkpoints with safetensors weights and eval_loss, and a
tokenizer at the top of its checkpoint folder (tests/trainers/eval_trainer.py).

    job = make_job(bucket)                   # job id "trained", ranks 0 and 1, steps 10..40
    out = job.cli("ls", "--job", job.job_id, "--json")
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from daemons import PREFIX, PROJECT, Daemon, base_env, s3_args
from servers import S3Bucket

TRAINER = str(Path(__file__).resolve().parent.parent / "trainers" / "eval_trainer.py")
STEPS = (10, 20, 30, 40)
LOSSES = (0.9, 0.5, 0.7, 0.6)  # best two by eval_loss (min): 20 and 40; latest: 40


@dataclass
class TrainedJob:
    bucket: S3Bucket
    job_id: str
    ranks: int
    steps: tuple[int, ...]
    losses: tuple[float, ...]
    written: dict[int, dict[str, str]] = field(default_factory=dict)  # rank -> relpath -> sha256
    project: str = PROJECT

    @property
    def storage_args(self) -> list[str]:
        return s3_args(self.bucket)

    @property
    def env(self) -> dict[str, str]:
        return {**base_env(), **self.bucket.server.env()}

    def key(self, rank: int, relpath: str) -> str:
        return f"{PREFIX}/training_projects/{self.project}/jobs/{self.job_id}/rank-{rank}/{relpath}"

    def cli(self, *args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """`ckptd ARGS` against this job's store and project, as a user runs it."""
        command, rest = args[0], list(args[1:])
        return subprocess.run(
            [sys.executable, "-m", "daemon", command, *self.storage_args, "--project", self.project, *rest],
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def make_job(
    bucket: S3Bucket,
    folder: Path,
    job_id: str = "trained",
    *,
    ranks: int = 2,
    steps: tuple[int, ...] = STEPS,
    losses: tuple[float, ...] = LOSSES,
    size: int = 40_000,
) -> TrainedJob:
    """Run `ckptd run` for every rank of a new job, one after the other, and wait for each to drain."""
    job = TrainedJob(bucket, job_id, ranks, steps, losses)
    for rank in range(ranks):
        where = folder / f"{job_id}-rank-{rank}"
        where.mkdir(parents=True)
        args = [
            "run",
            *s3_args(bucket),
            "--project",
            PROJECT,
            "--job-id",
            job_id,
            "--node-rank",
            str(rank),
            "--group-size",
            str(ranks),
            "--checkpoint-dir",
            str(where / "ckpt"),
            "--settle-time",
            "0.05",
            "--metrics-addr",
            "127.0.0.1:0",
            "--drain-timeout",
            "60",
            "--",
            sys.executable,
            TRAINER,
        ]
        env = {
            **job.env,
            "TRAINER_STEPS": ",".join(map(str, steps)),
            "TRAINER_LOSSES": ",".join(map(str, losses)),
            "TRAINER_SIZE": str(size),
            "TRAINER_RECORD": str(where / "record.json"),
        }
        daemon = Daemon(args, env, where / "ckptd.log")
        try:
            code = daemon.wait(180)
        finally:
            daemon.kill()
        assert code == 0, daemon.tail()
        job.written[rank] = json.loads((where / "record.json").read_text())
    return job
