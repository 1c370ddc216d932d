"""When is a checkpoint committed? Pure state and rules, no I/O, no clocks (SPEC §4).

A checkpoint is a top-level folder of the checkpoint folder ('.' for files at the top). It is
committed when every file in it is stored and, for writers that use one, its completion marker was
seen; a writer without a marker commits once quiet for a while or when the trainer exits
successfully. Times are `time.monotonic()` floats passed in by the caller.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.catalog.layout import ROOT_CHECKPOINT, checkpoint_of
from daemon.catalog.manifest import StoredFile


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def is_marker(relpath: str, patterns: Iterable[str]) -> bool:
    """True if the file's name (not its folder's) matches a marker glob."""
    name = _basename(relpath)
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def expects_marker(names: Iterable[str], *, top_level: bool = False) -> bool:
    """Whether the writer of a checkpoint holding these files writes a completion marker last.

    | any training_args.bin | any *.distcp | top_level | result |
    |-----------------------|--------------|-----------|--------|
    | no                    | no           | any       | False  |
    | yes                   | no           | False     | True   |
    | yes                   | no           | True      | False  |
    | any                   | yes          | any       | True   |

    `training_args.bin`: the Hugging Face Trainer writes it before `trainer_state.json`. At the top
    of the checkpoint folder it comes from `trainer.save_model()`, which writes no
    `trainer_state.json`, so there it predicts no marker (else the final model would never commit).
    `*.distcp`: PyTorch DCP shards; `.metadata` is renamed into place after them.
    Names may be bare file names or relative paths.
    """
    hf = dcp = False
    for name in names:
        base = _basename(name)
        hf = hf or base == "training_args.bin"
        dcp = dcp or base.endswith(".distcp")
    return dcp or (hf and not top_level)


def should_commit(
    *,
    pending: int,
    marker_seen: bool,
    marker_expected: bool,
    quiet_for: float,
    quiet_limit: float,
    final: bool,
    shared: bool = False,
    sharded: bool = False,
) -> str | None:
    """The reason to commit a checkpoint now ("marker", "quiet", "final", "part"), or None to wait.

    | pending | marker_seen | marker_expected | shared | sharded | quiet_for >= quiet_limit | final | result   |
    |---------|-------------|-----------------|--------|---------|--------------------------|-------|----------|
    | > 0     | any         | any             | any    | any     | any                      | any   | None     |
    | 0       | yes         | any             | any    | any     | any                      | any   | "marker" |
    | 0       | no          | yes             | no     | any     | any                      | any   | None     |
    | 0       | no          | yes             | yes    | yes     | any                      | any   | "part"   |
    | 0       | no          | yes             | yes    | no      | yes                      | any   | "part"   |
    | 0       | no          | yes             | yes    | no      | no                       | yes   | "part"   |
    | 0       | no          | yes             | yes    | no      | no                       | no    | None     |
    | 0       | no          | no              | any    | any     | yes                      | any   | "quiet"  |
    | 0       | no          | no              | any    | any     | no                       | yes   | "final"  |
    | 0       | no          | no              | any    | any     | no                       | no    | None     |

    A missing expected marker means an interrupted save: its files stay stored but it is never
    committed, so it is never restored as "latest" (transformers #35782), not even at a clean exit.
    `shared`: a multi-node job, where the marker may be on another node. This node's files are then
    a "part", for the cross-rank commit (crossrank.py) to judge: at once when `sharded` (DCP shards
    only, which the coordinator's `.metadata` names: a part missing one cannot commit globally),
    else once quiet, or at the trainer's successful exit.
    """
    if pending > 0:
        return None
    if marker_seen:
        return "marker"
    if marker_expected:
        if not shared:
            return None
        return "part" if sharded or quiet_for >= quiet_limit or final else None
    if quiet_for >= quiet_limit:
        return "quiet"
    return "final" if final else None


@dataclass(frozen=True)
class LastCommit:
    checkpoint: str
    reason: str
    at: float  # monotonic
    step: int | None = None  # as the manifest says
    committed_at: str | None = None  # the manifest's own time: an unchanged re-commit keeps the first


@dataclass
class _Checkpoint:
    last_activity: float
    pending: set[str] = field(default_factory=set)
    stored: dict[str, StoredFile] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    committed: bool = False
    # What due() offered: committed() only counts if the checkpoint is still exactly that.
    offered: tuple[Mapping[str, StoredFile], str] | None = None
    # What the last written manifest lists: a file noticed again but found unchanged commits nothing new.
    manifest_files: Mapping[str, StoredFile] | None = None
    # Files a manifest found in the store at start names (it may list versions this run never saw).
    in_store: set[str] = field(default_factory=set)
    # Files of it may have come and gone unseen (found by a scan, or stored by an earlier run):
    # it commits only once its folder is seen to hold exactly the stored files (`proven`).
    unproven: bool = False
    # Files that can never be stored (a name no store can hold): the checkpoint must never commit.
    unstorable: set[str] = field(default_factory=set)
    # The store lacks stored files of it (`held`): "pruned" (forgotten: a prune deleted exactly
    # these files) or "missing". It does not come due again until a file of it is stored anew.
    held: str | None = None
    # A marker is among `stored` (which only grows): kept here, not searched for on every `due`.
    marker_stored: bool = False


class CheckpointTracker:
    """Per-checkpoint bookkeeping for the upload engine; decisions come from `should_commit`.

    Protocol: `noticed` when a file appears or changes (before it is complete), then `stored` once
    that version is durably stored, or `dropped` if it vanished first. `due` says what to commit;
    the caller writes the manifest from `files(cp)` and `metrics(cp)` and then calls `committed`.
    """

    def __init__(self, markers: tuple[str, ...], quiet_limit: float, *, shared: bool = False) -> None:
        self.markers = tuple(markers)
        self.quiet_limit = quiet_limit
        self.shared = shared  # a multi-node job: see should_commit
        self.last_commit: LastCommit | None = None
        self._checkpoints: dict[str, _Checkpoint] = {}

    def _state(self, checkpoint: str) -> _Checkpoint:
        state = self._checkpoints.get(checkpoint)
        if state is None:
            state = self._checkpoints[checkpoint] = _Checkpoint(last_activity=float("-inf"))
        return state

    def _touch(self, checkpoint: str, now: float) -> _Checkpoint:
        state = self._state(checkpoint)
        state.last_activity = max(state.last_activity, now)
        return state

    def noticed(self, relpath: str, now: float) -> None:
        state = self._touch(checkpoint_of(relpath), now)
        state.pending.add(relpath)
        # SPEC §4: a file changed after commit is uploaded again and the manifest rewritten.
        state.committed = False

    def stored(self, file: StoredFile, now: float) -> None:
        state = self._touch(file.checkpoint, now)
        state.pending.discard(file.relpath)
        if state.stored.get(file.relpath) != file:
            state.held = None  # other content: no longer what the store was found to lack
        state.stored[file.relpath] = file
        state.marker_stored = state.marker_stored or is_marker(file.relpath, self.markers)
        state.committed = False

    def dropped(self, relpath: str, now: float) -> None:
        # An older stored version, if any, stays listed: it is what the store still holds.
        state = self._touch(checkpoint_of(relpath), now)
        state.pending.discard(relpath)

    def unstorable(self, checkpoint: str, name: str, now: float) -> None:
        """A file of `checkpoint` cannot be stored (its name): committing would hand restore a
        checkpoint without it, so the checkpoint stays uncommitted and the drain reports it."""
        state = self._touch(checkpoint, now)
        state.unstorable.add(name)
        state.committed = False

    def unstorable_files(self) -> list[str]:
        return sorted(name for state in self._checkpoints.values() for name in state.unstorable)

    def unproven(self, checkpoint: str) -> None:
        """This run cannot vouch that it saw every file of `checkpoint`: see `_Checkpoint.unproven`."""
        self._state(checkpoint).unproven = True

    def proven(self, checkpoint: str) -> None:
        self._state(checkpoint).unproven = False

    def is_unproven(self, checkpoint: str) -> bool:
        state = self._checkpoints.get(checkpoint)
        return bool(state) and state.unproven

    def held(self, checkpoint: str, *, pruned: bool) -> None:
        """The store lacks stored files of `checkpoint` (daemon.upload.reconcile): it stays
        uncommitted until a file of it is stored anew. `pruned`: a prune deleted exactly these
        files, so it is forgotten, not even reported as uncommitted."""
        self._state(checkpoint).held = "pruned" if pruned else "missing"

    def pruned(self, checkpoint: str) -> None:
        """This run's retention deleted `checkpoint` (or tried: a failed prune may have deleted any
        part): unproven, so the store is checked (reconcile.decide) before a manifest lists it again.

        | committed when pruned       | held     | comes due, then checked          |
        |-----------------------------|----------|----------------------------------|
        | yes (nothing changed since) | "pruned" | once a file of it is stored anew |
        | no (a file changed since)   | None     | once complete                    |

        Still `listed`: an overwrite withdraws first a manifest that a failed prune left."""
        state = self._state(checkpoint)
        state.unproven = True
        if state.committed:
            state.committed, state.held = False, "pruned"

    def listed(self, relpath: str) -> bool:
        """Whether the checkpoint's written manifest names this file: overwriting its object
        would make that manifest lie until it is rewritten."""
        state = self._checkpoints.get(checkpoint_of(relpath))
        if state is None:
            return False
        return relpath in state.in_store or (state.manifest_files is not None and relpath in state.manifest_files)

    def found_in_store(self, checkpoint: str, relpaths: Iterable[str]) -> None:
        """Recovery: a manifest in the store names these files."""
        self._state(checkpoint).in_store.update(relpaths)

    def withdrawn(self, checkpoint: str) -> None:
        """The checkpoint's manifest was deleted from the store: it commits again when due."""
        state = self._state(checkpoint)
        state.committed = False
        state.manifest_files = None
        state.in_store.clear()

    def set_metrics(self, checkpoint: str, metrics: dict[str, Any]) -> None:
        # May come before the marker's stored(): the engine parses the marker while it is pinned.
        self._state(checkpoint).metrics = dict(metrics)

    def files(self, checkpoint: str) -> list[StoredFile]:
        state = self._checkpoints.get(checkpoint)
        return sorted(state.stored.values(), key=lambda f: f.relpath) if state else []

    def metrics(self, checkpoint: str) -> dict[str, Any]:
        state = self._checkpoints.get(checkpoint)
        return dict(state.metrics) if state else {}

    def marker_seen(self, checkpoint: str) -> bool:
        # Once stored, a marker stays seen: a file found late by a rescan, or changed afterwards,
        # belongs to the same save, and demanding a fresh marker would block its commit forever.
        state = self._checkpoints.get(checkpoint)
        return bool(state) and state.marker_stored

    def _reason(self, checkpoint: str, state: _Checkpoint, now: float, final: bool) -> str | None:
        if state.held:  # first: a manifest it had may be gone (pruned)
            return None
        if state.pending:  # should_commit's first rule, ahead of what costs a pass over the files
            return None
        if not state.committed and not state.pending and state.stored == state.manifest_files:
            state.committed = True  # noticed again, found unchanged: the manifest still holds
        if state.committed or not state.stored or state.unstorable:
            return None
        names = [*state.stored, *state.pending]
        top = checkpoint == ROOT_CHECKPOINT
        return should_commit(
            pending=len(state.pending),
            marker_seen=self.marker_seen(checkpoint),
            marker_expected=expects_marker(names, top_level=top),
            quiet_for=now - state.last_activity,
            quiet_limit=self.quiet_limit,
            final=final,
            shared=self.shared and not top,  # files at the top stay each node's own
            sharded=all(name.endswith(".distcp") for name in names),
        )

    def due(self, now: float, final: bool = False) -> list[tuple[str, str]]:
        """(checkpoint, reason) for every checkpoint ready to commit now, in name order.

        `final`: the trainer exited successfully or the daemon drains. A checkpoint stays due
        until `committed`, so a failed manifest write is simply retried on the next call.
        """
        ready = []
        for checkpoint in sorted(self._checkpoints):
            state = self._checkpoints[checkpoint]
            reason = self._reason(checkpoint, state, now, final)
            if reason is not None:
                state.offered = (dict(state.stored), reason)
                ready.append((checkpoint, reason))
        return ready

    def committed(
        self, checkpoint: str, now: float, *, step: int | None = None, committed_at: str | None = None
    ) -> bool:
        """Record that the manifest offered by `due` is written. False (and still uncommitted)
        when a file was noticed or stored meanwhile: the manifest is stale and will come due again.
        """
        state = self._checkpoints.get(checkpoint)
        if state is None or state.offered is None:
            return False
        files, reason = state.offered
        state.offered = None
        if state.pending or files != state.stored:
            return False
        state.committed = True
        state.manifest_files = dict(files)
        self.last_commit = LastCommit(checkpoint, reason, now, step, committed_at)
        return True

    def already_committed(self, checkpoint: str) -> None:
        """Recovery: a manifest in the store already covers exactly the stored files."""
        state = self._state(checkpoint)
        state.committed = not state.pending
        state.manifest_files = dict(state.stored)

    def is_committed(self, checkpoint: str) -> bool:
        state = self._checkpoints.get(checkpoint)
        return bool(state) and state.committed

    def uncommitted(self) -> list[str]:
        """Checkpoints holding files (stored or pending) that no written manifest covers, less the
        pruned ones forgotten (`held`)."""
        return sorted(
            cp
            for cp, state in self._checkpoints.items()
            if not state.committed and state.held != "pruned" and (state.stored or state.pending or state.unstorable)
        )

    def pending_count(self) -> int:
        return sum(len(state.pending) for state in self._checkpoints.values())
