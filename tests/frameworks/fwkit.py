"""Helpers for the framework tests: real training scripts (Hugging Face Trainer, PyTorch DCP) run
through `ckptd run` as a subprocess against a real S3 server, and what they stored and reported.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemons import PREFIX, PROJECT, Daemon, base_env, s3_args
from servers import S3Bucket

TRAINERS = Path(__file__).resolve().parent / "trainers"
HF_TRAIN = [sys.executable, str(TRAINERS / "hf_train.py")]
DCP_TRAIN = [sys.executable, str(TRAINERS / "dcp_train.py")]
# Two processes on this machine, gloo, a free rendezvous port: how a user starts a DCP job.
DCP_TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc-per-node",
    "2",
    "--monitor-interval",
    "0.1",
    str(TRAINERS / "dcp_train.py"),
]

# Several nodes: every node runs `torchrun` of this script, all of them one job (gloo, a DTensor
# sharded across every process of every node); see dcp_nodes_torchrun.
DCP_NODES_TRAIN = TRAINERS / "dcp_nodes_train.py"

INSTALL = "pip install torch==2.13.0 (first: the CPU build), then pip install transformers accelerate"


def require(*modules: str) -> None:
    """The framework tests need the frameworks: fail (never skip) with how to install them."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            pytest.fail(f"the framework tests need {name!r} ({exc}); install them: {INSTALL}", pytrace=False)


def trainer_env(home: Path) -> dict[str, str]:
    """Small, quiet, offline trainers on a small machine."""
    return {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(home / "hf-home"),
        "TRANSFORMERS_VERBOSITY": "warning",
        "PYTHONUNBUFFERED": "1",
        "GLOO_SOCKET_IFNAME": "lo",
    }


class Job:
    """One node of a job: its ckptd, folders, and `out`, where its trainer reports (outside the checkpoint folder)."""

    def __init__(self, daemon: Daemon, folder: Path, job_id: str, rank: int) -> None:
        self.daemon, self.folder, self.job_id, self.rank = daemon, folder, job_id, rank
        self.ckpt, self.loaded, self.out = folder / "ckpt", folder / "loaded", folder / "out"

    def wait(self, timeout: float = 120) -> int:
        return self.daemon.wait(timeout)

    def result(self, name: str) -> Any:
        return json.loads((self.out / name).read_text())

    def local_files(self, checkpoint: str) -> dict[str, str]:
        """relpath -> SHA-256 of the files of one checkpoint still in the checkpoint folder."""
        return files_under(self.ckpt, checkpoint)

    def local_sizes(self, checkpoint: str) -> dict[str, tuple[int, str]]:
        """relpath -> (size, SHA-256) of the files of one checkpoint in the checkpoint folder."""
        return {path: ((self.ckpt / path).stat().st_size, sha) for path, sha in self.local_files(checkpoint).items()}

    def restored_files(self) -> dict[str, str]:
        """relpath -> SHA-256 of everything restored for this node (under loaded/rank-N/)."""
        return files_under(self.loaded / f"rank-{self.rank}")


def files_under(root: Path, sub: str = "") -> dict[str, str]:
    base = root / sub if sub else root
    if not base.is_dir():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


