"""Config files in the reference's own shapes, translated to ckptd's settings before they are validated.

A training project as the reference SDK (`truss_train`) serializes it: `{**project.model_dump(),
"job": job.model_dump()}` as YAML or JSON, or a Python `config.py` that defines one `TrainingProject`
(read where `truss` is importable):

    name: my-training-project              -> project
    team_name: null                        ignored (hosted platform)
    job:
      image, interactive_session, name, priority, workspace, weights, enable_baseten_workdir: ignored
      compute: {node_count: 2, ...}        node_count -> group_size; cpu_count, memory, accelerator,
                                           availability_model ignored
      runtime:
        start_commands: [...]              -> start_commands
        environment_variables: {A: "1", HF_TOKEN: {name: hf_access_token}}   -> environment_variables
        checkpointing_config: {enabled, checkpoint_path, volume_size_gib}    volume_size_gib ignored
        load_checkpoint_config: {enabled, download_folder, checkpoints}      as ckptd's
        enable_cache, cache_config         ignored

`truss train push` sends that job with `runtime.artifacts` and `truss_user_env` added, and the project
as `{name}`: a file `{training_project: {...}, training_job: {...}}` of those two bodies is read too.

A Truss model's `config.yaml` (the reference's serving config): its `training_checkpoints` section
is ckptd's `training_checkpoints.*`; every other Truss key is ignored.

Nulls are accepted everywhere the SDK writes them. A field the SDK does not write is refused as
unknown; ignored fields that hold a value are named in one note. ckptd's own settings that the
reference has no place for (storage, job_id, upload, retention...) may stand beside either shape.
"""

from __future__ import annotations

import contextlib
import importlib.util
import runpy
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.config.refs import LATEST

USED, HOSTED = "used", "hosted"

_CHECKPOINTING = {"enabled": USED, "checkpoint_path": USED, "volume_size_gib": HOSTED}
_LOADING = {"enabled": USED, "download_folder": USED, "checkpoints": USED}
_RUNTIME = {
    "start_commands": USED, "environment_variables": USED, "checkpointing_config": _CHECKPOINTING,
    "load_checkpoint_config": _LOADING, "enable_cache": HOSTED, "cache_config": HOSTED, "artifacts": HOSTED,
}  # fmt: skip
_COMPUTE = {"node_count": USED, "cpu_count": HOSTED, "memory": HOSTED, "accelerator": HOSTED,
            "availability_model": HOSTED}  # fmt: skip
_JOB = {
    "image": HOSTED, "compute": _COMPUTE, "runtime": _RUNTIME, "interactive_session": HOSTED, "name": HOSTED,
    "priority": HOSTED, "workspace": HOSTED, "weights": HOSTED, "enable_baseten_workdir": HOSTED,
    "truss_user_env": HOSTED,
}  # fmt: skip
_PROJECT = {"name": USED, "team_name": HOSTED, "job": _JOB}
_API = {"training_project": {"name": USED, "team_name": HOSTED}, "training_job": _JOB}

# Where each used field goes, by its path in the SDK's dump (the API form's paths are renamed first).
_MOVES = {
    "name": "project",
    "job.compute.node_count": "group_size",
    "job.runtime.start_commands": "start_commands",
    "job.runtime.environment_variables": "environment_variables",
    "job.runtime.checkpointing_config.enabled": "checkpointing_config.enabled",
    "job.runtime.checkpointing_config.checkpoint_path": "checkpointing_config.checkpoint_path",
    "job.runtime.load_checkpoint_config.enabled": "load_checkpoint_config.enabled",
    "job.runtime.load_checkpoint_config.download_folder": "load_checkpoint_config.download_folder",
    "job.runtime.load_checkpoint_config.checkpoints": "load_checkpoint_config.checkpoints",
}
_API_PATHS = {"training_project.": "", "training_job.": "job."}
# ckptd's top-level settings that a training project already holds: given beside it, they would
# say the same thing twice.
_HELD = {key.split(".")[0] for key in _MOVES.values()}

