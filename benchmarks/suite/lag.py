"""Scenario 5: lag. Files of 1–10 MiB are renamed into the folder at a steady cadence while ckptd
watches; an external observer lists the store every 20 ms and records when each key appears. The
same for a naive sidecar running `aws s3 sync` every 5 s. ckptd's own view comes from scraping its
`ckptd_upload_lag_seconds` histogram.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from . import data, tools
from .ckptd import Watcher, key_prefix
from .store import Store

SYNC_EVERY = 5.0


class Observer(threading.Thread):
    """Lists a prefix every `interval` s; first time each key was seen (wall clock)."""

    def __init__(self, store: Store, bucket: str, prefix: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.store, self.bucket, self.prefix, self.interval = store, bucket, prefix, interval
        self.seen: dict[str, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            now = time.time()
            for rel in self.store.sizes(self.bucket, self.prefix):
                self.seen.setdefault(rel, now)
            self.stop_event.wait(self.interval)


def write_steadily(ckpt: Path, seconds: float, cadence: float, sizes_mib: tuple[int, int]) -> dict[str, float]:
    """One file per `cadence` s for `seconds`; relpath -> wall-clock time of its rename."""
    rng = random.Random(13)
    renamed: dict[str, float] = {}
    start = time.monotonic()
    for i in range(max(1, int(seconds / cadence))):
        rel = f"lag-{i:04}.bin"
        size = rng.randint(sizes_mib[0] * data.MiB, sizes_mib[1] * data.MiB)
        renamed[rel] = data.publish(data.stage([(rel, size)], ckpt))
        time.sleep(max(0.0, start + (i + 1) * cadence - time.monotonic()))  # the cadence, not a wait
    return renamed


def _wait_seen(obs: Observer, keys: dict[str, float], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not set(keys) <= set(obs.seen):
        if time.monotonic() > deadline:
            obs.stop_event.set()  # else it goes on listing a bucket that is about to go, store and all
            raise RuntimeError(f"{len(set(keys) - set(obs.seen))} lag files never appeared in the store")
        time.sleep(0.05)
    obs.stop_event.set()
    obs.join()


def run_ckptd(store: Store, work: Path, opts: dict) -> dict:
    watcher = Watcher(store, work / "lag-ckptd", opts["settle"])
    try:
        obs = Observer(store, watcher.bucket, key_prefix(watcher.job))
        obs.start()
        renamed = write_steadily(watcher.ckpt, opts["lag_seconds"], opts["lag_cadence"], opts["lag_mib"])
        _wait_seen(obs, renamed, 120)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(watcher.metrics_url) as r:
            buckets = histogram(r.read().decode(), "ckptd_upload_lag_seconds")
        lags = [obs.seen[k] - renamed[k] for k in renamed]
        return {"tool": "ckptd", "lags": lags, "histogram": buckets}
    finally:
        watcher.stop()
        shutil.rmtree(work / "lag-ckptd", ignore_errors=True)
        store.drop_bucket(watcher.bucket)


def run_sync(store: Store, work: Path, opts: dict) -> dict:
    ckpt, bucket = work / "lag-sync" / "ckpt", store.new_bucket()
    ckpt.mkdir(parents=True)
    stop = threading.Event()

    def sidecar() -> None:  # the naive loop: sync, sleep 5 s, again; one final sync after the writer
        # Like `while true; do aws s3 sync ...; sleep 5; done`, a failed sync does not end the loop:
        # `aws s3 sync` exits 2 when a file it listed (a temporary name) was gone by the time it read it.
        while True:
            subprocess.run(tools.sync(store, ckpt, bucket, "bench/"), env=store.env, check=False)
            if stop.wait(SYNC_EVERY):
                subprocess.run(tools.sync(store, ckpt, bucket, "bench/"), env=store.env, check=False)
                return

    try:
        obs = Observer(store, bucket, "bench/")
        obs.start()
        loop = threading.Thread(target=sidecar, daemon=True)
        loop.start()
        renamed = write_steadily(ckpt, opts["lag_seconds"], opts["lag_cadence"], opts["lag_mib"])
        _wait_seen(obs, renamed, 120)
        stop.set()
        loop.join(120)
        return {"tool": "aws s3 sync every 5 s", "lags": [obs.seen[k] - renamed[k] for k in renamed]}
    finally:
        stop.set()
        shutil.rmtree(work / "lag-sync", ignore_errors=True)
        store.drop_bucket(bucket)


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a Prometheus histogram in the text format."""
    out = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return sorted(out)
