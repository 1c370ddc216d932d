"""PNG charts of scenarios 1, 5 and 7 (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .stats import summarize
from .targets import ok, scaling
from .tools import TOOLS


def scenario_1(res: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    cases = [c for c in ("dirty", "cold", "fsynced") if c in res]
    width = 0.8 / len(TOOLS)
    for i, tool in enumerate(TOOLS):
        rates, errs, cpus = [], [[], []], []
        for case in cases:
            s = summarize(ok(res[case])).get(tool)
            rates.append(s["mbps"] if s else 0)
            errs[0].append(s["mbps"] - s["mbps_range"][0] if s else 0)
            errs[1].append(s["mbps_range"][1] - s["mbps"] if s else 0)
            cpus.append(s["cpu_per_gb"] if s else 0)
        xs = [j + i * width for j in range(len(cases))]
        left.bar(xs, rates, width, yerr=errs, label=tool, capsize=3)
        right.bar(xs, cpus, width, label=tool)
    for ax, title in ((left, "MB/s (median, min–max)"), (right, "CPU-s per GB (median)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases)
        ax.set_title(title)
    left.legend()
    fig.suptitle("Scenario 1: one big file, renamed into the folder")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scenario_5(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("ckptd", "ckptd"), ("sync", "aws s3 sync every 5 s")):
        lags = sorted(x for r in ok(res.get(key, [])) for x in r["lags"])
        if lags:
            ax.plot(lags, [(i + 1) / len(lags) for i in range(len(lags))], label=label, drawstyle="steps-post")
    ax.set_xscale("log")
    ax.set_xlabel("close → stored, seconds (external observer)")
    ax.set_ylabel("fraction of files")
    ax.set_title("Scenario 5: lag")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scenario_7(res: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for tool, cases in scaling(res).items():
        for ax, kind, scale in ((left, "size-", 1 / (1 << 30)), (right, "files-", 1)):
            points = sorted(
                (v["bytes"] * scale if kind == "size-" else v["files"], v["wall"])
                for k, v in cases.items()
                if k.startswith(kind)
            )
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=tool)
    left.set(xlabel="file size, GiB", ylabel="seconds (median)", title="one file of growing size")
    right.set(xlabel="files", ylabel="seconds (median)", title="many small files", xscale="log", yscale="log")
    left.legend()
    fig.suptitle("Scenario 7: scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CHARTS = {"1": scenario_1, "5": scenario_5, "7": scenario_7}
