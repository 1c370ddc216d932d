"""Config files as the reference writes them: a `truss_train` training project (its own dump, nulls
included), the bodies `truss train push` sends, a Truss serving config; environment variables and
secret references for the start commands.

The dumps below were taken from the real SDK (truss 0.18.36), `{**project.model_dump(mode="json"),
"job": job.model_dump(mode="json")}`; tests/commands/test_sdk_project.py serializes with the SDK itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import yaml

from daemon.config import ConfigError, load
from daemon.config.environment import Environment, Secret
from daemon.config.loader import TOP_KEYS
from daemon.config.refs import LATEST, NAMED, CheckpointRef
from daemon.config.sdk import TRUSS_KEYS, shape_of
from daemon.supervise import trainer_env

KIND = "unit"

ENV = {"HOME": "/home/u"}
SECRET = "hf_s3cr3t-V4LUE-never-logged"

# The reference's "Complete TrainingJob Setup", with environment variables added.
COMPLETE = {
    "name": "my-training-project",
    "team_name": None,
    "job": {
        "image": {"base_image": "your-base-image", "docker_auth": None},
        "compute": {"node_count": 1, "cpu_count": 1, "memory": "2Gi", "accelerator": None,
                    "availability_model": "dedicated"},
        "runtime": {
            "start_commands": ["chmod +x ./run.sh && ./run.sh"],
            "environment_variables": {"WANDB_PROJECT": "demo", "HF_TOKEN": {"name": "hf_access_token"}},
            "enable_cache": None,
            "checkpointing_config": {"enabled": True, "checkpoint_path": "/tmp/training_checkpoints",
                                     "volume_size_gib": None},
            "load_checkpoint_config": {
                "enabled": True,
                "checkpoints": [{"typ": "baseten_latest_checkpoint", "job_id": "previous_job_id",
                                 "project_name": None}],
                "download_folder": "/tmp/loaded_checkpoints",
            },
            "cache_config": {"enabled": True, "enable_legacy_hf_mount": False, "require_cache_affinity": True,
                             "mount_base_path": "/root/.cache"},
        },
        "interactive_session": None, "name": None, "priority": None, "workspace": None, "weights": [],
        "enable_baseten_workdir": True,
    },
}  # fmt: skip

# Every field set: `TrainingJob(image=Image(..., docker_auth=...), compute=Compute(node_count=2, cpu_count=8,
# memory="64Gi", accelerator="H100:8", availability_model=SPOT), runtime=Runtime(..., volume_size_gib=500,
# cache_config=...), interactive_session=..., name=..., priority=5, workspace=..., weights=[...])`.
FULL = json.loads(
    '{"name": "full-project", "team_name": "ml", "job": {"image": {"base_image": "nvcr.io/nvidia/pytorch:25.01-py3", '
    '"docker_auth": {"auth_method": "REGISTRY_SECRET", "registry": "nvcr.io", "aws_iam_docker_auth": null, '
    '"aws_oidc_docker_auth": null, "aws_assume_role_docker_auth": null, "gcp_oidc_docker_auth": null, '
    '"gcp_service_account_json_docker_auth": null, "registry_secret_docker_auth": {"secret_ref": {"name": "ngc"}}}}, '
    '"compute": {"node_count": 2, "cpu_count": 8, "memory": "64Gi", "accelerator": {"accelerator": "H100", '
    '"count": 8}, "availability_model": "spot"}, "runtime": {"start_commands": ["./run.sh"], '
    '"environment_variables": {"WANDB_PROJECT": "demo", "HF_TOKEN": {"name": "hf_access_token"}}, '
    '"enable_cache": null, "checkpointing_config": {"enabled": true, "checkpoint_path": "/tmp/training_checkpoints", '
    '"volume_size_gib": 500}, "load_checkpoint_config": {"enabled": true, "checkpoints": [{"typ": '
    '"baseten_latest_checkpoint", "job_id": null, "project_name": "p"}, {"typ": "baseten_named_checkpoint", '
    '"checkpoint_name": "checkpoint-20", "job_id": "gvpql31"}], "download_folder": "/tmp/loaded_checkpoints"}, '
    '"cache_config": {"enabled": true, "enable_legacy_hf_mount": false, "require_cache_affinity": true, '
    '"mount_base_path": "/root/.cache"}}, "interactive_session": {"trigger": "on_failure", "timeout_minutes": 480, '
    '"session_provider": "vs_code", "auth_provider": "microsoft"}, "name": "run-1", "priority": 5, "workspace": '
    '{"workspace_root": "..", "external_dirs": ["../lib"], "exclude_dirs": []}, "weights": [{"source": '
    '"hf://Qwen/Qwen3-0.6B", "mount_location": "/app/models/qwen", "auth": null, "auth_secret_name": null, '
    '"allow_patterns": null, "ignore_patterns": null}], "enable_baseten_workdir": false}}'
)
FULL_HOSTED = [
    "team_name", "job.image", "job.compute.cpu_count", "job.compute.memory", "job.compute.accelerator",
    "job.compute.availability_model", "job.runtime.checkpointing_config.volume_size_gib", "job.runtime.cache_config",
    "job.interactive_session", "job.name", "job.priority", "job.workspace", "job.weights",
    "job.enable_baseten_workdir",
]  # fmt: skip

# `TrainingProject(name="bare", job=TrainingJob(image=Image(base_image="b")))`: the SDK's defaults and nulls.
BARE = {
    "name": "bare", "team_name": None,
    "job": {
        "image": {"base_image": "b", "docker_auth": None},
        "compute": {"node_count": 1, "cpu_count": 1, "memory": "2Gi", "accelerator": None,
                    "availability_model": "dedicated"},
        "runtime": {"start_commands": [], "environment_variables": {}, "enable_cache": None,
                    "checkpointing_config": {"enabled": False, "checkpoint_path": None, "volume_size_gib": None},
                    "load_checkpoint_config": None, "cache_config": None},
        "interactive_session": None, "name": None, "priority": None, "workspace": None, "weights": [],
        "enable_baseten_workdir": True,
    },
}  # fmt: skip


def write(tmp_path, data, name: str = "project.yaml") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return str(path)


def loaded(tmp_path, data, env=None, name="project.yaml", **kwargs):
    notes: list = []
    c = load({}, {**ENV, "hf_access_token": SECRET, **(env or {})}, write(tmp_path, data, name), notes=notes, **kwargs)
    return c, notes


@pytest.mark.parametrize("name", ["project.yaml", "project.json"])
def test_the_reference_example_as_the_sdk_writes_it(tmp_path, name):
    c, _ = loaded(tmp_path, COMPLETE, name=name)
    assert (c.project, c.group_size) == ("my-training-project", 1)
    assert c.start_commands == ("chmod +x ./run.sh && ./run.sh",)
    assert (c.checkpointing_enabled, c.checkpoint_dir) == (True, "/tmp/training_checkpoints")
    assert (c.restore_enabled, c.restore_dir) == (True, "/tmp/loaded_checkpoints")
    assert c.checkpoints == (CheckpointRef(LATEST, job_id="previous_job_id"),)
    assert c.environment_variables.values() == {"WANDB_PROJECT": "demo", "HF_TOKEN": SECRET}


def test_every_field_the_sdk_writes_is_accepted_and_the_hosted_ones_named_in_one_note(tmp_path):
    c, notes = loaded(tmp_path, FULL, env={"CKPTD_JOB_ID": "j"})
    assert c.group_size == 2
    assert c.checkpoints == (
        CheckpointRef(LATEST, project_name="p"),
        CheckpointRef(NAMED, job_id="gvpql31", checkpoint_name="checkpoint-20"),
    )
    [(level, event, fields)] = notes
    assert (level, "ignored" in event) == ("info", True)
    assert sorted(fields["fields"]) == sorted(FULL_HOSTED)


def test_nulls_and_defaults_of_the_sdk(tmp_path):
    c, notes = loaded(tmp_path, BARE)
    assert (c.project, c.group_size, c.start_commands, c.restore_enabled) == ("bare", 1, (), False)
    assert c.checkpoint_dir == "/tmp/training_checkpoints"  # checkpoint_path: null is the default folder
    assert not c.checkpointing_enabled and len(c.environment_variables) == 0
    ignored = next(n for n in notes if n[0] == "info")[2]["fields"]
    assert "job.runtime.cache_config" not in ignored and "job.weights" not in ignored  # null and [] ask nothing
    # The SDK's CheckpointingConfig() is disabled: said out loud, since nothing will be uploaded.
    assert [(lvl, f["field"]) for lvl, _, f in notes if lvl == "warning"] == [
        ("warning", "job.runtime.checkpointing_config.enabled")
    ]


def test_the_sdks_default_reference_is_the_latest_of_this_project(tmp_path):
    # LoadCheckpointConfig(enabled=True) holds one latest reference naming neither project nor job.
    data = copy.deepcopy(BARE)
    data["job"]["runtime"]["load_checkpoint_config"] = {
        "enabled": True,
        "checkpoints": [{"typ": "baseten_latest_checkpoint", "job_id": None, "project_name": None}],
        "download_folder": "/tmp/loaded_checkpoints",
    }
    c, _ = loaded(tmp_path, data)
    assert c.checkpoints == (CheckpointRef(LATEST, project_name="bare"),)


def at(data: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(data)
    *sections, leaf = dotted.split(".")
    node = out
    for s in sections:
        node = node[s]
    node[leaf] = value
    return out


@pytest.mark.parametrize(
    "dotted, value, setting, words",
    [
        ("bogus", 1, "bogus", "unknown field"),
        ("job.bogus", 1, "job.bogus", "unknown field"),
        ("job.compute.gpus", 8, "job.compute.gpus", "unknown field"),
        ("job.runtime.start_command", "x", "job.runtime.start_command", "unknown field"),
        ("job.runtime.checkpointing_config.volume_size", 5, "job.runtime.checkpointing_config.volume_size", "unknown"),
        ("job.runtime.load_checkpoint_config.folder", "/x", "job.runtime.load_checkpoint_config.folder", "unknown"),
        ("job.runtime", ["x"], "job.runtime", "expected a mapping"),
        ("project", "other", "project", "give it in name"),
        ("start_commands", ["x"], "start_commands", "job.runtime.start_commands"),
        ("name", "not a safe name", "project", "field name"),
        ("job.compute.node_count", 0, "group_size", "field job.compute.node_count"),
        ("job.runtime.checkpointing_config.checkpoint_path", "rel", "checkpointing_config.checkpoint_path",
         "field job.runtime.checkpointing_config.checkpoint_path"),
    ],
)  # fmt: skip
def test_refusals_name_the_files_field(tmp_path, dotted, value, setting, words):
    with pytest.raises(ConfigError) as e:
        loaded(tmp_path, at(COMPLETE, dotted, value))
    assert e.value.setting.split(" ")[0] == setting
    assert words in str(e.value)


def test_loops_checkpoint_is_a_clear_error(tmp_path):
    loops = {"typ": "loops_checkpoint", "run_id": "r1", "checkpoint_name": "c", "target": "trainer"}
    with pytest.raises(ConfigError) as e:
        loaded(tmp_path, at(COMPLETE, "job.runtime.load_checkpoint_config.checkpoints", [loops]))
    assert "loops_checkpoint" in str(e.value) and "not supported" in str(e.value)


def test_ckptd_settings_beside_a_training_project(tmp_path):
    data = {**COMPLETE, "storage": "s3://bucket/prefix", "job_id": "run-7", "upload": {"concurrency": 2}}
    c, _ = loaded(tmp_path, data)
    assert (c.storage, c.job_id, c.upload_concurrency, c.project) == (
        "s3://bucket/prefix",
        "run-7",
        2,
        COMPLETE["name"],
    )
    with pytest.raises(ConfigError, match=r"upload\.bogus"):
        loaded(tmp_path, {**COMPLETE, "upload": {"bogus": 1}})


def test_flags_and_environment_still_win_over_the_project(tmp_path):
    path = write(tmp_path, COMPLETE)
    c = load(
        {"project": "flagged"}, {**ENV, "hf_access_token": SECRET, "BT_GROUP_SIZE": "2", "CKPTD_JOB_ID": "j"}, path
    )
    assert (c.project, c.group_size) == ("flagged", 2)


def test_the_bodies_truss_train_push_sends(tmp_path):
    # api.upsert_training_project: project.model_dump(exclude_none=True); create_training_job: the
    # PreparedTrainingJob's model_dump(), with runtime.artifacts and truss_user_env.
    job = copy.deepcopy(COMPLETE["job"])
    job["runtime"]["artifacts"] = [{"s3_bucket": "b", "s3_key": "k"}]
    job["truss_user_env"] = {"truss_client_version": "0.18.36", "python_version": "3.11.7", "git_info": None}
    c, notes = loaded(tmp_path, {"training_project": {"name": "api-project"}, "training_job": job})
    assert (c.project, c.start_commands, c.restore_enabled) == ("api-project", ("chmod +x ./run.sh && ./run.sh",), True)
    ignored = notes[0][2]["fields"]
    assert {"training_job.runtime.artifacts", "training_job.truss_user_env", "training_job.image"} <= set(ignored)


TRUSS_SERVING = {
    "model_name": "qwen-from-checkpoint",
    "python_version": "py311",
    "requirements": ["vllm==0.9.0"],
    "resources": {"accelerator": "H100", "use_gpu": True},
    "secrets": {"hf_access_token": None},
    "environment_variables": {"VLLM_LOGGING_LEVEL": "INFO"},
    "training_checkpoints": {
        "download_folder": "/tmp/training_checkpoints",
        "artifact_references": [{"training_job_id": "gvpql31", "paths": ["rank-*/checkpoint-10/"]}],
    },
}


def test_a_truss_serving_config_gives_its_training_checkpoints(tmp_path):
    c, notes = loaded(tmp_path, {**TRUSS_SERVING, "storage": "s3://bucket/p"}, name="config.yaml")
    assert c.download_folder == "/tmp/training_checkpoints" and c.storage == "s3://bucket/p"
    assert [(r.job_id, r.paths) for r in c.artifact_references] == [("gvpql31", ("rank-*/checkpoint-10/",))]
    assert len(c.environment_variables) == 0  # the model server's, not start commands'
    [(_, _, fields)] = notes
    assert sorted(fields["fields"]) == sorted(set(TRUSS_SERVING) - {"training_checkpoints"})


@pytest.mark.parametrize(
    "extra, setting",
    [
        ({"model_nam": "x"}, "model_nam"),
        ({"training_checkpoints": {**TRUSS_SERVING["training_checkpoints"], "folder": "/x"}}, "training_checkpoints."),
        ({"training_checkpoints": {**TRUSS_SERVING["training_checkpoints"], "loops_checkpoint_ids": ["l1"]}},
         "training_checkpoints.loops_checkpoint_ids"),
    ],
)  # fmt: skip
def test_truss_serving_config_refusals(tmp_path, extra, setting):
    with pytest.raises(ConfigError) as e:
        loaded(tmp_path, {**TRUSS_SERVING, **extra})
    assert e.value.setting.startswith(setting)


@pytest.mark.parametrize(
    "keys, shape",
    [
        ({"name", "job"}, "project"),
        ({"job"}, "project"),
        ({"name", "job", "storage"}, "project"),
        ({"training_project", "training_job"}, "api"),
        ({"training_checkpoints", "model_name"}, "truss"),
        ({"training_checkpoints", "environment_variables"}, "ckptd"),  # both ckptd's and Truss's
        ({"training_checkpoints", "storage"}, "ckptd"),
        ({"project", "start_commands"}, "ckptd"),
        ({"model_name"}, "ckptd"),  # a Truss config without training_checkpoints is no config of ours
    ],
)
def test_shape_of(keys, shape):
    assert shape_of(dict.fromkeys(keys), TOP_KEYS) == shape


def test_truss_keys_are_the_truss_configs_and_none_is_ckptds_but_environment_variables():
    both = TRUSS_KEYS & TOP_KEYS
    assert both == {"training_checkpoints", "environment_variables"}


# --- environment variables and secrets


def test_secrets_come_from_the_environment_or_a_file(tmp_path):
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")  # `echo TOKEN > file`: the newline is no part of it
    c, _ = loaded(tmp_path, COMPLETE, env={"hf_access_token": "", "hf_access_token_FILE": str(secret_file)})
    assert c.environment_variables.values()["HF_TOKEN"] == SECRET


@pytest.mark.parametrize(
    "env, words",
    [
        ({}, "secret 'hf_access_token' not found: set $hf_access_token to it, or $hf_access_token_FILE"),
        ({"hf_access_token_FILE": "/nonexistent/token"}, "cannot read it"),
        ({"hf_access_token_FILE": "/"}, "not a regular file"),
        ({"hf_access_token_FILE": "EMPTY"}, "the file is empty"),
    ],
)
def test_a_missing_secret_is_refused_naming_variable_and_secret(tmp_path, env, words):
    (tmp_path / "empty").write_text("\n")
    env = {k: str(tmp_path / "empty") if v == "EMPTY" else v for k, v in env.items()}
    with pytest.raises(ConfigError) as e:
        load({}, {**ENV, **env}, write(tmp_path, COMPLETE))
    assert e.value.setting == "environment_variables"
    assert "HF_TOKEN" in str(e.value) and words in str(e.value)
    assert "field job.runtime.environment_variables" in str(e.value)


def test_secrets_are_left_alone_where_no_start_command_runs(tmp_path):
    c = load({}, ENV, write(tmp_path, COMPLETE), secrets=False)  # an init container without the secret
    assert c.environment_variables == Environment({"WANDB_PROJECT": "demo", "HF_TOKEN": Secret("hf_access_token")})
    with pytest.raises(RuntimeError, match="HF_TOKEN"):
        c.environment_variables.values()


def test_values_never_show_in_a_repr(tmp_path):
    c, _ = loaded(tmp_path, COMPLETE)
    for shown in (repr(c), str(c), repr(c.environment_variables), f"{c.environment_variables}"):
        assert SECRET not in shown and "demo" not in shown
    assert "Environment(HF_TOKEN, WANDB_PROJECT)" in repr(c)


@pytest.mark.parametrize(
    "variables, words",
    [
        ({"PORT": 8080}, "PORT: expected a string (quote it in YAML)"),
        ({"DEBUG": True}, "DEBUG: expected a string"),
        ({"T": {"name": "t", "value": "leaked-value"}}, "T: a secret reference is {name: SECRET}"),
        ({"T": {"name": ""}}, "T: a secret reference"),
        ({"A=B": "x"}, "variable names"),
        ({"": "x"}, "variable names"),
        ({"N": "a\x00b"}, "N: a NUL character"),
    ],
)
def test_bad_environment_variables_are_refused_without_their_values(tmp_path, variables, words):
    with pytest.raises(ConfigError) as e:
        loaded(tmp_path, at(COMPLETE, "job.runtime.environment_variables", variables))
    assert words in str(e.value)
    assert "8080" not in str(e.value) and "leaked-value" not in str(e.value)


def test_ckptds_own_shape_takes_environment_variables_too(tmp_path):
    c, _ = loaded(tmp_path, {"environment_variables": {"A": "1", "B": {"name": "hf_access_token"}}})
    assert c.environment_variables.values() == {"A": "1", "B": SECRET}


@pytest.mark.parametrize(
    "inherited, variables, restore, expected",
    [
        # inherited            environment_variables                restore  what the trainer gets
        ({"A": "inh"}, {}, False, {"A": "inh"}),
        ({"A": "inh"}, {"A": "file"}, False, {"A": "file"}),
        ({}, {"BT_CHECKPOINT_DIR": "/elsewhere"}, False, {"BT_CHECKPOINT_DIR": "/ckpt"}),
        ({}, {"BT_NODE_RANK": "7", "BT_TRAINING_PROJECT_NAME": "x"}, False,
         {"BT_NODE_RANK": "0", "BT_TRAINING_PROJECT_NAME": "proj"}),
        ({}, {"BT_LOAD_CHECKPOINT_DIR": "/mine"}, False, {"BT_LOAD_CHECKPOINT_DIR": None}),
        ({}, {"BT_LOAD_CHECKPOINT_DIR": "/mine"}, True, {"BT_LOAD_CHECKPOINT_DIR": "/loaded"}),
    ],
)  # fmt: skip
def test_trainer_env_precedence(tmp_path, inherited, variables, restore, expected):
    path = write(tmp_path, {"project": "proj", "checkpointing_config": {"checkpoint_path": "/ckpt"},
                            "load_checkpoint_config": {"enabled": restore, "download_folder": "/loaded"}})  # fmt: skip
    c = dataclasses.replace(load({}, ENV, path), environment_variables=Environment(variables))
    env = trainer_env(c, inherited)
    assert {k: env.get(k) for k in expected} == expected


def test_a_python_config_needs_truss(tmp_path):
    # This venv holds no truss (it pins rich<14, the linters need rich>=14): the file cannot be read here.
    path = tmp_path / "config.py"
    path.write_text("from truss_train import TrainingProject\n")
    with pytest.raises(ConfigError) as e:
        load({}, ENV, str(path))
    assert "truss package is not importable" in str(e.value) and str(path) in str(e.value)
