"""A smoke run of the benchmark suite (benchmarks/suite): tiny sizes, one round, scenarios 1 and 2.
It proves the suite runs end to end against the real gateway and peers and writes its report; the
figures themselves mean nothing at this size. The full suite is never run by the tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KIND = "integration"
REPO = Path(__file__).resolve().parents[2]
TOOLS = ["ckptd", "s5cmd", "s5cmd-tuned", "aws"]


@pytest.mark.timeout(240)  # as root, as CI runs: the suite drops the page cache for its cold runs
def test_quick_run_writes_a_report_with_a_row_per_tool(tmp_path: Path) -> None:
    report = tmp_path / "report" / "benchmarks.md"
    argv = [sys.executable, "-m", "benchmarks.suite", "--quick", "--rounds", "1", "--only", "1,2"]
    argv += ["--report", str(report), "--work-dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-4000:]

    raw = json.loads((report.parent / "benchmarks" / "raw.json").read_text())
    for case in ("dirty", "cold", "fsynced"):
        _assert_stored(raw["scenarios"]["1"][case])
    _assert_stored(raw["scenarios"]["2"]["hf"])
    assert raw["scenarios"]["2"]["hf"][0]["files"] == 2 + 3 + 10

    text = report.read_text()
    assert "## 1. One big file" in text and "## 2. A Hugging Face-like checkpoint" in text
    for tool in TOOLS:
        assert f"| {tool} |" in text
    assert (report.parent / "benchmarks" / "scenario-1.png").stat().st_size > 1000
    # Everything the run wrote (data, the store) is gone; only the report stays.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def _assert_stored(rows: list[dict]) -> None:
    """One row per tool, none failed, and every byte of every file landed (listed in the store)."""
    assert [r["tool"] for r in rows] == TOOLS
    for row in rows:
        assert "error" not in row, row
        assert row["stored_bytes"] == row["bytes"] > 0, row
        assert row["wall"] > 0 and row["cpu"] > 0, row
