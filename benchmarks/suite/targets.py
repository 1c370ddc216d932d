"""Issue 13's targets, checked from the medians of one run: each check is (target, measured, met).
A check whose inputs are missing (a scenario not run, a tool that failed) is reported as unknown.
"""

from __future__ import annotations

import math

from .stats import med, quantile, ratio, summarize

MiB = 1 << 20


def ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def _check(target: str, value: float, met: bool, fmt: str = "{:.2f}×") -> dict:
    if math.isnan(value):
        return {"target": target, "measured": "n/a", "met": None}
    return {"target": target, "measured": fmt.format(value), "met": bool(met)}


def _faster(s: dict, peer: str, at_least: float, what: str) -> dict:
    if "ckptd" not in s or peer not in s:
        return {"target": what, "measured": "n/a", "met": None}
    r = ratio(s["ckptd"]["mbps"], s[peer]["mbps"])
    return _check(what, r, r >= at_least)


def scenario_1(res: dict) -> list[dict]:
    s = summarize(ok(res.get("dirty", [])))
    checks = [
        _faster(s, "s5cmd", 1.3, "throughput ≥ 1.3× s5cmd (defaults)"),
        _faster(s, "s5cmd-tuned", 1.05, "throughput ≥ 1.05× s5cmd tuned"),
        _faster(s, "aws", 1.3, "throughput ≥ 1.3× AWS CLI"),
    ]
    for peer, limit, name in (("s5cmd", 0.5, "s5cmd (defaults)"), ("aws", 0.7, "AWS CLI")):
        r = ratio(s["ckptd"]["cpu_per_gb"], s[peer]["cpu_per_gb"]) if {"ckptd", peer} <= s.keys() else math.nan
        checks.append(_check(f"CPU-s/GB ≤ {limit}× {name}", r, r <= limit))
    rss = s["ckptd"]["rss"] / MiB if "ckptd" in s else math.nan
    checks.append(_check("peak RSS ≤ 120 MiB", rss, rss <= 120, "{:.0f} MiB"))
    return checks


def total_time(res: dict, case: str) -> list[dict]:
    s = summarize(ok(res.get(case, [])))
    peers = [v["wall"] for k, v in s.items() if k != "ckptd"]
    r = ratio(s["ckptd"]["wall"], min(peers)) if "ckptd" in s and peers else math.nan
    return [_check("total time ≤ the best peer's (ckptd ÷ best)", r, r <= 1.0)]


def scenario_4(res: dict) -> list[dict]:
    return [
        _faster(summarize(ok(rows)), "s5cmd", 1.1, f"{case}: throughput ≥ 1.1× s5cmd") for case, rows in res.items()
    ]


def lag_quantiles(rows: list[dict]) -> dict:
    lags = [x for r in ok(rows) for x in r["lags"]]
    return {"n": len(lags), "p50": quantile(lags, 0.5), "p99": quantile(lags, 0.99), "max": max(lags, default=math.nan)}


def scenario_5(res: dict, settle: float) -> list[dict]:
    mine, sync = lag_quantiles(res.get("ckptd", [])), lag_quantiles(res.get("sync", []))
    limit = settle + 0.5
    return [
        _check(f"p99 lag ≤ settle + 0.5 s = {limit:.2f} s", mine["p99"], mine["p99"] <= limit, "{:.2f} s"),
        _check("p99 ≥ 5× better than `aws s3 sync` every 5 s", r := ratio(sync["p99"], mine["p99"]), r >= 5),
    ]


def slowdowns(res: dict) -> dict:
    """tool -> median over rounds of (median step while it uploads ÷ median step idle − 1), in %."""
    out = {}
    for tool in ("ckptd", "s5cmd"):
        per = [100 * (r[tool]["median_step"] / r["idle"]["median_step"] - 1) for r in ok(res.get("rounds", []))]
        out[tool] = med(per)
    return out


def scenario_6(res: dict) -> list[dict]:
    s = slowdowns(res)
    return [
        _check("slowdown with ckptd ≤ 5 %", s["ckptd"], s["ckptd"] <= 5, "{:.1f} %"),
        _check("≤ half of s5cmd's (ckptd ÷ s5cmd)", r := ratio(s["ckptd"], s["s5cmd"]), r <= 0.5),
    ]


def scaling(res: dict) -> dict:
    """tool -> {case: summary} for every scaling case."""
    out: dict[str, dict] = {}
    for case, rows in res.items():
        for tool, summary in summarize(ok(rows)).items():
            out.setdefault(tool, {})[case] = summary
    return out


def scenario_7(res: dict) -> list[dict]:
    by_tool = scaling(res)
    mine = by_tool.get("ckptd", {})
    sizes = sorted((v["bytes"], v["wall"]) for k, v in mine.items() if k.startswith("size-"))
    # Linear in bytes: the time per GB of the largest size no more than 1.25× that of the middle one
    # (the smallest carries the fixed start-up cost of a multipart upload).
    r = ratio(sizes[-1][1] / sizes[-1][0], sizes[-2][1] / sizes[-2][0]) if len(sizes) >= 2 else math.nan
    checks = [_check("linear in bytes: s/GB at the largest ÷ s/GB at the next", r, r <= 1.25)]
    checks.append(_per_file(by_tool))
    return checks


def marginal_per_file(cases: dict) -> float:
    """Seconds per extra file between the two largest counts: the per-file cost, fixed costs aside."""
    pts = sorted((v["files"], v["wall"]) for k, v in cases.items() if k.startswith("files-"))
    if len(pts) < 2 or pts[-1][0] == pts[-2][0]:
        return math.nan
    return (pts[-1][1] - pts[-2][1]) / (pts[-1][0] - pts[-2][0])


def _per_file(by_tool: dict) -> dict:
    counts = sorted(v["files"] for k, v in by_tool.get("ckptd", {}).items() if k.startswith("files-"))
    top = f"{counts[-1]:,}" if counts else "the largest count"
    mine = marginal_per_file(by_tool.get("ckptd", {}))
    peer = marginal_per_file(by_tool.get("s5cmd", {}))
    r = ratio(mine, peer) if peer > 0 else math.nan
    return _check(f"per-file overhead at {top} files within 2× of s5cmd's (marginal s/file, ckptd ÷ s5cmd)", r, r <= 2)