# Every top-level key of a Truss model's config.yaml (truss.base.truss_config.TrussConfig, and the
# legacy hf_cache it still reads); environment_variables there are the model server's.
TRUSS_KEYS = frozenset((
    "apply_library_patches", "base_image", "bdn", "bis_llm", "build", "build_commands", "bundled_packages_dir",
    "cache_internal", "data_dir", "description", "docker_server", "environment_variables", "examples_filename",
    "external_data", "external_package_dirs", "hf_cache", "input_type", "live_reload", "model_cache",
    "model_class_filename", "model_class_name", "model_framework", "model_metadata", "model_module_dir",
    "model_name", "model_type", "python_version", "requirements", "requirements_file", "resources", "runtime",
    "secrets", "spec_version", "system_packages", "training_checkpoints", "trt_llm", "use_local_src", "weights",
))  # fmt: skip
_SERVING = {"download_folder": USED, "artifact_references": USED, "loops_checkpoint_ids": HOSTED}


class FieldError(ValueError):
    """A field of a reference-shaped file that ckptd refuses; `path` is where it is in the file."""

    def __init__(self, path: str, message: str) -> None:
        self.path, self.detail = path, message
        super().__init__(f"{path}: {message}")


@dataclass
class Translated:
    """ckptd's config-file mapping, what was ignored, and where each setting was written."""

    data: dict[str, Any]
    ignored: list[str] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)  # ckptd dotted key -> the file's field


def shape_of(data: Mapping[str, Any], ckptd_keys: frozenset[str]) -> str:
    """Which writer's shape a parsed config file has.

    | top-level keys                                                         | shape   |
    |------------------------------------------------------------------------|---------|
    | `name` or `job` (no ckptd setting has these names)                     | project |
    | `training_project` or `training_job`                                   | api     |
    | `training_checkpoints` and a Truss key that is no ckptd setting        | truss   |
    | anything else                                                          | ckptd   |
    """
    if "name" in data or "job" in data:
        return "project"
    if "training_project" in data or "training_job" in data:
        return "api"
    if "training_checkpoints" in data and any(k in TRUSS_KEYS and k not in ckptd_keys for k in data):
        return "truss"
    return "ckptd"


def translate(data: Mapping[str, Any], ckptd_keys: frozenset[str]) -> Translated:
    """ckptd's shape of `data` (returned as is when it has ckptd's shape already); FieldError if refused."""
    shape = shape_of(data, ckptd_keys)
    if shape == "ckptd":
        return Translated(dict(data))
    if shape == "truss":
        return _from_truss(data, ckptd_keys)
    table = _PROJECT if shape == "project" else _API
    used: dict[str, Any] = {}
    out = Translated({})
    rest = {k: v for k, v in data.items() if k not in table}
    _walk({k: v for k, v in data.items() if k in table}, table, "", used, out.ignored)
    for key in rest:
        _beside(key, ckptd_keys, ", ".join(table))
        if key in _HELD:
            raise FieldError(key, f"the training project holds this setting: give it in {_held_where(key)}")
    project = used.get("name", used.get("training_project.name"))
    for path, value in used.items():
        target = _MOVES[_sdk_path(path)]
        if target == "load_checkpoint_config.checkpoints":
            value = _refs(value, path, project)
        _put(out.data, target, value)
        out.origins[target] = path
    out.data.update(rest)
    return out


