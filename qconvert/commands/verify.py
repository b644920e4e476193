"""``qconvert verify``: parse the options, call ``verify_artifacts`` (``qconvert.pipelines.verify``), print and
write the table, JSON, report and baseline. Exit status 1 when a gate fails, 2 on bad input."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("verify",)

VERIFY_EPILOG = """\
examples:
  qconvert verify model-q4_k_m.gguf --reference ./Qwen2.5-0.5B-Instruct
  qconvert verify *.gguf qwen2.5-7b-instruct-gptq-int4/ --reference 7b --report out/report/ --json out/verify.json
  qconvert verify model-q5_k_m.gguf --reference ./ckpt --write-baseline baseline.json     # record once
  qconvert verify model-q5_k_m.gguf --reference ./ckpt --baseline baseline.json           # in CI: exit 1 if worse
  qconvert verify model.gguf --reference ./ckpt --dataset wikitext2 --ctx 512             # needs `datasets` + network

Method: the text is tokenized once with the reference's tokenizer; every runtime gets the same ids, cut into
consecutive windows of --ctx tokens, each run from an empty cache; the second half of each window is scored
(as llama-perplexity does). The reference (transformers, float32 on CPU, bfloat16 on CUDA) runs once; its top-64
log-probabilities and logsumexp per position are cached on disk, so more artifacts cost no more reference passes.
GGUF runs in llama.cpp, ONNX in onnxruntime, GPTQ/AWQ in qconvert's exact dequantize-then-matmul forward and,
where gptqmodel is importable, in transformers with GPTQModel's kernels.

Gates: without --max-dppl/--max-kl each artifact gets a default limit that scales with model size and bits per
weight (about twice the loss a correct quantizer shows); --baseline compares with a stored run of the same
artifacts on the same tokens. Exit status 1 when any gate fails, 2 on bad input.
"""


def add_parsers(sub: Any, add_model_args: Any) -> None:
    from qconvert.commands.argtypes import MAX_CHUNKS, MAX_SEQLEN, int_range, number, positive_int
    from qconvert.family import SIZES, VARIANTS

    p = sub.add_parser("verify", help="measure artifacts against the float reference in their own runtimes (PPL, KL, "
                                      "top-1) and gate on regressions",
                       description="Run GGUF, ONNX, GPTQ and AWQ artifacts in their own runtimes on the same token ids "
                                   "as the float reference; report perplexity, KL, agreement, size and speed.",
                       epilog=VERIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT",
                   help="a .gguf file, an .onnx model, or a GPTQ/AWQ/float checkpoint directory")
    p.add_argument("--reference", required=True, metavar="MODEL_OR_SIZE",
                   help=f"the float checkpoint: a directory, a hub repo id, or a Qwen2.5 size ({', '.join(SIZES)})")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="instruct", help="with a size: which Qwen2.5 repo")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] for the reference and torch/onnx runtimes")
    p.add_argument("--ref-dtype", choices=("float32", "bfloat16", "float16"),
                   help="reference compute dtype (default float32 on CPU, bfloat16 on CUDA)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--text", type=Path, metavar="FILE", help="a local UTF-8 text to score instead of the built-in one")
    t.add_argument("--dataset", metavar="NAME", help="wikitext2 (wikitext-2-raw-v1 test) or hf:NAME[:split]; needs "
                                                     "the datasets package and network access")
    p.add_argument("--ctx", type=int_range(2, MAX_SEQLEN, "Qwen2.5's longest context"), default=512, help="window length in tokens (default 512; half is scored)")
    p.add_argument("--chunks", type=positive_int(MAX_CHUNKS, "more windows than any text holds"), help="score at most N windows (default: all the text fills)")
    p.add_argument("--runtime", action="append", metavar="NAME",
                   help="restrict GPTQ/AWQ to qconvert-dequant or gptqmodel (repeatable; default: every available)")
    g = p.add_argument_group("gates")
    g.add_argument("--max-dppl", type=number, metavar="PCT", help="fail an artifact whose ΔPPL exceeds PCT percent")
    g.add_argument("--max-kl", type=number, metavar="X", help="fail an artifact whose mean KL exceeds X nats")
    g.add_argument("--baseline", type=Path, metavar="FILE", help="fail on regressions against this stored result")
    g.add_argument("--write-baseline", type=Path, metavar="FILE", help="record this run as the baseline")
    g.add_argument("--baseline-tol-dppl", type=number, default=0.25, metavar="POINTS",
                   help="ΔPPL may exceed the baseline by this many percentage points (default 0.25)")
    g.add_argument("--baseline-tol-kl", type=number, default=0.10, metavar="FRAC",
                   help="mean KL may exceed the baseline by this fraction (default 0.10)")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    o.add_argument("--report", type=Path, metavar="DIR", help="write report.md and PNG plots to DIR")
    o.add_argument("--cache-dir", type=Path, help="where reference summaries are cached (default ~/.cache/qconvert/verify)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from qconvert.pipelines.verify import verify_artifacts
    from qconvert.verify import BaselineTolerance, format_table, write_baseline, write_json, write_report

    def on_reference(ref_dir: Path, ref: Any, tokens: Any) -> None:
        print(f"reference {ref_dir.name}: PPL {ref.ppl:.4f} ({ref.device}, {ref.dtype}) on {len(ref.windows)} windows "
              f"x {ref.ctx} tokens of {tokens.source} ({tokens.n_tokens:,} tokens, sha256 {tokens.sha256[:16]}…)",
              file=sys.stderr)
        if "cpu_vs_cuda" in ref.meta:
            d = ref.meta["cpu_vs_cuda"]
            print(f"reference CUDA vs CPU float32 (first window): KL {d['kl_mean']:.2e}, top-1 {100 * d['top1']:.1f}%, "
                  f"ΔPPL {d['dppl_pct']:+.3f}%", file=sys.stderr)

    v = verify_artifacts(args.artifacts, args.reference, variant=args.variant, device=args.device,
                         ref_dtype=args.ref_dtype, text_file=args.text, dataset=args.dataset, ctx=args.ctx,
                         chunks=args.chunks, runtime=args.runtime, max_dppl=args.max_dppl, max_kl=args.max_kl,
                         baseline=args.baseline,
                         tolerance=BaselineTolerance(args.baseline_tol_dppl, args.baseline_tol_kl),
                         cache_dir=args.cache_dir, progress=not args.quiet, on_reference=on_reference)
    print(format_table(v.results, v.status))
    for note in v.notes:
        print(f"note: {note}", file=sys.stderr)
    for key, why in (v.regressions or {}).items():
        print(f"baseline {key}: {'REGRESSED: ' + '; '.join(why) if why else 'ok'}")
    if args.json is not None:
        write_json(v.results, args.json, {"reference": str(v.reference_dir), "tokens_source": v.tokens.source,
                                          "tokens_sha256": v.tokens.sha256, "ppl_ref": v.reference.ppl,
                                          "gates": v.status, "reference_meta": v.reference.meta})
    if args.report is not None:
        print(f"wrote {write_report(v.results, args.report, v.status)}", file=sys.stderr)
    if args.write_baseline is not None:
        write_baseline(v.results, args.write_baseline)
        print(f"wrote baseline {args.write_baseline}", file=sys.stderr)
    return 1 if v.failed else 0
