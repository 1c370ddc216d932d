"""Multi-node sharded checkpoints (PyTorch DCP) through `ckptd run`, end to end on the JuiceFS gateway.

One `ckptd run` per node (same job id, --node-rank 0/1, --group-size 2, each node its own checkpoint
folder, one store), each launching `torchrun --nnodes 2 --node-rank R --nproc-per-node 2` of
tests/frameworks/trainers/dcp_nodes_train.py: one gloo job of 4 processes that `dcp.save`s, every
step, a replicated model, its optimizer state and a table sharded across all 4 processes (a
DTensor). Each process writes its own `__G_0.distcp` into its node's folder; the coordinator writes
`.metadata` on node 0 only. A step commits globally once every node's files are stored: the global
manifest `manifests/global/step-N.json`, written last, lists them all. Restore lands every node's
files merged into one folder on each node, which `dcp.load`s on any number of nodes (DCP reshards).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemons import PREFIX, PROJECT, wait_for
from fwkit import (
    Job,
    assert_equal_states,
    checkpoints_of,
    ckptd_json,
    dcp_nodes_torchrun,
    free_port,
    job_key,
    kill_tree,
    latest_of,
    logged_at,
    manifest_files,
    of_checkpoint,
    require,
    stored_files,
    stored_json,
)
from servers import S3Bucket

KIND = "slow"

GLOBAL_COMMIT = "checkpoint committed globally"
UPLOADED = "uploaded"  # the one-line summary of each stored file (daemon/upload/worker.py)
PROCS = 2  # processes per node
NODE_FILES = {  # what each node of a two-node job writes into step-N/
    0: {".metadata", "__0_0.distcp", "__1_0.distcp"},
    1: {"__2_0.distcp", "__3_0.distcp"},
}


@pytest.fixture
def start_nodes(ckptd_job, juicefs_bucket) -> Iterator[Callable[..., list[Job]]]:
    """Start the `ckptd run` of every node of a job; on the way out, whatever still runs (ckptd,
    torchrun, the workers: the whole process tree of each node) is killed."""
    started: list[Job] = []

    def start(job_id: str, nodes: int, *, refs: list[dict] | None = None, env: dict[str, str]) -> list[Job]:
        port = free_port()
        jobs = [
            ckptd_job(
                juicefs_bucket,
                job_id,
                dcp_nodes_torchrun(nodes, rank, port, PROCS),
                rank=rank,
                group=nodes,
                refs=refs,
                env=env,
            )
            for rank in range(nodes)
        ]
        started.extend(jobs)
        return jobs

    yield start
    for job in started:
        if job.daemon.proc.poll() is None:
            kill_tree(job.daemon.proc.pid)


def tails(nodes: list[Job]) -> str:
    return "\n".join(f"--- node {n.rank} ({n.job_id}):\n{n.daemon.tail(60)}" for n in nodes)


def finish(nodes: list[Job], timeout: float = 180) -> list[int]:
    return [n.wait(timeout) for n in nodes]


def global_rank_out(nodes: list[Job], rank: int) -> Path:
    """TRAINER_OUT of the node that ran global rank `rank` (PROCS processes per node)."""
    return nodes[rank // PROCS].out


def load(path: Path):
    import torch

    return torch.load(path, weights_only=True)


def merged(nodes: list[Job], checkpoint: str) -> dict[str, str]:
    """relpath -> SHA-256 of every node's files of the checkpoint, as one folder."""
    union: dict[str, str] = {}
    for node in nodes:
        files = node.local_files(checkpoint)
        assert not union.keys() & files.keys(), "two nodes wrote the same file name"
        union.update(files)
    return union


def global_manifests(bucket: S3Bucket, job_id: str) -> list[str]:
    listed = bucket.client.list_objects_v2(Bucket=bucket.name, Prefix=job_key(job_id, "manifests/global/"))
    return sorted(o["Key"].rsplit("/", 1)[1] for o in listed.get("Contents", []))


def assert_stored_by_rank(bucket: S3Bucket, nodes: list[Job], checkpoints: set[str]) -> None:
    """Each node's files stored byte-identical under its own rank-N/ prefix, and nothing else."""
    for node in nodes:
        stored = stored_files(bucket, node.job_id, node.rank)
        assert checkpoints_of(stored) == checkpoints, f"node {node.rank}"
        for cp in checkpoints:
            assert of_checkpoint(stored, cp) == node.local_files(cp), f"node {node.rank}, {cp}"


