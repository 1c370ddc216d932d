"""Resolve every setting: command-line flag > environment > config file > default, then validate.

Nothing starts before `load` returns, so a bad value never leaves a half-started job behind. A config
file may also have the reference's shapes (a `truss_train` training project, a Truss serving config):
`sdk` translates it to ckptd's first, and the fields it ignores become a note for the log.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import yaml

from daemon.config import sdk
from daemon.config.quantities import show
from daemon.config.schema import BY_KEY, SPECS, Config, Spec, default_of
from daemon.logs import redact

CONFIG_ENV = "CKPTD_CONFIG"
# A log line for later, when logging is configured: (level, event, fields).
Note = tuple[str, str, dict[str, Any]]


class ConfigError(Exception):
    """An invalid setting. The message is one line that names the setting and what is accepted."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        self.detail = message
        # One line, and no credential even where a message quotes a value it did not expect.
        super().__init__(redact(f"invalid {setting}: {message}").replace("\n", " "))


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    *,
    notes: list[Note] | None = None,
    secrets: bool = True,
) -> Config:
    """Build a validated Config. `flags` maps Config field names to raw flag values (None: not given).

    `notes` receives log lines for when logging is configured. `secrets`: resolve environment_variables'
    secrets; only `run` needs them (an init container given the same file may not hold the trainer's).
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    path = config_file or env.get(CONFIG_ENV) or None
    settings = read_settings(path) if path else sdk.Translated({})
    from_file = settings.data
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    outside_file: set[str] = set()
    for name, spec in SPECS.items():
        raw, source = _pick(name, spec, flags, env, from_file, path)
        if source == f"config file {path}" and spec.key in settings.origins:
            source += f", field {settings.origins[spec.key]}"  # where a translated setting was written
        if source is None:
            values[name] = default_of(spec, env)
            continue
        explicit.add(name)
        if not source.startswith("config file"):
            outside_file.add(name)
        try:
            values[name] = spec.parse(raw)
        except (ValueError, TypeError, OverflowError) as e:
            raise ConfigError(_label(spec), f"{e} (from {source})") from None
    if "checkpoints" in outside_file and "restore_enabled" not in explicit:
        values["restore_enabled"] = True  # `--load REF` asks for a restore; a config file says so itself
    if secrets:
        values["environment_variables"] = _resolved(values["environment_variables"], env, settings, path)
    if notes is not None:
        notes.extend(_notes(values, settings, path))
    config = Config(**values, explicit=frozenset(explicit))
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


def _notes(values: Mapping[str, Any], settings: sdk.Translated, path: str | None) -> list[Note]:
    out: list[Note] = []
    if settings.ignored:
        event = "config file fields ignored: they mean something on the hosted platform only"
        out.append(("info", event, {"config": path, "fields": settings.ignored}))
    written = settings.origins.get(SPECS["checkpointing_enabled"].key)
    if written and not values["checkpointing_enabled"]:
        # The SDK's CheckpointingConfig() is disabled by default: a project that never mentions it says so.
        event = "checkpointing is disabled by the training project: run and watch upload nothing"
        out.append(("warning", event, {"config": path, "field": written}))
    return out


def _resolved(environment: Any, env: Mapping[str, str], settings: sdk.Translated, path: str | None) -> Any:
    try:
        return environment.resolved(env)
    except ValueError as e:
        spec = SPECS["environment_variables"]
        written = settings.origins.get(spec.key, spec.key)
        raise ConfigError(_label(spec), f"{e} (from config file {path}, field {written})") from None


def _label(spec: Spec) -> str:
    names = [n for n in (spec.flag, *(f"${v}" for v in spec.env[:1])) if n]
    return f"{spec.key} ({', '.join(names)})" if names else spec.key


FILE_SETTING = f"config ({CONFIG_ENV}, --config)"
# A config file is a page of settings; a bigger one is the wrong file (a checkpoint, /dev/zero...).
MAX_CONFIG_BYTES = 1 << 20


TOP_KEYS = frozenset(key.split(".")[0] for key in BY_KEY)


def read_settings(path: str) -> sdk.Translated:
    """Read a config file (YAML, JSON, or a Python one defining a truss_train TrainingProject);
    its `data` are the settings by dotted key."""
    data = _python(path) if path.endswith(".py") else _parse(path)
    if data is None:
        return sdk.Translated({})
    if not isinstance(data, dict):
        raise ConfigError(FILE_SETTING, f"{path} must hold a mapping of settings, not a {type(data).__name__}")
    try:
        translated = sdk.translate(data, TOP_KEYS)
    except sdk.FieldError as e:
        raise ConfigError(e.path, f"{e.detail} (from config file {path})") from None
    data = translated.data
    if isinstance(data.get("storage"), str):
        data = {**data, "storage": {"url": data["storage"]}}
    try:
        translated.data = dict(_flatten(data, ""))
    except ConfigError as e:
        raise ConfigError(e.setting, f"{e.detail} (from config file {path})") from None
    return translated


def _python(path: str) -> dict[str, Any]:
    _read_bytes(path)  # a regular file of a sane size, as for YAML
    try:
        return sdk.from_python(path)
    except sdk.FieldError as e:
        raise ConfigError(FILE_SETTING, str(e)) from None


def _parse(path: str) -> Any:
    raw = _read_bytes(path)
    if not raw.strip():
        # Zero bytes is what a failed write or a mount gone wrong leaves; a YAML file of comments
        # only is a deliberate "no settings" and is accepted.
        raise ConfigError(FILE_SETTING, f"{path} is empty; give settings in it, or no config file")
    try:
        text = raw.decode("utf-8")
        data = json.loads(text, object_pairs_hook=_unique_pairs) if path.endswith(".json") else _yaml(text)
    except yaml.MarkedYAMLError as e:
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark else ""
        raise ConfigError(FILE_SETTING, f"{path} is not valid YAML: {e.problem or e.context}{where}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError covers JSON syntax, non-UTF-8 bytes, duplicate JSON keys and YAML integers of
        # more digits than Python converts; RecursionError a file nested thousands of levels deep.
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(FILE_SETTING, f"{path} is not valid YAML/JSON: {first_line}") from None
    return data


def _read_bytes(path: str) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_CONFIG_BYTES.

    Opened non-blocking, so a FIFO given as the config path is refused instead of waiting for a writer.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(FILE_SETTING, f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError(FILE_SETTING, f"{path} is {kind}; expected a YAML or JSON file")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(FILE_SETTING, f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(FILE_SETTING, f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a setting given twice is refused instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: SafeLoader merges it, keys may repeat
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: SafeLoader refuses it with its own message
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"{show(key)} is given twice", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicate = next((k for k in keys if keys.count(k) > 1), None)
    if duplicate is not None:
        raise ValueError(f"{show(duplicate)} is given twice")
    return dict(pairs)


_SECTIONS = {key.rsplit(".", 1)[0] for key in BY_KEY if "." in key}
_CREDENTIAL_KEY = re.compile(r"(?i)secret|password|token|credential|access_key|key_id")
_CREDENTIALS_HINT = ". Credentials are not settings: they come from the AWS credential chain"


def _flatten(data: Mapping[str, Any], prefix: str):
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in BY_KEY:
            yield key, v
        elif key in _SECTIONS and isinstance(v, dict):
            yield from _flatten(v, key + ".")
        elif key in _SECTIONS:
            raise ConfigError(key, f"expected a mapping, got {show(v)}")
        else:
            siblings = sorted(b[len(prefix) :].split(".")[0] for b in BY_KEY if b.startswith(prefix))
            hint = _CREDENTIALS_HINT if _CREDENTIAL_KEY.search(key) else ""
            raise ConfigError(key, f"unknown setting; accepted here: {', '.join(dict.fromkeys(siblings))}{hint}")


def _check_together(c: Config, explicit: set[str]) -> None:
    """Rules that involve more than one setting."""
    if c.group_size > 1 and "job_id" not in explicit:
        raise ConfigError(
            _label(SPECS["job_id"]),
            f"required when group size is {c.group_size}: every node must write to the same job",
        )
    if c.node_rank >= c.group_size:
        raise ConfigError(_label(SPECS["node_rank"]), f"must be below group size {c.group_size}, got {c.node_rank}")
    if c.group_size > 1 and c.prune_enabled:
        raise ConfigError(
            _label(SPECS["prune_enabled"]),
            f"not supported with group size {c.group_size}: each node would delete its own share of "
            "checkpoints that commit across nodes; run `ckptd prune` for the job instead",
        )
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
    _check_retention(c)
    # Two references to the very same checkpoint are one (restore/plan.py); two checkpoints of one
    # name from different jobs would land on one folder: refused before anything starts.
    sources: dict[str, set[tuple[str | None, str | None]]] = {}
    for r in c.checkpoints:
        if r.checkpoint_name:
            sources.setdefault(r.checkpoint_name, set()).add((r.project_name or c.project, r.job_id))
    duplicate = next((name for name, jobs in sources.items() if len(jobs) > 1), None)
    if duplicate:
        raise ConfigError(_label(SPECS["checkpoints"]), f"two references would land on rank-N/{duplicate}/")


def _check_retention(c: Config) -> None:
    if c.keep_best is not None and c.metric is None:
        raise ConfigError(
            _label(SPECS["metric"]), f"required by retention.keep_best {c.keep_best}: which metric ranks?"
        )
    if c.metric is not None and c.keep_best is None:
        raise ConfigError(_label(SPECS["keep_best"]), f"required with retention.metric {c.metric}: keep how many?")
    if c.prune_enabled and not (c.keep_last or c.keep_best or c.keep_every_steps):
        raise ConfigError(
            _label(SPECS["prune_enabled"]),
            "needs at least one rule: retention.keep_last, retention.keep_best or retention.keep_every_steps",
        )
