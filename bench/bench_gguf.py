"""End-to-end GGUF benchmark: qconvert's one pass vs llama.cpp's two steps, same input, same cores, one run.

    python bench/bench_gguf.py [--layers 4] [--types Q5_K_M Q4_K_M Q8_0] [--threads 1 2] [--imatrix]

Input: a synthetic checkpoint with Qwen2.5-1.5B's real layer shapes (hidden 1536, ffn 8960, 12/2 heads) and its
real embedding (151936 x 1536, tied), random bf16 weights, ``--layers`` decoder blocks.
- qconvert:  ``qconvert gguf --model DIR --type T`` (safetensors -> quantized GGUF in one pass)
- llama.cpp: step 1, the BF16 conversion, then step 2, ``llama_model_quantize`` from libllama. Step 1 is llama.cpp's
  own ``convert_hf_to_gguf.py --outtype bf16`` with ``--converter TREE --converter-python PY`` (the tree and venv
  ``scripts/test-converter.sh`` prepares: ``~/.cache/qconvert-oracle/llama-cpp-python-0.3.36/vendor/llama.cpp`` and
  ``~/.cache/qconvert-oracle/venv/bin/python``; the synthetic tokenizer's unknown pre-tokenizer hash is answered
  "qwen2"), else qconvert's BF16 writer as a stand-in doing the same I/O and dtype work.
Each step runs in its own process; wall time and peak RSS come from the OS (wait4). The outputs are compared
tensor by tensor: "identical" means every tensor's type and bytes agree; both are then deleted.

Before timing, qconvert runs each type once untimed (printed as "warm-up"): numba compiles the kernels on first use
and caches them beside the sources, so only the first run after an install pays for it (the I-quant kernels take
~15 s); llama.cpp's library is compiled ahead. ``--no-warmup`` times the first run instead.

``--threads`` runs everything once per thread count: numba's threads for qconvert (``NUMBA_NUM_THREADS``, also
``OMP_NUM_THREADS`` for both processes), ``nthread`` for llama_model_quantize (default: all cores).
``--imatrix`` gives both sides the same synthetic importance matrix (chi-squared per column, as
``bench_kernels.py --imatrix``), written once as a llama.cpp imatrix GGUF: qconvert reads it with ``--imatrix``,
llama_model_quantize gets the per-column means llama-quantize would load from it. The presets that llama.cpp
refuses without one (Q2_K_S, IQ3_XXS/XS, IQ2_*, IQ1_*) need it. The I-quant run of issue 15:

    python bench/bench_gguf.py --layers 4 --types IQ4_XS IQ3_M IQ2_M --threads 1 2 --imatrix
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# Runs a Python module or snippet, then records the process's own peak RSS (VmHWM). getrusage/wait4 cannot be
# used: a child's ru_maxrss starts from its parent's RSS at fork time.
PEAK_WRAPPER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def report():
    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
    open(out, 'w').write(hwm)
atexit.register(report)
if sys.argv[1] == '-m':
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name='__main__')
else:
    code = sys.argv.pop(1)
    exec(compile(code, '<bench>', 'exec'))
"""


# llama.cpp's converter as ``python -c CONVERTER_RUNNER TREE ARGS``: the synthetic checkpoint's tokenizer hash is not
# in its pre-tokenizer table, so that lookup answers "qwen2" (what the real Qwen2.5 tokenizers map to).
CONVERTER_RUNNER = """
import runpy, sys
tree = sys.argv[1]
sys.path.insert(0, tree)
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timed(args: list[str], threads: int, python: str = sys.executable) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of ``python ARGS`` run in a fresh process limited to ``threads`` threads."""
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    with tempfile.NamedTemporaryFile(suffix=".hwm") as hwm:
        start = time.perf_counter()
        proc = subprocess.run([python, "-c", PEAK_WRAPPER, hwm.name, *args], cwd=ROOT, env=env, check=False)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"benchmark step failed: python {' '.join(args)}")
        return wall, int(Path(hwm.name).read_text()) * 1024 / 1e9


def build_input(workdir: Path, layers: int) -> Path:
    from qconvert.fixtures.models import FixtureSpec, build_fixture

    spec = FixtureSpec.shaped_like("1.5b", layers)
    out = workdir / spec.name
    if not (out / "config.json").exists():
        print(f"building {out} ...", flush=True)
        build_fixture(spec, out)
    return out


def synthetic_imatrix(bf16: Path, out: Path) -> None:
    """A llama.cpp imatrix GGUF for every decoder matrix of ``bf16``: chi-squared(1) column means, 512 tokens."""
    from qconvert.gguf.imatrix import write_imatrix
    from qconvert.gguf.reader import read_gguf

    rng, tokens = np.random.default_rng(1), 512
    cols = {n: t.shape[-1] for n, t in read_gguf(bf16).tensors.items() if n.startswith("blk.") and len(t.shape) == 2}
    sums = {n: rng.chisquare(1, c).astype(np.float32) * tokens for n, c in cols.items()}
    write_imatrix(out, sums, dict.fromkeys(sums, tokens), datasets=["bench_gguf synthetic chi2"], chunk_count=1,
                  chunk_size=tokens, force=True)


