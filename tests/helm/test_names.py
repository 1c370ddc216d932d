"""Whatever the release is called, every name the chart makes is one Kubernetes accepts, and the host
names the pods get (leader address included) are DNS labels: at most 63 characters, no dot."""

from __future__ import annotations

import re

import charts
import helm_python
import pytest
from charts import env_of, pod_template, render

KIND = "integration"

DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # RFC 1035: Service names, pod host names
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# Release names Helm accepts (at most 53 characters), at their corners.
RELEASES = {
    "short": "a",
    "digit-first": "7b-finetune",
    "dotted": "team.llm.v2",
    "holds-chart-name": "my-ckptd-run",
    "longest": "r" * 24 + "-" + "x" * 28,
}


def host_names(doc: dict, nodes: int) -> list[str]:
    """The host names the workload's controller gives the first and the last pod."""
    name = doc["metadata"]["name"]
    last = nodes - 1
    if doc["kind"] == "Job":
        return [f"{name}-0", f"{name}-{last}"]
    if doc["kind"] == "PyTorchJob":
        return [f"{name}-worker-0", f"{name}-worker-{last}"]
    rjob = doc["spec"]["replicatedJobs"][0]["name"]
    return [f"{name}-{rjob}-0-0", f"{name}-{rjob}-0-{last}"]


@pytest.mark.parametrize("release", RELEASES.values(), ids=list(RELEASES))
@pytest.mark.parametrize("kind", ["Job", "PyTorchJob", "JobSet"])
@pytest.mark.parametrize("nodes", [1, 12, 100000])
def test_names_and_host_names_fit(release: str, kind: str, nodes: int) -> None:
    helm_python.validate_release_name(release)
    docs = render({"workload": {"kind": kind, "nodes": nodes}, "monitoring": {"podMonitor": {"enabled": True}}},
                  name=release)  # fmt: skip
    for doc in docs:
        name = doc["metadata"]["name"]
        assert DNS_SUBDOMAIN.fullmatch(name) and len(name) <= 63, (doc["kind"], name)
        for key, value in doc["metadata"].get("labels", {}).items():
            assert len(value) <= 63, (doc["kind"], key, value)
    workload = charts.workload(docs)
    for host in host_names(workload, nodes):
        assert DNS_LABEL.fullmatch(host) and len(host) <= 63, host
    for svc in charts.by_kind(docs, "Service"):
        assert DNS_LABEL.fullmatch(svc["metadata"]["name"])
    leader = env_of(pod_template(docs)["spec"]["containers"][0])["BT_LEADER_ADDR"]
    assert leader.split(".")[0] == host_names(workload, nodes)[0]


def test_a_short_release_keeps_its_whole_name() -> None:
    docs = render({"workload": {"nodes": 4}}, name="llama")
    assert charts.workload(docs)["metadata"]["name"] == "llama-ckptd"
    assert charts.workload(render({}, name="ckptd-llama"))["metadata"]["name"] == "ckptd-llama"


def test_full_name_override_is_made_a_dns_label() -> None:
    docs = render({"fullnameOverride": "Team_Run.7"})
    assert charts.workload(docs)["metadata"]["name"] == "team-run-7"
    assert charts.one(docs, "ConfigMap")["metadata"]["name"] == "team-run-7-config"


def test_pod_monitor_name_holds_ckptd_for_the_alerts() -> None:
    """CkptdDown matches up{job=~".*ckptd.*"}; a PodMonitor's job is <namespace>/<its name>."""
    for values in ({}, {"fullnameOverride": "pretrain"}):
        docs = render({**values, "monitoring": {"podMonitor": {"enabled": True}}})
        assert "ckptd" in charts.one(docs, "PodMonitor")["metadata"]["name"]
