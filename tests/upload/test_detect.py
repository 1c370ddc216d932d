"""Detection hints from real inotify (and polling) on real files: SPEC §5, FIELD-NOTES §1.

Watch-limit tests run in a child process inside a new user namespace, whose own inotify limits
(/proc/sys/user/max_inotify_*) can be set to a handful without touching the rest of the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import servers
from structlog.testing import capture_logs

from daemon.upload.detect import Detector
from daemon.upload.pin import Pin, Staging
from daemon.upload.scan import needs_polling, scan
from daemon.upload.settle import Settler

KIND = "integration"

pytestmark = [
    # An exception on the observer thread must fail the test, not just print a warning.
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
    # detect.py filters this benign watchdog warning at import, but pytest resets filters after collection.
    pytest.mark.filterwarnings("ignore:Callback with id .* already exists:RuntimeWarning"),
]

Hints = list[tuple[str, bool]]
DEADLINE = 5.0


async def wait_until(hints: Hints, cond: Callable[[], bool], timeout: float = DEADLINE, what: str = "") -> None:
    """Poll cond until it holds; past the deadline, fail showing the hints seen so far."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not met before the deadline {what}; hints: {hints[-30:]}"
        await asyncio.sleep(0.01)


def write(path: Path | str, data: bytes = b"x") -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def hinted(hints: Hints, path: str, closed: bool | None = None) -> bool:
    return any(p == path and (closed is None or c == closed) for p, c in hints)


@pytest.fixture
async def watch(tmp_path: Path) -> AsyncIterator[Callable[..., tuple[Detector, Hints]]]:
    """Start a Detector on tmp_path/root; every hint lands in the returned list."""
    loop = asyncio.get_running_loop()
    started: list[Detector] = []
    off_loop: list[str] = []

    def make(root: Path | None = None, **options: object) -> tuple[Detector, Hints]:
        hints: Hints = []

        def on_path(path: str, closed: bool) -> None:
            if threading.get_ident() != loop_thread:  # an assert here would only reach asyncio's log
                off_loop.append(path)
            hints.append((path, closed))

        detector = Detector(str(root or tmp_path / "root"), loop, on_path, **options)  # type: ignore[arg-type]
        detector.start()
        started.append(detector)
        return detector, hints

    loop_thread = threading.get_ident()
    yield make
    for detector in started:
        detector.stop()
    assert not off_loop, "on_path was called off the event loop's thread"


async def test_close_after_write_is_a_closed_hint(watch, tmp_path):
    detector, hints = watch()  # the root does not exist yet: start creates it
    assert detector.mode == "inotify" and detector.degraded_reason is None
    path = write(tmp_path / "root" / "model.bin")
    await wait_until(hints, lambda: hinted(hints, path, True))


async def test_rename_inside_the_tree_hints_the_destination(watch, tmp_path):
    _, hints = watch()
    tmp = write(tmp_path / "root" / "state.json.tmp")
    await wait_until(hints, lambda: hinted(hints, tmp, True))
    os.rename(tmp, tmp_path / "root" / "state.json")
    await wait_until(hints, lambda: hinted(hints, str(tmp_path / "root" / "state.json"), True))


async def test_file_moved_in_from_outside_is_hinted(watch, tmp_path):
    _, hints = watch()
    (tmp_path / "outside").mkdir()
    src = write(tmp_path / "outside" / "shard.distcp")
    dest = str(tmp_path / "root" / "shard.distcp")
    os.rename(src, dest)  # same file system, no close event in the tree
    await wait_until(hints, lambda: hinted(hints, dest, False))


async def test_files_written_right_after_makedirs_are_hinted(watch, tmp_path):
    _, hints = watch()
    files = []
    for i in range(20):  # the new-directory race: most of these land before the watch does
        folder = tmp_path / "root" / f"step-{i}" / "b" / "c"
        os.makedirs(folder)
        files.append(write(folder / "weights.bin"))
    await wait_until(hints, lambda: all(hinted(hints, f) for f in files))


