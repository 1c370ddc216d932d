"""The wildcard paths of `ckptd download` (SPEC §7): syntax, matching, `latest`. Table-driven."""

from __future__ import annotations

import time

import pytest

from daemon.catalog import patterns
from daemon.config.artifacts import check_pattern, parse_artifact_refs

KIND = "unit"

STORED = [
    (0, "checkpoint-10/model.safetensors"),
    (0, "checkpoint-10/trainer_state.json"),
    (0, "checkpoint-10/sub/extra.safetensors"),
    (0, "checkpoint-100/model.safetensors"),
    (0, "checkpoint-20/model.safetensors"),
    (0, "tokenizer.json"),
    (0, "latest"),  # DeepSpeed's file naming its latest tag
    (1, "checkpoint-10/model.safetensors"),
    (1, "checkpoint-10/trainer_state.json"),
    (1, "tokenizer.json"),
    (12, "checkpoint-10/model.safetensors"),
    (0, "odd[1]/x.json"),
]


@pytest.mark.parametrize(
    "pattern, expected",
    [
        # the reference's example: every file of checkpoint-10 of every rank, subfolders included
        (
            "rank-*/checkpoint-10/",
            {
                "0:checkpoint-10/model.safetensors",
                "0:checkpoint-10/trainer_state.json",
                "0:checkpoint-10/sub/extra.safetensors",
                "1:checkpoint-10/model.safetensors",
                "1:checkpoint-10/trainer_state.json",
                "12:checkpoint-10/model.safetensors",
            },
        ),
        # '?' is one character: checkpoint-10 and not checkpoint-100; and not '/'
        ("rank-0/checkpoint-1?/model.safetensors", {"0:checkpoint-10/model.safetensors"}),
        ("rank-0/checkpoint-10?model.safetensors", set()),
        # '*' after the rank folder crosses '/': any depth
        (
            "rank-0/*.safetensors",
            {
                "0:checkpoint-10/model.safetensors",
                "0:checkpoint-10/sub/extra.safetensors",
                "0:checkpoint-100/model.safetensors",
                "0:checkpoint-20/model.safetensors",
            },
        ),
        # '*' in the rank segment stays in it: rank-1* is rank-1 and rank-12, never rank-0/...
        (
            "rank-1*/checkpoint-10/model.safetensors",
            {"1:checkpoint-10/model.safetensors", "12:checkpoint-10/model.safetensors"},
        ),
        ("rank-?/tokenizer.json", {"0:tokenizer.json", "1:tokenizer.json"}),
        # a single segment is whole rank folders; a trailing '/' alike
        ("rank-1", {"1:checkpoint-10/model.safetensors", "1:checkpoint-10/trainer_state.json", "1:tokenizer.json"}),
        ("rank-1/", {"1:checkpoint-10/model.safetensors", "1:checkpoint-10/trainer_state.json", "1:tokenizer.json"}),
        ("*", {f"{r}:{p}" for r, p in STORED}),
        # without a trailing '/', a folder name selects nothing: it is a file name
        ("rank-0/checkpoint-10", set()),
        # '[' is itself, not a character class
        ("rank-0/odd[1]/", {"0:odd[1]/x.json"}),
        ("rank-0/odd?1?/x.json", {"0:odd[1]/x.json"}),
        # 'latest' without '/' after it is the file of that name
        ("rank-0/latest", {"0:latest"}),
    ],
)
def test_matching(pattern: str, expected: set[str]) -> None:
    p = patterns.parse(pattern)
    assert {f"{r}:{path}" for r, path in STORED if p.matches(r, path)} == expected


@pytest.mark.parametrize(
    "pattern, latest, expected",
    [
        ("rank-*/latest/", "checkpoint-20", {"0:checkpoint-20/model.safetensors"}),
        ("rank-0/latest/model.safetensors", "checkpoint-100", {"0:checkpoint-100/model.safetensors"}),
        ("rank-0/latest", "checkpoint-20", {"0:latest"}),  # a file name: not replaced
        ("rank-*/checkpoint-10/x", "checkpoint-20", set()),  # no 'latest': unchanged
    ],
)
def test_latest(pattern: str, latest: str, expected: set[str]) -> None:
    p = patterns.parse(pattern).with_latest(latest)
    assert {f"{r}:{path}" for r, path in STORED if p.matches(r, path)} == expected


def test_latest_name_with_wildcard_characters_matches_only_itself() -> None:
    p = patterns.parse("rank-0/latest/").with_latest("ck*?")
    assert p.matches(0, "ck*?/a")
    assert not p.matches(0, "ckXY/a")
    assert not p.matches(0, "ck*/a")


@pytest.mark.parametrize(
    "pattern, why",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("/rank-0/x", "absolute"),
        ("rank-0/../rank-1/x", "'..'"),
        ("rank-0/./x", "'..'"),
        ("..", "'..'"),
        ("rank-0//x", "empty segment"),
        ("rank-0/x//", "empty segment"),
        ("rank-0/x\0y", "control character"),
        ("rank-0/x\n", "control character"),
        ("rank-0/\tx", "control character"),
        ("checkpoint-10/", "must start with a rank folder"),
        ("rank-01/x", "must start with a rank folder"),
        ("rank-0/" + "x" * 1024, "characters long"),
        (7, "must be a string"),
    ],
)
def test_malformed(pattern: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_pattern(pattern)
    with pytest.raises(ValueError, match=why):
        patterns.parse(pattern)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value, error",
    [
        ([{"training_job_id": "run-42", "paths": ["rank-*/checkpoint-10/"]}], None),
        ([{"training_job_id": "run-42", "paths": "rank-0/"}], None),
        ([{"training_job_id": "run-42", "paths": ["rank-0/../x"]}], r"artifact_references\[0\]: paths\[0\]: .*'\.\.'"),
        ([{"training_job_id": "run-42", "paths": ["ok/x"]}], "must start with a rank folder"),
        ([{"training_job_id": "run-42", "paths": []}], "paths is empty"),
        ([{"training_job_id": "run-42", "paths": [3]}], "must be a string"),
        ([{"training_job_id": "../x", "paths": ["rank-0/"]}], "not a safe name"),
        ([{"training_job_id": "run-42", "paths": ["rank-0/"], "path": 1}], "unknown key 'path'"),
    ],
)
def test_patterns_checked_at_load(value: object, error: str | None) -> None:
    if error is None:
        assert parse_artifact_refs(value)[0].job_id == "run-42"
    else:
        with pytest.raises(ValueError, match=error):
            parse_artifact_refs(value)


@pytest.mark.parametrize(
    "pattern, text, expected",
    [
        ("rank-*", "rank-12", True),
        ("checkpoint-1?", "checkpoint-10", True),
        ("checkpoint-1?", "checkpoint-100", False),
        ("a?b", "a/b", False),
        ("*.json", "sub/x.json", True),
        ("a*b*c", "aXbYbZc", True),
        ("a*b*c", "aXbYbZ", False),
        ("", "", True),
        ("*", "", True),
        ("?", "", False),
    ],
)
def test_glob_match(pattern: str, text: str, expected: bool) -> None:
    assert patterns.glob_match(pattern, text) is expected


def test_many_stars_on_a_long_key_stay_fast() -> None:
    # A backtracking regex takes exponential time here; the greedy matcher is quadratic at worst.
    p = patterns.parse("rank-0/" + "*a" * 30 + "*b")
    started = time.monotonic()
    assert not p.matches(0, "a" * 1000)
    assert time.monotonic() - started < 5
