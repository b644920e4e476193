"""Calibration time and peak memory per decoder layer on this CPU, at Qwen2.5-0.5B and -1.5B layer shapes.

    python bench/bench_calibration.py [--shapes 0.5b 1.5b] [--layers 2] [--samples 32] [--seqlen 512]
                                      [--methods gptq awq stats] [--awq-search-samples 4]

Each (shape, method) runs in its own subprocess on a synthetic checkpoint with the real layer shapes and random
weights (``FixtureSpec.shaped_like``; quality is meaningless here, only time and memory count), through the
same driver the CLI uses: ``gptq`` = true-sequential GPTQ 4-bit g128, ``awq`` = AWQ 4-bit g128, ``stats`` = the
shared statistics pass (Hessians + importance matrix, streamed to a file). It prints seconds per layer (the
embedding lookup excluded), the projection to the whole model (x its layer count), and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from qconvert.family import SEED_TABLE, SIZES


def build(workdir: Path, shape: str, layers: int) -> Path:
    from qconvert.fixtures.models import FixtureSpec, build_fixture

    spec = FixtureSpec.shaped_like(shape, layers)
    out = workdir / spec.name
    if not (out / "config.json").exists():
        print(f"building {out} ...", file=sys.stderr, flush=True)
        build_fixture(spec, out)
    return out


def child(model: Path, method: str, samples: int, seqlen: int, search_samples: int, workdir: Path) -> dict:
    import torch

    from qconvert.calibration.quantize import CalibrationSettings, calibrate
    from qconvert.calibration.stats import collect_stats
    from qconvert.int4 import AWQConfig, GPTQConfig

    torch.set_num_threads(2)
    ids = torch.randint(0, 151936, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    settings = CalibrationSettings("cpu", torch.float32, 8)
    times: list[float] = []
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        times.append(time.perf_counter() - start)

    if method == "stats":
        f = workdir / f"{model.name}.stats.safetensors"
        f.unlink(missing_ok=True)
        collect_stats(model, ids, settings, progress, path=f)
        f.unlink()
    else:
        cfg = AWQConfig(search_samples=search_samples) if method == "awq" else GPTQConfig()
        calibrate(model, ids, method, cfg, lambda name, q: None, lambda name, t: None, settings=settings,
                  progress=progress)
    per_layer = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0]
    return {"per_layer_s": per_layer, "first_layer_s": times[0],
            "peak_rss_gb": vm_hwm_gb()}


def vm_hwm_gb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries the parent's peak into a child across
    fork + exec, so a child started by a parent that just built a multi-GB checkpoint would report the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"], choices=SIZES)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers in the synthetic checkpoint (>= 2)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["gptq", "awq", "stats"], choices=["gptq", "awq", "stats"])
    ap.add_argument("--awq-search-samples", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-calibration"))
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        r = child(Path(args.child[0]), args.child[1], args.samples, args.seqlen, args.awq_search_samples, args.workdir)
        print(json.dumps(r))
        return
    print(f"calibration: {args.samples} x {args.seqlen} random tokens, float32 forwards, 2 threads; AWQ scale search "
          f"on {args.awq_search_samples} samples; synthetic checkpoints with {args.layers} layers")
    print(f"{'shape':<6} {'method':<6} {'s/layer':>8} {'whole model':>12} {'peak RSS GB':>12}")
    for shape in args.shapes:
        model = build(args.workdir, shape, args.layers)
        for method in args.methods:
            r = subprocess.run([sys.executable, __file__, "--child", str(model), method, "--samples", str(args.samples),
                                "--seqlen", str(args.seqlen), "--awq-search-samples", str(args.awq_search_samples),
                                "--workdir", str(args.workdir)], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                print(f"{shape:<6} {method:<6} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            total = res["per_layer_s"] * SEED_TABLE[shape].num_hidden_layers
            print(f"{shape:<6} {method:<6} {res['per_layer_s']:>8.1f} {total / 60:>9.1f} min {res['peak_rss_gb']:>12.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
