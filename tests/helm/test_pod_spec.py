"""What the rendered pod means, not only that it is valid: container order, the native sidecar, its
probes, the environment every container sees, and the workload's networking for each kind."""

from __future__ import annotations

import charts
import pytest
from charts import container, env_of, pod_template, render

KIND = "integration"

BT_IDENTITY = ("BT_TRAINING_PROJECT_NAME", "BT_TRAINING_JOB_ID", "BT_NODE_RANK", "BT_GROUP_SIZE", "BT_CHECKPOINT_DIR")
KINDS = ("Job", "PyTorchJob", "JobSet")


def spec_of(values: dict) -> dict:
    return pod_template(render(values))["spec"]


def trainer(spec: dict) -> dict:
    assert len(spec["containers"]) == 1
    return spec["containers"][0]


def test_restore_runs_to_completion_before_the_sidecar_starts() -> None:
    spec = spec_of({"restore": {"enabled": True}})
    assert [c["name"] for c in spec["initContainers"]] == ["ckptd-restore", "ckptd"]
    restore, sidecar = spec["initContainers"]
    # Kubernetes runs a plain init container to completion; only the sidecar keeps running.
    assert "restartPolicy" not in restore and sidecar["restartPolicy"] == "Always"
    assert restore["command"] == ["/opt/ckptd/entrypoint.sh"] and restore["args"] == ["restore"]
    assert sidecar["command"] == ["/opt/ckptd/entrypoint.sh"] and sidecar["args"] == ["watch"]
    assert spec["restartPolicy"] == "Never"


def test_without_restore_the_sidecar_is_the_only_init_container() -> None:
    spec = spec_of({})
    assert [(c["name"], c.get("restartPolicy")) for c in spec["initContainers"]] == [("ckptd", "Always")]
    assert {v["name"] for v in spec["volumes"]} == {"checkpoints", "ckptd-config", "ckptd-tmp"}


def test_extra_arguments_follow_the_command() -> None:
    sidecar = container(spec_of({"ckptd": {"extraArgs": ["--settle-time", "2"]}}), "ckptd")
    assert sidecar["args"] == ["watch", "--settle-time", "2"]


