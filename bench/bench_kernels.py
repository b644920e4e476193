"""Kernel benchmark: qconvert's ``quantize_rows`` vs llama.cpp's ``ggml_quantize_chunk``, same input.

    python bench/bench_kernels.py [--rows 256] [--cols 4096] [--repeat 3] [--types Q5_K Q4_K ...] [--imatrix]

Input: f32[rows, cols] Student-t (df 5) weights scaled to 0.02, from a fixed seed. Per type it prints
Mweights/s (10^6 weights per second, wall clock, best of --repeat) of
- llama.cpp: ``ggml_quantize_chunk`` with no imatrix (``--imatrix``: with a chi-squared one, as
  ``llama-quantize --imatrix``), which is single-threaded C;
- qconvert with 1 numba thread, for a per-core comparison, and with all numba threads;
and whether qconvert's bytes are identical to llama.cpp's. IQ2_XXS, IQ2_XS and IQ1_S exist only with an
importance matrix: without ``--imatrix`` their rows say so. JIT compilation is done (or loaded from the cache)
before timing. On a shared machine, run it when the cores are idle: every figure is wall clock.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qconvert.constants import GGMLType
from qconvert.quant import SUPPORTED_TYPES, quantize_rows
from qconvert.runtimes.ggml_lib import ggml_quantize

DEFAULT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
                 "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
                 "F16", "BF16"]


IMATRIX_ONLY = ("IQ2_XXS", "IQ2_XS", "IQ1_S")  # llama.cpp asserts on them without an importance matrix


def best_rate(fn: Callable[[], np.ndarray], weights: int, repeat: int) -> tuple[float, np.ndarray]:
    """(best Mweights/s over ``repeat`` runs, the last output)."""
    best = float("inf")
    out = fn()
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return weights / best / 1e6, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", nargs="+", default=DEFAULT_TYPES, choices=sorted(t.name for t in SUPPORTED_TYPES))
    ap.add_argument("--imatrix", action="store_true", help="both sides quantize with the same importance matrix")
    args = ap.parse_args()

    x = (np.random.default_rng(0).standard_t(5, (args.rows, args.cols)) * 0.02).astype(np.float32)
    im = np.random.default_rng(1).chisquare(1, args.cols).astype(np.float32) if args.imatrix else None
    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"input f32[{args.rows}, {args.cols}] = {x.size / 1e6:.2f} Mweights; {os.cpu_count()} CPUs, "
          f"numba threads {all_threads}; best of {args.repeat}, wall clock; imatrix: {'yes' if args.imatrix else 'no'}")
    many = f"qconvert {all_threads} threads"
    print(f"{'type':<7} {'llama.cpp 1 thread':>19} {'qconvert 1 thread':>18} {many:>19} {'1-thread ratio':>15}"
          "  identical bytes")
    for name in args.types:
        qtype = GGMLType[name]
        if im is None and name in IMATRIX_ONLY:
            print(f"{name:<7} {'needs --imatrix':>19}")
            continue
        ref_rate, ref = best_rate(lambda q=qtype: ggml_quantize(q, x, im), x.size, args.repeat)
        rates, same = {}, "yes"
        for threads in (1, all_threads):
            numba.set_num_threads(threads)
            rates[threads], ours = best_rate(lambda q=qtype: quantize_rows(q, x, im), x.size, args.repeat)
            same = same if np.array_equal(ours, ref) else "NO"
        print(f"{name:<7} {ref_rate:>19.1f} {rates[1]:>18.1f} {rates[all_threads]:>19.1f} "
              f"{rates[1] / ref_rate:>14.2f}x  {same}")
    numba.set_num_threads(all_threads)


if __name__ == "__main__":
    main()