async def test_renamed_directory_hints_its_files_under_the_new_name(watch, tmp_path):
    _, hints = watch()
    tmp_dir = tmp_path / "root" / "tmp-checkpoint-1"
    os.makedirs(tmp_dir / "sub")
    names = ["model.safetensors", "sub/optimizer.pt", "trainer_state.json"]
    for name in names:
        write(tmp_dir / name)
    await wait_until(hints, lambda: all(hinted(hints, str(tmp_dir / n)) for n in names))  # watched by now
    os.rename(tmp_dir, tmp_path / "root" / "checkpoint-1")
    final = [str(tmp_path / "root" / "checkpoint-1" / n) for n in names]
    await wait_until(hints, lambda: all(hinted(hints, f, True) for f in final))


async def test_skipped_folders_give_no_hints(watch, tmp_path):
    root = tmp_path / "root"
    os.makedirs(root / ".ckptd" / "old")
    _, hints = watch(skip_dir=lambda rel: rel == ".ckptd")
    write(root / ".ckptd" / "journal")
    write(root / ".ckptd" / "old" / "pin")
    os.makedirs(root / ".ckptd" / "new" / "deeper")
    write(root / ".ckptd" / "new" / "deeper" / "pin")
    os.rename(root / ".ckptd" / "journal", root / ".ckptd" / "journal.1")
    sentinel = write(root / "after.bin")  # events arrive in order: once it is hinted, the rest has been seen
    await wait_until(hints, lambda: hinted(hints, sentinel, True))
    assert not [p for p, _ in hints if "/.ckptd/" in p]


async def test_a_failing_callback_does_not_stop_the_observer(watch, tmp_path):
    def skip_dir(rel: str) -> bool:
        if rel == "boom":
            raise ValueError("skip_dir blew up")
        return False

    _, hints = watch(skip_dir=skip_dir)
    os.makedirs(tmp_path / "root" / "boom")
    write(tmp_path / "root" / "boom" / "f")
    later = write(tmp_path / "root" / "later.bin")
    await wait_until(hints, lambda: hinted(hints, later, True))


def live_thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


async def test_stop_is_idempotent_and_ends_hints(watch, tmp_path):
    root = tmp_path / "root"
    detector, hints = watch()
    threads = detector.thread_ids()
    assert threads and threads <= live_thread_ids(), "start() made no watcher threads to end"
    # Running, the detector hints writes: the positive the rest of the test is measured against.
    before = [write(root / f"before-{i}.bin") for i in range(20)]
    await wait_until(hints, lambda: all(hinted(hints, p, True) for p in before))
    # A second detector on the same tree stays running: it proves the writes below do give hints.
    _, witnessed = watch()
    in_flight = [write(root / f"in-flight-{i}.bin") for i in range(20)]  # hints may be queued, not yet delivered
    detector.stop()
    seen_at_stop = len(hints)  # no await since the writes: nothing was delivered in between
    detector.stop()
    await wait_until(
        hints, lambda: not threads & live_thread_ids(), what=f"the watcher threads {sorted(threads)} to end"
    )
    after = [write(root / f"after-{i}.bin") for i in range(20)]
    await wait_until(witnessed, lambda: all(hinted(witnessed, p, True) for p in in_flight + after))
    probe = asyncio.get_running_loop().create_future()  # let any hint queued on the loop run first
    asyncio.get_running_loop().call_soon(probe.set_result, None)
    await probe
    assert hints[seen_at_stop:] == [], "hints delivered after stop()"


async def test_poll_mode_sees_new_files_without_close_events(watch, tmp_path):
    detector, hints = watch(mode="poll", poll_interval=0.05)
    assert detector.mode == "poll" and detector.degraded_reason is None
    root = tmp_path / "root"
    path = write(root / "a.bin")
    os.makedirs(root / "ckpt" / "x")
    nested = write(root / "ckpt" / "x" / "b.bin")
    await wait_until(hints, lambda: hinted(hints, path) and hinted(hints, nested))
    assert not hinted(hints, path, True) and not hinted(hints, nested, True)
    os.rename(path, root / "c.bin")
    await wait_until(hints, lambda: hinted(hints, str(root / "c.bin"), True))


