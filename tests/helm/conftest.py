"""Fixtures of the chart tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """Where a simulated pod keeps its volumes and logs (tests/helm/podsim.py). Not under pytest's
    0700 folder: the containers run as the users the manifest names."""
    root = Path(tempfile.mkdtemp(prefix="ckptd-pod-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)
