"""Each metric's value after known events, read from the registry with get_sample_value."""

from __future__ import annotations

import os
import time

from engines import config, counter, s3_flags, until
from proxy import Proxy

from daemon.commands.common import storage_for
from daemon.upload.engine import Engine

KIND = "integration"


def gauge(name: str) -> float | None:
    from daemon import metrics

    return metrics.REGISTRY.get_sample_value(name)


async def test_upload_commit_and_skip_metrics(tmp_path):
    c = config(tmp_path, f"file://{tmp_path}/store")
    names = [
        "ckptd_uploaded_files_total",
        "ckptd_uploaded_bytes_total",
        "ckptd_upload_lag_seconds_count",
        "ckptd_checkpoints_committed_total",
    ]
    before = {n: counter(n) for n in names}
    skipped = {r: counter("ckptd_files_skipped_total", reason=r) for r in ("ignored", "unchanged", "vanished")}
    ckpt = tmp_path / "ckpt"
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        (ckpt / "checkpoint-3").mkdir()
        (ckpt / "checkpoint-3" / "model.bin").write_bytes(b"m" * 1000)
        (ckpt / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
        (ckpt / "scratch.tmp").write_text("ignored")
        with open(ckpt / "gone.bin", "wb") as f:  # closed after it was deleted: never complete
            f.write(b"partial")
            os.unlink(ckpt / "gone.bin")
        await until(lambda: counter("ckptd_checkpoints_committed_total") > before[names[3]], 30, "the commit")
        open(ckpt / "checkpoint-3" / "model.bin", "ab").close()  # a close event, nothing changed
        await until(
            lambda: counter("ckptd_files_skipped_total", reason="unchanged") > skipped["unchanged"],
            30,
            "the unchanged skip",
        )
        assert gauge("ckptd_pending_files") == 0 and gauge("ckptd_oldest_pending_age_seconds") == 0
        assert gauge("ckptd_checkpoint_dir_free_bytes") > 0
        await engine.shutdown()
    assert counter(names[0]) - before[names[0]] == 2
    assert counter(names[1]) - before[names[1]] == 1000 + len('{"global_step": 3}')
    assert counter(names[2]) - before[names[2]] == 2
    assert counter(names[3]) - before[names[3]] == 1
    assert gauge("ckptd_last_committed_step") == 3
    assert abs(gauge("ckptd_last_commit_timestamp_seconds") - time.time()) < 60
    for reason in ("ignored", "vanished"):
        assert counter("ckptd_files_skipped_total", reason=reason) - skipped[reason] == 1, reason


async def test_pending_retry_and_failure_metrics(tmp_path, moto_bucket):
    proxy = Proxy(int(moto_bucket.server.endpoint_url.rsplit(":", 1)[1]))
    c = config(tmp_path, **{**s3_flags(moto_bucket), "s3_endpoint_url": proxy.endpoint})
    retries = counter("ckptd_upload_retries_total", reason="NetworkError")
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        proxy.down()
        (tmp_path / "ckpt" / "a.bin").write_bytes(b"a" * 4000)
        (tmp_path / "ckpt" / "b.bin").write_bytes(b"b" * 6000)
        await until(lambda: gauge("ckptd_pending_files") == 2, 30, "both files complete and pending")
        await until(lambda: counter("ckptd_upload_retries_total", reason="NetworkError") > retries, 30, "retries")
        assert gauge("ckptd_pending_files") == 2 and gauge("ckptd_pending_bytes") == 10_000
        await until(lambda: gauge("ckptd_oldest_pending_age_seconds") > 1, 30, "pending age to grow")
        proxy.up()
        await until(lambda: gauge("ckptd_pending_files") == 0, 60, "uploads after recovery")
        assert gauge("ckptd_oldest_pending_age_seconds") == 0
        await engine.shutdown()
    proxy.down()


async def test_permanent_failures_are_counted_by_code(tmp_path, moto_bucket):
    flags = {**s3_flags(moto_bucket), "storage": "s3://no-such-bucket-metrics/ckptd", "drain_timeout": "1"}
    c = config(tmp_path, **flags)
    failures = counter("ckptd_upload_failures_total", reason="NoSuchBucket")
    async with storage_for(c) as storage:
        engine = Engine(c, storage)
        await engine.startup()
        (tmp_path / "ckpt" / "a.bin").write_bytes(b"a")
        await until(lambda: counter("ckptd_upload_failures_total", reason="NoSuchBucket") > failures, 30, "failure")
        assert gauge("ckptd_pending_files") == 1  # not stored, so still pending: the alert sees it
        report = await engine.shutdown()
    assert not report.ok and report.not_stored == ["a.bin"]
