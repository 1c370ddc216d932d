"""`python -m tests.reliability`: run the reliability trials; `--full` writes docs/reliability.md.

.venv/bin/python -m tests.reliability --full                  # every scenario, full trial counts
.venv/bin/python -m tests.reliability --scenario sigkill-daemon --trials 5 --seed 42
.venv/bin/python -m tests.reliability --scenario fault-stall --seed 42 --only-trial 3
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # servers, faults and this package, as the test suite imports them

from nobody import checkout_reachable  # noqa: E402 - needs the path above

from reliability import report  # noqa: E402
from reliability.catalog import SCENARIOS  # noqa: E402
from reliability.runner import Servers, base_folder, machine, run_many  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="full counts, long outages, 2 GiB files; writes the report")
    p.add_argument("--scenario", action="append", default=[], help="scenario name or glob (repeatable); default all")
    p.add_argument("--trials", type=int, help="trials per scenario (default: the scenario's short or full count)")
    p.add_argument("--seed", type=int, help="the run's seed (default: random, printed)")
    p.add_argument("--only-trial", type=int, help="run only this trial index (with --seed, replays it)")
    p.add_argument("--jobs", type=int, default=2, help="scenarios run side by side (default 2)")
    p.add_argument("--keep", action="store_true", help="keep every trial's folder, not only failed ones")
    p.add_argument("--report", help="write the report here (default with --full: docs/reliability.md)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p.parse_args(argv)


def code() -> str:
    """The daemon code the trials ran: its git commit (dirty if edited), or CKPTD_CODE_VERSION."""
    found = subprocess.run(["git", "-C", str(TESTS.parent), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    return os.environ.get("CKPTD_CODE_VERSION") or found.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:30} {sc.trials[0]:>3} {sc.trials[1]:>4}  {sc.about}")
        return 0
    chosen = [sc for sc in SCENARIOS if not args.scenario or any(fnmatch.fnmatch(sc.name, p) for p in args.scenario)]
    if not chosen:
        print(f"no scenario matches {args.scenario}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    print(f"seed {seed}: {len(chosen)} scenario(s), {'full' if args.full else 'short'} run", flush=True)
    base = base_folder()
    servers = Servers(base / "servers")
    started = time.monotonic()
    say = lambda line: print(line, flush=True)  # noqa: E731
    options = {"trials": args.trials, "only": args.only_trial, "keep": args.keep, "say": say}
    with checkout_reachable():  # some trials run ckptd as nobody
        try:
            for kind in {sc.store_for(args.full) for sc in chosen} - {"file"}:
                servers(kind)  # started here, not in the pool's threads
            found = run_many(chosen, seed, args.full, servers, base, args.jobs, **options)
            tallies = [found[sc.name] for sc in chosen]
        finally:
            servers.stop()
    took = time.monotonic() - started
    failed = sum(len(t.failures) for t in tallies)
    print(f"{sum(t.trials for t in tallies)} trials, {failed} failed, {took / 60:.1f} min, seed {seed}")
    target = args.report or ("docs/reliability.md" if args.full else None)
    if target:
        report.write(target, report.render(tallies, seed, took, args.full, f"{machine()}; code {code()}", argv))
    if failed or args.keep:
        print(f"{'trials' if args.keep else 'failed trials'} are kept under {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
