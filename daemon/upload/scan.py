"""Scanning the checkpoint folder: the source of truth that inotify only hints at (SPEC §5).

`scan` walks the tree without following links; `needs_polling` tells file systems where inotify
cannot see other machines' writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterator

import structlog

log = structlog.get_logger()

SkipDir = Callable[[str], bool]

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


def scan(root: str, skip_dir: SkipDir = lambda relpath: False) -> Iterator[str]:
    """Absolute paths of every regular file under root, recursively (os.scandir, no symlink following,
    directories for which skip_dir(relpath) is true are not entered; files vanishing mid-scan are fine)."""
    root = os.path.abspath(root)
    return walk(root, root, skip_dir)


def walk(root: str, top: str, skip_dir: SkipDir) -> Iterator[str]:
    """scan() of the subtree `top`, with skip_dir still judging paths relative to `root`."""
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
