"""`ckptd restore` and `ckptd run` end to end on a job made by `ckptd run` (two ranks, checkpoint-10..40
with eval_loss 0.9, 0.5, 0.7, 0.6, a tokenizer at the top of each rank's checkpoint folder; see
tests/commands/trained.py): best by a metric from `--load` and from a config file, root files, the
links the reference docs' code needs, clashes, and `BT_LOAD_CHECKPOINT_DIR` both ways."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from daemons import PREFIX, Daemon
from test_resolve import T0, commit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "commands"))
from trained import TrainedJob, make_job  # tests/commands is not a package

KIND = "integration"
PROBE = str(Path(__file__).resolve().parent / "reference_probe.py")
ROOT_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def job(s3_bucket, tmp_path) -> TrainedJob:
    return make_job(s3_bucket, tmp_path / "jobs")


def restored(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def expected(job: TrainedJob, rank: int, checkpoint: str) -> dict[str, str]:
    return {k: v for k, v in job.written[rank].items() if k.startswith(f"{checkpoint}/") or k in ROOT_FILES}


def restore(job: TrainedJob, out: Path, *args: str) -> tuple[int, dict | None, str]:
    done = job.cli("restore", "--restore-dir", str(out), "--json", *args)
    report = json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else None
    return done.returncode, report, done.stdout + done.stderr


def test_restore_load_best_by_metric_brings_root_files_and_links_for_get_last_checkpoint(job, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "loaded"
    code, report, logged = restore(
        job,
        out,
        "--job-id",
        "next",
        "--node-rank",
        "1",
        "--group-size",
        "2",
        "--load",
        "job=trained,metric=eval_loss,required",
    )
    assert code == 0, logged
    (entry,) = report["restored"]
    assert (entry["checkpoint"], entry["source_rank"], entry["root_files"]) == ("checkpoint-20", 1, 2)
    assert restored(out / "rank-1") == expected(job, 1, "checkpoint-20")  # rank 1's own bytes
    assert sorted(report["links"]) == ["checkpoint-20", *ROOT_FILES]
    # The reference docs' own code, on the folder itself:
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-20")
    assert os.path.realpath(out / "checkpoint-20") == str(out / "rank-1" / "checkpoint-20")
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"rank": 1}


@pytest.mark.parametrize(
    "load, checkpoint",
    [
        ("project=proj,metric=eval_loss,mode=max", "checkpoint-10"),
        ("project=proj,job=trained,metric=eval_loss,mode=min", "checkpoint-20"),
        ("job=trained", "checkpoint-40"),
        ("job=trained,checkpoint=checkpoint-30", "checkpoint-30"),
    ],
)
def test_load_forms(job, tmp_path, load, checkpoint):
    out = tmp_path / "loaded"
    code, report, logged = restore(job, out, "--load", load)
    assert code == 0, logged
    assert [e["checkpoint"] for e in report["restored"]] == [checkpoint]
    assert restored(out / "rank-0") == expected(job, 0, checkpoint)


def test_best_from_a_config_file(job, tmp_path):
    config = tmp_path / "c.yaml"
    ref = {"typ": "ckptd_best_checkpoint", "job_id": "trained", "metric": "eval_loss", "mode": "min"}
    config.write_text(yaml.safe_dump({"load_checkpoint_config": {"enabled": True, "checkpoints": [ref]}}))
    out = tmp_path / "loaded"
    code, report, logged = restore(job, out, "--config", str(config))
    assert code == 0, logged
    assert [e["checkpoint"] for e in report["restored"]] == ["checkpoint-20"]
    assert restored(out / "rank-0") == expected(job, 0, "checkpoint-20")


def test_a_metric_nobody_records_matches_nothing_and_says_so(job, tmp_path):
    code, report, logged = restore(job, tmp_path / "a", "--load", "job=trained,metric=eval_accuracy,mode=max")
    assert code == 0, logged
    assert report["missing"] == ["best checkpoint by eval_accuracy (max) of job=trained"]
    assert "matches nothing" in logged and "'eval_accuracy'" in logged and "eval_loss" in logged
    code, _, logged = restore(job, tmp_path / "b", "--load", "job=trained,metric=eval_accuracy,required")
    assert code == 3, logged
    assert "required best checkpoint by eval_accuracy (min) of job=trained matches nothing" in logged
    assert "recorded: epoch, eval_loss, global_step, loss" in logged
    assert not list((tmp_path / "b" / "rank-0").iterdir())


@pytest.mark.parametrize(
    "load, message",
    [
        ("job=trained,metric=eval_loss,mode=lowest", "reference 1 'job=trained,metric=eval_loss,mode=lowest': "),
        ("job=trained;jb=x", "reference 2 'jb=x': unknown key 'jb'"),
        ("job=trained,checkpoint=checkpoint-10,metric=eval_loss", "give one of them"),
    ],
)
def test_a_bad_load_is_a_configuration_error_naming_the_part(job, tmp_path, load, message):
    code, _, logged = restore(job, tmp_path / "loaded", "--load", load)
    assert code == 2 and message in logged and "--load" in logged, logged
    assert not (tmp_path / "loaded").exists()


async def test_root_files_of_two_jobs(job, tmp_path, s3_bucket):
    # Another job whose tokenizer.json differs: restoring both would make which one the trainer
    # reads an accident.
    async with s3_bucket.storage(PREFIX) as store:
        await commit(store, "proj", "other", 0, "checkpoint-5", {"trainer_state.json": b"{}"}, T0)
        await commit(store, "proj", "other", 0, ".", {"tokenizer.json": b'{"model": "wordpiece"}'}, T0)
        await commit(store, "proj", "same", 0, "checkpoint-7", {"trainer_state.json": b"{}"}, T0)
        await commit(store, "proj", "same", 0, ".", {"tokenizer.json": b'{"model": "bpe"}'}, T0)  # as trained's
    code, _, logged = restore(job, tmp_path / "clash", "--load", "job=trained;job=other")
    assert code == 2, logged
    assert "rank-0/tokenizer.json with different bytes" in logged
    assert not (tmp_path / "clash" / "rank-0" / "checkpoint-40").exists()
    code, report, logged = restore(job, tmp_path / "fine", "--load", "job=trained;job=same")
    assert code == 0, logged
    assert sorted(report["links"]) == ["checkpoint-40", "checkpoint-7", *ROOT_FILES]


def run_probe(job: TrainedJob, tmp_path: Path, name: str, *args: str) -> dict:
    """`ckptd run ARGS -- python reference_probe.py` as a new job of the project; what the probe saw."""
    folder = tmp_path / name
    folder.mkdir()
    argv = [
        "run",
        *job.storage_args,
        "--project",
        job.project,
        "--job-id",
        name,
        "--checkpoint-dir",
        str(folder / "ckpt"),
        "--restore-dir",
        str(folder / "loaded"),
        "--settle-time",
        "0.05",
        "--metrics-addr",
        "127.0.0.1:0",
        *args,
        "--",
        sys.executable,
        PROBE,
    ]
    daemon = Daemon(argv, {**job.env, "PROBE_OUT": str(folder / "probe.json")}, folder / "ckptd.log")
    try:
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()
    return json.loads((folder / "probe.json").read_text())


def test_run_gives_the_trainer_the_restore_folder_only_when_loading_is_enabled(job, tmp_path):
    seen = run_probe(job, tmp_path, "resumes", "--load", "project=proj,metric=eval_loss,mode=min")
    loaded = tmp_path / "resumes" / "loaded"
    assert seen["branch"] == "resume" and seen["checkpoint_dir"] == str(loaded)
    assert seen["last_checkpoint"] == str(loaded / "checkpoint-20")
    assert seen["real_path"] == str(loaded / "rank-0" / "checkpoint-20")
    assert seen["tokenizer_config"] == {"rank": 0}

    seen = run_probe(job, tmp_path, "fresh")  # no loading configured
    assert seen == {
        "branch": "not configured",
        "checkpoint_dir": None,
        "last_checkpoint": None,
        "real_path": None,
        "tokenizer_config": None,
    }

    seen = run_probe(job, tmp_path, "nothing", "--load", "job=nope")  # enabled, matches nothing
    assert (seen["branch"], seen["checkpoint_dir"]) == ("scratch", str(tmp_path / "nothing" / "loaded"))
