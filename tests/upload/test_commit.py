"""Commit rules (SPEC §4): the pure decisions, and the tracker driven through real writers' sequences."""

from __future__ import annotations

import pytest

from daemon.catalog.manifest import StoredFile
from daemon.config.schema import DEFAULT_MARKERS
from daemon.upload.commit import CheckpointTracker, expects_marker, is_marker, should_commit

KIND = "unit"

QUIET = 30.0


def stored(relpath: str, size: int = 10) -> StoredFile:
    return StoredFile(relpath, size, "0" * 64, f"training_projects/p/jobs/j/rank-0/{relpath}", f"etag-{relpath}")


def write(tracker: CheckpointTracker, now: float, *relpaths: str) -> None:
    """A writer producing files that the engine then stores: noticed, then stored."""
    for relpath in relpaths:
        tracker.noticed(relpath, now)
        tracker.stored(stored(relpath), now)


@pytest.fixture
def tracker() -> CheckpointTracker:
    return CheckpointTracker(DEFAULT_MARKERS, QUIET)


@pytest.mark.parametrize(
    "names, top_level, expected",
    [
        ([], False, False),
        (["model.safetensors", "config.json"], False, False),
        (["model.safetensors", "training_args.bin"], False, True),
        (["checkpoint-5/training_args.bin"], False, True),
        (["model.safetensors", "training_args.bin"], True, False),
        (["__0_0.distcp", "__1_0.distcp"], False, True),
        (["__0_0.distcp"], True, True),
        (["training_args.bin", "__0_0.distcp"], True, True),
        (["training_args.bin.bak", "distcp"], False, False),
    ],
)
def test_expects_marker(names, top_level, expected):
    assert expects_marker(iter(names), top_level=top_level) is expected


@pytest.mark.parametrize(
    "pending, marker_seen, marker_expected, quiet_for, final, expected",
    [
        (1, True, True, 99.0, True, None),
        (2, False, False, 99.0, True, None),
        (0, True, True, 0.0, False, "marker"),
        (0, True, False, 0.0, False, "marker"),
        (0, False, True, 99.0, True, None),
        (0, False, False, QUIET, False, "quiet"),
        (0, False, False, 99.0, True, "quiet"),
        (0, False, False, 29.9, True, "final"),
        (0, False, False, 29.9, False, None),
    ],
)
def test_should_commit(pending, marker_seen, marker_expected, quiet_for, final, expected):
    reason = should_commit(
        pending=pending,
        marker_seen=marker_seen,
        marker_expected=marker_expected,
        quiet_for=quiet_for,
        quiet_limit=QUIET,
        final=final,
    )
    assert reason == expected


@pytest.mark.parametrize(
    "pending, marker_seen, marker_expected, sharded, quiet_for, final, expected",
    [
        (1, False, True, True, 99.0, True, None),  # a share still storing
        (0, True, True, True, 0.0, False, "marker"),  # the coordinator's node
        (0, False, True, True, 0.0, False, "part"),  # DCP shards: the coordinator's .metadata names them
        (0, False, True, False, QUIET, False, "part"),  # other writers' shares: once quiet
        (0, False, True, False, 29.9, True, "part"),  # or at the trainer's successful exit
        (0, False, True, False, 29.9, False, None),
        (0, False, False, False, QUIET, False, "quiet"),  # no marker anywhere: as on one node
    ],
)
def test_should_commit_a_share_of_a_multi_node_checkpoint(
    pending, marker_seen, marker_expected, sharded, quiet_for, final, expected
):
    reason = should_commit(
        pending=pending,
        marker_seen=marker_seen,
        marker_expected=marker_expected,
        quiet_for=quiet_for,
        quiet_limit=QUIET,
        final=final,
        shared=True,
        sharded=sharded,
    )
    assert reason == expected


def test_a_node_of_a_multi_node_job_commits_its_dcp_shards_as_a_part():
    tracker = CheckpointTracker(DEFAULT_MARKERS, QUIET, shared=True)
    write(tracker, 0.0, "step-3/__2_0.distcp", "step-3/__3_0.distcp", "ckptd-notes.txt")
    assert tracker.due(0.0) == [("step-3", "part")]  # the root files commit per node, on quiet
    assert tracker.due(QUIET, final=False) == [(".", "quiet"), ("step-3", "part")]
    single = CheckpointTracker(DEFAULT_MARKERS, QUIET)
    write(single, 0.0, "step-3/__2_0.distcp")
    assert single.due(99.0, final=True) == []  # one node: shards without .metadata never commit


