"""ONNX export on a real checkpoint: export time, peak memory, file sizes, onnxruntime CPU speed, perplexity.

    ../shared/tools/real-model.sh                      # builds ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied
    python bench/bench_onnx.py [MODEL_DIR] [--variants fp32 fp16 int4-rtn int4-rtn-plain int4-gptq] [--tokens 2048]
                               [--threads 2] [--builder] [--onnx-ir-path DIR] [--gptq-from DIR]
                               [--genai PROMPT NEW] [--repeats N] [--verify]

Variants: ``PRECISION[-ALGO][-plain|-mixed]`` (``-plain``: ``attention="plain"``, else GroupQueryAttention;
``-mixed``: ``mixed_precision=True``). ``--block-size`` / ``--table-block-size`` set those export options for every
qconvert variant (default: the exporter's). ``--gptq-from
DIR`` makes ``int4-gptq`` convert that GPTQ checkpoint (``export_onnx(from_dir=DIR)``, no calibration in the export
time) instead of calibrating inside the export. ``--genai PROMPT NEW`` also times onnxruntime-genai's generator (the
deployment runtime; GroupQueryAttention exports and the builder's share one past/present buffer there): a random
PROMPT-token prompt, then NEW greedy tokens, best of ``--repeats`` (same for the ``OnnxModel`` speeds). ``--verify``
runs ``qconvert verify`` on every output against MODEL_DIR (``--window`` tokens per window, ``--tokens`` in all) and
adds ΔPPL, mean KL and top-1.

Each export runs in its own subprocess through ``export_onnx`` (the CLI's entry), so each peak RSS is its own.
Every exported model then runs in onnxruntime (CPU EP, ``OnnxModel``): perplexity on the project's held-out text
(``qconvert.fixtures.corpus.eval_text()`` tokenized with the checkpoint's tokenizer, windows of ``--window``
tokens, every position after the first scored), prefill tokens/s (one window) and decode tokens/s (greedy steps
with the KV cache after a 32-token prompt). The fp32 export's logits are also compared with transformers'
``Qwen2ForCausalLM`` in float32 on the first window. ``--builder`` also runs onnxruntime-genai's model builder
(``-i MODEL_DIR -p int4 -e cpu``) and measures its output the same way; it needs the ``onnx_ir`` package
(``--onnx-ir-path`` adds a directory holding it to the child's path). Skips cleanly when MODEL_DIR is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"
VARIANTS = ("fp32", "fp16", "int4-rtn", "int4-gptq", "int4-awq", "fp32-plain", "int4-rtn-plain", "int4-gptq-plain",
            "int4-rtn-mixed")


def child_export(model: Path, variant: str, out: Path, samples: int, seqlen: int, threads: int, options: dict) -> dict:
    """One export in this (child) process. ``options``: ``gptq_from`` (a GPTQ directory for int4-gptq), and
    ``block_size`` / ``table_block_size`` for export_onnx (absent: the exporter's defaults)."""
    import torch

    from qconvert.calibration.quantize import CalibrationSettings
    from qconvert.calibset import load_calibration
    from qconvert.onnx_export import export_onnx

    torch.set_num_threads(threads)
    parts = variant.split("-")
    precision, algo = parts[0], parts[1] if len(parts) > 1 else ""
    attention = "plain" if "plain" in parts[2:] else "gqa"
    extra = {"mixed_precision": True} if "mixed" in parts[2:] else {}
    extra |= {k: options[k] for k in ("block_size", "table_block_size") if options.get(k)}
    calib, from_dir = None, None
    if algo == "gptq" and options.get("gptq_from"):
        from_dir = Path(options["gptq_from"])
    elif algo in ("gptq", "awq"):
        calib = load_calibration("builtin", model, chat=False, n_samples=samples, seq_len=seqlen, seed=0)
    start = time.perf_counter()
    name = f"{model.name}-{variant.partition('-')[2]}" if algo else model.name
    path = export_onnx(model, out, precision=precision, algo="rtn" if from_dir else algo or "rtn", calib=calib,
                       from_dir=from_dir, settings=CalibrationSettings("cpu", torch.float32, 4), model_name=name,
                       force=True, attention=attention, **extra)
    return {"variant": variant, "dir": str(path), "seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def child_builder(model: Path, out: Path, onnx_ir_path: str | None) -> dict:
    import runpy

    if onnx_ir_path:
        sys.path.insert(0, onnx_ir_path)
    sys.argv = ["builder", "-i", str(model), "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out / "cache")]
    start = time.perf_counter()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
    return {"variant": "genai-builder-int4", "dir": str(out), "seconds": time.perf_counter() - start,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run_child(args: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], check=False, capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def nll(logits: np.ndarray, targets: list[int]) -> float:
    x = logits.astype(np.float64)
    mx = x.max(-1)
    lse = np.log(np.exp(x - mx[:, None]).sum(-1)) + mx
    return float((lse - x[np.arange(len(targets)), targets]).sum())


def measure(directory: Path, windows: list[list[int]], threads: int, decode_steps: int, repeats: int = 1) -> dict:
    from qconvert.runtimes.onnxrt import OnnxModel

    m = OnnxModel(directory, threads=threads)
    total, count, prefill = 0.0, 0, []
    for w in windows:
        start = time.perf_counter()
        logits = m.logits(w)
        prefill.append(len(w) / (time.perf_counter() - start))
        total += nll(logits[:-1], w[1:])
        count += len(w) - 1
    decode = 0.0
    for _ in range(repeats):
        logits, cache = m.step(windows[0][:32], m.empty_cache())
        tok = int(np.argmax(logits[-1]))
        start = time.perf_counter()
        for _ in range(decode_steps):
            logits, cache = m.step([tok], cache)
            tok = int(np.argmax(logits[-1]))
        decode = max(decode, decode_steps / (time.perf_counter() - start))
    size = sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith("model.onnx"))
    return {"ppl": float(np.exp(total / count)), "prefill_tok_s": float(np.median(prefill)), "decode_tok_s": decode,
            "model_mb": size / 1e6}


def genai_speed(directory: Path, prompt_len: int, new: int, threads: int, repeats: int) -> dict:
    """onnxruntime-genai's generator: prefill tokens/s of a random prompt, then greedy decode tokens/s (best of
    ``repeats``)."""
    import onnxruntime_genai as og

    config = og.Config(str(directory))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    ids = [int(x) for x in np.random.default_rng(0).integers(100, 50000, prompt_len)]
    best = (0.0, 0.0)
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        t1 = time.perf_counter()
        n = 0
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        best = max(best, (prompt_len / (t1 - t0), n / (t2 - t1)), key=lambda r: r[1])
    return {"genai_prefill_tok_s": best[0], "genai_decode_tok_s": best[1]}


def verify(model: Path, results: list[dict], window: int, tokens: int, workdir: Path) -> None:
    """``qconvert verify``'s library entry on every output (symlinked under its variant's name, which names its
    row): ΔPPL, KL, top-1 into ``results``."""
    from qconvert.pipelines.verify import verify_artifacts

    links = workdir / "verify-links"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True)
    named = [r for r in results if "dir" in r]
    for r in named:
        (links / r["variant"]).symlink_to(Path(r["dir"]).resolve())
    v = verify_artifacts([links / r["variant"] for r in named], model, ctx=window, chunks=max(1, tokens // window),
                         progress=False)
    by_name = {row.name: row for row in v.results}
    for r in named:
        row = by_name.get(r["variant"])
        if row:
            r.update({"dppl_pct": row.dppl_pct, "kl_mean": row.kl_mean, "top1": row.top1})


def torch_check(model: Path, onnx_dir: Path, window: list[int], threads: int) -> dict:
    """fp32 export vs transformers Qwen2ForCausalLM (float32) on one window."""
    import torch
    from transformers import Qwen2ForCausalLM

    from qconvert.runtimes.onnxrt import OnnxModel

    torch.set_num_threads(threads)
    ref = Qwen2ForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        r = ref(torch.tensor([window])).logits[0].numpy()
    del ref
    o = OnnxModel(onnx_dir, threads=threads).logits(window)
    return {"max_abs": float(np.abs(o - r).max()), "rel_to_max": float(np.abs(o - r).max() / np.abs(r).max()),
            "argmax_agree": float((o.argmax(-1) == r.argmax(-1)).mean()), "torch_ppl_window": float(
                np.exp(nll(r[:-1], window[1:]) / (len(window) - 1)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--variants", nargs="+", default=["fp32", "fp16", "int4-rtn", "int4-gptq"], choices=VARIANTS)
    p.add_argument("--out", type=Path, default=Path("/tmp/qconvert-bench-onnx"))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--samples", type=int, default=16, help="GPTQ/AWQ calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="GPTQ/AWQ calibration window length")
    p.add_argument("--builder", action="store_true", help="also run onnxruntime-genai's model builder (int4, cpu)")
    p.add_argument("--onnx-ir-path", help="directory holding the onnx_ir package, for --builder")
    p.add_argument("--block-size", type=int, help="qconvert variants: linears' block size (not with --gptq-from)")
    p.add_argument("--table-block-size", type=int, help="qconvert int4 variants: embedding / lm_head block size")
    p.add_argument("--gptq-from", type=Path, help="int4-gptq: convert this GPTQ checkpoint instead of calibrating")
    p.add_argument("--genai", nargs=2, type=int, metavar=("PROMPT", "NEW"),
                   help="also time onnxruntime-genai generation: PROMPT random tokens, NEW greedy tokens")
    p.add_argument("--repeats", type=int, default=1, help="speed runs per model (best kept)")
    p.add_argument("--verify", action="store_true", help="qconvert verify every output (ΔPPL, KL, top-1)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "export":
            res = child_export(Path(rest[0]), rest[1], Path(rest[2]), int(rest[3]), int(rest[4]), int(rest[5]),
                               json.loads(rest[6]))
        else:
            res = child_builder(Path(rest[0]), Path(rest[1]), rest[2] if len(rest) > 2 else None)
        print(json.dumps(res))
        return
    if not (args.model / "config.json").is_file():
        print(f"skip: {args.model} is not there (build it with ../shared/tools/real-model.sh)")
        return
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    ids = Tokenizer.from_file(str(args.model / "tokenizer.json")).encode(eval_text()).ids[:args.tokens]
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    print(f"model {args.model}: {len(windows)} windows x {args.window} tokens, {args.threads} threads", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    options = json.dumps({"gptq_from": str(args.gptq_from) if args.gptq_from else None,
                          "block_size": args.block_size, "table_block_size": args.table_block_size})
    for v in args.variants:
        res = run_child(["export", str(args.model), v, str(args.out), str(args.samples), str(args.seqlen),
                         str(args.threads), options])
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.builder:
        env = dict(os.environ)
        res = run_child(["builder", str(args.model), str(args.out / "genai-builder-int4")] +
                        ([args.onnx_ir_path] if args.onnx_ir_path else []), env)
        results.append(res)
        print(json.dumps(res), flush=True)
    for res in results:
        if "dir" in res:
            res.update(measure(Path(res["dir"]), windows, args.threads, args.decode_steps, args.repeats))
            if args.genai:
                res.update(genai_speed(Path(res["dir"]), *args.genai, args.threads, args.repeats))
            print(json.dumps(res), flush=True)
    if args.verify:
        verify(args.model, results, args.window, args.tokens, args.out)
    fp32 = next((r for r in results if r.get("variant") == "fp32" and "dir" in r), None)
    if fp32 is not None:
        check = torch_check(args.model, Path(fp32["dir"]), windows[0], args.threads)
        print("fp32 ONNX vs transformers fp32 (window 0):", json.dumps(check), flush=True)
    base = {r["variant"]: r["ppl"] for r in results if "ppl" in r}
    extra = (["genai prefill tok/s", "genai decode tok/s"] if args.genai else []) + (
        ["verify ΔPPL %", "KL mean", "top-1"] if args.verify else [])
    head = ["variant", "export s", "peak RSS GB", "model MB", "PPL", "ΔPPL vs fp32", "prefill tok/s", "decode tok/s"]
    print("\n| " + " | ".join(head + extra) + " |")
    print("|" + "---|" * (len(head) + len(extra)))
    for r in results:
        if "ppl" not in r:
            print(f"| {r.get('variant', '?')} | failed: {r.get('error')} |")
            continue
        d = f"{r['ppl'] - base['fp32']:+.3f}" if "fp32" in base else "n/a"
        cells = [r["variant"], f"{r['seconds']:.1f}", f"{r['peak_rss_gb']:.2f}", f"{r['model_mb']:.1f}", f"{r['ppl']:.3f}",
                 d, f"{r['prefill_tok_s']:.1f}", f"{r['decode_tok_s']:.1f}"]
        if args.genai:
            cells += [f"{r['genai_prefill_tok_s']:.0f}", f"{r['genai_decode_tok_s']:.1f}"]
        if args.verify:
            cells += ([f"{r['dppl_pct']:+.2f}", f"{r['kl_mean']:.5f}", f"{r['top1']:.1%}"] if "kl_mean" in r
                      else ["—"] * 3)
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
