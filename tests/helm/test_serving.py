"""The chart's serving example (SPEC §7): an inference Deployment whose init container runs
`ckptd download` into a volume shared with the model server. Rendered with Helm's library,
validated against Kubernetes' schemas, and the rendered init container's command run for real:
the repository's entrypoint.sh with the rendered arguments, environment and ConfigMap, against
moto, on a job made through `ckptd run`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import charts
import helm_python
import pytest
import yaml
from charts import KUBE_VERSIONS, container, env_of, one, render
from commands.trained import make_job
from daemons import PREFIX, base_env

KIND = "integration"  # Helm's renderer, like the other chart tests; one test runs ckptd against moto

SERVING = {
    "jobId": "run-42",
    "serving": {
        "enabled": True,
        "paths": ["rank-*/checkpoint-10/"],
        "server": {
            "image": {"repository": "vllm/vllm-openai", "tag": "v0.6.4"},
            "command": ["vllm", "serve"],
            "port": 8080,
        },
    },
}


def serving_docs(values: dict[str, Any] = SERVING) -> list[dict[str, Any]]:
    return [d for d in render(values) if d["metadata"]["labels"].get("app.kubernetes.io/component") == "serving"]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_renders_and_validates(version: str) -> None:
    docs = serving_docs()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment", "Service"]
    for doc in docs:
        assert charts.validate(doc, version) == [f"{doc['kind']} (strict schema {version})"]


def test_off_by_default() -> None:
    assert serving_docs({}) == []
    assert "Deployment" not in {d["kind"] for d in render({})}


def test_download_shares_a_volume_with_the_server() -> None:
    dep = one(serving_docs(), "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (server,) = pod["containers"]
    assert init["name"] == "ckptd-download" and init["args"] == ["download"]
    assert init["command"] == ["/opt/ckptd/entrypoint.sh"] and init["image"].startswith("ghcr.io/ckptd/ckptd:")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["emptyDir"] == {"sizeLimit": "50Gi"}
    mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert mounts["models"] == {"name": "models", "mountPath": "/models"}  # written by ckptd
    assert [m for m in server["volumeMounts"] if m["name"] == "models"] == [
        {"name": "models", "mountPath": "/models", "readOnly": True}  # read by the server, never written
    ]
    assert env_of(server)["MODEL_DIR"] == "/models/run-42"
    # ckptd's config file is the serving ConfigMap, where ckptd's containers always find it
    assert volumes["ckptd-config"]["configMap"]["name"] == one(serving_docs(), "ConfigMap")["metadata"]["name"]
    assert env_of(init)["CKPTD_CONFIG"] == mounts["ckptd-config"]["mountPath"] + "/config.yaml"
    assert mounts["ckptd-config"]["readOnly"] is True
    assert env_of(init)["CKPTD_PROJECT"] == "my-project" and env_of(init)["CKPTD_STORAGE"] == "s3://ckpt-bucket/runs"


def test_serving_config_is_the_references_shape() -> None:
    config = yaml.safe_load(one(serving_docs(), "ConfigMap")["data"]["config.yaml"])
    assert config == {
        "training_checkpoints": {
            "download_folder": "/models",
            "artifact_references": [{"training_job_id": "run-42", "paths": ["rank-*/checkpoint-10/"]}],
        }
    }
    other = charts.merged(SERVING, {"serving": {"paths": ["rank-0/latest/"]}})
    before = one(serving_docs(), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    after = one(serving_docs(other), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert before["checksum/serving-config"] != after["checksum/serving-config"]  # a new choice rolls the pods


def test_ports_and_service() -> None:
    docs = serving_docs()
    server = container(one(docs, "Deployment")["spec"]["template"]["spec"], "server")
    assert server["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == one(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    # the training pods do not match the serving Service, nor the other way round
    training = charts.pod_template(render(SERVING))["metadata"]["labels"]
    assert training["app.kubernetes.io/component"] == "training"
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "serving"


def test_restricted_security_context() -> None:
    pod = one(serving_docs(), "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["fsGroup"] == 65532
    for c in [*pod["initContainers"], *pod["containers"]]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["initContainers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_credentials_from_a_secret_reach_the_download() -> None:
    values = charts.merged(SERVING, {"storage": {"existingSecret": "s3-keys"}})
    pod = one(serving_docs(values), "Deployment")["spec"]["template"]["spec"]
    init = pod["initContainers"][0]
    assert env_of(init)["AWS_ACCESS_KEY_ID_FILE"].startswith("/var/run/secrets/ckptd/storage/")
    assert {"name": "storage-credentials", "mountPath": "/var/run/secrets/ckptd/storage", "readOnly": True} in init[
        "volumeMounts"
    ]
    assert {v["name"]: v for v in pod["volumes"]}["storage-credentials"]["secret"]["secretName"] == "s3-keys"
    assert all(m["name"] != "storage-credentials" for m in pod["containers"][0]["volumeMounts"])


REFUSED = {
    "no job": ({"jobId": "", "serving": {"jobId": ""}}, "serving.jobId: name the training job"),
    "no server image": ({"serving": {"server": {"image": {"repository": ""}}}}, "serving.server.image.repository"),
    "path escaping": ({"serving": {"paths": ["rank-0/../x"]}}, "at '/serving/paths/0'"),
    "absolute pattern": ({"serving": {"paths": ["/rank-0/x"]}}, "at '/serving/paths/0'"),
    "no pattern": ({"serving": {"paths": []}}, "at '/serving/paths'"),
    "relative folder": ({"serving": {"path": "models"}}, "at '/serving/path'"),
    "misspelt value": ({"serving": {"jobID": "x"}}, "additional properties 'jobID' not allowed"),
}


@pytest.mark.parametrize("values, message", REFUSED.values(), ids=REFUSED.keys())
def test_bad_values_refused(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=message):
        render(charts.merged(SERVING, values))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_rendered_init_container_downloads_the_checkpoint(moto_bucket, tmp_path: Path) -> None:
    job = make_job(moto_bucket, tmp_path / "jobs", "run-42", steps=(10, 20), losses=(0.5, 0.4))
    models = tmp_path / "models"
    values = charts.merged(
        SERVING,
        {
            "project": "proj",
            "storage": {
                "url": f"s3://{moto_bucket.name}/{PREFIX}",
                "endpointUrl": moto_bucket.server.endpoint_url,
                "addressingStyle": "path",
            },
            "serving": {"path": str(models)},
        },
    )
    docs = serving_docs(values)
    init = one(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"][0]
    config = tmp_path / "config.yaml"  # the ConfigMap's file, where the pod would mount it
    config.write_text(one(docs, "ConfigMap")["data"]["config.yaml"])
    env = {k: v for k, v in env_of(init).items() if isinstance(v, str)}
    env |= {"CKPTD_CONFIG": str(config), "HOME": str(tmp_path), "CKPTD_BIN": str(Path(sys.executable).parent / "ckptd")}
    entrypoint = charts.ROOT / os.path.basename(init["command"][0])  # /opt/ckptd/entrypoint.sh in the image
    r = subprocess.run(
        ["sh", str(entrypoint), *init["args"]],
        env={**base_env(), **moto_bucket.server.env(), **env},  # credentials as IRSA would provide them
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    got = {str(p.relative_to(models)): _sha(p) for p in sorted(models.rglob("*")) if p.is_file()}
    assert got == {
        f"run-42/rank-{rank}/{path}": digest
        for rank in (0, 1)
        for path, digest in job.written[rank].items()
        if path.startswith("checkpoint-10/")
    }
