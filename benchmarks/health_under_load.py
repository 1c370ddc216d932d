"""Health under load: how promptly /healthz answers, and how late the event loop runs, while ckptd
uploads one big file and many small ones. The figures that tests/commands/test_watch.py
(test_memory_stays_bounded_for_a_4gib_file_and_1000_small_files) runs the same scenario for, but
does not time.

Starts a local JuiceFS gateway (a MinIO-derived S3 server) on 127.0.0.1 and `ckptd watch` on a
fresh checkpoint folder, probes /healthz every --probe-interval seconds from the start, writes the
big file (real bytes) and then the small ones, waits until every file is uploaded, drains, and
prints peak RSS, the /healthz answer times and reported loop lag (all along, and while the big file
was uploading), and throughput. Everything it writes lives in one temporary folder, removed at the
end, with the gateway stopped.

    .venv/bin/python benchmarks/health_under_load.py --size-gib 4
    .venv/bin/python benchmarks/health_under_load.py --size-gib 0.25 --small-files 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import servers  # noqa: E402
from daemons import Daemon, base_env, wait_for, watch_args  # noqa: E402

MiB = 1 << 20
BLOCK = 4 * MiB


@dataclass
class Probe:
    at: float  # monotonic time the request was sent
    status: int | str  # HTTP status, or the error
    seconds: float  # time to the full answer
    loop_lag: float | None  # what the daemon reported
    uploading: bool  # sent after the big file was written and before its upload was seen done


class Prober(threading.Thread):
    """Probes /healthz at a steady pace; also samples the daemon's resident memory."""

    def __init__(self, url: str, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.pid, self.interval = url, pid, interval
        self.probes: list[Probe] = []
        self.rss_samples: list[int] = []
        self.written, self.big_stored, self.stop = threading.Event(), threading.Event(), threading.Event()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.rss_samples.append(status_kib(self.pid, "VmRSS") * 1024)
            except OSError:  # the daemon is gone: the main thread reports why
                return
            uploading = self.written.is_set() and not self.big_stored.is_set()
            started = time.monotonic()
            try:
                with self._opener.open(self.url, timeout=60) as r:
                    body = json.loads(r.read())
                    self.probes.append(
                        Probe(started, r.status, time.monotonic() - started, body.get("loop_lag_seconds"), uploading)
                    )
            except (OSError, ValueError) as e:
                self.probes.append(Probe(started, repr(e), time.monotonic() - started, None, uploading))
            self.stop.wait(self.interval)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def write_big(path: Path, size: int) -> None:
    block = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for i in range(max(1, size // BLOCK)):
            f.write(i.to_bytes(8, "little") + block[8:])


def summary(probes: list[Probe]) -> str:
    if not probes:
        return "no probes"
    answers = sorted(p.seconds for p in probes)
    lags = [p.loop_lag for p in probes if p.loop_lag is not None]
    p99 = answers[min(len(answers) - 1, int(0.99 * len(answers)))]
    failed = sum(p.status != 200 for p in probes)
    return (
        f"{len(probes):5} probes, {failed} not 200; answer median {statistics.median(answers) * 1000:7.1f} ms, "
        f"p99 {p99 * 1000:7.1f} ms, slowest {answers[-1] * 1000:7.1f} ms; "
        f"largest loop lag reported {max(lags, default=float('nan')) * 1000:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=4.0, help="size of the big file (default 4)")
    parser.add_argument("--small-files", type=int, default=1000, help="how many small files (default 1000)")
    parser.add_argument("--small-bytes", type=int, default=2000, help="size of each small file (default 2000)")
    parser.add_argument("--probe-interval", type=float, default=0.2, help="seconds between probes (default 0.2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for the uploads (default 600)")
    args = parser.parse_args()
    size = max(1, int(args.size_gib * 1024 * MiB) // BLOCK) * BLOCK
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-health-"))
    gateway = servers.start_juicefs(work / "juicefs")
    daemon: Daemon | None = None
    prober: Prober | None = None
    try:
        bucket = servers.S3Bucket(gateway.server, servers.unique_bucket())
        bucket.client.create_bucket(Bucket=bucket.name)
        ckpt, exit_file = work / "ckpt", work / "exit"
        argv = watch_args(bucket, ckpt, exit_file, drain_timeout=int(args.timeout))
        env = {**base_env(), **gateway.server.env(), "PYTHONPATH": str(REPO)}
        daemon = Daemon(argv, env, work / "ckptd.log")
        address = daemon.wait_event("serving metrics and health")["address"]
        daemon.wait_event("watching")
        prober = Prober(f"http://{address}/healthz", daemon.proc.pid, args.probe_interval)
        prober.start()

        started = time.monotonic()
        write_big(ckpt / "big.bin", size)
        written = time.monotonic()
        prober.written.set()
        small = ckpt / "small"
        small.mkdir()
        for i in range(args.small_files):
            (small / f"f{i:05}.bin").write_bytes(os.urandom(args.small_bytes))
        big = daemon.wait_event("uploaded", timeout=args.timeout, where=lambda e: e["path"] == "big.bin")
        prober.big_stored.set()
        big_seen = time.monotonic()
        wait_for(lambda: len(daemon.events("uploaded")) >= 1 + args.small_files, args.timeout, "every file uploaded")
        all_seen = time.monotonic()
        prober.stop.set()
        prober.join()
        peak = status_kib(daemon.proc.pid, "VmHWM") * 1024
        exit_file.touch()
        code = daemon.wait(args.timeout)
        if code != 0:
            raise SystemExit(f"ckptd exited {code}:\n{daemon.tail()}")

        total = size + args.small_files * args.small_bytes
        print(
            f"{size / MiB:.0f} MiB file + {args.small_files} x {args.small_bytes} B to a local JuiceFS gateway, "
            f"{os.cpu_count()} CPUs, /healthz every {args.probe_interval} s"
        )
        print(
            f"peak RSS {peak / MiB:.0f} MiB (VmHWM); largest VmRSS sampled "
            f"{max(prober.rss_samples, default=0) / MiB:.0f} MiB"
        )
        print(f"all along      {summary(prober.probes)}")
        print(f"big uploading  {summary([p for p in prober.probes if p.uploading])}")
        print(
            f"big.bin: written in {written - started:.2f} s ({size / 1e6 / (written - started):.0f} MB/s); "
            f"uploaded in {big['seconds']:.2f} s by ckptd's own clock ({big['mb_per_s']:.0f} MB/s), "
            f"seen {big_seen - written:.2f} s after it was closed"
        )
        print(
            f"everything: {total / 1e6:.0f} MB stored {all_seen - started:.2f} s after the first write "
            f"({total / 1e6 / (all_seen - started):.0f} MB/s end to end)"
        )
    finally:
        if prober is not None:
            prober.stop.set()
        if daemon is not None:
            daemon.kill()
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