def test_hugging_face_checkpoint_commits_when_trainer_state_is_stored(tracker):
    write(tracker, 0.0, "checkpoint-5/training_args.bin", "checkpoint-5/model.safetensors", "checkpoint-5/optimizer.pt")
    assert tracker.due(100.0, final=True) == []
    write(tracker, 1.0, "checkpoint-5/trainer_state.json")
    assert tracker.due(1.0) == [("checkpoint-5", "marker")]
    assert [f.relpath for f in tracker.files("checkpoint-5")] == [
        "checkpoint-5/model.safetensors",
        "checkpoint-5/optimizer.pt",
        "checkpoint-5/trainer_state.json",
        "checkpoint-5/training_args.bin",
    ]
    assert tracker.committed("checkpoint-5", 2.0)
    assert tracker.due(3.0, final=True) == []
    assert tracker.uncommitted() == []
    last = tracker.last_commit
    assert (last.checkpoint, last.reason, last.at) == ("checkpoint-5", "marker", 2.0)


def test_interrupted_save_is_stored_but_never_committed(tracker):
    write(tracker, 0.0, "checkpoint-10/training_args.bin", "checkpoint-10/model.safetensors")
    assert tracker.due(1e9, final=True) == []
    assert tracker.uncommitted() == ["checkpoint-10"]
    assert tracker.last_commit is None


def test_dcp_checkpoint_waits_for_metadata(tracker):
    write(tracker, 0.0, "step-3/__0_0.distcp", "step-3/__1_0.distcp")
    assert tracker.due(1e9, final=True) == []
    write(tracker, 5.0, "step-3/.metadata")
    assert tracker.due(5.0) == [("step-3", "marker")]


def test_writer_without_marker_commits_when_quiet_or_at_the_end(tracker):
    write(tracker, 0.0, "ckpt/model.bin")
    write(tracker, 10.0, "ckpt/extra.bin")
    assert tracker.due(10.0 + QUIET - 0.1) == []
    assert tracker.due(10.0 + QUIET - 0.1, final=True) == [("ckpt", "final")]
    assert tracker.due(10.0 + QUIET) == [("ckpt", "quiet")]


def test_pending_file_blocks_commit_until_stored_or_dropped(tracker):
    write(tracker, 0.0, "checkpoint-1/trainer_state.json")
    tracker.noticed("checkpoint-1/model.safetensors", 1.0)
    assert tracker.due(1e9, final=True) == []
    assert tracker.pending_count() == 1
    tracker.dropped("checkpoint-1/model.safetensors", 2.0)
    assert tracker.due(2.0) == [("checkpoint-1", "marker")]
    assert tracker.pending_count() == 0


def test_checkpoint_whose_files_all_vanished_is_nothing_to_commit(tracker):
    tracker.noticed("checkpoint-2/model.bin", 0.0)
    assert tracker.uncommitted() == ["checkpoint-2"]
    tracker.dropped("checkpoint-2/model.bin", 1.0)
    assert tracker.due(1e9, final=True) == []
    assert tracker.uncommitted() == []


def test_file_changed_after_commit_uncommits_and_comes_due_again(tracker):
    write(tracker, 0.0, "checkpoint-1/model.bin", "checkpoint-1/trainer_state.json")
    tracker.due(0.0)
    assert tracker.committed("checkpoint-1", 0.0)
    tracker.noticed("checkpoint-1/model.bin", 5.0)
    assert tracker.uncommitted() == ["checkpoint-1"]
    assert tracker.due(5.0, final=True) == []
    tracker.stored(StoredFile("checkpoint-1/model.bin", 99, "1" * 64, "k", "e2"), 6.0)
    assert tracker.due(6.0) == [("checkpoint-1", "marker")]
    assert tracker.files("checkpoint-1")[0].size == 99


@pytest.mark.parametrize("meanwhile", ["noticed", "stored"])
def test_commit_is_refused_when_the_checkpoint_changed_while_its_manifest_was_written(tracker, meanwhile):
    write(tracker, 0.0, "checkpoint-1/model.bin", "checkpoint-1/trainer_state.json")
    assert tracker.due(0.0) == [("checkpoint-1", "marker")]
    if meanwhile == "noticed":
        tracker.noticed("checkpoint-1/late.bin", 1.0)
    else:
        write(tracker, 1.0, "checkpoint-1/late.bin")
    assert not tracker.committed("checkpoint-1", 2.0)
    assert tracker.uncommitted() == ["checkpoint-1"]
    assert tracker.last_commit is None
    write(tracker, 3.0, "checkpoint-1/late.bin")
    assert tracker.due(3.0) == [("checkpoint-1", "marker")]
    assert tracker.committed("checkpoint-1", 4.0)


