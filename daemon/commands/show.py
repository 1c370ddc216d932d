"""How the browsing commands print: JSON for programs, a table for people, one-line errors.

A terminal gets a `rich` table; a pipe gets plain aligned columns that `grep` and `awk` read;
`--json` gets one JSON document. Imported by the commands only, so `ckptd run` never loads rich.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from daemon import exits, logs

Column = tuple[str, str]  # (key in each row, header)


# A reader that went away (`ckptd ls | head -1`) ends us as SIGPIPE ends `cat` or `ls`: quietly,
# with the shell's 128+13, which `set -o pipefail` scripts already know to expect from a pipe.
CLOSED_PIPE = exits.signalled(signal.SIGPIPE)


def write_out(text: str) -> None:
    """All of `text` on stdout, or exit: quietly when the reader has gone, with a one-line error
    when stdout cannot take it (a full disk), never with a traceback.

    SystemExit rather than an exception for callers to catch: every command writes through here.
    """
    try:
        _write_all(text)
    except BrokenPipeError:
        _drop_stdout()
        raise SystemExit(CLOSED_PIPE) from None
    except OSError as e:
        _drop_stdout()
        fail(f"cannot write stdout: {e.strerror or e}")
        raise SystemExit(exits.FAILED) from None


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail again on what is still
    buffered and print "Exception ignored" (Python's documented pattern for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a replaced stdout has no file to point
        pass


def _write_all(text: str) -> None:
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
    # Names from the store may hold what the encoding cannot (a lone surrogate is valid JSON):
    # written as a backslash escape rather than a UnicodeEncodeError halfway through the output.
    data = memoryview(text.encode(sys.stdout.encoding or "utf-8", "backslashreplace"))
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
    write_out(json_text(data, sys.stdout.encoding or "utf-8") + "\n")


def json_text(data: Any, encoding: str) -> str:
    """`data` as valid JSON that `encoding` can carry.

    Non-finite floats become null (NaN is not JSON; manifests ckptd writes say null already).
    Characters are kept as they are when `encoding` takes them all, else escaped (\\uXXXX), which
    also covers lone surrogates. No `default=`: a value JSON has no type for is a bug to see,
    not to print as its str().
    """
    data = finite(data)
    text = json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False)
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return json.dumps(data, indent=1, ensure_ascii=True, allow_nan=False)
    return text


def finite(data: Any) -> Any:
    """`data` with every NaN or infinity, however deep, replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# What must not reach a terminal or a table row as it is: C0/C1 controls (ESC starts an ANSI
# sequence, a newline breaks the row), line separators, bidi overrides, lone surrogates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` with each character that would act on a terminal written as its escape (\\x1b, \\n)."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return printable(str(value))


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, title: str | None = None) -> None:
    """Rows as a table: `rich` on a terminal, plain two-space-separated columns otherwise."""
    cells = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    headers = [printable(header) for _, header in columns]
    if sys.stdout.isatty():
        write_out(_rich_table(cells, headers, printable(title) if title is not None else None))
        return
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [headers, *cells])
    write_out("".join(f"{line}\n" for line in lines))


def _rich_table(cells: Sequence[Sequence[str]], headers: Sequence[str], title: str | None) -> str:
    """The table as the terminal shows it. Every string goes in as `Text`, which rich does not read
    as markup: a metric called "[/y]" is a name, not a closing tag (MarkupError). Rendered to a
    string so that it is written, like everything else, through write_out."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(title) if title is not None else None, header_style="bold")
    for header in headers:
        table.add_column(Text(header), overflow="fold")
    for line in cells:
        table.add_row(*map(Text, line))
    console = Console()
    with console.capture() as captured:
        console.print(table)
    return captured.get()


def note(message: str) -> None:
    """Tell the person at the terminal something that is not data (stderr, so pipes stay clean)."""
    print(printable(f"ckptd: {logs.redact(message)}".replace("\n", " ")), file=sys.stderr)


def fail(message: str, code: int = exits.FAILED) -> int:
    """Say what went wrong on one line of stderr (credentials redacted) and return the exit code."""
    print(printable(f"ckptd: {logs.redact(message)}".replace("\n", " ")), file=sys.stderr)
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
