"""Settings resolution: precedence, config-file shape, validation of single and combined values."""

from __future__ import annotations

import json
import re

import pytest

from daemon.config import ConfigError, load
from daemon.config.refs import LATEST, NAMED, CheckpointRef
from daemon.config.schema import DEFAULT_IGNORE, SPECS

KIND = "unit"

ENV = {"HOME": "/home/u"}


def write(tmp_path, text: str, name: str = "ckptd.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_match_the_contract():
    c = load({}, ENV)
    assert c.storage == "file:///home/u/.local/share/ckptd/store"
    assert c.project == "default"
    assert (c.node_rank, c.group_size) == (0, 1)
    assert c.checkpoint_dir == "/tmp/training_checkpoints"
    assert c.restore_dir == "/tmp/loaded_checkpoints"
    assert c.metrics_addr == ("0.0.0.0", 9477)
    assert c.ignore_patterns == DEFAULT_IGNORE
    assert re.fullmatch(r"\d{8}t\d{6}-[0-9a-f]{6}", c.job_id)


def test_xdg_data_home_moves_the_embedded_store():
    assert load({}, {**ENV, "XDG_DATA_HOME": "/data"}).storage == "file:///data/ckptd/store"


def test_generated_job_ids_sort_by_time_and_differ():
    a, b = load({}, ENV).job_id, load({}, ENV).job_id
    assert a != b and a[:15] <= b[:15]


def test_flag_beats_environment_beats_file_beats_default(tmp_path):
    path = write(tmp_path, "project: from-file\njob_id: file-job\nnode_rank: 1\ngroup_size: 4\n")
    env = {**ENV, "CKPTD_PROJECT": "from-env", "CKPTD_JOB_ID": "env-job"}
    c = load({"project": "from-flag"}, env, path)
    assert (c.project, c.job_id, c.node_rank, c.group_size) == ("from-flag", "env-job", 1, 4)


def test_first_environment_variable_found_wins():
    env = {**ENV, "BT_NODE_RANK": "2", "NODE_RANK": "3", "CKPTD_GROUP_SIZE": "4", "BT_TRAINING_JOB_ID": "j1"}
    assert load({}, env).node_rank == 2
    # An empty variable counts as unset, as shells and Kubernetes produce them.
    assert load({}, {**env, "CKPTD_NODE_RANK": ""}).node_rank == 2


def test_config_file_from_environment(tmp_path):
    path = write(tmp_path, "project: via-env-var\n")
    assert load({}, {**ENV, "CKPTD_CONFIG": path}).project == "via-env-var"


def test_reference_sdk_shape(tmp_path):
    path = write(
        tmp_path,
        """
project: my-training-project
job_id: run-42
storage: {url: s3://my-bucket/ckpts, endpoint_url: "http://127.0.0.1:9000", region: eu-west-1,
          addressing_style: path, checksum: md5}
checkpointing_config: {enabled: true, checkpoint_path: /ckpt}
load_checkpoint_config:
  enabled: true
  download_folder: /loaded
  checkpoints:
    - typ: baseten_latest_checkpoint
      project_name: my-training-project
    - {typ: baseten_named_checkpoint, checkpoint_name: checkpoint-20, job_id: gvpql31, required: true}
start_commands: ["./run.sh"]
upload: {part_size: 64MiB, concurrency: 4, settle_time: 500ms, ignore_patterns: ["*.bak"], cpu_affinity: "0-1,3"}
""",
    )
    c = load({}, ENV, path)
    assert c.storage == "s3://my-bucket/ckpts"
    assert (c.s3_endpoint_url, c.s3_region, c.s3_addressing_style, c.s3_checksum) == (
        "http://127.0.0.1:9000",
        "eu-west-1",
        "path",
        "md5",
    )
    assert (c.checkpoint_dir, c.restore_enabled, c.restore_dir) == ("/ckpt", True, "/loaded")
    assert c.checkpoints == (
        CheckpointRef(LATEST, project_name="my-training-project"),
        CheckpointRef(NAMED, job_id="gvpql31", checkpoint_name="checkpoint-20", required=True),
    )
    assert c.start_commands == ("./run.sh",)
    assert (c.part_size, c.upload_concurrency, c.settle_time) == (64 << 20, 4, 0.5)
    assert c.ignore_patterns == ("*.bak",)
    assert c.cpu_affinity == (0, 1, 3)


def test_json_config_file(tmp_path):
    path = write(tmp_path, json.dumps({"project": "p", "storage": "file:///s"}), "c.json")
    c = load({}, ENV, path)
    assert (c.project, c.storage) == ("p", "file:///s")


@pytest.mark.parametrize(
    "flags, env, file, setting",
    [
        ({}, {}, "upload: {part_sise: 8MiB}\n", "upload.part_sise"),
        ({}, {}, "bogus: 1\n", "bogus"),
        ({}, {}, "upload: 5\n", "upload"),
        ({}, {}, "upload: {concurrency: many}\n", "upload.concurrency"),
        ({}, {}, "start_commands: {a: 1}\n", "start_commands"),
        ({}, {}, "checkpointing_config: {enabled: maybe}\n", "checkpointing_config.enabled"),
        ({"storage": "s4://bucket"}, {}, "", "storage.url"),
        ({}, {"CKPTD_STORAGE": "s3://"}, "", "storage.url"),
        ({}, {}, "storage: file://relative/path\n", "storage.url"),
        ({"checkpoint_dir": "ckpts"}, {}, "", "checkpointing_config.checkpoint_path"),
        ({}, {"BT_LOAD_CHECKPOINT_DIR": "rel"}, "", "load_checkpoint_config.download_folder"),
        ({"part_size": "-1"}, {}, "", "upload.part_size"),
        ({}, {}, "upload: {bandwidth_limit: -5MiB}\n", "upload.bandwidth_limit"),
        ({"group_size": "2"}, {}, "", "job_id"),
        ({"project": "../etc"}, {}, "", "project"),
        ({}, {"CKPTD_JOB_ID": "a/b"}, "", "job_id"),
        ({"job_id": "has space"}, {}, "", "job_id"),
        ({"node_rank": "3", "group_size": "2", "job_id": "j"}, {}, "", "node_rank"),
        ({"metrics_addr": "localhost"}, {}, "", "metrics_addr"),
        ({"metrics_addr": "0.0.0.0:70000"}, {}, "", "metrics_addr"),
        ({"s3_endpoint_url": "ftp://x"}, {}, "", "storage.endpoint_url"),
        ({"s3_checksum": "crc99"}, {}, "", "storage.checksum"),
        ({"settle_time": "soon"}, {}, "", "upload.settle_time"),
        ({"restore_dir": "/tmp/training_checkpoints/loaded"}, {}, "", "load_checkpoint_config.download_folder"),
        ({"s3_sse_kms_key_id": "k"}, {}, "", "storage.sse_kms_key_id"),
        ({"s3_ca_bundle": "/nonexistent/ca.pem"}, {}, "", "storage.ca_bundle"),
        (
            {},
            {},
            "load_checkpoint_config: {checkpoints: [{typ: baseten_latest_checkpoint}]}\n",
            "load_checkpoint_config.checkpoints",
        ),
        (
            {},
            {},
            "load_checkpoint_config: {checkpoints: [{typ: nope, job_id: j}]}\n",
            "load_checkpoint_config.checkpoints",
        ),
        (
            {},
            {},
            "load_checkpoint_config: {checkpoints: [{typ: baseten_named_checkpoint, job_id: j, "
            "checkpoint_name: ../x}]}\n",
            "load_checkpoint_config.checkpoints",
        ),
        ({}, {}, "project: [1, 2]\n", "project"),
        ({}, {}, "a: [unclosed\n", "config"),
    ],
)
def test_bad_values_name_the_setting(tmp_path, flags, env, file, setting):
    path = write(tmp_path, file) if file else None
    with pytest.raises(ConfigError) as e:
        load(flags, {**ENV, **env}, path)
    assert e.value.setting.split(" ")[0] == setting
    assert "\n" not in str(e.value)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load({}, ENV, str(tmp_path / "absent.yaml"))


def test_credentials_in_urls_are_refused_without_echoing_them():
    for flags in (
        {"storage": "s3://AKIAXXXX:hunter2hunter2@bucket/p"},
        {"s3_endpoint_url": "https://AKIAXXXX:hunter2hunter2@s3.example.com"},
    ):
        with pytest.raises(ConfigError) as e:
            load(flags, ENV)
        assert "hunter2" not in str(e.value) and "AKIAXXXX" not in str(e.value)


def test_every_setting_has_help_and_a_valid_default():
    for name, spec in SPECS.items():
        assert spec.help.strip(), name
        assert spec.key.split(".")[0] in {
            "project",
            "job_id",
            "node_rank",
            "group_size",
            "log_level",
            "log_format",
            "storage",
            "checkpointing_config",
            "upload",
            "drain_timeout",
            "load_checkpoint_config",
            "retention",
            "training_checkpoints",
            "environment_variables",
            "start_commands",
            "stop_timeout",
            "metrics_addr",
        }, name
    load({}, ENV)  # parses every default


def test_yaml_merge_keys_load_as_yaml_reads_them(tmp_path):
    path = write(
        tmp_path,
        """
project: p
checkpointing_config: {enabled: true, checkpoint_path: /ckpt}
load_checkpoint_config:
  <<: {enabled: false, download_folder: /shared}
  enabled: true
  download_folder: /loaded
""",
    )
    c = load({}, ENV, path)
    assert (c.restore_enabled, c.restore_dir, c.checkpoint_dir) == (True, "/loaded", "/ckpt")


def test_two_references_to_one_checkpoint_are_one_and_two_sources_of_one_name_are_refused(tmp_path):
    same = "job=src,checkpoint=checkpoint-10;job=src,checkpoint=checkpoint-10,required"
    assert len(load({"checkpoints": same}, ENV).checkpoints) == 2  # restore/plan.py makes them one unit
    with pytest.raises(ConfigError, match="two references would land on rank-N/checkpoint-10/"):
        load({"checkpoints": "job=src,checkpoint=checkpoint-10;job=other,checkpoint=checkpoint-10"}, ENV)


def test_retention_while_training_is_refused_for_a_multi_node_job():
    # Each node would delete its own share of checkpoints that commit across nodes (issue 14).
    args = {"group_size": 2, "job_id": "j", "prune_enabled": True}
    with pytest.raises(ConfigError, match=r"retention\.enabled .*group size 2.*ckptd prune"):
        load(args, ENV)
    assert load({**args, "prune_enabled": False}, ENV).group_size == 2
