"""Local-directory backend for file:// stores: the embedded default and shared mounts (NFS, FUSE).

Objects are plain files at root/KEY, written atomically (see `localfs`). Multipart uploads are
emulated under root/.ckptd-multipart/UPLOAD_ID/ (a meta.json and one file per part) so the upload
engine has a single code path for both backends. All blocking I/O runs in worker threads.

`presign_get` can only return a file:// URL of the object: there is no server to enforce an
expiry, so the URL is as good as the reader's file-system permissions.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from daemon.storage import localfs as fs
from daemon.storage.base import Body, Digests, ObjectInfo, Part, PendingUpload, Storage
from daemon.storage.bodies import body_size
from daemon.storage.errors import StorageError

T = TypeVar("T")
MULTIPART_DIR = ".ckptd-multipart"


class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self._uploads = self.root / MULTIPART_DIR

    async def _run(self, op: str, key: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as exc:
            raise fs.translate(op, key, exc) from exc

    # -- objects ------------------------------------------------------------------------------

    verifies = ("md5",)

    async def put(self, key: str, body: Body, digests: Digests | None = None) -> str:
        fs.check_key("put", key)
        expected = (digests or {}).get("md5")
        return await self._run("put", key, fs.write_atomic, self.root / key, fs.fill_from(body, key, expected))

    async def head(self, key: str) -> ObjectInfo | None:
        fs.check_key("head", key)
        return await self._run("head", key, self._head_sync, key)

    def _head_sync(self, key: str) -> ObjectInfo | None:
        path = self.root / key
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return fs.object_info(key, path, st) if path.is_file() else None

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        fs.check_key("list", prefix, prefix=True)
        for info in await self._run("list", prefix, self._list_sync, prefix):
            yield info

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        base = prefix[: prefix.rfind("/") + 1]  # walk only the deepest folder the prefix names
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root / base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            rel = "" if rel == "." else rel + "/"
            dirnames[:] = [d for d in dirnames if self._may_match(rel + d + "/", prefix)]
            for name in filenames:
                key = rel + name
                if name.startswith(fs.RESERVED) or not key.startswith(prefix):
                    continue
                path = Path(dirpath, name)
                try:
                    found.append(fs.object_info(key, path, path.stat()))
                except FileNotFoundError:
                    continue  # deleted while we listed
        return sorted(found, key=lambda info: info.key)

    @staticmethod
    def _may_match(folder: str, prefix: str) -> bool:
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        return not name.startswith(fs.RESERVED) and (folder.startswith(prefix) or prefix.startswith(folder))

    async def list_dirs(self, prefix: str) -> list[str]:
        fs.check_key("list_dirs", prefix, prefix=True)
        return await self._run("list_dirs", prefix, self._list_dirs_sync, prefix)

    def _list_dirs_sync(self, prefix: str) -> list[str]:
        base, partial = prefix[: prefix.rfind("/") + 1], prefix[prefix.rfind("/") + 1 :]
        try:
            entries = list(os.scandir(self.root / base))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            e.name for e in entries if e.is_dir() and e.name.startswith(partial) and not e.name.startswith(fs.RESERVED)
        )

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        fs.check_key("get", key)
        return await self._run("get", key, self._get_sync, key, start, end)

    def _get_sync(self, key: str, start: int, end: int | None) -> bytes:
        try:
            fd = os.open(self.root / key, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise fs.missing("get", key) from None
        try:
            size = os.fstat(fd).st_size
            if start and start >= size:
                raise StorageError(
                    "get", key, "InvalidRange", f"start {start} >= size {size}", http_status=416, transient=False
                )
            stop = size if end is None else min(end, size)
            chunks, pos = [], start
            while pos < stop:
                chunk = os.pread(fd, min(stop - pos, 1 << 24), pos)
                if not chunk:
                    break
                chunks.append(chunk)
                pos += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    async def delete(self, key: str) -> None:
        fs.check_key("delete", key)
        await self._run("delete", key, self._delete_sync, self.root / key)

    def _delete_sync(self, path: Path) -> None:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        fs.fsync_dir(path.parent)
        fs.prune_empty_dirs(path.parent, self.root)

    async def presign_get(self, key: str, expires_seconds: int) -> str:
        fs.check_key("presign", key)
        return "file://" + quote(str((self.root / key).absolute()))

    # -- multipart (emulated) -----------------------------------------------------------------

    async def create_multipart(self, key: str) -> str:
        fs.check_key("create_multipart", key)
        return await self._run("create_multipart", key, self._create_sync, key)

    def _create_sync(self, key: str) -> str:
        upload_id = uuid.uuid4().hex
        fs.makedirs_durable(self._uploads)
        # Build the upload folder under a temporary name so it never exists without its meta.
        tmp = self._uploads / f"{fs.TMP_PREFIX}{upload_id}"
        tmp.mkdir()
        meta = {"key": key, "initiated": datetime.now(UTC).isoformat()}
        fs.write_atomic(tmp / "meta.json", fs.fill_from(json.dumps(meta).encode()))
        os.rename(tmp, self._uploads / upload_id)
        fs.fsync_dir(self._uploads)
        return upload_id

    def _upload_dir(self, op: str, key: str, upload_id: str) -> Path:
        """The upload's folder, after checking it exists and belongs to `key`."""
        if len(upload_id) != 32 or not all(c in "0123456789abcdef" for c in upload_id):
            raise fs.missing(op, key, "NoSuchUpload")
        folder = self._uploads / upload_id
        try:
            meta = json.loads((folder / "meta.json").read_bytes())
        except (FileNotFoundError, ValueError):  # ValueError: debris from a crash, not JSON
            raise fs.missing(op, key, "NoSuchUpload") from None
        if meta.get("key") != key:
            raise fs.missing(op, key, "NoSuchUpload")
        return folder

    async def upload_part(self, key: str, upload_id: str, number: int, body: Body) -> Part:
        fs.check_key("upload_part", key)
        if not 1 <= number <= 10000:
            raise StorageError(
                "upload_part",
                key,
                "InvalidArgument",
                f"part number {number} is outside 1..10000",
                http_status=400,
                transient=False,
            )
        return await self._run("upload_part", key, self._upload_part_sync, key, upload_id, number, body)

    def _upload_part_sync(self, key: str, upload_id: str, number: int, body: Body) -> Part:
        folder = self._upload_dir("upload_part", key, upload_id)
        try:
            # No make_parents: a concurrent abort must not be undone by re-creating its folder.
            etag = fs.write_atomic(folder / f"part-{number:05d}", fs.fill_from(body), make_parents=False)
        except FileNotFoundError:
            raise fs.missing("upload_part", key, "NoSuchUpload") from None
        return Part(number, etag, body_size(body))

    async def list_parts(self, key: str, upload_id: str) -> list[Part]:
        fs.check_key("list_parts", key)
        return await self._run("list_parts", key, self._list_parts_sync, key, upload_id)

    def _list_parts_sync(self, key: str, upload_id: str) -> list[Part]:
        folder = self._upload_dir("list_parts", key, upload_id)
        parts = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("part-") and entry.name[5:].isdigit():
                st = entry.stat()
                parts.append(Part(int(entry.name[5:]), fs.read_etag(Path(entry.path), st), st.st_size))
        return parts

    async def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> str:
        fs.check_key("complete_multipart", key)
        return await self._run("complete_multipart", key, self._complete_sync, key, upload_id, parts)

    def _complete_sync(self, key: str, upload_id: str, parts: list[Part]) -> str:
        folder = self._upload_dir("complete_multipart", key, upload_id)
        parts = sorted(parts, key=lambda p: p.number)
        stored = {p.number: p for p in self._list_parts_sync(key, upload_id)}
        numbers = [p.number for p in parts]
        if not parts or len(set(numbers)) != len(numbers):
            raise StorageError(
                "complete_multipart", key, "InvalidPartOrder", "no or duplicate parts", http_status=400, transient=False
            )
        for part in parts:
            if part.number not in stored or stored[part.number].etag != part.etag:
                raise StorageError(
                    "complete_multipart",
                    key,
                    "InvalidPart",
                    f"part {part.number} is missing or has another etag",
                    http_status=400,
                    transient=False,
                )

        def concat(fd: int) -> str:
            for part in parts:
                fs.append_file(fd, folder / f"part-{part.number:05d}")
            return fs.multipart_etag(parts)

        etag = fs.write_atomic(self.root / key, concat)
        shutil.rmtree(folder, ignore_errors=True)
        fs.fsync_dir(self._uploads)
        return etag

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        fs.check_key("abort_multipart", key)
        await self._run("abort_multipart", key, self._abort_sync, key, upload_id)

    def _abort_sync(self, key: str, upload_id: str) -> None:
        try:
            folder = self._upload_dir("abort_multipart", key, upload_id)
        except StorageError:
            return  # unknown upload: nothing to discard
        shutil.rmtree(folder, ignore_errors=True)
        fs.fsync_dir(self._uploads)

    async def list_multipart_uploads(self, prefix: str) -> list[PendingUpload]:
        fs.check_key("list_multipart_uploads", prefix, prefix=True)
        return await self._run("list_multipart_uploads", prefix, self._list_uploads_sync, prefix)

    def _list_uploads_sync(self, prefix: str) -> list[PendingUpload]:
        try:
            entries = list(os.scandir(self._uploads))
        except FileNotFoundError:
            return []
        pending = []
        for entry in entries:
            try:
                meta = json.loads(Path(entry.path, "meta.json").read_bytes())
            except (FileNotFoundError, NotADirectoryError, ValueError):
                continue  # a folder still being created, or debris
            if meta["key"].startswith(prefix):
                initiated = datetime.fromisoformat(meta["initiated"])
                pending.append(PendingUpload(meta["key"], entry.name, initiated))
        return sorted(pending, key=lambda u: (u.key, u.initiated))
