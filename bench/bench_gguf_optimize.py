"""``qconvert gguf --optimize`` against llama.cpp's own quantizer, static and with an importance matrix, in llama.cpp.

    ../shared/tools/real-model.sh                  # builds ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied
    python bench/bench_gguf_optimize.py [MODEL_DIR] [--samples 32] [--types Q4_K_M Q3_K_M Q2_K] [--tokens 8192]

One statistics pass over ``--samples`` x 512 built-in calibration tokens (``collect_stats`` with the held-out
split, saved to WORKDIR/stats.safetensors and reused) gives both the importance matrix and the Hessians. Per type:
- llama.cpp static:  ``llama_model_quantize`` (libllama) of the F16 GGUF, no importance matrix;
- llama.cpp imatrix: the same with the importance matrix of those calibration tokens (what llama-quantize
  --imatrix loads from the file ``--save-imatrix`` writes);
- qconvert optimized: ``export_gguf(..., imatrix=..., hessians=...)``, i.e. ``qconvert gguf --stats FILE --optimize``;
- qconvert budget: ``--target-size`` = the llama.cpp imatrix file's size (types per matrix, llama.cpp's encoding);
- qconvert budget + optimized: both.
Every file is scored in llama.cpp by ``qconvert verify``'s method on the project's held-out text (windows of
512, positions 256..510), with the per-window KL paired against the llama.cpp imatrix file (± one standard error
over windows). Times: the statistics pass once, then each file's quantization.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ROWS = ("llama.cpp static", "llama.cpp imatrix", "qconvert optimized", "qconvert budget", "budget + optimized")
DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"


def main() -> None:
    from qconvert.calibration.stats import CalibrationStats, collect_stats
    from qconvert.calibset import load_calibration
    from qconvert.constants import DEFAULT_HOLDOUT
    from qconvert.gguf.export import OPTIMIZE_KEY, PlanOptions, export_gguf
    from qconvert.gguf.metadata import KV, V
    from qconvert.gguf.optimize import stats_hessians
    from qconvert.gguf.plan import get_preset
    from qconvert.pipelines.gguf import budget_plan
    from qconvert.runtimes import llamacpp
    from qconvert.verify import build_reference, eval_tokens, verify_artifact

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, metavar="ROW",
                    help=f"which files to make (default all; the llama.cpp imatrix one always): {', '.join(ROWS)}")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-gguf-optimize"))
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} is not a checkpoint; build it with ../shared/tools/real-model.sh")
    args.workdir.mkdir(parents=True, exist_ok=True)
    stats_path = args.workdir / f"stats-{args.samples}x{args.seqlen}.safetensors"
    if stats_path.exists():
        stats, stats_s = CalibrationStats.load(stats_path), float("nan")
    else:
        calib = load_calibration("builtin", args.model, chat=False, n_samples=args.samples, seq_len=args.seqlen, seed=0)
        start = time.perf_counter()
        stats = collect_stats(args.model, calib.ids, source=calib.describe(), path=stats_path,
                              holdout=DEFAULT_HOLDOUT)
        stats_s = time.perf_counter() - start
    imatrix = stats.imatrix()
    f16 = args.workdir / "f16.gguf"
    if not f16.exists():
        export_gguf(args.model, f16, "F16")
    reference = build_reference(args.model, eval_tokens(args.model), ctx=512, chunks=args.tokens // 512,
                                progress=False)
    print(f"model {args.model.name}; statistics pass ({args.samples} x {args.seqlen} built-in tokens, held-out "
          f"split {DEFAULT_HOLDOUT}): {stats_s:.0f} s; evaluation: {reference.windows.size} held-out tokens in "
          "llama.cpp, windows of 512")
    print(f"{'type':<8} {'file':<20} {'MB':>8} {'bpw':>6} {'time s':>7} {'dPPL %':>8} {'KL':>9} {'top-1 %':>8} "
          f"{'KL vs imatrix':>22}  kept")
    for preset in args.types:
        ftype = int(get_preset(preset).file_type)
        outs: list[tuple[str, Path, float, dict[str, int]]] = []
        rows = [r for r in ROWS if r in args.rows or r == "llama.cpp imatrix"]
        imatrix_file = args.workdir / f"{preset}-llama.cpp-imatrix.gguf"
        for label in rows:
            path = args.workdir / f"{preset}-{label.replace(' ', '-').replace('+', 'and')}.gguf"
            start = time.perf_counter()
            kept: dict[str, int] = {}
            optimize = "optimized" in label
            note = "error-feedback codes (bench)" if optimize else ""
            if label.startswith("llama.cpp"):
                llamacpp.llama_quantize(f16, path, ftype, imatrix=imatrix if "imatrix" in label else None)
            else:
                options, extra = PlanOptions(), []
                if "budget" in label:
                    more = [KV(OPTIMIZE_KEY, V.STRING, note)] if optimize else []
                    bp = budget_plan(args.model, preset, options, stats, imatrix, imatrix_file.stat().st_size / 1e9,
                                     more_metadata=more)
                    options, extra = bp.options, bp.metadata
                    if bp.check is not None:
                        print(f"{preset} {label}: {bp.check.summary()}", flush=True)
                    elif bp.choice.kept_preset:
                        print(f"{preset} {label}: the proxy kept {preset}'s own mixture", flush=True)
                kept = export_gguf(args.model, path, preset, options=options, imatrix=imatrix, force=True,
                                   hessians=stats_hessians(stats) if optimize else None, optimize_note=note,
                                   extra_metadata=extra).optimized
            outs.append((label, path, time.perf_counter() - start, kept))
        scored = []
        for label, path, seconds, kept in outs:
            per_window: list[float] = []
            r = verify_artifact(path, reference, progress=False,
                                on_scored=lambda w, st, acc=per_window: acc.append(float(st.kl.mean())))
            scored.append((label, path, seconds, kept, r, per_window))
        base = next(r[5] for r in scored if r[0] == "llama.cpp imatrix")
        for label, path, seconds, kept, r, per_window in scored:
            print(f"{preset:<8} {label:<20} {path.stat().st_size / 1e6:>8.1f} {r.bits_per_weight:>6.2f} "
                  f"{seconds:>7.1f} {r.dppl_pct:>+8.2f} {r.kl_mean:>9.5f} {100 * r.top1:>8.1f} "
                  f"{paired(per_window, base):>22}  {', '.join(f'{k} {v}' for k, v in sorted(kept.items()))}")


def paired(values: list[float], base: list[float]) -> str:
    if not base or values is base or len(values) != len(base) or len(values) < 2:
        return ""
    d = [a - b for a, b in zip(values, base)]
    mean, se = statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))
    rel = 100 * mean / statistics.fmean(base)
    return f"{rel:+.1f}% ({mean:+.5f} ± {se:.5f})"


if __name__ == "__main__":
    main()
