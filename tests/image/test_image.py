"""The image, built from the Dockerfile with buildah on a debootstrap base and run as a container
(oci_runtime.py, fixtures in conftest.py): `entrypoint.sh python train.py` trains under `ckptd run`
with dumb-init as PID 1 and the image's numeric user, into moto on the host's loopback; a SIGTERM to
PID 1 drains and passes the trainer's exit code through; ckptd needs neither the base's Python nor
its libraries. The first test pays for the build (about a minute).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import servers
from oci_runtime import Container, Running

import daemon
from daemon.catalog import layout

KIND = "slow"
pytestmark = pytest.mark.timeout(900)  # the first test also builds the image

ENTRYPOINT = ["/opt/ckptd/bin/dumb-init", "--", "/opt/ckptd/entrypoint.sh"]
UID = GID = 65532  # the Dockerfile's defaults
PREEMPTED_EXIT = 17  # train.py's exit code after a SIGTERM
WAIT = 60.0


def wait_for(condition, what: str, running: Running) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert running.proc.poll() is None, f"container exited ({running.proc.returncode}):\n{running.output()}"
        assert time.monotonic() < deadline, f"{what} not seen after {WAIT:.0f}s:\n{running.output()}"
        time.sleep(0.1)  # polling interval; the deadline bounds the wait


def assert_committed(training, step: int) -> None:
    """checkpoint-N's files are stored, its manifest is written, and the weights are train.py's bytes."""
    checkpoint = f"checkpoint-{step}"
    keys = training.stored_keys()
    for name in ("model.safetensors", "optimizer.pt", "trainer_state.json"):
        assert layout.file_key(training.project, training.job, 0, f"{checkpoint}/{name}") in keys, sorted(keys)
    files = {f["path"]: f for f in training.manifest(checkpoint)["files"]}
    weights = hashlib.sha256(f"step-{step}".encode()).digest() * 8192
    assert files[f"{checkpoint}/model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()


def events(running: Running, name: str) -> list[dict]:
    lines = [json.loads(line) for line in running.output().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == name]


def test_image_config(image):
    config = image.config
    assert config.entrypoint == ENTRYPOINT
    assert config.cmd == [], "the base's CMD (python3) must not become the training command"
    assert config.user == f"{UID}:{GID}"
    assert "/opt/ckptd" not in config.env.get("PATH", ""), "ckptd's python would shadow the trainer's"
    assert not [k for k in config.env if k.startswith(("AWS_", "CKPTD_", "PIP_"))]
    oci = {k.removeprefix("org.opencontainers.image."): v for k, v in config.labels.items()}
    assert oci["title"] == "ckptd" and oci["licenses"] == "Apache-2.0"
    assert (oci["version"], oci["revision"]) == (daemon.__version__, image.revision)


def test_image_files(container: Container):
    root = container.rootfs
    assert os.readlink(root / "usr/local/bin/ckptd") == "/opt/ckptd/bin/ckptd"
    assert f"ckptd:x:{UID}:{GID}:ckptd:/home/ckptd:" in (root / "etc/passwd").read_text()
    assert (root / "home/ckptd").stat().st_uid == UID
    assert (root / "opt/ckptd/entrypoint.sh").stat().st_mode & 0o111
    leftovers = [*root.glob("build"), *root.glob("root/.cache"), *root.glob("opt/ckptd/lib/python3*/site-packages/pip")]
    assert leftovers == [], "build files, caches or pip left in the image"
    assert list((root / "opt/ckptd").rglob("*.whl")) == []


@pytest.fixture
def trained(training):
    """One training run to its end, on a read-only root file system (/tmp a volume)."""
    running = training.start(["python", "train.py"], read_only=True)
    running.wait(timeout=120)
    return training, running


def test_the_training_command_runs_under_ckptd_and_its_checkpoints_are_stored(trained):
    training, running = trained
    assert running.proc.returncode == 0, running.output()
    report = training.report()
    assert report["root_read_only"], "the run was meant to prove that a read-only root works"
    [ckptd] = report["ckptd"]
    assert ckptd["argv"][1:] == ["-I", "/opt/ckptd/bin/ckptd", "run", "--", "python", "train.py"]
    for step in (1, 2):
        assert_committed(training, step)
    assert training.secret not in running.output()


def test_pid1_is_dumb_init_and_ckptd_runs_as_the_numeric_user(trained):
    training, _ = trained
    report = training.report()
    assert report["pid1"] == [*ENTRYPOINT, "python", "train.py"]
    [ckptd] = report["ckptd"]
    ids = [str(UID)] * 4, [str(GID)] * 4, []  # real, effective, saved, file system ids; no other groups
    assert (ckptd["Uid"], ckptd["Gid"], ckptd["Groups"]) == ids
    # The trainer: the base's Python, as the same user, in a process group of its own.
    assert (report["me"]["Uid"], report["me"]["Gid"]) == ids[:2]
    assert not report["executable"].startswith("/opt/ckptd/") and "/opt/ckptd" not in report["path"]
    assert report["me"]["pgid"] != ckptd["pgid"]


def test_sigterm_to_pid1_drains_and_passes_the_trainers_exit_code_through(training):
    training.env["TRAIN_HOLD"] = "1"
    running = training.start(["python", "train.py"])
    wait_for(lambda: (training.tmp / "report.json").exists(), "the trainer holding after 2 checkpoints", running)
    assert servers.http_status(f"http://{training.metrics}/healthz") == 200, "ckptd's health endpoint, from the host"
    commands = [c.read_bytes() for c in Path("/proc").glob("[0-9]*/cmdline") if c.exists()]
    assert not [c for c in commands if training.secret.encode() in c], "a secret on a command line (ps)"

    os.kill(running.init_pid(), signal.SIGTERM)
    assert running.wait(timeout=120) == PREEMPTED_EXIT, running.output()
    # dumb-init signals ckptd's process group; the trainer's own group hears it from ckptd.
    assert [e["signal"] for e in events(running, "signal received")] == ["SIGTERM"]
    assert training.report()["holding"] is False, "the trainer saved after the signal"
    for step in (1, 2, 3):  # 3: saved after the SIGTERM, stored by the drain
        assert_committed(training, step)
    assert training.secret not in running.output()


GLIBC = ("libc.so", "libm.so", "libpthread.so", "libdl.so", "librt.so", "libutil.so", "libresolv.so", "ld-linux")
# Every C module of ckptd's interpreter and of its wheels loads (a wheel that falls back to pure
# Python when its extension fails, as frozenlist and multidict do, would hide a missing library), and
# then the process maps no library from outside /opt/ckptd but glibc's. Run with -I, as bin/ckptd's
# shebang runs it.
PROBE = """
import importlib, json, pathlib, sys, sysconfig
loaded = []
for tree in (sysconfig.get_path("platlib"), sysconfig.get_path("stdlib") + "/lib-dynload"):
    for so in sorted(pathlib.Path(tree).rglob("*.so")):
        parts = so.relative_to(tree).parts
        if not any(p.endswith(".libs") for p in parts):
            loaded.append(importlib.import_module(".".join([*parts[:-1], so.name.split(".")[0]])).__name__)