def assert_global_manifest(bucket: S3Bucket, nodes: list[Job], step: int) -> None:
    """The global manifest of step-N lists exactly the union of the nodes' local files."""
    job_id, cp = nodes[0].job_id, f"step-{step}"
    manifest = stored_json(bucket, job_id, f"manifests/global/{cp}.json")
    head = ("kind", "project", "job_id", "checkpoint", "step", "group_size")
    assert tuple(manifest[k] for k in head) == ("global", PROJECT, job_id, cp, step, len(nodes)), manifest
    expected = {(n.rank, path): size_sha for n in nodes for path, size_sha in n.local_sizes(cp).items()}
    assert {p.split("/", 1)[1] for r, p in expected if r == 0} == NODE_FILES[0]
    assert {p.split("/", 1)[1] for r, p in expected if r == 1} == NODE_FILES[1]
    listed = {(f["rank"], f["path"]): (f["size"], f["sha256"]) for f in manifest["files"]}
    assert listed == expected, cp
    assert manifest["file_count"] == len(manifest["files"]) == len(expected), cp
    assert manifest["total_bytes"] == sum(size for size, _ in expected.values()), cp
    for f in manifest["files"]:  # each node's files under its own rank prefix
        full = job_key(job_id, f"rank-{f['rank']}/{f['path']}")
        assert f["key"] in (full, full.removeprefix(PREFIX + "/")), f
    ranks = {r["rank"]: r for r in manifest["ranks"]}
    assert sorted(ranks) == [n.rank for n in nodes], manifest["ranks"]
    for node in nodes:
        mine = node.local_sizes(cp)
        part = ranks[node.rank]
        assert (part["file_count"], part["total_bytes"]) == (len(mine), sum(s for s, _ in mine.values())), part
    assert (ranks[0]["reason"], ranks[1]["reason"]) == ("marker", "part"), manifest["ranks"]
    for node, reason in zip(nodes, ("marker", "part"), strict=True):  # each node's own part
        part = stored_json(bucket, job_id, f"manifests/rank-{node.rank}/{cp}.json")
        assert (part["checkpoint"], part["reason"]) == (cp, reason), part
        assert manifest_files(part) == node.local_files(cp), part


def assert_commits_after_uploads(nodes: list[Job], steps: tuple[int, ...]) -> None:
    """From every node's log: each step's global commit is logged after the upload of every one of
    its files on every node, and no global commit of the step is logged before that (no early
    commit). All nodes run on this machine: one clock."""
    uploads, commits = {}, {}
    for node in nodes:
        for e in node.daemon.events(UPLOADED):
            key = (node.rank, e["path"])
            uploads[key] = max(uploads.get(key, logged_at(e)), logged_at(e))
        for e in node.daemon.events(GLOBAL_COMMIT):
            commits.setdefault(e["checkpoint"], []).append(e)
    for step in steps:
        cp = f"step-{step}"
        files = {(n.rank, path): size for n in nodes for path, (size, _) in n.local_sizes(cp).items()}
        missing = sorted(set(files) - set(uploads))
        assert not missing, f"no upload logged for {missing}"
        assert commits.get(cp), f"no {GLOBAL_COMMIT!r} logged for {cp}"
        for e in commits[cp]:
            assert (e["step"], e["files"], e["bytes"]) == (step, len(files), sum(files.values())), e
        last_upload = max(uploads[f] for f in files)
        first_commit = min(logged_at(e) for e in commits[cp])
        assert first_commit > last_upload, f"{cp} committed at {first_commit}, a file uploaded at {last_upload}"


