"""The reference docs' "Complete TrainingJob Setup", written with the real SDK (`truss_train`, in
.venv-sdk: truss cannot share .venv), runs through `ckptd run` unchanged: as the YAML and JSON the SDK
serializes, and as the Python config file itself where truss is importable.

Adapted from the docs only where a test must: the job id is the previous job this test makes first,
the folders are the test's, and environment variables (one plain, one secret) are added.
The start command is the docs' own, `chmod +x ./run.sh && ./run.sh`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemons import PREFIX, Daemon, base_env, objects, s3_args
from servers import S3Bucket

KIND = "integration"

ROOT = Path(__file__).resolve().parents[2]
SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
EVAL_TRAINER = str(ROOT / "tests" / "trainers" / "eval_trainer.py")
PROJECT, PREVIOUS = "my-training-project", "previous_job_id"
SECRET = "hf_Sup3r-s3cret-token-0123456789"

CONFIG_PY = """\
from truss_train import LoadCheckpointConfig, BasetenCheckpoint, CheckpointingConfig, TrainingJob, Image, Runtime, \
TrainingProject
from truss_train.definitions import CacheConfig, SecretReference

# Configure checkpoint loading
load_checkpoint_config = LoadCheckpointConfig(
    enabled=True,
    download_folder="{loaded}",
    checkpoints=[
        BasetenCheckpoint.from_latest_checkpoint(job_id="{previous}")
    ]
)

# Configure checkpointing for saving new checkpoints
checkpointing_config = CheckpointingConfig(
    enabled=True,
    checkpoint_path="{ckpt}"
)

# Create TrainingJob
job = TrainingJob(
    image=Image(base_image="your-base-image"),
    runtime=Runtime(
        checkpointing_config=checkpointing_config,
        load_checkpoint_config=load_checkpoint_config,
        start_commands=["chmod +x ./run.sh && ./run.sh"],
        cache_config=CacheConfig(enabled=True),
        environment_variables={{"WANDB_PROJECT": "demo", "HF_TOKEN": SecretReference(name="hf_access_token")}},
    ),
)

project = TrainingProject(name="{project}", job=job)
"""

# What `truss train push` does with config.py (truss_train.loader), then the SDK's serialization.
SERIALIZE = """\
import json, pathlib, sys
import yaml
from truss_train import loader
with loader.import_training_project(pathlib.Path(sys.argv[1])) as project:
    data = {**project.model_dump(), "job": project.job.model_dump()}
pathlib.Path(sys.argv[2]).write_text(yaml.safe_dump(data))
pathlib.Path(sys.argv[3]).write_text(json.dumps(data))
"""

RUN_SH = '#!/bin/sh\nexec "$TRAIN_PYTHON" "$(dirname "$0")/train.py"\n'
# The training code: what it was given, restored and saved, into $TRAIN_RECORD; it prints nothing.
TRAIN_PY = """\
import hashlib, json, os
from pathlib import Path
def sha(p): return hashlib.sha256(p.read_bytes()).hexdigest()
loaded = os.environ.get("BT_LOAD_CHECKPOINT_DIR")
restored = {str(p.relative_to(loaded)): sha(p) for p in Path(loaded).rglob("*") if p.is_file()} if loaded else {}
out = Path(os.environ["BT_CHECKPOINT_DIR"]) / "checkpoint-50"
out.mkdir(parents=True)
(out / "model.bin").write_bytes(os.urandom(4096))
(out / "trainer_state.json").write_text(json.dumps({"global_step": 50, "log_history": []}))
env = {k: os.environ.get(k) for k in ("WANDB_PROJECT", "HF_TOKEN", "BT_TRAINING_PROJECT_NAME", "BT_TRAINING_JOB_ID")}
saved = {f"checkpoint-50/{p.name}": sha(p) for p in out.iterdir()}
Path(os.environ["TRAIN_RECORD"]).write_text(json.dumps({"env": env, "restored": restored, "saved": saved}))
"""


@pytest.fixture
def sdk_python() -> str:
    assert SDK_PYTHON.exists(), "no .venv-sdk: run scripts/setup.sh, which makes it with the reference SDK"
    return str(SDK_PYTHON)


def previous_job(bucket: S3Bucket, folder: Path) -> dict[str, str]:
    """The job the example restores from: checkpoint-10..40 by `ckptd run`; relpath -> sha256."""
    folder.mkdir()
    args = ["run", *s3_args(bucket), "--project", PROJECT, "--job-id", PREVIOUS, "--checkpoint-dir",
            str(folder / "ckpt"), "--settle-time", "0.05", "--metrics-addr", "127.0.0.1:0", "--", sys.executable,
            EVAL_TRAINER]  # fmt: skip
    env = {**base_env(), **bucket.server.env(), "TRAINER_STEPS": "10,20,30,40", "TRAINER_LOSSES": "0.9,0.5,0.7,0.6",
           "TRAINER_RECORD": str(folder / "record.json")}  # fmt: skip
    daemon = Daemon(args, env, folder / "ckptd.log")
    try:
        assert daemon.wait(120) == 0, daemon.tail()
    finally:
        daemon.kill()
    return json.loads((folder / "record.json").read_text())


def workdir(tmp_path: Path, name: str) -> Path:
    """A folder with the example's run.sh and config.py, as its author has them."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "run.sh").write_text(RUN_SH)  # not executable: the start command chmods it
    (folder / "train.py").write_text(TRAIN_PY)
    text = CONFIG_PY.format(loaded=folder / "loaded", ckpt=folder / "ckpt", previous=PREVIOUS, project=PROJECT)
    (folder / "config.py").write_text(text)
    return folder


