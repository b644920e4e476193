"""``qconvert gptq`` / ``qconvert awq``: parse the options, call ``write_int4`` (``qconvert.pipelines.int4``), print.

Every check that can fail (scheme vs model shapes, device, calibration text, existing output) runs before the
first forward and before anything is created under the output name.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the parser is built on every CLI call; torch is imported only when a command runs
    from qconvert.int4 import AWQConfig, GPTQConfig


def _config(args: argparse.Namespace) -> GPTQConfig | AWQConfig:
    from qconvert.int4.options import int4_config

    return int4_config(args.command, vars(args))


def run_int4(args: argparse.Namespace) -> int:
    from qconvert.calibration.quantize import CalibrationError, check_model_scheme
    from qconvert.commands.calibargs import (
        calibration_from_args,
        collect_and_save,
        layer_progress,
        load_stats,
        settings_from_args,
    )
    from qconvert.commands.gguf import model_ref
    from qconvert.int4.guard import holdout_count
    from qconvert.io.atomic import check_not_inside, check_writable_target
    from qconvert.pipelines.int4 import int4_quantization_config, marlin_warnings, output_dir_name, write_int4
    from qconvert.registry import spec_for_config
    from qconvert.resolve import resolve_model

    cfg = _config(args)
    settings = settings_from_args(args)
    resolved = resolve_model(model_ref(args))
    model_name = resolved.repo_id or resolved.path.name
    config = json.loads((resolved.path / "config.json").read_text())
    check_model_scheme(config, spec_for_config(config), cfg.bits, cfg.group_size)
    if args.stats is not None and args.command == "awq":
        raise CalibrationError("qconvert awq does not take --stats: AWQ searches its scales on each layer's own "
                               "activations, which a statistics file does not hold. Drop --stats.")
    if args.stats is not None and args.save_stats is not None:
        raise CalibrationError("--stats reads statistics and --save-stats writes them; give one of the two.")
    int4_quantization_config(cfg, args.format)  # a scheme the layout cannot hold: refused before any work
    out = args.out_dir / output_dir_name(model_name, args.command, cfg.bits, args.format)
    check_not_inside(out, (resolved.path, args.stats))  # before any calibration work
    if args.save_stats is not None:
        check_not_inside(args.save_stats, (resolved.path,))
    if out.exists() and not args.force:
        check_writable_target(out, force=False)
    if args.save_stats is not None and args.save_stats.exists() and not args.force:
        check_writable_target(args.save_stats, force=False)
    stats = load_stats(args.stats, resolved.path) if args.stats is not None else None
    calib = calibration_from_args(args, resolved.path, model_name) if stats is None else None
    holdout = None if args.no_guard else args.holdout  # with --stats: the split the statistics file recorded
    if holdout is not None and calib is not None:
        holdout_count(calib.ids.shape[0], holdout)  # too few windows for the split: refused before any forward
    for line in marlin_warnings(cfg):
        print(f"qconvert: warning: {line}", file=sys.stderr)
    if args.save_stats is not None:
        assert calib is not None
        collect_and_save(args, resolved.path, calib, settings, holdout)
    progress, bars = layer_progress(f"{args.command} layers", args.quiet)
    try:
        report = write_int4(resolved.path, model_name, out, args.command, cfg, calib, settings, force=args.force,
                            progress=progress, stats=stats, evaluate=not args.no_eval,
                            pad_intermediate=args.pad_intermediate, holdout=holdout, layout=args.format)
    finally:
        for bar in bars:
            bar.close()
    print(f"used {report.n_tokens:,} calibration tokens ({report.n_samples} x {report.seq_len})")
    if report.holdout:
        print(report.guard_summary())
    print(f"wrote {out} ({report.seconds:.1f} s on {report.device}, {report.dtype})")
    return 0


GPTQ_EPILOG = """\
examples:
  qconvert gptq --size 7b                        # -> qwen2.5-7b-instruct-gptq-int4/ (4-bit, g128, sym)
  qconvert gptq --size 7b --bits 8 --group-size 128 --calib my_prompts.jsonl
  qconvert gptq --model ./my-finetune --calib-samples 256 --calib-seqlen 2048 --device cuda

How it works: the model runs one decoder layer at a time (memory ~ one layer + activations). Within a layer the
linears are quantized in order q/k/v -> o -> gate/up -> down; each column is rounded and the error it leaves is
pushed onto the columns not yet quantized, weighted by the inverse Hessian of that layer's calibration inputs.
The defaults (4-bit, group 128, symmetric, no act-order) are the format every loader takes, including vLLM's
Marlin kernels; --asym and --act-order are accepted but Marlin rejects or reorders them.

Calibration data is offline by default: --calib builtin is a small multilingual set (English and Chinese prose,
Python code, math) that qconvert ships; a checkpoint with a chat template sees it rendered by that template as
conversations, one without as raw text (--calib-format to force either). Use --calib FILE.txt|FILE.jsonl for
your own domain. The number of tokens used is printed and written
into the output's README.md.
"""

AWQ_EPILOG = """\
examples:
  qconvert awq --size 7b                         # -> qwen2.5-7b-instruct-awq/ (4-bit, g128, zero point, GEMM)
  qconvert awq --model ./my-finetune --calib data.txt --device cuda

