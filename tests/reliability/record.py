"""What the trainer simulator (and the trial itself) did, as JSON lines appended to one file.

Each line is one `write(2)` on an O_APPEND descriptor, so several writer processes can share the
file and a SIGKILL leaves at most one torn last line (skipped when read). Events:

    begin     path          a version of the file is being written (open for writing)
    done      path sha size the version is complete (closed, or renamed into place)
    deleted   path          the file was removed (rotation, or a deletion during upload)
    complete  checkpoint    every file of the checkpoint is done, its marker (if any) last
    unstorable path why     a file no store can hold (non-UTF-8 name, unreadable): never stored
    planted   path why      a FIFO, socket, link or outside file the trial put there: never stored
    failed    path error    the write failed (ENOSPC): that version never completed
    pid       pid role      a writer process, for the trial to find and check later
    end                     the writer finished cleanly

Paths are relative to the checkpoint folder; names that are not UTF-8 travel as surrogate escapes.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


class Recorder:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)

    def emit(self, ev: str, **fields: object) -> None:
        line = json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class History:
    versions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    last_done: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # path -> (sha, size, t)
    deleted: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    begun: dict[str, float] = field(default_factory=dict)  # paths whose last write never completed
    complete: dict[str, float] = field(default_factory=dict)  # checkpoint -> when
    unstorable: dict[str, str] = field(default_factory=dict)
    planted: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    pids: dict[int, str] = field(default_factory=dict)
    ended: bool = False

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> History:
        h = cls()
        try:
            lines = Path(path).read_bytes().splitlines()
        except FileNotFoundError:
            return h
        for line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # the torn last line of a killed writer
            h._apply(ev)
        return h

    def _apply(self, ev: dict) -> None:
        kind, path, t = ev["ev"], ev.get("path"), ev["t"]
        if kind == "begin":
            self.begun[path] = t
        elif kind == "done":
            self.begun.pop(path, None)
            self.versions[path].append(ev["sha"])
            self.last_done[path] = (ev["sha"], ev["size"], t)
        elif kind == "deleted":
            self.begun.pop(path, None)
            self.deleted[path].append(t)
        elif kind == "complete":
            self.complete[ev["checkpoint"]] = t
        elif kind in ("unstorable", "planted", "failed"):
            self.begun.pop(path, None)
            getattr(self, kind)[path] = ev.get("why") or ev.get("error", "")
        elif kind == "pid":
            self.pids[ev["pid"]] = ev["role"]
        elif kind == "end":
            self.ended = True

    def deleted_after_done(self, path: str) -> float | None:
        """When the last completed version of `path` was deleted, if it was."""
        done = self.last_done.get(path)
        later = [t for t in self.deleted.get(path, ()) if done and t >= done[2]]
        return min(later) if later else None
