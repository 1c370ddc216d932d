"""The durable record of what this rank has pinned, is uploading, and has stored.

An append-only JSON-lines file: one line per fact, written through at once, fsynced in groups, replayed at start,
rewritten compactly (temp name, fsync, rename) at start and at clean shutdown. A torn last line
from a crash is ignored. Losing the newest lines only costs a repeated upload, never a file.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict, dataclass, field

from daemon.catalog.manifest import StoredFile
from daemon.files import write_atomic
from daemon.upload.complete import Identity
from daemon.upload.pin import Pin


@dataclass(frozen=True)
class Stored:
    relpath: str
    identity: Identity
    sha256: str
    key: str
    etag: str

    def file(self) -> StoredFile:
        """As the checkpoint's manifest lists it."""
        return StoredFile(self.relpath, self.identity.size, self.sha256, self.key, self.etag)


@dataclass(frozen=True)
class Multipart:
    """An upload in progress: resumable after a crash if the file is unchanged."""

    relpath: str
    identity: Identity
    key: str
    upload_id: str
    part_size: int


@dataclass(frozen=True)
class Pinned:
    """A hard link in the staging folder holding a completed file's content."""

    relpath: str
    identity: Identity
    stage: str  # file name inside the staging folder


@dataclass
class State:
    stored: dict[str, Stored] = field(default_factory=dict)
    multipart: dict[str, Multipart] = field(default_factory=dict)
    pinned: dict[str, Pinned] = field(default_factory=dict)  # by stage name

    def apply(self, record: dict) -> None:
        op = record.pop("op")
        if op in ("stored", "multipart", "pinned"):
            record["identity"] = Identity(**record["identity"])
        if op == "stored":
            self.stored[record["relpath"]] = Stored(**record)
        elif op == "multipart":
            self.multipart[record["relpath"]] = Multipart(**record)
        elif op == "multipart_done":
            self.multipart.pop(record["relpath"], None)
        elif op == "pinned":
            self.pinned[record["stage"]] = Pinned(**record)
        elif op == "unpinned":
            self.pinned.pop(record["stage"], None)

    def records(self) -> list[dict]:
        out = [{"op": "stored", **asdict(s)} for s in self.stored.values()]
        out += [{"op": "multipart", **asdict(m)} for m in self.multipart.values()]
        out += [{"op": "pinned", **asdict(p)} for p in self.pinned.values()]
        return out


class Journal:
    """Blocking file I/O: call from a worker thread, or accept a few microseconds per record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.state = State()
        self._file = None
        self._written = self._durable = 0  # records written, and how many of them are fsynced

    def open(self) -> State:
        """Replay the journal, compact it, and open it for appending."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        self.state.apply(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn line from a crash, or a record of a future version
        except FileNotFoundError:
            pass
        self.compact()
        return self.state

    def compact(self) -> None:
        lines = "".join(_line(record) for record in self.state.records())
        write_atomic(self.path, lines.encode())
        if self._file:
            self._file.close()
        # Line-buffered: each record reaches the OS at once, so a killed process loses nothing;
        # only fsync (surviving a machine crash) is batched.
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the journal

    def record(self, op: str, value: object | None = None, **fields: object) -> None:
        record = {"op": op, **(asdict(value) if value is not None else {}), **fields}
        self._file.write(_line(record))
        self.state.apply(dict(record))
        self._written += 1

    async def sync(self) -> None:
        """Make every record so far durable (group commit: one fsync for many records).

        For the event loop: the records are already with the OS; only the fsync, which can take
        as long as the disk wants, runs in a thread, on its own descriptor so that a journal
        compacted or closed meanwhile cannot have the number reused under it.
        """
        target = self._written
        if not self._file or self._durable >= target:
            return
        # Its own fsync even while another is in flight: returning early could mean returning
        # before the records this caller depends on are on disk.
        await asyncio.to_thread(_fsync_and_close, os.dup(self._file.fileno()))
        self._durable = max(self._durable, target)

    def _sync_now(self) -> None:
        if self._file and self._durable < self._written:
            os.fsync(self._file.fileno())
            self._durable = self._written

    def close(self) -> None:
        """Blocking (a thread): sync, compact, close."""
        if self._file:
            try:
                self._sync_now()
                self.compact()
            finally:  # a full disk fails the compaction, not the release of the descriptor
                self._file.close()
                self._file = None


def release(journal: Journal, pin: Pin) -> None:
    """Let go of a pin; journal it when that removed its staging link (no other job holds it)."""
    stage = pin.stage
    if pin.release():
        journal.record("unpinned", stage=stage)


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
