"""The peers' command lines: s5cmd at its defaults, s5cmd tuned, and the AWS CLI."""

from __future__ import annotations

from pathlib import Path

from .store import Store

TOOLS = ("ckptd", "s5cmd", "s5cmd-tuned", "aws")
# s5cmd's `cp` flags (not global ones): 8 parts of 16 MiB in flight per file.
TUNED = ["--concurrency", "8", "--part-size", "16"]


def _s5cmd(store: Store, tool: str) -> list[str]:
    argv = [store.peer("s5cmd"), "--endpoint-url", store.endpoint, "cp"]
    return argv + TUNED if tool == "s5cmd-tuned" else argv


def upload(store: Store, tool: str, src: Path, bucket: str, prefix: str) -> list[str]:
    """Upload a file, or a folder recursively, to s3://bucket/prefix/<its name>."""
    dst = f"s3://{bucket}/{prefix}{src.name}"
    if tool.startswith("s5cmd"):
        return [*_s5cmd(store, tool), f"{src}/*" if src.is_dir() else str(src), dst + ("/" if src.is_dir() else "")]
    recursive = ["--recursive"] if src.is_dir() else []
    return [store.peer("aws"), "s3", "cp", *recursive, "--only-show-errors", str(src), dst]


def download(store: Store, tool: str, bucket: str, prefix: str, dest: Path) -> list[str]:
    """Download every object under s3://bucket/prefix into dest/."""
    if tool.startswith("s5cmd"):
        return [*_s5cmd(store, tool), f"s3://{bucket}/{prefix}*", f"{dest}/"]
    return [store.peer("aws"), "s3", "cp", "--recursive", "--only-show-errors", f"s3://{bucket}/{prefix}", str(dest)]


def sync(store: Store, src: Path, bucket: str, prefix: str) -> list[str]:
    return [store.peer("aws"), "s3", "sync", "--only-show-errors", str(src), f"s3://{bucket}/{prefix}"]
