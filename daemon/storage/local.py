"""Local-directory backend for file:// stores: the embedded default and shared mounts (NFS, FUSE).

Objects are plain files at root/KEY, written atomically (see `localfs`). Multipart uploads are
emulated under root/.ckptd-multipart/UPLOAD_ID/ (a meta.json and one file per part) so the upload
engine has a single code path for both backends. All blocking I/O runs in worker threads.

Only regular files and real folders below the root are objects and prefixes: symbolic links and
special files (FIFOs, sockets, devices) are never followed or opened, so a link cannot make the
store read, list or delete something outside it, and a FIFO cannot hang a reader. Listings skip
them with one warning; get, head and delete treat them as missing, like a key with no file (S3
has no such things, so "no such object" is the answer every caller already handles). The root
itself may be a link (an alias of a mount point): the operator chose it.

`presign_get` can only return a file:// URL of the object: there is no server to enforce an
expiry, so the URL is as good as the reader's file-system permissions.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from daemon import logs
from daemon.storage import localfs as fs
from daemon.storage import nofollow
from daemon.storage.base import Body, Digests, ObjectInfo, Part, PendingUpload, Storage
from daemon.storage.bodies import body_size
from daemon.storage.errors import StorageError

T = TypeVar("T")
MULTIPART_DIR = ".ckptd-multipart"
_SAMPLE = 5  # skipped names quoted in a listing's warning
# What link() says on a file system without hard links (EPERM: FUSE file systems such as s3fs and
# vfat; our own temporary file is never one that protected_hardlinks would refuse).
_NO_HARD_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


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
        return await self._run("put", key, self._put_sync, key, fs.fill_from(body, key, expected))

    def _put_sync(self, key: str, fill: Callable[[int], str]) -> str:
        nofollow.refuse_linked_folders(self.root, "put", key)
        return fs.write_atomic(self.root / key, fill)

    # link() never replaces a name, so creating an object through it is atomic on any file system
    # with hard links; one without them makes this False (see put_if_absent).
    conditional_writes: bool | None = True

    async def put_if_absent(self, key: str, body: bytes) -> bool:
        fs.check_key("put_if_absent", key)
        return await self._run("put_if_absent", key, self._put_if_absent_sync, key, fs.fill_from(body, key))

    def _put_if_absent_sync(self, key: str, fill: Callable[[int], str]) -> bool:
        nofollow.refuse_linked_folders(self.root, "put_if_absent", key)
        dest = self.root / key
        # The bytes and their etag are made durable under a temporary name in the key's folder, by
        # the same primitive as put (it also makes the folders); the temporary file keeps the folder
        # from being pruned by a concurrent delete until the link is made. Then link(), unlike
        # rename(), publishes the object only if the name is free: EEXIST is "someone was first".
        tmp = dest.parent / f"{fs.TMP_PREFIX}{uuid.uuid4().hex}"
        fs.write_atomic(tmp, fill)
        try:
            created = self._publish(tmp, dest)
        finally:
            # After a link, a second name of the object; after EEXIST or an error, the loser's
            # bytes; after a rename, nothing. A crash before this leaves debris listings ignore.
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if not created:
            return self._existing("put_if_absent", key)
        fs.fsync_dir(dest.parent)  # the new name (and the temporary one gone) durable before "created"
        return True

    def _publish(self, tmp: Path, dest: Path) -> bool:
        """Give `tmp`'s file the name `dest`; False if the name is taken (nothing is replaced)."""
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # Some FUSE file systems have no hard links: degrade as base.py documents, to put's rename.
            self._no_hard_links(exc)
            os.rename(tmp, dest)
        return True

    def _existing(self, op: str, key: str) -> bool:
        """False when the object that was at `key` is a regular file (or is gone again: it was there);
        a folder, link or special file at the key is no object to read and cannot become one."""
        folder, _, name = key.rpartition("/")
        with nofollow.folder_fd(self.root, folder) as dir_fd:
            mode = None if dir_fd is None else nofollow.lstat_mode(name, dir_fd)
        if mode is None or stat.S_ISREG(mode):
            return False
        why = "a folder, link or special file is at the key, not an object"
        raise StorageError(op, key, "KeyConflict", why, http_status=409, transient=False)

    def _no_hard_links(self, exc: OSError) -> None:
        if self.conditional_writes is not False:
            self.conditional_writes = False
            logs.get(__name__).warning(
                "the store's file system has no hard links: create-if-absent is a plain put",
                store=self.url,
                error=exc.strerror,
            )

    async def head(self, key: str) -> ObjectInfo | None:
        fs.check_key("head", key)
        return await self._run("head", key, self._head_sync, key)

    def _head_sync(self, key: str) -> ObjectInfo | None:
        try:
            fd = nofollow.open_object(self.root, "head", key)
        except IsADirectoryError:
            return None  # a folder is not an object
        except StorageError as exc:
            if exc.missing:
                return None
            raise
        try:
            # The descriptor, not the path, for read_etag's getxattr: the path may be a link by now.
            return fs.object_info(key, fd, os.fstat(fd))  # type: ignore[arg-type]
        finally:
            os.close(fd)

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        fs.check_key("list", prefix, prefix=True)
        for info in await self._run("list", prefix, self._list_sync, prefix):
            yield info

    def _list_sync(self, prefix: str) -> list[ObjectInfo]:
        base = prefix[: prefix.rfind("/") + 1]  # walk only the deepest folder the prefix names
        found: list[ObjectInfo] = []
        skipped: list[str] = []
        with nofollow.folder_fd(self.root, base.rstrip("/")) as fd:
            if fd is not None:
                self._walk(fd, base, prefix, found, skipped)
        self._warn_skipped(prefix, skipped)
        return sorted(found, key=lambda info: info.key)

    def _walk(self, dir_fd: int, rel: str, prefix: str, found: list[ObjectInfo], skipped: list[str]) -> None:
        """Collect the objects matching `prefix` below the open folder `rel` ('' or ending in '/').

        lstat only (DirEntry with follow_symlinks=False): a link is reported in `skipped`, never
        followed, so a link to '/' costs one entry, not a walk of the whole machine.
        """
        with os.scandir(dir_fd) as it:
            entries = list(it)
        for entry in entries:
            key = rel + entry.name
            if entry.name.startswith(fs.RESERVED):
                continue
            if entry.is_dir(follow_symlinks=False):
                if self._may_match(key + "/", prefix):
                    with nofollow.subfolder(entry.name, dir_fd) as child:
                        if child is not None:  # None: removed while we listed
                            self._walk(child, key + "/", prefix, found, skipped)
            elif not key.startswith(prefix):
                continue
            elif entry.is_file(follow_symlinks=False):
                try:
                    found.append(fs.object_info(key, self.root / key, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue  # deleted while we listed
            else:
                skipped.append(key)

    def _warn_skipped(self, prefix: str, skipped: list[str]) -> None:
        """One warning per listing, so a skipped link is never silent nor floods the log."""
        if skipped:
            logs.get(__name__).warning(
                "skipping links and special files in the store: only regular files are objects",
                store=self.url,
                prefix=prefix,
                count=len(skipped),
                keys=sorted(skipped)[:_SAMPLE],
            )

    @staticmethod
    def _may_match(folder: str, prefix: str) -> bool:
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        return not name.startswith(fs.RESERVED) and (folder.startswith(prefix) or prefix.startswith(folder))

    async def list_dirs(self, prefix: str) -> list[str]:
        fs.check_key("list_dirs", prefix, prefix=True)
        return await self._run("list_dirs", prefix, self._list_dirs_sync, prefix)

    def _list_dirs_sync(self, prefix: str) -> list[str]:
        base, partial = prefix[: prefix.rfind("/") + 1], prefix[prefix.rfind("/") + 1 :]
        with nofollow.folder_fd(self.root, base.rstrip("/")) as fd:
            if fd is None:
                return []
            with os.scandir(fd) as it:
                entries = [e for e in it if e.name.startswith(partial) and not e.name.startswith(fs.RESERVED)]
        self._warn_skipped(prefix, [base + e.name for e in entries if nofollow.is_link_or_special(e)])
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    async def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        fs.check_key("get", key)
        return await self._run("get", key, self._get_sync, key, start, end)

    def _get_sync(self, key: str, start: int, end: int | None) -> bytes:
        fd = nofollow.open_object(self.root, "get", key)
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
        await self._run("delete", key, self._delete_sync, key)

    def _delete_sync(self, key: str) -> None:
        folder, _, name = key.rpartition("/")
        with nofollow.folder_fd(self.root, folder) as dir_fd:
            mode = None if dir_fd is None else nofollow.lstat_mode(name, dir_fd)
            if mode is None or not stat.S_ISREG(mode):
                return  # no object: a folder, link or special file is left alone, as listings skip it
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                return  # a concurrent delete won
            # fsync the descriptor, not the path: a concurrent delete of the folder's last other
            # object may already have pruned it, and the unlink is done either way.
            os.fsync(dir_fd)
        nofollow.prune(self.root, folder)

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

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: Body, digests: Digests | None = None
    ) -> Part:
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
        fill = fs.fill_from(body, key, (digests or {}).get("md5"))
        return await self._run("upload_part", key, self._upload_part_sync, key, upload_id, number, body, fill)

    def _upload_part_sync(self, key: str, upload_id: str, number: int, body: Body, fill: Callable[[int], str]) -> Part:
        folder = self._upload_dir("upload_part", key, upload_id)
        try:
            # No make_parents: a concurrent abort must not be undone by re-creating its folder.
            etag = fs.write_atomic(folder / f"part-{number:05d}", fill, make_parents=False)
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

        nofollow.refuse_linked_folders(self.root, "complete_multipart", key)
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
