"""Invalid values are refused before anything renders, with a message that names the value and what
is accepted: by values.schema.json for one value, by the chart's checks for values that must agree."""

from __future__ import annotations

from typing import Any

import charts
import helm_python
import pytest
from charts import BASE, merged

KIND = "integration"

NAMED = {"typ": "baseten_named_checkpoint", "job_id": "run-1", "checkpoint_name": "checkpoint-5"}

# (values over BASE, text the message must hold)
SCHEMA_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "missing storage URL": ({"storage": {"url": None}}, "at '/storage': missing property 'url'"),
    "empty storage URL": ({"storage": {"url": ""}}, "at '/storage/url': '' does not match pattern"),
    "storage URL of another scheme": ({"storage": {"url": "gs://b"}}, "at '/storage/url': 'gs://b' does not match"),
    "negative drain timeout": (
        {"ckptd": {"drainTimeoutSeconds": -1}},
        "at '/ckptd/drainTimeoutSeconds': minimum: got -1, want 0",
    ),
    "unknown mode": ({"mode": "daemonset"}, "at '/mode': value must be one of 'sidecar', 'entrypoint'"),
    "unknown workload kind": (
        {"workload": {"kind": "Deployment"}},
        "at '/workload/kind': value must be one of 'Job', 'PyTorchJob', 'JobSet'",
    ),
    "no nodes": ({"workload": {"nodes": 0}}, "at '/workload/nodes': minimum: got 0, want 1"),
    "nodes as text": ({"workload": {"nodes": "4"}}, "at '/workload/nodes': got string, want integer"),
    "missing trainer image": ({"trainer": {"image": {"repository": None}}}, "missing property 'repository'"),
    "misspelt value": ({"storage": {"endpointURL": "http://x"}}, "additional properties 'endpointURL' not allowed"),
    "unknown checksum": ({"storage": {"checksum": "crc64"}}, "at '/storage/checksum': value must be one of"),
    "endpoint with a path": ({"storage": {"endpointUrl": "http://minio:9000/bucket"}}, "at '/storage/endpointUrl'"),
    "unsafe project": ({"project": "team/a"}, "at '/project': 'team/a' does not match pattern"),
    "relative checkpoint path": ({"checkpoints": {"path": "ckpt"}}, "at '/checkpoints/path': 'ckpt' does not match"),
    "unknown volume type": ({"checkpoints": {"volume": {"type": "hostPath"}}}, "at '/checkpoints/volume/type'"),
    "named reference without a name": (
        {"restore": {"checkpoints": [{"typ": "baseten_named_checkpoint", "job_id": "j"}]}},
        "at '/restore/checkpoints/0': missing property 'checkpoint_name'",
    ),
    "latest reference of nothing": (
        {"restore": {"checkpoints": [{"typ": "baseten_latest_checkpoint"}]}},
        "at '/restore/checkpoints/0': missing property 'project_name'",
    ),
    "unknown reference field": (
        {"restore": {"checkpoints": [{**NAMED, "step": 5}]}},
        "at '/restore/checkpoints/0': additional properties 'step' not allowed",
    ),
    "reference escaping the folder": (
        {"restore": {"checkpoints": [{**NAMED, "checkpoint_name": ".."}]}},
        "at '/restore/checkpoints/0/checkpoint_name'",
    ),
    "negative grace period": ({"terminationGracePeriodSeconds": -5}, "at '/terminationGracePeriodSeconds'"),
    "metrics port out of range": ({"ckptd": {"metricsPort": 70000}}, "at '/ckptd/metricsPort': maximum"),
    "unknown startup probe path": ({"ckptd": {"startupProbe": {"path": "/"}}}, "at '/ckptd/startupProbe/path'"),
}

TEMPLATE_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "restore inside checkpoints": (
        {"restore": {"enabled": True, "path": "/mnt/checkpoints/loaded"}},
        "restore.path (/mnt/checkpoints/loaded) and checkpoints.path (/mnt/checkpoints) must be separate folders",
    ),
    "checkpoints inside restore": (
        {"restore": {"enabled": True, "path": "/mnt"}},
        "ckptd would upload what it restored",
    ),
    "same folder twice": ({"restore": {"enabled": True, "path": "/mnt/checkpoints/"}}, "must be separate folders"),
    "storage in ckptd.config": ({"ckptd": {"config": {"storage": "s3://x"}}}, "ckptd.config.storage: the chart sets"),
    "references in ckptd.config": (
        {"ckptd": {"config": {"load_checkpoint_config": {"enabled": True}}}},
        "ckptd.config.load_checkpoint_config: the chart sets this one",
    ),
    "PyTorchJob container renamed": (
        {"workload": {"kind": "PyTorchJob"}, "trainer": {"name": "trainer"}},
        'a PyTorchJob\'s training container must be named "pytorch"',
    ),
    "entrypoint mode without a command": (
        {"mode": "entrypoint", "trainer": {"command": [], "args": []}},
        "mode entrypoint: set trainer.command",
    ),
    "entrypoint command named like a ckptd command": (
        {"mode": "entrypoint", "trainer": {"command": ["ls", "-la"]}},
        'the command starts with "ls", which ckptd\'s entrypoint takes for its own command',
    ),
    "metrics on the leader's port": (
        {"ckptd": {"metricsPort": 29500}},
        "ckptd.metricsPort and workload.leaderPort are both 29500",
    ),
    "grace period shorter than the drain": (
        {"terminationGracePeriodSeconds": 60},
        "terminationGracePeriodSeconds (60) is shorter than ckptd.drainTimeoutSeconds (300)",
    ),
}


def _without_nulls(d: dict[str, Any]) -> dict[str, Any]:
    """A value of None stands for "not given": drop the key (Helm would keep a null)."""
    return {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def values_of(overrides: dict[str, Any]) -> dict[str, Any]:
    return _without_nulls(merged(BASE, overrides))


@pytest.mark.parametrize(("overrides", "message"), SCHEMA_REFUSALS.values(), ids=list(SCHEMA_REFUSALS))
def test_schema_refuses(overrides: dict[str, Any], message: str) -> None:
    values = values_of(overrides)
    with pytest.raises(helm_python.HelmValuesError) as refused:
        charts.chart().validate_schema(values)
    assert message in str(refused.value)
    # A release is refused the same way: nothing renders.
    with pytest.raises(helm_python.HelmValuesError, match="values don't meet the specifications"):
        charts.chart().render(values, name="demo")


@pytest.mark.parametrize(("overrides", "message"), TEMPLATE_REFUSALS.values(), ids=list(TEMPLATE_REFUSALS))
def test_chart_refuses_values_that_disagree(overrides: dict[str, Any], message: str) -> None:
    values = values_of(overrides)
    charts.chart().validate_schema(values)  # each value alone is fine
    with pytest.raises(helm_python.HelmRenderError) as refused:
        charts.chart().render(values, name="demo")
    assert message in str(refused.value)


def test_the_values_the_refusals_start_from_are_accepted() -> None:
    charts.chart().validate_schema(values_of({}))
    assert charts.render({})
