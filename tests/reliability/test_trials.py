"""The short reliability run, in the default suite: every scenario of catalog.py a few times against
a real `ckptd` (real files, signals, moto behind the fault proxy), each trial checked byte by byte.

The selected scenarios run once, three at a time, in a module fixture (about two minutes in all,
hence `slow`); each test reports its own scenario. A failure names the seed, and
`.venv/bin/python -m tests.reliability --scenario NAME --seed S --only-trial I` replays the trial
(CKPTD_TRIAL_SEED fixes the seed of this module).
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator

import pytest

from reliability.catalog import SCENARIOS
from reliability.runner import Tally, base_folder, run_many

KIND = "slow"
SEED = int(os.environ.get("CKPTD_TRIAL_SEED") or random.randrange(1 << 31))
JOBS = 3


@pytest.fixture(scope="module")
def tallies(request) -> Iterator[dict[str, Tally]]:
    selected = [i.callspec.params["scenario"] for i in request.session.items if i.originalname == "test_scenario"]
    kinds = {s.store_for(False) for s in selected} - {"file"}
    servers = {kind: request.getfixturevalue(f"{kind}_server") for kind in kinds}  # here, not in the pool's threads
    base = base_folder()
    found = run_many(selected, SEED, False, servers.__getitem__, base, JOBS, say=lambda line: None)
    yield found
    if not any(t.failures for t in found.values()):
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(900)  # the first test waits for the whole run
@pytest.mark.parametrize("scenario", [pytest.param(s, id=s.name) for s in SCENARIOS])
def test_scenario(scenario, tallies):
    tally = tallies[scenario.name]
    lines = []
    for f in tally.failures:
        lines.append(f"trial {f.index}, kept in {f.workdir}; replay: .venv/bin/python -m tests.reliability "
                     f"--scenario {scenario.name} --seed {SEED} --only-trial {f.index}")  # fmt: skip
        lines += ["    " + v.replace("\n", "\n    ") for v in f.violations[:6]]
    assert not tally.failures, f"{scenario.about}\n" + "\n".join(lines)
    assert tally.trials == scenario.trials[0]
