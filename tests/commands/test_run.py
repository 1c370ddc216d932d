"""`ckptd run` end to end: restore, launch, upload alongside, signals, drain, exit codes.

Real subprocesses and signals, real inotify, real S3 servers (moto, JuiceFS gateway).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from daemons import PREFIX, PROJECT, Daemon, base_env, manifests, s3_args, sha256, stored_objects, wait_for
from servers import free_port

from daemon.commands.signals import FORWARDED

KIND = "integration"

TRAINER = str(Path(__file__).resolve().parent.parent / "trainers" / "fake_trainer.py")


class Job:
    def __init__(self, daemon: Daemon, folder: Path) -> None:
        self.daemon, self.folder = daemon, folder

    @property
    def record(self) -> dict:
        return json.loads((self.folder / "record.json").read_text())

    def ran(self) -> bool:
        return (self.folder / "record.json").exists()


@pytest.fixture
def job(tmp_path):
    started: list[Daemon] = []

    def start(
        bucket,
        job_id: str,
        *extra: str,
        rank: int = 0,
        group: int = 1,
        refs: list | None = None,
        trainer: dict | None = None,
        endpoint: str | None = None,
        cmd: list[str] | None = None,
        ignoring: tuple[int, ...] = (),
    ) -> Job:
        folder = tmp_path / f"{job_id}-rank-{rank}"
        folder.mkdir()
        config = {"load_checkpoint_config": {"enabled": True, "checkpoints": refs or []}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        storage = s3_args(bucket)
        if endpoint:
            storage[storage.index("--s3-endpoint-url") + 1] = endpoint
        args = [
            "run",
            "--config",
            str(folder / "config.yaml"),
            *storage,
            "--project",
            PROJECT,
            "--job-id",
            job_id,
            "--node-rank",
            str(rank),
            "--group-size",
            str(group),
            "--checkpoint-dir",
            str(folder / "ckpt"),
            "--restore-dir",
            str(folder / "loaded"),
            "--settle-time",
            "0.05",
            "--metrics-addr",
            "127.0.0.1:0",
            "--drain-timeout",
            "30",
            "--stop-timeout",
            "5",
            *extra,
            "--",
            *(cmd or [sys.executable, TRAINER]),
        ]
        env = {
            **base_env(),
            **bucket.server.env(),
            "TRAINER_RECORD": str(folder / "record.json"),
            "TRAINER_READY": str(folder / "ready"),
            **(trainer or {}),
        }
        d = Daemon(args, env, folder / "ckptd.log", ignoring)
        started.append(d)
        return Job(d, folder)

    yield start
    for d in started:
        d.kill()


def latest_of(project: str | None = None, job_id: str | None = None, **extra) -> dict:
    ref = {"typ": "baseten_latest_checkpoint", **extra}
    if project:
        ref["project_name"] = project
    if job_id:
        ref["job_id"] = job_id
    return ref


def named(checkpoint: str, job_id: str) -> dict:
    return {"typ": "baseten_named_checkpoint", "checkpoint_name": checkpoint, "job_id": job_id}


def rank_status(bucket, job_id: str, rank: int = 0) -> dict:
    key = f"{PREFIX}/training_projects/{PROJECT}/jobs/{job_id}/status/rank-{rank}.json"
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read())


def of_checkpoint(written: dict, checkpoint: str) -> dict:
    return {k: v for k, v in written.items() if k.startswith(checkpoint + "/")}


def test_a_job_stores_everything_and_the_next_resumes_from_the_latest(job, s3_bucket):
    a = job(s3_bucket, "job-a", trainer={"TRAINER_STEPS": "3"})
    assert a.daemon.wait() == 0, a.daemon.tail()
    written = a.record["written"]
    assert {k: sha256(v) for k, v in stored_objects(s3_bucket, "job-a").items()} == written
    assert sorted(manifests(s3_bucket, "job-a")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    status = rank_status(s3_bucket, "job-a")
    assert (status["status"], status["sync_status"], status["exit_code"]) == ("COMPLETED", "COMPLETED", 0)
    assert a.record["env"]["BT_TRAINING_JOB_ID"] == "job-a" and a.record["env"]["BT_NODE_RANK"] == "0"

    b = job(s3_bucket, "job-b", refs=[latest_of(project=PROJECT)])
    assert b.daemon.wait() == 0, b.daemon.tail()
    found = b.record["restored"]  # seen by the trainer before it wrote anything
    assert found["last"] == "checkpoint-3"
    assert found["files"] == of_checkpoint(written, "checkpoint-3")


def test_rank_status_records_the_last_commit_step_and_time(job, moto_bucket):
    """The stored status/rank-N.json says which checkpoint was committed last, at which step and when:
    the publisher and the job metadata agree on its shape (it used to store nulls)."""
    a = job(moto_bucket, "job-lc", trainer={"TRAINER_STEPS": "3"})
    assert a.daemon.wait() == 0, a.daemon.tail()
    last = rank_status(moto_bucket, "job-lc")["last_commit"]
    committed = manifests(moto_bucket, "job-lc")
    assert last["checkpoint"] in committed and last["step"] == int(last["checkpoint"].split("-")[1])
    assert last["committed_at"] == committed[last["checkpoint"]]["committed_at"]


def test_named_checkpoint_and_latest_of_a_job(job, moto_bucket):
    a = job(moto_bucket, "job-a", trainer={"TRAINER_STEPS": "3"})
    assert a.daemon.wait() == 0, a.daemon.tail()
    written = a.record["written"]
    c = job(moto_bucket, "job-c", refs=[named("checkpoint-1", "job-a"), latest_of(job_id="job-a")])
    assert c.daemon.wait() == 0, c.daemon.tail()
    assert c.record["restored"]["files"] == {
        **of_checkpoint(written, "checkpoint-1"),
        **of_checkpoint(written, "checkpoint-3"),
    }


def test_two_nodes_each_restore_their_own_rank(job, moto_bucket):
    first = [job(moto_bucket, "job-m", rank=r, group=2, trainer={"TRAINER_STEPS": "2"}) for r in (0, 1)]
    assert [n.daemon.wait() for n in first] == [0, 0], first[1].daemon.tail()
    second = [job(moto_bucket, "job-n", rank=r, group=2, refs=[latest_of(job_id="job-m")]) for r in (0, 1)]
    assert [n.daemon.wait() for n in second] == [0, 0], second[1].daemon.tail()
    for old, new in zip(first, second, strict=True):
        assert new.record["restored"]["files"] == of_checkpoint(old.record["written"], "checkpoint-2")
    assert first[0].record["written"] != first[1].record["written"]
    # A rank the source job never had takes rank 0's files.
    single = job(moto_bucket, "job-a-single", trainer={"TRAINER_STEPS": "1"})
    assert single.daemon.wait() == 0
    lone = job(moto_bucket, "job-o", rank=2, group=3, refs=[latest_of(job_id="job-a-single")])
    assert lone.daemon.wait() == 0, lone.daemon.tail()
    assert lone.record["restored"]["files"] == of_checkpoint(single.record["written"], "checkpoint-1")


@pytest.mark.parametrize("exit_with, code", [("3", 3), ("kill", 137)])
def test_trainer_failure_is_the_exit_code_after_draining(job, moto_bucket, exit_with, code):
    j = job(moto_bucket, f"job-{exit_with}", trainer={"TRAINER_STEPS": "2", "TRAINER_EXIT": exit_with})
    assert j.daemon.wait() == code, j.daemon.tail()
    assert {k: sha256(v) for k, v in stored_objects(moto_bucket, f"job-{exit_with}").items()} == j.record["written"]
    assert rank_status(moto_bucket, f"job-{exit_with}")["status"] == "FAILED"


def test_sigterm_reaches_the_trainer_whose_last_checkpoint_is_stored(job, juicefs_bucket):
    j = job(juicefs_bucket, "job-t", trainer={"TRAINER_STEPS": "1", "TRAINER_WAIT": "yes", "TRAINER_ON_TERM": "save"})
    wait_for(lambda: (j.folder / "ready").exists(), 30, "the trainer to wait")
    j.daemon.signal(signal.SIGTERM)
    assert j.daemon.wait() == 0, j.daemon.tail()
    assert j.record["terminated"] is True
    stored = {k: sha256(v) for k, v in stored_objects(juicefs_bucket, "job-t").items()}
    assert stored == j.record["written"] and "checkpoint-final/model.safetensors" in stored
    assert "checkpoint-final" in manifests(juicefs_bucket, "job-t")
    assert rank_status(juicefs_bucket, "job-t")["status"] == "COMPLETED"  # it stopped cleanly: exit 0


def test_a_trainer_ignoring_sigterm_is_killed_after_the_stop_timeout(job, moto_bucket):
    j = job(moto_bucket, "job-i", "--stop-timeout", "1", trainer={"TRAINER_WAIT": "yes", "TRAINER_ON_TERM": "ignore"})
    wait_for(lambda: (j.folder / "ready").exists(), 30, "the trainer to wait")
    j.daemon.signal(signal.SIGTERM)
    assert j.daemon.wait() == 137, j.daemon.tail()
    assert j.daemon.events("killing the trainer")[0]["reason"] == "stop timeout"
    assert rank_status(moto_bucket, "job-i")["status"] == "STOPPED"  # told to stop: not a failure of its own


# A trainer whose writers outlive it. Each process writes its pid to $LEFT/NAME.pid.
LEFT_BEHIND = r"""#!/bin/sh
case "$1" in
writer)  # a checkpoint file every 20 ms, forever; the child ignores SIGTERM
    [ "$2" = child ] && trap '' TERM
    echo $$ > "$LEFT/$2.pid"
    i=0
    while :; do
        i=$((i + 1))
        mkdir -p "$BT_CHECKPOINT_DIR/$2-$i" && echo "$i" > "$BT_CHECKPOINT_DIR/$2-$i/shard.bin"
        sleep 0.02
    done ;;