def load_average() -> str:
    """The 1/5/15-minute load averages: on a shared machine they say how contended the timings were."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def identical(a: Path, b: Path) -> bool:
    from qconvert.gguf.reader import read_gguf

    ga, gb = read_gguf(a), read_gguf(b)
    if list(ga.tensors) != list(gb.tensors):
        return False
    return all(ga.tensors[n].type == t.type and (ga.read_tensor_bytes(n) == gb.read_tensor_bytes(n)).all()
               for n, t in gb.tensors.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--types", nargs="+", default=["Q5_K_M", "Q4_K_M", "Q8_0"])
    ap.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                    help="run once per thread count (default: all cores)")
    ap.add_argument("--imatrix", action="store_true", help="both sides quantize with the same synthetic imatrix")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qconvert-bench")
    ap.add_argument("--converter", type=Path, metavar="TREE",
                    help="llama.cpp tree with convert_hf_to_gguf.py: step 1 of the llama.cpp side (else qconvert's "
                         "BF16 writer stands in)")
    ap.add_argument("--converter-python", default=sys.executable, metavar="PY",
                    help="the python that runs --converter (its venv has torch, transformers, sentencepiece)")
    ap.add_argument("--no-warmup", action="store_true", help="time qconvert's first run (numba compiles then)")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.build_only:
        build_input(args.workdir, args.layers)
        return
    model = args.workdir / f"bench-1.5b-{args.layers}l"
    if not (model / "config.json").exists():  # built in a child so this process stays small
        subprocess.run([sys.executable, __file__, "--build-only", "--layers", str(args.layers), "--workdir", str(args.workdir)], check=True)
    qc = ["-m", "qconvert", "gguf", "--model", str(model), "--force", "--quiet"]
    bf16, im_file = args.workdir / "step1-bf16.gguf", args.workdir / f"bench-imatrix-{args.layers}l.gguf"
    step1 = f"convert_hf_to_gguf.py from {args.converter}" if args.converter else "qconvert's BF16 writer (stand-in)"
    print(f"input: 1.5B layer shapes x {args.layers} layers + 151936x1536 embedding, bf16; {os.cpu_count()} cores; "
          f"imatrix: {'synthetic chi2, both sides' if args.imatrix else 'none'}; llama.cpp step 1: {step1}; "
          f"load average {load_average()}")
    print(f"{'threads':>7} {'type':<8} {'qconvert s':>10} {'llama.cpp s':>11} {'(convert+quantize)':>18} {'ratio':>6} "
          f"{'RSS qconvert':>12} {'RSS llama':>9} {'identical':>9}", flush=True)
    warm = not args.no_warmup
    for threads in args.threads:
        if args.converter:
            conv_wall, conv_rss = timed([CONVERTER_RUNNER, str(args.converter), str(model), "--outtype", "bf16",
                                         "--outfile", str(bf16)], threads, args.converter_python)
        else:
            conv_wall, conv_rss = timed(qc + ["--type", "BF16", "--output", str(bf16)], threads)
        if args.imatrix and threads == args.threads[0]:
            synthetic_imatrix(bf16, im_file)
        with_im = ["--imatrix", str(im_file)] if args.imatrix else []
        if warm:  # numba's compile-and-cache, once per install: kept out of the timings
            warm = False
            for preset in args.types:
                w_wall, _ = timed(qc + ["--type", preset, *with_im, "--output", str(args.workdir / "warm.gguf")], threads)
                print(f"warm-up: qconvert {preset} first run {w_wall:.1f} s (includes numba's compile if not cached)",
                      flush=True)
            (args.workdir / "warm.gguf").unlink(missing_ok=True)
        for preset in args.types:
            ours, ref = args.workdir / f"qconvert-{preset}.gguf", args.workdir / f"llama-{preset}.gguf"
            q_wall, q_rss = timed(qc + ["--type", preset, *with_im, "--output", str(ours)], threads)
            script = ("import sys; from qconvert.runtimes.llamacpp import llama_quantize; "
                      "from qconvert.gguf.plan import get_preset; from qconvert.gguf.imatrix import read_imatrix; "
                      "im = read_imatrix(sys.argv[3]) if len(sys.argv) > 3 else None; "
                      f"llama_quantize(sys.argv[1], sys.argv[2], int(get_preset({preset!r}).file_type), "
                      f"nthread={threads}, imatrix=im)")
            l_wall, l_rss = timed([script, str(bf16), str(ref), *with_im[1:]], threads)
            same = identical(ours, ref)
            ours.unlink()
            ref.unlink()
            lw = conv_wall + l_wall
            print(f"{threads:>7} {preset:<8} {q_wall:>10.1f} {lw:>11.1f} {f'{conv_wall:.1f}+{l_wall:.1f}':>18} "
                  f"{lw / q_wall:>5.2f}x {q_rss:>10.2f}GB {max(conv_rss, l_rss):>7.2f}GB {'yes' if same else 'NO':>9}",
                  flush=True)
    print(f"load average at the end: {load_average()}")
    print("ratio = llama.cpp time / qconvert time (>1: qconvert is faster)")

if __name__ == "__main__":
    main()
