"""A progress bar for long transfers on a terminal; nothing at all otherwise (logs say the rest)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 30


class Bar:
    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 0.2) -> None:
        self.label, self.stream, self.interval = label, stream or sys.stderr, interval
        self.enabled = self.stream.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.interval and done < total):
            return
        self._last = now
        filled = WIDTH * done // total if total else WIDTH
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
