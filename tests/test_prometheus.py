"""A real Prometheus scrapes a running `ckptd watch` while files are written and the store goes
away and comes back; its HTTP API shows what operators would see, and an alert fires."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from daemons import PROJECT, Daemon, base_env, wait_for
from proxy import Proxy
from servers import free_port

KIND = "integration"

REPO = Path(__file__).resolve().parent.parent
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str) -> dict:
    with _DIRECT.open(url, timeout=5) as response:
        return json.loads(response.read())


class PromServer:
    def __init__(self, workdir: Path, target: str, rules: Path) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "ckptd", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._ready, 30, "prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited; see its log"
        try:
            return _DIRECT.open(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        return get_json(url)["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def rules(tmp_path) -> Path:
    """The shipped alert rules, with their `for:` durations cut to 0s so a test-length outage fires them."""
    text = (REPO / "observability" / "alerts.yaml").read_text()
    path = tmp_path / "alerts.yaml"
    path.write_text(re.sub(r"(?m)^(\s*for:\s*).*$", r"\g<1>0s", text))
    return path


def write(folder: Path, name: str, size: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(os.urandom(size))
    return size


def test_prometheus_sees_uploads_an_outage_and_the_recovery(tmp_path, moto_bucket, rules):
    proxy = Proxy(int(moto_bucket.server.endpoint_url.rsplit(":", 1)[1]))
    metrics_port = free_port()
    ckpt = tmp_path / "ckpt"
    args = [
        "watch",
        "--storage",
        f"s3://{moto_bucket.name}/ckptd",
        "--s3-endpoint-url",
        proxy.endpoint,
        "--s3-addressing-style",
        "path",
        "--checkpoint-dir",
        str(ckpt),
        "--project",
        PROJECT,
        "--job-id",
        "job-p",
        "--settle-time",
        "0.05",
        "--metrics-addr",
        f"127.0.0.1:{metrics_port}",
        "--drain-timeout",
        "30",
    ]
    daemon = Daemon(args, {**base_env(), **moto_bucket.server.env()}, tmp_path / "watch.log")
    prom = None
    try:
        daemon.wait_event("watching")
        prom = PromServer(tmp_path, f"127.0.0.1:{metrics_port}", rules)
        written = sum(write(ckpt / "checkpoint-1", f"f{i}.bin", 100_000 + i) for i in range(5))
        wait_for(lambda: prom.value("ckptd_uploaded_bytes_total") == written, 60, "uploaded bytes in Prometheus")
        assert prom.value("ckptd_oldest_pending_age_seconds") == 0

        proxy.down()
        written += sum(write(ckpt / "checkpoint-2", f"f{i}.bin", 50_000) for i in range(3))
        wait_for(lambda: (prom.value("ckptd_oldest_pending_age_seconds") or 0) > 3, 60, "pending age to rise")
        assert prom.value("ckptd_pending_files") == 3
        wait_for(
            lambda: prom.query('ALERTS{alertname="CkptdStoreUnreachable", alertstate="firing"}'),
            60,
            "the store-unreachable alert to fire",
        )
        ready = get_json_status(f"http://127.0.0.1:{metrics_port}/readyz")
        assert ready[0] == 503 and "storage not reachable" in ready[1]["not_ready"]

        proxy.up()
        wait_for(lambda: prom.value("ckptd_uploaded_bytes_total") == written, 90, "uploads after recovery")
        wait_for(lambda: prom.value("ckptd_oldest_pending_age_seconds") == 0, 30, "pending age back to 0")
        assert get_json_status(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200
    finally:
        if prom:
            prom.stop()
        daemon.signal(signal.SIGTERM)
        daemon.wait(60)
        proxy.down()


def get_json_status(url: str) -> tuple[int, dict]:
    try:
        with _DIRECT.open(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
