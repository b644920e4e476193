"""GPTQ / AWQ / RTN on a real checkpoint: calibration time and peak memory on this CPU, quality on held-out text.

    ../shared/tools/real-model.sh                      # builds ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied
    python bench/bench_int4.py [MODEL_DIR] [--samples 8] [--seqlen 512] [--tokens 2048]

Every method runs in its own subprocess (so each peak RSS is its own) through the same library entry the CLI
uses (``write_int4`` for GPTQ/AWQ; the driver's ``rtn`` for the baselines, written in the GPTQ v1 layout), on the
built-in calibration set. Each written checkpoint is scored by ``qconvert verify``'s method (the model card's
figures too: one streamed float reference pass, cached, then each checkpoint's dequantized weights streamed layer
by layer through qconvert's Qwen2 forward, equal to transformers' within 1e-4) on the project's held-out text:
windows of 512 tokens, positions 256..510 scored; perplexity, mean KL(float || quantized) and top-1 agreement.
Times cover calibration and quantization only. ``vs first`` is each method's perplexity relative to the first
method's on the same tokens, with one standard error from the spread of the per-window differences (the windows
are the independent units), so a difference smaller than about two standard errors is not one these tokens can
tell apart; the same for the mean KL. Each method's per-window mean NLL and KL are saved as
``WORKDIR/METHOD.windows.json`` for pairing across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"
DEFAULT_METHODS = ("rtn", "rtn-asym", "gptq", "gptq-stats", "awq", "gptq-int8")
METHODS = (*DEFAULT_METHODS, "awq-clip-all", "awq-no-clip", "awq-clip-only", "gptq-noguard", "awq-noguard",
           "gptq-damp10", "gptq-damp10-noguard", "gptq-ga", "gptq-ga-noguard", "gptq-stats-noguard")
# -noguard: the held-out guard off (every window fitted, the algorithm's result kept everywhere);
# -damp10: GPTQ damping 0.1 instead of 0.01; -ga: group-aware reordering
# AWQ ablations: q/k clipped too (--clip-all), scale search without clipping, clipping without scale search
AWQ_VARIANTS = {"awq": {}, "awq-clip-all": {"clip_all": True}, "awq-no-clip": {"max_shrink": 0.0},
                "awq-clip-only": {"n_grid": 0}}
# the anchor: GPTQModel's own GPTQ and AWQ on the same calibration windows (bench/bench_gptqmodel.py, run with
# --anchor-python, a venv that has gptqmodel 7.6; not in the default method list)
EXTERNAL = ("gptqmodel-gptq", "gptqmodel-awq")
HERE = Path(__file__).resolve().parent


def run_one(model: Path, method: str, out: Path, samples: int, seqlen: int, search_samples: int,
            holdout: float) -> dict:
    """Child process: quantize, return time and peak RSS (the linears are kept for the parent's evaluation)."""
    import torch

    from qconvert.calibration.quantize import CalibrationSettings, calibrate
    from qconvert.calibration.stats import collect_stats
    from qconvert.calibset import load_calibration
    from qconvert.int4 import AWQConfig, GPTQConfig, QuantizedCheckpointWriter, gptq_quantization_config
    from qconvert.pipelines.int4 import write_int4

    torch.set_num_threads(2)
    calib = load_calibration("builtin", model, chat=False, n_samples=samples, seq_len=seqlen, seed=0)
    settings = CalibrationSettings("cpu", torch.float32, 8)
    start = time.perf_counter()
    kept: dict[str, int] = {}
    check = ""
    if method in ("rtn", "rtn-asym"):  # rtn-asym: zero points, i.e. AWQ's quantizer without its scales and clips
        # written as a GPTQ-format checkpoint (v1 stores zero points too), so it is scored like every other output
        cfg = GPTQConfig(sym=method == "rtn")
        with QuantizedCheckpointWriter(model, out / method, gptq_quantization_config(cfg), force=True) as writer:
            calibrate(model, calib.ids, "rtn", cfg, writer.add_linear, writer.add_float, settings)
            writer.finish()
    else:
        base = method.removesuffix("-noguard")
        gptq_opts = {"damp_percent": 0.1 if "damp10" in base else 0.01, "group_aware": base.endswith("-ga"),
                     "bits": 8 if base == "gptq-int8" else 4}
        cfg = AWQConfig(search_samples=search_samples, **AWQ_VARIANTS[base]) if base in AWQ_VARIANTS else \
            GPTQConfig(**gptq_opts)
        guard = None if method.endswith("-noguard") else holdout
        stats = collect_stats(model, calib.ids, settings, holdout=guard) if base == "gptq-stats" else None
        report = write_int4(model, model.name, out / method, "awq" if base in AWQ_VARIANTS else "gptq", cfg, calib,
                            settings, force=True, stats=stats, evaluate=False, holdout=guard)
        kept = dict(report.kept)
        if report.model_check is not None:
            check = report.model_check.summary()
            print(f"{method}: {check}", file=sys.stderr)
    seconds = time.perf_counter() - start
    return {"method": method, "kept": dict(kept), "model_check": check, "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "tokens": calib.n_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--awq-search-samples", type=int, default=0, help="AWQ scale-search samples (0: all)")
    ap.add_argument("--holdout", type=float, default=0.25, help="the held-out guard's fraction (methods without -noguard)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                    help=f"any of {', '.join(METHODS)} (default: the first six), or {', '.join(EXTERNAL)} with --anchor-python; --eval-only: "
                         "also any output directory name in --workdir")
    ap.add_argument("--anchor-python", type=Path,
                    help="python of a venv with gptqmodel 7.6 (e.g. .venv-oracle/bin/python from "
                         "scripts/test-oracles.sh): runs the gptqmodel-* methods on the same calibration windows")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-int4"))
    ap.add_argument("--eval-only", action="store_true", help="evaluate outputs already in --workdir (no timing)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} not found: run ../shared/tools/real-model.sh first")
    args.workdir.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in args.methods if m not in METHODS + EXTERNAL]
    if unknown and not args.eval_only:
        ap.error(f"cannot run {unknown}: runnable methods are {', '.join(METHODS + EXTERNAL)}")
    if any(m in EXTERNAL for m in args.methods) and not args.eval_only and args.anchor_python is None:
        ap.error(f"{', '.join(EXTERNAL)} run GPTQModel: give --anchor-python (a venv with gptqmodel 7.6, e.g. "
                 ".venv-oracle/bin/python after scripts/test-oracles.sh)")
    if args.child:
        print(json.dumps(run_one(args.model, args.child, args.workdir, args.samples, args.seqlen,
                                 args.awq_search_samples, args.holdout)))
        return
    import torch

    from qconvert.verify import build_reference, eval_tokens, verify_artifact

    torch.set_num_threads(2)
    reference = build_reference(args.model, eval_tokens(args.model), ctx=512, chunks=args.tokens // 512)
    runs = []
    common = ["--model", str(args.model), "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--workdir",
              str(args.workdir)]
    if not args.eval_only and set(EXTERNAL) & set(args.methods):  # same windows: dump them once with this venv
        subprocess.run([sys.executable, str(HERE / "bench_gptqmodel.py"), "dump", *common], check=True)
    for method in args.methods:
        if args.eval_only:
            runs.append({"method": method, "seconds": float("nan"), "peak_rss_gb": float("nan")})
            continue
        if method in EXTERNAL:  # quantized with GPTQModel, in its own venv
            cmd = [str(args.anchor_python), str(HERE / "bench_gptqmodel.py"), "quantize",
                   method.removeprefix("gptqmodel-"), *common]
        else:
            cmd = [sys.executable, __file__, str(args.model), "--child", method, "--samples", str(args.samples),
                   "--seqlen", str(args.seqlen), "--workdir", str(args.workdir), "--awq-search-samples",
                   str(args.awq_search_samples), "--holdout", str(args.holdout)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  {method}: {runs[-1]['seconds']:.0f} s", file=sys.stderr)
    print(f"model {args.model.name}; calibration: built-in set, {args.samples} x {args.seqlen} tokens; "
          f"AWQ search samples {args.awq_search_samples or args.samples}; evaluation: {reference.windows.size} held-out "
          "tokens, windows of 512 (qconvert verify's method); CPU threads 2")
    print(f"{'method':<20} {'time s':>8} {'peak RSS GB':>12} {'PPL':>9} {'dPPL %':>8} {'KL':>9} {'top-1 %':>8} "
          f"{'PPL vs first %':>16} {'KL vs first':>20}  kept")
    first: dict[str, list[float]] = {}
    for i, r in enumerate(runs):
        per_window: dict[str, list[float]] = {"nll": [], "kl": []}
        q = verify_artifact(args.workdir / r["method"], reference, progress=False, on_scored=window_means(per_window))
        (args.workdir / f"{r['method']}.windows.json").write_text(json.dumps(per_window))
        if i == 0:
            print(f"{'float':<20} {'':>8} {'':>12} {q.ppl_ref:>9.3f}")
            first = per_window
        kept = ", ".join(f"{k} {v}" for k, v in sorted(r.get("kept", {}).items()))
        print(f"{r['method']:<20} {r['seconds']:>8.1f} {r['peak_rss_gb']:>12.2f} {q.ppl:>9.3f} "
              f"{q.dppl_pct:>+8.2f} {q.kl_mean:>9.5f} {100 * q.top1:>8.1f} "
              f"{paired(per_window['nll'], first['nll'], True):>16} {paired(per_window['kl'], first['kl']):>20}  {kept}")
    for r in runs:
        if r.get("model_check"):
            print(f"{r['method']}: {r['model_check']}")
    if not args.eval_only:
        (args.workdir / "runs.json").write_text(json.dumps(runs, indent=1))


def window_means(into: dict[str, list[float]]) -> Callable[[int, Any], None]:
    """An ``on_scored`` callback appending each window's mean of every statistic named in ``into``."""
    def add(w: int, stats: Any) -> None:
        for name, values in into.items():
            values.append(float(getattr(stats, name).mean()))
    return add


def paired(values: list[float], base: list[float], perplexity: bool = False) -> str:
    """The mean per-window difference of ``values`` from ``base`` ± one standard error over windows (the
    independent units); ``perplexity``: NLLs, shown as the perplexity ratio in % (``+0.12 ± 0.20``)."""
    import statistics

    d = [a - b for a, b in zip(values, base)]
    if len(d) < 2:
        return ""
    mean, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
    return f"{100 * (math.exp(mean) - 1):+.2f} ± {100 * se:.2f}" if perplexity else f"{mean:+.5f} ± {se:.5f}"


if __name__ == "__main__":
    main()
