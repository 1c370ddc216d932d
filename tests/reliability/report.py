"""docs/reliability.md, written from a run's tallies."""

from __future__ import annotations

import collections
import re
import sys
from datetime import UTC, datetime

from reliability.checks import __doc__ as INVARIANTS
from reliability.runner import Tally

COMMAND = ".venv/bin/python -m tests.reliability --full"
LOST = ("files_lost",)
CORRUPT = ("files_corrupt", "manifest_mismatches", "torn_commits", "wrong_restores")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.2f}"


def _ratio(sent: int, stored: int) -> str:
    return f"{sent / stored:.2f}" if stored else "-"


def render(tallies: list[Tally], seed: int, seconds: float, full: bool, machine: str, argv: list[str]) -> str:
    total = collections.Counter()
    faults = collections.Counter()
    for t in tallies:
        total.update(t.counts)
        faults.update(t.faults)
    trials = sum(t.trials for t in tallies)
    failed = sum(len(t.failures) for t in tallies)
    lost = sum(total[k] for k in LOST)
    corrupt = sum(total[k] for k in CORRUPT)
    out = [
        "# Reliability trials",
        "",
        f"Written by `{COMMAND}` (this run: `{' '.join(['python -m tests.reliability', *argv])}`).",
        "Replay one trial: `.venv/bin/python -m tests.reliability --scenario NAME --seed SEED --only-trial I`.",
        "The short run (a few trials per scenario) is `tests/reliability/test_trials.py`, in the default suite.",
        "The full run takes about 11 minutes on 2 cores with `--jobs 2` (the default), about 20 with `--jobs 1`;",
        "it needs root (a tmpfs is mounted, ckptd runs as nobody via `setpriv`), libfaketime (`apt-get install "
        "faketime`) and the test extras (moto, the JuiceFS gateway for the 2 GiB files).",
        "",
        f"- run: {'full' if full else 'partial'}, seed {seed}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{seconds / 60:.1f} min on {machine}",
        f"- trials: {trials}, failed: {failed}",
        f"- files lost: **{lost}**, corrupt: **{corrupt}**, orphaned multipart uploads: "
        f"**{total['orphaned_uploads']}**, leaked (ignored, planted or outside files stored): "
        f"**{total['files_leaked']}**, hangs: **{total['violations_hang']}**",
        f"- bytes verified: {_mib(total['bytes_verified'] + total['bytes_restored'])} MiB "
        f"({total['files_checked']} stored files compared with the writer's record, "
        f"{total['files_restored']} restored files compared with their manifests)",
        f"- excused: {total['excused_files']} files completed and deleted while no ckptd could pin them "
        f"(killed, or not yet started), {total['completed_after_drain']} completed after the last drain began",
        f"- faults injected: {', '.join(f'{k} {v}' for k, v in sorted(faults.items())) or 'none'}",
        "",
        "## Scenarios",
        "",
        "| scenario | trials | failed | faults injected | MiB verified | lost | corrupt | orphaned | "
        "sent/stored | what it does |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        c = t.counts
        injected = ", ".join(f"{k} {v}" for k, v in sorted(t.faults.items())) or "-"
        out.append(
            f"| {t.scenario.name} | {t.trials} | {len(t.failures)} | {injected} | "
            f"{_mib(c['bytes_verified'] + c['bytes_restored'])} | {sum(c[k] for k in LOST)} | "
            f"{sum(c[k] for k in CORRUPT)} | {c['orphaned_uploads']} | {_ratio(c['bytes_sent'], c['bytes_stored'])} | "
            f"{t.scenario.about} |"
        )
    out += _resume(tallies) + _failures(tallies, seed)
    out += ["", "## Invariants checked after every trial", "", INVARIANTS or ""]
    return "\n".join(out).rstrip() + "\n"


def _resume(tallies: list[Tally]) -> list[str]:
    out = [
        "",
        "## Resume after crashes",
        "",
        "sent/stored above is the bytes ckptd sent to store objects (every attempt, through the fault proxy; "
        "for file:// stores, completed uploads) over the bytes finally stored: 1.00 means nothing was sent twice.",
    ]
    for t in tallies:
        f = t.figures
        if f["parts"]:
            out.append(
                f"- {t.scenario.name}: {f['parts']} parts; at the SIGKILL {f['parts_stored_at_kill']} stored and "
                f"{f['parts_in_flight_at_kill']} in flight; after the restart {f['parts_resent']} re-sent "
                f"({_mib(f['bytes_resent'])} MiB)."
            )
        if "reuploaded_after_recovery" in f:
            out.append(f"- {t.scenario.name}: {f['reuploaded_after_recovery']} files uploaded again after recovery.")
    return out


def _kind(violation: str) -> str:
    """A violation without its particulars: 'lost: ... was completed but is not stored'."""
    return re.sub(r"'[^']*'|\d+", "…", violation.splitlines()[0])


def _failures(tallies: list[Tally], seed: int) -> list[str]:
    out = ["", "## Failures", ""]
    for t in tallies:
        if not t.failures:
            continue
        kinds = collections.Counter(k for f in t.failures for k in {_kind(v) for v in f.violations})
        out.append(f"- **{t.scenario.name}**: {len(t.failures)} of {t.trials} trials failed; in how many of them:")
        out += [f"  - {n}× {kind}" for kind, n in kinds.most_common(6)]
        replay = ", ".join(str(f.index) for f in t.failures[:8])
        out.append(f"  - replay: `--scenario {t.scenario.name} --seed {seed} --only-trial I`, I in {replay}")
    if len(out) == 3:
        out.append("None.")
    return out


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}", file=sys.stderr)
