"""The safetensors header parser: files written by the safetensors library read back exactly as
`safe_open` sees them, and every header the library refuses is refused here with the key named."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from daemon.catalog.safetensors import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    HeaderError,
    add_totals,
    header_length,
    parse_header,
    totals,
)

KIND = "unit"


def parse_blob(data: bytes):
    n = header_length(data[:8], len(data))
    return parse_header(data[8 : 8 + n], len(data))


def parse_file(path: Path):
    return parse_blob(path.read_bytes())


def encode(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_a_file_written_by_safetensors_reads_as_safe_open_sees_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "embed.weight": rng.standard_normal((300, 8)).astype(np.float32),
        "head.weight": rng.standard_normal((8, 8)).astype(np.float16),
        "head.bias": rng.standard_normal(32).astype(np.float64),
        "mask": np.ones((3, 0, 2), dtype=bool),
        "step": np.array(7, dtype=np.int64),  # a scalar: shape []
        "ids": np.arange(5, dtype=np.uint8),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    header = parse_file(path)
    with safe_open(str(path), "np") as f:
        assert [t.name for t in header.tensors] == sorted(f.keys())
        assert header.metadata == f.metadata()
        for t in header.tensors:
            sl = f.get_slice(t.name)
            assert (t.dtype, list(t.shape)) == (sl.get_dtype(), sl.get_shape())
            assert t.parameters == tensors[t.name].size
            assert t.nbytes == tensors[t.name].nbytes
    summary = totals(header.tensors)
    assert summary["tensors"] == len(tensors)
    assert summary["parameters"] == sum(a.size for a in tensors.values())
    assert summary["bytes"] == sum(a.nbytes for a in tensors.values())
    assert summary["by_dtype"]["F32"] == {"tensors": 1, "parameters": 2400, "bytes": 9600}
    assert add_totals([summary, summary])["by_dtype"]["F16"] == {"tensors": 2, "parameters": 128, "bytes": 256}


def test_every_dtype_the_library_knows_is_sized_as_it_sizes_it(tmp_path: Path) -> None:
    for dtype, bits in DTYPE_BITS.items():
        count = 8  # a whole number of bytes for every width (4, 6, 8, ... bits)
        blob = encode({"t": entry(dtype, [count], 0, count * bits // 8)}, b"\0" * (count * bits // 8))
        path = tmp_path / f"{dtype}.safetensors"
        path.write_bytes(blob)
        with safe_open(str(path), "np") as f:  # the library accepts it ...
            assert list(f.keys()) == ["t"]
        assert parse_file(path).tensors[0].nbytes == count * bits // 8  # ... and so do we


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"\x05\0\0", "too small for a safetensors file"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "is absurd: over the 100,000,000-byte limit"),
        (struct.pack("<Q", (1 << 64) - 1) + b"{}", "is absurd"),
        (struct.pack("<Q", 100) + b"{}", r"header length 100 is beyond the object.s size \(10 bytes\)"),
    ],
    ids=["short", "over-limit", "max-u64", "beyond-object"],
)
def test_absurd_header_lengths_are_refused(blob: bytes, message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        header_length(blob[:8], len(blob))


BAD_HEADERS = [
    # (header or raw JSON bytes, data bytes, error names)
    (b"\xff\xfe{", 0, "header is not JSON"),
    (b'{"a": ', 0, "header is not JSON"),
    (b"{}\0\0", 0, "header is not JSON"),
    (b"[1, 2]", 0, "header is a JSON list, not an object"),
    (b'{"a": 1, "a": 2}', 0, "key 'a' appears twice"),
    ({"__metadata__": {"x": 1}}, 0, "key '__metadata__': must be an object of string values"),
    ({"__metadata__": ["x"]}, 0, "key '__metadata__'"),
    ({"w": [1, 2]}, 0, "tensor 'w': not an object"),
    ({"w": entry("F128", [1], 0, 16)}, 16, "tensor 'w': unknown dtype 'F128'"),
    ({"w": {"shape": [1], "data_offsets": [0, 4]}}, 4, "tensor 'w': unknown dtype None"),
    ({"w": entry("F32", [-1], 0, 4)}, 4, r"tensor 'w': shape \[-1\] is not a list"),
    ({"w": entry("F32", "4", 0, 16)}, 16, "tensor 'w': shape \"4\""),
    ({"w": entry("F32", [True], 0, 4)}, 4, "tensor 'w': shape"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4, "tensor 'w': data_offsets \\[0\\] is not"),
    ({"w": entry("F32", [1], 4, 0)}, 4, r"tensor 'w': data_offsets \[4, 0\] end before they begin"),
    (
        {"w": entry("F32", [3, 2], 0, 10)},
        10,
        r"tensor 'w': data_offsets \[0, 10\] hold 10 bytes, but F32 \[3, 2\] needs 24",
    ),
    ({"w": entry("F4", [3], 0, 1)}, 1, "tensor 'w': .* needs 1.5"),
    ({"w": entry("F32", [1], 0, 4)}, 2, "tensor 'w': data_offsets end 4 is beyond the object"),
    ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [6], 2, 8)}, 8, "tensor 'b': .* overlap tensor 'a'"),
    ({"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 6, 8)}, 8, r"tensor 'b': bytes \[4, 6\) before it"),
    ({"a": entry("U8", [4], 0, 4)}, 8, r"bytes \[4, 8\) after the last tensor"),
]


@pytest.mark.parametrize("header, data, message", BAD_HEADERS)
def test_malformed_headers_are_refused_naming_the_key(header, data: int, message: str, tmp_path: Path) -> None:
    blob = encode(header, b"\0" * data)
    with pytest.raises(HeaderError, match=message):
        parse_blob(blob)
    if "appears twice" not in message:  # the library lets the last duplicate win; we refuse
        path = tmp_path / "bad.safetensors"
        path.write_bytes(blob)
        with pytest.raises(Exception):  # noqa: B017 - the library's own errors vary by kind
            safe_open(str(path), "np")


@pytest.mark.parametrize(
    "header, data",
    [
        ({}, 0),
        ({"__metadata__": None}, 0),
        ({"z": entry("U8", [0], 0, 0), "a": entry("U8", [4], 0, 4)}, 4),  # an empty tensor takes no room
        ({"b": entry("U8", [2], 2, 4), "a": entry("U8", [2], 0, 2)}, 4),  # offsets need not follow names
        ({"w": entry("F6_E2M3", [4], 0, 3)}, 3),
    ],
)
def test_valid_edge_cases_are_accepted_as_the_library_accepts_them(header, data: int, tmp_path: Path) -> None:
    blob = encode(header, b"\0" * data)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), "np") as f:
        names = sorted(f.keys())
    assert [t.name for t in parse_file(path).tensors] == names
