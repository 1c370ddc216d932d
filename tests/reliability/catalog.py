"""Every scenario, with its store, its trial counts (short run, full run) and its time bound."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from faults import KINDS

from reliability import bigfiles, defects, scenarios
from reliability.harness import Trial


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Trial, bool], None]
    store: tuple[str, str]  # (short run, full run): "file", "moto" or "juicefs"
    trials: tuple[int, int]  # (short run, full run)
    budget: tuple[float, float]  # hard bound per trial, seconds (short run, full run)
    expect_exit: int | None = 0  # the last ckptd's exit code; None: the scenario checks it itself
    defect: str = ""

    @property
    def about(self) -> str:
        return " ".join((self.run.__doc__ or "").split("\n\n")[0].split())

    def store_for(self, full: bool) -> str:
        return self.store[full]


def _s(name, run, store, trials, budget=(90, 150), expect_exit=0, defect="") -> Scenario:
    store = (store, store) if isinstance(store, str) else store
    return Scenario(name, run, store, trials, budget, expect_exit, defect)


SCENARIOS = [
    _s("sigkill-daemon", scenarios.sigkill_daemon, "moto", (2, 100)),
    _s("kill-mid-checkpoint", scenarios.kill_mid_checkpoint, "moto", (1, 3)),
    _s("rotate-at-restart", scenarios.rotate_at_restart, "file", (1, 3)),
    _s("drain-after-save", scenarios.drain_after_save, "file", (1, 3)),
    _s("sigkill-trainer", scenarios.sigkill_trainer, "file", (1, 8), expect_exit=None),
    *[_s(f"fault-{k}", scenarios.store_fault(k), "moto", (1, 1 if k == "stall" else 3), (90, 400)) for k in KINDS],
    _s("lost-create-answer", scenarios.create_reset, "moto", (1, 2)),
    _s("outage", scenarios.long_outage, "moto", (1, 1), (90, 300)),
    _s("disk-full", scenarios.disk_full, "file", (1, 3), defect="4"),
    _s("hf-rotation", scenarios.rotation, "file", (1, 4)),
    _s("rewrites", scenarios.rewrites, "moto", (1, 6)),
    _s("lost-inotify", scenarios.lost_events, "file", (1, 2), (150, 200)),
    _s("clock-jumps", scenarios.clock_jumps, "moto", (1, 4)),
    _s("pod-shutdown", bigfiles.pod_shutdown, ("moto", "juicefs"), (1, 1), (120, 600)),
    _s("multipart-resume", bigfiles.multipart_resume, ("moto", "juicefs"), (1, 1), (120, 600)),
    _s("defect1-symlinks-out", defects.symlinks_out, "file", (2, 4), defect="1"),
    _s("defect2-restore-links", defects.restore_links, "file", (1, 2), expect_exit=None, defect="2"),
    _s("defect3-special-files", defects.special_files, "file", (2, 4), defect="3"),
    _s("defect4-unreadable", defects.unreadable, "file", (1, 2), expect_exit=None, defect="4"),
    _s("defect5-rewrite-committed", defects.rewrite_committed, "moto", (1, 5), defect="5"),
    _s("defect6-sigterm-markerless", defects.sigterm_markerless, "file", (1, 3), expect_exit=None, defect="6"),
    _s("defect7-non-utf8-name", defects.unstorable_name("bad-\udcff.bin"), "file", (1, 2), (90, 150), None, "7"),
    _s("defect7-newline-name", defects.unstorable_name("new\nline.bin"), "moto", (1, 2), (90, 150), None, "7"),
    _s("defect8-garbage-journal", defects.garbage_journal, "file", (2, 8), defect="8"),
    _s("defect9-trainer-children", defects.trainer_children, "file", (1, 2), expect_exit=None, defect="9"),
]
BY_NAME = {s.name: s for s in SCENARIOS}
