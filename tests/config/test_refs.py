"""Checkpoint references: the config file's mappings (the reference SDK's shape plus ckptd's best by a
metric), the `--load` text form, and the errors for what is neither."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, load
from daemon.config.refs import BEST, LATEST, NAMED, CheckpointRef, parse_refs

KIND = "unit"


@pytest.mark.parametrize(
    "value, expected",
    [
        ([{"typ": LATEST, "project_name": "p"}], [CheckpointRef(LATEST, project_name="p")]),
        ([{"typ": LATEST, "job_id": "j", "project_name": None}], [CheckpointRef(LATEST, job_id="j")]),  # SDK nulls
        (
            [{"typ": NAMED, "job_id": "j", "checkpoint_name": "checkpoint-20", "required": True}],
            [CheckpointRef(NAMED, job_id="j", checkpoint_name="checkpoint-20", required=True)],
        ),
        (
            [{"typ": BEST, "job_id": "j", "metric": "eval_loss"}],  # mode defaults to min, as `prune --mode`
            [CheckpointRef(BEST, job_id="j", metric="eval_loss", mode="min")],
        ),
        (
            [{"typ": BEST, "project_name": "p", "metric": "eval/accuracy", "mode": "max", "required": "yes"}],
            [CheckpointRef(BEST, project_name="p", metric="eval/accuracy", mode="max", required=True)],
        ),
        (None, []),
        ([], []),
    ],
)
def test_config_file_shape(value, expected):
    assert list(parse_refs(value)) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("job=j", [CheckpointRef(LATEST, job_id="j")]),
        ("project=p", [CheckpointRef(LATEST, project_name="p")]),
        ("project=p,job=j", [CheckpointRef(LATEST, project_name="p", job_id="j")]),
        (
            "job=j,checkpoint=checkpoint-20",
            [CheckpointRef(NAMED, job_id="j", checkpoint_name="checkpoint-20")],
        ),
        (
            "project=p,metric=eval_loss,mode=min",
            [CheckpointRef(BEST, project_name="p", metric="eval_loss", mode="min")],
        ),
        ("job=j,metric=eval_acc,mode=max", [CheckpointRef(BEST, job_id="j", metric="eval_acc", mode="max")]),
        ("job=j,metric=eval_loss", [CheckpointRef(BEST, job_id="j", metric="eval_loss", mode="min")]),
        ("job=j,required", [CheckpointRef(LATEST, job_id="j", required=True)]),
        ("job=j,required=true", [CheckpointRef(LATEST, job_id="j", required=True)]),
        ("job=j,required=false", [CheckpointRef(LATEST, job_id="j")]),
        (" job = j , required ", [CheckpointRef(LATEST, job_id="j", required=True)]),  # spaces around
        ("job_id=j,checkpoint_name=c", [CheckpointRef(NAMED, job_id="j", checkpoint_name="c")]),  # SDK names
        (
            "job=a;project=p,metric=eval_loss;job=b,checkpoint=checkpoint-5,required;",
            [
                CheckpointRef(LATEST, job_id="a"),
                CheckpointRef(BEST, project_name="p", metric="eval_loss", mode="min"),
                CheckpointRef(NAMED, job_id="b", checkpoint_name="checkpoint-5", required=True),
            ],
        ),
    ],
)
def test_text_form(text, expected):
    assert list(parse_refs(text)) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        # text: the bad part is named
        ("", "expected references such as job=J"),
        (" ; ", "got nothing"),
        ("; job=a", "reference 1 '': empty"),
        ("job=a;;job=b", "reference 2 '': empty"),
        ("job", "reference 1 'job': expected key=value, got 'job'"),
        ("job=a,,", "expected key=value, got ''"),
        ("=a", "expected key=value, got '=a'"),
        ("jobs=a", "unknown key 'jobs'; accepted: job, project, checkpoint, metric, mode, required"),
        ("job=a,job=b", "job given twice"),
        ("job=a,checkpoint=c,metric=m", "give one of them"),
        ("job=a,mode=max", "ckptd_best_checkpoint needs metric"),
        ("project=p,metric=eval_loss,mode=best", "expected one of min, max, got 'best'"),
        ("checkpoint=c", "baseten_named_checkpoint needs checkpoint_name and job_id"),
        ("project=p,checkpoint=c", "needs checkpoint_name and job_id"),
        ("job=../x", "reference 1 'job=../x': '../x' is not a safe name"),
        ("job=a,checkpoint=..", "checkpoint_name must be one folder name"),
        ("job=a,metric=1bad", "expected a metric name"),
        ("job=a,required=maybe", "expected true or false, got 'maybe'"),
        ("required", "baseten_latest_checkpoint needs project_name, job_id or both"),
        # config file
        ({"typ": LATEST, "job_id": "j"}, "expected a list of checkpoint references"),
        ([{"typ": "loops_checkpoint", "run_id": "r1", "checkpoint_name": "c", "target": "trainer"}],
         r"checkpoints\[0\].typ: loops_checkpoint \(a Baseten Loops run, run_id 'r1'\) is not supported"),
        ([{"typ": "nope", "job_id": "j"}], r"checkpoints\[0\].typ: expected baseten_latest_checkpoint, "
         r"baseten_named_checkpoint, ckptd_best_checkpoint, got 'nope'"),
        ([{"job_id": "j"}], r"checkpoints\[0\]: typ missing"),
        (["job=j"], r"checkpoints\[0\]: expected a mapping"),
        ([{"typ": LATEST, "job_id": "j", "run_id": "r"}], "unknown key 'run_id'"),
        ([{"typ": LATEST}], "needs project_name, job_id or both"),
        ([{"typ": LATEST, "job_id": "j", "checkpoint_name": "c"}], "takes no checkpoint_name"),
        ([{"typ": LATEST, "job_id": "j", "metric": "eval_loss"}], "takes no metric or mode"),
        ([{"typ": NAMED, "job_id": "j", "checkpoint_name": "c", "mode": "min"}], "takes no metric or mode"),
        ([{"typ": BEST, "job_id": "j"}], "ckptd_best_checkpoint needs metric"),
        ([{"typ": BEST, "metric": "eval_loss"}], "needs project_name, job_id or both"),
        ([{"typ": BEST, "job_id": "j", "metric": "eval_loss", "checkpoint_name": "c"}], "takes no checkpoint_name"),
        ([{"typ": BEST, "job_id": "j", "metric": ["eval_loss"]}], r"checkpoints\[0\]: expected a string"),
        ([{"typ": LATEST, "job_id": 123}], "expected a string, got"),
    ],
)  # fmt: skip
def test_errors_name_the_bad_part(value, message):
    with pytest.raises(ValueError, match=message):
        parse_refs(value)


def test_a_config_file_with_a_loops_checkpoint_is_refused_with_its_setting_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "load_checkpoint_config:\n  enabled: true\n  checkpoints:\n"
        "    - {typ: loops_checkpoint, run_id: r1, checkpoint_name: c, target: trainer}\n"
    )
    with pytest.raises(ConfigError, match=r"load_checkpoint_config.checkpoints.*loops_checkpoint.*not supported"):
        load({}, {}, str(path))


def test_best_reference_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "load_checkpoint_config:\n  enabled: true\n  checkpoints:\n"
        "    - {typ: ckptd_best_checkpoint, project_name: p, metric: eval_loss, mode: min, required: true}\n"
    )
    c = load({}, {}, str(path))
    assert c.checkpoints == (CheckpointRef(BEST, project_name="p", metric="eval_loss", mode="min", required=True),)
    assert c.checkpoints[0].describe() == "best checkpoint by eval_loss (min) of project=p"
