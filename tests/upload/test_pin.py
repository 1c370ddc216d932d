"""Pinning keeps a completed file's content through deletion and replacement of its path."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

import pytest

from daemon.upload import scan
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
    assert p.copied is None and os.stat(staging / p.stage).st_ino == os.stat(f).st_ino  # a link, not a copy
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


# -- nothing outside the folder, nothing but regular files (issue 10, defects 1 and 3) ---------------


def outside_secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside secret")
    return outside


def make_root(tmp_path: Path) -> tuple[Path, Staging]:
    root = tmp_path / "ckpt"
    (root / ".ckptd" / "staging").mkdir(parents=True)
    return root, Staging(str(root / ".ckptd" / "staging"))


@pytest.mark.parametrize(
    "relpath",
    ["etc/secret", "ckpt-1/etc/secret", "loop/loop/etc/secret"],
    ids=["link-below-root", "link-deeper", "link-loop"],
)
def test_no_link_below_the_root_is_followed_to_pin(tmp_path, relpath):
    # O_NOFOLLOW on the path would check only the last component: the walk checks every one.
    outside = outside_secret(tmp_path)
    root, staging = make_root(tmp_path)
    (root / "ckpt-1").mkdir()
    for folder in (root, root / "ckpt-1"):
        os.symlink(outside, folder / "etc")
    os.symlink(".", root / "loop")
    assert os.path.exists(root / relpath)  # the path does lead to the secret
    assert staging.pin(str(root / relpath), relpath) is None
    assert staging.names() == []
    assert scan.probe(str(root), relpath).kind == scan.SYMLINK


def test_the_root_itself_may_be_a_link(tmp_path):
    # The configured folder is trusted as given (a mount point behind a link is common).
    real, _ = make_root(tmp_path)
    (real / "a.bin").write_bytes(b"abc")
    os.symlink(real, tmp_path / "via-link")
    p = Staging(str(real / ".ckptd" / "staging")).pin(str(tmp_path / "via-link" / "a.bin"), "a.bin")
    assert p is not None and p.stage is not None and content(p) == b"abc"
    p.release()


def make_fifo(path: Path) -> None:
    os.mkfifo(path)


def make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))  # the inode stays after close


def make_char_device(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers; the test runs as root


@pytest.mark.parametrize(
    ("make", "what"),
    [(make_fifo, "fifo"), (make_socket, "socket"), (make_char_device, "character device")],
    ids=["fifo", "socket", "char-device"],
)
def test_non_regular_files_are_never_opened(tmp_path, make, what):
    root, staging = make_root(tmp_path)
    make(root / "odd")
    assert scan.probe(str(root), "odd") == scan.Found(scan.NOT_REGULAR, what=what)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(staging.pin(str(root / "odd"), "odd")), daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # blocked in open(): release it, then fail
        os.close(os.open(root / "odd", os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail(f"pinning a {what} blocked")
    assert result == [None] and staging.names() == []


def test_a_pin_survives_its_path_being_replaced_by_a_link(tmp_path):
    # Pinned from the opened descriptor: a link planted at the path afterwards changes nothing.
    outside = outside_secret(tmp_path)
    root, staging = make_root(tmp_path)
    (root / "model.bin").write_bytes(b"weights")
    p = staging.pin(str(root / "model.bin"), "model.bin")
    os.unlink(root / "model.bin")
    os.symlink(outside / "secret", root / "model.bin")
    assert content(p) == b"weights" and p.current() == p.identity
    again = staging.pin(str(root / "model.bin"), "model.bin")
    assert again is None
    p.release()


def content(pin) -> bytes:
    fd = pin.open()
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)
