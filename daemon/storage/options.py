"""What names a store and how to talk to it: the storage URL and the S3 client options.

Validated by the settings module before a backend is built; no backend imports anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

CHECKSUM_MODES = ("crc32", "md5", "sha256", "none")
ADDRESSING_STYLES = ("auto", "path", "virtual")
PAYLOAD_SIGNING = ("auto", "on", "off")
SSE_MODES = ("none", "sse-s3", "sse-kms")


@dataclass(frozen=True)
class S3Options:
    """S3 client options; validated by the settings module before a backend is built."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    # What the store verifies per request. crc32: flexible checksum (AWS's default, cheap);
    # md5: Content-MD5, for stores that reject flexible checksums or only verify MD5 (MinIO,
    # Ceph, R2); sha256: flexible SHA-256; none: send no checksum.
    checksum: str = "crc32"
    # auto: sign the payload only when no checksum covers it (signing hashes every byte).
    payload_signing: str = "auto"
    sse: str = "none"
    sse_kms_key_id: str | None = None
    ca_bundle: str | None = None
    max_connections: int = 64


@dataclass(frozen=True)
class StorageURL:
    scheme: str  # "s3" or "file"
    bucket: str  # S3 bucket; empty for file://
    prefix: str  # key prefix without leading or trailing '/'; for file://, the absolute directory

    @classmethod
    def parse(cls, url: str) -> StorageURL:
        """Parse `s3://BUCKET[/PREFIX]` or `file:///ABS/PATH`; raise ValueError saying what is wrong."""
        parts = urlsplit(url)
        if parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"{url!r} has no bucket; expected s3://BUCKET[/PREFIX]")
            if "@" in parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"{url!r}: credentials, queries and fragments do not belong in the URL")
            bucket = parts.netloc
            if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-._" for c in bucket):
                raise ValueError(f"{url!r}: bucket {bucket!r} is not a valid bucket name")
            prefix = parts.path.strip("/")
            if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
                raise ValueError(f"{url!r}: prefix {prefix!r} has empty, '.' or '..' segments")
            return cls("s3", bucket, prefix)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"{url!r}: expected file:///ABSOLUTE/PATH (three slashes)")
            if not parts.path.startswith("/"):
                raise ValueError(f"{url!r}: the path must be absolute")
            if any(seg == ".." for seg in parts.path.split("/")):
                raise ValueError(f"{url!r}: the path must not contain '..'")
            return cls("file", "", parts.path.rstrip("/") or "/")
        raise ValueError(f"{url!r}: expected s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH")

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.prefix}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
