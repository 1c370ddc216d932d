"""`ckptd ls` and `ckptd prune` on a two-node job (tests/catalog/twonodes.py: step-10..30 committed
globally, step-40 stored by rank 0 only), run in-process against a file:// store and moto: the
global commit state of every checkpoint, "latest" by the global manifests, and prunes that delete a
global manifest before anything it lists. A single-node job's listing keeps its fields."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from daemons import PREFIX, s3_args

from daemon import cli
from daemon.catalog import jobmeta, jobview, layout
from daemon.storage import Storage
from daemon.storage.local import LocalStorage
from daemon.storage.s3 import S3Storage
from tests.catalog.twonodes import COMMITTED, LOSSES, WAITING, J, P, keys, lies, make_job, save_part

KIND = "unit"  # the moto cases are integration tests (conftest marks them)


class Where:
    """A store for the CLI to work on: its flags, and how to open it here."""

    def __init__(self, flags: list[str], opened: Callable[[], Any], kind: type[Storage]) -> None:
        self.flags, self.opened, self.kind = flags, opened, kind
        self.err = ""  # the last command's stderr

    def run(self, work: Callable[[Storage], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            async with self.opened() as store:
                return await work(store)

        return asyncio.run(go())


@pytest.fixture(params=["local", "moto"])
def where(request, tmp_path, monkeypatch) -> Where:
    # Configuring logs is process-wide and caches loggers: other tests capture logs in this process.
    monkeypatch.setattr(cli.logs, "configure", lambda *args, **kwargs: None)
    if request.param == "local":
        root = tmp_path / "store"
        return Where(["--storage", f"file://{root}"], lambda: LocalStorage(root), LocalStorage)
    bucket = request.getfixturevalue("moto_bucket")
    return Where(s3_args(bucket), lambda: bucket.storage(PREFIX), S3Storage)


def ckptd(where: Where, capsys, command: str, *args: str, job: str | None = J) -> tuple[int, Any]:
    """Exit code and stdout (parsed with --json); stderr stays in `where.err`."""
    on_job = ["--job", job] if job is not None else []
    code = cli.main([command, *where.flags, "--project", P, *on_job, "--log-level", "error", *args])
    out, where.err = capsys.readouterr()
    return code, json.loads(out) if "--json" in args and out.strip() else out


def test_ls_shows_each_checkpoints_global_commit_state(where, capsys):
    made = where.run(make_job)
    code, doc = ckptd(where, capsys, "ls", "--json")
    assert code == 0 and doc["group_size"] == 2
    rows = {r["name"]: r for r in doc["checkpoints"]}
    assert [r["name"] for r in doc["checkpoints"]] == [WAITING, "step-30", "step-20", "step-10", "."]
    waiting = rows[WAITING]
    assert (waiting["committed"], waiting["committed_at"], waiting["global_commit"]) == (False, None, "waiting")
    assert (waiting["part_ranks"], waiting["missing_ranks"], waiting["ranks"]) == ([0], [1], [0])
    assert waiting["uncommitted_ranks"] == []  # rank 0's files are in its part; rank 1 stored none
    for name in COMMITTED:
        row, whole = rows[name], made.wholes[name]
        assert (row["committed"], row["global_commit"], row["part_ranks"], row["missing_ranks"]) == (
            True,
            "committed",
            [0, 1],
            [],
        )
        assert (row["committed_at"], row["size"], row["files"]) == (
            whole["committed_at"],
            whole["total_bytes"],
            whole["file_count"],
        )
        assert row["metrics"] == {"eval_loss": LOSSES[name]}  # the global manifest's, not the parts'
    assert (rows["."]["committed"], rows["."]["global_commit"], rows["."]["ranks"]) == (True, None, [0, 1])

    code, table = ckptd(where, capsys, "ls")
    assert code == 0
    header, *lines = table.splitlines()
    assert header.split()[-2:] == ["global", "eval_loss"]
    line = next(x for x in lines if x.startswith(f"{WAITING} "))
    assert "waiting (parts: 0; missing: 1)" in line and " NO " in line
    assert "committed" in next(x for x in lines if x.startswith("step-30 "))
    code, doc = ckptd(where, capsys, "ls", "--json", "--sort", "global_commit", "--reverse", "--limit", "1")
    assert code == 0 and [r["name"] for r in doc["checkpoints"]] == [WAITING]


def test_latest_and_files_follow_the_global_manifests(where, capsys):
    made = where.run(make_job)
    code, doc = ckptd(where, capsys, "ls", "--checkpoint", "latest", "--json")
    assert code == 0 and doc["checkpoint"] == "step-30"  # step-40 has only parts
    assert [(f["rank"], f["path"], f["sha256"], f["committed"], f["stored"]) for f in doc["files"]] == [
        (f["rank"], f["path"], f["sha256"], True, True) for f in made.wholes["step-30"]["files"]
    ]
    code, doc = ckptd(where, capsys, "ls", "--checkpoint", WAITING, "--json")
    part = made.parts[WAITING][0]["files"]
    assert [(f["rank"], f["path"], f["sha256"], f["committed"]) for f in doc["files"]] == [
        (0, f["path"], f["sha256"], False) for f in part
    ]
    code, doc = ckptd(where, capsys, "ls", "--json", job=None)  # no job: the project's jobs
    assert code == 0 and [(j["job_id"], j["checkpoints"], j["nodes"]) for j in doc["jobs"]] == [(J, 4, 2)]


def test_a_job_waiting_for_its_first_global_commit_has_no_latest(where, capsys):
    async def fresh(store: Storage) -> None:
        await jobmeta.ensure_job(store, P, J, 2)
        await save_part(store, 0, "step-1", at=0)

    where.run(fresh)
    code, doc = ckptd(where, capsys, "ls", "--json")
    assert code == 0 and [(r["name"], r["committed"], r["missing_ranks"]) for r in doc["checkpoints"]] == [
        ("step-1", False, [1])
    ]
    assert ckptd(where, capsys, "ls", "--checkpoint", "latest")[0] == 1
    assert "no committed checkpoint" in where.err


def test_prune_keeps_what_is_not_committed_globally_and_deletes_global_manifests_first(where, capsys, monkeypatch):
    made = where.run(make_job)
    code, plan = ckptd(where, capsys, "prune", "--keep-best", "1", "--metric", "eval_loss", "--json")
    assert code == 5
    rows = {r["checkpoint"]: r for r in plan["checkpoints"]}
    assert {n: (r["action"], r["reasons"]) for n, r in rows.items()} == {
        ".": ("keep", ["root"]),
        "step-10": ("delete", []),
        "step-20": ("keep", ["keep_best"]),  # the global manifests' 0.5; by the parts' it would be step-10
        "step-30": ("keep", ["latest"]),
        WAITING: ("keep", ["uncommitted"]),  # its parts' 0.1 would be the best: never ranked
    }
    assert rows["step-10"]["metric"] == LOSSES["step-10"] and rows["step-10"]["ranks"] == [0, 1]
    assert plan["bytes_to_free"] == made.wholes["step-10"]["total_bytes"]

    deleted: list[str] = []
    real = where.kind.delete

    async def delete(self, key: str) -> None:
        await real(self, key)
        deleted.append(key)

    monkeypatch.setattr(where.kind, "delete", delete)
    code, done = ckptd(where, capsys, "prune", "--keep-last", "1", "--yes", "--json")
    assert code == 0
    assert sorted((d["checkpoint"], d["ranks"]) for d in done["deleted"]) == [("step-10", [0, 1]), ("step-20", [0, 1])]
    for name in ("step-10", "step-20"):
        mine = [k for k in deleted if f"/{name}" in k and "/pruning/" not in k]
        assert mine[0] == layout.global_key(P, J, name) and len(mine) == 1 + 2 + 3  # global, 2 parts, 3 files

    async def after(store: Storage) -> tuple[list[str], list[str], list[str]]:
        view = await jobview.view(store, P, J)
        return [c.name for c in view.committed], await lies(store), await keys(store, f"rank-0/{WAITING}/")

    committed, lying, waiting = where.run(after)
    assert committed == [".", "step-30"] and lying == []
    assert len(waiting) == 2  # not committed: never deleted by rules


def test_a_single_node_jobs_listing_is_unchanged(where, capsys):
    async def single(store: Storage) -> None:
        await jobmeta.ensure_job(store, P, "one", 1)
        await save_part(store, 0, "step-1", at=0, job="one")

    where.run(single)
    code, doc = ckptd(where, capsys, "ls", "--json", job="one")
    assert code == 0 and "group_size" not in doc
    (row,) = doc["checkpoints"]
    assert set(row) == {"name", "step", "size", "files", "ranks", "committed_at", "committed"} | {
        "uncommitted_ranks",
        "metrics",
    }
    code, table = ckptd(where, capsys, "ls", job="one")
    assert "global" not in table.splitlines()[0]


def test_download_and_inspect_take_latest_as_restore_does(where, capsys, tmp_path):
    where.run(make_job)  # step-40, the highest step, only waits for rank 1: it is not "latest"
    to = tmp_path / "dl"
    code, _ = ckptd(where, capsys, "download", "--path", "rank-*/latest/", "--to", str(to), "--json")
    assert code == 0, where.err
    got = sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file())
    assert got == [
        f"{J}/rank-0/step-30/.metadata",
        f"{J}/rank-0/step-30/__0_0.distcp",
        f"{J}/rank-1/step-30/__1_0.distcp",
    ]
    code, _ = ckptd(where, capsys, "inspect", "latest", "--json")  # DCP shards: nothing inspect reads
    assert (code, where.err.strip()) == (1, f"ckptd: checkpoint 'step-30' of job '{J}' holds no .safetensors file")