def test_commit_without_due_is_refused(tracker):
    write(tracker, 0.0, "checkpoint-1/trainer_state.json")
    assert not tracker.committed("checkpoint-1", 0.0)
    assert not tracker.committed("never-seen", 0.0)


def test_root_pseudo_checkpoint_of_a_final_save_model_commits_at_exit(tracker):
    write(tracker, 0.0, "model.safetensors", "config.json", "training_args.bin")
    assert tracker.due(1.0, final=True) == [(".", "final")]


def test_checkpoints_are_independent_and_reported_in_name_order(tracker):
    write(tracker, 0.0, "checkpoint-2/trainer_state.json", "checkpoint-1/trainer_state.json")
    write(tracker, 0.0, "checkpoint-3/training_args.bin")
    assert tracker.due(0.0) == [("checkpoint-1", "marker"), ("checkpoint-2", "marker")]
    assert tracker.committed("checkpoint-2", 1.0)
    assert tracker.uncommitted() == ["checkpoint-1", "checkpoint-3"]


def test_user_markers_are_globs_on_the_file_name():
    tracker = CheckpointTracker(("*.done",), quiet_limit=QUIET)
    write(tracker, 0.0, "run/weights.bin")
    assert tracker.due(1.0) == []
    write(tracker, 1.0, "run/sub/epoch.done")
    assert tracker.due(1.0) == [("run", "marker")]


def test_metrics_are_kept_per_checkpoint(tracker):
    tracker.set_metrics("checkpoint-1", {"eval_loss": 0.5})  # parsed before the marker is reported stored
    assert tracker.due(0.0, final=True) == [] and tracker.uncommitted() == []
    write(tracker, 0.0, "checkpoint-1/trainer_state.json")
    assert tracker.metrics("checkpoint-1") == {"eval_loss": 0.5}
    assert tracker.metrics("checkpoint-9") == {}


def test_positional_construction_matches_the_settings():
    tracker = CheckpointTracker(("DONE",), 5.0)
    write(tracker, 0.0, "run/w.bin")
    assert tracker.due(5.0) == [("run", "quiet")]


def test_markers_match_the_file_name():
    assert is_marker("checkpoint-5/trainer_state.json", ("trainer_state.json", ".metadata"))
    assert is_marker("step-3/.metadata", ("trainer_state.json", ".metadata"))
    assert not is_marker("checkpoint-5/trainer_state.json.tmp", ("trainer_state.json",))


@pytest.mark.parametrize("reason_path", ["marker", "quiet", "final"])
def test_a_checkpoint_with_an_unstorable_file_never_commits(tracker, reason_path):
    files = {
        "marker": ("checkpoint-3/model.bin", "checkpoint-3/trainer_state.json"),
        "quiet": ("step-3/model.bin",),
        "final": ("step-3/model.bin",),
    }[reason_path]
    write(tracker, 0.0, *files)
    checkpoint = files[0].split("/")[0]
    tracker.unstorable(checkpoint, f"{checkpoint}/bad-\\xff.bin", 0.0)
    now = 1e9 if reason_path == "quiet" else 1.0
    assert tracker.due(now, final=reason_path == "final") == []
    assert tracker.uncommitted() == [checkpoint]
    assert tracker.unstorable_files() == [f"{checkpoint}/bad-\\xff.bin"]


def test_a_file_is_listed_only_once_its_manifest_is_written_and_until_it_is_withdrawn(tracker):
    write(tracker, 0.0, "checkpoint-1/model.bin", "checkpoint-1/trainer_state.json")
    assert not tracker.listed("checkpoint-1/model.bin")  # nothing committed yet: nothing to withdraw
    assert tracker.due(1.0) == [("checkpoint-1", "marker")]
    assert tracker.committed("checkpoint-1", 1.0)
    assert tracker.listed("checkpoint-1/model.bin")
    assert not tracker.listed("checkpoint-1/other.bin") and not tracker.listed("checkpoint-2/model.bin")
    tracker.noticed("checkpoint-1/model.bin", 2.0)  # rewritten: the manifest still names the old object
    assert tracker.listed("checkpoint-1/model.bin")
    tracker.withdrawn("checkpoint-1")
    assert not tracker.listed("checkpoint-1/model.bin") and not tracker.is_committed("checkpoint-1")
    tracker.stored(stored("checkpoint-1/model.bin"), 3.0)
    assert tracker.due(3.0) == [("checkpoint-1", "marker")]  # commits again once the new version is stored
