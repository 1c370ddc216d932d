"""`ckptd restore` as an init container runs it — a real subprocess against a real S3 server
(moto) — killed mid-download, facing a link, facing a lying store (issue 10).

The kill: a TCP proxy in front of moto passes everything, except that the response to a GET of
the big file stops after a few bytes and stays open, so the download is in flight for as long as
the test wants; the test waits until the small files are staged, then SIGKILLs the process."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from daemons import PREFIX, Daemon, base_env, s3_args, wait_for
from invariants import marked_but_incomplete
from test_resolve import T0, commit
from test_restorer import tree

from daemon.catalog import layout
from daemon.config.refs import NAMED
from daemon.restore.restorer import STAGING_PREFIX

KIND = "integration"

FILES = {
    "model.safetensors": random.Random(7).randbytes(4 << 20),
    "config.json": b'{"hidden": 8}',
    "trainer_state.json": b'{"global_step": 20}',
    "sub/optimizer.pt": random.Random(8).randbytes(1000),
}


class StallProxy:
    """Forwards TCP to `port`; a connection whose request names `needle` gets `allow` bytes of
    its response, then nothing more until `close()`."""

    def __init__(self, port: int, needle: bytes, allow: int = 4096) -> None:
        self.target, self.needle, self.allow = ("127.0.0.1", port), needle, allow
        self.stalled = threading.Event()
        self.socks: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            flag = threading.Event()  # this connection asked for the needle
            threading.Thread(target=self._pump, args=(client, upstream, flag, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, flag, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, flag: threading.Event, request: bool) -> None:
        sent = 0
        try:
            while data := src.recv(1 << 16):
                if request and self.needle in data:
                    flag.set()
                if not request and flag.is_set():
                    data = data[: max(0, self.allow - sent)]
                    sent += len(data)
                    if sent >= self.allow:
                        dst.sendall(data)
                        self.stalled.set()
                        return  # held open: the client waits for the rest of the body
                dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.listener.close()
        for s in self.socks:
            s.close()


@pytest.fixture
async def source(moto_bucket):
    async with moto_bucket.storage(PREFIX) as store:
        await commit(store, "proj", "src", 0, "checkpoint-20", FILES, T0)
        yield store


def restore_cmd(bucket, folder: Path, ref: dict, endpoint: str | None = None) -> list[str]:
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"load_checkpoint_config": {"enabled": True, "checkpoints": [ref]}})
    )
    storage = s3_args(bucket)
    if endpoint:
        storage[storage.index("--s3-endpoint-url") + 1] = endpoint
    return ["restore", "--config", str(folder / "config.yaml"), *storage, "--project", "proj", "--restore-dir",
            str(folder / "out")]  # fmt: skip


NAMED_20 = {"typ": NAMED, "job_id": "src", "checkpoint_name": "checkpoint-20", "required": True}


def run_restore(bucket, folder: Path, ref: dict = NAMED_20, endpoint: str | None = None) -> tuple[int, Daemon]:
    d = Daemon(restore_cmd(bucket, folder, ref, endpoint), {**base_env(), **bucket.server.env()}, folder / "ckptd.log")
    return d.wait(60), d


def small_files_landed(out: Path) -> bool:
    """Every file but the big one is written somewhere below `out`, under whatever name."""
    found = {p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    return all(data in found for name, data in FILES.items() if name != "model.safetensors")


def test_sigkill_mid_download_leaves_no_marked_incomplete_folder(moto_bucket, source, tmp_path):
    proxy = StallProxy(urlparse(moto_bucket.server.endpoint_url).port, b"model.safetensors")
    rank = tmp_path / "out" / "rank-0"
    d = Daemon(
        restore_cmd(moto_bucket, tmp_path, NAMED_20, proxy.endpoint),
        {**base_env(), **moto_bucket.server.env()},
        tmp_path / "killed.log",
    )
    try:
        landed = lambda: proxy.stalled.is_set() and small_files_landed(tmp_path / "out")  # noqa: E731
        wait_for(landed, 30, "the small files written, the big one in flight")
        d.signal(signal.SIGKILL)
        assert d.wait(10) == -signal.SIGKILL
    finally:
        d.kill()
        proxy.close()
    # What the trainer could find now: nothing of checkpoint-20, and no folder claims to be it.
    assert not (rank / "checkpoint-20").exists()
    assert marked_but_incomplete(tmp_path / "out", set(FILES)) == []
    assert [p.name.startswith(STAGING_PREFIX) for p in rank.iterdir()] == [True]  # what the kill left

    code, again = run_restore(moto_bucket, tmp_path)
    assert code == 0, again.tail()
    assert tree(rank) == {f"checkpoint-20/{k}": v for k, v in FILES.items()}
    assert [p.name for p in rank.iterdir()] == ["checkpoint-20"]  # the killed restore's folder reclaimed
    assert again.events("removed the staging folder of an interrupted restore")


def test_link_in_the_way_exits_3_naming_it(moto_bucket, source, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_bytes(b"precious")
    link = tmp_path / "out" / "rank-0" / "checkpoint-20"
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    code, d = run_restore(moto_bucket, tmp_path)
    assert code == 3, d.tail()
    failed = d.events("restore failed: training not started")
    assert failed and str(link) in failed[0]["error"] and "link" in failed[0]["error"]
    assert "Traceback" not in d.log.read_text()
    assert [p.name for p in victim.iterdir()] == ["keep.txt"] and (victim / "keep.txt").read_bytes() == b"precious"


async def test_lying_manifest_exits_3_naming_the_key(moto_bucket, source, tmp_path):
    key = layout.manifest_key("proj", "src", 0, "checkpoint-20")
    m = json.loads(await source.get(key))
    m["files"][0]["sha256"] = "0" * 64  # checkpoint-20/config.json: not what the object holds
    await source.put(key, json.dumps(m).encode())
    code, d = run_restore(moto_bucket, tmp_path)
    assert code == 3, d.tail()
    failed = d.events("restore failed: training not started")
    assert failed and layout.file_key("proj", "src", 0, "checkpoint-20/config.json") in failed[0]["error"]
    assert "Traceback" not in d.log.read_text()
    assert list((tmp_path / "out" / "rank-0").iterdir()) == []  # nothing handed to the trainer


def test_json_with_nothing_to_restore_prints_an_empty_report(tmp_path):
    """`--json` always prints a report when it exits 0, so a script never parses empty output."""
    argv = [sys.executable, "-m", "daemon", "restore", "--storage", f"file://{tmp_path}/store",
            "--restore-dir", str(tmp_path / "out"), "--json"]  # fmt: skip
    r = subprocess.run(argv, env=base_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["files"] == 0 and report["restored"] == [] and report["missing"] == []
