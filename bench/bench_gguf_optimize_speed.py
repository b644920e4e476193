"""Time and peak memory of ``qconvert gguf --optimize`` and of the size budget against the plain conversion, at
Qwen2.5-0.5B and -1.5B layer shapes.

    python bench/bench_gguf_optimize_speed.py [--shapes 0.5b 1.5b] [--layers 2] [--samples 8] [--type Q4_K_M]

Per shape: a synthetic checkpoint with the real layer shapes and random weights (``FixtureSpec.shaped_like``;
quality means nothing here, only time and memory), one statistics pass (``collect_stats`` with the held-out split,
random token ids, saved to a file: what ``--calib`` streams), then each mode as the CLI runs it, in a process of
its own, from that file:

    plain         qconvert gguf --type T --stats FILE             (llama.cpp's encoding with the importance matrix)
    optimize      ... --optimize                                  (error-feedback codes, held-out choice per matrix)
    budget        ... --target-size <plain file's size>           (every candidate type measured per matrix)
    both          ... --target-size <plain file's size> --optimize

It prints wall seconds and peak RSS per mode, the extra seconds per decoder layer over ``plain`` and that extra
projected to the whole model (x its layer count); the embedding and the output are the same work in every mode.
One plain conversion runs first, untimed (numba compiles and caches the kernels on first use).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = {"plain": [], "optimize": ["--optimize"], "budget": ["BUDGET"], "both": ["BUDGET", "--optimize"]}

CHILD = """
import json, sys, time
from pathlib import Path
from qconvert.cli import main
start = time.perf_counter()
rc = main(sys.argv[1:])
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "seconds": seconds, "peak_rss_gb": hwm * 1024 / 1e9}))
"""


def build(workdir: Path, shape: str, layers: int) -> Path:
    from qconvert.fixtures.models import FixtureSpec, build_fixture

    spec = FixtureSpec.shaped_like(shape, layers)
    out = workdir / spec.name
    if not (out / "config.json").exists():
        print(f"building {out} ...", file=sys.stderr, flush=True)
        build_fixture(spec, out)
    return out


def stats_pass(model: Path, samples: int, seqlen: int, path: Path) -> float:
    import torch

    from qconvert.calibration.quantize import CalibrationSettings
    from qconvert.calibration.stats import collect_stats
    from qconvert.constants import DEFAULT_HOLDOUT

    if path.exists():
        return float("nan")
    ids = torch.randint(0, 151936, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    collect_stats(model, ids, CalibrationSettings("cpu", torch.float32, 8), path=path, holdout=DEFAULT_HOLDOUT)
    return time.perf_counter() - start


def run(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=False)
    if done.returncode != 0:
        sys.exit(f"qconvert {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"qconvert {' '.join(args)} returned {result['rc']}:\n{done.stderr[-3000:]}")
    return result


def main() -> None:
    from qconvert.family import SEED_TABLE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the synthetic checkpoint (>= 2)")
    ap.add_argument("--samples", type=int, default=8, help="calibration windows (random ids) of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-gguf-optimize-speed"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{args.type}; synthetic checkpoints, {args.layers} decoder layers; statistics from {args.samples} x "
          f"{args.seqlen} random tokens")
    print(f"{'shape':<6} {'mode':<9} {'seconds':>8} {'peak RSS GB':>12} {'extra s/layer':>14} {'extra, whole model':>19}")
    for shape in args.shapes:
        model = build(args.workdir, shape, args.layers)
        real_layers = SEED_TABLE[shape].num_hidden_layers
        stats = args.workdir / f"{model.name}-{args.samples}x{args.seqlen}.safetensors"
        stats_s = stats_pass(model, args.samples, args.seqlen, stats)
        print(f"{shape:<6} {'stats':<9} {stats_s:>8.1f} {'':>12} {'':>14} {'':>19}", flush=True)
        base = ["gguf", "--model", str(model), "--type", args.type, "--stats", str(stats), "--quiet", "--force"]
        plain_out = args.workdir / f"{model.name}-plain.gguf"
        results = {}
        if shape == args.shapes[0]:  # numba compiles (and caches) the kernels on first use: not part of any mode
            run([*base, "--output", str(args.workdir / "warm-up.gguf")])
        for mode, extra in MODES.items():
            out = args.workdir / f"{model.name}-{mode}.gguf"
            more = [x for e in extra for x in (["--target-size", repr(plain_out.stat().st_size / 1e9)]
                                               if e == "BUDGET" else [e])]
            results[mode] = r = run([*base, *more, "--output", str(out)])
            per_layer = (r["seconds"] - results["plain"]["seconds"]) / args.layers
            print(f"{shape:<6} {mode:<9} {r['seconds']:>8.1f} {r['peak_rss_gb']:>12.2f} "
                  f"{per_layer if mode != 'plain' else float('nan'):>14.1f} "
                  f"{per_layer * real_layers if mode != 'plain' else float('nan'):>17.0f} s", flush=True)


if __name__ == "__main__":
    main()
