"""A real `ckptd watch` whose journal is garbage (issue 10, defect 8): it used to exit 1 with a
traceback on every start. Now it starts, sets the journal aside, recovers from the store's
manifests as a new pod would, uploads only what the store does not hold, and exits 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from daemons import Daemon, base_env, manifests, stored_objects, watch_args

KIND = "integration"

SET_ASIDE = "journal corrupt: set aside, recovering from the store's manifests"


def start(bucket, ckpt: Path, tmp_path: Path, n: int) -> Daemon:
    exit_file = tmp_path / f"exit-{n}"
    d = Daemon(watch_args(bucket, ckpt, exit_file), {**base_env(), **bucket.server.env()}, tmp_path / f"watch-{n}.log")
    d.exit_file = exit_file
    d.wait_event("watching")
    return d


def write(root: Path, files: dict[str, bytes]) -> None:
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)


def test_a_garbage_journal_is_set_aside_and_only_what_the_store_lacks_is_uploaded(moto_bucket, tmp_path: Path):
    ckpt = tmp_path / "ckpt"
    first = {"checkpoint-1/model.bin": os.urandom(300_000), "checkpoint-1/config.json": b'{"layers": 2}'}
    write(ckpt, first)
    d = start(moto_bucket, ckpt, tmp_path, 0)
    try:
        for relpath in first:
            d.wait_event("uploaded", where=lambda e, r=relpath: e["path"] == r)
        d.exit_file.touch()
        assert d.wait(60) == 0
    finally:
        d.kill()
    assert sorted(manifests(moto_bucket)) == ["checkpoint-1"]

    journal = ckpt / ".ckptd" / "journal-rank-0.jsonl"
    garbage = b"\x00\xff\xfe not a journal \x80\n" * 50 + os.urandom(2048) + b"\n"
    journal.write_bytes(garbage)
    second = {"checkpoint-2/model.bin": os.urandom(200_000)}
    write(ckpt, second)
    d = start(moto_bucket, ckpt, tmp_path, 1)
    try:
        d.wait_event("uploaded", where=lambda e: e["path"] == "checkpoint-2/model.bin")
        d.exit_file.touch()
        assert d.wait(60) == 0, d.tail()
    finally:
        d.kill()

    [aside] = d.events(SET_ASIDE)
    assert aside["line"] == 1 and aside["reason"] == "not UTF-8"
    assert Path(aside["moved_to"]).read_bytes() == garbage  # kept for a post-mortem
    assert [e["files"] for e in d.events("reconciled with stored manifests")] == [2]
    assert [e["path"] for e in d.events("uploaded")] == ["checkpoint-2/model.bin"]  # nothing stored twice
    assert stored_objects(moto_bucket) == {**first, **second}
    assert sorted(manifests(moto_bucket)) == ["checkpoint-1", "checkpoint-2"]