def start_job(
    tmp_path: Path,
    started: list[Daemon],
    bucket: S3Bucket,
    job_id: str,
    command: list[str],
    *,
    rank: int = 0,
    group: int = 1,
    refs: list[dict] | None = None,
    env: dict[str, str] | None = None,
) -> Job:
    """`ckptd run` for one node, configured like a user's job definition (config file + flags)."""
    folder = tmp_path / f"{job_id}-rank-{rank}"
    folder.mkdir()
    (folder / "out").mkdir()
    config: dict[str, Any] = {
        "project": PROJECT,
        "job_id": job_id,
        "checkpointing_config": {"enabled": True, "checkpoint_path": str(folder / "ckpt")},
        "load_checkpoint_config": {
            "enabled": bool(refs),
            "download_folder": str(folder / "loaded"),
            "checkpoints": refs or [],
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    args = [
        "run",
        "--config",
        str(folder / "config.yaml"),
        *s3_args(bucket),
        "--node-rank",
        str(rank),
        "--group-size",
        str(group),
        "--settle-time",
        "0.05",
        "--metrics-addr",
        "127.0.0.1:0",
        "--drain-timeout",
        "60",
        "--stop-timeout",
        "5",
        "--",
        *command,
    ]
    environ = {
        **base_env(),
        **bucket.server.env(),
        **trainer_env(tmp_path),
        "TRAINER_OUT": str(folder / "out"),
        **(env or {}),
    }
    daemon = Daemon(args, environ, folder / "ckptd.log")
    started.append(daemon)
    return Job(daemon, folder, job_id, rank)


def latest_of(*, project: str | None = None, job_id: str | None = None) -> dict:
    ref: dict[str, Any] = {"typ": "baseten_latest_checkpoint"}
    if project:
        ref["project_name"] = project
    if job_id:
        ref["job_id"] = job_id
    return ref


def assert_equal_states(saved: Any, loaded: Any, where: str = "") -> None:
    """Every tensor equal (torch.equal), every other value equal, the same keys."""
    import torch

    if isinstance(saved, dict):
        assert isinstance(loaded, dict) and saved.keys() == loaded.keys(), where
        for key in saved:
            assert_equal_states(saved[key], loaded[key], f"{where}/{key}")
    elif isinstance(saved, list | tuple):
        assert len(saved) == len(loaded), where
        for i, (one, other) in enumerate(zip(saved, loaded, strict=True)):
            assert_equal_states(one, other, f"{where}[{i}]")
    elif isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor) and torch.equal(saved, loaded), where
    else:
        assert saved == loaded, where


def job_key(job_id: str, rest: str) -> str:
    return f"{PREFIX}/training_projects/{PROJECT}/jobs/{job_id}/{rest}"


def stored_files(bucket: S3Bucket, job_id: str, rank: int = 0) -> dict[str, str]:
    """relpath -> SHA-256 of every checkpoint file stored for the rank (listed under rank-N/)."""
    prefix = job_key(job_id, f"rank-{rank}/")
    client, out = bucket.client, {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket.name, Key=item["Key"])["Body"].read()
            out[item["Key"][len(prefix) :]] = hashlib.sha256(body).hexdigest()
    return out


def stored_json(bucket: S3Bucket, job_id: str, rest: str) -> Any:
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=job_key(job_id, rest))["Body"].read())


def manifests_listed(bucket: S3Bucket, job_id: str, rank: int = 0) -> list[str]:
    """Names of the manifests stored for the rank: one per committed checkpoint."""
    listed = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=job_key(job_id, f"manifests/rank-{rank}/"))
    return sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", []))


def checkpoints_of(files: dict[str, str]) -> set[str]:
    return {path.split("/", 1)[0] for path in files if "/" in path}


def of_checkpoint(files: dict[str, str], checkpoint: str) -> dict[str, str]:
    return {k: v for k, v in files.items() if k.startswith(checkpoint + "/")}


def manifest_files(manifest: dict) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def ckptd_json(bucket: S3Bucket, *args: str, timeout: float = 60) -> Any:
    """A `ckptd` command that prints JSON (e.g. `ls ... --json`) against the bucket: its output, parsed."""
    done = subprocess.run(
        [sys.executable, "-m", "daemon", *args, *s3_args(bucket)],
        env={**base_env(), **bucket.server.env()},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"ckptd {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return json.loads(done.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcp_nodes_torchrun(nodes: int, node_rank: int, port: int, procs: int = 2) -> list[str]:
    """One node's command of a DCP job on `nodes` nodes of `procs` processes (gloo) on this machine:
    static rendezvous at 127.0.0.1:`port` (node 0 serves it), or --standalone for one node."""
    if nodes == 1:
        where = ["--standalone"]
    else:
        where = ["--nnodes", str(nodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1"]
        where += ["--master-port", str(port)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *where,
        "--nproc-per-node",
        str(procs),
        "--monitor-interval",
        "0.1",
        str(DCP_NODES_TRAIN),
    ]


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant (parents first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        one = todo.pop(0)
        tree.append(one)
        todo.extend(children.get(one, []))
    return tree


def kill_tree(pid: int) -> list[int]:
    """SIGKILL `pid` and all its descendants (collected first: once a parent dies, its orphans are
    no longer found under it), wherever their process groups or sessions are. Returns the pids."""
    tree = process_tree(pid)
    for one in tree:
        try:
            os.kill(one, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def logged_at(event: dict) -> datetime:
    """When ckptd logged a JSON line (its ISO 8601 UTC `timestamp`)."""
    return datetime.fromisoformat(event["timestamp"])
