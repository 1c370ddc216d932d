"""How the browsing commands print: JSON for programs, a table for people, one-line errors.

A terminal gets a `rich` table; a pipe gets plain aligned columns that `grep` and `awk` read;
`--json` gets one JSON document. Imported by the commands only, so `ckptd run` never loads rich.
"""

from __future__ import annotations

import json
import select
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from daemon import exits, logs

Column = tuple[str, str]  # (key in each row, header)


def write_out(text: str) -> None:
    """All of `text` on stdout, however short the writes the pipe accepts.

    With PYTHONUNBUFFERED=1 (set in many images) sys.stdout writes straight to the raw file and
    drops whatever a short write left over: measured here after an S3 session, 65,536 of 384,599
    bytes of JSON reached the reader, exit code 0. A non-blocking stdout fails the same way.
    """
    sys.stdout.flush()
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a replaced stdout (a StringIO) takes everything at once
        sys.stdout.write(text)
        return
    data = memoryview(text.encode(sys.stdout.encoding or "utf-8", sys.stdout.errors or "strict"))
    while data:
        try:
            written = out.write(data)
        except BlockingIOError as e:  # a buffered writer on a non-blocking file says it this way
            written = e.characters_written
        if not written:  # non-blocking and full: wait until the reader makes room
            select.select([], [out.fileno()], [])
        data = data[written or 0 :]
    while True:
        try:
            out.flush()
            return
        except BlockingIOError:
            select.select([], [out.fileno()], [])


def print_json(data: Any) -> None:
    write_out(json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, title: str | None = None) -> None:
    """Rows as a table: `rich` on a terminal, plain two-space-separated columns otherwise."""
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [header for _, header in columns]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, header_style="bold")
        for header in headers:
            table.add_column(header, overflow="fold")
        for line in cells:
            table.add_row(*line)
        Console().print(table)
        return
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [headers, *cells])
    write_out("".join(f"{line}\n" for line in lines))


def note(message: str) -> None:
    """Tell the person at the terminal something that is not data (stderr, so pipes stay clean)."""
    print(f"ckptd: {logs.redact(message)}".replace("\n", " "), file=sys.stderr)


def fail(message: str, code: int = exits.FAILED) -> int:
    """Say what went wrong on one line of stderr (credentials redacted) and return the exit code."""
    print(f"ckptd: {logs.redact(message)}".replace("\n", " "), file=sys.stderr)
    return code


class UnknownField(ValueError):
    """A --sort field no row has; the message names the accepted ones."""

    def __init__(self, field: str, accepted: Sequence[str]) -> None:
        super().__init__(f"--sort {field!r}: unknown field; accepted: {', '.join(accepted)}")


def _order(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float):  # bools too: False before True
        return 0, value
    return (1, value) if isinstance(value, str) else (2, json.dumps(value, sort_keys=True, default=str))


def sort_rows(
    rows: Sequence[Mapping[str, Any]],
    field: str | None,
    accepted: Sequence[str],
    *,
    reverse: bool = False,
    value: Any = None,
) -> list[Mapping[str, Any]]:
    """Rows ordered by `field` (ascending; `reverse` flips), or kept in their order when None.

    `value(row, field)` reads a field (default: `row.get(field)`); UnknownField when `field` is
    not in `accepted`.

    | values          | reverse | result            | why                                         |
    |-----------------|---------|-------------------|---------------------------------------------|
    | 3, 1, 2         | no      | 1, 2, 3           | ascending                                   |
    | 3, 1, 2         | yes     | 3, 2, 1           |                                             |
    | 1, -, 0         | either  | 0, 1, - / 1, 0, - | a row without the value comes last, always  |
    | a@1, b@1        | either  | a, b              | ties keep the given (default) order         |
    | 0.5, "x", 2     | no      | 0.5, 2, "x"       | numbers before text, never a TypeError      |
    | (no field)      | yes     | given order, reversed |                                         |
    """
    if field is None:
        return list(reversed(rows)) if reverse else list(rows)
    if field not in accepted:
        raise UnknownField(field, accepted)
    read = value or (lambda row, name: row.get(name))
    present = [(read(row, field), row) for row in rows]
    have = sorted((vr for vr in present if vr[0] is not None), key=lambda vr: _order(vr[0]), reverse=reverse)
    return [row for _, row in have] + [row for v, row in present if v is None]
