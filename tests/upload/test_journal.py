"""The journal: records survive a restart, a torn last line is ignored, compaction keeps state."""

from __future__ import annotations

import os
from pathlib import Path

from daemon.upload.complete import Identity
from daemon.upload.journal import Journal, Multipart, Pinned, Stored

KIND = "unit"

ID = Identity(1, 2, 3, 4)


async def test_replay_after_restart_and_torn_line(tmp_path):
    path = str(tmp_path / "state" / "journal.jsonl")
    j = Journal(path)
    j.open()
    j.record("stored", Stored("ckpt-1/a.bin", ID, "ab" * 32, "k/a", "etag"))
    j.record("multipart", Multipart("ckpt-1/big.bin", ID, "k/big", "upload-1", 16 << 20))
    j.record("pinned", Pinned("ckpt-1/c.bin", ID, "2-4-3"))
    j.record("multipart_done", relpath="ckpt-1/big.bin")
    j.record("multipart", Multipart("ckpt-2/big.bin", ID, "k/big2", "upload-2", 16 << 20))
    await j.sync()
    with open(path, "a") as f:
        f.write('{"op":"stored","relpath":"torn')  # a crash in the middle of a line

    again = Journal(path)  # the next run, while `j` is as a crashed run left it
    state = again.open()
    assert state.stored["ckpt-1/a.bin"] == Stored("ckpt-1/a.bin", ID, "ab" * 32, "k/a", "etag")
    assert list(state.multipart) == ["ckpt-2/big.bin"]
    assert state.pinned["2-4-3"].relpath == "ckpt-1/c.bin"
    again.close()
    j.close()


def test_close_compacts(tmp_path):
    path = str(tmp_path / "journal.jsonl")
    j = Journal(path)
    j.open()
    for i in range(50):
        j.record("pinned", Pinned(f"f{i}", ID, f"s{i}"))
        j.record("unpinned", stage=f"s{i}")
    j.record("stored", Stored("kept", ID, "0" * 64, "k", "e"))
    j.close()
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 1 and '"kept"' in lines[0]
    assert os.listdir(tmp_path) == ["journal.jsonl"]  # no temporary file left behind