def assert_loaded(nodes: list[Job], saved, resumed_from: str, step: int) -> None:
    """Every process of every node loaded `saved` exactly and reports it."""
    world = len(nodes) * PROCS
    for rank in range(world):
        out = global_rank_out(nodes, rank)
        assert (out / f"result-rank-{rank}.json").exists(), tails(nodes)
        result = nodes[rank // PROCS].result(f"result-rank-{rank}.json")
        assert result == {"resumed_from": resumed_from, "step": step, "world": world}, f"rank {rank}"
        assert_equal_states(saved, load(out / f"loaded-rank-{rank}.pt"), f"{nodes[0].job_id} rank {rank}")


def wait_half_saved(bucket: S3Bucket, nodes: list[Job], step: int) -> None:
    """Until, in the save of step N (DCP_HANG_AT=N, DCP_HANG_RANK=3), node 1 wrote one of its two
    shards (rank 2's) and rank 3 hangs; then until that shard is stored and step N-1 committed
    globally, so that what follows starts from one known state."""

    def half_saved() -> bool:
        for node in nodes:
            assert node.daemon.proc.poll() is None, f"node {node.rank} exited early:\n{tails(nodes)}"
        return all(
            (nodes[1].out / f"{what}-step-{step}-rank-{r}").exists() for what, r in (("wrote", 2), ("hanging", 3))
        )

    wait_for(half_saved, 120, f"node 1 writing one of its two shards of step-{step}", interval=0.1)
    shard = f"step-{step}/__2_0.distcp"
    assert nodes[1].local_files(f"step-{step}").keys() == {shard}
    nodes[1].daemon.wait_event(UPLOADED, 60, where=lambda e: e.get("path") == shard)
    # The commit's log line, not only its manifest: a node stopped between the two never logs it.
    before = f"step-{step - 1}"

    def logged() -> list[dict]:
        return [e for n in nodes for e in n.daemon.events(GLOBAL_COMMIT) if e.get("checkpoint") == before]

    wait_for(logged, 60, f"{before} committed globally")
    assert f"{before}.json" in global_manifests(bucket, nodes[0].job_id)


def test_two_nodes_commit_globally_and_restore_merged_on_two_nodes_or_one(start_nodes, juicefs_bucket):
    require("torch")
    import torch

    # Two nodes save steps 1..3: every step commits globally, after every file of both nodes is stored.
    a = start_nodes("mnd-a", 2, env={"DCP_STEPS": "3"})
    assert finish(a) == [0, 0], tails(a)
    steps = {"step-1", "step-2", "step-3"}
    assert_stored_by_rank(juicefs_bucket, a, steps)
    assert global_manifests(juicefs_bucket, "mnd-a") == ["step-1.json", "step-2.json", "step-3.json"]
    for n in (1, 2, 3):
        assert_global_manifest(juicefs_bucket, a, n)
    assert_commits_after_uploads(a, (1, 2, 3))
    saved = load(a[0].out / "saved-rank-0.pt")  # full tensors: the same on every process
    for rank in range(1, 2 * PROCS):
        assert_equal_states(saved, load(global_rank_out(a, rank) / f"saved-rank-{rank}.pt"), f"saved, rank {rank}")
    assert int(saved["step"]) == 3 and saved["optim"]["state"], "a trained state"
    assert len(torch.unique(saved["table"], dim=0)) == 2 * PROCS, "every process's rows its own"
    step3 = merged(a, "step-3")

    # A new two-node job restores the latest: every node gets every node's files, merged, and loads.
    b = start_nodes("mnd-b", 2, refs=[latest_of(job_id="mnd-a")], env={"DCP_STEPS": "3"})
    assert finish(b) == [0, 0], tails(b)
    for node in b:
        assert node.restored_files() == step3, f"node {node.rank}"
    assert_loaded(b, saved, "step-3", 3)

    # A one-node job (2 processes) restores the same checkpoint and loads it (DCP reshards 4 -> 2),
    # then saves step-4 on its own.
    c = start_nodes("mnd-c", 1, refs=[latest_of(job_id="mnd-a")], env={"DCP_STEPS": "4"})
    assert finish(c) == [0], tails(c)
    assert c[0].restored_files() == step3
    assert_loaded(c, saved, "step-3", 4)

    # And back to two nodes (2 -> 4): each node restores the one-node job's step-4 and loads it.
    f = start_nodes("mnd-f", 2, refs=[latest_of(job_id="mnd-c")], env={"DCP_STEPS": "4"})
    assert finish(f) == [0, 0], tails(f)
    for node in f:
        assert node.restored_files() == c[0].local_files("step-4"), f"node {node.rank}"
    assert_loaded(f, load(c[0].out / "saved-rank-0.pt"), "step-4", 4)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_node_dying_mid_save_never_commits_that_step_and_the_next_job_resumes_before_it(start_nodes, juicefs_bucket):
    require("torch")
    # Steps 1 and 2 are saved and commit; in the save of step 3, global rank 3 (node 1) hangs before
    # writing its shard while every other process writes its own; then node 1 dies entirely.
    knobs = {"DCP_STEPS": "3", "DCP_HANG_AT": "3", "DCP_HANG_RANK": "3", "DCP_PG_TIMEOUT": "30"}
    d = start_nodes("mnd-d", 2, env=knobs)
    node0, node1 = d

    wait_half_saved(juicefs_bucket, d, 3)

    killed = kill_tree(node1.daemon.proc.pid)  # ckptd, torchrun and both workers of node 1
    assert len(killed) >= 4, killed
    assert node1.daemon.proc.wait(10) < 0
    wait_for(lambda: not any(alive(pid) for pid in killed), 10, "node 1's processes gone")
    # Node 0's processes fail at the process-group timeout; its ckptd drains and exits with the
    # trainer's (torchrun's) exit code.
    assert node0.wait(120) == 1, tails(d)

    assert all((node0.out / f"wrote-step-3-rank-{r}").exists() for r in (0, 1))
    assert node0.local_files("step-3").keys() == {"step-3/__0_0.distcp", "step-3/__1_0.distcp"}  # no .metadata
    # Nothing written is lost: every file of step-3 that was written is stored, under its rank.
    assert of_checkpoint(stored_files(juicefs_bucket, "mnd-d", 0), "step-3") == node0.local_files("step-3")
    assert of_checkpoint(stored_files(juicefs_bucket, "mnd-d", 1), "step-3") == node1.local_files("step-3")
    # ... but step-3 never commits: no global manifest (node 0's daemon has exited: no later one).
    assert global_manifests(juicefs_bucket, "mnd-d") == ["step-1.json", "step-2.json"]
    assert not [e for node in d for e in node.daemon.events(GLOBAL_COMMIT) if e.get("checkpoint") == "step-3"]
    for n in (1, 2):
        assert_global_manifest(juicefs_bucket, d, n)
    assert_commits_after_uploads(d, (1, 2))

    # The job's latest is step-2: a new job resumes from it (both nodes' step-2 files, merged, loaded
    # exactly) ...
    e = start_nodes("mnd-e", 1, refs=[latest_of(job_id="mnd-d")], env={"DCP_STEPS": "2"})
    assert finish(e) == [0], tails(e)
    assert e[0].restored_files() == merged(d, "step-2")
    step2 = load(node0.out / "saved-step-2-rank-0.pt")
    assert int(step2["step"]) == 2
    assert_loaded(e, step2, "step-2", 2)
    # ... and `ckptd ls` names it as the job's latest.
    listed = ckptd_json(
        juicefs_bucket, "ls", "--project", PROJECT, "--job", "mnd-d", "--checkpoint", "latest", "--json"
    )
    assert listed["checkpoint"] == "step-2", listed


def test_shards_of_a_node_that_never_stores_them_block_the_global_commit_though_metadata_is_stored(
    start_nodes, juicefs_bucket
):
    require("torch")
    # Step 1 commits. In the save of step 2, rank 3 (node 1) waits before writing its shard until
    # node 1's ckptd is frozen (SIGSTOP: its uploads stall); then the save completes on both nodes:
    # node 0 holds `.metadata` and its shards, all stored; node 1 its two shards, one never stored.
    knobs = {"DCP_STEPS": "2", "DCP_HANG_AT": "2", "DCP_HANG_RANK": "3", "DCP_PG_TIMEOUT": "90"}
    g = start_nodes("mnd-g", 2, env=knobs)
    node0, node1 = g
    wait_half_saved(juicefs_bucket, g, 2)
    os.kill(node1.daemon.proc.pid, signal.SIGSTOP)
    (node1.out / "release-step-2-rank-3").touch()
    assert node0.wait(120) == 0, tails(g)  # node 0's trainer succeeded, its own files all stored
    wait_for(lambda: all((node1.out / f"result-rank-{r}.json").exists() for r in (2, 3)), 60, "node 1's trainer done")
    kill_tree(node1.daemon.proc.pid)  # then node 1 dies, its ckptd never having stored rank 3's shard
    assert node1.daemon.proc.wait(10) < 0

    assert node0.local_files("step-2").keys() == {f"step-2/{name}" for name in NODE_FILES[0]}
    assert node1.local_files("step-2").keys() == {f"step-2/{name}" for name in NODE_FILES[1]}
    assert of_checkpoint(stored_files(juicefs_bucket, "mnd-g", 0), "step-2") == node0.local_files("step-2")
    shard = "step-2/__2_0.distcp"
    assert of_checkpoint(stored_files(juicefs_bucket, "mnd-g", 1), "step-2") == {
        shard: node1.local_files("step-2")[shard]
    }
    # `.metadata` names a shard that is not stored: step-2 never commits globally.
    assert global_manifests(juicefs_bucket, "mnd-g") == ["step-1.json"]
    assert not [e for node in g for e in node.daemon.events(GLOBAL_COMMIT) if e.get("checkpoint") == "step-2"]
    assert_global_manifest(juicefs_bucket, g, 1)
    assert_commits_after_uploads(g, (1,))

    # The job's latest is step-1: a new job resumes from it, and `ckptd ls` names it.
    h = start_nodes("mnd-h", 1, refs=[latest_of(job_id="mnd-g")], env={"DCP_STEPS": "1"})
    assert finish(h) == [0], tails(h)
    assert h[0].restored_files() == merged(g, "step-1")
    assert_loaded(h, load(node0.out / "saved-step-1-rank-0.pt"), "step-1", 1)
    listed = ckptd_json(
        juicefs_bucket, "ls", "--project", PROJECT, "--job", "mnd-g", "--checkpoint", "latest", "--json"
    )
    assert listed["checkpoint"] == "step-1", listed