How it works: per layer, AWQ finds per-input-channel scales s that protect the channels with large activations
(searching s = x_mean^a / w_mean^(1-a) over a grid of a), folds 1/s into the preceding RMSNorm or linear and s
into the weights, then searches a clipping range per group (q_proj/k_proj only with --clip-all, as AutoAWQ
skips them), and rounds to 4 bits with zero points.
Calibration data as for `qconvert gptq --help`.
"""


COMMANDS = ("gptq", "awq")
LAYOUT_HELP = {"gptq": "GPTQ v1, what AutoGPTQ/GPTQModel wrote", "awq": "AutoAWQ GEMM"}


def add_parsers(sub: Any, add_model_args: Any) -> None:
    """Register ``gptq`` and ``awq`` on the CLI's subparsers."""
    from qconvert.commands.argtypes import (
        MAX_CALIB_SAMPLES,
        add_directory_output,
        float_range,
        group_size,
        int_range,
        non_negative_int,
    )
    from qconvert.commands.calibargs import add_calibration_args
    from qconvert.constants import DEFAULT_HOLDOUT, MAX_HOLDOUT

    for method, epilog in (("gptq", GPTQ_EPILOG), ("awq", AWQ_EPILOG)):
        p = sub.add_parser(method, help=f"quantize to {'an' if method == 'awq' else 'a'} {method.upper()} checkpoint with calibration (preview: checked with transformers and GPTQModel on CPU)",
                           description=f"Quantize a Qwen2.5 checkpoint to {method.upper()} with a layer-by-layer "
                                       "calibration pass; the output loads in transformers and vLLM.",
                           epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_model_args(p)
        q = p.add_argument_group("quantization")
        if method == "gptq":
            q.add_argument("--bits", type=int_range(2, 8, "GPTQ packs 2, 3, 4 or 8 bits"), default=4, help="2, 3, 4 or 8 (default 4)")
        q.add_argument("--group-size", type=group_size, default=128,
                       help="input columns sharing one scale: 32, 64, 128 (default) or -1 (one per row)")
        if method == "gptq":
            q.add_argument("--sym", action="store_true", default=True, help="symmetric grid (default; what Marlin needs)")
            q.add_argument("--asym", dest="sym", action="store_false",
                           help="asymmetric grid with zero points (Marlin rejects it)")
            order = q.add_mutually_exclusive_group()
            order.add_argument("--act-order", action="store_true",
                               help="quantize columns by decreasing Hessian diagonal (desc_act; slower loaders)")
            order.add_argument("--static-groups", action="store_true",
                               help="act-order with group parameters fixed up front (loads like desc_act false)")
            order.add_argument("--group-aware", action="store_true",
                               help="act-order inside whole groups (group-aware reordering, GPTQModel's default): "
                                    "the plain desc_act-false layout every loader takes")
            q.add_argument("--damp", type=float_range(0.0, 1.0, low_open=True, high_open=True), default=0.01, help="Hessian damping, fraction of mean diagonal (0.01)")
        else:
            q.add_argument("--search-samples", type=non_negative_int(MAX_CALIB_SAMPLES, "at most the calibration samples"),
                           default=0, metavar="N",
                           help="run the scale search's 20 trial forwards on N calibration samples (default 0: all, "
                                "as AutoAWQ; the activation means always use all). On a CPU, 8 cuts the time ~4x")
            q.add_argument("--clip-all", action="store_true",
                           help="also search clipping thresholds for q_proj and k_proj, which AutoAWQ leaves "
                                "unclipped (on Qwen2.5-Coder-0.5B: KL to float -3%%, same perplexity)")
        g = p.add_argument_group("held-out guard (never worse than round-to-nearest)")
        g.add_argument("--holdout", type=float_range(0.0, MAX_HOLDOUT, low_open=True), default=DEFAULT_HOLDOUT,
                       metavar="FRACTION",
                       help=f"fraction of the calibration windows (the last ones, at least one) that {method.upper()} "
                            "does not fit; each result is kept only where it beats round-to-nearest on them "
                            f"(default {DEFAULT_HOLDOUT}; at most {MAX_HOLDOUT})")
        g.add_argument("--no-guard", action="store_true",
                       help=f"fit every window and keep {method.upper()}'s result everywhere (no held-out check)")
        q.add_argument("--pad-intermediate", action="store_true",
                       help="zero-pad the MLP intermediate size so vLLM can shard it 2/4/8 ways (Qwen's 72B recipe: "
                            "29568 -> 29696); the model's outputs do not change")
        add_calibration_args(p, default_calib="builtin", stats_help=(
            "GPTQ from saved statistics (--save-stats): quantize every linear from the float model's Hessians, "
            "no forward pass (faster; not true-sequential)" if method == "gptq" else
            "not accepted: AWQ searches its scales on each layer's own activations"))
        o = p.add_argument_group("output")
        o.add_argument("--format", choices=(method, "compressed-tensors"), default=method,
                       help=f"checkpoint layout: {method} (default; {LAYOUT_HELP[method]}) or compressed-tensors "
                            "(llm-compressor's pack-quantized, what vLLM now expects; same codes and scales, output "
                            "name gets -ct; 4/8-bit, no --act-order)")
        add_directory_output(o, no_eval=True)


run = run_int4
