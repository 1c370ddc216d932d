"""The completeness rule (truth table) and the /proc view of files open for writing."""

from __future__ import annotations

import os

import pytest

from daemon.config.schema import DEFAULT_IGNORE
from daemon.upload.complete import Identity, Verdict, files_open_for_write, is_ignored, judge

KIND = "unit"

A = Identity(1, 10, 100, 5)
B = Identity(1, 10, 200, 6)


@pytest.mark.parametrize(
    "before, now, writing, quiet, verdict",
    [
        (A, None, False, 9.0, Verdict.VANISHED),
        (A, A, True, 9.0, Verdict.WAIT),
        (A, B, False, 9.0, Verdict.WAIT),
        (A, A, False, 0.1, Verdict.WAIT),
        (A, A, False, 0.2, Verdict.COMPLETE),
    ],
)
def test_judge_truth_table(before, now, writing, quiet, verdict):
    assert judge(before=before, now=now, open_for_write=writing, quiet_for=quiet, settle=0.2) is verdict


@pytest.mark.parametrize(
    "relpath, ignored",
    [
        ("checkpoint-5/model.safetensors", False),
        ("checkpoint-5/model.safetensors.tmp", True),
        ("checkpoint-5/shard.part", True),
        ("tmp-checkpoint-7/model.safetensors", True),  # a temporary folder hides its files
        (".ckptd/journal-rank-0.jsonl", True),
        ("checkpoint-5/.model.swp", True),
        ("checkpoint-5/notes.txt~", True),
        ("checkpoint-5/.metadata", False),
        ("checkpoint-5/x.lock", True),
        ("checkpoint-10/.tmpJuouX0", True),  # Rust's tempfile crate, renamed into place once written
    ],
)
def test_ignore_patterns(relpath, ignored):
    assert is_ignored(relpath, DEFAULT_IGNORE) is ignored


def test_files_open_for_write_sees_writers_not_readers(tmp_path):
    written, read = tmp_path / "w.bin", tmp_path / "r.bin"
    read.write_bytes(b"x")
    with open(written, "wb") as w, open(read, "rb"):
        w.write(b"data")
        open_now = files_open_for_write()
        st_w, st_r = os.stat(written), os.stat(read)
        assert (st_w.st_dev, st_w.st_ino) in open_now
        assert (st_r.st_dev, st_r.st_ino) not in open_now
    st = os.stat(written)
    assert (st.st_dev, st.st_ino) not in files_open_for_write()
