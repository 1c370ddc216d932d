"""A CPU-bound stand-in for a training loop: fixed work per step (numpy matmuls on one thread plus a
pure-Python part, like a data loader's), one JSON line per step with its end time and duration.

    taskset -c 0 python -m benchmarks.suite.trainloop --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# One BLAS thread: the loop must be pinnable to one core, and its work per step fixed.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402


def step(a: np.ndarray, b: np.ndarray) -> float:
    x = a
    for _ in range(4):
        x = np.tanh(x @ b)
    total = 0
    for i in range(100000):  # the Python side of a step: batching, bookkeeping
        total += i * i % 7
    return float(x[0, 0]) + total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512)), rng.standard_normal((512, 512)) / 23
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        step(a, b)
        t1 = time.perf_counter()
        print(json.dumps({"t": time.time(), "step": t1 - t0}), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
