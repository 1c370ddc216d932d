"""Run scenarios trial by trial, check every trial, and tally the figures the report shows.

Each trial gets its own seed, derived from the run's seed, the scenario and the trial's index, and
printed with every failure: `--scenario NAME --seed S --only-trial I` replays it.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from servers import S3Server

from reliability.catalog import Scenario
from reliability.checks import verify
from reliability.harness import Trial, TrialTimeout
from reliability.restorecheck import check_restore
from reliability.stores import LocalStore, S3Store

Counter = collections.Counter
MAX_LINES = 40  # violations kept per trial (all are counted)


@dataclass
class Failure:
    index: int
    seed: int
    violations: list[str]
    workdir: str


@dataclass
class Tally:
    scenario: Scenario
    trials: int = 0
    seconds: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    figures: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)


def trial_seed(seed: int, name: str, index: int) -> int:
    return int(hashlib.sha256(f"{seed}:{name}:{index}".encode()).hexdigest()[:12], 16)


def base_folder() -> Path:
    """Trials live under /tmp in a folder anyone can traverse (some run ckptd as nobody)."""
    path = Path(tempfile.mkdtemp(prefix="ckptd-trials-", dir="/tmp"))
    path.chmod(0o755)
    return path


def run_scenario(
    sc: Scenario,
    seed: int,
    full: bool,
    server: Callable[[str], S3Server],
    base: Path,
    trials: int | None = None,
    only: int | None = None,
    keep: bool = False,
    say: Callable[[str], None] = print,
) -> Tally:
    tally = Tally(sc)
    indexes = [only] if only is not None else range(trials if trials is not None else sc.trials[full])
    for index in indexes:
        started = time.monotonic()
        ts = trial_seed(seed, sc.name, index)
        failure = run_trial(sc, index, ts, full, server, base, tally, keep)
        took = time.monotonic() - started
        tally.trials += 1
        tally.seconds += took
        if failure:
            tally.failures.append(failure)
            say(f"FAIL {sc.name} trial {index} (seed {seed}, trial seed {ts}) {took:.1f}s, kept in {failure.workdir}")
            for line in failure.violations[:8]:
                say("    " + line.replace("\n", "\n    "))
        else:
            say(f"ok   {sc.name} trial {index} {took:.1f}s")
    return tally


def run_many(
    chosen: list[Scenario], seed: int, full: bool, server: Callable[[str], S3Server], base: Path, jobs: int = 1,
    **options: object,
) -> dict[str, Tally]:  # fmt: skip
    """Scenarios side by side, `jobs` at a time (trials mostly wait on the writer and the daemon),
    longest first. `server` must be callable from any thread."""
    order = sorted(chosen, key=lambda sc: -sc.budget[full] * sc.trials[full])
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {sc.name: pool.submit(run_scenario, sc, seed, full, server, base, **options) for sc in order}
        return {name: future.result() for name, future in futures.items()}


def _store(sc: Scenario, full: bool, server: Callable[[str], S3Server], workdir: Path, seed: int):
    kind = sc.store_for(full)
    return LocalStore(workdir / "store") if kind == "file" else S3Store(server(kind), seed)


def run_trial(
    sc: Scenario, index: int, seed: int, full: bool, server: Callable[[str], S3Server], base: Path, tally: Tally,
    keep: bool,
) -> Failure | None:  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix=f"{sc.name}-{index}-", dir=base))
    workdir.chmod(0o755)
    store = _store(sc, full, server, workdir, seed)
    t = Trial(sc.name, index, seed, workdir, store, sc.budget[full])
    counts: Counter[str] = Counter()
    try:
        sc.run(t, full)
        if sc.expect_exit is not None and t.exit_codes and t.exit_codes[-1] != sc.expect_exit:
            t.violations.append(f"exit: ckptd exited {t.exit_codes[-1]}, expected {sc.expect_exit}")
        history, committed = verify(t, counts)
        check_restore(t, history, committed, counts)
    except TrialTimeout as e:
        t.violations.append(f"hang: {e}; every process of the trial was killed")
    except Exception as e:
        where = "".join(traceback.format_list(traceback.extract_tb(e.__traceback__)[-2:])).rstrip()
        t.violations.append(f"error: {type(e).__name__}: {e}\n{where}")
    finally:
        t.finish()
        _account(t, store, counts, tally)
        if t.violations and isinstance(store, S3Store):
            _save_proxy_log(store, workdir / "proxy.jsonl")
        store.close()
    if len(t.violations) > MAX_LINES:  # a loop followed 40 deep names thousands of paths
        t.violations[MAX_LINES:] = [f"... and {len(t.violations) - MAX_LINES} more violations"]
    if not t.violations:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        return None
    (workdir / "violations.txt").write_text("\n".join(t.violations) + "\n")
    facts = {"blind": t.blind, "exit_codes": t.exit_codes, "faults": t.faults, "notes": t.notes, "seed": seed}
    (workdir / "trial.json").write_text(json.dumps(facts, default=str, indent=1))
    tally.counts["failed_trials"] += 1
    return Failure(index, seed, list(t.violations), str(workdir))


def _account(t: Trial, store, counts: Counter[str], tally: Tally) -> None:
    if isinstance(store, S3Store):
        counts["bytes_sent"] += store.sent_bytes()
        tally.faults.update(store.proxy.injected)
    else:
        counts["bytes_sent"] += sum(e.get("bytes", 0) for d in t.daemons for e in d.events("uploaded"))
    tally.faults.update(t.faults)
    tally.counts.update(counts)
    tally.figures.update(t.figures)
    for line in t.violations:
        tally.counts["violations_" + line.split(":", 1)[0]] += 1


def _save_proxy_log(store: S3Store, path: Path) -> None:
    """What went through the proxy, for the post-mortem of a failed trial."""
    with open(path, "w") as f:
        for r in store.proxy.requests():
            f.write(json.dumps({**dataclasses.asdict(r), "query": {k: v[:12] for k, v in r.query.items()}}) + "\n")


class Servers:
    """S3 servers for a run outside pytest: started on first use, stopped at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, object] = {}

    def __call__(self, kind: str) -> S3Server:
        import servers

        if kind not in self.started:
            start = {"moto": servers.start_moto, "juicefs": servers.start_juicefs}[kind]
            self.started[kind] = start(self.folder / kind)
        return self.started[kind].server  # type: ignore[attr-defined]

    def stop(self) -> None:
        for proc in self.started.values():
            proc.stop()  # type: ignore[attr-defined]


def machine() -> str:
    lines = Path("/proc/meminfo").read_text().splitlines()
    mem = next((line.split()[1] for line in lines if line.startswith("MemTotal")), "0")
    return f"{os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs, {int(mem) // 1024 // 1024} GiB RAM"
