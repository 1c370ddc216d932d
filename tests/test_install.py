"""`pip install .` into an empty virtual environment gives a working `ckptd` and `python -m daemon`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

KIND = "slow"

REPO = Path(__file__).resolve().parent.parent


def test_pip_install_into_empty_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, ckptd = venv / "bin" / "python", venv / "bin" / "ckptd"
    # Build from a copy so the install cannot pick up this checkout's build leftovers.
    subprocess.run(["git", "clone", "-q", str(REPO), str(tmp_path / "src")], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(tmp_path / "src")],
        check=True,
        timeout=600,
    )

    out = subprocess.run([str(ckptd), "--help"], capture_output=True, text=True, check=True)
    assert "watch" in out.stdout and "restore" in out.stdout
    out = subprocess.run([str(ckptd), "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("ckptd 0.")
    out = subprocess.run([str(py), "-m", "daemon", "--help"], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "usage: ckptd" in out.stdout
