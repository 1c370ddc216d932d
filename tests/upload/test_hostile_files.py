"""Hostile files in the checkpoint folder, through a real `ckptd watch` on a file:// store (issue 10,
defects 1, 3 and 4 and the bad-input matrix).

One daemon per watch mode (inotify, poll) runs as an unprivileged user, so an unreadable file is
really unreadable (root reads everything). The test prepares a checkpoint folder holding every
case, renames it into the watched folder as a trainer would, plants links to the outside directly
in the watched folder, waits until the daemon has stored or skipped everything, ends it with the
--exit-when file and keeps what it stored, logged and counted. Each case is then a test of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemons import JOB, PROJECT, Daemon, base_env, wait_for
from servers import free_port
from unprivileged import REPO, as_nobody, give, open_folder

from daemon.catalog import layout

KIND = "integration"

SECRET = b"outside secret " + secrets.token_hex(16).encode()  # found in no stored object, ever
SECRET_DIR_FILE = b"outside folder file " + secrets.token_hex(16).encode()
OUTSIDE_CONTENTS = (SECRET, SECRET_DIR_FILE)
LONG = "a" * 251 + ".bin"  # a 255-byte name component, the most Linux allows
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Case:
    """One entry of the checkpoint: `make(folder, outside)` creates it under checkpoint-1, and
    returns the content expected in the store (None: must not be stored)."""

    id: str
    relpath: str
    make: Callable[[Path, Path], bytes | None]
    skip: str | None = None  # the FILES_SKIPPED reason it is counted under, once


def regular(data: bytes) -> Callable[[Path, Path], bytes]:
    def make(path: Path, outside: Path) -> bytes:
        path.write_bytes(data)
        return data

    return make


def link(target: Callable[[Path], str]) -> Callable[[Path, Path], None]:
    def make(path: Path, outside: Path) -> None:
        os.symlink(target(outside), path)

    return make


def fifo(path: Path, outside: Path) -> None:
    os.mkfifo(path)


def unix_socket(path: Path, outside: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def char_device(path: Path, outside: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))


def unreadable(path: Path, outside: Path) -> None:
    path.write_bytes(b"nobody may read this")
    path.chmod(0o000)


def loop_pair(path: Path, outside: Path) -> None:
    os.symlink(path.name + "-b", path)
    os.symlink(path.name, path.with_name(path.name + "-b"))


C1 = "checkpoint-1"
CASES = [
    Case("spaces", f"{C1}/name with  spaces .bin", regular(b"spaces")),
    Case("unicode", f"{C1}/模型-權重-ü-é.bin", regular(b"unicode")),
    Case("emoji", f"{C1}/rocket-🚀.bin", regular(b"emoji")),
    Case("255-byte-name", f"{C1}/{LONG}", regular(b"long name")),
    Case("leading-dash", f"{C1}/-rf --help.bin", regular(b"dash")),
    Case("newline", f"{C1}/line\nbreak.bin", regular(b"newline")),
    Case("tab-and-quotes", f"{C1}/tab\there 'single' \"double\".bin", regular(b"quotes")),
    Case("url-like", f"{C1}/a%2Fb?x=1&y#frag.bin", regular(b"url")),
    Case("zero-bytes", f"{C1}/empty.bin", regular(b"")),
    Case("nested", f"{C1}/sub/deeper/still/model.bin", regular(os.urandom(300_000))),
    Case("link-to-file-inside", f"{C1}/alias.bin", link(lambda o: "name with  spaces .bin"), "symlink"),
    Case("link-to-file-outside", f"{C1}/stolen.bin", link(lambda o: str(o / "secret.txt")), "symlink"),
    Case("link-to-etc", f"{C1}/etc", link(lambda o: "/etc"), "symlink"),
    Case("link-to-folder-outside", f"{C1}/outdir", link(lambda o: str(o / "dir")), "symlink"),
    Case("link-loop-to-self", f"{C1}/loop", link(lambda o: "."), "symlink"),
    Case("link-loop-pair", f"{C1}/ping", loop_pair, "symlink"),
    Case("dangling-link", f"{C1}/dangling", link(lambda o: "does/not/exist"), "symlink"),
    Case("fifo", f"{C1}/pipe", fifo, "not_regular"),
    Case("unix-socket", f"{C1}/sock", unix_socket, "not_regular"),
    Case("char-device", f"{C1}/null-device", char_device, "not_regular"),
]
UNREADABLE = "checkpoint-2/unreadable.bin"
PLANTED = {"etc": "symlink", "loop": "symlink"}  # made in the watched folder itself, after start
SYMLINKS = sum(c.skip == "symlink" for c in CASES) + 1 + len(PLANTED)  # the pair is two links
NOT_REGULAR = sum(c.skip == "not_regular" for c in CASES)


@dataclass
class Trial:
    mode: str
    exit_code: int
    expected: dict[str, bytes]  # regular files and their content
    stored: dict[str, bytes]  # relpath -> content of each stored checkpoint file
    manifests: dict[str, dict]
    events: list[dict]
    metrics: str
    log: str = field(repr=False, default="")

    def said(self, event: str, path: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event and e.get("path") == path]

    def sample(self, name: str, **labels: str) -> float:
        return sample(self.metrics, name, **labels)


def sample(metrics: str, name: str, **labels: str) -> float:
    """A sample of Prometheus text, 0 if absent (a counter never incremented has no labelled line)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{{want}}} " if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class NobodyDaemon(Daemon):
    """tests/daemons.py's Daemon, run as user nobody."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in wait()
        command = as_nobody([sys.executable, "-m", "daemon", *args])
        self.proc = subprocess.Popen(command, env=env, stdout=self._out, stderr=subprocess.STDOUT, cwd=REPO)


def scrape(port: int) -> str:
    try:
        with _DIRECT.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


def read_store(store: Path) -> tuple[dict[str, bytes], dict[str, dict]]:
    prefix = store / layout.rank_prefix(PROJECT, JOB, 0)
    files = {str(p.relative_to(prefix)): p.read_bytes() for p in prefix.rglob("*") if p.is_file()}
    folder = store / layout.manifest_prefix(PROJECT, JOB, 0)
    manifests = {p.stem: json.loads(p.read_bytes()) for p in folder.glob("*.json")} if folder.exists() else {}
    return files, manifests


def prepare(base: Path) -> dict[str, bytes]:
    """Every case in base/prep/checkpoint-1 (and -2), owned as a trainer running as nobody would."""
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "dir" / "inner.txt").write_bytes(SECRET_DIR_FILE)
    expected = {}
    for case in CASES:
        path = base / "prep" / case.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        data = case.make(path, outside)
        if data is not None:
            expected[case.relpath] = data
    (base / "prep" / "checkpoint-2").mkdir()
    (base / "prep" / "checkpoint-2" / "fine.bin").write_bytes(b"fine")
    expected["checkpoint-2/fine.bin"] = b"fine"
    unreadable(base / "prep" / UNREADABLE, outside)
    for path in (base / "prep").rglob("*"):
        os.chown(path, 65534, 65534, follow_symlinks=False)
    return expected


def run_trial(base: Path, mode: str) -> Trial:
    ckpt, store, home, exit_file = base / "ckpt", base / "store", base / "home", base / "exit"
    for folder in (ckpt, store, home):
        folder.mkdir()
    give(ckpt, store, home)
    expected = prepare(base)
    port = free_port()
    args = ["watch", "--storage", f"file://{store}", "--checkpoint-dir", str(ckpt), "--project", PROJECT]
    args += ["--job-id", JOB, "--settle-time", "0.1", "--metrics-addr", f"127.0.0.1:{port}"]
    args += ["--exit-when", str(exit_file), "--drain-timeout", "30", "--watch-mode", mode]
    env = {**base_env(), "HOME": str(home), "PYTHONPATH": str(REPO)}
    daemon = NobodyDaemon(args, env, base / f"watch-{mode}.log")
    try:
        daemon.wait_event("watching")
        for name in ("checkpoint-1", "checkpoint-2"):  # renamed into place, as trainers do
            os.rename(base / "prep" / name, ckpt / name)
        os.symlink(base / "outside", ckpt / "etc")  # the issue's `ck/etc -> /etc`, with a known secret
        os.symlink(".", ckpt / "loop")

        def settled() -> str | None:
            text = scrape(port)
            done = (
                sample(text, "ckptd_uploaded_files_total") >= len(expected)
                and sample(text, "ckptd_files_skipped_total", reason="symlink") >= SYMLINKS
                and sample(text, "ckptd_files_skipped_total", reason="not_regular") >= NOT_REGULAR
                and sample(text, "ckptd_upload_failures_total", reason="EACCES") >= 1
            )
            return text if done else None

        metrics = wait_for(settled, 60, "every case to be stored, skipped or failing")
        exit_file.touch()
        code = daemon.wait(60)
    finally:
        daemon.kill()
    stored, manifests = read_store(store)
    return Trial(mode, code, expected, stored, manifests, daemon.events(), metrics, daemon.tail(200))


@pytest.fixture(scope="module", params=["inotify", "poll"])
def trial(request: pytest.FixtureRequest) -> Iterator[Trial]:
    with open_folder(f"ckptd-hostile-{request.param}-") as base:
        yield run_trial(base, request.param)


def leaked(trial: Trial) -> list[str]:
    return [k for k, v in trial.stored.items() if any(secret in v for secret in OUTSIDE_CONTENTS)]


@pytest.mark.parametrize("case", [c for c in CASES if c.skip is None], ids=lambda c: c.id)
def test_hostile_names_are_stored_byte_identical(trial: Trial, case: Case):
    assert trial.stored.get(case.relpath) == trial.expected[case.relpath], trial.log
    assert case.relpath in {f["path"] for f in trial.manifests["checkpoint-1"]["files"]}


@pytest.mark.parametrize("case", [c for c in CASES if c.skip is not None], ids=lambda c: c.id)
def test_links_and_special_files_are_skipped_once_and_never_read(trial: Trial, case: Case):
    assert not [k for k in trial.stored if k == case.relpath or k.startswith(case.relpath + "/")]
    assert leaked(trial) == []
    event = "symlink not followed" if case.skip == "symlink" else "not a regular file: skipped, never read"
    assert len(trial.said(event, case.relpath)) == 1, trial.log  # once, however often it is seen


@pytest.mark.parametrize("relpath", sorted(PLANTED), ids=lambda r: f"planted-{r}")
def test_links_planted_in_the_watched_folder_are_not_followed(trial: Trial, relpath: str):
    # Before the fix, poll mode stored the outside secret through `etc`, and `loop` forty times over.
    assert not [k for k in trial.stored if k.split("/")[0] == relpath]
    assert leaked(trial) == []
    assert len(trial.said("symlink not followed", relpath)) == 1


def test_the_skip_counters_moved_once_per_entry(trial: Trial):
    assert trial.sample("ckptd_files_skipped_total", reason="symlink") == SYMLINKS
    assert trial.sample("ckptd_files_skipped_total", reason="not_regular") == NOT_REGULAR


def test_an_unreadable_file_fails_alone_and_the_drain_names_it(trial: Trial):
    assert UNREADABLE not in trial.stored
    assert trial.stored.get("checkpoint-2/fine.bin") == b"fine"  # its neighbours still go
    assert set(trial.stored) == set(trial.expected)  # everything else did too
    assert trial.sample("ckptd_upload_failures_total", reason="EACCES") == 1  # once, not per retry
    [said] = trial.said("cannot read file", UNREADABLE)
    assert (said["op"], said["errno"]) == ("pin", "EACCES")
    [drained] = [e for e in trial.events if e.get("event") == "drained"]
    assert drained["not_stored"] == [UNREADABLE]
    assert trial.exit_code == 4
    assert "checkpoint-2" not in trial.manifests  # not committed without it
    assert set(trial.manifests) == {"checkpoint-1"}
    assert {f["path"] for f in trial.manifests["checkpoint-1"]["files"]} == {c.relpath for c in CASES if c.skip is None}


# --- one unreadable file, as an unprivileged daemon sees it (defect 4) ---


def test_an_unreadable_file_does_not_stop_the_others_and_uploads_once_readable():
    # Before the fix, the EACCES killed the settle task: nothing uploaded after it, ever.
    with open_folder("ckptd-unreadable-") as base:
        ckpt, store, home = base / "ckpt", base / "store", base / "home"
        for folder in (ckpt, store, home, base / "prep"):
            folder.mkdir()
        give(ckpt, store, home)
        port = free_port()
        args = ["watch", "--storage", f"file://{store}", "--checkpoint-dir", str(ckpt), "--project", PROJECT]
        args += ["--job-id", JOB, "--settle-time", "0.1", "--metrics-addr", f"127.0.0.1:{port}"]
        args += ["--exit-when", str(base / "exit"), "--drain-timeout", "30"]
        env = {**base_env(), "HOME": str(home), "PYTHONPATH": str(REPO)}
        daemon = NobodyDaemon(args, env, base / "watch.log")
        prefix = store / layout.rank_prefix(PROJECT, JOB, 0)
        try:
            daemon.wait_event("watching")
            for name, mode in (("locked.bin", 0o000), ("ok.bin", 0o644)):
                (base / "prep" / name).write_bytes(name.encode())
                (base / "prep" / name).chmod(mode)
                give(base / "prep" / name)
            (ckpt / "checkpoint-1").mkdir()
            give(ckpt / "checkpoint-1")
            for name in ("locked.bin", "ok.bin"):
                os.rename(base / "prep" / name, ckpt / "checkpoint-1" / name)
            wait_for((prefix / "checkpoint-1" / "ok.bin").exists, 30, "the readable neighbour to be stored")
            (base / "prep" / "checkpoint-2").mkdir()
            (base / "prep" / "checkpoint-2" / "later.bin").write_bytes(b"later")
            give(base / "prep" / "checkpoint-2", base / "prep" / "checkpoint-2" / "later.bin")
            os.rename(base / "prep" / "checkpoint-2", ckpt / "checkpoint-2")
            wait_for((prefix / "checkpoint-2" / "later.bin").exists, 30, "a later file to be stored")
            wait_for(lambda: sample(scrape(port), "ckptd_upload_failures_total", reason="EACCES") == 1, 30, "EACCES")
            assert not (prefix / "checkpoint-1" / "locked.bin").exists()
            (ckpt / "checkpoint-1" / "locked.bin").chmod(0o644)  # fixed: the retry picks it up
            wait_for((prefix / "checkpoint-1" / "locked.bin").exists, 60, "the file to be stored once readable")
            assert daemon.events("file readable again")
            (base / "exit").touch()
            assert daemon.wait(60) == 0, daemon.tail(60)
        finally:
            daemon.kill()
        stored, manifests = read_store(store)
    assert stored == {
        "checkpoint-1/locked.bin": b"locked.bin",
        "checkpoint-1/ok.bin": b"ok.bin",
        "checkpoint-2/later.bin": b"later",
    }
    assert set(manifests) == {"checkpoint-1", "checkpoint-2"}


# --- the issue's own scenario, on its own: poll mode, `ck/etc -> a folder outside` (defect 1) ---


@pytest.mark.parametrize("mode", ["inotify", "poll"])
@pytest.mark.parametrize("unlocked", [False, True], ids=["still-locked", "unlocked"])
def test_a_folder_that_cannot_be_listed_keeps_its_checkpoint_uncommitted_and_is_named(mode: str, unlocked: bool):
    """Files in a folder ckptd cannot list are files it cannot see, let alone tell complete: the
    checkpoint must not commit without them, and the drain must say so (exit 4), not skip them."""
    with open_folder("ckptd-unlistable-") as base:
        ckpt, store, home = base / "ckpt", base / "store", base / "home"
        for folder in (ckpt, store, home):
            folder.mkdir()
        give(ckpt, store, home)
        hidden = ckpt / "checkpoint-1" / "hidden"
        hidden.mkdir(parents=True)
        give(ckpt / "checkpoint-1")
        for path, data in ((ckpt / "checkpoint-1" / "model.bin", b"model"), (hidden / "shard.bin", b"shard")):
            path.write_bytes(data)
            give(path)
        (ckpt / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
        give(ckpt / "checkpoint-1" / "trainer_state.json")
        hidden.chmod(0o700)  # root's: nobody may not list it
        port = free_port()
        args = ["watch", "--storage", f"file://{store}", "--checkpoint-dir", str(ckpt), "--project", PROJECT]
        args += ["--job-id", JOB, "--settle-time", "0.1", "--metrics-addr", f"127.0.0.1:{port}", "--watch-mode", mode]
        args += ["--exit-when", str(base / "exit"), "--drain-timeout", "30", "--rescan-interval", "1"]
        env = {**base_env(), "HOME": str(home), "PYTHONPATH": str(REPO)}
        daemon = NobodyDaemon(args, env, base / "watch.log")
        prefix = store / layout.rank_prefix(PROJECT, JOB, 0)
        try:
            daemon.wait_event("folder cannot be listed: its files cannot be uploaded")
            wait_for((prefix / "checkpoint-1" / "trainer_state.json").exists, 30, "the visible files to be stored")
            assert sample(scrape(port), "ckptd_upload_failures_total", reason="EACCES") == 1
            if unlocked:
                give(hidden, hidden / "shard.bin")  # now nobody's: the next scan lists it
                wait_for((prefix / "checkpoint-1" / "hidden" / "shard.bin").exists, 30, "the hidden file to be stored")
            (base / "exit").touch()
            code, tail, drained = daemon.wait(60), daemon.tail(60), daemon.events("drained")
        finally:
            daemon.kill()
        stored, manifests = read_store(store)
    if unlocked:
        assert code == 0, tail
        assert set(manifests) == {"checkpoint-1"} and stored["checkpoint-1/hidden/shard.bin"] == b"shard"
    else:
        assert code == 4, tail
        assert manifests == {}
        assert "checkpoint-1/hidden/" in drained[0]["not_stored"]


def test_poll_mode_stores_nothing_a_planted_link_points_at(tmp_path: Path):
    # Before the fix: the outside secret was stored as etc/secret.txt, and every file again under
    # loop/, loop/loop/, ... (40 levels deep).
    ckpt, store, outside = tmp_path / "ckpt", tmp_path / "store", tmp_path / "outside"
    (ckpt / "checkpoint-1").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    args = ["watch", "--storage", f"file://{store}", "--checkpoint-dir", str(ckpt), "--project", PROJECT]
    args += ["--job-id", JOB, "--settle-time", "0.1", "--metrics-addr", "127.0.0.1:0", "--watch-mode", "poll"]
    args += ["--exit-when", str(tmp_path / "exit"), "--drain-timeout", "30"]
    daemon = Daemon(args, base_env(), tmp_path / "watch.log")
    prefix = store / layout.rank_prefix(PROJECT, JOB, 0)
    try:
        daemon.wait_event("watching")
        os.symlink(outside, ckpt / "etc")
        os.symlink(".", ckpt / "loop")
        (ckpt / "checkpoint-1" / "model.bin").write_bytes(b"weights")

        def seen() -> bool:  # the link judged either way: skipped, or followed and stored
            skipped = {e.get("path") for e in daemon.events("symlink not followed")} >= {"etc", "loop"}
            return skipped or (prefix / "etc" / "secret.txt").exists()

        wait_for(seen, 30, "the planted links to be skipped (or followed)")
        wait_for((prefix / "checkpoint-1" / "model.bin").exists, 30, "the checkpoint file to be stored")
        (tmp_path / "exit").touch()
        assert daemon.wait(60) == 0
    finally:
        daemon.kill()
    stored, _ = read_store(store)
    assert [k for k, v in stored.items() if SECRET in v] == []
    assert sorted(stored) == ["checkpoint-1/model.bin"]  # once, not once per loop level


# --- a FIFO written in the folder, with a real daemon (defect 3) ---


def test_a_fifo_does_not_stall_detection_or_the_stop(tmp_path: Path):
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    ckpt.mkdir()
    args = ["watch", "--storage", f"file://{store}", "--checkpoint-dir", str(ckpt), "--project", PROJECT]
    args += ["--job-id", JOB, "--settle-time", "0.1", "--metrics-addr", "127.0.0.1:0", "--watch-mode", "inotify"]
    args += ["--rescan-interval", "600", "--drain-timeout", "10"]  # found by its event, not by a scan
    daemon = Daemon(args, base_env(), tmp_path / "watch.log")
    try:
        daemon.wait_event("watching")
        os.mkfifo(ckpt / "pipe")
        os.close(os.open(ckpt / "pipe", os.O_RDWR))  # written and closed: a close event for the FIFO
        (ckpt / "checkpoint-1").mkdir()
        (ckpt / "checkpoint-1" / "model.bin").write_bytes(b"weights")
        key = store / layout.file_key(PROJECT, JOB, 0, "checkpoint-1/model.bin")
        wait_for(key.exists, 15, "the next file to be stored (detection goes on)")
        daemon.wait_event("not a regular file: skipped, never read", 5)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0  # the stop is not held up by a blocked detector thread
    finally:
        daemon.kill()


# --- a sparse 6 GiB file (bad-input matrix) ---


@pytest.mark.slow
def test_a_sparse_6_gib_file_is_stored_with_its_size_and_checksum(tmp_path: Path):
    size = 6 << 30
    ckpt, store = tmp_path / "ckpt", tmp_path / "store"
    (ckpt / "prep").mkdir(parents=True)
    sparse = ckpt / "prep" / "huge.bin"
    with open(sparse, "wb") as f:
        f.truncate(size)
        f.seek(size // 2)
        f.write(b"middle")  # a hole on either side of a few real bytes
        f.seek(size - 3)
        f.write(b"end")
    digest = hashlib.sha256()
    with open(sparse, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    args = ["watch", "--storage", f"file://{store}", "--checkpoint-dir", str(ckpt), "--project", PROJECT]
    args += ["--job-id", JOB, "--settle-time", "0.1", "--metrics-addr", "127.0.0.1:0"]
    args += ["--exit-when", str(tmp_path / "exit"), "--drain-timeout", "600"]
    daemon = Daemon(args, base_env(), tmp_path / "watch.log")
    key = store / layout.file_key(PROJECT, JOB, 0, "checkpoint-1/huge.bin")
    try:
        daemon.wait_event("watching")
        (ckpt / "checkpoint-1").mkdir()
        os.rename(sparse, ckpt / "checkpoint-1" / "huge.bin")
        wait_for(key.exists, 600, "the 6 GiB file to be stored", interval=1)
        (tmp_path / "exit").touch()
        assert daemon.wait(600) == 0
    finally:
        daemon.kill()
    assert key.stat().st_size == size
    stored = hashlib.sha256()
    with open(key, "rb") as f:
        while chunk := f.read(16 << 20):
            stored.update(chunk)
    assert stored.hexdigest() == digest.hexdigest()
    key.unlink()  # 6 GiB of real blocks: do not leave them to pytest's retention
