"""Resolve every setting: command-line flag > environment > config file > default, then validate.

Nothing starts before `load` returns, so a bad value never leaves a half-started job behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import yaml

from daemon.config.schema import BY_KEY, SPECS, Config, Spec, default_of

CONFIG_ENV = "CKPTD_CONFIG"


class ConfigError(Exception):
    """An invalid setting. The message is one line that names the setting and what is accepted."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"invalid {setting}: {message}")


def load(
    flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None, config_file: str | None = None
) -> Config:
    """Build a validated Config. `flags` maps Config field names to raw flag values (None: not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    path = config_file or env.get(CONFIG_ENV) or None
    from_file = read_config_file(path) if path else {}
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for name, spec in SPECS.items():
        raw, source = _pick(name, spec, flags, env, from_file, path)
        if source is None:
            values[name] = default_of(spec, env)
            continue
        explicit.add(name)
        try:
            values[name] = spec.parse(raw)
        except ValueError as e:
            raise ConfigError(_label(spec), f"{e} (from {source})") from None
    config = Config(**values)
    _check_together(config, explicit)
    return config


def _pick(
    name: str,
    spec: Spec,
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    from_file: Mapping[str, Any],
    path: str | None,
) -> tuple[Any, str | None]:
    if name in flags:
        return flags[name], spec.flag or "command line"
    for var in spec.env:
        if env.get(var, "") != "":
            return env[var], f"${var}"
    if spec.key in from_file:
        return from_file[spec.key], f"config file {path}"
    return None, None


def _label(spec: Spec) -> str:
    names = [n for n in (spec.flag, *(f"${v}" for v in spec.env[:1])) if n]
    return f"{spec.key} ({', '.join(names)})" if names else spec.key


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file in the reference SDK's shape; return values by dotted key."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) if not path.endswith(".json") else json.load(f)
    except OSError as e:
        raise ConfigError(f"config ({CONFIG_ENV}, --config)", f"cannot read {path}: {e.strerror}") from None
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise ConfigError(f"config ({CONFIG_ENV}, --config)", f"{path} is not valid YAML/JSON: {first_line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config ({CONFIG_ENV}, --config)", f"{path} must hold a mapping of settings")
    if isinstance(data.get("storage"), str):
        data = {**data, "storage": {"url": data["storage"]}}
    return dict(_flatten(data, ""))


_SECTIONS = {key.rsplit(".", 1)[0] for key in BY_KEY if "." in key}


def _flatten(data: Mapping[str, Any], prefix: str):
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in BY_KEY:
            yield key, v
        elif key in _SECTIONS and isinstance(v, dict):
            yield from _flatten(v, key + ".")
        elif key in _SECTIONS:
            raise ConfigError(key, f"expected a mapping, got {v!r}")
        else:
            siblings = sorted(b[len(prefix) :].split(".")[0] for b in BY_KEY if b.startswith(prefix))
            raise ConfigError(key, f"unknown setting; accepted here: {', '.join(dict.fromkeys(siblings))}")


def _check_together(c: Config, explicit: set[str]) -> None:
    """Rules that involve more than one setting."""
    if c.group_size > 1 and "job_id" not in explicit:
        raise ConfigError(
            _label(SPECS["job_id"]),
            f"required when group size is {c.group_size}: every node must write to the same job",
        )
    if c.node_rank >= c.group_size:
        raise ConfigError(_label(SPECS["node_rank"]), f"must be below group size {c.group_size}, got {c.node_rank}")
    a, b = PurePosixPath(c.checkpoint_dir), PurePosixPath(c.restore_dir)
    if a == b or a in b.parents or b in a.parents:
        raise ConfigError(
            _label(SPECS["restore_dir"]),
            f"{b} must not overlap the checkpoint folder {a}: restored "
            "files would be uploaded again as new checkpoints",
        )
    if c.s3_sse_kms_key_id and c.s3_sse != "sse-kms":
        raise ConfigError(_label(SPECS["s3_sse_kms_key_id"]), "is only used with storage.sse: sse-kms")
    if c.s3_ca_bundle and not os.path.isfile(c.s3_ca_bundle):
        raise ConfigError(_label(SPECS["s3_ca_bundle"]), f"{c.s3_ca_bundle} is not a readable file")
    named = [r.checkpoint_name for r in c.checkpoints if r.checkpoint_name]
    duplicate = next((n for n in named if named.count(n) > 1), None)
    if duplicate:
        raise ConfigError(_label(SPECS["checkpoints"]), f"two references would land on rank-N/{duplicate}/")
