"""`ckptd ls` across thousands of checkpoints: how long a user waits for a big job's listing.

Starts a local JuiceFS gateway (a MinIO-derived S3 server) on 127.0.0.1, seeds one job with N
committed checkpoints per rank (manifests written directly with manifest.build_manifest and
storage.put, concurrently, plus one small file per checkpoint folder so the folder listing is
real), then times `ckptd ls --job J --json` as a subprocess, as a user runs it, and prints the
median and best of several runs, checkpoints per second, and `ckptd version` for the start-up cost.

    .venv/bin/python benchmarks/ls_checkpoints.py --checkpoints 5000
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import servers  # noqa: E402

from daemon.catalog import jobmeta, layout  # noqa: E402
from daemon.catalog.jsonio import json_bytes  # noqa: E402
from daemon.catalog.manifest import StoredFile, build_manifest  # noqa: E402

PROJECT, JOB, PREFIX = "bench", "big-job", "ls"
FILES = (("model.safetensors", 4 << 30), ("optimizer.pt", 8 << 30), ("trainer_state.json", 4096))


def manifest_of(rank: int, step: int, start: datetime) -> dict:
    files = [
        StoredFile(
            f"checkpoint-{step}/{name}",
            size,
            hashlib.sha256(f"{rank}/{step}/{name}".encode()).hexdigest(),
            layout.file_key(PROJECT, JOB, rank, f"checkpoint-{step}/{name}"),
            "0" * 32,
        )
        for name, size in FILES
    ]
    metrics = {"global_step": step, "eval_loss": 1.0 / (1 + step % 977), "loss": 2.0 / (1 + step)}
    when = start + timedelta(seconds=step)
    return build_manifest(PROJECT, JOB, rank, f"checkpoint-{step}", files, "marker", metrics, committed_at=when)


async def seed(bucket: servers.S3Bucket, checkpoints: int, ranks: int, folders: bool, concurrency: int) -> float:
    """Write the job; return the seconds it took."""
    started = time.perf_counter()
    start = datetime.now(UTC) - timedelta(days=1)
    async with bucket.storage(PREFIX) as storage:
        await jobmeta.ensure_job(storage, PROJECT, JOB, ranks)
        for rank in range(ranks):
            await jobmeta.write_rank_status(storage, PROJECT, JOB, rank, status="COMPLETED", sync_status="COMPLETED")
        limit = asyncio.Semaphore(concurrency)

        async def one(rank: int, step: int) -> None:
            m = manifest_of(rank, step, start)
            async with limit:
                await storage.put(layout.manifest_key(PROJECT, JOB, rank, m["checkpoint"]), json_bytes(m))
                if folders:  # the folder a real checkpoint leaves: `ls` lists folders to find uncommitted ones
                    await storage.put(
                        layout.file_key(PROJECT, JOB, rank, f"checkpoint-{step}/trainer_state.json"), b"{}"
                    )

        await asyncio.gather(*(one(r, s) for r in range(ranks) for s in range(1, checkpoints + 1)))
    return time.perf_counter() - started


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv[2:4])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=5000, help="checkpoints per rank (default 5000)")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=64, help="puts in flight while seeding")
    parser.add_argument("--manifests-only", action="store_true", help="no checkpoint folders, only manifests")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-ls-"))
    gateway = servers.start_juicefs(work / "juicefs")
    try:
        bucket = servers.S3Bucket(gateway.server, servers.unique_bucket())
        bucket.client.create_bucket(Bucket=bucket.name)
        for name in servers.aws_vars_to_remove():
            os.environ.pop(name, None)
        os.environ.update(gateway.server.env())  # the seeding store takes the SDK chain, as ckptd does
        seconds = asyncio.run(seed(bucket, args.checkpoints, args.ranks, not args.manifests_only, args.concurrency))
        total = args.checkpoints * args.ranks
        print(f"seeded {total:,} manifests ({args.checkpoints:,} checkpoints x {args.ranks} ranks) in {seconds:.1f}s")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "CKPTD_", "BT_"))},
            **gateway.server.env(),
            "PYTHONPATH": str(REPO),
        }
        store = [
            f"--storage=s3://{bucket.name}/{PREFIX}",
            f"--s3-endpoint-url={gateway.server.endpoint_url}",
            "--s3-addressing-style=path",
        ]
        ckptd = [sys.executable, "-m", "daemon"]
        startup = min(timed([*ckptd, "version"], env)[0] for _ in range(3))
        walls = []
        for _ in range(args.runs):
            wall, out = timed([*ckptd, "ls", *store, "--project", PROJECT, "--job", JOB, "--json"], env)
            rows = json.loads(out)["checkpoints"]
            assert len(rows) == args.checkpoints and all(r["committed"] for r in rows), len(rows)
            walls.append(wall)
        jobs_wall = timed([*ckptd, "ls", *store, "--project", PROJECT, "--json"], env)[0]
        median, best = statistics.median(walls), min(walls)
        print(f"JuiceFS gateway on 127.0.0.1, {os.cpu_count()} CPUs, {args.runs} runs")
        print(f"ckptd ls --job ({args.checkpoints:,} checkpoints, {args.ranks} rank(s)):")
        print(
            f"  median {median:.2f}s  best {best:.2f}s  ({args.checkpoints / median:,.0f} checkpoints/s at the median)"
        )
        print(f"  of which Python start-up (ckptd version): {startup:.2f}s")
        print(f"ckptd ls --project (the job's row: one paginated listing of the whole job): {jobs_wall:.2f}s")
    finally:
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
