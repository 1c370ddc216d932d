"""restore/fetch.py, the serving-side download (SPEC §7): real stores (a file:// folder, moto, the
JuiceFS gateway), real files and links. Verified bytes in place, kept when already right, corrupt
downloads retried then refused, links in the target folder refused and never followed."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
from pathlib import Path

import pytest
from engines import until
from structlog.testing import capture_logs

from daemon.restore.fetch import TMP_PREFIX, FetchFailed, Wanted, disk_bytes, fetch
from daemon.storage import Storage, StorageError
from daemon.storage.local import LocalStorage

KIND = "unit"  # the `store` tests reach S3 servers and are integration tests (conftest)

JOB = "run-42"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key(rank: int, relpath: str) -> str:
    return f"training_projects/proj/jobs/{JOB}/rank-{rank}/{relpath}"


def wanted(rank: int, relpath: str, data: bytes, *, verified: bool = True) -> Wanted:
    return Wanted(
        key(rank, relpath), (JOB, f"rank-{rank}", *relpath.split("/")), len(data), sha(data) if verified else None
    )


FILES = {
    (0, "checkpoint-10/model.safetensors"): os.urandom(300_000),
    (0, "checkpoint-10/sub/trainer_state.json"): b'{"global_step": 10}',
    (1, "checkpoint-10/model.safetensors"): os.urandom(70_000),
    (0, "tokenizer.json"): b"{}",
    (0, "checkpoint-10/empty"): b"",
}


async def put_all(store: Storage) -> list[Wanted]:
    for (rank, relpath), data in FILES.items():
        await store.put(key(rank, relpath), data)
    return [wanted(rank, relpath, data) for (rank, relpath), data in FILES.items()]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_tree() -> dict[str, bytes]:
    return {f"{JOB}/rank-{r}/{p}": d for (r, p), d in FILES.items()}


async def test_fetches_every_file_byte_for_byte_then_keeps_them(store: Storage, tmp_path: Path) -> None:
    wants = await put_all(store)
    seen: list[tuple[int, int]] = []
    report = await fetch(
        store, wants, str(tmp_path / "out"), chunk_size=64 << 10, progress=lambda d, t: seen.append((d, t))
    )
    assert tree(tmp_path / "out") == expected_tree()
    assert (report.files, report.downloaded_files, report.kept_files) == (5, 5, 0)
    assert report.bytes == sum(map(len, FILES.values()))
    assert seen[-1] == (report.bytes, report.bytes)
    again = await fetch(store, wants, str(tmp_path / "out"))
    assert (again.downloaded_files, again.kept_files) == (0, 5)


async def test_unverified_files_are_always_downloaded_and_size_checked(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path / "store") as store:
        await store.put(key(0, "checkpoint-50/a.bin"), b"abc")
        want = wanted(0, "checkpoint-50/a.bin", b"abc", verified=False)
        assert (await fetch(store, [want], str(tmp_path / "out"))).downloaded_files == 1
        assert (await fetch(store, [want], str(tmp_path / "out"))).downloaded_files == 1  # cannot be proven right
        lying = Wanted(want.key, want.parts, 4, None)
        with pytest.raises(FetchFailed, match="does not match after 3 downloads"):
            await fetch(store, [lying], str(tmp_path / "out"))
        assert (tmp_path / "out" / JOB / "rank-0" / "checkpoint-50" / "a.bin").read_bytes() == b"abc"
        assert not leftovers(tmp_path / "out")


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(f"{TMP_PREFIX}*")]


async def test_corrupt_object_is_refused_and_nothing_lands(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path / "store") as store:
        await store.put(key(0, "checkpoint-10/model.bin"), b"tampered")
        want = Wanted(
            key(0, "checkpoint-10/model.bin"), (JOB, "rank-0", "checkpoint-10", "model.bin"), 8, sha(b"original")
        )
        with pytest.raises(FetchFailed, match=r"model\.bin does not match after 3 downloads: sha256"):
            await fetch(store, [want], str(tmp_path / "out"))
        assert not (tmp_path / "out" / JOB / "rank-0" / "checkpoint-10" / "model.bin").exists()
        assert not leftovers(tmp_path / "out")


class FlakyStore(LocalStorage):
    """A real file:// store whose first GET of each key returns flipped bytes (a corrupting proxy)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gets: dict[str, int] = {}

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        data = await super().get(key, start, end)
        self.gets[key] = self.gets.get(key, 0) + 1
        return bytes(b ^ 0xFF for b in data) if self.gets[key] == 1 else data


