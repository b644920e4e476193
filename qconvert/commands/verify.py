"""``qconvert verify``: artifacts in their own runtimes against the float reference, with pass/fail gates.

Every check that can fail on bad input (artifact kinds, truncated files, device, context, text length) runs
before the reference pass; vocabulary checks run per artifact before its runtime loads.
"""

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
    p.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512; half is scored)")
    p.add_argument("--chunks", type=int, help="score at most N windows (default: all the text fills)")
    p.add_argument("--runtime", action="append", metavar="NAME",
                   help="restrict GPTQ/AWQ to qconvert-dequant or gptqmodel (repeatable; default: every available)")
    g = p.add_argument_group("gates")
    g.add_argument("--max-dppl", type=float, metavar="PCT", help="fail an artifact whose ΔPPL exceeds PCT percent")
    g.add_argument("--max-kl", type=float, metavar="X", help="fail an artifact whose mean KL exceeds X nats")
    g.add_argument("--baseline", type=Path, metavar="FILE", help="fail on regressions against this stored result")
    g.add_argument("--write-baseline", type=Path, metavar="FILE", help="record this run as the baseline")
    g.add_argument("--baseline-tol-dppl", type=float, default=0.25, metavar="POINTS",
                   help="ΔPPL may exceed the baseline by this many percentage points (default 0.25)")
    g.add_argument("--baseline-tol-kl", type=float, default=0.10, metavar="FRAC",
                   help="mean KL may exceed the baseline by this fraction (default 0.10)")
    o = p.add_argument_group("output")
    o.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    o.add_argument("--report", type=Path, metavar="DIR", help="write report.md and PNG plots to DIR")
    o.add_argument("--cache-dir", type=Path, help="where reference summaries are cached (default ~/.cache/qconvert/verify)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def _reference_dir(args: argparse.Namespace) -> Path:
    from qconvert.family import SIZES, hub_id
    from qconvert.resolve import resolve_model

    ref = hub_id(args.reference, args.variant) if args.reference in SIZES else args.reference
    return resolve_model(ref).path


def _runtimes(kind: str, wanted: list[str] | None, notes: list[str]) -> list[str]:
    from qconvert.verify.artifacts import gptqmodel_available, runtimes_for

    names = [r for r in runtimes_for(kind) if not wanted or r in wanted]
    if "gptqmodel" in names and not gptqmodel_available():
        names.remove("gptqmodel")
        if wanted and "gptqmodel" in wanted:
            from qconvert.errors import RuntimeMissingError
            from qconvert.verify.artifacts import ORACLE_HINT

            raise RuntimeMissingError(ORACLE_HINT)
        notes.append("gptqmodel path skipped: gptqmodel is not importable here (it lives in .venv-oracle); "
                     "the qconvert-dequant path ran")
    return names


def run(args: argparse.Namespace) -> int:
    from qconvert.verify import (
        BaselineTolerance,
        build_reference,
        check,
        compare_baseline,
        detect,
        eval_tokens,
        format_table,
        read_baseline,
        thresholds_for,
        verify_artifact,
        write_baseline,
        write_json,
        write_report,
    )
    from qconvert.verify.reference import resolve_device
    from qconvert.verify.tokens import dataset_text

    device = resolve_device(args.device)
    arts = [detect(a) for a in args.artifacts]  # bad files fail before the reference pass
    baseline = read_baseline(args.baseline) if args.baseline is not None else None
    ref_dir = _reference_dir(args)
    text = dataset_text(args.dataset) if args.dataset else None
    tokens = eval_tokens(ref_dir, text=text, text_file=args.text)
    if args.dataset:
        tokens = type(tokens)(tokens.ids, tokens.sha256, f"dataset:{args.dataset}")
    ref = build_reference(ref_dir, tokens, ctx=args.ctx, chunks=args.chunks, device=device, cache_dir=args.cache_dir,
                          dtype=args.ref_dtype, progress=not args.quiet)
    print(f"reference {ref_dir.name}: PPL {ref.ppl:.4f} ({ref.device}, {ref.dtype}) on {len(ref.windows)} windows x "
          f"{ref.ctx} tokens of {tokens.source} ({tokens.n_tokens:,} tokens, sha256 {tokens.sha256[:16]}…)",
          file=sys.stderr)
    if "cpu_vs_cuda" in ref.meta:
        d = ref.meta["cpu_vs_cuda"]
        print(f"reference CUDA vs CPU float32 (first window): KL {d['kl_mean']:.2e}, top-1 {100 * d['top1']:.1f}%, "
              f"ΔPPL {d['dppl_pct']:+.3f}%", file=sys.stderr)
    notes: list[str] = []
    results = []
    for art in arts:
        for rt in _runtimes(art.kind, args.runtime, notes):
            results.append(verify_artifact(art.path, ref, device=device, runtime=rt, progress=not args.quiet))
    status, failed = [], False
    for r in results:
        why = check(r, thresholds_for(r, args.max_dppl, args.max_kl))
        status.append("FAIL: " + "; ".join(why) if why else "PASS")
        failed |= bool(why)
    print(format_table(results, status))
    for note in notes + [n for r in results for n in r.notes]:
        print(f"note: {note}", file=sys.stderr)
    if baseline is not None:
        regress = compare_baseline(results, baseline, BaselineTolerance(args.baseline_tol_dppl, args.baseline_tol_kl))
        for key, why in regress.items():
            print(f"baseline {key}: {'REGRESSED: ' + '; '.join(why) if why else 'ok'}")
            failed |= bool(why)
    if args.json is not None:
        write_json(results, args.json, {"reference": str(ref_dir), "tokens_source": tokens.source,
                                        "tokens_sha256": tokens.sha256, "ppl_ref": ref.ppl, "gates": status,
                                        "reference_meta": ref.meta})
    if args.report is not None:
        print(f"wrote {write_report(results, args.report, status)}", file=sys.stderr)
    if args.write_baseline is not None:
        write_baseline(results, args.write_baseline)
        print(f"wrote baseline {args.write_baseline}", file=sys.stderr)
    return 1 if failed else 0
