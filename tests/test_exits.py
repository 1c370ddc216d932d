"""Exit codes (SPEC §5): the tables of daemon/exits.py, row by row."""

from __future__ import annotations

import signal
import subprocess

import pytest

from daemon import exits

KIND = "unit"


# The module docstring's table: code -> what it names.
@pytest.mark.parametrize(
    "code, constant",
    [
        (0, exits.OK),
        (1, exits.FAILED),
        (2, exits.CONFIG),
        (3, exits.RESTORE),
        (4, exits.NOT_STORED),
        (5, exits.PLANNED),
        (126, exits.NOT_EXECUTABLE),
        (127, exits.NOT_FOUND),
    ],
)
def test_exit_code_table(code: int, constant: int):
    assert constant == code


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGKILL, 137), (signal.SIGTERM, 143)])
def test_signalled_is_128_plus_n(signum: int, code: int):
    assert exits.signalled(signum) == code


@pytest.mark.parametrize(
    "returncode, status",
    [
        (0, 0),  # success
        (3, 3),  # the trainer's own code
        (-9, 137),  # killed by SIGKILL (9)
        (-15, 143),  # terminated by SIGTERM
    ],
)
def test_of_process_table(returncode: int, status: int):
    assert exits.of_process(returncode) == status


@pytest.mark.integration
@pytest.mark.parametrize("script, status", [("exit 0", 0), ("exit 3", 3), ("kill -9 $$", 137), ("kill -15 $$", 143)])
def test_of_process_of_real_children(script: str, status: int):
    assert exits.of_process(subprocess.run(["/bin/sh", "-c", script], check=False).returncode) == status


@pytest.mark.parametrize(
    "trainer_status, stored_all, code",
    [
        (0, True, 0),  # all good
        (0, False, 4),  # training worked, its checkpoints are not safe
        (3, True, 3),  # the trainer's own failure
        (3, False, 3),  # the trainer's failure is the first news
        (137, True, 137),  # killed by signal 9 ("any")
        (137, False, 137),
    ],
)
def test_of_run_table(trainer_status: int, stored_all: bool, code: int):
    assert exits.of_run(trainer_status, stored_all) == code


@pytest.mark.parametrize("stored_all, code", [(True, 0), (False, 4)])  # SPEC §5: `watch` exits 0 or 4
def test_of_watch(stored_all: bool, code: int):
    assert exits.of_watch(stored_all) == code
