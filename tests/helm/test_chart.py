"""The chart lints clean and renders with Helm's own library (helm-python-sdk), and every manifest it
renders validates against Kubernetes' schemas, strict (unknown fields are errors), for the oldest
supported Kubernetes (1.29) and the newest the installed kubernetes-validate knows.

What is validated, exactly: core objects (Job, Service, ServiceAccount, ConfigMap) whole, against
the strict schemas. Custom resources have no schema there: a PyTorchJob's and a JobSet's pod
templates are validated as core PodTemplates, a JobSet's replicated Job spec as a core Job, and
their other fields, the PodMonitor's and the PrometheusRule's, are checked against the field names
of their published API types (`charts.check_custom`), not against a schema.
"""

from __future__ import annotations

import copy

import charts
import helm_python
import kubernetes_validate
import pytest
from charts import BASE, KUBE_VERSIONS, render

KIND = "integration"

NAMED_REF = {"typ": "baseten_named_checkpoint", "job_id": "run-1", "checkpoint_name": "step-3"}
MONITORING = {"monitoring": {k: {"enabled": True} for k in ("podMonitor", "prometheusRule", "dashboard")}}

# The releases the acceptance names, and the corners around them.
SCENARIOS = {
    "defaults": {},
    "restore": {"restore": {"enabled": True}},
    "multi-node": {"workload": {"nodes": 8}, "storage": {"existingSecret": "s3-creds"}},
    "entrypoint": {"mode": "entrypoint", "restore": {"enabled": True}},
    "entrypoint-multi-node": {"mode": "entrypoint", "workload": {"nodes": 3}},
    "monitoring": MONITORING,
    "pytorchjob": {"workload": {"kind": "PyTorchJob", "nodes": 4}, "restore": {"enabled": True}},
    "jobset": {"workload": {"kind": "JobSet", "nodes": 4}, "restore": {"enabled": True}},
    "file-store": {
        "storage": {"url": "file:///shared/store"},
        "extraVolumes": [{"name": "store", "persistentVolumeClaim": {"claimName": "nfs"}}],
        "ckptd": {"volumeMounts": [{"name": "store", "mountPath": "/shared"}]},
    },
    "ephemeral-volumes": {
        "restore": {"enabled": True, "volume": {"type": "ephemeral", "size": "1Ti"}},
        "checkpoints": {"volume": {"type": "ephemeral", "storageClassName": "nvme", "size": "2Ti"}},
    },
    "everything": {
        **MONITORING,
        "workload": {
            "nodes": 2,
            "activeDeadlineSeconds": 86400,
            "ttlSecondsAfterFinished": 3600,
            "podLabels": {"team": "ml"},
            "podAnnotations": {"a": "b"},
        },
        "storage": {
            "existingSecret": "s3",
            "sessionTokenKey": "token",
            "endpointUrl": "https://s3.example.com",
            "region": "eu-west-1",
            "addressingStyle": "path",
            "checksum": "md5",
            "sse": "sse-kms",
            "sseKmsKeyId": "key-1",
        },
        "restore": {"enabled": True, "required": True, "checkpoints": [NAMED_REF]},
        "trainer": {
            "env": [{"name": "HF_HOME", "value": "/cache"}],
            "ports": [{"name": "tb", "containerPort": 6006}],
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            "workingDir": "/app",
            "securityContext": {"runAsUser": 1000},
        },
        "extraVolumes": [{"name": "cache", "emptyDir": {}}],
        "ckptd": {
            "extraArgs": ["--settle-time", "1"],
            "env": [{"name": "CKPTD_NICE", "value": "5"}],
            "config": {"upload": {"concurrency": 4}},
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "priorityClassName": "training",
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "nodeSelector": {"gpu": "h100"},
        "affinity": {"podAntiAffinity": {}},
        "runtimeClassName": "nvidia",
    },
}


@pytest.fixture(scope="module", autouse=True)
def _quiet_helm() -> None:
    helm_python.disable_logging()


def test_lints_clean_strict_for_every_supported_kubernetes() -> None:
    for version in KUBE_VERSIONS:
        report = helm_python.lint(str(charts.CHART), BASE, strict=True, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report
        # Only the recommendation of an icon (we have none to point to) is left.
        assert all(m["error"] == "icon is recommended" for m in report["messages"]), report


def test_lint_reports_the_missing_required_values() -> None:
    report = helm_python.lint(str(charts.CHART))
    joined = "\n".join(report["errors"])
    assert "missing property 'url'" in joined and "missing property 'repository'" in joined, report


@pytest.mark.parametrize("scenario", SCENARIOS, ids=list(SCENARIOS))
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_renders_and_validates(scenario: str, version: str) -> None:
    docs = render(SCENARIOS[scenario])
    checked = [line for doc in docs for line in charts.validate(doc, version)]
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "ServiceAccount"} <= kinds and len(kinds & set(charts.WORKLOADS)) == 1
    # Every object was checked against a real schema or, for a custom resource, its pod template was.
    assert any("strict schema" in line for line in checked)
    if kinds & {"PyTorchJob", "JobSet"}:
        assert any("as PodTemplate" in line for line in checked)


@pytest.mark.parametrize("example", charts.EXAMPLES, ids=[p.stem for p in charts.EXAMPLES])
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_example_renders_and_validates(example, version: str) -> None:
    report = helm_python.lint(str(charts.CHART), charts.load_example(example), strict=True)
    assert not report["errors"], report
    for doc in charts.render_example(example):
        charts.validate(doc, version)


def test_the_validation_rejects_what_kubernetes_would() -> None:
    """The checks above can fail: strict validation refuses a field Kubernetes does not know, and
    a pod template inside a custom resource is checked as closely as a Job's."""
    docs = render({"workload": {"kind": "JobSet"}})
    bad = copy.deepcopy(charts.workload(docs))
    charts.pod_template([bad])["spec"]["containers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        charts.validate(bad, KUBE_VERSIONS[0])
    job = copy.deepcopy(charts.workload(render({})))
    job["spec"]["completions"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        charts.validate(job, KUBE_VERSIONS[-1])


def test_packaged_chart_carries_the_linked_observability_files(tmp_path) -> None:
    """`helm package` follows the links: the archive holds the alerts and dashboard themselves."""
    archive = charts.chart().save(tmp_path)
    with open(archive, "rb") as f:
        packaged = helm_python.Chart.load_archive(f.read())
    files = {f["name"] for f in packaged.files}
    assert {"files/alerts.yaml", "files/dashboard.json"} <= files
    rendered = packaged.render(charts.merged(BASE, MONITORING), name="demo")
    assert "CkptdUploadsBehind" in rendered["ckptd/templates/prometheusrule.yaml"]
