"""Links at the top of the restore folder to this node's restored checkpoints and root files, so
that the reference docs' own training code finds them (SPEC §5):

    get_last_checkpoint(BT_LOAD_CHECKPOINT_DIR)          -> {dir}/checkpoint-40 -> rank-0/checkpoint-40
    AutoTokenizer.from_pretrained(BT_LOAD_CHECKPOINT_DIR) -> {dir}/tokenizer.json -> rank-0/tokenizer.json

The `rank-N/` layout stays as it is; the links are relative symlinks, never copies, each pointing
at exactly `rank-N/<its own name>`: that shape is how ckptd recognises the links it made. What a
restore links is what it restored (or found already in place) this time; links of an earlier
restore that no longer apply (another checkpoint, another rank sharing the folder) are removed or
replaced, so the folder's top never offers a checkpoint this restore was not asked for.

Nothing else is touched: a file, a folder or someone else's link at a name is left as it is, with
a warning. A name that would hide a rank folder or the restore summary is never linked.

Every step is atomic: a new link is one symlink(2), which never replaces anything; a link is
replaced by a symlink at a temporary name renamed over it. The folder is the pod's own: between
reading a name and renaming over it, only the trainer could race us, and it has not started yet.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from daemon.catalog import layout
from daemon.restore import safefs
from daemon.restore.plan import Unit

SUMMARY = "ckptd-restore.json"
TMP_PREFIX = ".tmp-ckptd-link-"
_RANK_FOLDER = re.compile(r"rank-(0|[1-9][0-9]*)")
CREATE, KEEP, REPLACE, REMOVE, LEAVE, NOTHING = "create", "keep", "replace", "remove", "leave", "nothing"
log = structlog.get_logger()


def linkable(name: str) -> bool:
    """Whether a restored checkpoint folder or root file may get a link at the top.

    | name                                         | linkable | why                                   |
    |----------------------------------------------|----------|---------------------------------------|
    | checkpoint-40, tokenizer.json, .gitattributes | yes     |                                       |
    | rank-0, rank-12                              | no       | it would hide (or be) a rank folder   |
    | ckptd-restore.json                           | no       | the restore summary                   |
    | .tmp-ckptd-link-..., .tmp-ckptd-restore-...  | no       | ckptd's temporary names               |
    | '', '.', '..', 'a/b'                         | no       | not one folder name                   |
    """
    return (
        layout.is_segment(name)
        and not _RANK_FOLDER.fullmatch(name)
        and name != SUMMARY
        and not name.startswith(".tmp-ckptd-")
    )


def names_of(units: Sequence[Unit], refused: Sequence[str]) -> list[str]:
    """What a restore put (or found) in the rank folder: checkpoint folders and root files, less
    the units of references it refused."""
    names = []
    for unit in units:
        if set(unit.refs) & set(refused):
            continue
        names += [i.relpath for i in unit.items] if unit.name == layout.ROOT_CHECKPOINT else [unit.name]
    return names


def target_of(name: str, rank: int) -> str:
    return f"rank-{rank}/{name}"


def is_ours(name: str, target: str | None) -> bool:
    """A link ckptd made: it points at exactly `rank-N/<its own name>`."""
    if target is None:
        return False
    folder, sep, rest = target.partition("/")
    return bool(sep) and rest == name and _RANK_FOLDER.fullmatch(folder) is not None


def action(wanted: bool, found: str | None, target: str | None, name: str, rank: int) -> str:
    """What to do at `name`, given what is there (`found`: safefs.kind, `target`: a link's).

    | wanted | at the name                          | action                         |
    |--------|--------------------------------------|--------------------------------|
    | yes    | nothing                              | create                         |
    | yes    | our link to rank-{rank}/name         | keep                           |
    | yes    | our link to another rank's           | replace                        |
    | yes    | someone else's link, a file, a folder | leave (warn)                  |
    | no     | our link (any rank)                  | remove (stale)                 |
    | no     | anything else                        | nothing                        |
    """
    ours = found == "a link" and is_ours(name, target)
    if not wanted:
        return REMOVE if ours else NOTHING
    if found is None:
        return CREATE
    if not ours:
        return LEAVE
    return KEEP if target == target_of(name, rank) else REPLACE


@dataclass
class Linked:
    linked: list[str] = field(default_factory=list)  # names whose link points at this rank now
    left: list[str] = field(default_factory=list)  # names something else holds: not linked
    removed: list[str] = field(default_factory=list)  # stale links of an earlier restore


def _read(root: int, name: str) -> tuple[str | None, str | None]:
    found = safefs.kind(root, name)
    return found, os.readlink(name, dir_fd=root) if found == "a link" else None


def _apply(root: int, name: str, what: str, rank: int) -> None:
    if what == CREATE:
        os.symlink(target_of(name, rank), name, dir_fd=root)  # fails, never replaces, if taken meanwhile
    elif what == REPLACE:
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex}"
        os.symlink(target_of(name, rank), tmp, dir_fd=root)
        try:
            safefs.rename(root, tmp, root, name)
        except BaseException:
            os.unlink(tmp, dir_fd=root)
            raise
    elif what == REMOVE:
        os.unlink(name, dir_fd=root)


def _held(root: int, restore_dir: str, rank: int, names: Iterable[str]) -> set[str]:
    """The linkable names that rank-{rank}/ holds as a plain folder or file (never a link)."""
    try:
        rank_fd = safefs.open_dir(root, f"rank-{rank}", os.path.join(restore_dir, f"rank-{rank}"))
    except safefs.Refused:
        return set()  # a link there: restore refused it, nothing of it is linked
    if rank_fd is None:
        return set()
    try:
        return {n for n in names if linkable(n) and safefs.kind(rank_fd, n) in (safefs.FILE, safefs.FOLDER)}
    finally:
        os.close(rank_fd)


def update(restore_dir: str, rank: int, names: Iterable[str]) -> Linked:
    """Make the top of `restore_dir` link exactly `names` (restored into rank-{rank}/); OSError if
    a link cannot be made or removed. Names that are not linkable, or that rank-{rank}/ does not
    hold as a plain folder or file, are left out."""
    out = Linked()
    root = os.open(restore_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the user's: may be a link
    try:
        wanted = _held(root, restore_dir, rank, names)
        for name in sorted(set(os.listdir(root)) | wanted):
            if name.startswith(TMP_PREFIX) and safefs.kind(root, name) == "a link":
                os.unlink(name, dir_fd=root)  # an interrupted replacement's
                continue
            found, target = _read(root, name)
            what = action(name in wanted, found, target, name, rank)
            if what == LEAVE:
                log.warning(
                    "not linking a restored checkpoint at the top of the restore folder: something else is there",
                    path=os.path.join(restore_dir, name),
                    found=found if target is None else f"a link to {target}",
                )
                out.left.append(name)
                continue
            _apply(root, name, what, rank)
            if what == REMOVE:
                out.removed.append(name)
            elif what != NOTHING:
                out.linked.append(name)
        os.fsync(root)
    finally:
        os.close(root)
    return out
