"""Pinning keeps a completed file's content through deletion and replacement of its path."""

from __future__ import annotations

import os

from daemon.upload.pin import adopt, pin


def test_pinned_content_survives_deletion(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    f = tmp_path / "checkpoint-1" / "model.bin"
    f.parent.mkdir()
    f.write_bytes(b"weights")
    p = pin(str(f), "checkpoint-1/model.bin", str(staging))
    assert p is not None and p.stage is not None and p.fd is None
    os.unlink(f)
    os.rmdir(f.parent)  # rotation deletes the whole folder
    fd = p.open()
    assert os.pread(fd, 100, 0) == b"weights"
    os.close(fd)
    p.release()
    assert os.listdir(staging) == []


def test_vanished_and_non_regular_files_are_not_pinned(tmp_path):
    (tmp_path / "staging").mkdir()
    assert pin(str(tmp_path / "absent"), "absent", str(tmp_path / "staging")) is None
    os.symlink("/etc/hostname", tmp_path / "link")
    assert pin(str(tmp_path / "link"), "link", str(tmp_path / "staging")) is None


def test_falls_back_to_a_descriptor_when_links_are_impossible(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    p = pin(str(f), "a.bin", str(tmp_path / "no-such-staging-dir"))
    assert p is not None and p.stage is None and p.fd is not None
    os.unlink(f)
    fd = p.open()
    assert os.pread(fd, 10, 0) == b"abc"
    os.close(fd)
    p.release()


def test_adopt_a_pin_left_by_an_earlier_run(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    first = pin(str(f), "a.bin", str(staging))
    again = adopt("a.bin", first.stage, str(staging))
    assert again is not None and again.identity == first.identity
    assert adopt("a.bin", "missing", str(staging)) is None
