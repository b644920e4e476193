"""``qconvert convert-format``: re-pack a GPTQ / AWQ / compressed-tensors checkpoint into another layout.

Parses the options and calls ``qconvert.pipelines.int4.convert_format``; no requantization, no model forward.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

COMMANDS = ("convert-format",)

EPILOG = """\
examples:
  qconvert convert-format qwen2.5-7b-instruct-gptq-int4 --to compressed-tensors   # -> qwen2.5-7b-instruct-gptq-int4-ct/
  qconvert convert-format qwen2.5-7b-instruct-awq --to compressed-tensors --output awq-w4a16/
  qconvert convert-format qwen2.5-7b-instruct-gptq-int4-ct --to gptq                # back to GPTQ v1, same bytes

The codes, scales and zero points are unpacked and packed again, so the output dequantizes to exactly the weights
of the source. Not every layout holds every checkpoint: act-order GPTQ (permuted g_idx) goes only to gptq, 8-bit
and per-channel weights not to AWQ (4-bit groups only), 3-bit not to compressed-tensors (4/8-bit), and an AWQ or
asymmetric zero point of 0 not to GPTQ v1 (it stores z - 1); qconvert says which and writes nothing.
"""


def add_parsers(sub: Any, add_model_args: Any) -> None:
    """Register ``convert-format`` on the CLI's subparsers (``add_model_args`` is unused: the source is a path)."""
    from qconvert.pipelines.int4 import CONVERT_TARGETS

    p = sub.add_parser("convert-format", help="re-pack a GPTQ/AWQ/compressed-tensors checkpoint into another layout "
                                              "(no requantization)",
                       description="Re-pack a quantized checkpoint directory into the GPTQ v1, AWQ GEMM or "
                                   "compressed-tensors pack-quantized layout without requantizing.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, metavar="DIR", help="a GPTQ, AWQ or compressed-tensors checkpoint directory")
    p.add_argument("--to", required=True, choices=CONVERT_TARGETS, help="the layout to write")
    p.add_argument("--output", type=Path, metavar="DIR",
                   help="output directory (default: beside DIR, named after it: -ct added for compressed-tensors, "
                        "removed for gptq/awq)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from qconvert.commands.argtypes import check_output_path
    from qconvert.io.atomic import check_not_inside, check_writable_target
    from qconvert.pipelines.int4 import convert_format, convert_output_name

    out = args.output or args.source.resolve().parent / convert_output_name(args.source, args.to)
    check_output_path(out, option="--output", directory=True)
    check_not_inside(out, (args.source,))
    if out.exists() and not args.force:
        check_writable_target(out, force=False)
    convert_format(args.source, out, args.to, force=args.force)
    print(f"wrote {out} ({args.to}, re-packed from {args.source})")
    return 0
