"""The journal's records: what each line says, how a line is checked, and how a file is replayed.

Every record is validated into its dataclass with its types checked, and every path and stage name
checked to stay where it belongs: a journal is read after crashes and may hold anything.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from daemon.catalog import layout
from daemon.catalog.manifest import StoredFile
from daemon.upload import statedir
from daemon.upload.complete import Identity

MAX_LINE = 1 << 20  # bytes; a record is a few hundred, a 4 KiB path escaped as \uXXXX some 25 K


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


class Corrupt(ValueError):
    """A journal that cannot be trusted: `line` (1-based; 0 for the file as a whole) says where."""

    def __init__(self, line: int, why: str) -> None:
        self.line, self.why = line, why
        super().__init__(f"line {line}: {why}" if line else why)


# --- records: every field type-checked, every path kept inside its folder --------------------------


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(why)


def _int(v: Any, least: int | None = 0) -> int:
    _check(isinstance(v, int) and not isinstance(v, bool), "not an integer")
    _check(least is None or v >= least, f"below {least}")
    return v


def _str(v: Any) -> str:
    _check(isinstance(v, str), "not a string")
    return v


def _relpath(v: Any) -> str:
    layout.check_relpath(_str(v))  # UnsafePath, a ValueError: absolute, '..', NUL, not UTF-8
    _check(not statedir.is_state(v), "inside the state folder")
    return v


def _stage(v: Any) -> str:
    _check(_str(v) not in ("", ".", "..") and "/" not in v and "\0" not in v, "not a name inside the staging folder")
    return v


def _identity(v: Any) -> Identity:
    _check(isinstance(v, dict) and set(v) == {"dev", "ino", "size", "mtime_ns"}, "not {dev, ino, size, mtime_ns}")
    return Identity(_int(v["dev"]), _int(v["ino"]), _int(v["size"]), _int(v["mtime_ns"], None))


def _sha256(v: Any) -> str:
    _check(bool(re.fullmatch(r"[0-9a-f]{64}", _str(v))), "not 64 lowercase hex digits")
    return v


def _nonempty(v: Any) -> str:
    _check(bool(_str(v)), "empty")
    return v


_key = _relpath  # a store key relative to the prefix: the same rules, so no '..' reaches a manifest
_OPS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "stored": {"relpath": _relpath, "identity": _identity, "sha256": _sha256, "key": _key, "etag": _str},
    "unstored": {"relpath": _relpath},  # the store lost it (not pruned): upload it again
    "multipart": {
        "relpath": _relpath,
        "identity": _identity,
        "key": _key,
        "upload_id": _nonempty,
        "part_size": lambda v: _int(v, 1),
    },
    "multipart_done": {"relpath": _relpath},
    "pinned": {"relpath": _relpath, "identity": _identity, "stage": _stage},
    "unpinned": {"stage": _stage},
}


def parse(record: Any) -> tuple[str, dict[str, Any]]:
    """A decoded JSON value as (op, typed fields); ValueError saying what is wrong with it."""
    _check(isinstance(record, dict), f"not a JSON object but {type(record).__name__}")
    op = record.get("op")
    fields = _OPS.get(op) if isinstance(op, str) else None
    _check(fields is not None, f"unknown op {str(op)[:40]!r}")
    assert fields is not None
    got = set(record) - {"op"}
    _check(got == set(fields), f"{op}: fields {sorted(got)[:8]}, expected {sorted(fields)}")
    out = {}
    for name, check in fields.items():
        try:
            out[name] = check(record[name])
        except ValueError as e:
            raise ValueError(f"{op}.{name}: {e}") from None
    return op, out


def _decode(number: int, line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        return parse(json.loads(line.decode("utf-8")))
    except RecursionError:
        raise Corrupt(number, "nested too deep") from None
    except UnicodeDecodeError:
        raise Corrupt(number, "not UTF-8") from None
    except json.JSONDecodeError as e:
        raise Corrupt(number, f"not JSON ({e.msg})") from None
    except ValueError as e:
        raise Corrupt(number, str(e)) from None


@dataclass
class State:
    stored: dict[str, Stored] = field(default_factory=dict)
    multipart: dict[str, Multipart] = field(default_factory=dict)
    pinned: dict[str, Pinned] = field(default_factory=dict)  # by stage name

    def apply(self, op: str, f: dict[str, Any]) -> None:
        """Apply one parsed record (see `parse`)."""
        if op == "stored":
            self.stored[f["relpath"]] = Stored(**f)
        elif op == "unstored":
            self.stored.pop(f["relpath"], None)
        elif op == "multipart":
            self.multipart[f["relpath"]] = Multipart(**f)
        elif op == "multipart_done":
            self.multipart.pop(f["relpath"], None)
        elif op == "pinned":
            self.pinned[f["stage"]] = Pinned(**f)
        elif op == "unpinned":
            self.pinned.pop(f["stage"], None)

    def records(self) -> list[dict]:
        out = [{"op": "stored", **asdict(s)} for s in self.stored.values()]
        out += [{"op": "multipart", **asdict(m)} for m in self.multipart.values()]
        out += [{"op": "pinned", **asdict(p)} for p in self.pinned.values()]
        return out

    def copy(self) -> State:
        return State(dict(self.stored), dict(self.multipart), dict(self.pinned))


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    number = 0
    while line := f.readline(MAX_LINE + 1):
        number += 1
        yield number, line


def replay(f: BinaryIO) -> State:
    """The state a journal's lines hold.

    | what the journal holds                                                   | outcome       |
    |--------------------------------------------------------------------------|---------------|
    | complete lines ("\\n"-ended), each a valid record                         | replayed      |
    | a last line without "\\n" (a crash mid-write)                             | silently dropped |
    | a complete line that is not a valid record: not UTF-8, not JSON, not an   | Corrupt: the  |
    |   object, unknown op, a field missing, extra or of the wrong type, a path | whole journal |
    |   out of the folder or into the state folder, a staging name with a '/'  | is set aside  |
    |   (anywhere, the last line too, a blank line too)                        |               |
    | a line longer than MAX_LINE                                              | Corrupt       |
    | (in `Journal.open`) not a regular file, or unreadable                    | Corrupt       |

    Why the whole journal and not the line: this writer only ever appends whole lines (a short
    write is finished where it stopped, a doubtful file is rewritten), so a bad complete line means
    something else wrote the file or the disk lost data, and no line of it can be trusted. A new
    pod's recovery (reconcile with the store's manifests) is always safe; a wrong state is not.
    """
    state = State()
    for number, line in _lines(f):
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE:
                raise Corrupt(number, f"a line longer than {MAX_LINE} bytes")
            break  # the last line, torn by a crash
        state.apply(*_decode(number, line))
    return state


def salvage_pins(f: BinaryIO) -> dict[str, Pinned]:
    """The valid `pinned` lines of a corrupt journal not followed by their `unpinned`: recovery
    adopts one only if its staging link still is that very file (the only copy of a rotated one)."""
    pins: dict[str, Pinned] = {}
    for number, line in _lines(f):
        with contextlib.suppress(Corrupt):
            op, fields = _decode(number, line)
            if op == "pinned":
                pins[fields["stage"]] = Pinned(**fields)
            elif op == "unpinned":
                pins.pop(fields["stage"], None)
    return pins
