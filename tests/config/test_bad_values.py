"""Bad-input matrix, everything but numbers (issue 10): the config file itself (empty, not a
mapping, a directory, a device, too big, not UTF-8, duplicate keys, an alias bomb), wrong types,
unknown keys, unsafe names and paths, and storage URLs that hold credentials. Each is refused with
exit 2 before anything starts, naming the setting, and no credential reaches stderr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from refusals import CONFIG, FILE, KEY_ID, PRESIGNED, SECRET_KEY, SIGNATURE, TOKEN, assert_refused, case

from daemon import cli

KIND = "unit"

# Nine levels of ten references each: 10**9 strings once expanded. A parser that calls str() or
# repr() on it unbounded never returns.
_LEVELS = ["&l0 [x, x, x, x, x, x, x, x, x, x]"] + [
    f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)
]
ALIAS_BOMB = "upload: {watch_mode: [" + ", ".join(_LEVELS) + "]}\n"


def _directory(tmp: Path) -> str:
    (tmp / "conf.d").mkdir()
    return str(tmp / "conf.d")


def _oversized(tmp: Path) -> str:
    path = tmp / "huge.yaml"
    path.write_text("# padding\n" * 250_000)  # 2.5 MB: not a page of settings
    return str(path)


def _json(text: str):
    def make(tmp: Path) -> str:
        (tmp / "c.json").write_text(text)
        return str(tmp / "c.json")

    return make


WRONG_SHAPE = [
    case(
        "unknown-credential-key",
        "storage.secret_access_key",
        config=f"storage: {{secret_access_key: {SECRET_KEY}}}\n",
        source=FILE,
    ),
    case("markers-number", "upload.markers", config="upload: {markers: 5}\n", source=FILE),
    case("markers-numbers", "upload.markers", config="upload: {markers: [1, 2]}\n", source=FILE),
    case(
        "ignore_patterns-mapping", "upload.ignore_patterns", config="upload: {ignore_patterns: {a: 1}}\n", source=FILE
    ),
    case("watch_mode-unknown", "upload.watch_mode", args=["--watch-mode", "fanotify"], source="--watch-mode"),
    case("watch_mode-list", "upload.watch_mode", config="upload: {watch_mode: [poll]}\n", source=FILE),
    case("watch_mode-alias-bomb", "upload.watch_mode", config=ALIAS_BOMB, source=FILE),
    case("log_level-list", "log_level", config="log_level: [debug]\n", source=FILE),
    case("section-not-a-mapping", "checkpointing_config", config="checkpointing_config: [a]\n", source=FILE),
    case("top-level-list", CONFIG, config="- project\n- job\n"),
    case("top-level-scalar", CONFIG, config="just some words\n"),
    case("empty-file", CONFIG, config=""),
    case("whitespace-only-file", CONFIG, config="\n   \n\n"),
    case("directory-as-config", CONFIG, config=_directory),
    case("char-device-as-config", CONFIG, config=lambda tmp: "/dev/zero"),
    case("oversized-config", CONFIG, config=_oversized),
    case("missing-config", CONFIG, config=lambda tmp: str(tmp / "absent.yaml")),
    case("non-utf8-config", CONFIG, config=b"project: caf\xe9\n"),
    case("duplicate-yaml-key", CONFIG, config="project: a\njob_id: j\nproject: b\n"),
    case("duplicate-json-key", CONFIG, config=_json('{"project": "a", "project": "b"}')),
    case("multi-document-yaml", CONFIG, config="project: a\n---\nproject: b\n"),
    case("integer-too-long-to-read", CONFIG, config="upload: {bandwidth_limit: " + "9" * 5000 + "}\n"),
    case("nested-50000-deep", CONFIG, config="project: " + "[" * 50_000 + "]" * 50_000 + "\n"),
]

NAMES_PATHS_URLS = [
    case("job_id-dotdot", "job_id", config="job_id: '..'\n", source=FILE),
    case("job_id-newline-flag", "job_id", args=["--job-id", "run\n42"], source="--job-id"),
    case("job_id-non-utf8-env", "job_id", env={"CKPTD_JOB_ID": "run-\udcff"}, source="$CKPTD_JOB_ID"),
    case("job_id-octal-yaml-number", "job_id", config="job_id: 0123\n", source=FILE),
    case("project-yaml-nan", "project", config="project: .nan\n", source=FILE),
    case("project-yaml-boolean", "project", config="project: on\n", source=FILE),
    case(
        "checkpoint_name-newline",
        "load_checkpoint_config.checkpoints",
        config="load_checkpoint_config: {checkpoints: [{typ: baseten_named_checkpoint, job_id: j, "
        'checkpoint_name: "ckpt\\n1"}]}\n',
        source=FILE,
    ),
    case(
        "checkpoint_dir-trailing-newline",
        "checkpointing_config.checkpoint_path",
        env={"BT_CHECKPOINT_DIR": "/ckpt\n"},
        source="$BT_CHECKPOINT_DIR",
    ),
    case(
        "download_folder-nul",
        "load_checkpoint_config.download_folder",
        config='load_checkpoint_config: {download_folder: "/loaded\\0x"}\n',
        source=FILE,
    ),
    case("presigned-https-flag", "storage.url", args=["--storage", PRESIGNED], source="--storage"),
    case(
        "presigned-s3-env",
        "storage.url",
        env={"CKPTD_STORAGE": f"s3://bucket/p?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={KEY_ID}"},
        source="$CKPTD_STORAGE",
    ),
    case("userinfo-in-file", "storage.url", config=f"storage: s3://{KEY_ID}:{SECRET_KEY}@bucket/p\n", source=FILE),
    case(
        "azure-sas-url",
        "storage.url",
        config=f"storage: {{url: 'https://a.blob.core.windows.net/c?sv=1&sig={SIGNATURE}'}}\n",
        source=FILE,
    ),
    case("https-as-storage", "storage.url", args=["--storage", "https://minio.local:9000/bucket"], source="--storage"),
    case("storage-newline", "storage.url", env={"CKPTD_STORAGE": "s3://bucket/a\nb"}, source="$CKPTD_STORAGE"),
    case(
        "endpoint-token-query",
        "storage.endpoint_url",
        args=["--s3-endpoint-url", f"https://s3.example.com/?X-Amz-Security-Token={TOKEN}"],
        source="--s3-endpoint-url",
    ),
    case(
        "endpoint-userinfo-env",
        "storage.endpoint_url",
        env={"AWS_ENDPOINT_URL": f"https://{KEY_ID}:{SECRET_KEY}@s3.example.com"},
        source="$AWS_ENDPOINT_URL",
    ),
    case(
        "endpoint-port-out-of-range",
        "storage.endpoint_url",
        args=["--s3-endpoint-url", "http://host:99999"],
        source="--s3-endpoint-url",
    ),
    case("metrics_addr-space-in-host", "metrics_addr", args=["--metrics-addr", "bad host:80"], source="--metrics-addr"),
]


@pytest.mark.parametrize("args, env, config, setting, source", WRONG_SHAPE + NAMES_PATHS_URLS)
def test_bad_value_exits_2_naming_the_setting_without_secrets(
    tmp_path, monkeypatch, capsys, args, env, config, setting, source
):
    assert_refused(tmp_path, monkeypatch, capsys, args, env, config, setting, source)


def test_the_matrix_is_as_wide_as_claimed():
    cases = WRONG_SHAPE + NAMES_PATHS_URLS
    assert len({c.id for c in cases}) == len(cases) >= 40


def test_a_presigned_url_is_named_as_such_with_its_parameters_redacted(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cli.main(["restore", "--storage", PRESIGNED]) == 2
    err = capsys.readouterr().err
    assert "is a presigned URL" in err and "AWS credential chain" in err
    # The user can still see what they passed, minus every value of its query string.
    assert "https://bucket.s3.amazonaws.com/ckpt/model.bin?X-Amz-Algorithm=[redacted]&" in err
    assert "X-Amz-Signature=[redacted]" in err and "X-Amz-Credential=[redacted]" in err