def test_needs_polling_is_none_on_local_file_systems(tmp_path):
    for path in (tmp_path, "/", "/dev/shm", "/proc", tmp_path / "not" / "yet"):
        assert needs_polling(str(path)) is None, path


@pytest.fixture(scope="module")
def fuse_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real FUSE file system: JuiceFS on a local folder (needs root for /dev/fuse)."""
    work = tmp_path_factory.mktemp("jfs")
    meta, mnt, juicefs = f"sqlite3://{work}/meta.db", work / "mnt", servers.juicefs_binary()
    mnt.mkdir()
    subprocess.run(
        [juicefs, "format", "--storage", "file", "--bucket", f"{work}/data/", meta, "detect"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    subprocess.run([juicefs, "mount", "-d", meta, str(mnt)], check=True, capture_output=True, timeout=30)
    yield str(mnt)
    subprocess.run([juicefs, "umount", "--force", str(mnt)], capture_output=True, timeout=30)


async def test_auto_picks_inotify_locally_and_polls_on_fuse(watch, tmp_path, fuse_mount):
    assert watch()[0].mode == "inotify"
    assert needs_polling(fuse_mount) == "fuse"
    detector, hints = watch(Path(fuse_mount) / "ckpts", poll_interval=0.05)
    assert detector.mode == "poll" and "fuse" in (detector.degraded_reason or "")
    path = write(Path(fuse_mount) / "ckpts" / "model.bin")
    await wait_until(hints, lambda: hinted(hints, path))


def test_scan_finds_every_file_and_skips_skipped_folders(tmp_path):
    deep = tmp_path.joinpath(*[f"d{i}" for i in range(60)])
    os.makedirs(deep)
    expected = {write(deep / "bottom.bin")}
    for i in range(5):
        os.makedirs(tmp_path / f"ckpt-{i}" / "sub")
        expected |= {write(tmp_path / f"ckpt-{i}" / "a"), write(tmp_path / f"ckpt-{i}" / "sub" / "b")}
    os.makedirs(tmp_path / ".ckptd" / "pins")
    write(tmp_path / ".ckptd" / "pins" / "p")
    os.symlink(tmp_path / "ckpt-0", tmp_path / "link-dir")
    os.symlink(tmp_path / "ckpt-0" / "a", tmp_path / "link-file")
    os.makedirs(tmp_path / "ckpt-9" / "skip-me")
    write(tmp_path / "ckpt-9" / "skip-me" / "x")
    judged: list[str] = []

    def skip_dir(rel: str) -> bool:
        judged.append(rel)
        return rel in (".ckptd", os.path.join("ckpt-9", "skip-me"))

    found = list(scan(str(tmp_path), skip_dir))
    assert len(found) == len(set(found)) and set(found) == expected
    assert os.path.join("d0", "d1") in judged and not [r for r in judged if os.path.isabs(r)]


def test_scan_tolerates_files_and_folders_deleted_mid_scan(tmp_path):
    for i in range(10):
        os.makedirs(tmp_path / f"ckpt-{i}")
        for j in range(3):
            write(tmp_path / f"ckpt-{i}" / f"f{j}")
    walk = scan(str(tmp_path))
    first = next(walk)
    for i in range(10):  # checkpoint rotation while the scan is in flight
        shutil.rmtree(tmp_path / f"ckpt-{i}")
    rest = list(walk)
    assert len(rest) < 29 and first not in rest


# --- watch limits, in a child user namespace ---


def _limit_child(root: str, watches: int, instances: int, grow: bool) -> None:
    """Child side: lower this namespace's limits, start a Detector in auto mode, report as JSON."""
    for name, value in (("watches", watches), ("instances", instances)):
        Path(f"/proc/sys/user/max_inotify_{name}").write_text(f"{value}\n")

    async def main() -> dict[str, object]:
        hints: Hints = []
        detector = Detector(root, asyncio.get_running_loop(), lambda p, c: hints.append((p, c)), poll_interval=0.05)
        detector.start()
        report: dict[str, object] = {"start_mode": detector.mode}
        try:
            files = []
            for i in range(3 if grow else 1):  # grow: each new folder needs a watch there is no room for
                os.makedirs(f"{root}/new-{i}/a")
                files.append(write(f"{root}/new-{i}/a/weights.bin"))
            files.append(write(f"{root}/d0/e0/late.bin"))
            await wait_until(hints, lambda: all(hinted(hints, f) for f in files))
        finally:
            detector.stop()
        return report | {"mode": detector.mode, "reason": detector.degraded_reason}

    print("RESULT " + json.dumps(asyncio.run(main())), flush=True)