middle)  # a writer in a session of its own: the leader's setsid grandchild
    setsid "$0" writer grandchild &
    wait ;;
*)  # the leader: it ends on SIGTERM, or exits 0 once its writers run if LEADER says so
    echo $$ > "$LEFT/leader.pid"
    "$0" writer child &
    "$0" middle &
    while [ ! -s "$LEFT/child.pid" ] || [ ! -s "$LEFT/grandchild.pid" ]; do sleep 0.01; done
    touch "$LEFT/ready"
    [ "$LEADER" = exit ] && exit 0
    wait ;;
esac
"""


def writing(pid: int) -> bool:
    """Whether `pid` is still one of LEFT_BEHIND's writers (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and b"writer" in command


def logged_at(event: dict) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"]).timestamp()


@pytest.mark.parametrize(
    "how, code",
    [("sigterm", 143), ("leader-killed", 137), ("leader-exits-0", 0)],
    ids=["sigterm-to-ckptd", "leader-sigkilled", "leader-exits-0"],
)
def test_what_the_trainer_leaves_running_is_stopped_before_the_drain(job, moto_bucket, tmp_path, how, code):
    """Issue 10 defect 9: the leader exits (on SIGTERM, SIGKILL or by itself) while a child that
    ignores SIGTERM and a setsid grandchild keep writing checkpoints. They get the rest of the stop
    timeout, then SIGKILL, are named in the log, and the drain starts only once they are dead."""
    script, left = tmp_path / "train.sh", tmp_path / "left"
    script.write_text(LEFT_BEHIND)
    script.chmod(0o755)
    left.mkdir()
    leader = "exit" if how == "leader-exits-0" else "wait"
    j = job(
        moto_bucket,
        f"job-{how}",
        "--stop-timeout",
        "2",
        cmd=[str(script)],
        trainer={"LEFT": str(left), "LEADER": leader},
    )
    wait_for(lambda: (left / "ready").exists(), 30, "the trainer's writers to start")
    pids = {name: int((left / f"{name}.pid").read_text()) for name in ("child", "grandchild")}
    try:
        if how == "sigterm":
            j.daemon.signal(signal.SIGTERM)
        elif how == "leader-killed":
            os.kill(int((left / "leader.pid").read_text()), signal.SIGKILL)
        assert j.daemon.wait(60) == code, j.daemon.tail()
        assert not [name for name, pid in pids.items() if writing(pid)], "writers outlived ckptd"
    finally:
        for pid in pids.values():
            if writing(pid):
                os.kill(pid, signal.SIGKILL)

    outlived = j.daemon.events("the trainer's processes outlived it")[0]
    named = {p["pid"]: p["command"] for p in outlived["processes"]}
    assert "writer child" in named[pids["child"]] and "writer grandchild" in named[pids["grandchild"]]
    killed = j.daemon.events("killing the trainer")[0]
    assert killed["reason"] == "stop timeout"
    assert {p["pid"] for p in killed["processes"]} & set(pids.values()) == {pids["child"]}  # the rest took SIGTERM
    stopped = j.daemon.events("signal received")[0] if how == "sigterm" else outlived
    assert 1.8 <= logged_at(killed) - logged_at(stopped) <= 3.5  # the stop timeout, not more

    # The drain came after the last write: every file on disk is stored, as it is on disk.
    ckpt = j.folder / "ckpt"
    on_disk = {
        str(p.relative_to(ckpt)): sha256(p.read_bytes())
        for p in ckpt.rglob("*")
        if p.is_file() and p.relative_to(ckpt).parts[0] != ".ckptd"
    }
    assert {k: sha256(v) for k, v in stored_objects(moto_bucket, f"job-{how}").items()} == on_disk
    assert manifests(moto_bucket, f"job-{how}") == {}  # writers were cut off: no final commit without a marker


