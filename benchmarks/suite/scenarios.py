"""The seven scenarios: each runs its rounds interleaved (A B C D A B C D ...) and returns its raw
rows. A run that fails is recorded with its error and left out of the medians, so one broken tool
does not cost the whole report.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from . import data, interfere, lag, restore, upload
from .store import Store
from .tools import TOOLS

TITLES = {
    "1": "One big file",
    "2": "A Hugging Face-like checkpoint",
    "3": "Many small files",
    "4": "Restore",
    "5": "Lag",
    "6": "Interference with a training loop",
    "7": "Scaling",
}


def _attempt(label: str, run: Callable[[], dict]) -> dict:
    started = time.monotonic()
    try:
        row = run()
        print(f"  {label}: {row.get('wall', 0):.2f} s ({time.monotonic() - started:.0f} s in all)", file=sys.stderr)
        return row
    except Exception as e:
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def _uploads(store: Store, work: Path, cases: dict[str, data.Dataset], opts: dict, variant: dict) -> dict:
    out: dict[str, list[dict]] = {}
    for case, dataset in cases.items():
        rows = out.setdefault(case, [])
        for rnd in range(opts["rounds"]):
            for tool in TOOLS:
                row = _attempt(
                    f"{case} round {rnd + 1} {tool}",
                    lambda t=tool, d=dataset: upload.run_round(store, t, d, work, {**opts, **variant}),
                )
                rows.append({"tool": tool, "round": rnd + 1, **row})
    return out


def scenario_1(store: Store, work: Path, opts: dict) -> dict:
    out = _uploads(store, work, {"dirty": data.single(opts["s1_bytes"])}, opts, {})
    variant = data.single(opts["variant_bytes"])
    out |= _uploads(store, work, {"cold": variant}, opts, {"cold": True})
    out |= _uploads(store, work, {"fsynced": variant}, opts, {"fsync": True})
    return out


def scenario_2(store: Store, work: Path, opts: dict) -> dict:
    return _uploads(store, work, {"hf": opts["s2"]}, opts, {})


def scenario_3(store: Store, work: Path, opts: dict) -> dict:
    return _uploads(store, work, {"small": opts["s3"]}, opts, {})


def scenario_4(store: Store, work: Path, opts: dict) -> dict:
    sets = {"one-file": restore.as_checkpoint(data.single(opts["s1_bytes"]), 1), "hf": opts["s2"]}
    bucket = restore.seed(store, work, sets, opts["settle"])
    out: dict[str, list[dict]] = {}
    try:
        for case, dataset in sets.items():
            for rnd in range(opts["rounds"]):
                for tool in TOOLS:
                    row = _attempt(
                        f"restore {case} round {rnd + 1} {tool}",
                        lambda t=tool, c=case, d=dataset: restore.run_round(store, t, bucket, c, d, work),
                    )
                    out.setdefault(case, []).append({"tool": tool, "round": rnd + 1, **row})
    finally:
        store.drop_bucket(bucket)
    return out


def scenario_5(store: Store, work: Path, opts: dict) -> dict:
    out: dict[str, list[dict]] = {"ckptd": [], "sync": []}
    for rnd in range(opts["rounds"]):
        out["ckptd"].append({"round": rnd + 1, **_attempt("lag ckptd", lambda: lag.run_ckptd(store, work, opts))})
        out["sync"].append({"round": rnd + 1, **_attempt("lag aws sync", lambda: lag.run_sync(store, work, opts))})
    return out


def scenario_6(store: Store, work: Path, opts: dict) -> dict:
    rows = []
    interfere.pin_store(store)
    try:
        for rnd in range(opts["rounds"]):
            row = _attempt(f"interference round {rnd + 1}", lambda: interfere.run_round(store, opts["s2"], work, opts))
            rows.append({"round": rnd + 1, **row})
    finally:
        interfere.unpin_store(store)
    return {"rounds": rows}


def scenario_7(store: Store, work: Path, opts: dict) -> dict:
    cases = {f"size-{n // data.MiB}MiB": data.single(n) for n in opts["s7_sizes"]}
    cases |= {f"files-{n}": data.many(n, opts["s7_file_bytes"]) for n in opts["s7_counts"]}
    return _uploads(store, work, cases, opts, {})


RUN = {"1": scenario_1, "2": scenario_2, "3": scenario_3, "4": scenario_4, "5": scenario_5, "6": scenario_6}
RUN["7"] = scenario_7
