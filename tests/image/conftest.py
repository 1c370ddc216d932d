"""Fixtures for the image tests: the image, built once per session from the Dockerfile on a
debootstrap base (which serves as BUILDER_IMAGE and BASE_IMAGE), a container of it per test, and a
training run set up the way an operator would: credentials as secret files, /tmp a volume.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import servers
from oci_runtime import CA_BUNDLE, Buildah, Container, ImageConfig, Running, debootstrap_base

import daemon
from daemon.catalog import layout

REPO = Path(__file__).resolve().parents[2]
TRAINER = Path(__file__).resolve().parent / "train.py"
BASE = "localhost/ckptd-test-base:bookworm"
IMAGE = "localhost/ckptd-test:latest"
UID = GID = 65532  # the Dockerfile's defaults
PROJECT = "image-test"
SECRETS = "/run/secrets/ckptd"


@dataclass(frozen=True)
class Built:
    name: str
    config: ImageConfig
    revision: str


@pytest.fixture(scope="session")
def buildah(tmp_path_factory: pytest.TempPathFactory):
    tool = Buildah(tmp_path_factory.mktemp("buildah"))
    yield tool
    tool.remove_everything()  # vfs keeps a full copy of the file system per layer: gigabytes


@pytest.fixture(scope="session")
def image(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("image")
    started = time.monotonic()
    debootstrap_base(buildah, work, BASE)
    based = time.monotonic()
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    revision = git.stdout.strip() or "unknown"
    args = {"BASE_IMAGE": BASE, "BUILDER_IMAGE": BASE, "VERSION": daemon.__version__, "REVISION": revision}
    build = ["bud", "--isolation", "chroot", "--network", "host", "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    build += [a for name, value in args.items() for a in ("--build-arg", f"{name}={value}")]
    buildah(*build, "-t", IMAGE, "-f", str(REPO / "Dockerfile"), str(REPO), log=work / "build.log")
    print(f"\nimage: debootstrap base {based - started:.0f}s, build {time.monotonic() - based:.0f}s")
    return Built(IMAGE, ImageConfig.of(buildah.inspect(IMAGE)), revision)


@pytest.fixture
def container(buildah: Buildah, image: Built):
    with Container(buildah, image.name, image.config) as made:
        yield made


@pytest.fixture
def bucket(moto_server):
    client, name = servers.admin_client(moto_server), servers.unique_bucket()
    client.create_bucket(Bucket=name)
    yield name
    servers.empty_and_delete_bucket(client, name)


@dataclass
class Training:
    """`docker run IMAGE CMD` for ckptd against a bucket: what it is given, and what it leaves."""

    container: Container
    server: servers.S3Server
    bucket: str
    tmp: Path  # the container's /tmp, a volume
    log: Path
    project: str = PROJECT
    job: str = field(default_factory=lambda: f"job-{uuid.uuid4().hex[:8]}")
    secret: str = field(default_factory=lambda: f"image-test-secret-{uuid.uuid4().hex}")
    metrics: str = field(default_factory=lambda: f"127.0.0.1:{servers.free_port()}")
    env: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, tuple[Path, bool]] = field(default_factory=dict)

    def start(self, cmd: list[str], *, read_only: bool = False) -> Running:
        return self.container.start(cmd, env=self.env, volumes=self.volumes, log=self.log, read_only=read_only)

    def report(self) -> dict:
        return json.loads((self.tmp / "report.json").read_text())

    def stored_keys(self) -> set[str]:
        pages = servers.admin_client(self.server).get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {o["Key"] for page in pages for o in page.get("Contents", [])}

    def manifest(self, checkpoint: str) -> dict:
        key = layout.manifest_key(self.project, self.job, 0, checkpoint)
        return json.loads(servers.admin_client(self.server).get_object(Bucket=self.bucket, Key=key)["Body"].read())


@pytest.fixture
def training(container: Container, moto_server, bucket: str, tmp_path: Path) -> Training:
    """Credentials as secret files (AWS_*_FILE, read by entrypoint.sh), /tmp an emptyDir-like
    volume, train.py in the image's working directory, ckptd's metrics on a free loopback port."""
    setup = Training(container, moto_server, bucket, tmp_path / "tmp", tmp_path / "container.log")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    setup.tmp.mkdir()
    setup.tmp.chmod(0o1777)  # like /tmp: anyone writes
    for name, value in {"access-key-id": moto_server.access_key, "secret-access-key": setup.secret}.items():
        (secrets / name).write_text(value + "\n")
        os.chown(secrets / name, UID, GID)
        (secrets / name).chmod(0o400)
    workdir = container.rootfs / container.config.workdir.lstrip("/")
    (workdir / "train.py").write_bytes(TRAINER.read_bytes())
    setup.volumes = {"/tmp": (setup.tmp, False), SECRETS: (secrets, True)}
    setup.env = {
        **servers.isolated_aws_env(),
        "AWS_ACCESS_KEY_ID_FILE": f"{SECRETS}/access-key-id",
        "AWS_SECRET_ACCESS_KEY_FILE": f"{SECRETS}/secret-access-key",
        "AWS_DEFAULT_REGION": moto_server.region,
        "CKPTD_STORAGE": f"s3://{bucket}",
        "CKPTD_S3_ENDPOINT_URL": moto_server.endpoint_url,
        "CKPTD_PROJECT": PROJECT,
        "CKPTD_JOB_ID": setup.job,
        "CKPTD_METRICS_ADDR": setup.metrics,
        "TRAIN_REPORT": "/tmp/report.json",
    }
    return setup