async def test_a_corrupt_download_is_fetched_again(tmp_path: Path) -> None:
    async with FlakyStore(tmp_path / "store") as store:
        data = b"weights" * 100
        await store.put(key(0, "checkpoint-10/w.bin"), data)
        seen: list[int] = []
        report = await fetch(
            store, [wanted(0, "checkpoint-10/w.bin", data)], str(tmp_path / "out"), progress=lambda d, t: seen.append(d)
        )
        assert store.gets[key(0, "checkpoint-10/w.bin")] == 2
        assert (tmp_path / "out" / JOB / "rank-0" / "checkpoint-10" / "w.bin").read_bytes() == data
        assert report.downloaded_files == 1 and seen[-1] == len(data)
        assert 0 in seen  # the bar went back after the corrupt attempt


async def test_size_lie_of_a_big_file_costs_one_head(tmp_path: Path) -> None:
    async with FlakyStore(tmp_path / "store") as store:
        await store.put(key(0, "checkpoint-10/big.bin"), b"x" * 1000)
        want = Wanted(key(0, "checkpoint-10/big.bin"), (JOB, "rank-0", "checkpoint-10", "big.bin"), 5000, "0" * 64)
        with pytest.raises(FetchFailed, match="is 1000 bytes, expected 5000"):
            await fetch(store, [want], str(tmp_path / "out"), chunk_size=100)
        assert store.gets == {}


async def test_a_claimed_size_beyond_the_free_space_fails_before_writing(tmp_path: Path) -> None:
    async with LocalStorage(tmp_path / "store") as store:
        want = Wanted(key(0, "checkpoint-10/huge.bin"), (JOB, "rank-0", "checkpoint-10", "huge.bin"), 1 << 50, None)
        with pytest.raises(FetchFailed, match="not enough space"):
            await fetch(store, [want], str(tmp_path / "out"))
        assert tree(tmp_path / "out") == {}


def _link(at: Path, to: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(to)


IN_THE_WAY = {
    "job-folder-is-a-link": lambda out, v: _link(out / JOB, v),
    "rank-folder-is-a-link": lambda out, v: _link(out / JOB / "rank-0", v),
    "checkpoint-folder-is-a-link": lambda out, v: _link(out / JOB / "rank-0" / "checkpoint-10", v),
    "file-is-a-link": lambda out, v: _link(out / JOB / "rank-0" / "tokenizer.json", v / "keep.txt"),
    "file-is-a-fifo": lambda out, v: (
        (out / JOB / "rank-0").mkdir(parents=True) or os.mkfifo(out / JOB / "rank-0" / "tokenizer.json")
    ),
}


@pytest.mark.parametrize("plant", IN_THE_WAY.values(), ids=IN_THE_WAY.keys())
async def test_links_in_the_target_are_refused_never_followed(tmp_path: Path, plant) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_bytes(b"precious")
    out = tmp_path / "out"
    plant(out, victim)
    async with LocalStorage(tmp_path / "store") as store:
        wants = await put_all(store)
        with pytest.raises(FetchFailed, match="never writes through links"):
            await fetch(store, wants, str(out))
    assert tree(victim) == {"keep.txt": b"precious"}
    assert not leftovers(out)


async def test_the_download_folder_itself_may_be_a_link(tmp_path: Path) -> None:
    (tmp_path / "volume").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "volume")
    async with LocalStorage(tmp_path / "store") as store:
        await fetch(store, await put_all(store), str(tmp_path / "out"))
    assert tree(tmp_path / "volume") == expected_tree()


