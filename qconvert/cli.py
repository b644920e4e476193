"""The ``qconvert`` command line: the parser and the dispatch to ``qconvert.commands``.

Commands parse their options, call the library (``qconvert.pipelines``, ``qconvert.gguf.export``,
``qconvert.onnx_export``, ``qconvert.release``) and print; no pipeline logic lives here or in ``commands/``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qconvert import __version__
from qconvert.commands.argtypes import check_output_options, int_range
from qconvert.errors import QConvertError

GGUF_EPILOG = """\
examples:
  qconvert gguf --size 1.5b --bits 5            # -> qwen2.5-1.5b-instruct-q5_k_m.gguf
  qconvert gguf --size 7b --variant coder --type Q4_K_M --out-dir out/
  qconvert gguf --model ./my-finetune --type Q8_0
  qconvert gguf --size 72b --bits 4 --dry-run   # per-tensor plan and predicted size, no weights needed beyond config
  qconvert gguf --size 1.5b --bits 3 --calib builtin --save-imatrix imatrix.gguf   # importance-weighted K-quants
  qconvert gguf --size 1.5b --bits 3 --calib builtin --optimize   # same size, codes chosen with error feedback

--bits maps to llama.cpp's usual presets: 2=Q2_K 3=Q3_K_M 4=Q4_K_M 5=Q5_K_M 6=Q6_K 8=Q8_0 16=F16.
Mixtures follow llama-quantize: the output (or tied embedding) gets Q6_K, about half of the attn_v/ffn_down
layers get more bits, and rows that are not a multiple of 256 (Qwen2.5-0.5B's 896) fall back to 32-blocks.
--calib (or --stats, --imatrix) gives the K-quants an importance matrix: the per-column mean of x² of every
matrix's inputs on calibration text, the same file llama-imatrix writes; it matters most at 2-3 bits.
The output file is written under a temporary name and renamed when complete; an existing file is kept unless
--force is given.
"""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from qconvert.family import SIZES, VARIANTS

    src = p.add_argument_group("model (one of --size or --model)")
    src.add_argument("--size", choices=tuple(SIZES), help="a Qwen2.5 size; resolved to its hub repo (see --variant)")
    src.add_argument("--variant", choices=tuple(VARIANTS), default="instruct", help="which Qwen2.5 repo of that size (default: instruct)")
    src.add_argument("--model", help="a local checkpoint directory or any hub repo id (Qwen/Qwen2.5-7B-Instruct)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qconvert", description="Turn Qwen2.5 checkpoints into verified deployable artifacts.")
    parser.add_argument("--version", action="version", version=f"qconvert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("gguf", help="convert a checkpoint to GGUF (llama.cpp, Ollama, LM Studio)",
                       description="Convert a Qwen2.5 checkpoint to GGUF in one pass, byte-identical to llama.cpp's "
                                   "convert_hf_to_gguf.py + llama-quantize.",
                       epilog=GGUF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(g)
    q = g.add_argument_group("quantization")
    pick = q.add_mutually_exclusive_group()
    pick.add_argument("--bits", type=int_range(2, 16, "GGUF presets go from 2 to 16 bits"), help="2, 3, 4, 5, 6, 8 or 16 (default 5 = Q5_K_M)")
    pick.add_argument("--type", dest="preset", help="a llama-quantize preset: Q2_K, Q2_K_S (needs an imatrix), Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, IQ3_S, IQ3_M; with an imatrix also IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S; F16, BF16, F32")
    q.add_argument("--pure", action="store_true", help="no mixture: every matrix gets the preset's base type")
    q.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight (or of the tied embedding)")
    q.add_argument("--token-embedding-type", metavar="TYPE", help="type of token_embd.weight")
    q.add_argument("--imatrix", type=Path, metavar="FILE",
                   help="llama.cpp importance matrix (imatrix GGUF from llama-imatrix): weighted K-quant search, as llama-quantize --imatrix")
    q.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="override the type of tensors whose GGUF name matches REGEX (repeatable; shape fallbacks still apply)")
    from qconvert.commands.calibargs import add_calibration_args
    add_calibration_args(g, default_calib=None, stats_help="importance matrix from a statistics file saved by "
                         "--save-stats (of gguf, gptq or awq)")
    g.add_argument("--save-imatrix", type=Path, metavar="FILE",
                   help="also write the importance matrix from --calib/--stats as a llama.cpp imatrix GGUF")
    g.add_argument("--optimize", action="store_true",
                   help="better codes at the same size: each decoder matrix's codes are chosen with GPTQ-style error "
                        "feedback over the calibration Hessians (needs --calib or --stats with Hessians), in "
                        "llama.cpp's own types, scales and block layout; a tensor keeps llama.cpp's encoding where "
                        "that does better on held-out calibration windows. Every quantized type: codes per weight for "
                        "Q4_0..Q8_0, Q2_K..Q6_K, IQ4_NL and IQ4_XS; for IQ1/IQ2/IQ3 llama.cpp's codes per block, the "
                        "error fed between blocks. Not byte-identical to llama.cpp, by design")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--target-size", type=float, metavar="GB",
                        help="choose each decoder matrix's type (K-quants Q2_K..Q8_0, or the 32-block types where rows "
                             "are not a multiple of 256) so the file is at most GB gigabytes (10^9 bytes) with the least "
                             "output error on the calibration Hessians; starts from --type's mixture (embedding and "
                             "output keep its types) and keeps that mixture when it fits and nothing better does. Needs "
                             "--calib or --stats; combine with --optimize for error-feedback codes; --dry-run prints the "
                             "plan")
    budget.add_argument("--target-bpw", type=float, metavar="BITS",
                        help="the same budget in bits per weight of tensor data (the bpw qconvert prints; the header "
                             "comes on top): one figure for every model size, e.g. 4.5. Give --target-size or "
                             "--target-bpw, not both")
    o = g.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, help="directory for the .gguf file, under its default name (default: .)")
    o.add_argument("--output", metavar="PATH",
                   help="the output file, relative to the current directory (not to --out-dir; give one of the two). "
                        "A PATH ending with '/' or naming a directory gets the default name "
                        "(qwen2.5-<size>-<variant>-<preset>.gguf) inside it")
    o.add_argument("--force", action="store_true", help="overwrite an existing output file")
    o.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and predicted size; write nothing")
    o.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="show what a checkpoint directory or a GGUF file holds",
                       description="Architecture, shapes, dtypes or quant types per tensor, size and bits per weight.")
    i.add_argument("path", type=Path, help="a .gguf file or a Hugging Face checkpoint directory")
    i.add_argument("--tensors", action="store_true", help="list every tensor")

    d = sub.add_parser("demo", help="convert the embedded demo model to GGUF Q5_K_M and check it in llama.cpp",
                       description="Offline end-to-end check: build the small trained demo model, convert it to "
                                   "GGUF Q5_K_M, run it in llama.cpp, compare with the float reference.")
    d.add_argument("--out-dir", type=Path, default=Path("out"), help="where the demo GGUF goes (default: out/)")
    for module in _command_modules():
        module.add_parsers(sub, _add_model_args)
    return parser


# Subcommands that live in their own module: each module has COMMANDS (names), add_parsers(sub, add_model_args)
# and run(args) -> exit code. Importing them must stay cheap (no torch at import time).
COMMAND_MODULES = ("qconvert.commands.int4", "qconvert.commands.onnx", "qconvert.commands.verify",
                   "qconvert.commands.release", "qconvert.commands.convert_format", "qconvert.commands.w8a8")


def _command_modules() -> list[Any]:
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C, so every ``finally`` removes its partial output."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # only the main thread may set handlers; a caller's own handler (or SIG_IGN) is left alone
    handle = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if handle:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _dispatch(args)
    except QConvertError as e:
        print(f"qconvert: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("qconvert: terminated (SIGTERM); no partial output was kept.", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("qconvert: interrupted; no partial output was kept.", file=sys.stderr)
        return 130
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _dispatch(args: argparse.Namespace) -> int:
    check_output_options(args)  # an unwritable --json/--report/--save-stats/...: before any model work
    if args.command == "gguf":
        from qconvert.commands.gguf import run_gguf
        return run_gguf(args)
    if args.command == "demo":
        from qconvert.commands.demo import run_demo
        return run_demo(args)
    for module in _command_modules():
        if args.command in module.COMMANDS:
            return int(module.run(args))
    if args.command == "info":
        from qconvert.commands.info import run_info
        return run_info(args)
    raise AssertionError(f"unhandled command {args.command}")

