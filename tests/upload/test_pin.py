"""Pinning keeps a completed file's content through deletion and replacement of its path."""

from __future__ import annotations

import os

from daemon.upload.pin import Staging

KIND = "unit"


def test_pinned_content_survives_deletion(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    f = tmp_path / "checkpoint-1" / "model.bin"
    f.parent.mkdir()
    f.write_bytes(b"weights")
    p = Staging(str(staging)).pin(str(f), "checkpoint-1/model.bin")
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
    staging = Staging(str(tmp_path / "staging"))
    assert staging.pin(str(tmp_path / "absent"), "absent") is None
    os.symlink("/etc/hostname", tmp_path / "link")
    assert staging.pin(str(tmp_path / "link"), "link") is None


def test_falls_back_to_a_descriptor_when_links_are_impossible(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    p = Staging(str(tmp_path / "no-such-staging-dir")).pin(str(f), "a.bin")
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
    first = Staging(str(staging)).pin(str(f), "a.bin")
    later = Staging(str(staging))  # the next run's
    again = later.adopt("a.bin", first.stage)
    assert again is not None and again.identity == first.identity
    assert later.adopt("a.bin", "missing") is None


def test_a_link_held_twice_goes_with_the_last_holder(tmp_path):
    staging = Staging(str(tmp_path / "staging"))
    (tmp_path / "staging").mkdir()
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    first, second = staging.pin(str(f), "a.bin"), staging.pin(str(f), "a.bin")
    assert first.stage == second.stage
    assert first.release() is False and os.listdir(tmp_path / "staging") == [second.stage]
    assert second.release() is True and os.listdir(tmp_path / "staging") == []


def test_two_staging_folders_count_their_links_apart(tmp_path):
    # Ranks (or engines in one test process) each own their counts: no process-wide table.
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    pa, pb = Staging(str(a)).pin(str(f), "x.bin"), Staging(str(b)).pin(str(f), "x.bin")
    assert pa.stage == pb.stage  # same inode version, same link name
    assert pa.release() is True and pb.release() is True
    assert os.listdir(a) == os.listdir(b) == []