async def test_a_wrong_file_in_place_is_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out" / JOB / "rank-0" / "tokenizer.json"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"stale")
    async with LocalStorage(tmp_path / "store") as store:
        report = await fetch(store, await put_all(store), str(tmp_path / "out"))
    assert target.read_bytes() == b"{}" and report.downloaded_files == 5


async def test_leftovers_in_the_folders_written_into_are_removed_and_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mine = out / JOB / "rank-0" / "checkpoint-10"
    other = out / "other-job"
    for folder in (mine, other):
        folder.mkdir(parents=True)
        (folder / f"{TMP_PREFIX}dead").write_bytes(b"half")
    (tmp_path / "elsewhere").write_bytes(b"keep")
    (mine / f"{TMP_PREFIX}link").symlink_to(tmp_path / "elsewhere")  # not ours: never a regular file
    async with LocalStorage(tmp_path / "store") as store:
        with capture_logs() as logs:
            await fetch(store, await put_all(store), str(out))
    assert sorted(p.name for p in mine.iterdir()) == [f"{TMP_PREFIX}link", "empty", "model.safetensors", "sub"]
    assert (other / f"{TMP_PREFIX}dead").exists()  # not a folder this download writes into
    assert (tmp_path / "elsewhere").read_bytes() == b"keep"
    assert [e["files"] for e in logs if e["event"] == "removed what a killed download left"] == [1]


async def test_downloads_into_one_folder_take_turns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another download is writing here
    try:
        async with LocalStorage(tmp_path / "store") as store:
            wants = await put_all(store)
            with capture_logs() as logs:
                second = asyncio.create_task(fetch(store, wants, str(out)))
                waiting = "waiting for another download into the same folder"
                await until(lambda: any(e["event"] == waiting for e in logs), 30, "the second download to wait")
                assert not second.done() and not leftovers(out) and tree(out) == {}
                fcntl.flock(holder, fcntl.LOCK_UN)
                report = await asyncio.wait_for(second, 30)
    finally:
        os.close(holder)
    assert report.downloaded_files == 5 and tree(out) == expected_tree()


@pytest.mark.parametrize(
    "files, block, expected",
    [
        ([("a", 1)], 4096, 8192),
        ([("a", 4097)], 4096, 12288),
        ([("a", 0)], 4096, 4096),
        ([("a", 1), ("a", 1), ("b", 1)], 4096, 20480),
    ],
)
def test_disk_bytes_counts_whole_blocks_and_folders(files, block, expected) -> None:
    todo = [Wanted(f"k{i}", (folder, f"f{i}"), size, None) for i, (folder, size) in enumerate(files)]
    assert disk_bytes(todo, block) == expected


class FailingOne(LocalStorage):
    """A real file:// store on which one key's GETs fail for good: its siblings are cancelled mid-way."""

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if key.endswith("/bad.bin"):
            raise StorageError("get", key, "AccessDenied", "denied", http_status=403, transient=False)
        return await super().get(key, start, end)


async def test_a_failed_download_leaves_no_temporary_file(tmp_path: Path) -> None:
    async with FailingOne(tmp_path / "store") as store:
        wants = []
        for i in range(200):
            relpath = f"checkpoint-10/f{i:03d}.bin" if i != 20 else "checkpoint-10/bad.bin"
            await store.put(key(0, relpath), b"x")
            wants.append(wanted(0, relpath, b"x"))
        for _ in range(5):  # the cancellation lands anywhere: while files are created, written, renamed
            with pytest.raises(FetchFailed, match=r"bad\.bin"):
                await fetch(store, wants, str(tmp_path / "out"), concurrency=16)
            assert not leftovers(tmp_path / "out")


async def test_a_wanted_file_named_like_a_leftover_is_never_swept(tmp_path: Path) -> None:
    relpath = f"checkpoint-10/{TMP_PREFIX}but-stored"
    async with LocalStorage(tmp_path / "store") as store:
        await store.put(key(0, relpath), b"real")
        want = wanted(0, relpath, b"real")
        assert (await fetch(store, [want], str(tmp_path / "out"))).downloaded_files == 1
        assert (await fetch(store, [want], str(tmp_path / "out"))).kept_files == 1
