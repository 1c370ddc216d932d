"""A file:// store someone has tampered with: links out of it, special files in it, racing deletes,
and JSON objects too large to read whole. Real files, links and FIFOs in a temporary store."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.catalog import jsonio
from daemon.storage import StorageError
from daemon.storage.local import LocalStorage

KIND = "unit"
SKIP_EVENT = "skipping links and special files in the store: only regular files are objects"


@pytest.fixture
async def local(tmp_path: Path) -> LocalStorage:
    async with LocalStorage(tmp_path / "store") as store:
        await store.put("rank-0/checkpoint-10/model.bin", b"stored")
        yield store


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the store, with a secret the store must never reveal."""
    folder = tmp_path / "outside"
    (folder / "checkpoint-10").mkdir(parents=True)
    (folder / "secret.txt").write_bytes(b"secret")
    (folder / "checkpoint-10" / "secret.txt").write_bytes(b"secret")
    return folder


async def keys(store: LocalStorage, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def assert_no_object(store: LocalStorage, key: str) -> None:
    """get, head and delete all answer as for a key with no file."""
    with pytest.raises(StorageError) as err:
        await asyncio.wait_for(store.get(key), timeout=5)  # a FIFO must fail the test, not hang it
    assert err.value.missing and not err.value.transient
    assert await asyncio.wait_for(store.head(key), timeout=5) is None
    await asyncio.wait_for(store.delete(key), timeout=5)


def skip_warnings(logged: list[dict]) -> list[dict]:
    return [e for e in logged if e["event"] == SKIP_EVENT]


async def test_file_link_is_not_listed_nor_read(local: LocalStorage, outside: Path) -> None:
    link = local.root / "rank-0/checkpoint-10/leak.txt"
    link.symlink_to(outside / "secret.txt")
    with capture_logs() as logged:
        assert await keys(local) == ["rank-0/checkpoint-10/model.bin"]
    [warning] = skip_warnings(logged)
    assert (warning["count"], warning["keys"]) == (1, ["rank-0/checkpoint-10/leak.txt"])
    await assert_no_object(local, "rank-0/checkpoint-10/leak.txt")
    assert link.is_symlink() and (outside / "secret.txt").read_bytes() == b"secret"  # delete left both


async def test_folder_link_is_not_a_prefix(local: LocalStorage, outside: Path) -> None:
    (local.root / "rank-0/checkpoint-77").symlink_to(outside, target_is_directory=True)
    with capture_logs() as logged:
        assert await local.list_dirs("rank-0/") == ["checkpoint-10"]
        assert await keys(local, "rank-0/") == ["rank-0/checkpoint-10/model.bin"]
        assert await keys(local, "rank-0/checkpoint-77/") == []
    assert [w["keys"] for w in skip_warnings(logged)] == [["rank-0/checkpoint-77"]] * 2  # once per listing
    await assert_no_object(local, "rank-0/checkpoint-77/secret.txt")
    assert (outside / "secret.txt").read_bytes() == b"secret"


async def test_link_to_the_file_system_root_is_not_walked(local: LocalStorage) -> None:
    (local.root / "rank-0/everything").symlink_to("/", target_is_directory=True)
    assert await keys(local) == ["rank-0/checkpoint-10/model.bin"]
    assert await keys(local, "rank-0/everything/") == []
    assert await local.list_dirs("rank-0/everything/") == []
    await assert_no_object(local, "rank-0/everything/etc/hostname")


async def test_linked_intermediate_folder_is_not_followed(local: LocalStorage, outside: Path) -> None:
    (local.root / "rank-1").symlink_to(outside, target_is_directory=True)
    assert await local.list_dirs("") == ["rank-0"]
    assert await local.list_dirs("rank-1/") == []
    assert await keys(local, "rank-1/") == []
    await assert_no_object(local, "rank-1/checkpoint-10/secret.txt")
    assert (outside / "checkpoint-10" / "secret.txt").read_bytes() == b"secret"  # delete went nowhere
    with pytest.raises(StorageError) as err:
        await local.put("rank-1/checkpoint-10/new.bin", b"x")
    assert (err.value.code, err.value.transient) == ("KeyConflict", False)
    assert not (outside / "checkpoint-10" / "new.bin").exists()


async def test_root_that_is_a_link_is_followed(tmp_path: Path) -> None:
    """The operator may name the store through a link (a mount point alias): that one is the store."""
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    async with LocalStorage(tmp_path / "alias") as store:
        await store.put("a/b", b"1")
        assert await keys(store) == ["a/b"]
        assert await store.get("a/b") == b"1"


@pytest.fixture
def fifo(local: LocalStorage) -> Iterator[Path]:
    path = local.root / "job.json"
    os.mkfifo(path)
    yield path
    release_blocked_reader(path)


def release_blocked_reader(fifo: Path) -> None:
    """Let a reader stuck opening the FIFO (the defect under test) go, so that a failing test ends:
    the event loop's shutdown waits for its worker threads, stuck or not."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # ENXIO: no reader is waiting, as it should be


async def test_fifo_is_not_an_object_and_does_not_hang(local: LocalStorage, fifo: Path) -> None:
    await assert_no_object(local, "job.json")
    assert await asyncio.wait_for(jsonio.read_object(local, "job.json"), timeout=5) is None
    with capture_logs() as logged:
        assert await keys(local) == ["rank-0/checkpoint-10/model.bin"]
    assert skip_warnings(logged)[0]["keys"] == ["job.json"]
    assert stat.S_ISFIFO(fifo.lstat().st_mode)  # delete left it alone


async def test_delete_tolerates_the_folder_pruned_by_a_concurrent_delete(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind spurious 'retrying ... IOError' during prune, made to happen every time: the
    other delete prunes the folder right after our unlink emptied it, before our fsync."""
    folder = local.root / "rank-0/checkpoint-10"
    real_unlink = os.unlink

    def unlink_then_pruned(path: str, *, dir_fd: int | None = None) -> None:
        real_unlink(path, dir_fd=dir_fd)
        folder.rmdir()

    monkeypatch.setattr(os, "unlink", unlink_then_pruned)
    await local.delete("rank-0/checkpoint-10/model.bin")
    assert not (local.root / "rank-0").exists()
    assert local.root.is_dir()


async def test_concurrent_deletes_in_one_folder_all_succeed(local: LocalStorage) -> None:
    names = [f"rank-0/checkpoint-20/part-{n}" for n in range(16)]
    await asyncio.gather(*(local.put(name, b"x") for name in names))
    await asyncio.gather(*(local.delete(name) for name in names))
    assert await local.list_dirs("rank-0/") == ["checkpoint-10"]


async def test_read_object_refuses_an_object_over_the_bound(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonio, "MAX_OBJECT_BYTES", 64)
    await local.put("small.json", jsonio.json_bytes({"a": "x" * 10}))
    await local.put("huge.json", jsonio.json_bytes({"a": "x" * 1000}))
    requested = []
    real_get = local.get

    async def counting_get(key: str, start: int = 0, end: int | None = None) -> bytes:
        data = await real_get(key, start, end)
        requested.append(len(data))
        return data

    monkeypatch.setattr(local, "get", counting_get)
    assert await jsonio.read_object(local, "small.json") == {"a": "x" * 10}
    with capture_logs() as logged:
        assert await jsonio.read_object(local, "huge.json") is None
    assert [e["key"] for e in logged if e["event"] == "skipping unreadable JSON object"] == ["huge.json"]
    assert max(requested) <= 65  # never read whole


async def test_read_object_of_an_empty_object_is_damaged_not_an_error(local: LocalStorage) -> None:
    await local.put("empty.json", b"")
    with capture_logs() as logged:
        assert await jsonio.read_object(local, "empty.json") is None
    assert [e["key"] for e in logged if e["event"] == "skipping unreadable JSON object"] == ["empty.json"]
