"""A corrupt journal never crash-loops the daemon (issue 10, defect 8).

Each bad journal goes through `Journal.open()` and `recover()` as a start does, against a real
(file://) store holding a committed checkpoint: the journal is set aside (logged with the reason
and the line), the start recovers as a new pod would (the store's manifests decide what is already
stored), and the next start finds a clean journal. A torn last line stays a silent drop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.storage.local import LocalStorage
from daemon.upload import journal as jr
from daemon.upload import statedir
from daemon.upload.complete import Identity
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Staging
from daemon.upload.recover import Rank, Recovered, recover
from daemon.upload.statedir import journal_path, staging_dir

KIND = "unit"

RANK = Rank("proj", "job-1", 0)
STORED, UNSTORED = b"weights of checkpoint 1", b"not in the store"
SET_ASIDE = "journal corrupt: set aside, recovering from the store's manifests"


def line(record: dict) -> bytes:
    return json.dumps(record).encode() + b"\n"


ID = {"dev": 1, "ino": 2, "size": 3, "mtime_ns": 4}
SHA = "ab" * 32


# A true-looking record: a corrupt journal's claims must not survive, this one included.
def stored(**changes: object) -> bytes:
    record = {"op": "stored", "relpath": "checkpoint-1/x.bin", "identity": ID, "sha256": SHA, "key": "k", "etag": "e"}
    return line({**record, **changes})


CLAIM = stored(relpath="checkpoint-2/other.bin")
UNPIN = line({"op": "unpinned", "stage": "1-2-3"})
MULTIPART = {"op": "multipart", "relpath": "a/b", "identity": ID, "key": "k", "upload_id": "u", "part_size": 1}


def bad(middle: bytes) -> bytes:
    """A journal with one bad line (line 2) between good ones: corruption, not a torn tail."""
    return CLAIM + middle + UNPIN


CORRUPT_LINES = [
    ("binary-garbage", bad(b"\x00\xff\xfe\x80garbage\x9c\n"), "not UTF-8"),
    ("invalid-utf8-in-json", bad(b'{"op":"unpinned","stage":"\xff\xfe"}\n'), "not UTF-8"),
    ("json-list", bad(b"[1, 2, 3]\n"), "not a JSON object but list"),
    ("json-number", bad(b"42\n"), "not a JSON object but int"),
    ("json-string", bad(b'"stored"\n'), "not a JSON object but str"),
    ("json-null", bad(b"null\n"), "not a JSON object but NoneType"),
    ("unknown-op", bad(line({"op": "deleted", "relpath": "a"})), "unknown op 'deleted'"),
    ("op-not-a-string", bad(line({"op": ["stored"], "relpath": "a"})), "unknown op"),
    ("missing-field", bad(line({"op": "stored", "relpath": "a/b", "identity": ID})), "stored: fields"),
    ("extra-field", bad(stored(size=3)), "stored: fields"),
    ("identity-size-a-string", bad(stored(identity={**ID, "size": "3"})), "stored.identity: not an integer"),
    ("identity-not-an-object", bad(stored(identity=[1, 2, 3, 4])), "stored.identity: not {dev"),
    ("identity-negative-size", bad(stored(identity={**ID, "size": -1})), "stored.identity: below 0"),
    ("identity-nan", bad(stored(identity={**ID, "size": float("nan")})), "stored.identity: not an integer"),
    ("bool-for-int", bad(line({**MULTIPART, "part_size": True})), "multipart.part_size: not an integer"),
    ("part-size-zero", bad(line({**MULTIPART, "part_size": 0})), "multipart.part_size: below 1"),
    ("upload-id-empty", bad(line({**MULTIPART, "upload_id": ""})), "multipart.upload_id: empty"),
    ("sha256-not-hex", bad(stored(sha256="Z" * 64)), "stored.sha256: not 64 lowercase hex digits"),
    ("relpath-a-number", bad(stored(relpath=7)), "stored.relpath: not a string"),
    ("relpath-dotdot", bad(stored(relpath="../x")), "stored.relpath: unsafe path '../x'"),
    ("relpath-deep-dotdot", bad(stored(relpath="checkpoint-1/../../etc/x")), "unsafe path"),
    ("relpath-absolute", bad(stored(relpath="/etc/passwd")), "absolute"),
    ("relpath-empty-segment", bad(stored(relpath="a//b")), "unsafe path"),
    ("relpath-in-state-folder", bad(stored(relpath=".ckptd/journal-rank-0.jsonl")), "inside the state folder"),
    ("stage-escapes", bad(line({"op": "unpinned", "stage": "../../etc/passwd"})), "unpinned.stage: not a name"),
    ("stage-dotdot", bad(line({"op": "unpinned", "stage": ".."})), "unpinned.stage: not a name"),
    ("key-escapes", bad(stored(key="../other-job/x")), "stored.key: unsafe path"),
    ("blank-line", bad(b"\n"), "not JSON"),
    ("torn-line-mid-file", bad(b'{"op":"stored","relpath":"chec\n'), "not JSON"),
    ("nested-too-deep", bad(b"[" * 100_000 + b"]" * 100_000 + b"\n"), "nested too deep"),
    ("line-too-long", bad(b'"' + b"x" * jr.MAX_LINE + b'"\n'), "longer than"),
]


@dataclass
class Pod:
    """One rank's checkpoint folder as a (re)starting daemon finds it, and a store an earlier pod
    of the job filled: checkpoint-1 committed with model.bin, which is also on this disk."""

    root: Path
    store: LocalStorage
    opened: list[jr.Journal]

    @property
    def journal_path(self) -> Path:
        return Path(journal_path(str(self.root), RANK.rank))

    @property
    def staging(self) -> Path:
        return Path(staging_dir(str(self.root), RANK.rank))

    def set_aside(self) -> list[Path]:
        return sorted(self.journal_path.parent.glob(self.journal_path.name + ".corrupt-*"))

    async def start(self) -> tuple[jr.Journal, Recovered]:
        journal = jr.Journal(str(self.journal_path))
        self.opened.append(journal)
        journal.open()
        self.staging.mkdir(parents=True, exist_ok=True)
        found = await recover(
            root=str(self.root),
            journal=journal,
            staging=Staging(str(self.staging)),
            storage=self.store,
            health=StoreHealth(),
            rank=RANK,
        )
        return journal, found


@pytest.fixture
async def pod(tmp_path: Path) -> AsyncIterator[Pod]:
    root = tmp_path / "ckpt"
    (root / "checkpoint-1").mkdir(parents=True)
    (root / "checkpoint-1" / "model.bin").write_bytes(STORED)
    (root / "checkpoint-2").mkdir()
    (root / "checkpoint-2" / "other.bin").write_bytes(UNSTORED)
    Path(journal_path(str(root), 0)).parent.mkdir()
    async with LocalStorage(tmp_path / "store") as store:
        key = layout.file_key("proj", "job-1", 0, "checkpoint-1/model.bin")
        etag = await store.put(key, STORED)
        files = [StoredFile("checkpoint-1/model.bin", len(STORED), hashlib.sha256(STORED).hexdigest(), key, etag)]
        await write_manifest(store, build_manifest("proj", "job-1", 0, "checkpoint-1", files, "marker", {}))
        p = Pod(root, store, [])
        yield p
        for journal in p.opened:
            journal.close()


async def start_logged(pod: Pod) -> tuple[jr.Journal, Recovered, list[dict]]:
    with capture_logs() as logs:
        journal, found = await pod.start()
    return journal, found, logs


async def assert_recovered_as_a_new_pod(pod: Pod, reason: str, line_number: int) -> None:
    journal, found, logs = await start_logged(pod)
    [event] = [e for e in logs if e["event"] == SET_ASIDE]
    assert reason in event["reason"] and event["line"] == line_number
    [aside] = pod.set_aside()
    assert event["moved_to"] == str(aside) and journal.set_aside == str(aside) and found.set_aside == str(aside)
    assert sorted(journal.state.stored) == ["checkpoint-1/model.bin"]  # what the store proves, nothing else
    assert found.reconciled == 1 and found.committed == ["checkpoint-1"]
    assert journal.not_ready() == []
    again, found_again = await pod.start()  # the next start: a clean journal, nothing set aside again
    assert again.set_aside is None and found_again.reconciled == 0 and len(pod.set_aside()) == 1
    assert sorted(again.state.stored) == ["checkpoint-1/model.bin"] and found_again.committed == ["checkpoint-1"]


@pytest.mark.parametrize(("content", "reason"), [c[1:] for c in CORRUPT_LINES], ids=[c[0] for c in CORRUPT_LINES])
async def test_a_journal_with_a_bad_line_is_set_aside_and_the_store_decides(pod: Pod, content: bytes, reason: str):
    pod.journal_path.write_bytes(content)
    await assert_recovered_as_a_new_pod(pod, reason, 2)
    assert pod.set_aside()[0].read_bytes() == content  # kept as it was, for a post-mortem


def make_dir(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def make_symlink(path: Path) -> None:
    outside = path.parent.parent.parent / "elsewhere.jsonl"  # a valid journal, outside the folder
    outside.write_bytes(stored(relpath="checkpoint-2/other.bin"))
    path.symlink_to(outside)


def make_fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading would block until a writer came


def make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


NOT_A_FILE: list[tuple[str, Callable[[Path], None], str]] = [
    ("directory", make_dir, "a folder, not a regular file"),
    ("symlink", make_symlink, "a symlink, not a regular file"),
    ("fifo", make_fifo, "a FIFO, not a regular file"),
    ("socket", make_socket, "a socket, not a regular file"),
]


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in NOT_A_FILE], ids=[c[0] for c in NOT_A_FILE])
async def test_a_journal_that_is_not_a_regular_file_is_set_aside_unopened(pod: Pod, make, reason: str):
    make(pod.journal_path)
    await assert_recovered_as_a_new_pod(pod, reason, 0)
    aside = pod.set_aside()[0]
    assert aside.is_symlink() or not aside.is_file()  # moved as it was, never replaced by a copy
    if make is make_symlink:
        assert (pod.root.parent / "elsewhere.jsonl").read_bytes() == stored(relpath="checkpoint-2/other.bin")


TORN_TAILS = [
    ("torn-json", b'{"op":"stored","relpath":"chec'),
    ("torn-binary", b"\x00\x00\x00\x00"),  # a file system that grew the file but lost its data
    ("complete-record-but-no-newline", UNPIN[:-1]),
]


@pytest.mark.parametrize("tail", [t[1] for t in TORN_TAILS], ids=[t[0] for t in TORN_TAILS])
async def test_a_torn_last_line_is_dropped_silently(pod: Pod, tail: bytes):
    good = stored(relpath="checkpoint-2/other.bin", sha256="cd" * 32)
    pod.journal_path.write_bytes(good + tail)
    with capture_logs() as logs:
        journal, found = await pod.start()
    assert pod.set_aside() == [] and journal.set_aside is None and found.set_aside is None
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    assert journal.state.stored["checkpoint-2/other.bin"].sha256 == "cd" * 32  # the journal was trusted
    assert found.reconciled == 0  # ... so no reconciliation either
    assert pod.journal_path.read_bytes().endswith(b"\n")  # compacted: the torn part is gone


async def test_an_empty_journal_is_a_fresh_start_not_corruption(pod: Pod):
    pod.journal_path.write_bytes(b"")
    _, found = await pod.start()
    assert pod.set_aside() == [] and found.reconciled == 1


async def test_set_aside_journals_are_kept_but_not_without_bound(pod: Pod):
    for _ in range(5):
        pod.journal_path.write_bytes(bad(b"[]\n"))
        await pod.start()
    assert len(pod.set_aside()) == 3  # statedir.KEEP_ASIDE: evidence, not a landfill


async def test_a_staging_entry_that_is_not_a_regular_file_is_neither_adopted_nor_followed(pod: Pod, tmp_path: Path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"outside the folder")
    pod.staging.mkdir()
    os.symlink(secret, pod.staging / "10-20-30")
    os.mkfifo(pod.staging / "11-21-31")
    (pod.staging / "12-22-32").mkdir()
    (pod.staging / "12-22-32" / "keep").write_bytes(b"x")
    journal = jr.Journal(str(pod.journal_path))
    journal.open()
    ident = Identity(1, 2, 3, 4)
    for stage in ("10-20-30", "11-21-31", "12-22-32"):
        journal.record("pinned", jr.Pinned(f"checkpoint-3/{stage}.bin", ident, stage))
    journal.close()
    again, found = await pod.start()
    assert found.pins == [] and again.state.pinned == {}
    assert sorted(os.listdir(pod.staging)) == ["12-22-32"]  # the link and the FIFO went; a folder is left alone
    assert secret.read_bytes() == b"outside the folder"  # the link's target untouched


async def test_a_staging_folder_that_is_a_link_is_set_aside_and_nothing_it_points_at_is_removed(
    pod: Pod, tmp_path: Path
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"not ours")
    pod.staging.symlink_to(elsewhere)
    _, found = await pod.start()
    assert found.pins == []
    assert (elsewhere / "precious").read_bytes() == b"not ours"
    assert pod.staging.is_dir() and not pod.staging.is_symlink() and os.listdir(pod.staging) == []


async def test_pins_of_a_corrupt_journal_are_adopted_only_if_staging_holds_that_very_file(pod: Pod):
    """The staging link may be the only copy of a rotated file: a corrupt journal costs it only if
    the link is not provably the file its pinned line names."""
    pod.staging.mkdir()
    kept, changed = pod.root / "checkpoint-3" / "kept.bin", pod.root / "checkpoint-3" / "changed.bin"
    kept.parent.mkdir()
    kept.write_bytes(b"rotated away")
    changed.write_bytes(b"was this")
    lines = b""
    for path in (kept, changed):
        ident = Identity.stat(str(path))
        stage = f"{ident.ino}-{ident.mtime_ns}-{ident.size}"
        os.link(path, pod.staging / stage)
        relpath = f"checkpoint-3/{path.name}"
        lines += line({"op": "pinned", "relpath": relpath, "identity": ident.__dict__, "stage": stage})
    with open(changed, "r+b") as f:  # rewritten in place since: another version under that name
        f.write(b"now that")
    os.unlink(kept)
    os.unlink(changed)
    pod.journal_path.write_bytes(lines + b"\xff garbage\n" + UNPIN)
    journal, found = await pod.start()
    assert journal.set_aside is not None
    assert [p.relpath for p in found.pins] == ["checkpoint-3/kept.bin"]
    pin = found.pins[0]
    fd = pin.open()
    try:
        assert os.pread(fd, 100, 0) == b"rotated away"
    finally:
        os.close(fd)
    assert [p.relpath for p in journal.state.pinned.values()] == ["checkpoint-3/kept.bin"]  # journaled anew
    assert os.listdir(pod.staging) == [pin.stage]
    pin.release()


async def test_a_manifest_path_reached_through_a_link_is_not_read(pod: Pod, tmp_path: Path):
    """Reconciliation hashes local files; one behind a link to outside the folder is not ours to read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (pod.root / "checkpoint-4").symlink_to(outside)
    key = layout.file_key("proj", "job-1", 0, "checkpoint-4/secret")
    etag = await pod.store.put(key, b"secret")
    files = [StoredFile("checkpoint-4/secret", 6, hashlib.sha256(b"secret").hexdigest(), key, etag)]
    await write_manifest(pod.store, build_manifest("proj", "job-1", 0, "checkpoint-4", files, "marker", {}))
    journal, found = await pod.start()
    assert sorted(journal.state.stored) == ["checkpoint-1/model.bin"]
    assert found.committed == ["checkpoint-1"]


