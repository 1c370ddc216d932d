"""The PodMonitor scrapes the port ckptd serves on, and the PrometheusRule and the Grafana dashboard
are observability/'s alerts and dashboard themselves: one source, linked into the chart, not copied."""

from __future__ import annotations

import json
import os

import charts
import pytest
import yaml
from charts import ROOT, pod_template, render

KIND = "integration"

ALL_ON = {"monitoring": {k: {"enabled": True} for k in ("podMonitor", "prometheusRule", "dashboard")}}


@pytest.mark.parametrize("name", ["alerts.yaml", "dashboard.json"])
def test_chart_files_are_links_to_observability(name: str) -> None:
    linked = charts.CHART / "files" / name
    assert linked.is_symlink(), f"{linked} must link to observability/{name}, not copy it"
    assert linked.resolve() == (ROOT / "observability" / name).resolve()


def test_prometheus_rule_holds_the_alerts_groups() -> None:
    rule = charts.one(render(ALL_ON), "PrometheusRule")
    source = yaml.safe_load((ROOT / "observability" / "alerts.yaml").read_text())
    assert rule["spec"] == {"groups": source["groups"]}
    # Prometheus templates in annotations pass through Helm untouched.
    annotations = [r["annotations"]["summary"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any("{{ $labels.job_id }}" in a for a in annotations)


def test_prometheus_rule_carries_the_labels_prometheus_selects_by() -> None:
    docs = render({"monitoring": {"prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}}}})
    assert charts.one(docs, "PrometheusRule")["metadata"]["labels"]["release"] == "prometheus"


def test_dashboard_config_map_is_the_dashboard() -> None:
    cm = charts.one([d for d in render(ALL_ON) if d["metadata"]["name"].endswith("-dashboard")], "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert json.loads(text) == json.loads((ROOT / "observability" / "dashboard.json").read_text())
    assert len(text.encode()) < 1 << 20  # a ConfigMap holds at most 1 MiB


def test_dashboard_may_go_to_grafanas_namespace() -> None:
    docs = render({"monitoring": {"dashboard": {"enabled": True, "namespace": "grafana"}}})
    dashboards = [d for d in docs if d["metadata"]["name"].endswith("-dashboard")]
    assert [d["metadata"].get("namespace") for d in dashboards] == ["grafana"]


@pytest.mark.parametrize("mode", ["sidecar", "entrypoint"])
@pytest.mark.parametrize("kind", ["Job", "PyTorchJob", "JobSet"])
def test_pod_monitor_selects_the_pods_and_their_metrics_port(mode: str, kind: str) -> None:
    docs = render({**ALL_ON, "mode": mode, "workload": {"kind": kind}})
    monitor = charts.one(docs, "PodMonitor")
    template = pod_template(docs)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    spec = template["spec"]
    # Prometheus discovers the ports of init containers too (__meta_kubernetes_pod_container_init).
    declared = [p for c in [*spec.get("initContainers", []), *spec["containers"]] for p in c.get("ports", [])]
    assert [p["containerPort"] for p in declared if p["name"] == endpoint["port"]] == [9477]


def test_monitoring_is_off_by_default() -> None:
    kinds = {d["kind"] for d in render({})}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    assert not [d for d in render({}) if d["metadata"]["name"].endswith("-dashboard")]


def test_links_resolve_inside_the_repository() -> None:
    """A link out of the checkout would break in CI and in a packaged chart."""
    for link in (charts.CHART / "files").iterdir():
        target = os.path.realpath(link)
        assert target.startswith(str(ROOT.resolve()) + os.sep) and os.path.isfile(target), link
