"""`ckptd watch` end to end: a real subprocess, real inotify, real S3 servers (moto, JuiceFS)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from daemons import JOB, PROJECT, Daemon, base_env, incomplete_uploads, manifests, s3_args, sha256, stored_objects

MiB = 1 << 20


@pytest.fixture
def watch(tmp_path):
    started: list[Daemon] = []

    def start(bucket, *extra: str, ckpt: Path | None = None, env: dict | None = None) -> Daemon:
        ckpt = ckpt or tmp_path / "ckpt"
        exit_file = tmp_path / f"exit-{len(started)}"
        args = ["watch", *s3_args(bucket), "--checkpoint-dir", str(ckpt), "--project", PROJECT, "--job-id", JOB,
                "--settle-time", "0.1", "--metrics-addr", "127.0.0.1:0", "--exit-when", str(exit_file), "--drain-timeout", "60", *extra]  # fmt: skip
        d = Daemon(args, {**base_env(), **bucket.server.env(), **(env or {})}, tmp_path / f"watch-{len(started)}.log")
        d.exit_file = exit_file
        started.append(d)
        d.wait_event("watching")
        return d

    yield start
    for d in started:
        d.kill()


def drain(d: Daemon, timeout: float = 120) -> int:
    d.exit_file.touch()
    return d.wait(timeout)


def write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return sha256(data)


def hf_trainer(root: Path, saves: int, interval: float, keep: int = 2) -> dict[str, str]:
    """Write Hugging Face-style checkpoint folders and rotate like save_total_limit=keep."""
    expected: dict[str, str] = {}
    for step in range(1, saves + 1):
        folder = root / f"checkpoint-{step}"
        for name, size in (("training_args.bin", 2048), ("model.safetensors", 2 * MiB), ("optimizer.pt", MiB),
                           ("rng_state.pth", 14_000)):  # fmt: skip
            expected[f"{folder.name}/{name}"] = write(folder / name, os.urandom(size))
        state = {"global_step": step, "log_history": [{"eval_loss": 1 / step, "step": step}]}
        expected[f"{folder.name}/trainer_state.json"] = write(folder / "trainer_state.json", json.dumps(state).encode())
        if step > keep:
            shutil.rmtree(root / f"checkpoint-{step - keep}")
        time.sleep(interval)  # the trainer's pace between saves
    return expected


def test_rotating_hf_checkpoints_are_all_stored_and_committed(watch, s3_bucket, tmp_path):
    d = watch(s3_bucket)
    expected = hf_trainer(tmp_path / "ckpt", saves=20, interval=0.1)
    assert drain(d) == 0, d.tail()
    stored = stored_objects(s3_bucket)
    assert {k: sha256(v) for k, v in stored.items()} == expected
    committed = manifests(s3_bucket)
    assert sorted(committed) == sorted(f"checkpoint-{s}" for s in range(1, 21))
    for name, manifest in committed.items():
        files = {f["path"]: f["sha256"] for f in manifest["files"]}
        assert files == {k: v for k, v in expected.items() if k.startswith(name + "/")}
        assert manifest["step"] == int(name.split("-")[1]) and manifest["reason"] == "marker"
        assert manifest["metrics"]["eval_loss"] == pytest.approx(1 / manifest["step"])


def test_every_way_of_writing_ends_with_the_final_content(watch, s3_bucket, tmp_path):
    ckpt = tmp_path / "ckpt"
    d = watch(s3_bucket)
    expected = {}
    # write-then-rename, as Lightning and fsspec do
    expected["ren/model.bin"] = write(ckpt / "ren" / "model.bin.tmp", os.urandom(300_000))
    os.rename(ckpt / "ren" / "model.bin.tmp", ckpt / "ren" / "model.bin")
    # makedirs and an immediate write, many times: the new-directory race
    for i in range(20):
        expected[f"step-{i}/a/b/c/shard.bin"] = write(ckpt / f"step-{i}" / "a" / "b" / "c" / "shard.bin", os.urandom(1000))
    # moved in from outside the watched tree
    outside = tmp_path / "outside" / "moved.bin"
    expected["moved/moved.bin"] = write(outside, os.urandom(200_000))
    (ckpt / "moved").mkdir()
    os.rename(outside, ckpt / "moved" / "moved.bin")
    # rewritten in place after a first close (and first upload)
    write(ckpt / "inplace" / "state.bin", b"version one")
    d.wait_event("uploaded", where=lambda e: e["path"] == "inplace/state.bin")
    expected["inplace/state.bin"] = write(ckpt / "inplace" / "state.bin", b"version two, longer")
    assert drain(d) == 0, d.tail()
    assert {k: sha256(v) for k, v in stored_objects(s3_bucket).items()} == expected


def test_open_ignored_and_deleted_files_are_never_stored(watch, s3_bucket, tmp_path):
    ckpt = tmp_path / "ckpt"
    d = watch(s3_bucket)
    held = open(ckpt / "still-writing.bin", "wb")  # noqa: SIM115 - held open across the drain
    held.write(os.urandom(MiB))
    held.flush()
    for name in ("x.tmp", "y.part", "z.lock", "tmp-checkpoint-3/model.bin", ".model.bin.swp"):
        write(ckpt / name, b"temporary")
    write(ckpt / os.fsdecode(b"not-utf8-\xff.bin"), b"no S3 key can name this")
    with open(ckpt / "deleted.bin", "wb") as f:
        f.write(b"half a checkpoint")
        os.unlink(ckpt / "deleted.bin")
    write(ckpt / "sentinel.bin", b"done")
    d.wait_event("uploaded", where=lambda e: e["path"] == "sentinel.bin")
    assert drain(d) == 0, d.tail()
    held.close()
    assert list(stored_objects(s3_bucket)) == ["sentinel.bin"]
    assert d.events("drained")[0]["still_being_written"] == ["still-writing.bin"]
    assert "not-utf8" in d.events("file name cannot be stored")[0]["path"]


def test_sigterm_drains_and_exits_0(watch, moto_bucket, tmp_path):
    d = watch(moto_bucket)
    d.wait_event("priority lowered")
    nices = {int(t.name): int((t / "stat").read_text().rsplit(")", 1)[1].split()[16])
             for t in Path(f"/proc/{d.proc.pid}/task").iterdir()}  # fmt: skip
    assert nices[d.proc.pid] == 10  # off the trainer's critical path by default...
    assert 0 in nices.values()  # ...except the detector, which pins files before rotation deletes them
    expected = {"checkpoint-1/model.bin": write(tmp_path / "ckpt" / "checkpoint-1" / "model.bin", os.urandom(MiB))}
    d.signal(signal.SIGTERM)
    assert d.wait(60) == 0, d.tail()
    assert {k: sha256(v) for k, v in stored_objects(moto_bucket).items()} == expected
    assert d.events("signal received")[0]["signal"] == "SIGTERM"


def test_permanent_error_is_reported_at_once_and_exits_4(watch, s3_bucket, tmp_path):
    started = time.monotonic()
    d = watch(dataclasses.replace(s3_bucket, name="no-such-bucket-ckptd"))
    write(tmp_path / "ckpt" / "checkpoint-1" / "model.bin", b"weights")
    failed = d.wait_event("upload failed", timeout=10)
    assert failed["code"] == "NoSuchBucket" and failed["transient"] is False
    assert time.monotonic() - started < 10
    assert drain(d, timeout=30) == 4
    assert d.events("retrying") == []
    assert d.events("storage not usable at start")[0]["code"] == "NoSuchBucket"


def test_wrong_credentials_are_reported_at_once_and_exit_4(watch, juicefs_bucket, tmp_path):
    d = watch(juicefs_bucket, env={"AWS_SECRET_ACCESS_KEY": "not-the-secret-key"})
    write(tmp_path / "ckpt" / "model.bin", b"weights")
    failed = d.wait_event("upload failed", timeout=10)
    assert failed["code"] in ("SignatureDoesNotMatch", "InvalidAccessKeyId") and failed["transient"] is False
    assert drain(d, timeout=30) == 4
    assert d.events("retrying") == []
    assert "not-the-secret-key" not in d.log.read_text()


def test_sigkill_mid_multipart_resumes_and_leaves_no_incomplete_upload(watch, juicefs_bucket, tmp_path):
    ckpt = tmp_path / "ckpt"
    small = {f"checkpoint-1/small-{i}.bin": write(ckpt / "checkpoint-1" / f"small-{i}.bin", os.urandom(1000))
             for i in range(5)}  # fmt: skip
    block = os.urandom(MiB)
    big = ckpt / "checkpoint-1" / "model.bin"
    with open(big, "wb") as f:
        for i in range(1024):
            f.write(i.to_bytes(8, "little") + block[8:])
    first = watch(juicefs_bucket, "--bandwidth-limit", "48MiB")
    for name in small:
        first.wait_event("uploaded", where=lambda e, n=name: e["path"] == n)

    def parts_stored() -> int:
        uploads = incomplete_uploads(juicefs_bucket)
        if not uploads:
            return 0
        listed = juicefs_bucket.client.list_parts(Bucket=juicefs_bucket.name, Key=uploads[0]["Key"],
                                                  UploadId=uploads[0]["UploadId"])  # fmt: skip
        return len(listed.get("Parts", []))

    from daemons import wait_for

    wait_for(lambda: parts_stored() >= 4, 60, "four parts stored")
    first.signal(signal.SIGKILL)
    first.wait()

    second = watch(juicefs_bucket)
    resumed = second.wait_event("multipart upload resumed", timeout=30)
    assert resumed["parts_reused"] >= 4
    assert drain(second) == 0, second.tail()
    assert not [e for e in second.events("uploaded") if e["path"] in small]
    stored = stored_objects(juicefs_bucket)
    assert sha256(stored["checkpoint-1/model.bin"]) == sha256(big.read_bytes())
    assert incomplete_uploads(juicefs_bucket) == []


def test_memory_stays_bounded_for_a_4gib_file_and_1000_small_files(watch, juicefs_bucket, tmp_path):
    """Also: /healthz answers promptly all along (the event loop is never blocked for long)."""
    ckpt = tmp_path / "ckpt"
    d = watch(juicefs_bucket)
    healthz = "http://" + d.wait_event("serving metrics and health")["address"] + "/healthz"
    peak = [0]
    probes: list[tuple[int, float, float]] = []  # (status, seconds to answer, loop lag it reported)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set() and d.proc.poll() is None:
            try:
                peak[0] = max(peak[0], d.peak_rss())
                started = time.monotonic()
                with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(healthz, timeout=10) as r:
                    probes.append((r.status, time.monotonic() - started, json.loads(r.read())["loop_lag_seconds"]))
            except (OSError, AssertionError):
                return
            stop.wait(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    block = os.urandom(4 * MiB)
    with open(ckpt / "huge.bin", "wb") as f:
        for i in range(1024):
            f.write(i.to_bytes(8, "little") + block[8:])
    for i in range(1000):
        write(ckpt / "small" / f"f{i:04}.bin", os.urandom(2000))
    d.wait_event("uploaded", timeout=300, where=lambda e: e["path"] == "huge.bin")
    peak[0] = max(peak[0], d.peak_rss())
    assert drain(d, timeout=300) == 0, d.tail()
    stop.set()
    sampler.join()
    print(f"peak RSS {peak[0] / MiB:.0f} MiB; /healthz: {len(probes)} probes, slowest answer "
          f"{max(p[1] for p in probes):.3f} s, largest loop lag {max(p[2] for p in probes):.3f} s")
    assert peak[0] < 250 * MiB
    assert len(probes) > 20 and all(status == 200 for status, _, _ in probes)
    assert max(p[1] for p in probes) < 1.0 and max(p[2] for p in probes) < 0.5
    stored = stored_objects_count(juicefs_bucket)
    assert stored == 1001


def stored_objects_count(bucket) -> int:
    prefix = f"ckptd/training_projects/{PROJECT}/jobs/{JOB}/rank-0/"
    pages = bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix)
    return sum(len(p.get("Contents", [])) for p in pages)
