"""``qconvert onnx``: export a checkpoint to an onnxruntime / onnxruntime-genai directory (fp32, fp16, int4, int8).

Every refusal (precision/algorithm combination, block size, --from checkpoint scheme, existing output) happens in
``export_onnx`` before anything is created; the directory is built in a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

COMMANDS = ("onnx",)
# MatMulNBits accuracy levels, table bits and block sizes, as qconvert.onnx_export.matmulnbits spells them (spelled
# here because building the parser must not import onnx; a test checks that they agree)
ACCURACY_CHOICES = (0, 1, 2, 4)
DEFAULT_ACCURACY_LEVEL = 4
TABLE_BITS = (4, 8)
DEFAULT_TABLE_BITS = 4
TABLE_BLOCK_SIZES = (16, 32, 64, 128)
DEFAULT_TABLE_BLOCK_SIZE = 16
QUANTIZED = ("int4", "int8")
ATTENTION_CHOICES = ("gqa", "plain")  # qconvert.onnx_export.graph.ATTENTIONS
DEFAULT_ATTENTION = "gqa"

EPILOG = """\
examples:
  qconvert onnx --size 0.5b --precision int4                 # -> qwen2.5-0.5b-instruct-onnx-int4/ (RTN, block 128)
  qconvert onnx --size 0.5b --precision fp16 --out-dir out/
  qconvert onnx --size 1.5b --precision int4 --algo gptq --calib builtin --device cuda
  qconvert onnx --precision int4 --from qwen2.5-7b-instruct-awq/    # an existing GPTQ/AWQ checkpoint, no requantization
  qconvert onnx --size 0.5b --precision int4 --accuracy-level 0 --keep-embedding-float   # the exact, larger int4
  qconvert onnx --size 0.5b --precision int8 --table-bits 8          # -> ...-onnx-int8/ (8-bit linears and tables)
  qconvert onnx --size 0.5b --precision int4 --attention plain       # attention as explicit ops, no fused kernel
  qconvert onnx --size 0.5b --precision int4 --mixed-precision       # 8-bit v_proj/down_proj where Q4_K_M uses Q6_K

