"""``qconvert w8a8``: parse the options, call ``write_w8a8`` (``qconvert.pipelines.int4``), print.

W8A8 is a command of its own rather than ``qconvert gptq --scheme w8a8``: it is a scheme (weights *and*
activations), its weights may come from round-to-nearest or GPTQ, SmoothQuant applies only to it, and most of
``gptq``'s options (--bits, --group-size, --asym, --act-order, --format) have one forced value here.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

COMMANDS = ("w8a8",)

EPILOG = """\
examples:
  qconvert w8a8 --size 7b                           # -> qwen2.5-7b-instruct-w8a8/ (RTN int8 weights, no calibration)
  qconvert w8a8 --size 7b --smooth                  # SmoothQuant (alpha 0.5) from builtin calibration text
  qconvert w8a8 --size 7b --weights gptq --smooth 0.8 --device cuda

W8A8 INT8: weights int8 with one scale per output row, activations quantized to int8 per token at run time, in
the compressed-tensors `int-quantized` layout llm-compressor writes (vLLM serves it on GPUs and on x86 CPUs).
--smooth migrates activation outliers into the weights (s = max|X|^alpha / max|W|^(1-alpha), folded into the
RMSNorms before q/k/v and gate/up); it collects per-channel activation maxima in one float pass and folds the
scales into each layer as the quantization pass loads it (no copy of the checkpoint on disk).
"""


def add_parsers(sub: Any, add_model_args: Any) -> None:
    """Register ``w8a8`` on the CLI's subparsers."""
    from qconvert.commands.argtypes import add_directory_output, float_range
    from qconvert.commands.calibargs import add_calibration_args
    from qconvert.constants import DEFAULT_HOLDOUT

    p = sub.add_parser("w8a8", help="quantize to W8A8 INT8 (int8 weights, per-token int8 activations; "
                                    "compressed-tensors, for vLLM)",
                       description="Quantize a Qwen2.5 checkpoint to W8A8 INT8 in the compressed-tensors "
                                   "int-quantized layout.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    q = p.add_argument_group("quantization")
    q.add_argument("--weights", choices=("rtn", "gptq"), default="rtn",
                   help="int8 weights by round-to-nearest (default; no calibration needed) or GPTQ (8-bit per "
                        "channel, layer by layer on the calibration set)")
    q.add_argument("--smooth", type=float_range(0.0, 1.0), nargs="?", const=0.5, default=None, metavar="ALPHA",
                   help="SmoothQuant scale migration with strength ALPHA (default when given: 0.5)")
    q.add_argument("--damp", type=float_range(0.0, 1.0, low_open=True, high_open=True), default=0.01,
                   help="GPTQ Hessian damping, fraction of mean diagonal (0.01)")
    q.add_argument("--no-guard", action="store_true",
                   help=f"GPTQ: fit every calibration window (default: the last {DEFAULT_HOLDOUT * 100:.0f}%% are held out "
                        "and GPTQ's result is kept only where it beats round-to-nearest on them)")
    add_calibration_args(p, default_calib="builtin", stats_help="not accepted: W8A8 needs activation maxima, which "
                                                                "a statistics file does not hold")
    o = p.add_argument_group("output")
    add_directory_output(o, no_eval=True)


def run(args: argparse.Namespace) -> int:
    from qconvert.calibration.quantize import CalibrationError, check_model_scheme
    from qconvert.commands.calibargs import calibration_from_args, layer_progress, settings_from_args
    from qconvert.commands.gguf import model_ref
    from qconvert.constants import DEFAULT_HOLDOUT
    from qconvert.int4.guard import holdout_count
    from qconvert.io.atomic import check_not_inside, check_writable_target
    from qconvert.pipelines.int4 import w8a8_output_name, w8a8_quantization_config_for, write_w8a8
    from qconvert.registry import spec_for_config
    from qconvert.resolve import resolve_model

    if args.stats is not None or args.save_stats is not None:
        raise CalibrationError("qconvert w8a8 takes neither --stats nor --save-stats: SmoothQuant needs per-channel "
                               "activation maxima and W8A8's GPTQ runs layer by layer. Drop the option.")
    settings = settings_from_args(args)
    resolved = resolve_model(model_ref(args))
    model_name = resolved.repo_id or resolved.path.name
    config = json.loads((resolved.path / "config.json").read_text())
    check_model_scheme(config, spec_for_config(config), 8, -1)
    w8a8_quantization_config_for(args.weights, args.smooth, args.damp)  # refusals before any work
    out = args.out_dir / w8a8_output_name(model_name)
    check_not_inside(out, (resolved.path,))
    if out.exists() and not args.force:
        check_writable_target(out, force=False)
    needs_calib = args.weights == "gptq" or args.smooth is not None
    calib = calibration_from_args(args, resolved.path, model_name) if needs_calib else None
    holdout = None if args.no_guard or args.weights != "gptq" else DEFAULT_HOLDOUT
    if holdout is not None and calib is not None:
        holdout_count(calib.ids.shape[0], holdout)  # too few windows for the split: refused before any forward
    progress, bars = layer_progress("w8a8 layers", args.quiet)
    try:
        report = write_w8a8(resolved.path, model_name, out, args.weights, calib, settings, alpha=args.smooth,
                            damp=args.damp, force=args.force, progress=progress, evaluate=not args.no_eval,
                            holdout=holdout)
    finally:
        for bar in bars:
            bar.close()
    if calib is not None:
        print(f"used {report.n_tokens:,} calibration tokens ({report.n_samples} x {report.seq_len})")
    if report.holdout:
        print(report.guard_summary())
    print(f"wrote {out} (W8A8 INT8, {args.weights} weights"
          f"{f', SmoothQuant alpha {args.smooth}' if args.smooth is not None else ''}; {report.seconds:.1f} s on "
          f"{report.device})", file=sys.stdout)
    return 0
