"""The chart's rendered pod, run as a pod would run (tests/helm/podsim.py): init containers in
order, the native sidecar probed ready on the port the manifest names, the trainer, then SIGTERM
to the sidecar and the pod's grace period. Wrong ports, paths, environment names or start order
fail here, where schema validation cannot see them. A first pod trains and stores; a second pod
restores the latest checkpoint and resumes from it."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helm.charts import render
from tests.helm.podsim import Image, Pod, PodFailed, PodRun
from tests.helm.podvolumes import Volumes
from tests.servers import free_port, isolated_aws_env

KIND = "integration"

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)
TRAINER_IMAGE = "registry.example/trainer:1"
SECRET = "store-credentials"


def pod_values(bucket: Any, port: int) -> dict[str, Any]:
    return {
        "project": "pods",
        "storage": {
            "url": f"s3://{bucket.name}",
            "endpointUrl": bucket.server.endpoint_url,
            "region": bucket.server.region,
            "existingSecret": SECRET,
        },
        "ckptd": {"metricsPort": port, "drainTimeoutSeconds": 60},
        "restore": {
            "enabled": True,
            "checkpoints": [{"typ": "baseten_latest_checkpoint", "project_name": "pods"}],
        },
        "trainer": {
            "image": {"repository": TRAINER_IMAGE.rsplit(":", 1)[0], "tag": "1"},
            "command": ["python", "/workspace/train.py"],
            "env": [{"name": "POD_TRAINER_STEPS", "value": "2"}],
        },
    }


def images(docs: list[dict[str, Any]]) -> dict[str, Image]:
    """The ckptd image and the trainer's image as local files: what each ships at which path."""
    base_env = {**isolated_aws_env(), "PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": "/tmp"}
    ckptd_images = {
        c["image"] for d in docs if d["kind"] == "Job" for c in d["spec"]["template"]["spec"].get("initContainers", [])
    }
    out = {
        img: Image(files={"/opt/ckptd/entrypoint.sh": str(REPO / "entrypoint.sh")}, env=base_env)
        for img in ckptd_images
    }
    out[TRAINER_IMAGE] = Image(
        files={"/workspace/train.py": str(Path(__file__).with_name("pod_trainer.py"))}, env=base_env
    )
    return out


def run_pod(docs: list[dict[str, Any]], root: Path, bucket: Any) -> tuple[PodRun, dict[str, Any]]:
    job = next(d for d in docs if d["kind"] == "Job")
    template = job["spec"]["template"]
    uid = str(uuid.uuid4())
    metadata = {
        "name": f"{job['metadata']['name']}-0-x7k2p",
        "hostname": f"{job['metadata']['name']}-0",
        "namespace": "ml",
        "uid": str(uuid.uuid4()),
        "labels": {**template["metadata"].get("labels", {}), "batch.kubernetes.io/controller-uid": uid},
        "annotations": {**template["metadata"].get("annotations", {}), "batch.kubernetes.io/job-completion-index": "0"},
    }
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {
        SECRET: {"AWS_ACCESS_KEY_ID": bucket.server.access_key, "AWS_SECRET_ACCESS_KEY": bucket.server.secret_key}
    }
    volumes = Volumes(template["spec"], root, configmaps, secrets)
    pod = Pod(template["spec"], metadata, volumes, images(docs), root)
    return pod.run(main_timeout=120), {"job_id": uid, "volumes": volumes}


def trainer_report(run: PodRun) -> dict[str, Any]:
    lines = [line for line in run.logs("trainer").splitlines() if line.startswith("{")]
    assert lines, run.logs("trainer")
    return json.loads(lines[-1])


def stored(bucket: Any, job_id: str) -> set[str]:
    prefix = f"training_projects/pods/jobs/{job_id}/"
    pages = bucket.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.name, Prefix=prefix)
    return {o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])}


def test_a_pod_trains_and_stores_then_the_next_pod_restores_and_resumes(moto_bucket, pod_root):
    docs = render(pod_values(moto_bucket, free_port()), name="train")

    first, info = run_pod(docs, pod_root / "first", moto_bucket)
    order = first.events
    assert order.index("ckptd-restore exited 0") < order.index("ckptd started"), order
    assert order.index("ckptd readinessProbe passed") < order.index("trainer started"), order
    assert order.index("main containers exited") < order.index("SIGTERM ckptd"), order
    assert first.exit_code("trainer") == 0, first.logs("trainer")
    ckptd = first.containers["ckptd"]
    assert ckptd.exit_code == 0 and not ckptd.killed, ckptd.logs()[-3000:]
    report = trainer_report(first)
    assert report["resumed_from"] is None and report["wrote"] == ["checkpoint-1", "checkpoint-2"]
    assert report["env"]["BT_NODE_RANK"] == "0" and report["env"]["BT_GROUP_SIZE"] == "1"
    assert report["env"]["BT_TRAINING_JOB_ID"] == info["job_id"]
    keys = stored(moto_bucket, info["job_id"])
    assert {"rank-0/checkpoint-2/model.safetensors", "rank-0/checkpoint-2/trainer_state.json"} <= keys, keys
    assert any(k.startswith("manifests/rank-0/checkpoint-2") for k in keys), keys

    second, info2 = run_pod(docs, pod_root / "second", moto_bucket)
    assert second.exit_code("trainer") == 0, second.logs("ckptd-restore") + second.logs("trainer")
    report = trainer_report(second)
    assert report["resumed_from"] == "checkpoint-2", f"{report}\n{second.logs('ckptd-restore')[-3000:]}"
    assert report["restored_weights"] == "weights after step 2"
    assert report["wrote"] == ["checkpoint-3", "checkpoint-4"]
    assert second.containers["ckptd"].exit_code == 0
    assert "rank-0/checkpoint-4/trainer_state.json" in stored(moto_bucket, info2["job_id"])


def test_a_required_reference_that_matches_nothing_stops_the_pod_before_training(moto_bucket, pod_root):
    values = pod_values(moto_bucket, free_port())
    values["restore"]["required"] = True
    with pytest.raises(PodFailed, match="init container ckptd-restore exited 3") as failed:
        run_pod(render(values, name="train"), pod_root, moto_bucket)
    events = failed.value.run.events
    assert events == ["ckptd-restore started", "ckptd-restore exited 3"], events
