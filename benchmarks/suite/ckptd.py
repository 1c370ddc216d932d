"""A running `ckptd watch`, as a trainer's sidecar meets a checkpoint: started before the round, fed
by renames, timed from its own JSON log ("uploaded" lines carry microsecond UTC timestamps) and
confirmed against the store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from .procs import RssSampler, Tree
from .store import Store

PREFIX = "bench"
PROJECT = "bench"
POLL = 0.02  # seconds between reads of the log: the resolution of "stored"


def key_prefix(job: str) -> str:
    return f"{PREFIX}/training_projects/{PROJECT}/jobs/{job}/rank-0/"


def ckptd_args(store: Store, bucket: str) -> list[str]:
    return [
        "--storage",
        f"s3://{bucket}/{PREFIX}",
        "--s3-endpoint-url",
        store.endpoint,
        "--s3-addressing-style",
        "path",
    ]


class Watcher:
    def __init__(
        self,
        store: Store,
        work: Path,
        settle: float,
        job: str = "job",
        default_priority: bool = False,
        bucket: str | None = None,
    ) -> None:
        self.store, self.work, self.job = store, work, job
        self.bucket = bucket or store.new_bucket()
        self.ckpt = work / "ckpt"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.log = work / "ckptd.log"
        self.exit_file = work / "exit"
        argv = [sys.executable, "-m", "daemon", "watch", *ckptd_args(store, self.bucket)]
        argv += ["--checkpoint-dir", str(self.ckpt), "--project", PROJECT, "--job-id", job]
        argv += ["--settle-time", str(settle), "--metrics-addr", "127.0.0.1:0", "--exit-when", str(self.exit_file)]
        argv += ["--drain-timeout", "120"]
        if not default_priority:  # equal priority to the peers: the store shares these cores
            argv += ["--nice", "0", "--io-priority", "normal"]
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, env=store.env, stdout=self._out, stderr=subprocess.STDOUT)
        self.tree = Tree(self.proc.pid)
        self._offset, self._partial = 0, b""
        self.events: list[dict] = []
        self.stored: dict[str, float] = {}  # relpath -> wall-clock time of its "uploaded" line
        self.wait_event("watching", 60)
        self.metrics_url = f"http://{self.find_event('serving metrics and health')['address']}/metrics"
        self.rss = RssSampler(self.tree)
        self.rss.start()

    def _read(self) -> None:
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "uploaded":
                self.stored[event["path"]] = datetime.fromisoformat(event["timestamp"]).timestamp()

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ckptd exited {self.proc.returncode}:\n{self.tail()}")

    def find_event(self, name: str) -> dict | None:
        return next((e for e in self.events if e.get("event") == name), None)

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (event := self.find_event(name)) is None:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {name!r} from ckptd within {timeout}s:\n{self.tail()}")
            time.sleep(POLL)  # a poll interval bounded by the deadline
            self._read()
        return event

    def wait_stored(self, relpaths: list[str], timeout: float) -> float:
        """Wall-clock time the last of `relpaths` was stored, by ckptd's own log."""
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            missing = [r for r in relpaths if r not in self.stored]
            if not missing:
                return max(self.stored[r] for r in relpaths)
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(missing)} files not stored in {timeout}s, e.g. {missing[0]}:\n{self.tail()}")
            time.sleep(POLL)

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 180) -> int:
        """Drain and exit; the peak RSS of its largest process, sampled all along."""
        self.exit_file.touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._out.close()
        return self.rss.stop()

    def kill(self) -> None:
        """Stop at once (idempotent: after stop() it does nothing)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()
        if self.rss.is_alive():
            self.rss.stop()
