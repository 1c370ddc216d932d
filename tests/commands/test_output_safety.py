"""What the browsing commands print survives hostile data and a hostile stdout: a reader that goes
away, a full disk, NaN, lone surrogates, rich markup and control characters in names, metrics
named like columns, wrong-typed rank status. The CLI runs as a user runs it, on a file:// store."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daemons import base_env

from daemon.catalog import layout
from daemon.catalog import manifest as M
from daemon.commands import ls, show
from daemon.storage.local import LocalStorage

KIND = "integration"

P, J = "proj", "job"
HOSTILE_METRICS = {"eval_loss": float("nan"), "grad": float("inf"), "step": 999, "name": "x", "[/y]": 1, "\ud800": 2}


async def _fill(root: Path, jobs: int, metrics: dict[str, Any], status: dict[str, Any] | None) -> None:
    async with LocalStorage(root) as storage:
        for j in range(jobs):
            job = J if j == 0 else f"job-{j:04d}"
            data = b"{}"
            key = layout.file_key(P, job, 0, "checkpoint-10/trainer_state.json")
            await storage.put(key, data)
            files = [M.StoredFile("checkpoint-10/trainer_state.json", len(data), "0" * 64, key, "e")]
            manifest = M.build_manifest(P, job, 0, "checkpoint-10", files, "save", {})
            # Written by hand, as another writer might: build_manifest would have cleaned the metrics.
            raw = {**manifest, "metrics": metrics}
            await storage.put(layout.manifest_key(P, job, 0, "checkpoint-10"), json.dumps(raw).encode())
        if status is not None:
            await storage.put(layout.rank_status_key(P, J, 0), json.dumps(status).encode())


def store(tmp_path: Path, jobs: int = 1, metrics: dict | None = None, status: dict | None = None) -> str:
    root = tmp_path / "store"
    asyncio.run(_fill(root, jobs, HOSTILE_METRICS if metrics is None else metrics, status))
    return f"file://{root}"


def ckptd(url: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "daemon", *args, "--storage", url]


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=base_env(), capture_output=True, text=True, timeout=60, **kw)


# -- the output functions themselves --------------------------------------------------------------


@pytest.mark.unit
def test_json_text_turns_non_finite_floats_into_null() -> None:
    data = {"a": [float("nan"), {"b": float("-inf")}], "c": 1.5}
    assert json.loads(show.json_text(data, "utf-8")) == {"a": [None, {"b": None}], "c": 1.5}


@pytest.mark.unit
@pytest.mark.parametrize("encoding", ["utf-8", "ascii", "latin-1"])
def test_json_text_is_valid_json_the_encoding_carries(encoding: str) -> None:
    data = {"\ud800": "é \U0001f600 \udcff"}
    text = show.json_text(data, encoding)
    text.encode(encoding)  # no UnicodeEncodeError
    assert json.loads(text) == data


@pytest.mark.unit
def test_json_text_refuses_what_json_has_no_type_for() -> None:
    with pytest.raises(TypeError):
        show.json_text({"a": object()}, "utf-8")


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, shown",
    [
        ("plain é ✓", "plain é ✓"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("two\nlines\r", "two\\nlines\\r"),
        ("\u202eevil", "\\u202eevil"),
        ("\ud800", "\\ud800"),
    ],
)
def test_printable_escapes_what_acts_on_a_terminal(text: str, shown: str) -> None:
    assert show.printable(text) == shown


@pytest.mark.unit
def test_rich_table_shows_markup_as_text() -> None:
    out = show._rich_table([["[/oops]", "[bold]b"]], ["[/y]", "x"], "[/t]")
    assert "[/oops]" in out and "[bold]b" in out and "[/y]" in out and "[/t]" in out


@pytest.mark.unit
def test_plain_table_keeps_one_line_per_row(capsys) -> None:
    show.print_table([{"n": "a\nb"}, {"n": "c"}], [("n", "name")])
    assert capsys.readouterr().out.splitlines() == ["name", "a\\nb", "c"]


@pytest.mark.unit
def test_a_metric_named_like_a_column_does_not_replace_it() -> None:
    row = {"name": "checkpoint-10", "step": 10, "size": 1, "committed": True, "uncommitted_ranks": []}
    shown = ls._display({**row, "metrics": {"step": 999, "name": "x", "eval_loss": 0.5}})
    assert (shown["name"], shown["step"], shown["metric:step"], shown["metric:name"]) == ("checkpoint-10", 10, 999, "x")
    assert (ls.metric_column("eval_loss"), ls.metric_column("step")) == ("eval_loss", "metric:step")


@pytest.mark.unit
def test_a_metric_named_like_a_column_sorts_by_its_prefixed_name() -> None:
    row = {"step": 10, "metrics": {"step": 999}}
    assert (ls._field(row, "step"), ls._field(row, "metric:step")) == (10, 999)


# -- the CLI, as a user runs it -------------------------------------------------------------------


def test_a_reader_that_goes_away_ends_ckptd_quietly(tmp_path) -> None:
    url = store(tmp_path, jobs=40)
    read, write = os.pipe()
    os.close(read)  # before ckptd writes a byte: every write it makes meets EPIPE
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run(
            ckptd(url, "ls", "--project", P), env=base_env(), stdout=stdout, stderr=subprocess.PIPE, timeout=60
        )
    assert (done.returncode, done.stderr.decode()) == (show.CLOSED_PIPE, "")


def test_a_full_disk_is_one_line_and_exit_1(tmp_path) -> None:
    url = store(tmp_path)
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            ckptd(url, "ls", "--job", J, "--json"), env=base_env(), stdout=full, stderr=subprocess.PIPE
        )
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == ["ckptd: cannot write stdout: No space left on device"]


def test_json_is_valid_with_nan_and_lone_surrogates(tmp_path) -> None:
    done = run(ckptd(store(tmp_path), "ls", "--job", J, "--json"))
    assert done.returncode == 0, done.stderr

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    (row,) = json.loads(done.stdout, parse_constant=refuse)["checkpoints"]
    assert (row["metrics"]["eval_loss"], row["metrics"]["grad"], row["metrics"]["\ud800"]) == (None, None, 2)


def test_plain_table_keeps_real_columns_and_escapes_names(tmp_path) -> None:
    done = run(ckptd(store(tmp_path), "ls", "--job", J))
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.splitlines()
    assert header.split()[:2] == ["checkpoint", "step"] and "metric:step" in header and "\\ud800" in header
    assert row.split()[:2] == ["checkpoint-10", "10"]


def test_terminal_table_shows_markup_in_names(tmp_path) -> None:
    url = store(tmp_path, metrics={"[/y]": 1, "\x1b[2Jwiped": 2})
    leader, follower = pty.openpty()
    proc = subprocess.Popen(ckptd(url, "ls", "--job", J), env={**base_env(), "COLUMNS": "300"}, stdout=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    assert b"[/y]" in out and b"\\x1b[2Jwiped" in out and b"\x1b[2J" not in out


@pytest.mark.parametrize("uncommitted", [5, "abc", ["checkpoint-20", 7]])
def test_wrong_typed_uncommitted_lists_no_phantom_checkpoints(tmp_path, uncommitted) -> None:
    status = {"rank": 0, "status": "FAILED", "sync_status": "SYNCING", "uncommitted": uncommitted}
    done = run(ckptd(store(tmp_path, metrics={}, status=status), "ls", "--job", J, "--json"))
    assert done.returncode == 0, done.stderr
    assert [c["name"] for c in json.loads(done.stdout)["checkpoints"]] == ["checkpoint-10"]


@pytest.mark.parametrize("group_size, nodes", [(True, 1), (-5, 1), (3, 3)])
def test_nodes_come_from_a_positive_group_size_only(tmp_path, group_size, nodes) -> None:
    url = store(tmp_path, metrics={})
    Path(tmp_path / "store" / layout.job_metadata_key(P, J)).write_text(json.dumps({"group_size": group_size}))
    done = run(ckptd(url, "ls", "--project", P, "--json"))
    assert [j["nodes"] for j in json.loads(done.stdout)["jobs"]] == [nodes]
