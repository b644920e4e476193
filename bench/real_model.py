"""GGUF on a real trained Qwen2.5-architecture checkpoint: byte identity, perplexity per type, timings.

    ../shared/tools/real-model.sh                      # builds ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b[-tied]
    python bench/real_model.py [MODEL_DIR] [--types Q8_0 Q6_K Q5_K_M Q4_K_M Q3_K_M Q2_K] [--tokens 2048]

For each type: qconvert's one-pass conversion time, file size and bits per weight; whether it equals, tensor by
tensor, llama.cpp's ``llama_model_quantize`` run on qconvert's F16 GGUF; and llama.cpp's perplexity on the
project's held-out text (windows of 512 tokens, every position after the first scored), with the change against
the F16 file. Also checks that llama.cpp's tokenizer equals the Hugging Face tokenizer on that text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from qconvert.fixtures.corpus import eval_text
from qconvert.gguf.export import export_gguf
from qconvert.gguf.plan import get_preset
from qconvert.gguf.reader import read_gguf
from qconvert.runtimes.llamacpp import LlamaCppModel, llama_quantize

DEFAULT_MODEL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"


def perplexity(path: Path, ids: list[int], window: int) -> tuple[float, float]:
    """(perplexity, tokens/s) of llama.cpp on ``path`` over consecutive windows of ``ids``."""
    nll, n, start = 0.0, 0, time.perf_counter()
    with LlamaCppModel(path, n_ctx=window) as m:
        for i in range(0, len(ids) - window + 1, window):
            chunk = ids[i:i + window]
            x = m.logits(chunk)[:-1].astype(np.float64)
            mx = x.max(-1)
            lse = np.log(np.exp(x - mx[:, None]).sum(-1)) + mx
            nll += float((lse - x[np.arange(window - 1), chunk[1:]]).sum())
            n += window - 1
    return float(np.exp(nll / n)), n / (time.perf_counter() - start)


def same_tensors(a: Path, b: Path) -> bool:
    ga, gb = read_gguf(a), read_gguf(b)
    return list(ga.tensors) == list(gb.tensors) and all(
        ga.tensors[k].type == t.type and np.array_equal(ga.read_tensor_bytes(k), gb.read_tensor_bytes(k))
        for k, t in gb.tensors.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qconvert-real"))
    args = ap.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} not found: run ../shared/tools/real-model.sh first")
    args.workdir.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(args.model / "tokenizer.json")).encode(eval_text()).ids[: args.tokens]
    f16 = args.workdir / "f16.gguf"
    t = time.perf_counter()
    export_gguf(args.model, f16, "F16", force=True)
    print(f"F16 conversion: {time.perf_counter() - t:.1f} s")
    with LlamaCppModel(f16, vocab_only=True) as m:
        text = eval_text()
        same_tok = m.tokenize(text, parse_special=True) == Tokenizer.from_file(str(args.model / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    print(f"llama.cpp tokenizer == HF tokenizer on the whole held-out text (special tokens parsed): {same_tok}")
    base_ppl, base_tps = perplexity(f16, ids, args.window)
    rows = [("F16", None, f16.stat().st_size, 16.0, base_ppl, base_tps, None)]
    for preset in args.types:
        out, ref = args.workdir / f"{preset}.gguf", args.workdir / f"{preset}-llama.gguf"
        t = time.perf_counter()
        res = export_gguf(args.model, out, preset, force=True)
        secs = time.perf_counter() - t
        llama_quantize(f16, ref, int(get_preset(preset).file_type))
        n = sum(e.n_elements for e in res.plan.entries)
        ppl, tps = perplexity(out, ids, args.window)
        rows.append((preset, secs, out.stat().st_size, 8 * res.plan.tensor_bytes() / n, ppl, tps, same_tensors(out, ref)))
    print(f"\nmodel: {args.model.name}; {len(ids)} held-out tokens in windows of {args.window}")
    print(f"{'type':<7} {'convert s':>9} {'size MB':>8} {'bpw':>5} {'PPL':>8} {'dPPL %':>7} {'llama tok/s':>11} {'= llama-quantize':>16}")
    for preset, secs, size, bpw, ppl, tps, same in rows:
        d = 100 * (ppl / base_ppl - 1)
        print(f"{preset:<7} {'' if secs is None else f'{secs:.1f}':>9} {size / 1e6:>8.1f} {bpw:>5.2f} {ppl:>8.3f} "
              f"{d:>+7.2f} {tps:>11.0f} {'' if same is None else ('yes' if same else 'NO'):>16}")


if __name__ == "__main__":
    main()
