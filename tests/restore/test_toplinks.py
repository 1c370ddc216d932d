"""Links at the top of the restore folder (links.py): the reference docs' `get_last_checkpoint(dir)`
and `AutoTokenizer.from_pretrained(dir)` find this rank's restored checkpoint and root files, while
the `rank-N/` layout stays. Real symlinks, files and folders planted in a real restore folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_resolve import T0, commit
from test_restorer import FILES, ref, run, tree

from daemon.config.refs import LATEST, CheckpointRef
from daemon.restore import links
from daemon.restore.links import CREATE, KEEP, LEAVE, NOTHING, REMOVE, REPLACE, action, linkable
from daemon.storage.local import LocalStorage

KIND = "unit"
TOKENIZER = {"tokenizer.json": b'{"model": "bpe"}', "tokenizer_config.json": b"{}"}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("checkpoint-40", True),
        ("tokenizer.json", True),
        (".gitattributes", True),
        ("rank-01", True),  # no rank folder is named so
        ("rank-0", False),
        ("rank-12", False),
        ("ckptd-restore.json", False),
        (".tmp-ckptd-link-ab12", False),
        (".tmp-ckptd-restore-ab12", False),
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
    ],
)
def test_linkable(name, expected):
    assert linkable(name) is expected


@pytest.mark.parametrize(
    "wanted, found, target, expected",
    [
        (True, None, None, CREATE),
        (True, "a link", "rank-0/c", KEEP),
        (True, "a link", "rank-1/c", REPLACE),
        (True, "a link", "/elsewhere/c", LEAVE),
        (True, "a link", "rank-0/../../etc", LEAVE),
        (True, "a link", "rank-0/d", LEAVE),  # not ours: another name's target
        (True, "a file", None, LEAVE),
        (True, "a folder", None, LEAVE),
        (False, "a link", "rank-0/c", REMOVE),
        (False, "a link", "rank-7/c", REMOVE),
        (False, "a link", "/elsewhere/c", NOTHING),
        (False, "a file", None, NOTHING),
        (False, None, None, NOTHING),
    ],
)
def test_action(wanted, found, target, expected):
    assert action(wanted, found, target, "c", 0) == expected


@pytest.fixture
async def source(tmp_path):
    """proj/src: checkpoint-20 and checkpoint-30 on ranks 0 and 1, a tokenizer at the top of each."""
    async with LocalStorage(tmp_path / "store") as store:
        for rank in (0, 1):
            await commit(store, "proj", "src", rank, "checkpoint-20", FILES, T0)
            await commit(store, "proj", "src", rank, "checkpoint-30", {"trainer_state.json": b"{}"}, T0)
            await commit(store, "proj", "src", rank, ".", TOKENIZER, T0)
        yield store


def top(folder: Path) -> dict[str, str]:
    """Every link at the top of the restore folder and what it points at."""
    return {p.name: os.readlink(p) for p in folder.iterdir() if p.is_symlink()}


def get_last_checkpoint(folder: Path) -> str | None:
    """transformers.trainer_utils.get_last_checkpoint, as of 4.x (the integration tests run the real one)."""
    import re

    found = [p for p in os.listdir(folder) if re.search(r"^checkpoint\-(\d+)$", p) and (folder / p).is_dir()]
    return str(folder / max(found, key=lambda p: int(p.split("-")[1]))) if found else None


async def test_the_top_links_to_this_ranks_checkpoints_and_root_files(source, tmp_path):
    out = tmp_path / "out"
    report = await run(source, [ref("checkpoint-20"), ref("checkpoint-30")], out, rank=1)
    assert top(out) == {
        "checkpoint-20": "rank-1/checkpoint-20",
        "checkpoint-30": "rank-1/checkpoint-30",
        "tokenizer.json": "rank-1/tokenizer.json",
        "tokenizer_config.json": "rank-1/tokenizer_config.json",
    }
    assert sorted(report.links) == sorted(top(out))
    assert get_last_checkpoint(out) == str(out / "checkpoint-30")
    assert tree(out / "checkpoint-20") == FILES and (out / "tokenizer.json").read_bytes() == TOKENIZER["tokenizer.json"]
    # Links, never copies: the rank-N layout holds the only bytes.
    assert (out / "tokenizer.json").stat().st_ino == (out / "rank-1" / "tokenizer.json").stat().st_ino
    for name in top(out):
        assert Path(os.path.realpath(out / name)).parent == out / "rank-1"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


async def test_a_new_restore_replaces_and_removes_the_links_of_an_earlier_one(source, tmp_path):
    out = tmp_path / "out"
    await run(source, [ref("checkpoint-20"), ref("checkpoint-30")], out, rank=1)
    (out / ".tmp-ckptd-link-0123").symlink_to("rank-1/x")  # an interrupted replacement's
    report = await run(source, [ref("checkpoint-20")], out, rank=0)
    # Rank 0's now; checkpoint-30 (still in rank-1/, not restored this time) is no longer offered.
    assert top(out) == {
        "checkpoint-20": "rank-0/checkpoint-20",
        "tokenizer.json": "rank-0/tokenizer.json",
        "tokenizer_config.json": "rank-0/tokenizer_config.json",
    }
    assert sorted(report.links) == sorted(top(out))
    assert (out / "rank-1" / "checkpoint-30").is_dir()
    # Nothing matches: nothing is offered, nothing restored is deleted.
    report = await run(source, [CheckpointRef(LATEST, job_id="nope")], out, rank=0)
    assert top(out) == {} and report.links == []
    assert (out / "rank-0" / "checkpoint-20").is_dir()


async def test_what_is_not_a_link_of_ckptd_is_left_alone(source, tmp_path, capsys):
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"precious")
    out.mkdir()
    (out / "checkpoint-20").write_bytes(b"a user's file")
    (out / "tokenizer.json").symlink_to(victim / "precious")
    (out / "checkpoint-30").mkdir()
    (out / "checkpoint-30" / "mine").write_bytes(b"a user's folder")
    (out / "mylink").symlink_to(victim)
    report = await run(source, [ref("checkpoint-20"), ref("checkpoint-30")], out)
    assert report.links == ["tokenizer_config.json"]
    assert (out / "checkpoint-20").read_bytes() == b"a user's file"
    assert os.readlink(out / "tokenizer.json") == str(victim / "precious")
    assert (victim / "precious").read_bytes() == b"precious"
    assert tree(out / "checkpoint-30") == {"mine": b"a user's folder"}
    assert os.readlink(out / "mylink") == str(victim)
    assert tree(out / "rank-0" / "checkpoint-20") == FILES  # restored all the same
    logged = capsys.readouterr().out
    for name in ("checkpoint-20", "tokenizer.json", "checkpoint-30"):
        assert f"{out / name}" in logged
    assert "not linking" in logged


async def test_names_that_would_hide_a_rank_folder_or_the_summary_are_never_linked(tmp_path):
    out = tmp_path / "out"
    async with LocalStorage(tmp_path / "store") as store:
        await commit(store, "proj", "odd", 0, "rank-0", {"trainer_state.json": b"{}"}, T0)
        await commit(store, "proj", "odd", 0, "rank-1", {"trainer_state.json": b"{}"}, T0)
        await commit(store, "proj", "odd", 0, ".", {"ckptd-restore.json": b"fake", "tok.json": b"t"}, T0)
        refs = [ref(name, "odd") for name in ("rank-0", "rank-1")]
        report = await run(store, refs, out)
    assert report.links == ["tok.json"] and top(out) == {"tok.json": "rank-0/tok.json"}
    assert (out / "rank-0").is_dir() and not (out / "rank-0").is_symlink() and not (out / "rank-1").exists()
    assert tree(out / "rank-0") == {
        "rank-0/trainer_state.json": b"{}",
        "rank-1/trainer_state.json": b"{}",
        "ckptd-restore.json": b"fake",
        "tok.json": b"t",
    }
    assert '"links"' in (out / "ckptd-restore.json").read_text()  # the summary, not the stored file


def test_update_links_only_what_the_rank_folder_holds_as_a_folder_or_file(tmp_path):
    (tmp_path / "rank-0" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "rank-0" / "checkpoint-2").symlink_to(tmp_path)  # a link in the rank folder: never a target
    made = links.update(str(tmp_path), 0, ["checkpoint-1", "checkpoint-2", "checkpoint-3"])
    assert (made.linked, top(tmp_path)) == (["checkpoint-1"], {"checkpoint-1": "rank-0/checkpoint-1"})
