"""Scanning the checkpoint folder: the source of truth that inotify only hints at (SPEC §5).

`scan` walks the tree without following links. `probe` and `open_file` reach one file by an
openat-style walk from the root: no link below the root is followed, whatever the trainer renames
meanwhile, so nothing outside the folder is ever read (a path-based open with O_NOFOLLOW checks
only the last component). Non-regular entries (links, FIFOs, sockets, devices) are reported, never
opened: opening a FIFO for reading blocks until a writer comes. `needs_polling` tells file systems
where inotify cannot see other machines' writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import structlog

from daemon.upload.complete import Identity

log = structlog.get_logger()

SkipDir = Callable[[str], bool]
Unlisted = Callable[[str, OSError], None]  # told each folder that cannot be listed, and why
Other = Callable[[str], None]  # told the absolute path of each entry that is neither file nor folder

# What a path holds. SYMLINK and NOT_REGULAR are also the FILES_SKIPPED reasons.
FILE, SYMLINK, NOT_REGULAR, GONE = "file", "symlink", "not_regular", "gone"

_FOLDER = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC  # search rights only, no read
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: belt and braces for FIFOs

# statfs f_type of file systems where inotify cannot see other machines' writes (inotify(7)).
NETWORK_FS = {
    0x6969: "nfs",
    0x65735546: "fuse",
    0xFE534D42: "smb2",
    0xFF534D42: "cifs",
    0x00C36400: "ceph",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x01021997: "9p",
}


@dataclass(frozen=True)
class Found:
    """What `probe` found at a path: a kind, the identity of a regular file, and for the log what
    else it is (`what`: "fifo", "socket", ...; a link's `target`, which is never followed)."""

    kind: str
    identity: Identity | None = None
    what: str = ""
    target: str = ""


def kind_of(mode: int) -> tuple[str, str]:
    """(kind, what) of a file mode. Folders count as GONE: the file that was asked for is not there.

    | mode                    | kind        | what             |
    |-------------------------|-------------|------------------|
    | regular                 | FILE        | file             |
    | symbolic link           | SYMLINK     | symlink          |
    | folder                  | GONE        | folder           |
    | FIFO, socket, device    | NOT_REGULAR | fifo, socket, .. |
    """
    if stat.S_ISREG(mode):
        return FILE, "file"
    if stat.S_ISLNK(mode):
        return SYMLINK, "symlink"
    if stat.S_ISDIR(mode):
        return GONE, "folder"
    what = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device"}
    return NOT_REGULAR, what.get(stat.S_IFMT(mode), "block device")


def scan(
    root: str,
    skip_dir: SkipDir = lambda relpath: False,
    others: Other | None = None,
    unlisted: Unlisted | None = None,
) -> Iterator[str]:
    """Absolute paths of every regular file under root, recursively (os.scandir, no symlink following,
    directories for which skip_dir(relpath) is true are not entered; files vanishing mid-scan are fine).
    Every other entry (a link to a file or a folder, a FIFO, a socket, a device) goes to `others`;
    a folder that cannot be listed (EACCES), whose files are therefore unknown, to `unlisted`."""
    root = os.path.abspath(root)
    return walk(root, root, skip_dir, others, unlisted)


def walk(
    root: str, top: str, skip_dir: SkipDir, others: Other | None = None, unlisted: Unlisted | None = None
) -> Iterator[str]:
    """scan() of the subtree `top`, with skip_dir still judging paths relative to `root`. A `top`
    that is not a folder itself (watchdog reports a link to a folder as a folder) goes to `others`."""
    if top != root:
        try:
            st = os.lstat(top)
        except OSError:
            return
        if not stat.S_ISDIR(st.st_mode):
            if others is not None and not stat.S_ISREG(st.st_mode):
                others(top)
            return
    rel_top = os.path.relpath(top, root)
    stack = [(top, "" if rel_top == "." else rel_top)]
    while stack:  # iterative: checkpoint trees can be deeper than the recursion limit
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            continue  # deleted (checkpoint rotation) between listing its parent and now
        except OSError as e:
            if unlisted is not None:
                unlisted(folder, e)
            else:
                log.warning("cannot list folder", path=folder, error=str(e))
            continue
        for entry in entries:
            with contextlib.suppress(OSError):  # DirEntry may stat; the file may be gone by now
                if entry.is_dir(follow_symlinks=False):
                    sub = os.path.join(rel, entry.name) if rel else entry.name
                    if not skip_dir(sub):
                        stack.append((entry.path, sub))
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path
                elif others is not None:
                    others(entry.path)


def probe(root: str, relpath: str) -> Found:
    """What root/relpath is, found without following any link below root. Raises OSError for
    errors that are not "gone" (EACCES, EIO): the caller decides what one file's error means."""
    parent = _parent(root, relpath)
    if isinstance(parent, Found):
        return parent
    fd, name = parent
    try:
        return _lstat(fd, name)
    finally:
        os.close(fd)


def open_file(root: str, relpath: str) -> tuple[int, os.stat_result] | Found:
    """A read-only descriptor of the regular file root/relpath and its fstat, reached without
    following any link below root; else what is there instead (never opened). Raises OSError for
    errors that are not "gone"."""
    parent = _parent(root, relpath)
    if isinstance(parent, Found):
        return parent
    folder, name = parent
    try:
        found = _lstat(folder, name)
        if found.kind != FILE:
            return found
        try:
            fd = os.open(name, _READ, dir_fd=folder)
        except (FileNotFoundError, NotADirectoryError):
            return Found(GONE)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):  # replaced by a link or a socket since the lstat
                return _lstat(folder, name)
            raise
    finally:
        os.close(folder)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):  # replaced by a FIFO between lstat and open: NONBLOCK kept us going
        os.close(fd)
        kind, what = kind_of(st.st_mode)
        return Found(kind, what=what)
    return fd, st


