"""Local-directory backend specifics: atomic writes, reserved names, key safety, emulated multipart."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from daemon.storage import FileRange, Part, StorageError, localfs, open_storage
from daemon.storage.local import LocalStorage

KIND = "unit"


@pytest.fixture
async def local(tmp_path: Path) -> LocalStorage:
    async with LocalStorage(tmp_path / "store") as store:
        yield store


def debris(root: Path) -> list[str]:
    """Temporary files and upload folders left anywhere under the store."""
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.name.startswith(localfs.TMP_PREFIX) or path.parent.name == ".ckptd-multipart"
    ]


async def test_writes_leave_no_temporary_files(local: LocalStorage) -> None:
    await local.put("a/b/c.bin", b"x" * 1000)
    await local.put("a/b/c.bin", b"replaced")
    upload = await local.create_multipart("a/big.bin")
    parts = [await local.upload_part("a/big.bin", upload, n, bytes([n]) * 100) for n in (1, 2)]
    await local.complete_multipart("a/big.bin", upload, parts)
    assert debris(local.root) == []
    assert sorted(p.name for p in (local.root / "a").iterdir()) == ["b", "big.bin"]
    assert await local.get("a/big.bin") == b"\x01" * 100 + b"\x02" * 100


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "../escape",
        "a/../../escape",
        "a//b",
        "a/./b",
        "a/",
        "nul\0byte",
        ".ckptd-multipart/x",
        "a/.ckptd-tmp-123",
        ".ckptd-anything",
    ],
)
async def test_unsafe_or_reserved_keys_are_refused(local: LocalStorage, key: str) -> None:
    for attempt in (
        local.put(key, b"x"),
        local.get(key),
        local.head(key),
        local.delete(key),
        local.create_multipart(key),
        local.presign_get(key, 60),
    ):
        with pytest.raises(StorageError) as err:
            await attempt
        assert (err.value.code, err.value.transient) == ("InvalidKey", False)
    assert not (local.root.parent / "escape").exists()


@pytest.mark.parametrize("prefix", ["../", "a/../", "/abs/", ".ckptd-multipart/"])
async def test_unsafe_list_prefixes_are_refused(local: LocalStorage, prefix: str) -> None:
    with pytest.raises(StorageError) as err:
        [info async for info in local.list(prefix)]
    assert err.value.code == "InvalidKey"
    with pytest.raises(StorageError):
        await local.list_dirs(prefix)


async def test_debris_from_a_crash_is_invisible(local: LocalStorage) -> None:
    await local.put("ckpt/model.bin", b"real")
    (local.root / "ckpt" / f"{localfs.TMP_PREFIX}dead").write_bytes(b"half-written")
    (local.root / ".ckptd-multipart" / f"{localfs.TMP_PREFIX}half-created").mkdir(parents=True)
    (local.root / ".ckptd-multipart" / ("0" * 32)).mkdir()  # an upload folder without its meta
    assert [info.key async for info in local.list("")] == ["ckpt/model.bin"]
    assert await local.list_dirs("") == ["ckpt"]
    assert await local.list_multipart_uploads("") == []


async def test_failed_write_keeps_old_object_and_leaves_nothing(local: LocalStorage, tmp_path: Path) -> None:
    await local.put("k", b"good")
    fd = os.open(tmp_path / "short.bin", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"only ten b")
    try:
        with pytest.raises(StorageError):  # the file is shorter than the range: a torn read
            await local.put("k", FileRange(fd, 0, 100))
    finally:
        os.close(fd)
    assert await local.get("k") == b"good"
    assert debris(local.root) == []


async def test_etag_is_content_md5_and_stable(local: LocalStorage) -> None:
    etag = await local.put("k", b"hello")
    assert etag == "5d41402abc4b2a76b9719d911017c592"
    assert (await local.head("k")).etag == etag
    assert [i.etag async for i in local.list("")] == [etag]


async def test_etag_without_xattr_support_is_still_consistent(local: LocalStorage, monkeypatch) -> None:
    def unsupported(*_: object) -> None:
        raise OSError(errno.ENOTSUP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    etag = await local.put("k", b"hello")
    assert (await local.head("k")).etag == etag
    upload = await local.create_multipart("m")
    part = await local.upload_part("m", upload, 1, b"part")
    assert (await local.list_parts("m", upload))[0].etag == part.etag
    assert (await local.head("m")) is None
    assert await local.complete_multipart("m", upload, [part]) == (await local.head("m")).etag


async def test_multipart_validation(local: LocalStorage) -> None:
    upload = await local.create_multipart("m")
    part = await local.upload_part("m", upload, 1, b"abc")
    cases = [
        (local.complete_multipart("m", upload, [Part(1, "0" * 32, 3)]), "InvalidPart"),
        (local.complete_multipart("m", upload, [part, Part(2, part.etag, 3)]), "InvalidPart"),
        (local.complete_multipart("m", upload, []), "InvalidPartOrder"),
        (local.complete_multipart("other", upload, [part]), "NoSuchUpload"),
        (local.upload_part("m", "f" * 32, 1, b"x"), "NoSuchUpload"),
        (local.upload_part("m", "../../etc", 1, b"x"), "NoSuchUpload"),
        (local.list_parts("m", "nonsense"), "NoSuchUpload"),
        (local.upload_part("m", upload, 0, b"x"), "InvalidArgument"),
        (local.upload_part("m", upload, 10001, b"x"), "InvalidArgument"),
    ]
    for attempt, code in cases:
        with pytest.raises(StorageError) as err:
            await attempt
        assert (err.value.code, err.value.transient) == (code, False)
    await local.abort_multipart("m", upload)
    with pytest.raises(StorageError) as err:
        await local.upload_part("m", upload, 2, b"late part")  # must not resurrect the upload
    assert err.value.code == "NoSuchUpload"
    assert not (local.root / ".ckptd-multipart" / upload).exists()


async def test_delete_prunes_empty_folders(local: LocalStorage) -> None:
    await local.put("jobs/run-1/rank-0/a", b"1")
    await local.put("jobs/run-2/b", b"2")
    await local.delete("jobs/run-1/rank-0/a")
    assert await local.list_dirs("jobs/") == ["run-2"]
    assert local.root.is_dir()
    await local.delete("jobs/run-2/b")
    assert await local.list_dirs("") == []
    assert local.root.is_dir()  # the store's own root is never pruned


async def test_key_that_is_also_a_folder_is_a_permanent_conflict(local: LocalStorage) -> None:
    await local.put("a/b", b"file")
    for key in ("a", "a/b/c"):
        with pytest.raises(StorageError) as err:
            await local.put(key, b"x")
        assert (err.value.code, err.value.transient) == ("KeyConflict", False)
    assert await local.head("a") is None  # a folder is not an object


async def test_range_past_the_end_is_invalid(local: LocalStorage) -> None:
    await local.put("k", b"12345")
    with pytest.raises(StorageError) as err:
        await local.get("k", 5)
    assert (err.value.code, err.value.http_status) == ("InvalidRange", 416)


async def test_open_storage_builds_local_backend(tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path}/x")
    assert isinstance(store, LocalStorage)
    assert store.root == tmp_path / "x"
    url = await store.presign_get("a b/c", 60)
    assert url == f"file://{tmp_path}/x/a%20b/c"
