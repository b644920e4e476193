"""End-to-end GGUF benchmark: qconvert's one pass vs llama.cpp's two steps, same input, same cores, one run.

    python bench/bench_gguf.py [--layers 4] [--types Q5_K_M Q4_K_M Q8_0]

Input: a synthetic checkpoint with Qwen2.5-1.5B's real layer shapes (hidden 1536, ffn 8960, 12/2 heads) and its
real embedding (151936 x 1536, tied), random bf16 weights, ``--layers`` decoder blocks.
- qconvert:  ``qconvert gguf --model DIR --type T`` (safetensors -> quantized GGUF in one pass)
- llama.cpp: step 1, the BF16 conversion (qconvert's BF16 writer; it does the same I/O and dtype work as
  convert_hf_to_gguf.py --outtype bf16), then step 2, ``llama_model_quantize`` from libllama with nthread = cores.
Each step runs in its own process; wall time and peak RSS come from the OS (wait4). The outputs are compared
tensor by tensor: "identical" means every tensor's type and bytes agree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def timed(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of ``python ARGS`` run in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".hwm") as hwm:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, hwm.name, *args], cwd=ROOT, check=False)
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
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qconvert-bench")
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
    bf16 = args.workdir / "step1-bf16.gguf"
    conv_wall, conv_rss = timed(qc + ["--type", "BF16", "--output", str(bf16)])
    rows = []
    for preset in args.types:
        ours, ref = args.workdir / f"qconvert-{preset}.gguf", args.workdir / f"llama-{preset}.gguf"
        q_wall, q_rss = timed(qc + ["--type", preset, "--output", str(ours)])
        script = ("import sys; from qconvert.runtimes.llamacpp import llama_quantize; "
                  "from qconvert.gguf.plan import get_preset; "
                  f"llama_quantize(sys.argv[1], sys.argv[2], int(get_preset({preset!r}).file_type), nthread={os.cpu_count()})")
        l_wall, l_rss = timed([script, str(bf16), str(ref)])
        rows.append((preset, q_wall, q_rss, conv_wall + l_wall, max(conv_rss, l_rss), identical(ours, ref)))
    print(f"\ninput: 1.5B layer shapes x {args.layers} layers + 151936x1536 embedding, bf16; {os.cpu_count()} cores")
    print(f"{'type':<8} {'qconvert s':>10} {'llama.cpp s':>11} {'(convert+quantize)':>18} {'ratio':>6} "
          f"{'RSS qconvert':>12} {'RSS llama':>9} {'identical':>9}")
    for preset, qw, qr, lw, lr, same in rows:
        print(f"{preset:<8} {qw:>10.1f} {lw:>11.1f} {f'{conv_wall:.1f}+{lw - conv_wall:.1f}':>18} {lw / qw:>5.2f}x "
              f"{qr:>10.2f}GB {lr:>7.2f}GB {'yes' if same else 'NO':>9}")
    print("ratio = llama.cpp time / qconvert time (>1: qconvert is faster)")


if __name__ == "__main__":
    main()
