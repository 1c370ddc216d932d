"""Where checkpoints are stored: one interface (`base.Storage`), two backends (S3, local directory)."""

from __future__ import annotations

from daemon.storage.base import DIGEST_MISMATCH, Body, Digests, FileRange, ObjectInfo, Part, PendingUpload, Storage
from daemon.storage.errors import StorageError
from daemon.storage.options import (
    ADDRESSING_STYLES,
    CHECKSUM_MODES,
    PAYLOAD_SIGNING,
    SSE_MODES,
    S3Options,
    StorageURL,
)

__all__ = [
    "ADDRESSING_STYLES",
    "CHECKSUM_MODES",
    "DIGEST_MISMATCH",
    "PAYLOAD_SIGNING",
    "SSE_MODES",
    "Body",
    "Digests",
    "FileRange",
    "ObjectInfo",
    "Part",
    "PendingUpload",
    "S3Options",
    "Storage",
    "StorageError",
    "StorageURL",
    "open_storage",
]


def open_storage(url: str | StorageURL, s3: S3Options | None = None) -> Storage:
    """Build the backend for a storage URL. S3 clients are created lazily on first use."""
    parsed = url if isinstance(url, StorageURL) else StorageURL.parse(url)
    # Imported here: the CLI starts without loading aiobotocore unless a command needs S3.
    if parsed.scheme == "file":
        from daemon.storage.local import LocalStorage

        return LocalStorage(parsed.prefix)
    from daemon.storage.s3 import S3Storage

    return S3Storage(parsed.bucket, parsed.prefix, s3 or S3Options())
