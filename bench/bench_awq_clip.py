"""Where AWQ's clip search helps and where it hurts, on a real checkpoint (no scale search, float inputs).

    ../shared/tools/real-model.sh                      # builds ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied
    python bench/bench_awq_clip.py [MODEL_DIR] [--samples 8] [--tokens 8192]

Loads the float model in transformers, records every decoder linear's inputs on the built-in calibration set
(``--samples`` x 512 tokens, seed 0, as ``bench_int4.py``), and runs ``qconvert.int4.awq.search_clip`` on them
(512 sampled tokens per linear, AutoAWQ's objective). Then:

1. per linear type, the output error ``|X (Q(W) - W)^T|^2`` on held-out text with the clip over zero-point RTN
   without it (a ratio < 1: the clip helps that linear);
2. the whole model with every linear fake-quantized (zero-point RTN, 4-bit g128) with the clips applied to
   the named subsets: mean KL(float || quantized) per token and perplexity on ``--tokens`` held-out tokens.

No scale search and no propagation of quantized outputs, so this isolates the clip search; ``bench_int4.py``'s
``awq-clip-only`` / ``awq-clip-all`` / ``awq-no-clip`` methods run the real driver. About 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
QK = ("self_attn.q_proj", "self_attn.k_proj")
# which linears get their searched clip; the rest are plain zero-point RTN
SUBSETS: dict[str, Callable[[int, str], bool]] = {
    "none (zero-point RTN)": lambda layer, name: False,
    "all but q/k (AutoAWQ)": lambda layer, name: name not in QK,
    "all (--clip-all)": lambda layer, name: True,
    "all but down_proj": lambda layer, name: name != "mlp.down_proj",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} not found: run ../shared/tools/real-model.sh first")
    import torch
    from transformers import AutoModelForCausalLM

    from qconvert.calibset import load_calibration
    from qconvert.int4.awq import AWQConfig, apply_clip, search_clip
    from qconvert.int4.rtn import fake_quantize_groups
    from qconvert.verify import eval_tokens

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = model.model.layers
    calib = load_calibration("builtin", args.model, chat=False, n_samples=args.samples, seq_len=512, seed=0).ids
    n = args.tokens // 512
    held = torch.from_numpy(eval_tokens(args.model).ids[:n * 512].astype("int64")).reshape(n, 512)
    cfg = AWQConfig()

    def inputs_of(ids: torch.Tensor, keep: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """Each linear's inputs over ``ids`` (``keep`` thins each sample's rows)."""
        got: dict[tuple[int, str], list[torch.Tensor]] = {}
        hooks = [layers[i].get_submodule(n).register_forward_pre_hook(
                     lambda mod, inp, key=(i, n): got.setdefault(key, []).append(keep(inp[0].reshape(-1, inp[0].shape[-1]))))
                 for i in range(len(layers)) for n in LINEARS]
        with torch.no_grad():
            for row in ids:
                model(row[None])
        for h in hooks:
            h.remove()
        return {k: torch.cat(v) for k, v in got.items()}

    weights = {(i, n): layers[i].get_submodule(n).weight.detach().clone().float()
               for i in range(len(layers)) for n in LINEARS}
    clips = {k: search_clip(x, weights[k], cfg) for k, x in inputs_of(calib, lambda x: x).items()}
    stride = max(1, held.numel() // 4096)  # per-linear error on 4,096 held-out tokens
    held_x = inputs_of(held, lambda x: x[::stride])
    print(f"model {args.model.name}; clip search on {calib.numel()} calibration tokens ({cfg.clip_tokens} sampled); "
          f"4-bit g128 zero point; held-out text: {held.numel()} tokens")
    print("\n1. held-out output error of each linear, clipped / zero-point RTN (over all layers)")
    print(f"{'linear':>18} {'median':>8} {'min':>8} {'max':>8}")
    for n in LINEARS:
        ratios = []
        for i in range(len(layers)):
            w, x = weights[(i, n)], held_x[(i, n)]
            err = [float((x @ (fake_quantize_groups(v, 4, 128, sym=False) - w).T).pow(2).mean())
                   for v in (w, apply_clip(w, clips[(i, n)]))]
            ratios.append(err[1] / err[0])
        r = torch.tensor(ratios)
        print(f"{n:>18} {r.median():8.3f} {r.min():8.3f} {r.max():8.3f}")
    del held_x

    with torch.no_grad():
        ref = [torch.log_softmax(model(row[None]).logits[0].float(), -1) for row in held]
    print("\n2. whole model, every linear zero-point RTN; clipped first where the subset says")
    print(f"{'clipped linears':>24} {'KL':>8} {'PPL':>8}")
    for label, use in SUBSETS.items():
        with torch.no_grad():
            for (i, n), w in weights.items():
                v = apply_clip(w, clips[(i, n)]) if use(i, n) else w
                layers[i].get_submodule(n).weight.copy_(fake_quantize_groups(v, 4, 128, sym=False))
            kl, nll = 0.0, 0.0
            for row, lp_ref in zip(held, ref):
                lp = torch.log_softmax(model(row[None]).logits[0].float(), -1)
                kl += float((lp_ref.exp() * (lp_ref - lp)).sum(-1).sum())
                nll -= float(lp[torch.arange(len(row) - 1), row[1:]].sum())
        print(f"{label:>24} {kl / held.numel():8.4f} {math.exp(nll / (held.numel() - len(held))):8.3f}")
    float_nll = -sum(float(r[torch.arange(len(row) - 1), row[1:]].sum()) for r, row in zip(ref, held))
    print(f"{'float model':>24} {'':>8} {math.exp(float_nll / (held.numel() - len(held))):8.3f}")


if __name__ == "__main__":
    main()