def test_a_second_stop_signal_kills_the_trainer_at_once(job, moto_bucket):
    j = job(
        moto_bucket, "job-2nd", "--stop-timeout", "120", trainer={"TRAINER_WAIT": "yes", "TRAINER_ON_TERM": "ignore"}
    )
    wait_for(lambda: (j.folder / "ready").exists(), 30, "the trainer to wait")
    j.daemon.signal(signal.SIGTERM)
    j.daemon.wait_event("signal received")
    j.daemon.signal(signal.SIGTERM)
    assert j.daemon.wait(60) == 137, j.daemon.tail()  # not after the 120 s stop timeout
    assert j.daemon.events("killing the trainer")[0]["reason"] == "second stop signal"


def test_a_second_stop_signal_during_the_drain_cuts_it_short(job, moto_bucket):
    """Training is over and the store is down: the drain would retry for 300 s. Signals still count
    after the trainer has exited."""
    j = job(
        moto_bucket,
        "job-drain",
        "--drain-timeout",
        "300",
        endpoint=f"http://127.0.0.1:{free_port()}",
        trainer={"TRAINER_STEPS": "1"},
    )
    j.daemon.wait_event("draining")
    j.daemon.signal(signal.SIGTERM)
    j.daemon.wait_event("signal received")  # signals of one kind merge while one is pending
    j.daemon.signal(signal.SIGTERM)
    assert j.daemon.wait(60) == 4, j.daemon.tail()
    assert [e["action"] for e in j.daemon.events("signal received")] == ["stop", "hurry"]


