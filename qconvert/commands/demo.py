"""``qconvert demo``: the headline path end to end on the embedded demo model, offline, in under a minute.

Builds (or reuses) the project's small trained Qwen2-architecture model, converts it to GGUF Q5_K_M, loads the
file in llama.cpp, generates a reply to a chat prompt, and scores llama.cpp's logits against the float
reference (transformers) on held-out text. Prints one verdict line.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEMO_PROMPT = "Write one sentence about the sea."
WINDOW = 32  # the demo model was trained on 32-token sequences
N_WINDOWS = 16
# Quality gates for the demo verdict (measured on the demo model: see README).
MIN_TOP1 = 0.85
MAX_DPPL_PCT = 5.0


def fixture_model(name: str) -> Path:
    """The checkpoint of a built-in model by name (``demo``, or a test fixture), built on first use.

    What the demo and a recipe's ``fixture = NAME`` run on; KeyError names the known ones. The CLI is the one
    place product code reaches the fixture builders (``qconvert.fixtures``).
    """
    from qconvert.fixtures.models import fixture_path

    return fixture_path(name)


def _nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood of ids[:, 1:] under logits[:, :-1]; logits [windows, T, vocab]."""
    x = logits[:, :-1].astype(np.float64)
    m = x.max(-1)
    lse = np.log(np.exp(x - m[..., None]).sum(-1)) + m
    return lse - np.take_along_axis(x, ids[:, 1:, None], -1)[..., 0]


def _reference_logits(model_dir: Path, windows: np.ndarray) -> np.ndarray | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(windows)).logits.numpy()


def run_demo(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from qconvert.fixtures.chat import render_chat
    from qconvert.gguf.export import export_gguf
    from qconvert.runtimes.llamacpp import LlamaCppModel
    from qconvert.texts import evaluation_text

    t0 = time.perf_counter()
    model_dir = fixture_model("demo")
    print(f"demo model: {model_dir}")
    out = Path(args.out_dir) / "qwen2.5-demo-instruct-q5_k_m.gguf"
    result = export_gguf(model_dir, out, "Q5_K_M", model_name="qconvert/Qwen2.5-Demo-Instruct", force=True)
    n = sum(e.n_elements for e in result.plan.entries)
    print(f"converted:  {out} ({result.bytes_written / 1e6:.2f} MB, {8 * result.plan.tensor_bytes() / n:.2f} bpw, "
          f"{result.seconds:.1f} s)")
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(evaluation_text()).ids
    windows = np.array(ids[: WINDOW * N_WINDOWS], dtype=np.int64).reshape(N_WINDOWS, WINDOW)
    with LlamaCppModel(out, n_ctx=128) as llm:
        prompt = llm.tokenize(render_chat([{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True))
        reply = llm.detokenize(llm.greedy(prompt, 24)).split("<|im_end|>")[0].strip()
        got = np.stack([llm.logits(w.tolist()) for w in windows])
    print(f"llama.cpp:  {DEMO_PROMPT!r} -> {reply!r}")
    ref = _reference_logits(model_dir, windows)
    if ref is None:
        print("verdict: PARTIAL - llama.cpp loaded and ran the GGUF; install transformers to compare with the reference")
        return 0
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    ppl_ref, ppl_q = float(np.exp(_nll(ref, windows).mean())), float(np.exp(_nll(got, windows).mean()))
    dppl = 100 * (ppl_q / ppl_ref - 1)
    ok = top1 >= MIN_TOP1 and dppl <= MAX_DPPL_PCT and bool(reply)
    print(f"verdict: {'PASS' if ok else 'FAIL'} - llama.cpp ran {out.name}: top-1 agreement {100 * top1:.1f}% with the "
          f"float reference, perplexity {ppl_ref:.2f} -> {ppl_q:.2f} ({dppl:+.2f}%) on {windows.size} held-out tokens "
          f"[{time.perf_counter() - t0:.0f} s]")
    return 0 if ok else 1
