"""The key layout of SPEC §4: round trips, and refusal of anything that escapes."""

from __future__ import annotations

import os

import pytest

from daemon.catalog import layout
from daemon.catalog.layout import UnsafePath

KIND = "unit"

ROUND_TRIP = [
    "checkpoint-500/model.safetensors",
    "trainer_state.json",
    "step 3/with space/optimizer state.pt",
    "检查点-7/模型.bin",
    "ckpt-ü/naïve café/☃.json",
    "a/b/c/d/e/f/g/h/i/j/k/deep.distcp",
    "checkpoint-1/.metadata",
    "weird/name with #?&%+=.bin",
]


@pytest.mark.parametrize("relpath", ROUND_TRIP)
def test_path_key_path_round_trip(tmp_path, relpath):
    path = os.path.join(tmp_path, relpath)
    rel = layout.relpath_of(str(tmp_path), path)
    key = layout.file_key("proj", "job-1", 3, rel)
    assert key == f"training_projects/proj/jobs/job-1/rank-3/{relpath}"
    parsed = layout.parse_file_key(key)
    assert parsed == layout.FileKey("proj", "job-1", 3, relpath)
    assert layout.local_path(str(tmp_path), parsed.relpath) == path


@pytest.mark.parametrize(
    "relpath, checkpoint",
    [("checkpoint-500/model.bin", "checkpoint-500"), ("top.bin", "."), ("step-3/a/b.bin", "step-3")],
)
def test_checkpoint_of(relpath, checkpoint):
    assert layout.checkpoint_of(relpath) == checkpoint


@pytest.mark.parametrize(
    "relpath",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", ".", "..", "a\0b", "bad-\udcff-utf8"],
)
def test_unsafe_relative_paths_are_refused(tmp_path, relpath):
    with pytest.raises(UnsafePath):
        layout.file_key("p", "j", 0, relpath)
    with pytest.raises(UnsafePath):
        layout.local_path(str(tmp_path), relpath)


def test_paths_outside_the_folder_are_refused(tmp_path):
    with pytest.raises(UnsafePath):
        layout.relpath_of(str(tmp_path / "ckpt"), str(tmp_path / "other" / "f"))
    with pytest.raises(UnsafePath):
        layout.relpath_of(str(tmp_path), str(tmp_path))


@pytest.mark.parametrize(
    "key",
    [
        "training_projects/p/jobs/j/manifests/rank-0/checkpoint-1.json",
        "training_projects/p/jobs/j/job.json",
        "training_projects/p/jobs/j/rank-x/f",
        "training_projects/p/jobs/j/rank-01/f",
        "training_projects/p/jobs/j/rank-0/../../../../escape",
        "other/p/jobs/j/rank-0/f",
    ],
)
def test_non_file_keys_do_not_parse(key):
    assert layout.parse_file_key(key) is None


def test_metadata_keys():
    assert (
        layout.manifest_key("p", "j", 1, "checkpoint-20")
        == "training_projects/p/jobs/j/manifests/rank-1/checkpoint-20.json"
    )
    assert layout.manifest_key("p", "j", 0, "_root") != layout.manifest_key("p", "j", 0, ".")
    assert layout.manifest_key("p", "j", 0, ".") == "training_projects/p/jobs/j/manifests/rank-0/.json"
    assert layout.job_metadata_key("p", "j") == "training_projects/p/jobs/j/job.json"
    assert layout.rank_status_key("p", "j", 2) == "training_projects/p/jobs/j/status/rank-2.json"


@pytest.mark.parametrize(
    "name, ok",
    [
        ("job-1", True),
        ("检查点 7", True),
        (".", False),
        ("..", False),
        ("", False),
        ("a/b", False),
        ("/abs", False),
        ("a\0b", False),
        ("bad-\udcff", False),
        (None, False),
        (3, False),
    ],
)
def test_is_segment(name, ok):
    assert layout.is_segment(name) is ok