def test_a_third_stop_signal_during_the_drain_exits_at_once(job, moto_bucket):
    j = job(
        moto_bucket,
        "job-third",
        "--drain-timeout",
        "300",
        endpoint=f"http://127.0.0.1:{free_port()}",
        trainer={"TRAINER_STEPS": "1"},
    )
    j.daemon.wait_event("draining")
    for count in (1, 2, 3):
        j.daemon.signal(signal.SIGTERM)
        if count < 3:  # signals of one kind merge while one is pending: let each be seen
            wait_for(lambda n=count: len(j.daemon.events("signal received")) == n, 30, f"signal {count}")
    assert j.daemon.wait(30) == 128 + signal.SIGTERM, j.daemon.tail()
    assert j.daemon.events("third stop signal: exiting without draining")[0]["exit_code"] == 143
    assert not j.daemon.events("drained")


def test_hup_and_usr_signals_reach_the_trainer_which_goes_on(job, moto_bucket):
    j = job(
        moto_bucket,
        "job-fwd",
        trainer={"TRAINER_WAIT": "yes", "TRAINER_NOTE": "yes", "TRAINER_ON_TERM": "save"},
    )
    wait_for(lambda: (j.folder / "ready").exists(), 30, "the trainer to wait")
    sent = ["SIGHUP", "SIGUSR1", "SIGUSR2"]
    for count, name in enumerate(sent, 1):
        j.daemon.signal(signal.Signals[name])
        wait_for(lambda n=count: len(j.record.get("signals", [])) == n, 30, f"the trainer to note {name}")
    j.daemon.signal(signal.SIGTERM)
    assert j.daemon.wait() == 0, j.daemon.tail()
    assert j.record["signals"] == sent and j.record["terminated"] is True
    assert [e["action"] for e in j.daemon.events("signal received")] == ["forward"] * 3 + ["stop"]


