"""The one storage interface; `s3.py` and `local.py` are its two real backends.

Keys are relative to the store's root (the URL's prefix is applied by the backend) and always use
'/' separators. Both backends expose the same multipart protocol so the upload engine has one code
path: create, upload parts (from memory or straight from a file range), complete or abort, list
parts and incomplete uploads for crash recovery.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class FileRange:
    """A part read straight from a file with positional reads: no whole-part copy in memory."""

    fd: int
    offset: int
    size: int


Body = bytes | FileRange
STREAM_PIECE = 1 << 20  # bytes per `get` when a backend streams a range by ranged reads
Digests = dict[str, bytes]
# Error codes meaning "the body did not match the checksum sent with it" (AWS, MinIO, ours).
DIGEST_MISMATCH = frozenset({"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"})


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int
    checksum: str | None = None  # base64 flexible checksum, when the store's checksum mode uses one


@dataclass(frozen=True)
class PendingUpload:
    """An incomplete multipart upload found in the store."""

    key: str
    upload_id: str
    initiated: datetime


class Storage(abc.ABC):
    """A place checkpoints are stored. Every method raises `StorageError` on failure."""

    url: str  # the storage URL as the user gave it, never with credentials
    # Digest algorithms ("md5", "sha256", "crc32", "crc32c") with which `put` and `upload_part` can
    # make the store refuse a body that differs from the bytes the caller hashed.
    verifies: tuple[str, ...] = ()

    @abc.abstractmethod
    async def put(self, key: str, body: Body, digests: Digests | None = None) -> str:
        """Store a whole object atomically; return its etag.

        `digests` (raw, by algorithm, computed by the caller from the very bytes it means to
        store) makes the store reject a body that reads differently now: a file rewritten in place
        while it is sent. The refusal is a StorageError with a code in DIGEST_MISMATCH."""

    # Whether `put_if_absent` is known to be atomic on this store: True once it is (a backend that
    # always is, or a store that refused a conditional write with 412), False once the store said it
    # cannot (501 and the like), None while nothing has told. A store that ignores the condition
    # cannot be told from one that honours it by a write that succeeds, so it stays None.
    conditional_writes: bool | None = None

    @abc.abstractmethod
    async def put_if_absent(self, key: str, body: bytes) -> bool:
        """Store `body` at `key` only if no object is there; True if this call created it, False
        if an object already existed (the caller then reads that one instead).

        Atomic where the store supports conditional writes (S3's `If-None-Match: *`; a hard link
        on a local directory): of concurrent callers exactly one gets True, and no call replaces
        an existing object.

        A store without them degrades to a plain `put` and returns True: one that answers 501
        NotImplemented (then `conditional_writes` becomes False), and one that ignores the header
        and silently overwrites (the MinIO-derived JuiceFS gateway does). Then every caller "wins"
        and the last write is what stays, so callers must write deterministic content: the same
        bytes for the same key from whoever writes it, so that which write stays does not matter."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Return the object's metadata, or None if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order, paginated internally."""

    @abc.abstractmethod
    async def list_dirs(self, prefix: str) -> list[str]:
        """Names of the 'folders' directly under `prefix` (which ends with '/')."""

    @abc.abstractmethod
    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of the object (to its end when `end` is None)."""

    async def get_stream(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the object in chunks as they arrive, never all of them in memory at
        once: for writing a big range straight to a file. Errors are `get`'s, raised where they
        happen, before the first chunk or between two. This default is ranged `get`s of
        STREAM_PIECE bytes; a backend that can stream one response's body overrides it."""
        pos = start
        while pos < end:
            want = min(end - pos, STREAM_PIECE)
            chunk = await self.get(key, pos, pos + want)
            if chunk:
                yield chunk
            if len(chunk) < want:  # the object ends here, as a clipped S3 range would
                return
            pos += want

    async def has_any(self, prefix: str, suffix: str = "") -> bool:
        """Whether an object whose key starts with `prefix` (and ends with `suffix`) exists. The
        listing stops at the first page that answers: nothing more is fetched."""
        async with contextlib.aclosing(self.list(prefix)) as listing:  # type: ignore[type-var]
            async for info in listing:
                if info.key.endswith(suffix):
                    return True
        return False

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object; deleting a missing object is not an error."""

    @abc.abstractmethod
    async def create_multipart(self, key: str) -> str:
        """Start a multipart upload; return its upload id."""

    @abc.abstractmethod
    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Body, digests: Digests | None = None
    ) -> Part:
        """Upload part `number` (1-based). Parts other than the last must be at least 5 MiB on S3.
        `digests` are the part's, as for `put`: computed by the caller from the bytes it hashed."""

    @abc.abstractmethod
    async def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> str:
        """Assemble the parts (in number order) into the object; return its etag."""

    @abc.abstractmethod
    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discard the upload and its parts; aborting an unknown upload is not an error."""

    @abc.abstractmethod
    async def list_parts(self, key: str, upload_id: str) -> list[Part]:
        """Parts already stored for an incomplete upload, in number order."""

    @abc.abstractmethod
    async def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        """Incomplete multipart uploads whose key starts with `prefix`."""

    @abc.abstractmethod
    async def presign_get(self, key: str, expires_seconds: int) -> str:
        """A URL anyone holding it can GET the object with, until it expires."""

    async def close(self) -> None:  # noqa: B027 - a default: not every backend holds connections
        """Release connections. Safe to call twice."""

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
