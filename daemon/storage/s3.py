"""S3 backend (AWS S3 and S3-compatible stores) over aiobotocore.

Hashing is kept off the event loop: botocore is told to compute no checksums itself
(`when_required`), we compute the configured one in a thread and pass it as a request parameter,
and payload signing is off whenever such a checksum covers the body. Bodies read from files are
streamed in 256 KiB positional reads, never copied whole into memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from aiobotocore.response import AioStreamingBody
from aiobotocore.session import AioSession

from daemon import logs
from daemon.storage.base import STREAM_PIECE, Body, Digests, FileRange, ObjectInfo, Part, PendingUpload, Storage
from daemon.storage.bodies import RangeReader, b64, body_size, digests
from daemon.storage.errors import StorageError
from daemon.storage.options import S3Options
from daemon.storage.payload import RangePayload  # noqa: F401 - registers how aiohttp sends file ranges
from daemon.storage.s3client import client_config, shared_loader, translate

T = TypeVar("T")

# checksum mode -> (hash algorithm, request parameter carrying its base64 value)
_CHECKSUM_PARAM = {
    "md5": ("md5", "ContentMD5"),
    "crc32": ("crc32", "ChecksumCRC32"),
    "crc32c": ("crc32c", "ChecksumCRC32C"),
    "sha256": ("sha256", "ChecksumSHA256"),
}
# Flexible checksums are declared at CreateMultipartUpload and repeated per part at completion.
_FLEXIBLE = {"crc32": "CRC32", "crc32c": "CRC32C", "sha256": "SHA256"}
# Pause before re-sending a conditional write that met a concurrent one (409): long enough for a
# small PUT in flight to finish, short enough not to matter to the caller.
_CONFLICT_PAUSE = 0.05


def _refuses_condition(err: StorageError) -> bool:
    """The store may not do conditional writes: AWS-style 501 NotImplemented ("a header you provided
    implies functionality that is not implemented", which does not say which header), or a 400
    that names the header. `put_if_absent` confirms it with a plain put."""
    if err.code == "NotImplemented" or err.http_status == 501:
        return True
    return err.code in ("InvalidArgument", "InvalidRequest") and "if-none-match" in err.message.lower()


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str, options: S3Options) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock = asyncio.Lock()

    # -- plumbing -----------------------------------------------------------------------------

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                session = AioSession()
                session.register_component("data_loader", shared_loader())
                creating = session.create_client(
                    "s3",
                    endpoint_url=self.options.endpoint_url,
                    verify=self.options.ca_bundle,
                    config=client_config(self.options),
                )
                stack = contextlib.AsyncExitStack()
                try:
                    self._client = await stack.enter_async_context(creating)
                except Exception as exc:  # a bad endpoint URL or CA bundle: configuration, not weather
                    raise StorageError("connect", "", "ClientSetup", str(exc), transient=False) from exc
                self._stack = stack
            return self._client

    async def _call(self, op: str, key: str, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except Exception as exc:  # CancelledError is a BaseException and passes through
            raise translate(op, key, exc) from exc

    async def _request(self, op: str, key: str, method: str, **params: Any) -> dict[str, Any]:
        client = await self._get_client()
        return await self._call(op, key, getattr(client, method)(Bucket=self.bucket, **params))

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    async def _checksum_params(self, body: Body, known: Digests | None = None) -> dict[str, str]:
        if self.options.checksum not in _CHECKSUM_PARAM:
            return {}
        algorithm, param = _CHECKSUM_PARAM[self.options.checksum]
        # The caller's digest is of the bytes it hashed for the manifest: hashing again here
        # would be of whatever the file holds now, and would let a torn body through.
        raw = known[algorithm] if known and algorithm in known else (await digests(body, (algorithm,)))[algorithm]
        return {param: b64(raw)}

    def _sse_params(self) -> dict[str, str]:
        if self.options.sse == "sse-s3":
            return {"ServerSideEncryption": "AES256"}
        if self.options.sse == "sse-kms":
            params = {"ServerSideEncryption": "aws:kms"}
            if self.options.sse_kms_key_id:
                params["SSEKMSKeyId"] = self.options.sse_kms_key_id
            return params
        return {}

    @staticmethod
    def _stream(body: Body) -> bytes | RangeReader:
        if isinstance(body, FileRange):
            return RangeReader(body) if body.size else b""
        return body

    def _part_checksum(self, item: dict[str, Any]) -> str | None:
        name = _FLEXIBLE.get(self.options.checksum)
        return item.get(f"Checksum{name}") if name else None

    # -- objects ------------------------------------------------------------------------------

    @property
    def verifies(self) -> tuple[str, ...]:  # type: ignore[override]
        mode = _CHECKSUM_PARAM.get(self.options.checksum)
        return (mode[0],) if mode else ()

    async def put(self, key: str, body: Body, digests: Digests | None = None) -> str:
        resp = await self._put_object("put", key, body, await self._checksum_params(body, digests))
        return resp["ETag"].strip('"')

    async def _put_object(self, op: str, key: str, body: Body, checksum: dict[str, str], **extra: str) -> dict:
        return await self._request(
            op,
            key,
            "put_object",
            Key=self._full(key),
            Body=self._stream(body),
            **checksum,
            **self._sse_params(),
            **extra,
        )

    async def put_if_absent(self, key: str, body: bytes) -> bool:
        checksum = await self._checksum_params(body)  # once: every attempt below sends the same bytes
        if self.conditional_writes is False:
            await self._put_object("put_if_absent", key, body, checksum)
            return True
        for attempt in (1, 2):
            try:
                await self._put_object("put_if_absent", key, body, checksum, IfNoneMatch="*")
                return True  # created, or a store that ignores the header overwrote: see base.py
            except StorageError as err:
                if err.code == "PreconditionFailed" or err.http_status == 412:
                    self.conditional_writes = True
                    return False
                if _refuses_condition(err):
                    # The same request without the header: if the store takes it, the header was
                    # what it refused. If not, something else was (the JuiceFS gateway answers SSE
                    # with the same 501), and that error is the caller's, conditions still unknown.
                    await self._put_object("put_if_absent", key, body, checksum)
                    self._conditions_unsupported(err)
                    return True
                if err.code != "ConditionalRequestConflict":
                    raise
                # 409: another write or a delete of this key was in flight and AWS could not order
                # ours against it. Asking the same question again once it has settled is the only
                # right answer: 412 if it created the object, 200 if it failed or was a delete.
                # A HEAD instead could see nothing yet (or never: the other write may fail), and
                # "exists" would send the caller to read an object that is not there.
                if attempt == 2:
                    # Still contended: a transient error, so the caller's retry loop backs off.
                    raise StorageError(
                        err.op, key, err.code, err.message, http_status=err.http_status, transient=True
                    ) from err
                await asyncio.sleep(_CONFLICT_PAUSE)
        raise AssertionError("unreachable")

    def _conditions_unsupported(self, err: StorageError) -> None:
        if self.conditional_writes is not False:
            self.conditional_writes = False
            logs.get(__name__).warning(
                "the store does not support conditional writes: create-if-absent is a plain put",
                store=self.url,
                code=err.code,
                error=err.message,
            )

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = await self._request("head", key, "head_object", Key=self._full(key))
        except StorageError as err:
            # HEAD has no body, so a missing bucket also reads as 404: callers see it on write.
            if err.http_status == 404:
                return None
            raise
        return ObjectInfo(key, resp["ContentLength"], resp["ETag"].strip('"'), resp["LastModified"])

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        client = await self._get_client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._full(prefix))
        iterator = aiter(pages)
        while True:
            try:
                page = await anext(iterator)
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise translate("list", prefix, exc) from exc
            for item in page.get("Contents", []):
                etag = item["ETag"].strip('"')
                yield ObjectInfo(self._rel(item["Key"]), item["Size"], etag, item["LastModified"])

    async def _paginate(self, op: str, key: str, method: str, **params: Any) -> list[dict]:
        client = await self._get_client()
        pages = client.get_paginator(method).paginate(Bucket=self.bucket, **params)

        async def collect() -> list[dict]:
            return [page async for page in pages]

        return await self._call(op, key, collect())

    async def list_dirs(self, prefix: str) -> list[str]:
        full = self._full(prefix)
        base = full[: full.rfind("/") + 1]  # names are relative to the last '/' of the prefix
        pages = await self._paginate("list_dirs", prefix, "list_objects_v2", Prefix=full, Delimiter="/")
        found = (cp["Prefix"] for page in pages for cp in page.get("CommonPrefixes", []))
        return [p[len(base) :].rstrip("/") for p in found]

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        if end is not None and end <= start:
            return b""
        params: dict[str, Any] = {"Key": self._full(key)}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = await self._request("get", key, "get_object", **params)
        async with resp["Body"] as stream:
            return await self._call("get", key, stream.read())

    async def get_stream(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        if end <= start:
            return
        params = {"Key": self._full(key), "Range": f"bytes={start}-{end - 1}"}
        body = (await self._request("get", key, "get_object", **params))["Body"]
        # aiohttp's reader hands out each chunk as it came off the socket; the body's read(n) joins
        # chunks into new bytes (a copy of every byte). Another body type is read the plain way.
        reader = body.raw_stream.content if type(body) is AioStreamingBody else None
        try:
            while True:
                try:
                    chunk = (await reader.readchunk())[0] if reader is not None else await body.read(STREAM_PIECE)
                except Exception as exc:  # a cut or stalled connection: NetworkError, resumed by the caller
                    raise translate("get", key, exc) from exc
                if chunk:
                    yield chunk
                elif reader is None or reader.at_eof():  # else: the end of one HTTP chunk, not of the body
                    return
        finally:
            body.close()  # a body not read to its end closes its connection: never back in the pool

    async def delete(self, key: str) -> None:
        await self._request("delete", key, "delete_object", Key=self._full(key))

    async def presign_get(self, key: str, expires_seconds: int) -> str:
        client = await self._get_client()
        params = {"Bucket": self.bucket, "Key": self._full(key)}
        return await self._call(
            "presign",
            key,
            client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_seconds),
        )

    # -- multipart ----------------------------------------------------------------------------

    async def create_multipart(self, key: str) -> str:
        params = self._sse_params()
        if self.options.checksum in _FLEXIBLE:
            params["ChecksumAlgorithm"] = _FLEXIBLE[self.options.checksum]
        resp = await self._request("create_multipart", key, "create_multipart_upload", Key=self._full(key), **params)
        return resp["UploadId"]

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Body, digests: Digests | None = None
    ) -> Part:
        params = await self._checksum_params(body, digests)
        resp = await self._request(
            "upload_part",
            key,
            "upload_part",
            Key=self._full(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=self._stream(body),
            **params,
        )
        checksum = params.get(f"Checksum{_FLEXIBLE.get(self.options.checksum, '')}")
        return Part(number, resp["ETag"].strip('"'), body_size(body), checksum)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> str:
        name = _FLEXIBLE.get(self.options.checksum)
        listed = []
        for part in sorted(parts, key=lambda p: p.number):
            item = {"PartNumber": part.number, "ETag": part.etag}
            if name and part.checksum:
                item[f"Checksum{name}"] = part.checksum
            listed.append(item)
        resp = await self._request(
            "complete_multipart",
            key,
            "complete_multipart_upload",
            Key=self._full(key),
            UploadId=upload_id,
            MultipartUpload={"Parts": listed},
        )
        return resp["ETag"].strip('"')

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._request(
                "abort_multipart", key, "abort_multipart_upload", Key=self._full(key), UploadId=upload_id
            )
        except StorageError as err:
            if err.code != "NoSuchUpload":
                raise

    async def list_parts(self, key: str, upload_id: str) -> list[Part]:
        pages = await self._paginate("list_parts", key, "list_parts", Key=self._full(key), UploadId=upload_id)
        parts = [
            Part(p["PartNumber"], p["ETag"].strip('"'), p["Size"], self._part_checksum(p))
            for page in pages
            for p in page.get("Parts", [])
        ]
        return sorted(parts, key=lambda p: p.number)

    async def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        pages = await self._paginate(
            "list_multipart_uploads", prefix, "list_multipart_uploads", Prefix=self._full(prefix)
        )
        return [
            PendingUpload(self._rel(u["Key"]), u["UploadId"], u["Initiated"])
            for page in pages
            for u in page.get("Uploads", [])
        ]

    async def close(self) -> None:
        async with self._lock:
            stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()
