"""`ckptd prune`'s guards, run in-process on a file:// store: which retention settings count
(command line, environment), --all on a job whose daemon still runs, and Ctrl-C mid-prune."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from daemon import cli
from daemon.catalog import jobmeta, layout
from daemon.catalog import prune as catalog_prune
from daemon.catalog.manifest import StoredFile, build_manifest, write_manifest
from daemon.commands import prune
from daemon.storage.local import LocalStorage

KIND = "unit"

P, J = "proj", "job-1"
ENV = ("CKPTD_KEEP_LAST", "CKPTD_KEEP_BEST", "CKPTD_METRIC", "CKPTD_METRIC_MODE", "CKPTD_KEEP_EVERY_STEPS")


@pytest.mark.parametrize(
    ("source", "name", "whole_job", "keep_best_given", "used"),
    [
        ("default", "keep_last", True, False, True),
        ("default", "mode", False, False, True),
        ("flag", "keep_last", True, False, True),
        ("flag", "metric", False, False, True),
        ("setting", "keep_last", True, False, False),
        ("setting", "metric", True, True, False),
        ("setting", "metric", False, False, False),
        ("setting", "mode", False, False, False),
        ("setting", "metric", False, True, True),
        ("setting", "mode", False, True, True),
        ("setting", "keep_last", False, False, True),
        ("setting", "keep_best", False, True, True),
    ],
)
def test_rule_used_truth_table(source, name, whole_job, keep_best_given, used):
    assert prune.rule_used(source, name, whole_job, keep_best_given) is used


@pytest.mark.parametrize(
    ("statuses", "live"),
    [
        ([], []),
        ([jobmeta.RUNNING], [0]),
        ([jobmeta.COMPLETED, jobmeta.RUNNING], [1]),
        ([jobmeta.COMPLETED, jobmeta.FAILED, jobmeta.STOPPED], []),
    ],
)
def test_live_ranks_truth_table(statuses, live):
    assert prune.live_ranks([jobmeta.rank_status(r, status=s) for r, s in enumerate(statuses)]) == live


@pytest.fixture
def store(tmp_path, monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    # Configuring logs is process-wide and caches loggers: other tests capture logs in this process.
    monkeypatch.setattr(cli.logs, "configure", lambda *args, **kwargs: None)
    store = LocalStorage(tmp_path / "store")

    async def make() -> None:
        for name in ("checkpoint-10", "checkpoint-20"):
            key = layout.file_key(P, J, 0, f"{name}/model.bin")
            etag = await store.put(key, b"x" * 100)
            files = [StoredFile(f"{name}/model.bin", 100, "0" * 64, key, etag)]
            await write_manifest(store, build_manifest(P, J, 0, name, files, "m", {}))

    asyncio.run(make())
    return store


def ckptd(store: LocalStorage, *args: str) -> int:
    return cli.main(["prune", "--storage", store.url, "--project", P, "--job", J, "--log-level", "error", *args])


def stored(store: LocalStorage) -> list[str]:
    root = store.root / layout.job_prefix(P, J)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def set_status(store: LocalStorage, status: str) -> None:
    """The status object as `ckptd run` writes it (jobmeta.write_rank_status, from upload.publish)."""
    asyncio.run(jobmeta.write_rank_status(store, P, J, 0, status=status))


def test_all_refuses_a_job_still_running_and_deletes_nothing(store, capsys):
    set_status(store, jobmeta.RUNNING)
    before = stored(store)
    assert ckptd(store, "--all", "--yes") == 1
    err = capsys.readouterr().err
    assert "still running (rank 0)" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert stored(store) == before
    assert ckptd(store, "--all") == 5  # the plan is still shown: it deletes nothing


@pytest.mark.parametrize("status", [jobmeta.COMPLETED, jobmeta.FAILED, jobmeta.STOPPED])
def test_all_deletes_a_job_whose_daemon_ended(store, status):
    set_status(store, status)
    assert ckptd(store, "--all", "--yes") == 0
    assert stored(store) == []


def test_all_with_force_deletes_a_job_whose_status_says_running(store):
    set_status(store, jobmeta.RUNNING)
    assert ckptd(store, "--all", "--yes", "--force") == 0
    assert stored(store) == []


@pytest.mark.parametrize(
    ("env", "args", "code"),
    [
        ({"CKPTD_KEEP_LAST": "2"}, ["--all"], 5),
        ({"CKPTD_KEEP_BEST": "1", "CKPTD_METRIC": "eval_loss"}, ["--all"], 5),
        ({"CKPTD_METRIC_MODE": "max"}, ["--keep-last", "1"], 5),
        ({}, ["--all", "--keep-last", "1"], 2),  # on the command line it still contradicts --all
        ({}, ["--metric", "eval_loss", "--keep-last", "1"], 2),  # a flag that means nothing alone
        ({"CKPTD_KEEP_BEST": "1"}, ["--keep-last", "1"], 2),  # best by which metric?
    ],
)
def test_retention_settings_from_the_environment(store, monkeypatch, capsys, env, args, code):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert ckptd(store, *args, "--json") == code, capsys.readouterr().err
    if code == 5 and "--all" not in args:
        assert json.loads(capsys.readouterr().out)["rules"]["metric"] is None


def test_keep_best_from_the_environment_with_a_metric_flag(store, monkeypatch, capsys):
    monkeypatch.setenv("CKPTD_KEEP_BEST", "1")
    assert ckptd(store, "--metric", "eval_loss", "--json") in (1, 5)  # the metric is used (missing here: 1)
    assert "eval_loss" in capsys.readouterr().err


def test_ctrl_c_mid_prune_says_how_to_finish_and_prints_no_report(store, monkeypatch, capsys):
    reached = []

    async def interrupted(*args, **kwargs):
        reached.append(True)
        os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, as Ctrl-C sends it
        await asyncio.Event().wait()  # cancelled by the runner's SIGINT handler

    monkeypatch.setattr(catalog_prune, "execute", interrupted)
    assert ckptd(store, "--keep-last", "1", "--yes") == 130
    out, err = capsys.readouterr()
    assert reached and out == ""
    assert err.strip() == prune.INTERRUPTED