def test_the_trainer_hears_forwarded_signals_though_ckptd_started_ignoring_them(job, moto_bucket, tmp_path):
    """Under nohup, or as a background job of a script, ckptd starts with SIGHUP or SIGINT ignored.
    It forwards them all the same, so the trainer must not start ignoring them either (its handlers
    for them are reset by exec, and uvloop's spawn resets every disposition: either suffices)."""
    status = tmp_path / "trainer-status"
    kill_itself = f"grep SigIgn /proc/$$/status > {status}; kill -INT $$"
    j = job(moto_bucket, "job-ign", cmd=["sh", "-c", kill_itself], ignoring=FORWARDED)
    assert j.daemon.wait() == 128 + signal.SIGINT, j.daemon.tail()
    ignored = int(status.read_text().split()[1], 16)  # bit N-1 set: signal N ignored
    assert [s.name for s in FORWARDED if ignored & (1 << (s - 1))] == []


@pytest.fixture
def silent_store():
    """An S3 endpoint that takes connections and never answers: a store stalled mid-request."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def take() -> None:
        while True:
            try:
                taken.append(listener.accept()[0])
            except OSError:  # shut down: the test is over
                return

    threading.Thread(target=take, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", taken
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    for conn in taken:
        conn.close()


@pytest.mark.parametrize("stops", [1, 2, 3], ids=["one", "two", "three"])
def test_stop_signals_during_a_stalled_restore_never_start_training(job, moto_bucket, silent_store, stops):
    endpoint, taken = silent_store
    j = job(moto_bucket, f"job-rs-{stops}", refs=[latest_of(job_id="job-a", required=True)], endpoint=endpoint)
    wait_for(lambda: taken, 30, "the restore to reach the store")
    stopped = time.monotonic()
    for _ in range(stops):  # in quick succession: the later ones may land while ckptd winds down
        j.daemon.signal(signal.SIGTERM)
    code = j.daemon.wait(30)
    assert (128 - code if code < 0 else code) == 128 + signal.SIGTERM, j.daemon.tail()  # 143, as the shell sees it
    assert time.monotonic() - stopped < 15, "not stopped promptly"
    assert j.daemon.events("stopped before training started")
    assert not j.ran()


def test_store_down_still_reports_success_of_training_and_exits_4(job, moto_bucket):
    j = job(
        moto_bucket,
        "job-down",
        "--drain-timeout",
        "3",
        endpoint=f"http://127.0.0.1:{free_port()}",
        trainer={"TRAINER_STEPS": "1"},
    )
    assert j.daemon.wait() == 4, j.daemon.tail()
    assert j.daemon.events("training finished")[0]["succeeded"] is True


def test_required_reference_missing_never_starts_training(job, moto_bucket):
    j = job(moto_bucket, "job-r", refs=[latest_of(job_id="no-such-job", required=True)])
    assert j.daemon.wait() == 3, j.daemon.tail()
    assert not j.ran()


def test_optional_reference_missing_starts_from_scratch(job, moto_bucket):
    j = job(moto_bucket, "job-s", refs=[latest_of(job_id="no-such-job")])
    assert j.daemon.wait() == 0, j.daemon.tail()
    assert j.record["restored"] == {"files": {}, "last": None}


def test_a_corrupted_object_is_never_handed_to_the_trainer(job, juicefs_bucket):
    a = job(juicefs_bucket, "job-a", trainer={"TRAINER_STEPS": "2"})
    assert a.daemon.wait() == 0, a.daemon.tail()
    key = f"{PREFIX}/training_projects/{PROJECT}/jobs/job-a/rank-0/checkpoint-2/model.safetensors"
    size = juicefs_bucket.client.head_object(Bucket=juicefs_bucket.name, Key=key)["ContentLength"]
    juicefs_bucket.client.put_object(Bucket=juicefs_bucket.name, Key=key, Body=b"\0" * size)
    b = job(juicefs_bucket, "job-b", refs=[latest_of(job_id="job-a")])
    assert b.daemon.wait() == 3, b.daemon.tail()
    assert not b.ran()
    assert not (b.folder / "loaded" / "rank-0" / "checkpoint-2" / "model.safetensors").exists()
