"""The header of a `.safetensors` file, parsed and checked without its data (pure; no I/O).

Format: 8 bytes, a little-endian unsigned header length N; N bytes of JSON; then the tensor data.
The JSON maps each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets into the data
that follows the header), plus an optional "__metadata__" of string values.

A stored file may be hostile or broken, so everything the safetensors library refuses is refused
here too, with a message naming the offending key: a header length over the library's 100 MB
limit or beyond the object, a header that is not a JSON object, a duplicate key, an unknown dtype,
a bad shape, offsets that disagree with dtype × shape, overlap, leave holes or end past the object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
METADATA = "__metadata__"
# Bits per element of every dtype the safetensors library (0.8) accepts.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


class HeaderError(ValueError):
    """A header that is not a valid safetensors header; the message says which key and why."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    length: int  # N: bytes of JSON after the 8-byte length
    tensors: list[Tensor]  # by name
    metadata: dict[str, str]


def header_length(first: bytes, object_size: int) -> int:
    """N from the first bytes of an object of `object_size` bytes; HeaderError when absurd."""
    if object_size < LENGTH_BYTES or len(first) < LENGTH_BYTES:
        raise HeaderError(f"too small for a safetensors file: {object_size} bytes (it starts with an 8-byte length)")
    n = int.from_bytes(first[:LENGTH_BYTES], "little")
    if n > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {n:,} is absurd: over the {MAX_HEADER_BYTES:,}-byte limit of safetensors")
    if LENGTH_BYTES + n > object_size:
        raise HeaderError(f"header length {n:,} is beyond the object's size ({object_size:,} bytes)")
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"key {key!r} appears twice in the header")
        seen[key] = value
    return seen


def parse_header(raw: bytes, object_size: int) -> Header:
    """The header from its N JSON bytes (`raw`) and the whole object's size; HeaderError if bad."""
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except HeaderError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise HeaderError(f"header is not JSON ({str(exc)[:120]})") from None
    if not isinstance(doc, dict):
        raise HeaderError(f"header is a JSON {type(doc).__name__}, not an object")
    metadata = doc.pop(METADATA, None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"key {METADATA!r}: must be an object of string values")
    tensors = sorted((_tensor(name, entry) for name, entry in doc.items()), key=lambda t: t.name)
    _check_layout(tensors, object_size - LENGTH_BYTES - len(raw))
    return Header(len(raw), tensors, metadata)


def _tensor(name: str, entry: Any) -> Tensor:
    def bad(why: str) -> HeaderError:
        return HeaderError(f"tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"shape {_short(shape)} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        raise bad(f"data_offsets {_short(offsets)} is not [begin, end] of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise bad(f"data_offsets [{begin}, {end}] end before they begin")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        need = f"{bits / 8:g}" if bits % 8 else f"{bits // 8:,}"
        raise bad(f"data_offsets [{begin}, {end}] hold {end - begin:,} bytes, but {dtype} {shape} needs {need}")
    return Tensor(name, dtype, tuple(shape), begin, end)


def _check_layout(tensors: list[Tensor], data_bytes: int) -> None:
    """The tensors must tile the data exactly, as the library demands (no polyglot files).

    | tensors by begin, data of 8 bytes  | verdict                                      |
    |------------------------------------|----------------------------------------------|
    | a [0,4) b [4,8)                    | ok                                           |
    | a [0,4) z [4,4) b [4,8)            | ok (an empty tensor takes no room)           |
    | a [0,4) b [2,8)                    | b overlaps a                                 |
    | a [0,4) b [6,8)                    | bytes [4,6) belong to no tensor (a hole)     |
    | a [0,4) b [4,12)                   | b ends beyond the object                     |
    | a [0,4)                            | bytes [4,8) after the last tensor: no tensor |
    """
    by_offset = sorted(tensors, key=lambda t: (t.begin, t.end))
    for t in by_offset:
        if t.end > data_bytes:
            raise HeaderError(
                f"tensor {t.name!r}: data_offsets end {t.end:,} is beyond the object "
                f"(its data holds {data_bytes:,} bytes)"
            )
    covered, previous = 0, None
    for t in by_offset:
        if t.begin < covered:
            raise HeaderError(f"tensor {t.name!r}: data_offsets [{t.begin}, {t.end}] overlap tensor {previous!r}")
        if t.begin > covered:
            raise HeaderError(f"tensor {t.name!r}: bytes [{covered}, {t.begin}) before it belong to no tensor")
        covered, previous = t.end, t.name
    if covered != data_bytes:
        raise HeaderError(f"bytes [{covered}, {data_bytes}) after the last tensor belong to no tensor")


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def totals(tensors: Iterable[Tensor]) -> dict[str, Any]:
    """{tensors, parameters, bytes, by_dtype: {dtype: {tensors, parameters, bytes}}} of `tensors`."""
    out: dict[str, Any] = {"tensors": 0, "parameters": 0, "bytes": 0, "by_dtype": {}}
    for t in tensors:
        row = out["by_dtype"].setdefault(t.dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
        for target in (out, row):
            target["tensors"] += 1
            target["parameters"] += t.parameters
            target["bytes"] += t.nbytes
    out["by_dtype"] = dict(sorted(out["by_dtype"].items()))
    return out


def add_totals(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several `totals` results (a checkpoint's files)."""
    out: dict[str, Any] = {"tensors": 0, "parameters": 0, "bytes": 0, "by_dtype": {}}
    for part in parts:
        for field in ("tensors", "parameters", "bytes"):
            out[field] += part[field]
        for dtype, row in part["by_dtype"].items():
            mine = out["by_dtype"].setdefault(dtype, {"tensors": 0, "parameters": 0, "bytes": 0})
            for field in mine:
                mine[field] += row[field]
    out["by_dtype"] = dict(sorted(out["by_dtype"].items()))
    return out