The graph is built directly with onnx.helper (no tracing): inputs input_ids, attention_mask and
past_key_values.N.key/value; outputs logits and present.N.key/value; heads, RoPE and RMSNorm from config.json; a tied
embedding is one initializer. Attention is onnxruntime's fused com.microsoft.GroupQueryAttention (rotary inside;
onnxruntime-genai gives it one past/present buffer of the whole generation) unless --attention plain writes it as
explicit ops (MatMul, Softmax, rotary from an extra position_ids input; the cache grows by concatenation). int4 / int8 linears are 4- / 8-bit com.microsoft.MatMulNBits with block size = group
size (symmetric weights omit zero points); the embedding becomes com.microsoft.GatherBlockQuantized and the lm_head
MatMulNBits (symmetric round-to-nearest, --table-bits 4 or 8 in blocks of --table-block-size, default 4-bit blocks
of 16; when tied, both read one set of initializers), unless --keep-embedding-float keeps them float32 (on a 1.5B
model they are ~1.9 GB of float32). MatMulNBits runs at --accuracy-level 4 by default (activations quantized to
int8 per block, as onnxruntime-genai's builder does on CPU); 0 computes in float32 with exactly the dequantized
weights. fp16 stores weights and the KV cache in fp16 (GroupQueryAttention then runs in fp16, the plain graph's
softmax in float32) and keeps norms and the residual stream in float32. Weights over 256 MiB are streamed to model.onnx.data (external data).
The output holds genai_config.json and the tokenizer, so onnxruntime-genai loads it as is.
"""


def add_parsers(sub: Any, add_model_args: Any) -> None:
    """Register ``onnx`` on the CLI's subparsers."""
    from qconvert.commands.argtypes import add_directory_output, positive_int
    from qconvert.commands.calibargs import add_calibration_args

    p = sub.add_parser("onnx", help="export to ONNX (fp32, fp16, int4/int8 MatMulNBits) for onnxruntime and onnxruntime-genai",
                       description="Export a Qwen2.5 checkpoint to an ONNX decoder with a KV cache, plus "
                                   "genai_config.json and the tokenizer.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    q = p.add_argument_group("precision")
    q.add_argument("--precision", choices=("fp32", "fp16", *QUANTIZED), required=True,
                   help="weight precision (int4 / int8: 4- / 8-bit MatMulNBits decoder linears)")
    pick = q.add_mutually_exclusive_group()
    pick.add_argument("--algo", choices=("rtn", "gptq", "awq"),
                      help="int4/int8 only: rtn (default, no data), gptq or awq (int4 only) (calibrated, see --calib)")
    pick.add_argument("--from", dest="from_dir", type=Path, metavar="DIR",
                      help="int4/int8 only: convert this GPTQ/AWQ checkpoint (qconvert gptq/awq output; 4-bit for "
                           "int4, 8-bit GPTQ for int8) without requantizing")
    q.add_argument("--block-size", type=positive_int(128, "int4 blocks are 32, 64 or 128"), choices=(32, 64, 128),
                   help="int4/int8 linears' block (= group) size; default 128, or the --from checkpoint's group size")
    q.add_argument("--accuracy-level", type=int, choices=ACCURACY_CHOICES, metavar="{0,1,2,4}",
                   help="int4/int8 only: MatMulNBits accuracy_level, the lowest precision the kernel may compute the "
                        f"activations in: 0 unset (float32 on exactly the dequantized weights), 1 fp32, 2 fp16, 4 int8 "
                        f"(default {DEFAULT_ACCURACY_LEVEL}, faster on CPU)")
    q.add_argument("--mixed-precision", action="store_true",
                   help="int4 RTN only: write v_proj and down_proj of the first and last eighth of the layers and every "
                        "third in between at 8 bits (llama.cpp's Q4_K_M rule for attn_v / ffn_down): larger, closer")
    q.add_argument("--keep-embedding-float", action="store_true",
                   help="int4/int8 only: keep the embedding and lm_head float32 instead of GatherBlockQuantized / "
                        "MatMulNBits (larger, closer to the float model)")
    q.add_argument("--table-bits", type=int, choices=TABLE_BITS, metavar="{4,8}",
                   help=f"int4/int8 only: bits of the quantized embedding / lm_head (default {DEFAULT_TABLE_BITS})")
    q.add_argument("--table-block-size", type=int, choices=TABLE_BLOCK_SIZES, metavar="{16,32,64,128}",
                   help="int4/int8 only: block size of the quantized embedding / lm_head along the hidden axis "
                        f"(default {DEFAULT_TABLE_BLOCK_SIZE}; smaller blocks: more float32 scales, closer values)")
    g = p.add_argument_group("graph")
    g.add_argument("--attention", choices=ATTENTION_CHOICES, default=DEFAULT_ATTENTION,
                   help="gqa (default): onnxruntime's fused GroupQueryAttention, rotary inside, shared past/present "
                        "buffer in onnxruntime-genai; plain: explicit MatMul/Softmax ops and a position_ids input (for "
                        "runtimes without onnxruntime's contrib ops)")
    add_calibration_args(p, default_calib="builtin", stats_help="not accepted: run `qconvert gptq --stats`, then "
                         "`qconvert onnx --from` its output")
    o = p.add_argument_group("output")
    add_directory_output(o, no_eval=False)


def run(args: argparse.Namespace) -> int:
    from qconvert.commands.calibargs import (
        calibration_from_args,
        layer_progress,
        settings_from_args,
    )
    from qconvert.commands.gguf import model_ref
    from qconvert.errors import UsageError
    from qconvert.onnx_export import export_onnx
    from qconvert.resolve import resolve_model

    if args.stats is not None or args.save_stats is not None:
        raise UsageError("qconvert onnx does not take --stats/--save-stats; quantize with `qconvert gptq --stats FILE` "
                         "and export its output with `qconvert onnx --precision int4 --from DIR`.")
    quantized_only = {"--algo": args.algo, "--from": args.from_dir, "--block-size": args.block_size,
                      "--accuracy-level": args.accuracy_level is not None, "--keep-embedding-float": args.keep_embedding_float,
                      "--table-bits": args.table_bits, "--table-block-size": args.table_block_size,
                      "--mixed-precision": args.mixed_precision}
    given = [flag for flag, value in quantized_only.items() if value]
    if args.precision not in QUANTIZED and given:
        raise UsageError(f"{given[0]} applies to --precision int4 / int8 only; drop it for a {args.precision} export.")
    if args.keep_embedding_float and (args.table_bits or args.table_block_size):
        raise UsageError("--table-bits / --table-block-size set how the embedding / lm_head are quantized; "
                         "--keep-embedding-float keeps them float32. Drop one or the other.")
    if args.from_dir is not None and not (args.model or args.size):
        model_dir, model_name = Path(args.from_dir), Path(args.from_dir).resolve().name
    else:
        resolved = resolve_model(model_ref(args))
        model_dir, model_name = resolved.path, resolved.repo_id or resolved.path.name
    algo = args.algo or "rtn"
    calibrated = args.precision in QUANTIZED and args.from_dir is None and algo != "rtn"
    settings = settings_from_args(args) if calibrated else None
    out_name = None
    if calibrated:  # refuse an existing output before the (slow) calibration data is tokenized
        from qconvert.io.atomic import check_writable_target
        from qconvert.onnx_export import output_dir_name

        out_name = args.out_dir / output_dir_name(model_name, args.precision)
        check_writable_target(out_name, force=args.force)
    calib = calibration_from_args(args, model_dir, model_name) if calibrated else None
    progress, bars = layer_progress(f"onnx {args.precision}", args.quiet)
    start = time.perf_counter()
    try:
        out = export_onnx(model_dir, args.out_dir, precision=args.precision, algo=algo, from_dir=args.from_dir,
                          block_size=args.block_size, calib=calib, settings=settings, model_name=model_name, force=args.force,
                          progress=progress, quantize_embedding=not args.keep_embedding_float,
                          accuracy_level=DEFAULT_ACCURACY_LEVEL if args.accuracy_level is None else args.accuracy_level,
                          table_bits=args.table_bits or DEFAULT_TABLE_BITS,
                          table_block_size=args.table_block_size or DEFAULT_TABLE_BLOCK_SIZE, attention=args.attention,
                          mixed_precision=args.mixed_precision)
    finally:
        for bar in bars:
            bar.close()
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    card = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
    print(f"wrote {out} ({size / 1e6:.1f} MB of model files, {card} layers, {time.perf_counter() - start:.1f} s)",
          file=sys.stdout)
    return 0
