"""What names a store and how to talk to it: the storage URL and the S3 client options.

Validated by the settings module before a backend is built; no backend imports anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from daemon.logs import is_presigned, redact_url

CHECKSUM_MODES = ("crc32c", "crc32", "md5", "sha256", "none")
ADDRESSING_STYLES = ("auto", "path", "virtual")
PAYLOAD_SIGNING = ("auto", "on", "off")
SSE_MODES = ("none", "sse-s3", "sse-kms")
_HTTP = ("http", "https")
_CREDENTIALS_HINT = "use the AWS credential chain (environment, shared files, IRSA): a command line is visible in ps"


@dataclass(frozen=True)
class S3Options:
    """S3 client options; validated by the settings module before a backend is built."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    # What the store verifies per request. crc32c: flexible checksum computed in hardware (the
    # default: ~18 GB/s); crc32: flexible checksum (botocore's default, ~3.5 GB/s);
    # md5: Content-MD5, for stores that reject flexible checksums or only verify MD5 (MinIO,
    # Ceph, R2); sha256: flexible SHA-256; none: send no checksum.
    checksum: str = "crc32c"
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
        """Parse `s3://BUCKET[/PREFIX]` or `file:///ABS/PATH`; raise ValueError saying what is wrong.

        Messages show the URL with its userinfo and query values redacted: a URL pasted here may
        be a presigned one, or hold an access key, and error messages end up in logs and CI output.
        """
        shown = redact_url(url)
        problem = _unstorable(url, shown)
        if problem:
            raise ValueError(problem)
        parts = urlsplit(url)
        if parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"{shown!r} has no bucket; expected s3://BUCKET[/PREFIX]")
            bucket = parts.netloc
            if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-._" for c in bucket):
                raise ValueError(f"{shown!r}: bucket {bucket!r} is not a valid bucket name")
            prefix = parts.path.strip("/")
            if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
                raise ValueError(f"{shown!r}: prefix {prefix!r} has empty, '.' or '..' segments")
            return cls("s3", bucket, prefix)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"{shown!r}: expected file:///ABSOLUTE/PATH (three slashes)")
            if not parts.path.startswith("/"):
                raise ValueError(f"{shown!r}: the path must be absolute")
            if any(seg == ".." for seg in parts.path.split("/")):
                raise ValueError(f"{shown!r}: the path must not contain '..'")
            return cls("file", "", parts.path.rstrip("/") or "/")
        hint = "; an S3-compatible store's address goes in storage.endpoint_url" if parts.scheme in _HTTP else ""
        raise ValueError(f"{shown!r}: expected s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH{hint}")

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.prefix}"
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def _unstorable(url: str, shown: str) -> str | None:
    """Why `url` can never name a store, checked before its parts are read; None if it might.

    | url                                     | problem                                           |
    |-----------------------------------------|---------------------------------------------------|
    | https://b.s3.amazonaws.com/k?X-Amz-...  | a presigned URL: one object, for a limited time  |
    | s3://AKIA...:secret@bucket/p            | credentials in the URL                            |
    | s3://bucket/p?x=1, s3://bucket/p#x      | queries and fragments name nothing in a store     |
    | s3://bucket/a<newline>b                 | control characters (urlsplit would drop them)     |
    | s3://bucket/p, file:///data             | None                                              |
    """
    control = next((i for i, c in enumerate(url) if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        # Not quoted: urlsplit drops newlines and tabs, so the redacted form would hide the problem.
        return f"control character {url[control]!r} at position {control}: it does not belong in a storage URL"
    if is_presigned(url):
        return (
            f"{shown!r} is a presigned URL: it grants access to one object for a limited time and cannot be a "
            f"store. Give s3://BUCKET[/PREFIX] and {_CREDENTIALS_HINT}"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        return f"{shown!r} is not a URL; expected s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH"
    if "@" in parts.netloc and parts.scheme != "file":
        return f"{shown!r}: credentials do not belong in the storage URL; {_CREDENTIALS_HINT}"
    if parts.query or parts.fragment:
        return f"{shown!r}: queries and fragments do not belong in the storage URL"
    return None
