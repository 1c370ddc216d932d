"""Medians and ranges of interleaved rounds, quantiles of lag samples and of Prometheus histograms,
and the linear fit of scaling. Every ratio compares medians of the same run.
"""

from __future__ import annotations

import math
import statistics


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarize(rows: list[dict]) -> dict[str, dict]:
    """tool -> median and min–max of time, MB/s, CPU, peak RSS and the store's CPU, over rounds."""
    out: dict[str, dict] = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        mine = [r for r in rows if r["tool"] == tool]
        gb = mine[0]["bytes"] / 1e9
        walls = [r["wall"] for r in mine]
        rates = [r["bytes"] / 1e6 / r["wall"] for r in mine]
        cpus = [r["cpu"] for r in mine]
        out[tool] = {
            "rounds": len(mine),
            "bytes": mine[0]["bytes"],
            "files": mine[0]["files"],
            "wall": med(walls),
            "wall_range": (min(walls), max(walls)),
            "mbps": med(rates),
            "mbps_range": (min(rates), max(rates)),
            "cpu": med(cpus),
            "cpu_range": (min(cpus), max(cpus)),
            "cpu_per_gb": med(cpus) / gb if gb else math.nan,
            "rss": max(r["rss"] for r in mine),
            "store_cpu": med([r["store_cpu"] for r in mine]),
        }
    return out


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # beyond the last finite bound: that bound is all we know
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return math.nan


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a + b·x, with R²."""
    n = len(xs)
    if n < 2:
        return {"intercept": math.nan, "slope": math.nan, "r2": math.nan}
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else math.nan
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept": intercept, "slope": slope, "r2": 1 - ss_res / ss_tot if ss_tot else math.nan}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan
