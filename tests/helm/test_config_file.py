"""The config file and environment the chart gives ckptd are accepted by ckptd itself: its own loader
and validator, then its real `restore` command, with the environment a pod would get."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import charts
import pytest
import yaml
from charts import container, pod_template, render

from daemon.config import loader
from daemon.config.refs import CheckpointRef

KIND = "integration"

UID = "0b6c7c1e-9a57-4a0e-a7a4-7d1e4c1f2a3b"


def pod_env(c: dict[str, Any], rank: int) -> dict[str, str]:
    """The environment Kubernetes would give container `c` of pod `rank` (fieldRefs resolved)."""
    metadata = {
        "metadata.labels['batch.kubernetes.io/controller-uid']": UID,
        "metadata.labels['jobset.sigs.k8s.io/jobset-uid']": UID,
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(rank),
        "metadata.labels['training.kubeflow.org/replica-index']": str(rank),
    }
    env = {}
    for e in c.get("env", []):
        env[e["name"]] = e["value"] if "value" in e else metadata[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def config_file(docs: list[dict[str, Any]], where: Path) -> Path:
    cm = charts.one(docs, "ConfigMap")
    path = where / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return path


def loaded(values: dict[str, Any], tmp_path: Path, name: str = "ckptd", rank: int = 0) -> loader.Config:
    docs = render(values)
    env = pod_env(container(pod_template(docs)["spec"], name), rank)
    assert env.pop("CKPTD_CONFIG") == "/etc/ckptd/config.yaml"
    return loader.load(env=env, config_file=str(config_file(docs, tmp_path)))


def test_sidecar_settings_load_as_the_values_say(tmp_path: Path) -> None:
    values = {
        "project": "llm",
        "workload": {"nodes": 4},
        "storage": {"endpointUrl": "http://minio:9000", "addressingStyle": "path", "checksum": "md5"},
        "ckptd": {"drainTimeoutSeconds": 120, "metricsPort": 9100, "config": {"upload": {"concurrency": 3}}},
        "checkpoints": {"path": "/ckpt"},
    }
    c = loaded(values, tmp_path, rank=3)
    assert (c.project, c.job_id, c.node_rank, c.group_size) == ("llm", UID, 3, 4)
    assert (c.storage, c.s3_endpoint_url, c.s3_addressing_style, c.s3_checksum) == (
        "s3://ckpt-bucket/runs", "http://minio:9000", "path", "md5"
    )  # fmt: skip
    assert (c.checkpoint_dir, c.drain_timeout, c.metrics_addr) == ("/ckpt", 120.0, ("0.0.0.0", 9100))
    assert c.upload_concurrency == 3 and c.restore_enabled is False and c.checkpoints == ()


def test_references_reach_restore_with_the_chart_default_for_required(tmp_path: Path) -> None:
    refs = [
        {"typ": "baseten_named_checkpoint", "job_id": "run-7", "checkpoint_name": "checkpoint-20"},
        {"typ": "baseten_latest_checkpoint", "project_name": "other", "required": False},
    ]
    values = {"restore": {"enabled": True, "required": True, "path": "/restored", "checkpoints": refs}}
    c = loaded(values, tmp_path, name="ckptd-restore")
    assert c.restore_enabled and c.restore_dir == "/restored"
    assert c.checkpoints == (
        CheckpointRef(typ="baseten_named_checkpoint", job_id="run-7", checkpoint_name="checkpoint-20", required=True),
        CheckpointRef(typ="baseten_latest_checkpoint", project_name="other", required=False),
    )


def test_restore_without_references_resumes_the_project(tmp_path: Path) -> None:
    c = loaded({"project": "p1", "restore": {"enabled": True}}, tmp_path, name="ckptd-restore")
    assert c.checkpoints == (CheckpointRef(typ="baseten_latest_checkpoint", project_name="p1"),)


def test_entrypoint_mode_container_loads_with_start_commands(tmp_path: Path) -> None:
    values = {"mode": "entrypoint", "trainer": {"command": [], "args": []},
              "ckptd": {"config": {"start_commands": ["./run.sh"]}}}  # fmt: skip
    c = loaded(values, tmp_path, name="trainer")
    assert c.start_commands == ("./run.sh",) and c.stop_timeout == 30.0


@pytest.mark.parametrize(
    ("required", "exit_code"), [(False, 0), (True, 3)], ids=["optional-reference", "required-reference"]
)
def test_ckptd_restore_runs_with_the_rendered_pod_settings(tmp_path: Path, required: bool, exit_code: int) -> None:
    """The real command, as the init container runs it, against an empty store: an optional
    reference that matches nothing lets training start, a required one stops the pod (exit 3)."""
    store, restored = tmp_path / "store", tmp_path / "loaded"
    store.mkdir()
    values = {
        "storage": {"url": f"file://{store}"},
        "restore": {"enabled": True, "required": required, "path": str(restored)},
    }
    docs = render(values)
    init = container(pod_template(docs)["spec"], "ckptd-restore")
    assert init["args"] == ["restore"]
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG")}
    env.update(pod_env(init, rank=0), CKPTD_CONFIG=str(config_file(docs, tmp_path)), HOME=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "daemon", *init["args"]], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == exit_code, done.stderr[-2000:]
    # The reference the chart wrote (this project's latest) is the one ckptd looked for.
    if required:
        assert "required latest checkpoint of project=my-project matches no committed checkpoint" in done.stderr
    else:
        assert '"ref": "latest checkpoint of project=my-project"' in done.stderr
        # get_last_checkpoint(BT_LOAD_CHECKPOINT_DIR/rank-0) needs the folder even when nothing matched.
        assert (restored / "rank-0").is_dir()


def test_config_map_names_only_settings_ckptd_knows(tmp_path: Path) -> None:
    docs = render({"restore": {"enabled": True}, "ckptd": {"config": {"upload": {"bogus": 1}}}})
    with pytest.raises(loader.ConfigError, match=r"upload\.bogus"):
        loader.read_settings(str(config_file(docs, tmp_path)))
    parsed = yaml.safe_load(charts.one(render({}), "ConfigMap")["data"]["config.yaml"])
    assert set(parsed) == {"checkpointing_config", "load_checkpoint_config"}