def test_a_record_the_journal_could_not_replay_is_refused_not_written(tmp_path: Path):
    """Else one bad record would set the whole journal aside at the next start."""
    path = tmp_path / "journal.jsonl"
    journal = jr.Journal(str(path))
    journal.open()
    with capture_logs() as logs:
        journal.record("stored", jr.Stored("../escape", Identity(1, 2, 3, 4), SHA, "k", "e"))
        journal.record("unpinned", stage="a/b")
    journal.record("unpinned", stage="1-2-3")
    assert [e["event"] for e in logs] == ["journal record refused"] * 2
    assert journal.state.stored == {}
    journal.close()
    assert path.read_bytes() == b""
    again = jr.Journal(str(path))
    again.open()
    assert again.set_aside is None
    again.close()


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
START = """
import asyncio, json, sys
from daemon.storage.local import LocalStorage
from daemon.upload import journal as jr
from daemon.upload.health import StoreHealth
from daemon.upload.pin import Staging
from daemon.upload.recover import Rank, recover
from daemon.upload.statedir import journal_path, staging_dir

async def main(root, store):
    journal = jr.Journal(journal_path(root, 0))
    journal.open()
    async with LocalStorage(store) as storage:
        found = await recover(root=root, journal=journal, staging=Staging(staging_dir(root, 0)), storage=storage,
                              health=StoreHealth(), rank=Rank("proj", "job-1", 0))
    journal.close()
    print("RESULT", json.dumps({"set_aside": journal.set_aside, "stored": sorted(journal.state.stored),
                                "committed": found.committed, "error": journal.error}))

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.integration  # a subprocess as another user: root reads every file (FIELD-NOTES §7)
async def test_an_unreadable_journal_is_set_aside(pod: Pod):
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        base = Path(folder)
        base.chmod(0o755)
        root, store = base / "ckpt", base / "store"
        shutil.copytree(pod.root, root)
        shutil.copytree(pod.store.root, store)
        journal = Path(journal_path(str(root), 0))
        journal.parent.mkdir(exist_ok=True)
        journal.write_bytes(CLAIM)  # a valid journal, but its owner may not read it
        journal.chmod(0)
        subprocess.run(["chown", "-R", "65534:65534", str(root), str(store)], check=True)
        done = subprocess.run(
            [*AS_NOBODY, sys.executable, "-c", START, str(root), str(store)],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        result = json.loads(done.stdout.split("RESULT ", 1)[1])
        assert "unreadable: EACCES (Permission denied)" in done.stdout
        assert result["set_aside"].startswith(str(journal) + ".corrupt-")
        assert result["stored"] == ["checkpoint-1/model.bin"] and result["committed"] == ["checkpoint-1"]
        assert result["error"] is None


STATE_NOT_A_FOLDER: list[tuple[str, Callable[[Path, Path], None]]] = [
    ("symlink-to-a-folder", lambda state, outside: state.symlink_to(outside)),
    ("dangling-symlink", lambda state, outside: state.symlink_to(outside / "nothing")),
    ("regular-file", lambda state, outside: state.write_bytes(b"not a folder")),
    ("fifo", lambda state, outside: os.mkfifo(state)),
]


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "journal-alone"])
@pytest.mark.parametrize("make", [c[1] for c in STATE_NOT_A_FOLDER], ids=[c[0] for c in STATE_NOT_A_FOLDER])
async def test_a_state_folder_that_is_not_a_folder_is_set_aside_and_nothing_lands_outside(
    pod: Pod, tmp_path: Path, make, prepared: bool
):
    outside = tmp_path / "outside"
    outside.mkdir()
    state = pod.root / ".ckptd"
    state.rmdir()
    make(state, outside)
    if prepared:
        statedir.prepare(str(pod.root), RANK.rank)  # what the engine should do first
    journal, found = await pod.start()
    assert state.is_dir() and not state.is_symlink() and pod.staging.is_dir()
    [aside] = [p.name for p in pod.root.iterdir() if p.name.startswith(".ckptd.corrupt-")]
    assert statedir.is_state(aside) and statedir.is_state(f"{aside}/x")  # never scanned nor uploaded
    assert os.listdir(outside) == []  # no staging folder, no journal out there
    assert found.reconciled == 1 and journal.not_ready() == []
