"""`ckptd inspect` against moto and the JuiceFS gateway: tensors as `safetensors.safe_open` reads the
trainer's own files, a 100 MiB file inspected for under 1 % of its bytes (counted at a proxy),
hostile headers refused with the key named, unknown jobs and paths refused."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from daemons import PREFIX, base_env, s3_args, sha256
from proxy import Proxy
from safetensors import safe_open
from safetensors.numpy import save_file

from daemon.commands.inspect import BadPath, Target, parse_target

KIND = "integration"

MiB = 1 << 20


@pytest.mark.unit
@pytest.mark.parametrize(
    "path, target",
    [
        ("rank-0/checkpoint-10/model.safetensors", Target(0, "checkpoint-10", "model.safetensors")),
        ("rank-1/checkpoint-10/sub/a.safetensors", Target(1, "checkpoint-10", "sub/a.safetensors")),
        ("rank-0/checkpoint-10/", Target(0, "checkpoint-10", None)),
        ("rank-0/checkpoint-10", Target(0, "checkpoint-10", None)),
        ("checkpoint-10", Target(None, "checkpoint-10", None)),
        ("checkpoint-10/", Target(None, "checkpoint-10", None)),
        ("checkpoint-10/model.safetensors", Target(None, "checkpoint-10", "model.safetensors")),
        ("rank-0/model.safetensors", Target(0, ".", "model.safetensors")),
        ("rank-0/latest/", Target(0, "latest", None)),
        ("rank-01/x", Target(None, "rank-01", "x")),  # not a rank folder name: a checkpoint's
        ("rank-0", BadPath),
        ("rank-0/", BadPath),
        ("", BadPath),
        ("/abs/model.safetensors", BadPath),
        ("a/../b", BadPath),
        ("a//b", BadPath),
        (".", BadPath),
        ("rank-0/checkpoint-10/sub/", BadPath),
    ],
)
def test_parse_target(path: str, target) -> None:
    if target is BadPath:
        with pytest.raises(BadPath, match="PATH"):
            parse_target(path)
    else:
        assert parse_target(path) == target


def inspect(job, *args: str) -> dict:
    done = job.cli("inspect", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def local_file(tmp_path: Path, job, rank: int, relpath: str) -> Path:
    path = tmp_path / "jobs" / f"{job.job_id}-rank-{rank}" / "ckpt" / relpath
    assert sha256(path.read_bytes()) == job.written[rank][relpath]  # the very bytes ckptd stored
    return path


def as_safe_open_sees(path: Path) -> tuple[list[dict], dict]:
    with safe_open(str(path), "np") as f:
        tensors = []
        for name in sorted(f.keys()):
            sl = f.get_slice(name)
            array = f.get_tensor(name)
            shape = list(sl.get_shape())
            tensors.append(
                {"name": name, "dtype": sl.get_dtype(), "shape": shape, "parameters": math.prod(shape)}
                | {"bytes": array.nbytes}
            )
        return tensors, f.metadata()


def test_a_file_reads_as_safe_open_reads_the_trainers_own_file(s3_bucket, trained_job, tmp_path) -> None:
    job = trained_job(s3_bucket)
    for rank in (0, 1):
        rel = "checkpoint-20/model.safetensors"
        tensors, metadata = as_safe_open_sees(local_file(tmp_path, job, rank, rel))
        (got,) = inspect(job, "--job", "trained", f"rank-{rank}/{rel}")["files"]
        assert (got["rank"], got["path"], got["metadata"]) == (rank, rel, metadata)
        assert got["tensors"] == tensors
        assert got["size"] == local_file(tmp_path, job, rank, rel).stat().st_size
        assert got["totals"]["parameters"] == sum(t["parameters"] for t in tensors)
        assert got["totals"]["by_dtype"]["F16"] == {"tensors": 1, "parameters": 64, "bytes": 128}

    latest = job.cli("inspect", "rank-1/latest/model.safetensors", "--json")  # no --job: the project's latest
    assert latest.returncode == 0, latest.stderr
    assert "job trained (the most recent of project proj)" in latest.stderr
    doc = json.loads(latest.stdout)
    assert (doc["job_id"], doc["checkpoint"]) == ("trained", "checkpoint-40")
    expected, _ = as_safe_open_sees(local_file(tmp_path, job, 1, "checkpoint-40/model.safetensors"))
    assert doc["files"][0]["tensors"] == expected


def test_a_checkpoint_is_summed_up_across_its_files_and_ranks(moto_bucket, trained_job) -> None:
    job = trained_job(moto_bucket)
    every = inspect(job, "--job", "trained", "checkpoint-10")
    assert [(f["rank"], f["path"]) for f in every["files"]] == [
        (0, "checkpoint-10/model.safetensors"),
        (1, "checkpoint-10/model.safetensors"),
    ]
    one = every["files"][0]["totals"]
    assert every["totals"]["tensors"] == 2 * one["tensors"] == 8
    assert every["totals"]["parameters"] == 2 * one["parameters"]
    assert every["totals"]["bytes"] == 2 * one["bytes"]
    assert [f["rank"] for f in inspect(job, "--job", "trained", "rank-1/checkpoint-10/")["files"]] == [1]
    table = job.cli("inspect", "--job", "trained", "checkpoint-10")
    assert table.returncode == 0, table.stderr
    assert "checkpoint-10/model.safetensors" in table.stdout and "total" in table.stdout


def big_file(path: Path) -> dict[str, np.ndarray]:
    """~100 MiB in 3,000 tensors: a 200 KiB header, so the second ranged GET is exercised too."""
    rng = np.random.default_rng(1)
    tensors = {f"layers.{i:04d}.weight": rng.standard_normal(8738, dtype=np.float32) for i in range(3000)}
    tensors["pad"] = np.zeros(100 * MiB - 3000 * 8738 * 4, dtype=np.uint8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def test_inspecting_a_100_mib_file_transfers_under_1_percent_of_it(s3_bucket, tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = big_file(path)
    size = path.stat().st_size
    assert size >= 100 * MiB
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header > 64 * 1024  # longer than the first ranged GET
    key = f"{PREFIX}/training_projects/proj/jobs/big/rank-0/checkpoint-5/model.safetensors"
    s3_bucket.client.upload_file(str(path), s3_bucket.name, key)

    proxy = Proxy(int(s3_bucket.server.endpoint_url.rsplit(":", 1)[1]))
    try:
        storage = s3_args(s3_bucket)
        storage[storage.index("--s3-endpoint-url") + 1] = proxy.endpoint
        argv = [sys.executable, "-m", "daemon", "inspect", *storage, "--project", "proj", "--job", "big"]
        env = {**base_env(), **s3_bucket.server.env()}
        done = subprocess.run(
            [*argv, "rank-0/checkpoint-5/model.safetensors", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        moved = proxy.bytes_to_client
    finally:
        proxy.down()
    assert done.returncode == 0, done.stderr
    (got,) = json.loads(done.stdout)["files"]
    assert got["header_bytes"] == header
    assert got["totals"]["tensors"] == len(tensors)
    assert got["totals"]["bytes"] == sum(a.nbytes for a in tensors.values()) == size - 8 - header
    assert moved < size / 100, f"{moved:,} bytes moved to inspect a {size:,}-byte file"
    assert moved > header  # the proxy really counted the header's way through


def hostile(length: int | None, header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


HOSTILE = [
    ("absurd.safetensors", hostile(1 << 60, b"{}"), "header length 1,152,921,504,606,846,976 is absurd"),
    ("past-end.safetensors", hostile(5000, b"{}"), "header length 5,000 is beyond the object's size"),
    ("tiny.safetensors", b"\x01\x02", "too small for a safetensors file"),
    ("garbage.safetensors", hostile(None, b"\x89PNG not json"), "header is not JSON"),
    ("list.safetensors", hostile(None, b"[1]"), "header is a JSON list"),
    (
        "dtype.safetensors",
        hostile(None, json.dumps({"evil": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"1234"),
        "tensor 'evil': unknown dtype 'F99'",
    ),
    (
        "offsets.safetensors",
        hostile(None, json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(), b"1" * 8),
        "tensor 'w': data_offsets [0, 8] hold 8 bytes, but F32 [4] needs 16",
    ),
]


@pytest.mark.parametrize("name, body, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_malformed_and_absurd_headers_exit_1_naming_file_and_key(moto_bucket, name: str, body: bytes, message) -> None:
    key = f"{PREFIX}/training_projects/proj/jobs/hostile/rank-0/checkpoint-1/{name}"
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key=key, Body=body)
    argv = [sys.executable, "-m", "daemon", "inspect", *s3_args(moto_bucket), "--project", "proj", "--job", "hostile"]
    env = {**base_env(), **moto_bucket.server.env()}
    done = subprocess.run([*argv, f"rank-0/checkpoint-1/{name}"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"rank-0/checkpoint-1/{name}: not a valid safetensors file: {message}" in done.stderr
    assert done.stdout == ""
    assert "Traceback" not in done.stderr


def test_every_hostile_file_of_a_checkpoint_is_reported(juicefs_bucket) -> None:
    for name, body, _ in HOSTILE:
        key = f"{PREFIX}/training_projects/proj/jobs/hostile/rank-0/checkpoint-1/{name}"
        juicefs_bucket.client.put_object(Bucket=juicefs_bucket.name, Key=key, Body=body)
    argv = [
        sys.executable,
        "-m",
        "daemon",
        "inspect",
        *s3_args(juicefs_bucket),
        "--project",
        "proj",
        "--job",
        "hostile",
    ]
    env = {**base_env(), **juicefs_bucket.server.env()}
    done = subprocess.run([*argv, "checkpoint-1"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    for name, _, message in HOSTILE:
        assert f"rank-0/checkpoint-1/{name}: not a valid safetensors file: {message}" in done.stderr
    assert done.stdout == ""


def test_unknown_job_checkpoint_file_and_bad_paths(moto_bucket, trained_job) -> None:
    job = trained_job(moto_bucket, ranks=1, steps=(10,), losses=(0.5,))
    failed = [
        (["--job", "nope", "checkpoint-10"], "no job 'nope' in project 'proj'"),
        (["--job", "trained", "checkpoint-99"], "no checkpoint 'checkpoint-99' in job 'trained'"),
        (["--job", "trained", "rank-3/checkpoint-10/"], "no checkpoint 'checkpoint-10' on rank 3"),
        (["--job", "trained", "rank-0/checkpoint-10/nope.safetensors"], "checkpoint-10/nope.safetensors: no such file"),
        (["--job", "trained", "."], "PATH '.'"),
    ]
    for args, message in failed[:-1]:
        done = job.cli("inspect", *args)
        assert done.returncode == 1, (args, done.stderr)
        assert message in done.stderr
    for path in ("rank-0", "../x", "/abs/model.safetensors", "rank-0/checkpoint-10/sub/", "a//b", "."):
        done = job.cli("inspect", "--job", "trained", path)
        assert done.returncode == 2, (path, done.stderr)
        assert f"PATH {path!r}" in done.stderr
    key = f"{PREFIX}/training_projects/proj/jobs/trained/rank-0/checkpoint-20/optimizer.pt"
    moto_bucket.client.put_object(Bucket=moto_bucket.name, Key=key, Body=b"x" * 10)
    none = job.cli("inspect", "--job", "trained", "checkpoint-20")
    assert none.returncode == 1
    assert "checkpoint 'checkpoint-20' of job 'trained' holds no .safetensors file" in none.stderr