maps = {line.split()[-1] for line in open("/proc/self/maps") if ".so" in line.split()[-1]}
print(json.dumps({"path": sys.path, "prefix": sys.prefix, "modules": loaded, "libraries": sorted(maps)}))
"""


# Libraries CPython's C modules and ckptd's wheels need beyond glibc (the image must bring its own).
NEEDED = {"libssl", "libcrypto", "libffi", "libz", "libexpat", "liblzma", "libbz2", "libsqlite3", "libuuid"}
NEEDED |= {"libstdc++", "libgcc_s"}


def remove_python_and_bundled_libraries(root: Path) -> set[str]:
    """Leave the base without any Python, those libraries and any other library the image bundles."""
    doomed = [*root.glob("usr/bin/python*"), *root.glob("usr/lib/python3*"), *root.glob("usr/local/lib/python3*")]
    bundled = {lib.name.split(".so")[0] for lib in (root / "opt/ckptd/python/lib").glob("lib*.so*")}
    for stem in NEEDED | bundled:
        doomed += [*root.glob(f"usr/lib/*/{stem}.so*"), *root.glob(f"usr/lib/{stem}.so*")]
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            subprocess.run(["rm", "-rf", str(path)], check=True)
        else:
            path.unlink()
    return {p.name for p in doomed}


def test_ckptd_needs_neither_the_bases_python_nor_its_libraries(container: Container, tmp_path):
    removed = remove_python_and_bundled_libraries(container.rootfs)
    assert {"python3", "libssl.so.3", "libffi.so.8", "libstdc++.so.6"} <= removed, "the base had them"

    # The trainer's Python settings must not reach ckptd's interpreter (-I in bin/ckptd's shebang):
    # each of these would stop a ckptd that honoured them.
    trainer_site = container.rootfs / "opt/trainer-site"
    trainer_site.mkdir()
    (trainer_site / "sitecustomize.py").write_text('raise SystemExit("the trainer\'s PYTHONPATH reached ckptd")')
    trainer_env = {"PYTHONHOME": "/nonexistent", "PYTHONPATH": "/opt/trainer-site"}
    version = container.start(["version"], env=trainer_env, volumes={}, log=tmp_path / "version.log")
    assert version.wait() == 0, version.output()
    assert version.output().startswith(f"ckptd {daemon.__version__}")

    # A CUDA image's LD_LIBRARY_PATH with its own builds of these libraries (here: not even ELF files)
    # must not displace the bundled ones: DT_RPATH is searched first.
    trainer_libs = container.rootfs / "opt/trainer-libs"
    trainer_libs.mkdir()
    for name in ("libssl.so.3", "libcrypto.so.3", "libffi.so.8", "libz.so.1", "libstdc++.so.6"):
        (trainer_libs / name).write_text("not a library\n")
    hostile = {"LD_LIBRARY_PATH": "/opt/trainer-libs"}
    probe = container.start(["-I", "-c", PROBE], entrypoint=["/opt/ckptd/bin/python"], env=hostile, volumes={},
                            log=tmp_path / "probe.log")  # fmt: skip
    assert probe.wait() == 0, probe.output()
    seen = json.loads(probe.output().splitlines()[-1])
    assert seen["prefix"] == "/opt/ckptd"
    assert {"_ssl", "_ctypes", "uvloop.loop", "frozenlist._frozenlist"} <= set(seen["modules"])
    assert [p for p in seen["path"] if not p.startswith("/opt/ckptd/")] == []
    foreign = [lib for lib in seen["libraries"] if not lib.startswith("/opt/ckptd/")]
    assert [lib for lib in foreign if not os.path.basename(lib).startswith(GLIBC)] == [], "only glibc from the base"


def test_ckptd_uploads_from_a_base_without_python(training):
    remove_python_and_bundled_libraries(training.container.rootfs)
    save = "d=$BT_CHECKPOINT_DIR/checkpoint-1 && mkdir -p $d && echo w >$d/model.bin && echo {} >$d/trainer_state.json"
    running = training.start(["sh", "-c", save])
    assert running.wait() == 0, running.output()
    assert layout.manifest_key(training.project, training.job, 0, "checkpoint-1") in training.stored_keys()
