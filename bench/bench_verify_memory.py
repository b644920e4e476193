"""Peak memory of ``qconvert verify``'s reference pass at Qwen2.5-7B and -72B layer shapes, beside transformers.

    python bench/bench_verify_memory.py [--shapes 7b 72b] [--layers 1 2] [--ctx 512] [--chunks 4]
                                        [--anchor-shapes 7b]

Each run is its own subprocess on a synthetic checkpoint with the real layer shapes, embedding and head, random
bf16 weights and fewer decoder layers (``FixtureSpec.shaped_like``). ``qconvert`` = ``build_reference`` (the
streamed reference: one layer on the CPU at a time); ``transformers`` = the whole model loaded in float32 and run
on the same windows (what verify's reference did before it was streamed; the anchor). Peak RSS is the child's
VmHWM. Projection to the whole model: qconvert's peak does not grow with the layer count (the runs with 1 and 2
layers show it), so the projection is the largest measured peak; transformers holds every weight in float32, so
its projection adds (n_layers - layers) x one layer's float32 bytes to the measured peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_calibration import build, vm_hwm_gb  # the same synthetic checkpoints (real layer shapes, random weights)

from qconvert.family import SEED_TABLE, SIZES

GB = 1e9


def layer_params(shape: str) -> int:
    s = SEED_TABLE[shape]
    hd = s.hidden_size // s.num_attention_heads
    q, kv = s.num_attention_heads * hd, s.num_key_value_heads * hd
    attn = s.hidden_size * (q + 2 * kv) + (q + 2 * kv) + q * s.hidden_size
    return attn + 3 * s.hidden_size * s.intermediate_size + 2 * s.hidden_size


def child(model: Path, runtime: str, ctx: int, chunks: int, workdir: Path) -> dict:
    import numpy as np
    import torch

    from qconvert.verify.tokens import EvalTokens, tokens_sha256

    torch.set_num_threads(2)
    ids = np.random.default_rng(0).integers(0, 151936, ctx * chunks, dtype=np.int64).astype(np.int32)
    start = time.perf_counter()
    if runtime == "qconvert":
        from qconvert.verify import build_reference

        ref = build_reference(model, EvalTokens(ids, tokens_sha256(ids), "random"), ctx=ctx, chunks=chunks,
                              cache_dir=workdir / "cache", progress=False)
        (Path(ref.meta["cache"])).unlink()
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        with torch.no_grad():
            for w in ids.reshape(chunks, ctx):
                m(input_ids=torch.from_numpy(w.astype(np.int64))[None], logits_to_keep=ctx // 2 + 1, use_cache=False)
    return {"seconds": time.perf_counter() - start, "peak_rss_gb": vm_hwm_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["7b", "72b"], choices=SIZES)
    ap.add_argument("--layers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--anchor-shapes", nargs="*", default=["7b"], choices=SIZES,
                    help="shapes that also run the transformers anchor (72B at float32 needs ~17 GB for 2 layers)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-bench-verify-memory"))
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "RUNTIME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.ctx, args.chunks, args.workdir)))
        return
    print(f"reference pass over {args.chunks} windows x {args.ctx} random tokens, CPU float32, 2 threads; synthetic "
          "checkpoints with the real layer shapes and vocabulary (bf16 on disk)")
    print(f"{'shape':<6} {'layers':>6} {'runtime':<13} {'seconds':>8} {'peak RSS GB':>12} {'whole model GB':>15}")
    for shape in args.shapes:
        n_layers = SEED_TABLE[shape].num_hidden_layers
        peaks: dict[str, float] = {}
        for layers in args.layers:
            model = build(args.workdir, shape, layers)
            for runtime in ("qconvert", "transformers") if shape in args.anchor_shapes else ("qconvert",):
                r = subprocess.run([sys.executable, __file__, "--child", str(model), runtime, "--ctx", str(args.ctx),
                                    "--chunks", str(args.chunks), "--workdir", str(args.workdir)],
                                   capture_output=True, text=True, check=False)
                if r.returncode != 0:
                    print(f"{shape:<6} {layers:>6} {runtime:<13} failed: {r.stderr.strip().splitlines()[-1:]}")
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                peaks[runtime] = max(peaks.get(runtime, 0.0), res["peak_rss_gb"])
                whole = (peaks["qconvert"] if runtime == "qconvert" else
                         res["peak_rss_gb"] + (n_layers - layers) * layer_params(shape) * 4 / GB)
                print(f"{shape:<6} {layers:>6} {runtime:<13} {res['seconds']:>8.1f} {res['peak_rss_gb']:>12.2f} "
                      f"{whole:>12.1f} ({n_layers} layers)", flush=True)


if __name__ == "__main__":
    main()