def run_with_limits(tmp_path: Path, *, dirs: int, watches: int, instances: int = 128, grow: bool = False) -> dict:
    root = tmp_path / "root"
    for i in range(dirs):
        os.makedirs(root / f"d{i}" / f"e{i}")
    here = Path(__file__).parent
    code = (
        f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}]; import test_detect; "
        f"test_detect._limit_child({str(root)!r}, {watches}, {instances}, {grow})"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", sys.executable, "-c", code], capture_output=True, text=True, timeout=20
    )
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and results, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(results[-1].removeprefix("RESULT "))


def test_watch_limit_at_start_falls_back_to_polling(tmp_path):
    report = run_with_limits(tmp_path, dirs=10, watches=4)  # 21 folders, room for 4 watches
    assert report["start_mode"] == "poll" and report["mode"] == "poll"
    assert "ENOSPC" in report["reason"]


def test_watch_limit_for_a_new_folder_switches_to_polling(tmp_path):
    report = run_with_limits(tmp_path, dirs=1, watches=3, grow=True)  # root, d0, d0/e0 fit; new-0 does not
    assert report["start_mode"] == "inotify" and report["mode"] == "poll"
    assert "ENOSPC" in report["reason"]


def test_inotify_instance_limit_falls_back_to_polling(tmp_path):
    report = run_with_limits(tmp_path, dirs=1, watches=100, instances=0)
    assert report["start_mode"] == "poll" and "EMFILE" in report["reason"]


# --- links and special files (issue 10, defects 1 and 3) ---


def outside_with_secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    os.makedirs(outside / "deeper")
    write(outside / "secret.txt", b"secret")
    write(outside / "deeper" / "more.txt", b"more")
    return outside


@pytest.mark.parametrize("mode", ["inotify", "poll"])
async def test_no_mode_walks_into_a_linked_folder(watch, tmp_path, mode):
    root = tmp_path / "root"
    os.makedirs(root / "ckpt-1")
    outside = outside_with_secret(tmp_path)
    _, hints = watch(mode=mode, poll_interval=0.05)
    links = [str(root / "ckpt-1" / "etc"), str(root / "loop"), str(root / "file-link")]
    os.symlink(outside, links[0])
    os.symlink(".", links[1])  # a loop: root/loop/loop/... (40 deep for a stat-based walk)
    os.symlink(outside / "secret.txt", links[2])
    sentinel = write(root / "ckpt-1" / "after.bin")
    await wait_until(hints, lambda: hinted(hints, sentinel) and all(hinted(hints, link) for link in links))
    # A file written after the links is hinted only once the watcher has looked past them (the
    # next poll, or every inotify event before it): whatever they would give is in by then.
    later = write(root / "ckpt-1" / "later.bin")
    await wait_until(hints, lambda: hinted(hints, later))
    assert not [p for p, _ in hints if p.startswith(tuple(link + "/" for link in links))]
    assert all(not closed for p, closed in hints if p in links)  # hinted to be counted, never pinned