def ckptd(python: str, bucket: S3Bucket, folder: Path, config: Path, job_id: str, extra_env: dict, *args: str):
    """`ckptd run --config FILE` in the example's folder, as the platform starts it: the job id in BT_*."""
    env = {**base_env(), **bucket.server.env(), "BT_TRAINING_JOB_ID": job_id, "TRAIN_PYTHON": sys.executable,
           "TRAIN_RECORD": str(folder / "record.json"), **extra_env}  # fmt: skip
    command = [python, "-m", "daemon", *(args or ("run",)), "--config", str(config), *s3_args(bucket)]
    if not args:
        command += ["--settle-time", "0.05", "--metrics-addr", "127.0.0.1:0", "--drain-timeout", "60"]
    with open(folder / f"{job_id}.log", "wb") as log:
        return subprocess.run(command, env=env, cwd=folder, stdout=log, stderr=subprocess.STDOUT, timeout=120)


def check_run(bucket: S3Bucket, folder: Path, job_id: str, code: int, previous: dict[str, str]) -> None:
    """Restored the previous job's latest, gave the environment, uploaded the new checkpoint, logged no secret."""
    log = (folder / f"{job_id}.log").read_text()
    assert code == 0, log[-3000:]
    record = json.loads((folder / "record.json").read_text())
    latest = {f"rank-0/{k}": v for k, v in previous.items() if k.startswith("checkpoint-40/")}
    assert {k: v for k, v in record["restored"].items() if k.startswith("rank-0/checkpoint-40/")} == latest
    assert record["env"] == {
        "WANDB_PROJECT": "demo",
        "HF_TOKEN": SECRET,
        "BT_TRAINING_PROJECT_NAME": PROJECT,
        "BT_TRAINING_JOB_ID": job_id,
    }
    stored = objects(bucket, f"{PREFIX}/training_projects/{PROJECT}/jobs/{job_id}/")
    assert {k: hashlib.sha256(stored[f"rank-0/{k}"]).hexdigest() for k in record["saved"]} == record["saved"]
    assert any(k.startswith("manifests/rank-0/") and "checkpoint-50" in k for k in stored), sorted(stored)
    assert SECRET not in log
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    [ignored] = [e for e in events if e.get("event", "").startswith("config file fields ignored")]
    assert {"job.image", "job.runtime.cache_config", "job.compute.cpu_count"} <= set(ignored["fields"])


