"""observability/: the alert rules pass promtool and their own unit tests, every alert is tested both
firing and quiet, and the rules and the Grafana dashboard use only metrics that ckptd exposes. The
dashboard's queries are evaluated by promtool against series shaped like ckptd's: each returns data
for the selected job and nothing for another."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from daemon import metrics

KIND = "integration"

REPO = Path(__file__).resolve().parent.parent
OBS = REPO / "observability"
ALERTS = OBS / "alerts.yaml"
ALERT_TESTS = OBS / "alerts_test.yaml"
DASHBOARD = OBS / "dashboard.json"

METRIC_NAME = re.compile(r"ckptd_[a-z_]+")
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count", "_created")}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install Debian's prometheus package (apt-get install prometheus)")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def exposed_names() -> set[str]:
    """Every sample name ckptd's registry can expose, labelled families with no children included."""
    names = set()
    for family in metrics.REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard()["panels"] for target in panel.get("targets", [])]


# ---- alert rules


def test_alert_rules_pass_promtool_check(promtool):
    out = run_promtool(promtool, "check", "rules", ALERTS.name, cwd=OBS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_alert_rules_pass_their_unit_tests(promtool):
    out = run_promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=OBS)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_the_one_group_is_named_ckptd():
    assert [g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]] == ["ckptd"]


def test_every_alert_is_tested_firing_and_quiet():
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    fired, quiet = set(), set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
            for alert in case.get("exp_alerts") or []:
                assert set(alert["exp_annotations"]) == {"summary", "description"}, case
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names, f"alerts without a firing case: {names - fired}; unknown: {fired - names}"
    assert quiet == names, f"alerts without a quiet case: {names - quiet}; unknown: {quiet - names}"