async def test_a_folder_moved_in_reports_its_links_and_special_files(watch, tmp_path):
    root = tmp_path / "root"
    staged = tmp_path / "tmp-checkpoint"
    os.makedirs(staged)
    write(staged / "model.bin")
    os.symlink("/etc", staged / "etc")
    os.mkfifo(staged / "pipe")
    _, hints = watch()
    os.makedirs(root, exist_ok=True)
    os.rename(staged, root / "checkpoint-1")
    moved = root / "checkpoint-1"
    await wait_until(hints, lambda: all(hinted(hints, str(moved / n)) for n in ("model.bin", "etc", "pipe")))
    assert not hinted(hints, str(moved / "etc"), True) and not hinted(hints, str(moved / "pipe"), True)
    assert not [p for p, _ in hints if p.startswith(str(moved / "etc") + "/")]


async def test_a_fifo_closed_after_writing_does_not_block_detection_or_stop(tmp_path):
    # The real pin of the daemon: before the fix it opened the FIFO for reading and blocked forever.
    root = tmp_path / "root"
    os.makedirs(root / "staging")
    settler = Settler(str(root), Staging(str(root / "staging")), 0.05, (), print, print, lambda *a: None)
    hints: Hints = []
    pinned: list[str] = []

    def on_path(path: str, closed: bool, early: Pin | None = None) -> None:
        hints.append((path, closed))
        if early is not None:
            pinned.append(early.relpath)
            early.release()

    detector = Detector(
        str(root),
        asyncio.get_running_loop(),
        on_path,
        skip_dir=lambda rel: rel == "staging",
        pin=settler.pin_early,
    )
    detector.start()
    fifo = root / "pipe"
    os.mkfifo(fifo)
    try:
        os.close(os.open(fifo, os.O_RDWR))  # opened for writing and closed: IN_CLOSE_WRITE on the FIFO
        await wait_until(hints, lambda: hinted(hints, str(fifo), True))
        after = write(root / "after.bin")
        await wait_until(hints, lambda: hinted(hints, after, True), what="(detection goes on)")
    finally:
        stopped = await asyncio.to_thread(detector.stop, 5.0)
        if not stopped:  # release the blocked reader before failing
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert stopped
    assert pinned == ["after.bin"] and os.listdir(root / "staging") == []


async def test_stop_is_bounded_when_a_watcher_thread_is_stuck(tmp_path):
    # A pin stuck in a real blocking system call (a FIFO without a writer stands in for a hung NFS
    # read): stop() reports the stuck threads and returns instead of joining forever.
    root = tmp_path / "root"
    os.makedirs(root)
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    entered = threading.Event()

    def stuck_pin(path: str) -> None:
        entered.set()
        with open(fifo, "rb"):  # blocks until a writer opens it
            return None

    detector = Detector(str(root), asyncio.get_running_loop(), lambda *a: None, pin=stuck_pin)
    detector.start()
    try:
        write(root / "model.bin")
        assert await asyncio.to_thread(entered.wait, DEADLINE)
        with capture_logs() as logs:
            started = time.monotonic()
            stopped = detector.stop(timeout=1.0)
            took = time.monotonic() - started
        assert stopped is False and took < 3
        [said] = [e for e in logs if e["event"] == "detector threads did not stop; left behind"]
        assert said["threads"] and said["log_level"] == "error"
        assert detector.stop(timeout=0.1) is False  # idempotent, and still bounded
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the stuck thread go
    assert await asyncio.to_thread(detector.stop, 5.0) is True


def test_scan_reports_links_and_special_files_without_entering_them(tmp_path):
    outside = outside_with_secret(tmp_path)
    root = tmp_path / "root"
    os.makedirs(root / "sub")
    regular = write(root / "sub" / "model.bin")
    os.symlink(outside, root / "etc")
    os.symlink(outside / "secret.txt", root / "sub" / "link")
    os.symlink(".", root / "loop")
    os.mkfifo(root / "sub" / "pipe")
    others: list[str] = []
    assert list(scan(str(root), others=others.append)) == [regular]
    assert sorted(others) == sorted(str(root / p) for p in ("etc", "loop", "sub/link", "sub/pipe"))
