"""Bad-input matrix, numeric settings (issue 10): `.nan`, `.inf` and `-.inf` from YAML, "nan" and
"inf" from flags and variables, values that overflow later, booleans (an int in Python), negative or
zero where that means nothing, and units the schema does not know. Each is refused with exit 2
before anything starts, naming the setting and where the value came from.

Before the fix, `drain_timeout: .nan` and `settle_time: .inf` loaded, and `bandwidth_limit: .inf`
ended in an OverflowError traceback; test_cli_refusals.py runs those as real processes.
"""

from __future__ import annotations

import pytest
from refusals import FILE, assert_refused, case

from daemon.config import load

KIND = "unit"

NON_FINITE = [
    case("yaml-nan-drain_timeout", "drain_timeout", config="drain_timeout: .nan\n", source=FILE),
    case("yaml-inf-settle_time", "upload.settle_time", config="upload: {settle_time: .inf}\n", source=FILE),
    case("yaml-inf-bandwidth_limit", "upload.bandwidth_limit", config="upload: {bandwidth_limit: .inf}\n", source=FILE),
    case("yaml-neg-inf-quiet_commit", "upload.quiet_commit", config="upload: {quiet_commit: -.inf}\n", source=FILE),
    case("yaml-nan-rescan_interval", "upload.rescan_interval", config="upload: {rescan_interval: .NaN}\n", source=FILE),
    case("yaml-inf-stop_timeout", "stop_timeout", config="stop_timeout: .Inf\n", source=FILE),
    case("yaml-nan-part_size", "upload.part_size", config="upload: {part_size: .nan}\n", source=FILE),
    case(
        "yaml-inf-multipart_threshold",
        "upload.multipart_threshold",
        config="upload: {multipart_threshold: .inf}\n",
        source=FILE,
    ),
    case("yaml-nan-min_free_bytes", "upload.min_free_bytes", config="upload: {min_free_bytes: .nan}\n", source=FILE),
    case("yaml-inf-concurrency", "upload.concurrency", config="upload: {concurrency: .inf}\n", source=FILE),
    case("yaml-nan-parts_in_flight", "upload.parts_in_flight", config="upload: {parts_in_flight: .nan}\n", source=FILE),
    case(
        "yaml-inf-max_connections", "storage.max_connections", config="storage: {max_connections: .inf}\n", source=FILE
    ),
    case("yaml-neg-inf-nice", "upload.nice", config="upload: {nice: -.inf}\n", source=FILE),
    case("yaml-nan-node_rank", "node_rank", config="node_rank: .nan\n", source=FILE),
    case("yaml-inf-group_size", "group_size", config="group_size: .inf\njob_id: j\n", source=FILE),
    case("flag-nan-drain_timeout", "drain_timeout", args=["--drain-timeout", "nan"], source="--drain-timeout"),
    case("flag-inf-settle_time", "upload.settle_time", args=["--settle-time", "inf"], source="--settle-time"),
    case(
        "flag-neg-inf-bandwidth", "upload.bandwidth_limit", args=["--bandwidth-limit=-inf"], source="--bandwidth-limit"
    ),
    case(
        "flag-infinity-quiet_commit",
        "upload.quiet_commit",
        args=["--quiet-commit", "Infinity"],
        source="--quiet-commit",
    ),
    case("flag-nan-stop_timeout", "stop_timeout", args=["--stop-timeout", "NaN"], source="--stop-timeout"),
    case("env-nan-settle_time", "upload.settle_time", env={"CKPTD_SETTLE_TIME": "nan"}, source="$CKPTD_SETTLE_TIME"),
    case(
        "env-inf-bandwidth",
        "upload.bandwidth_limit",
        env={"CKPTD_BANDWIDTH_LIMIT": "inf"},
        source="$CKPTD_BANDWIDTH_LIMIT",
    ),
    case("env-neg-inf-drain", "drain_timeout", env={"CKPTD_DRAIN_TIMEOUT": "-inf"}, source="$CKPTD_DRAIN_TIMEOUT"),
    case(
        "env-inf-concurrency",
        "upload.concurrency",
        env={"CKPTD_UPLOAD_CONCURRENCY": "inf"},
        source="$CKPTD_UPLOAD_CONCURRENCY",
    ),
    case("env-nan-node_rank", "node_rank", env={"BT_NODE_RANK": "nan"}, source="$BT_NODE_RANK"),
    case(
        "env-dot-inf-min_free",
        "upload.min_free_bytes",
        env={"CKPTD_MIN_FREE_BYTES": ".inf"},
        source="$CKPTD_MIN_FREE_BYTES",
    ),
]