def test_the_sdks_yaml_and_json_run_through_ckptd(s3_bucket, tmp_path, sdk_python):
    previous = previous_job(s3_bucket, tmp_path / "previous")
    folder = workdir(tmp_path, "example")
    serialized = subprocess.run(
        [sdk_python, "-c", SERIALIZE, folder / "config.py", folder / "project.yaml", folder / "project.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serialized.returncode == 0, serialized.stderr
    secret_file = tmp_path / "hf_access_token"
    secret_file.write_text(SECRET + "\n")
    for name, job_id, secret in (
        ("project.yaml", "sdk-yaml", {"hf_access_token": SECRET}),
        ("project.json", "sdk-json", {"hf_access_token_FILE": str(secret_file)}),
    ):
        done = ckptd(sys.executable, s3_bucket, folder, folder / name, job_id, secret)
        check_run(s3_bucket, folder, job_id, done.returncode, previous)
        (folder / "record.json").unlink()
        for leftover in ("ckpt", "loaded"):
            shutil.rmtree(folder / leftover)

    # An init container given the same file restores without the trainer's secret.
    done = ckptd(sys.executable, s3_bucket, folder, folder / "project.yaml", "restore-only", {}, "restore")
    assert done.returncode == 0, (folder / "restore-only.log").read_text()[-3000:]
    assert (folder / "loaded" / "rank-0" / "checkpoint-40" / "model.safetensors").is_file()


def test_a_missing_secret_stops_ckptd_run_before_anything_starts(moto_bucket, tmp_path, sdk_python):
    folder = workdir(tmp_path, "example")
    subprocess.run(
        [sdk_python, "-c", SERIALIZE, folder / "config.py", folder / "p.yaml", folder / "p.json"], check=True
    )
    done = ckptd(sys.executable, moto_bucket, folder, folder / "p.yaml", "no-secret", {})
    log = (folder / "no-secret.log").read_text()
    assert done.returncode == 2, log
    assert "HF_TOKEN" in log and "'hf_access_token' not found" in log
    assert not (folder / "record.json").exists() and not (folder / "ckpt").exists()


def test_the_python_config_file_with_truss_importable(moto_bucket, tmp_path, sdk_python):
    previous = previous_job(moto_bucket, tmp_path / "previous")
    folder = workdir(tmp_path, "example")
    done = ckptd(sdk_python, moto_bucket, folder, folder / "config.py", "from-config-py", {"hf_access_token": SECRET})
    check_run(moto_bucket, folder, "from-config-py", done.returncode, previous)


def test_the_python_config_file_without_truss_is_a_clear_error(moto_bucket, tmp_path):
    folder = workdir(tmp_path, "example")
    done = ckptd(sys.executable, moto_bucket, folder, folder / "config.py", "no-truss", {"hf_access_token": SECRET})
    log = (folder / "no-truss.log").read_text()
    assert done.returncode == 2, log
    assert "truss package is not importable here" in log and "config.py" in log
    assert not (folder / "record.json").exists()


def test_a_truss_serving_config_drives_ckptd_download(moto_bucket, tmp_path):
    """The reference's serving config (serving-checkpoints.md) inside a Truss model's config.yaml."""
    previous = previous_job(moto_bucket, tmp_path / "previous")
    folder = tmp_path / "model"
    folder.mkdir()
    truss_config = {
        "model_name": "from-checkpoint",
        "python_version": "py311",
        "requirements": ["vllm"],
        "resources": {"accelerator": "H100", "use_gpu": True},
        "secrets": {"hf_access_token": None},
        "training_checkpoints": {
            "download_folder": str(folder / "training_checkpoints"),
            "artifact_references": [{"training_job_id": PREVIOUS, "paths": ["rank-*/checkpoint-10/"]}],
        },
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(truss_config))
    done = ckptd(sys.executable, moto_bucket, folder, folder / "config.yaml", "download", {}, "download")
    log = (folder / "download.log").read_text()
    assert done.returncode == 0, log[-3000:]
    got = folder / "training_checkpoints" / PREVIOUS / "rank-0"
    fetched = {
        str(p.relative_to(got)): hashlib.sha256(p.read_bytes()).hexdigest() for p in got.rglob("*") if p.is_file()
    }
    assert fetched == {k: v for k, v in previous.items() if k.startswith("checkpoint-10/")}
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    [ignored] = [e for e in events if e.get("event", "").startswith("config file fields ignored")]
    assert sorted(ignored["fields"]) == ["model_name", "python_version", "requirements", "resources", "secrets"]


def test_what_a_python_config_prints_stays_off_the_json_output(moto_bucket, tmp_path, sdk_python):
    previous_job(moto_bucket, tmp_path / "previous")
    folder = workdir(tmp_path, "example")
    config = folder / "config.py"
    config.write_text('print("hello from config.py")\n' + config.read_text())
    done = subprocess.run(
        [sdk_python, "-m", "daemon", "ls", "--config", str(config), *s3_args(moto_bucket), "--json"],
        env={**base_env(), **moto_bucket.server.env()},
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [job["job_id"] for job in json.loads(done.stdout)["jobs"]] == [PREVIOUS]
    assert "hello from config.py" in done.stderr
