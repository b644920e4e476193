"""Verification on the real Qwen2.5-Coder-0.5B checkpoint: the quality table, and verify's throughput vs llama.cpp.

    .venv/bin/python bench/bench_verify.py --artifacts DIR [--ctx 512] [--chunks 4] [--json OUT] [--report DIR]

DIR holds the artifacts to verify (GGUF files, GPTQ/AWQ directories, ONNX directories), all made from the
reference checkpoint (default ~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied; the benchmark skips cleanly
when it is absent). Throughput: `qconvert verify`'s whole per-artifact pass on one GGUF (llama_decode with outputs
for the scored half, copying the logits, all metrics) against a bare llama_decode loop over the same windows at
full batch with outputs for every position (what llama-perplexity asks llama.cpp for) and nothing else, which
is an upper bound on any perplexity tool built on the same library. The llama-perplexity binary itself is not
part of the llama-cpp-py-sync wheel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_REF = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"


def raw_decode_seconds(path: Path, windows: np.ndarray, all_logits: bool = True) -> float:
    """Seconds for a bare llama_decode per window (outputs for every position), logits left in llama.cpp."""
    from qconvert.runtimes.llamacpp import LlamaCppModel

    with LlamaCppModel(path, n_ctx=windows.shape[1], n_threads=int(os.environ.get("QCONVERT_THREADS", "0"))) as m:
        lib, b = m.lib, m.lib.llama_batch_init(windows.shape[1], 0, 1)
        try:
            total = 0.0
            for w in windows:
                lib.llama_memory_clear(lib.llama_get_memory(m.ctx), True)
                for i, t in enumerate(w.tolist()):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = t, i, 1, 0, all_logits
                b.n_tokens = len(w)
                start = time.perf_counter()
                assert lib.llama_decode(m.ctx, b) == 0
                total += time.perf_counter() - start
            return total
        finally:
            lib.llama_batch_free(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, default=DEFAULT_REF)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="windows of the (cached) reference pass")
    ap.add_argument("--use", type=int, help="verify on the first N of those windows only (default all)")
    ap.add_argument("--speed-artifact", default="q4_k_m", help="substring of the GGUF used for the throughput test")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path)
    args = ap.parse_args()
    if not (args.reference / "config.json").is_file():
        print(f"skip: reference checkpoint {args.reference} is absent", file=sys.stderr)
        return 0
    from qconvert.verify import (
        build_reference,
        eval_tokens,
        verify_artifact,
        write_json,
        write_report,
    )
    from qconvert.verify.report import markdown_table

    print(f"cpu threads {os.cpu_count()}, llama-perplexity binary: {shutil.which('llama-perplexity') or 'absent'}")
    tokens = eval_tokens(args.reference)
    start = time.perf_counter()
    ref = build_reference(args.reference, tokens, ctx=args.ctx, chunks=args.chunks, progress=False)
    print(f"reference: {tokens.n_tokens} tokens ({tokens.source}, sha256 {tokens.sha256[:16]}), {len(ref.windows)} "
          f"windows x {args.ctx}, PPL {ref.ppl:.4f}, {time.perf_counter() - start:.1f} s "
          f"({ref.tokens_per_s:.0f} tok/s forward; cache {ref.meta.get('cache')})")
    if args.use:
        ref = ref.subset(args.use)
        print(f"verifying on the first {len(ref.windows)} windows: reference PPL there {ref.ppl:.4f}")
    arts = sorted((p for p in args.artifacts.iterdir() if p.suffix == ".gguf" or p.is_dir()),
                  key=lambda p: (args.speed_artifact not in p.name, p.name))  # the speed artifact first
    results = []
    for p in arts:
        start = time.perf_counter()
        r = verify_artifact(p, ref, progress=False)
        seconds = time.perf_counter() - start
        results.append(r)
        print(markdown_table([r]).splitlines()[-1], f"({seconds:.1f} s)", flush=True)
        if args.speed_artifact in p.name and p.suffix == ".gguf":
            n_tok = ref.windows.size
            raw = raw_decode_seconds(p, ref.windows)
            print(f"throughput on {p.name}: qconvert verify {n_tok / seconds:.0f} tok/s end to end (load, "
                  f"decode, metrics); bare llama_decode, all logits, {n_tok / raw:.0f} tok/s; ratio "
                  f"{100 * raw / seconds:.0f}%", flush=True)
    print(markdown_table(results))
    if args.json:
        write_json(results, args.json, {"ppl_ref": ref.ppl, "tokens_sha256": tokens.sha256})
    if args.report:
        print(f"report: {write_report(results, args.report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
