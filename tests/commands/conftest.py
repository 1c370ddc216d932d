"""Fixtures of the command tests: a job made through `ckptd run` for the user CLI to work on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from trained import TrainedJob, make_job


@pytest.fixture
def trained_job(tmp_path: Path) -> Callable[..., TrainedJob]:
    """make(bucket, job_id="trained", ranks=2, steps=..., losses=..., size=...) -> TrainedJob."""

    def make(bucket, job_id: str = "trained", **kwargs) -> TrainedJob:
        return make_job(bucket, tmp_path / "jobs", job_id, **kwargs)

    return make