def _parent(root: str, relpath: str) -> tuple[int, str] | Found:
    """(descriptor of the folder that holds relpath, the last name), walked one folder at a time
    from root with O_NOFOLLOW; or what stopped the walk (a link: SYMLINK; nothing there: GONE)."""
    *folders, name = relpath.split("/")
    try:
        fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # the root itself is configured: trusted
    except (FileNotFoundError, NotADirectoryError):
        return Found(GONE)
    try:
        for part in folders:
            try:
                below = os.open(part, _FOLDER, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise
                found = _lstat(fd, part)  # a link (ELOOP or ENOTDIR with O_PATH), or a file now
                os.close(fd)
                return found if found.kind == SYMLINK else Found(GONE)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _lstat(folder: int, name: str) -> Found:
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return Found(GONE)
    kind, what = kind_of(st.st_mode)
    if kind == FILE:
        return Found(FILE, Identity.of(st), what)
    target = ""
    if kind == SYMLINK:
        with contextlib.suppress(OSError):  # the link's own text, never what it points at
            target = os.readlink(name, dir_fd=folder)
    return Found(kind, None, what, target)


_LIBC = ctypes.CDLL(None, use_errno=True)  # the running process: libc is already loaded


def needs_polling(path: str) -> str | None:
    """Name of the network/FUSE file system under path if inotify cannot see other machines' writes
    there, else None. A path that does not exist yet is judged by its nearest existing ancestor."""
    path = os.path.abspath(path)
    buf = ctypes.create_string_buffer(512)  # struct statfs, larger on every ABI; f_type is a leading long
    while _LIBC.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        parent = os.path.dirname(path)
        if err not in (errno.ENOENT, errno.ENOTDIR) or parent == path:
            raise OSError(err, os.strerror(err), path)
        path = parent
    f_type = int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder)
    return NETWORK_FS.get(f_type & 0xFFFFFFFF)
