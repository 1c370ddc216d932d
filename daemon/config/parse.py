"""Value parsers for settings: text (flag, environment) or YAML values in, typed values out.

Each raises ValueError with a message that says what is accepted; the loader adds the setting's
name, so messages here describe only the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from daemon.storage.options import StorageURL

Parser = Callable[[Any], Any]

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600, "d": 86400}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _number_with_unit(value: Any, units: dict[str, float], what: str, example: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected {what} such as {example}, got {value!r}")
    if isinstance(value, int | float):
        return value
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in units:
        raise ValueError(f"expected {what} such as {example}, got {value!r}")
    return float(m.group(1)) * units[m.group(2).lower()]


def human_size(n: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n} bytes" if n != 0 else "0"


def size(minimum: int = 0, maximum: int | None = None) -> Parser:
    """Bytes, as an integer or with a unit: 8MiB, 64MB, 1GiB."""

    def parse(value: Any) -> int:
        n = int(_number_with_unit(value, _SIZE_UNITS, "a size", "64MiB"))
        if n < minimum or (maximum is not None and n > maximum):
            upper = f" and <= {human_size(maximum)}" if maximum is not None else ""
            raise ValueError(f"must be a size >= {human_size(minimum)}{upper}, got {value!r}")
        return n

    return parse


def duration(minimum: float = 0.0) -> Parser:
    """Seconds, as a number or with a unit: 500ms, 30s, 5m, 1h."""

    def parse(value: Any) -> float:
        n = float(_number_with_unit(value, _DURATION_UNITS, "a duration", "30s"))
        if n < minimum:
            raise ValueError(f"must be a duration >= {minimum:g}s, got {value!r}")
        return n

    return parse


def integer(minimum: int | None = None, maximum: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not re.fullmatch(r"\s*-?\d+\s*", str(value)):
            raise ValueError(f"expected an integer, got {value!r}")
        n = int(value)
        if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
            bounds = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be an integer {bounds}, got {value!r}")
        return n

    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def choice(*allowed: str) -> Parser:
    def parse(value: Any) -> str:
        if str(value) not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return str(value)

    return parse


def text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return str(value)


def optional(parser: Parser) -> Parser:
    """Empty text or null means 'not set'."""

    def parse(value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parser(value)

    return parse


def name(value: Any) -> str:
    """A project or job id: it becomes one segment of every key, so only key-safe characters."""
    s = text(value)
    if not _SAFE_NAME.fullmatch(s):
        raise ValueError(
            f"{s!r} is not a safe name: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return s


def absolute_path(value: Any) -> str:
    s = text(value)
    if not s.startswith("/"):
        raise ValueError(f"must be an absolute path, got {s!r}")
    return str(PurePosixPath(s))


def storage_url(value: Any) -> str:
    try:
        return str(StorageURL.parse(text(value)))
    except ValueError as e:
        # The URL itself may hold credentials someone pasted into it: never echo it back.
        if "@" in str(value):
            raise ValueError("credentials do not belong in the storage URL; use the AWS credential chain") from None
        raise e


def http_url(value: Any) -> str:
    s = text(value)
    parts = urlsplit(s)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http(s)://HOST[:PORT], got {s!r}")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the endpoint URL; use the AWS credential chain")
    return s.rstrip("/")


def listen_address(value: Any) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT; port 0 picks a free port."""
    s = text(value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", s)
    if not m:
        raise ValueError(f"expected HOST:PORT such as 0.0.0.0:9477, got {s!r}")
    host = m.group(1) or m.group(3) or "0.0.0.0"
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    return host, port


def string_list(value: Any) -> tuple[str, ...]:
    """A YAML list, or comma-separated text from a flag or the environment."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def command_list(value: Any) -> tuple[str, ...]:
    """Start commands: a YAML list of shell command lines (a single string is one command)."""
    if isinstance(value, str):
        return (value,)
    return string_list(value)


def cpu_list(value: Any) -> tuple[int, ...] | None:
    """CPU affinity: '0-3,6' or a list of integers; empty means no pinning."""
    if value is None or value == "" or value == []:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    cpus: list[int] = []
    for item in items:
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(item))
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"expected CPU numbers and ranges such as 0-3,6, got {value!r}")
        cpus.extend(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    return tuple(sorted(set(cpus)))
