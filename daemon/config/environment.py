"""`environment_variables`: what the start commands get in their environment, as the reference SDK
writes it (`Runtime.environment_variables`): a name maps to its value, or to a secret reference
`{name: SECRET}` (`SecretReference(name=...).model_dump()`).

A secret is looked up where this machine keeps secrets: the environment variable named like the
secret, else a file named by `<SECRET>_FILE` (a mounted Kubernetes or Docker secret). Values never
appear in a repr, a log line or an error message: any of them may be a secret, and a plain value
may be one its author did not mark.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from daemon.config.quantities import show

# A secret file is a token or a key; anything bigger is the wrong file.
MAX_SECRET_BYTES = 1 << 20
_BAD_NAME = re.compile(r"[=\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Secret:
    name: str  # the secret's name: where its value is looked up


class Environment:
    """Variable name -> value, or -> Secret until `resolved`. Shows names only."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str | Secret] | None = None) -> None:
        # Sorted: an environment has no order, and equal ones compare equal.
        self._items: tuple[tuple[str, str | Secret], ...] = tuple(sorted((items or {}).items()))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._items)

    def values(self) -> dict[str, str]:
        """The resolved environment; a secret still unresolved is a bug of the caller."""
        unresolved = [name for name, value in self._items if isinstance(value, Secret)]
        if unresolved:
            raise RuntimeError(f"environment_variables {', '.join(unresolved)}: secrets not resolved")
        return {name: value for name, value in self._items if isinstance(value, str)}

    def resolved(self, env: Mapping[str, str]) -> Environment:
        """Each secret replaced by its value; ValueError naming the variable and the secret if none is found."""
        return Environment({name: _secret(name, v, env) if isinstance(v, Secret) else v for name, v in self._items})

    def __repr__(self) -> str:
        return f"Environment({', '.join(self.names)})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Environment) and self._items == other._items

    def __hash__(self) -> int:
        return hash(self._items)

    def __len__(self) -> int:
        return len(self._items)


def parse_environment(value: Any) -> Environment:
    """A mapping of NAME: "value" or NAME: {name: SECRET}; messages name the variable, never its value."""
    if value is None:
        return Environment()
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of NAME: value or NAME: {{name: SECRET}}, got a {type(value).__name__}")
    items: dict[str, str | Secret] = {}
    for name, v in value.items():
        if not isinstance(name, str) or not name or _BAD_NAME.search(name):
            raise ValueError(f"variable names are text without '=' or control characters, got {show(name)}")
        items[name] = _value(name, v)
    return Environment(items)


def _value(name: str, value: Any) -> str | Secret:
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{name}: a NUL character cannot be passed in an environment variable")
        return value
    if isinstance(value, dict):
        secret = value.get("name")
        if set(value) != {"name"} or not isinstance(secret, str) or not secret or _BAD_NAME.search(secret):
            raise ValueError(f"{name}: a secret reference is {{name: SECRET}} with the secret's name and nothing else")
        return Secret(secret)
    # YAML reads 0123, 1.10 and yes as numbers and booleans: passing str() of them is not what was written.
    raise ValueError(f"{name}: expected a string (quote it in YAML) or {{name: SECRET}}, got a {type(value).__name__}")


def _secret(variable: str, secret: Secret, env: Mapping[str, str]) -> str:
    if env.get(secret.name, "") != "":
        return env[secret.name]
    path = env.get(f"{secret.name}_FILE", "")
    if not path:
        raise ValueError(
            f"{variable}: secret {secret.name!r} not found: set ${secret.name} to it, or ${secret.name}_FILE "
            "to a file that holds it"
        )
    where = f"{variable}: secret {secret.name!r} from ${secret.name}_FILE={path}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"{where}: cannot read it: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{where}: not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_SECRET_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{where}: cannot read it: {e.strerror}") from None
    finally:
        os.close(fd)
    # `echo TOKEN > file` ends it with a newline that is no part of the secret (the shell's $(< file)
    # and Docker images' *_FILE conventions drop it too).
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        text = "\x00"
    if len(raw) > MAX_SECRET_BYTES or "\x00" in text:
        raise ValueError(f"{where}: not a secret (over {MAX_SECRET_BYTES >> 20} MiB, NUL bytes or not UTF-8)")
    if not text:
        raise ValueError(f"{where}: the file is empty")
    return text
