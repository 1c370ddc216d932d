"""The short reliability run, in the default suite: every scenario of catalog.py a few times against
a real `ckptd` (real files, signals, moto behind the fault proxy), each trial checked byte by byte.

A failure names the seed; `.venv/bin/python -m tests.reliability --scenario NAME --seed S
--only-trial I` replays the trial (CKPTD_TRIAL_SEED fixes the seed of this module).
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from reliability.catalog import SCENARIOS
from reliability.runner import base_folder, run_scenario

KIND = "integration"
SEED = int(os.environ.get("CKPTD_TRIAL_SEED") or random.randrange(1 << 31))
SLOW = {"lost-inotify"}  # tens of seconds: thousands of files


@pytest.fixture(scope="module")
def base():
    path = base_folder()
    failed: list[str] = []
    yield path, failed
    if not failed:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    "scenario",
    [pytest.param(s, id=s.name, marks=[pytest.mark.slow] if s.name in SLOW else []) for s in SCENARIOS],
)
def test_scenario(scenario, base, request):
    folder, failed = base
    tally = run_scenario(scenario, SEED, False, lambda kind: request.getfixturevalue(f"{kind}_server"), folder,
                         say=lambda line: None)  # fmt: skip
    lines = []
    for f in tally.failures:
        failed.append(f.workdir)
        lines.append(f"trial {f.index}, kept in {f.workdir}; replay: .venv/bin/python -m tests.reliability "
                     f"--scenario {scenario.name} --seed {SEED} --only-trial {f.index}")  # fmt: skip
        lines += ["    " + v.replace("\n", "\n    ") for v in f.violations[:6]]
    assert not tally.failures, f"{scenario.about}\n" + "\n".join(lines)
    assert tally.trials == scenario.trials[0]
