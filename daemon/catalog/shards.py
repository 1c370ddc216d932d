"""Which files a PyTorch DCP checkpoint is made of, read from its `.metadata` (issue 14).

DCP's coordinator writes `.metadata` last, after every rank wrote its shards, and it names the file
that holds each saved item (`_StorageInfo.relative_path`). It is therefore the proof that a
checkpoint saved by several nodes is complete: every file it names must be stored.

`.metadata` is a pickle. Unpickling it would run whatever a hostile file asks, and would need torch
in the daemon, so the opcodes are only scanned (`pickletools.genops` executes nothing): the string
that follows the field name `relative_path` in a dataclass's state, and ends with `.distcp`, is a
shard file name, either written out or, when the same file is named again, fetched back from the
pickle's memo.
"""

from __future__ import annotations

import pickletools

from daemon.catalog import layout

METADATA = ".metadata"  # the coordinator's; `__N.metadata` are rank-local ones of an uncoordinated save
SUFFIX = ".distcp"  # FileSystemWriter's: a state-dict key named `relative_path` is no file
MAX_METADATA_BYTES = 256 << 20  # a model with millions of saved items; more is damage, not metadata
_FIELD = "relative_path"
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def is_metadata(relpath: str) -> bool:
    """Whether `relpath` is a DCP coordinator's `.metadata` inside a checkpoint folder (at any
    depth: the Hugging Face Trainer's FSDP saves put one in each state's subfolder)."""
    folder, _, name = relpath.rpartition("/")
    return bool(folder) and name == METADATA


def shard_files(data: bytes) -> set[str]:
    """The relative paths of the files a DCP `.metadata` names; ValueError if it is not one.

    | `.metadata` holds                                 | result                          |
    |---------------------------------------------------|---------------------------------|
    | a pickle naming `__0_0.distcp`, `__1_0.distcp`    | {"__0_0.distcp", "__1_0.distcp"} |
    | the same file named twice (the memo)              | it, once                        |
    | a pickle naming no file (nothing was saved)       | ValueError                      |
    | a name with '..', '/' at the start, or NUL        | ValueError                      |
    | not a pickle, truncated, larger than the limit    | ValueError                      |
    """
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"larger than {MAX_METADATA_BYTES} bytes")
    names: set[str] = set()
    memo: dict[int, str] = {}
    memoized = 0  # MEMOIZE numbers every object it stores, strings or not
    last: str | None = None  # the string on top of the stack, if the last opcode pushed one
    field_seen = False  # `last` was the field name: the next string is its value
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _PUTS:
                if last is not None:
                    memo[arg] = last
                continue  # a memo store leaves the stack as it is
            if name == "MEMOIZE":
                if last is not None:
                    memo[memoized] = last
                memoized += 1
                continue
            value = arg if name in _STRINGS else memo.get(arg) if name in _GETS else None
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            if field_seen and isinstance(value, str) and value.endswith(SUFFIX):
                names.add(layout.check_relpath(value))  # UnsafePath is a ValueError
            field_seen = value == _FIELD
            last = value if isinstance(value, str) else None
    except layout.UnsafePath:
        raise
    except Exception as exc:  # genops raises ValueError, but also others on garbage
        raise ValueError(f"not a pickle: {exc}") from None
    if not names:
        raise ValueError("names no shard file")
    return names
