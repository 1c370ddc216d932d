"""docs/benchmarks.md: written by the suite from its raw results, with the charts and raw.json
beside it (in a folder named after the report)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from . import charts, targets
from .scenarios import TITLES
from .stats import histogram_quantile, med, summarize
from .tables import scaling_table, upload_table

MiB = 1 << 20
CASES = {
    "1": {"dirty": "dirty page cache (as a trainer leaves it)", "cold": "cold page cache", "fsynced": "fsynced"},
    "2": {"hf": "the checkpoint"},
    "3": {"small": "the files"},
    "4": {"one-file": "the file of scenario 1", "hf": "the checkpoint of scenario 2"},
}


NOTES = {
    "1": "Time is from the rename to stored; for ckptd it includes its settle time ({settle} s), for which a "
    "file must be unchanged before ckptd takes it as complete.",
    "2": "2 × 1 GiB weights, 20 × 10 MiB optimizer shards and 200 JSON files (trainer_state.json last), "
    "written as `tmp-checkpoint-100/` and renamed to `checkpoint-100/` (the Hugging Face Trainer's way).",
    "4": "The page cache is dropped before every run (sync; drop_caches), the programs' own files included, "
    "as in a fresh pod. `ckptd restore` is timed from process start to exit and verifies every file's "
    "SHA-256; the peers verify nothing beyond what the protocol does. Scenario 1's file is stored as "
    "`checkpoint-1/` with a marker (restore takes committed checkpoints only).",
    "6": "Training loop: fixed work per step (numpy 512×512 matmuls on one BLAS thread and a pure-Python "
    "part), `taskset -c 0`; the store pinned to core 1; the uploaders unpinned. ckptd runs at its default "
    "priority here (no --nice/--io-priority).",
    "7": "One file of each size; then N files of {kib} KiB in one checkpoint folder.",
}


def write(results: dict, path: Path) -> None:
    assets = path.with_suffix("")  # docs/benchmarks.md -> docs/benchmarks/
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "raw.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    lines = _header(results, assets.name)
    for key, res in results["scenarios"].items():
        settings = results["settings"]
        lines += [f"## {key}. {TITLES[key]}", ""]
        if key in NOTES:
            lines += [NOTES[key].format(settle=settings["settle"], kib=settings["s7_file_bytes"] // 1024), ""]
        lines += [*_targets(key, res, settings), ""]
        lines += _body(key, res, results["settings"])
        if key in charts.CHARTS:
            charts.CHARTS[key](res, assets / f"scenario-{key}.png")
            lines += [f"![scenario {key}]({assets.name}/scenario-{key}.png)", ""]
        lines += _errors(res)
    path.write_text("\n".join(lines).rstrip() + "\n")


def _header(results: dict, assets: str) -> list[str]:
    m, v, s = results["meta"]["machine"], results["meta"]["versions"], results["settings"]
    rounds = f"{s['rounds']} round{'s' if s['rounds'] != 1 else ''}"
    return [
        "# Benchmarks",
        "",
        f"Written by `{results['command']}` on {results['meta']['date']}; raw results: [raw.json]({assets}/raw.json).",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB memory, {m['kernel']}. "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "",
        f"Method: {rounds} interleaved (ckptd, s5cmd, s5cmd tuned, AWS CLI, then again), medians "
        "with min–max. Store: a JuiceFS gateway on 127.0.0.1 sharing the cores. Data: random bytes written "
        "under a temporary name and not fsynced, then renamed into the checkpoint folder; `ckptd watch` "
        f"is already running (`--nice 0 --io-priority normal --settle-time {s['settle']}`) and is timed "
        "from the rename to its log's last `uploaded` line, confirmed by listing the store; a peer's "
        "command starts right after the rename and is timed to its exit. CPU is user + system of the "
        "whole process tree from the OS (wait4 for a peer; /proc utime+stime+cutime+cstime over the "
        "daemon's tree before and after); peak RSS is the largest process's (ckptd: VmHWM of each of "
        "its processes, start-up included). The store's CPU is its own column. s5cmd tuned: "
        "`cp --concurrency 8 --part-size 16`.",
        "",
    ]


def _targets(key: str, res: dict, settings: dict) -> list[str]:
    checks = {
        "1": lambda: targets.scenario_1(res),
        "2": lambda: targets.total_time(res, "hf"),
        "3": lambda: targets.total_time(res, "small"),
        "4": lambda: targets.scenario_4(res),
        "5": lambda: targets.scenario_5(res, settings["settle"]),
        "6": lambda: targets.scenario_6(res),
        "7": lambda: targets.scenario_7(res),
    }[key]()
    mark = {True: "met", False: "**missed**", None: "unknown"}
    rows = [f"| {c['target']} | {c['measured']} | {mark[c['met']]} |" for c in checks]
    return ["| target | measured | |", "|---|---|---|", *rows]


def _body(key: str, res: dict, settings: dict) -> list[str]:
    if key == "5":
        return _lag(res)
    if key == "6":
        return _interference(res)
    if key == "7":
        return scaling_table(res)
    out = []
    for case, rows in res.items():
        name = CASES.get(key, {}).get(case, case)
        s = summarize(targets.ok(rows))
        if s:
            first = next(iter(s.values()))
            files = f"{first['files']:,} file{'s' if first['files'] != 1 else ''}"
            out += [f"**{name}**: {files}, {first['bytes'] / MiB:,.0f} MiB", ""]
            out += [*upload_table(s), ""]
    return out


def _lag(res: dict) -> list[str]:
    out = ["| sidecar | files | p50 s | p99 s | max s |", "|---|---|---|---|---|"]
    for key, label in (("ckptd", "ckptd, external observer"), ("sync", "`aws s3 sync` every 5 s")):
        q = targets.lag_quantiles(res.get(key, []))
        out.append(f"| {label} | {q['n']} | {q['p50']:.2f} | {q['p99']:.2f} | {q['max']:.2f} |")
    hists = [r["histogram"] for r in targets.ok(res.get("ckptd", []))]
    p50 = med([histogram_quantile(0.5, h) for h in hists])
    p99 = med([histogram_quantile(0.99, h) for h in hists])
    out.append(f"| ckptd, its `ckptd_upload_lag_seconds` (from buckets) | | {p50:.2f} | {p99:.2f} | |")
    return [
        *out,
        "",
        "Its histogram measures from the moment ckptd judged the file complete (after the settle time).",
        "",
    ]


def _interference(res: dict) -> list[str]:
    out = ["| round | idle step ms | with ckptd ms | with s5cmd ms | ckptd upload s | s5cmd upload s |"]
    out.append("|---|---|---|---|---|---|")
    for r in targets.ok(res.get("rounds", [])):
        ms = " | ".join(f"{r[k]['median_step'] * 1000:.1f}" for k in ("idle", "ckptd", "s5cmd"))
        out.append(f"| {r['round']} | {ms} | {r['ckptd']['wall']:.1f} | {r['s5cmd']['wall']:.1f} |")
    s = targets.slowdowns(res)
    return [*out, "", f"Median slowdown: ckptd {s['ckptd']:.1f} %, s5cmd {s['s5cmd']:.1f} %.", ""]


def _errors(res: dict) -> list[str]:
    rows = [r for rows in res.values() for r in rows if "error" in r]
    if not rows:
        return []
    return [
        "Failed runs (left out of the medians):",
        "",
        *(f"- {r.get('tool', '')} round {r.get('round')}: `{r['error'][:300]}`" for r in rows),
        "",
    ]


def fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec)
