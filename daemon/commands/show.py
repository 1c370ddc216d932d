"""How the browsing commands print: JSON for programs, a table for people, one-line errors.

A terminal gets a `rich` table; a pipe gets plain aligned columns that `grep` and `awk` read;
`--json` gets one JSON document. Imported by the commands only, so `ckptd run` never loads rich.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from daemon import exits, logs

Column = tuple[str, str]  # (key in each row, header)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, ensure_ascii=False, default=str))


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
    for line in [headers, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def fail(message: str, code: int = exits.FAILED) -> int:
    """Say what went wrong on one line of stderr (credentials redacted) and return the exit code."""
    print(f"ckptd: {logs.redact(message)}".replace("\n", " "), file=sys.stderr)
    return code