def test_every_alert_has_a_severity_and_says_what_to_do():
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "CkptdUploadsBehind",
        "CkptdStoreUnreachable",
        "CkptdUploadFailed",
        "CkptdNoRecentCommit",
        "CkptdCheckpointDiskFilling",
        "CkptdDown",
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
        assert "{{ $labels.instance }}" in rule["annotations"]["description"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 200, f"{rule['alert']}: say what to check and do"


def test_alerts_use_only_metrics_ckptd_exposes():
    exposed = exposed_names()
    used = set()
    for rule in alert_rules():
        used.update(METRIC_NAME.findall(rule["expr"] + json.dumps(rule["annotations"])))
    assert used, "no ckptd metric found in the rules"
    assert used <= exposed, f"not exposed by daemon.metrics: {sorted(used - exposed)}"


def test_exposed_names_cover_the_metric_types():
    """The allowed-name set is what a scrape can show: counters only with _total, histograms by series."""
    exposed = exposed_names()
    assert {
        "ckptd_uploaded_bytes_total",
        "ckptd_upload_failures_total",
        "ckptd_upload_lag_seconds_bucket",
        "ckptd_upload_lag_seconds_count",
        "ckptd_info",
        "ckptd_trainer_running",
    } <= exposed
    assert not {"ckptd_uploaded_bytes", "ckptd_upload_lag_seconds", "ckptd_info_total"} & exposed


# ---- dashboard


def test_dashboard_loads_with_unique_panel_ids_and_its_variables():
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job_id"]["query"] == "label_values(ckptd_info, job_id)"
    assert variables["rank"]["query"].startswith("label_values(ckptd_info")
    assert variables["rank"]["query"].endswith(", rank)")
    for panel, target in dashboard_targets():
        assert panel["datasource"]["uid"] == target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_has_the_panels_operators_need():
    exprs = " ".join(target["expr"] for _, target in dashboard_targets())
    for needed in (
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
        "ckptd_upload_lag_seconds_bucket",
        "ckptd_oldest_pending_age_seconds",
        "ckptd_pending_files",
        "ckptd_pending_bytes",
        "rate(ckptd_uploaded_bytes_total",
        "rate(ckptd_uploaded_files_total",
        "ckptd_upload_retries_total",
        "ckptd_upload_failures_total",
        "ckptd_files_skipped_total",
        "ckptd_rescan_found_files_total",
        "ckptd_checkpoints_committed_total",
        "ckptd_last_committed_step",
        "time() - (ckptd_last_commit_timestamp_seconds",
        "ckptd_restore_bytes_total",
        "ckptd_restore_duration_seconds",
        "ckptd_checkpoint_dir_free_bytes",
        "ckptd_trainer_running",
    ):
        assert needed in exprs, needed


def test_dashboard_uses_only_metrics_ckptd_exposes():
    exposed = exposed_names()
    texts = [target["expr"] for _, target in dashboard_targets()]
    texts += [v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    used = {name for text in texts for name in METRIC_NAME.findall(text)}
    assert used <= exposed, f"not exposed by daemon.metrics: {sorted(used - exposed)}"
    # Every family ckptd exposes is on the dashboard (the _created series are not worth a panel).
    families = {f.name for f in metrics.REGISTRY.collect()}
    shown = {f for f in families if any(name.startswith(f) for name in used)}
    assert shown == families, f"families with no panel: {sorted(families - shown)}"


# The dashboard's variables as Grafana would substitute them for one job.
def substitute(expr: str, job_id: str) -> str:
    return (
        expr.replace("$__rate_interval", "2m")
        .replace("$__range", "1h")
        .replace("$job_id", job_id)
        .replace("$rank", ".*")
    )


def series_like_ckptd(instance: str, job_id: str, rank: str) -> list[dict]:
    """promtool input series for every metric of daemon.metrics, as one scraped ckptd would show them."""
    labels = f'job="ckptd", instance="{instance}"'
    out = []
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name = metric._name
        if metric is metrics.INFO:
            selector = f'{labels}, version="0.0.0", project="p", job_id="{job_id}", rank="{rank}"'
            out.append({"series": f"{name}{{{selector}}}", "values": "1x60"})
            continue
        extra = "".join(f', {label}="Some{label.title()}"' for label in metric._labelnames)
        if isinstance(metric, Counter):
            out.append({"series": f"{name}_total{{{labels}{extra}}}", "values": "0+1x60"})
        elif isinstance(metric, Histogram):
            for bound in [*metric._upper_bounds[:-1], "+Inf"]:
                out.append({"series": f'{name}_bucket{{{labels}, le="{bound}"}}', "values": "0+1x60"})
            out.append({"series": f"{name}_count{{{labels}}}", "values": "0+1x60"})
            out.append({"series": f"{name}_sum{{{labels}}}", "values": "0+10x60"})
        else:
            assert isinstance(metric, Gauge)
            out.append({"series": f"{name}{{{labels}}}", "values": "1x60"})
    for family in metrics.BACKLOG.describe():  # gauges computed at scrape time
        out.append({"series": f"{family.name}{{{labels}}}", "values": "1x60"})
    return out


def test_every_dashboard_query_returns_data_for_the_selected_job_only(promtool, tmp_path):
    """Each query becomes an alert `count(<query>) > 0` (fires, with no labels, iff the query returns
    anything), evaluated by promtool over series shaped like ckptd's."""
    targets = dashboard_targets()
    rules = []
    for panel, target in targets:
        for job_id in ("job-a", "no-such-job"):
            name = f"panel_{panel['id']}_{target['refId']}_{job_id.replace('-', '_')}"
            rules.append({"alert": name, "expr": f"count({substitute(target['expr'], job_id)}) > 0"})
    (tmp_path / "dashboard_rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    fires = [{"exp_labels": {}}]
    cases = [
        {"eval_time": "30m", "alertname": r["alert"], "exp_alerts": [] if "no_such_job" in r["alert"] else fires}
        for r in rules
    ]
    tests = {
        "rule_files": ["dashboard_rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series_like_ckptd("10.0.0.1:9477", "job-a", "0"),
                "alert_rule_test": cases,
            }
        ],
    }
    (tmp_path / "dashboard_test.yaml").write_text(yaml.safe_dump(tests))

    checked = run_promtool(promtool, "check", "rules", "dashboard_rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, "a dashboard query is not valid PromQL:\n" + checked.stdout + checked.stderr
    tested = run_promtool(promtool, "test", "rules", "dashboard_test.yaml", cwd=tmp_path)
    assert tested.returncode == 0, "a dashboard query returned no data, or ignored $job_id:\n" + tested.stdout
    assert len(targets) >= 20
