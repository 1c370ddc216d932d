"""Staging: each checkpoint is restored into a private folder next to its destination and put in
place only once every file is verified, so that no folder holds a completion marker while it
misses files, whatever fails or kills the restore (issue 10).

One staging folder, in the rank folder (`.tmp*` names are never uploaded, and no loader takes
them for a checkpoint):

    .tmp-ckptd-restore-<random>/   flock'ed while a restore uses it; removed by the next restore
        tree/<relpath>             the checkpoint's files, markers excepted until sealed
        markers/<n>                its marker files, under names no reader looks for

Every path is walked link-free from the rank folder's descriptor (safefs). What `moves` does
when the destination folder already exists is documented there.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import structlog

from daemon.catalog import layout
from daemon.restore import safefs
from daemon.restore.plan import Unit

STAGING_PREFIX = ".tmp-ckptd-restore-"
TREE, MARKERS = "tree", "markers"
log = structlog.get_logger()
Move = tuple[str, str]  # (what, relpath inside the checkpoint folder)


def is_marker(relpath: str, patterns: Iterable[str]) -> bool:
    """Whether the file's name (not its folder's) matches a marker glob, as the uploader decides."""
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def moves(exists: bool, staged: Sequence[str], markers: Sequence[str], kept: set[str], present: set[str]) -> list[Move]:
    """The renames and unlinks that put a staged checkpoint in place, in order.

    `staged`: files downloaded into the staging folder; `markers`: the manifest's marker files;
    `kept`: files already in the destination with the right bytes (left alone); `present`: marker
    files in the destination. A kill between any two steps leaves no folder holding a marker of
    this checkpoint while missing one of its files.

    | destination | moves, in order                                                              |
    |-------------|------------------------------------------------------------------------------|
    | absent      | `seal` each marker into the staged tree, `publish` the tree: one rename     |
    | exists      | `aside` each kept marker (into staging), `drop` each stale one; `move` each  |
    |             | staged file in; `return` each marker last                                   |
    | exists, nothing staged | nothing: the folder already is the checkpoint                     |

    An existing folder is merged, not replaced: files of the manifest with the right bytes are
    kept as they are, others are replaced, files the manifest does not list are left alone (the
    user's own; as before staging). Two references on one folder are refused earlier (plan.py).
    """
    if not exists:
        return [("seal", m) for m in markers] + [("publish", ".")]
    if not staged:
        return []
    out: list[Move] = [("aside", m) for m in markers if m in kept]
    out += [("drop", m) for m in markers if m in present and m not in kept]
    out += [("move", f) for f in staged if f not in markers]
    return out + [("return", m) for m in markers]


@dataclass
class Inspection:
    """What the destination of a unit holds, read before anything is downloaded."""

    exists: bool
    kept: set[str] = field(default_factory=set)
    present: set[str] = field(default_factory=set)  # markers there, right bytes or not


def _split(relpath: str) -> tuple[list[str], str]:
    *dirs, name = relpath.split("/")
    return dirs, name


@contextlib.contextmanager
def destination(rank_fd: int, unit: Unit, *, required: bool = True) -> Iterator[int | None]:
    """The unit's folder (None if missing and not `required`); Refused if it is a link or no folder."""
    if unit.name == layout.ROOT_CHECKPOINT:
        fd: int | None = os.dup(rank_fd)
    else:
        fd = safefs.open_dir(rank_fd, unit.name, unit.folder)
        if fd is None and required:
            raise safefs.Refused(unit.folder, "vanished during the restore")
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def inspect(rank_fd: int, unit: Unit, patterns: Sequence[str]) -> Inspection:
    """Refused for a link or special file anywhere the unit must write; else what is already there."""
    with destination(rank_fd, unit, required=False) as dest:
        if dest is None:
            return Inspection(False)
        found = Inspection(True)
        for item in unit.items:
            dirs, name = _split(item.relpath)
            with safefs.folder(dest, dirs, unit.folder) as d:
                if d is None:
                    continue
                safefs.check_file_slot(d, name, item.target)
                if safefs.matches(d, name, item.size, item.sha256):
                    found.kept.add(item.relpath)
                if is_marker(item.relpath, patterns) and safefs.kind(d, name) == safefs.FILE:
                    found.present.add(item.relpath)
        return found


def remove_stale(rank_fd: int, rank_path: str) -> list[str]:
    """Remove staging folders an interrupted restore left behind; those in use stay. Their names."""
    removed = []
    for name in os.listdir(rank_fd):
        if not name.startswith(STAGING_PREFIX):
            continue
        try:
            fd = safefs.open_dir(rank_fd, name, os.path.join(rank_path, name))
        except safefs.Refused:
            fd = None  # not ours (a link, a file): the name is ours to reclaim, its target is not touched
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a restore running now holds it
            safefs.remove_tree(rank_fd, name)
            removed.append(name)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


class Staging:
    """The private folder one unit is downloaded into, then put in place by `apply`."""

    def __init__(self, rank_fd: int, rank_path: str, unit: Unit, patterns: Sequence[str]) -> None:
        self.rank_fd, self.unit = rank_fd, unit
        self.name = f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        self.path = os.path.join(rank_path, self.name)
        os.mkdir(self.name, 0o700, dir_fd=rank_fd)
        fd = safefs.open_dir(rank_fd, self.name, self.path)
        assert fd is not None
        self.fd = fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by close, or by the kernel on a kill
            os.mkdir(TREE, 0o755, dir_fd=fd)
            os.mkdir(MARKERS, 0o700, dir_fd=fd)
        except BaseException:
            self.remove()
            raise
        markers = [i.relpath for i in unit.items if is_marker(i.relpath, patterns)]
        self.slots = {m: str(n) for n, m in enumerate(markers)}

    @property
    def markers(self) -> list[str]:
        return list(self.slots)

    @contextlib.contextmanager
    def _at(self, parts: list[str], name: str) -> Iterator[tuple[int, str]]:
        with safefs.folder(self.fd, parts, self.path, create=True) as d:
            assert d is not None
            yield d, name

    def slot(self, relpath: str) -> contextlib.AbstractContextManager[tuple[int, str]]:
        """(folder descriptor, name) where the staged copy of `relpath` lives: markers under a
        number until they are sealed or returned, the other files at their own path in the tree."""
        if relpath in self.slots:
            return self._at([MARKERS], self.slots[relpath])
        return self._tree(relpath)

    def _tree(self, relpath: str) -> contextlib.AbstractContextManager[tuple[int, str]]:
        dirs, name = _split(relpath)
        return self._at([TREE, *dirs], name)

    def apply(self, move: Move) -> None:
        """One step of `moves`, made durable before the next one."""
        what, relpath = move
        if what == "publish":
            self._publish()
        elif what == "seal":
            with self.slot(relpath) as (s, sname), self._tree(relpath) as (t, tname):
                safefs.rename(s, sname, t, tname)
                os.fsync(t)
        else:
            with destination(self.rank_fd, self.unit) as dest:
                assert dest is not None
                self._in_place(what, relpath, dest)

    def _in_place(self, what: str, relpath: str, dest: int) -> None:
        dirs, name = _split(relpath)
        shown = os.path.join(self.unit.folder, relpath)
        with safefs.folder(dest, dirs, self.unit.folder, create=True) as d:
            assert d is not None
            if what == "drop":
                if safefs.kind(d, name) == safefs.FILE:
                    os.unlink(name, dir_fd=d)
            elif what == "aside":
                if (found := safefs.kind(d, name)) != safefs.FILE:  # replaced since it was inspected
                    raise safefs.Refused(shown, f"is {found}, not a file")
                with self.slot(relpath) as (s, sname):
                    safefs.rename(d, name, s, sname)
            else:  # move, return
                with self.slot(relpath) as (s, sname):
                    safefs.check_file_slot(d, name, shown)
                    safefs.rename(s, sname, d, name)
            os.fsync(d)

    def _publish(self) -> None:
        # Every folder of the tree durable before the one rename that makes all of it visible.
        for _, _, _, dir_fd in os.fwalk(TREE, dir_fd=self.fd):
            os.fsync(dir_fd)
        if (found := safefs.kind(self.rank_fd, self.unit.name)) is not None:
            raise safefs.Refused(self.unit.folder, f"{found} appeared there during the restore")
        safefs.rename(self.fd, TREE, self.rank_fd, self.unit.name)
        os.fsync(self.rank_fd)

    def remove(self) -> None:
        """Delete the staging folder and what is left in it, then release its lock."""
        try:
            safefs.remove_tree(self.rank_fd, self.name)
        finally:
            os.close(self.fd)
