"""GPTQ / AWQ / RTN on a real checkpoint: calibration time and peak memory on this CPU, quality on held-out text.

    ../shared/tools/real-model.sh                      # builds ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied
    python bench/bench_int4.py [MODEL_DIR] [--samples 8] [--seqlen 512] [--tokens 2048]

Every method runs in its own subprocess (so each peak RSS is its own) through the same library entry the CLI
uses (``write_int4`` for GPTQ/AWQ, the driver's ``rtn`` for the baseline), on the built-in calibration set. The
written checkpoint is dequantized and run in qconvert's Qwen2 forward (equal to transformers' within 1e-4) on
the project's held-out text: perplexity in windows of 512 tokens, and mean KL(float || quantized) per token.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"
METHODS = ("rtn", "rtn-asym", "gptq", "gptq-stats", "awq", "gptq-int8")
# not run by default: outputs of bench/bench_gptqmodel.py (GPTQModel's own GPTQ and AWQ), evaluated with --eval-only
EXTERNAL = ("gptqmodel-gptq", "gptqmodel-awq")


def run_one(model: Path, method: str, out: Path, samples: int, seqlen: int, search_samples: int) -> dict:
    """Child process: quantize, return time and peak RSS (the linears are kept for the parent's evaluation)."""
    import torch

    from qconvert.calibrate import CalibrationSettings, calibrate
    from qconvert.calibset import load_calibration
    from qconvert.commands.int4 import write_int4
    from qconvert.int4 import AWQConfig, GPTQConfig
    from qconvert.stats import collect_stats

    torch.set_num_threads(2)
    calib = load_calibration("builtin", model, chat=False, n_samples=samples, seq_len=seqlen, seed=0)
    settings = CalibrationSettings("cpu", torch.float32, 8)
    start = time.perf_counter()
    if method in ("rtn", "rtn-asym"):  # rtn-asym: zero points, i.e. AWQ's quantizer without its scales and clips
        linears: dict = {}
        calibrate(model, calib.ids, "rtn", GPTQConfig(sym=method == "rtn"), linears.__setitem__, settings=settings)
        torch.save({k: v.dequantize().float() for k, v in linears.items()}, out / f"{method}.pt")
    else:
        cfg = AWQConfig(search_samples=search_samples) if method == "awq" else \
            GPTQConfig(bits=8 if method == "gptq-int8" else 4)
        stats = collect_stats(model, calib.ids, settings) if method == "gptq-stats" else None
        write_int4(model, model.name, out / method, "awq" if method == "awq" else "gptq", cfg, calib, settings,
                   force=True, stats=stats)
    seconds = time.perf_counter() - start
    return {"method": method, "seconds": seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "tokens": calib.n_tokens}


def evaluate(model: Path, out: Path, method: str, ids, config: dict, ref_logp) -> tuple[float, float]:
    import torch

    from qconvert.calibrate import quantized_weights
    from qconvert.int4 import dequantized_tensors
    from qconvert.model import qwen2

    if method == "float":
        w = quantized_weights(model, {})
    elif method in ("rtn", "rtn-asym"):
        w = quantized_weights(model, {})
        w.update({f"{m}.weight": t for m, t in torch.load(out / f"{method}.pt").items()})
    else:
        from qconvert.io.safetensors import SafetensorsCheckpoint

        d = out / method
        qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
        w = dequantized_tensors(SafetensorsCheckpoint(d), "", qcfg)
        if "lm_head.weight" not in w and config.get("tie_word_embeddings"):
            w["lm_head.weight"] = w["model.embed_tokens.weight"]
    nll, n, kl = 0.0, 0, 0.0
    with torch.no_grad():
        for i, start in enumerate(range(0, len(ids) - 512 + 1, 512)):
            chunk = ids[start:start + 512].unsqueeze(0)
            logp = torch.log_softmax(qwen2.forward(w, chunk, config)[0].double(), -1)
            nll -= logp[:-1].gather(1, chunk[0, 1:, None]).sum().item()
            n += 511
            if ref_logp is not None:
                kl += (ref_logp[i].exp() * (ref_logp[i] - logp)).sum(-1).mean().item()
    windows = (len(ids) - 512) // 512 + 1
    return math.exp(nll / n), kl / windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--awq-search-samples", type=int, default=0, help="AWQ scale-search samples (0: all)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help=f"run: any of {', '.join(METHODS)}; --eval-only: also {', '.join(EXTERNAL)} or any output "
                         "directory name in --workdir")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-int4"))
    ap.add_argument("--eval-only", action="store_true", help="evaluate outputs already in --workdir (no timing)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} not found: run ../shared/tools/real-model.sh first")
    args.workdir.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown and not args.eval_only:
        ap.error(f"cannot run {unknown}: runnable methods are {', '.join(METHODS)} ({', '.join(EXTERNAL)} come from "
                 "bench/bench_gptqmodel.py; evaluate them with --eval-only)")
    if args.child:
        print(json.dumps(run_one(args.model, args.child, args.workdir, args.samples, args.seqlen,
                                 args.awq_search_samples)))
        return
    import torch
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    torch.set_num_threads(2)
    config = json.loads((args.model / "config.json").read_text())
    ids = torch.tensor(Tokenizer.from_file(str(args.model / "tokenizer.json")).encode(eval_text()).ids[:args.tokens])
    runs = []
    for method in args.methods:
        if args.eval_only:
            runs.append({"method": method, "seconds": float("nan"), "peak_rss_gb": float("nan")})
            continue
        r = subprocess.run([sys.executable, __file__, str(args.model), "--child", method, "--samples",
                            str(args.samples), "--seqlen", str(args.seqlen), "--workdir", str(args.workdir),
                            "--awq-search-samples", str(args.awq_search_samples)],
                           capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  {method}: {runs[-1]['seconds']:.0f} s", file=sys.stderr)
    from qconvert.calibrate import quantized_weights
    from qconvert.model import qwen2

    wf = quantized_weights(args.model, {})
    with torch.no_grad():
        ref = [torch.log_softmax(qwen2.forward(wf, ids[s:s + 512].unsqueeze(0), config)[0].double(), -1)
               for s in range(0, len(ids) - 512 + 1, 512)]
    del wf
    ppl_f, _ = evaluate(args.model, args.workdir, "float", ids, config, None)
    print(f"model {args.model.name}; calibration: built-in set, {args.samples} x {args.seqlen} tokens; "
          f"AWQ search samples {args.awq_search_samples or args.samples}; evaluation: {len(ids)} held-out tokens, "
          "windows of 512; CPU threads 2")
    print(f"{'method':<12} {'time s':>8} {'peak RSS GB':>12} {'PPL':>9} {'dPPL %':>8} {'KL':>9}")
    print(f"{'float':<12} {'':>8} {'':>12} {ppl_f:>9.3f} {'':>8} {'':>9}")
    for r in runs:
        ppl, kl = evaluate(args.model, args.workdir, r["method"], ids, config, ref)
        print(f"{r['method']:<12} {r['seconds']:>8.1f} {r['peak_rss_gb']:>12.2f} {ppl:>9.3f} "
              f"{100 * (ppl / ppl_f - 1):>+8.2f} {kl:>9.5f}")


if __name__ == "__main__":
    main()
