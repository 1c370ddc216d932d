"""Markdown tables of upload/restore summaries and of scaling (one line per tool)."""

from __future__ import annotations

from .stats import linear_fit
from .targets import marginal_per_file, scaling

MiB = 1 << 20


def upload_table(summary: dict) -> list[str]:
    out = [
        "| tool | time s | MB/s | CPU-s | CPU-s/GB | peak RSS MiB | store CPU-s |",
        "|---|---|---|---|---|---|---|",
    ]
    for tool, s in summary.items():
        (w0, w1), (m0, m1) = s["wall_range"], s["mbps_range"]
        out.append(
            f"| {tool} | {s['wall']:.2f} ({w0:.2f}–{w1:.2f}) | {s['mbps']:.0f} ({m0:.0f}–{m1:.0f}) "
            f"| {s['cpu']:.2f} | {s['cpu_per_gb']:.2f} | {s['rss'] / MiB:.0f} | {s['store_cpu']:.2f} |"
        )
    return out


def scaling_table(res: dict) -> list[str]:
    by_tool = scaling(res)
    first = next(iter(by_tool.values()), {})
    sizes = sorted((k for k in first if k.startswith("size-")), key=lambda k: first[k]["bytes"])
    counts = sorted((k for k in first if k.startswith("files-")), key=lambda k: first[k]["files"])
    head = [f"{k[5:]}: s (s/GB, CPU-s)" for k in sizes] + [f"{k[6:]} files: s (ms/file, CPU-s)" for k in counts]
    head += ["marginal ms/file", "fit: s = a + b·GB"]
    out = ["| tool | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for tool, cases in by_tool.items():
        cells = []
        for k in sizes:
            s = cases.get(k)
            cells.append(f"{s['wall']:.2f} ({s['wall'] / (s['bytes'] / 1e9):.2f}, {s['cpu']:.2f})" if s else "n/a")
        for k in counts:
            s = cases.get(k)
            cells.append(f"{s['wall']:.2f} ({1000 * s['wall'] / s['files']:.2f}, {s['cpu']:.2f})" if s else "n/a")
        cells.append(f"{1000 * marginal_per_file(cases):.2f}")
        pts = [(cases[k]["bytes"] / 1e9, cases[k]["wall"]) for k in sizes if k in cases]
        fit = linear_fit([p[0] for p in pts], [p[1] for p in pts])
        cells.append(f"a = {fit['intercept']:.2f} s, b = {fit['slope']:.2f} s/GB, R² = {fit['r2']:.3f}")
        out.append(f"| {tool} | " + " | ".join(cells) + " |")
    return [*out, ""]