OUT_OF_RANGE = [
    case(
        "yaml-float-overflow-bandwidth",
        "upload.bandwidth_limit",
        config="upload: {bandwidth_limit: 1.0e+400}\n",
        source=FILE,
    ),
    case(
        "flag-1e400-bandwidth",
        "upload.bandwidth_limit",
        args=["--bandwidth-limit", "1e400"],
        source="--bandwidth-limit",
    ),
    case("part_size-over-5GiB", "upload.part_size", args=["--part-size", "6GiB"], source="--part-size"),
    case(
        "multipart_threshold-over-5GiB",
        "upload.multipart_threshold",
        config="upload: {multipart_threshold: 6GiB}\n",
        source=FILE,
    ),
    case(
        "min_free_bytes-2PiB",
        "upload.min_free_bytes",
        env={"CKPTD_MIN_FREE_BYTES": "2048TiB"},
        source="$CKPTD_MIN_FREE_BYTES",
    ),
    case("drain_timeout-400-digits", "drain_timeout", config="drain_timeout: 1" + "0" * 400 + "\n", source=FILE),
    case("quiet_commit-31-days", "upload.quiet_commit", config="upload: {quiet_commit: 31d}\n", source=FILE),
    case("group_size-million", "group_size", args=["--group-size", "1000000", "--job-id", "j"], source="--group-size"),
    case(
        "concurrency-100000",
        "upload.concurrency",
        args=["--upload-concurrency", "100000"],
        source="--upload-concurrency",
    ),
    case("cpu_affinity-100M-cpus", "upload.cpu_affinity", config="upload: {cpu_affinity: 0-100000000}\n", source=FILE),
    case("yaml-true-concurrency", "upload.concurrency", config="upload: {concurrency: true}\n", source=FILE),
    case("yaml-yes-drain_timeout", "drain_timeout", config="drain_timeout: yes\n", source=FILE),
    case("yaml-false-part_size", "upload.part_size", config="upload: {part_size: false}\n", source=FILE),
    case("yaml-true-in-cpu_affinity", "upload.cpu_affinity", config="upload: {cpu_affinity: [true]}\n", source=FILE),
    case("negative-settle_time", "upload.settle_time", config="upload: {settle_time: -1}\n", source=FILE),
    case("negative-stop_timeout", "stop_timeout", args=["--stop-timeout=-5s"], source="--stop-timeout"),
    case("zero-quiet_commit", "upload.quiet_commit", config="upload: {quiet_commit: 0}\n", source=FILE),
    case(
        "subsecond-rescan_interval",
        "upload.rescan_interval",
        args=["--rescan-interval", "500ms"],
        source="--rescan-interval",
    ),
    case(
        "zero-concurrency",
        "upload.concurrency",
        env={"CKPTD_UPLOAD_CONCURRENCY": "0"},
        source="$CKPTD_UPLOAD_CONCURRENCY",
    ),
    case("negative-parts_in_flight", "upload.parts_in_flight", config="upload: {parts_in_flight: -1}\n", source=FILE),
    # Rounded down it would be 0, which means unlimited: the opposite of what was asked.
    case("half-a-byte-bandwidth", "upload.bandwidth_limit", config="upload: {bandwidth_limit: 0.5}\n", source=FILE),
    case(
        "zero-max_connections",
        "storage.max_connections",
        args=["--s3-max-connections", "0"],
        source="--s3-max-connections",
    ),
    case("rate-unit-bandwidth", "upload.bandwidth_limit", config="upload: {bandwidth_limit: 10MiB/s}\n", source=FILE),
    case("words-settle_time", "upload.settle_time", args=["--settle-time", "5 minutes"], source="--settle-time"),
    case("bad-unit-part_size", "upload.part_size", config="upload: {part_size: 64MiBs}\n", source=FILE),
    case("fraction-nice", "upload.nice", config="upload: {nice: 1.5}\n", source=FILE),
]


@pytest.mark.parametrize("args, env, config, setting, source", NON_FINITE + OUT_OF_RANGE)
def test_bad_number_exits_2_naming_the_setting_and_its_source(
    tmp_path, monkeypatch, capsys, args, env, config, setting, source
):
    assert_refused(tmp_path, monkeypatch, capsys, args, env, config, setting, source)


def test_non_finite_values_say_so(tmp_path, monkeypatch, capsys):
    line = assert_refused(tmp_path, monkeypatch, capsys, [], {}, "drain_timeout: .nan\n", "drain_timeout", FILE)
    assert "must be a finite duration" in line


def test_every_numeric_setting_is_covered_for_nan_or_inf():
    covered = {p.values[3] for p in NON_FINITE}
    numeric = {
        "drain_timeout", "stop_timeout", "node_rank", "group_size", "storage.max_connections", "upload.settle_time",
        "upload.quiet_commit", "upload.rescan_interval", "upload.bandwidth_limit", "upload.part_size",
        "upload.multipart_threshold", "upload.min_free_bytes", "upload.concurrency", "upload.parts_in_flight",
        "upload.nice",
    }  # fmt: skip
    assert numeric <= covered
    assert len(NON_FINITE) + len(OUT_OF_RANGE) >= 50


def test_values_at_the_bounds_are_accepted(tmp_path):
    """The refusals above are not over-eager: the edges of each range still load."""

    path = tmp_path / "ok.yaml"
    path.write_text(
        "drain_timeout: 0\nstop_timeout: 30d\nnode_rank: 99999\ngroup_size: 100000\njob_id: j\n"
        "upload: {settle_time: 0, quiet_commit: 1, rescan_interval: 1s, bandwidth_limit: 1.5, part_size: 5GiB,\n"
        "         multipart_threshold: 5GiB, min_free_bytes: 1024TiB, cpu_affinity: 8191, concurrency: 256}\n"
        "# a comment-only tail is fine\n"
    )
    c = load({}, {"HOME": str(tmp_path)}, str(path))
    assert (c.drain_timeout, c.stop_timeout, c.settle_time, c.quiet_commit) == (0.0, 30 * 86400.0, 0.0, 1.0)
    assert (c.node_rank, c.group_size, c.upload_concurrency) == (99999, 100000, 256)
    assert (c.bandwidth_limit, c.part_size, c.multipart_threshold) == (1, 5 << 30, 5 << 30)
    assert (c.min_free_bytes, c.cpu_affinity) == (1 << 50, (8191,))
    comments_only = tmp_path / "comments.yaml"
    comments_only.write_text("# no settings yet\n")
    assert load({}, {"HOME": str(tmp_path)}, str(comments_only)).project == "default"