def _walk(data: Mapping[Any, Any], table: Mapping[str, Any], prefix: str, used: dict, ignored: list) -> None:
    """Check `data` against `table`: used leaves go to `used`, ignored ones that hold a value to `ignored`."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        kind = table.get(key) if isinstance(key, str) else None
        if kind is None:
            raise FieldError(path, f"unknown field; accepted here: {', '.join(table)}")
        if kind == HOSTED:
            if value is not None and value != [] and value != {}:
                ignored.append(path)
        elif value is None:
            continue  # the SDK's null: its default, which is ckptd's
        elif kind == USED:
            used[path] = value
        elif not isinstance(value, dict):
            raise FieldError(path, f"expected a mapping of {', '.join(kind)}, got a {type(value).__name__}")
        else:
            _walk(value, kind, path + ".", used, ignored)


def _sdk_path(path: str) -> str:
    for prefix, replacement in _API_PATHS.items():
        if path.startswith(prefix):
            return replacement + path[len(prefix) :]
    return path


def _held_where(key: str) -> str:
    return ", ".join(p for p, target in _MOVES.items() if target.split(".")[0] == key)


def _beside(key: Any, ckptd_keys: frozenset[str], accepted: str) -> None:
    if key not in ckptd_keys:
        raise FieldError(str(key), f"unknown field; accepted here: {accepted} and ckptd's settings")


def _put(out: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    for section in sections:
        out = out.setdefault(section, {})
    out[leaf] = value


def _refs(value: Any, path: str, project: Any) -> Any:
    """The SDK's references as ckptd reads them (refs.parse_ref checks them).

    `LoadCheckpointConfig()` defaults to one latest reference naming neither project nor job, the
    latest checkpoint of the training project itself: it is given this file's project.
    """
    if not isinstance(value, list):
        return value  # parse_refs says what is expected
    out = []
    for ref in value:
        if isinstance(ref, dict) and ref.get("typ") == LATEST and not ref.get("project_name") and not ref.get("job_id"):
            if not isinstance(project, str):
                raise FieldError(path, f"{LATEST} without project_name or job_id needs the project's name")
            ref = {**ref, "project_name": project}
        out.append(ref)
    return out


def _from_truss(data: Mapping[str, Any], ckptd_keys: frozenset[str]) -> Translated:
    out = Translated({})
    for key, value in data.items():
        if key == "training_checkpoints":
            if value is None:
                continue
            if not isinstance(value, dict):
                raise FieldError(key, f"expected a mapping of {', '.join(_SERVING)}, got a {type(value).__name__}")
            used: dict[str, Any] = {}
            _walk(value, _SERVING, f"{key}.", used, out.ignored)
            if value.get("loops_checkpoint_ids"):
                raise FieldError(f"{key}.loops_checkpoint_ids", "Baseten Loops checkpoints live on the hosted "
                                 "service, not in a ckptd store; use artifact_references")  # fmt: skip
            for path, v in used.items():
                _put(out.data, path, v)
                out.origins[path] = path
        elif key in TRUSS_KEYS:
            if value is not None and value != [] and value != {}:
                out.ignored.append(key)
        else:
            _beside(key, ckptd_keys, "the keys of a Truss config")
            out.data[key] = value
    return out


def from_python(path: str) -> dict[str, Any]:
    """Run a `config.py` and serialize the one `TrainingProject` it defines as the SDK does.

    Runs the file as `truss train push` imports it: trusted code of the job's author.
    """
    if importlib.util.find_spec("truss_train") is None:
        raise FieldError(
            path,
            "a Python config file defines a truss_train TrainingProject, and the truss package is not "
            "importable here: install truss beside ckptd (pip install truss), or give the project as YAML "
            "or JSON (what its model_dump() writes)",
        )
    from truss_train.definitions import TrainingProject

    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout is ckptd's own (--json)
            namespace = runpy.run_path(path, run_name="__ckptd_config__")
    except (Exception, SystemExit) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise FieldError(path, f"running it failed: {type(e).__name__}: {first}") from None
    found = {id(v): v for v in namespace.values() if isinstance(v, TrainingProject)}
    if len(found) != 1:
        raise FieldError(path, f"expected exactly one TrainingProject, found {len(found)}")
    (project,) = found.values()
    return {**project.model_dump(mode="json"), "job": project.job.model_dump(mode="json")}