@pytest.mark.parametrize("port", [9477, 19100])
def test_probes_hit_the_port_the_sidecar_declares_and_listens_on(port: int) -> None:
    sidecar = container(spec_of({"ckptd": {"metricsPort": port}}), "ckptd")
    declared = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert declared == {"metrics": port}
    assert env_of(sidecar)["CKPTD_METRICS_ADDR"] == f"0.0.0.0:{port}"
    probes = {k: sidecar[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {k: (p["path"], p["port"]) for k, p in probes.items()} == {
        "startupProbe": ("/readyz", "metrics"),
        "livenessProbe": ("/healthz", "metrics"),
        "readinessProbe": ("/readyz", "metrics"),
    }


@pytest.mark.parametrize("mode", ["sidecar", "entrypoint"])
@pytest.mark.parametrize("enabled", [True, False], ids=["restore", "no-restore"])
def test_the_restore_folder_is_named_only_when_restore_is_enabled(mode: str, enabled: bool) -> None:
    spec = spec_of({"mode": mode, "restore": {"enabled": enabled, "path": "/data/loaded"}})
    main = trainer(spec)
    readers = [main] + ([container(spec, "ckptd-restore")] if enabled and mode == "sidecar" else [])
    for c in readers:
        assert ("BT_LOAD_CHECKPOINT_DIR" in env_of(c)) is enabled, c["name"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert (mounts.get("/data/loaded") == "loaded-checkpoints") is enabled, c["name"]
        if enabled:
            assert env_of(c)["BT_LOAD_CHECKPOINT_DIR"] == "/data/loaded"
    if mode == "sidecar":
        assert "BT_LOAD_CHECKPOINT_DIR" not in env_of(container(spec, "ckptd"))
    assert any(v["name"] == "loaded-checkpoints" for v in spec["volumes"]) is enabled


@pytest.mark.parametrize("kind", KINDS)
def test_every_container_sees_the_same_identity(kind: str) -> None:
    spec = spec_of({"workload": {"kind": kind, "nodes": 3}, "restore": {"enabled": True}})
    envs = [env_of(c) for c in [*spec["initContainers"], *spec["containers"]]]
    for name in BT_IDENTITY:
        assert all(e[name] == envs[0][name] for e in envs), name
    env = envs[0]
    assert env["BT_GROUP_SIZE"] == "3" and env["BT_TRAINING_PROJECT_NAME"] == "my-project"
    assert env["BT_CHECKPOINT_DIR"] == "/mnt/checkpoints"
    rank = env["BT_NODE_RANK"]["fieldRef"]["fieldPath"]
    job_id = env["BT_TRAINING_JOB_ID"]
    if kind == "PyTorchJob":
        assert rank == "metadata.labels['training.kubeflow.org/replica-index']"
        assert job_id == "demo-1"  # release name and revision: no uid label on its pods
    else:
        assert rank == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        uid = "batch.kubernetes.io/controller-uid" if kind == "Job" else "jobset.sigs.k8s.io/jobset-uid"
        assert job_id == {"fieldRef": {"fieldPath": f"metadata.labels['{uid}']"}}


def test_a_given_job_id_is_used_as_is() -> None:
    spec = spec_of({"jobId": "run-42", "workload": {"kind": "JobSet"}})
    assert {env_of(c)["BT_TRAINING_JOB_ID"] for c in [*spec["initContainers"], *spec["containers"]]} == {"run-42"}


def test_indexed_job_with_a_headless_service_names_the_leader() -> None:
    docs = render({"workload": {"nodes": 4, "leaderPort": 23456}})
    job, svc = charts.one(docs, "Job"), charts.one(docs, "Service")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    spec = job["spec"]["template"]["spec"]
    assert spec["subdomain"] == svc["metadata"]["name"] == job["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    env = env_of(trainer(spec))
    # An indexed Job's pod is host <job>-<index>: node 0 under the Service's domain.
    leader = f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert env["BT_LEADER_ADDR"] == env["MASTER_ADDR"] == leader
    assert env["MASTER_PORT"] == "23456"


def test_pytorchjob_workers_share_one_template_and_worker_0_leads() -> None:
    docs = render({"workload": {"kind": "PyTorchJob", "nodes": 4}})
    job = charts.one(docs, "PyTorchJob")
    assert not charts.by_kind(docs, "Service"), "the operator makes the per-pod Services"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert list(replicas) == ["Worker"] and replicas["Worker"]["replicas"] == 4
    main = trainer(replicas["Worker"]["template"]["spec"])
    assert main["name"] == "pytorch"
    env = env_of(main)
    assert env["MASTER_ADDR"] == env["BT_LEADER_ADDR"] == f"{job['metadata']['name']}-worker-0"
    port = {p["name"]: p["containerPort"] for p in main["ports"]}["pytorchjob-port"]
    assert env["MASTER_PORT"] == str(port)


def test_jobset_has_dns_host_names_and_node_0_leads() -> None:
    docs = render({"workload": {"kind": "JobSet", "nodes": 4}})
    js = charts.one(docs, "JobSet")
    assert js["spec"]["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    (rjob,) = js["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1
    job = rjob["template"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"]) == ("Indexed", 4, 4)
    name = js["metadata"]["name"]
    env = env_of(trainer(job["template"]["spec"]))
    assert env["BT_LEADER_ADDR"] == f"{name}-{rjob['name']}-0-0.{name}"


def test_entrypoint_mode_runs_ckptd_run_around_the_command() -> None:
    spec = spec_of({"mode": "entrypoint", "trainer": {"command": ["python", "train.py"], "args": ["--lr", "1e-4"]}})
    main = trainer(spec)
    assert "initContainers" not in spec and spec["shareProcessNamespace"] is False
    assert main["command"] == ["/opt/ckptd/bin/dumb-init", "--", "/opt/ckptd/entrypoint.sh"]
    assert main["args"] == ["python", "train.py", "--lr", "1e-4"]
    assert main["image"] == "ghcr.io/example/trainer:1.0"
    env = env_of(main)
    assert env["CKPTD_STORAGE"] == "s3://ckpt-bucket/runs" and env["CKPTD_CONFIG"] == "/etc/ckptd/config.yaml"
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"metrics": 9477}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_entrypoint_mode_puts_ckptd_options_before_the_command() -> None:
    main = trainer(spec_of({"mode": "entrypoint", "ckptd": {"extraArgs": ["--settle-time", "1"]}}))
    assert main["args"] == ["--settle-time", "1", "--", "python", "train.py"]


def test_sidecar_mode_keeps_the_users_command_and_shares_the_process_namespace() -> None:
    spec = spec_of({})
    main = trainer(spec)
    assert main["command"] == ["python", "train.py"] and "args" not in main
    assert spec["shareProcessNamespace"] is True
    assert not any(k.startswith(("CKPTD_", "AWS_")) for k in env_of(main))
    assert spec_of({"shareProcessNamespace": False})["shareProcessNamespace"] is False


def test_trainer_and_sidecar_share_the_checkpoint_folder() -> None:
    spec = spec_of({"checkpoints": {"path": "/ckpt", "volume": {"type": "ephemeral", "storageClassName": "nvme"}}})
    for c in (trainer(spec), container(spec, "ckptd")):
        assert {"name": "checkpoints", "mountPath": "/ckpt"} in c["volumeMounts"], c["name"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "checkpoints"]
    claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["storageClassName"] == "nvme" and claim["resources"]["requests"]["storage"] == "100Gi"
    (volume,) = [v for v in spec_of({})["volumes"] if v["name"] == "checkpoints"]
    assert volume == {"name": "checkpoints", "emptyDir": {"sizeLimit": "50Gi"}}


def test_notes_tell_how_to_follow_the_uploads() -> None:
    notes = charts.render_raw({})["ckptd/templates/NOTES.txt"]
    assert "logs -f -l app.kubernetes.io/instance=demo -c ckptd" in notes
    assert "port-forward" in notes and "/status" in notes and "/metrics" in notes
    assert "terminationGracePeriodSeconds: 360" in notes


@pytest.mark.parametrize("mode", ["sidecar", "entrypoint"])
def test_a_file_store_on_a_shared_volume_is_mounted_where_ckptd_writes(mode: str) -> None:
    values = {
        "mode": mode,
        "storage": {"url": "file:///shared/store"},
        "restore": {"enabled": True},
        "extraVolumes": [{"name": "store", "persistentVolumeClaim": {"claimName": "team-nfs"}}],
        "ckptd": {"volumeMounts": [{"name": "store", "mountPath": "/shared"}]},
    }
    spec = spec_of(values)
    ckptd = ["ckptd-restore", "ckptd"] if mode == "sidecar" else [spec["containers"][0]["name"]]
    for name in ckptd:
        c = container(spec, name)
        assert {"name": "store", "mountPath": "/shared"} in c["volumeMounts"], name
        assert env_of(c)["CKPTD_STORAGE"] == "file:///shared/store"
    if mode == "sidecar":
        assert not any(m["name"] == "store" for m in trainer(spec)["volumeMounts"])
