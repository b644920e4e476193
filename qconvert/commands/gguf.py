"""``qconvert gguf``: resolve the model, plan, convert, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qconvert.constants import GGMLType
from qconvert.errors import QConvertError, UsageError
from qconvert.family import hub_id, seed_config, tensor_shapes
from qconvert.gguf.export import PlanOptions, build_plan, export_gguf
from qconvert.gguf.plan import parse_tensor_type_option, parse_type
from qconvert.io.atomic import check_writable_target
from qconvert.resolve import resolve_model

# Qwen's published GGUFs carry ~6 MB of tokenizer metadata (151k tokens + 151k merges); used for dry-run sizes
# when the tokenizer is not at hand.
QWEN_TOKENIZER_METADATA_BYTES = 6_000_000


def output_name(model: str, preset: str) -> str:
    """``Qwen/Qwen2.5-1.5B-Instruct`` + Q5_K_M -> ``qwen2.5-1.5b-instruct-q5_k_m.gguf`` (Qwen's own naming)."""
    return f"{model.rstrip('/').split('/')[-1].lower()}-{preset.lower()}.gguf"


def model_ref(args: argparse.Namespace) -> str:
    """The checkpoint the user named: --model as given, or the Qwen hub id of --size/--variant."""
    if args.model and args.size:
        raise QConvertError("give either --size or --model, not both")
    if args.model:
        return args.model
    if args.size:
        return hub_id(args.size, args.variant)
    raise QConvertError("say which model to convert: --size 1.5b (a Qwen2.5 size) or --model PATH_OR_REPO_ID")


def _options(args: argparse.Namespace) -> PlanOptions:
    def opt_type(value: str | None) -> GGMLType | None:
        return None if value is None else parse_type(value)

    return PlanOptions(pure=args.pure, output_tensor_type=opt_type(args.output_tensor_type),
                       token_embedding_type=opt_type(args.token_embedding_type),
                       tensor_types=tuple(parse_tensor_type_option(o) for o in args.tensor_type))


def _dry_run_from_seed(args: argparse.Namespace, preset: str) -> int:
    """Plan from the published shapes alone (no weights): what --dry-run --size prints before any download."""
    config = seed_config(args.size)
    plan = build_plan(config, preset, _options(args), tensor_shapes(config))
    print(plan.format_table())
    total = plan.tensor_bytes() + QWEN_TOKENIZER_METADATA_BYTES
    print(f"predicted file size: {total / 1e9:.3f} GB ({total:,} bytes incl. ~6 MB tokenizer metadata)")
    for line in plan.warnings():
        print(line, file=sys.stderr)
    return 0


def _importance(args: argparse.Namespace, model_dir: Path, model_name: str) -> dict | None:
    """The importance matrix from --imatrix, --stats or --calib (at most one); --save-stats/--save-imatrix."""
    from qconvert.commands.calibargs import (
        calibration_from_args,
        collect_and_save,
        load_stats,
    )

    given = [f for f, v in (("--imatrix", args.imatrix), ("--stats", args.stats), ("--calib", args.calib)) if v]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each give an importance matrix; use one of them.")
    if args.save_stats is not None and args.calib is None:
        raise UsageError("--save-stats needs --calib SOURCE (statistics are collected on calibration text).")
    if args.save_imatrix is not None and not (args.calib or args.stats):
        raise UsageError("--save-imatrix needs --calib SOURCE or --stats FILE.")
    for target in (args.save_stats, args.save_imatrix):
        if target is not None:
            check_writable_target(target, force=args.force)
    if args.imatrix is not None:
        from qconvert.gguf.imatrix import read_imatrix
        return read_imatrix(args.imatrix)
    if args.stats is not None:
        stats = load_stats(args.stats, model_dir)
    elif args.calib is not None:
        from qconvert.commands.calibargs import settings_from_args
        stats = collect_and_save(args, model_dir, calibration_from_args(args, model_dir, model_name),
                                 settings_from_args(args))
    else:
        return None
    if args.save_imatrix is not None:
        stats.write_imatrix(args.save_imatrix, force=args.force)
        print(f"wrote importance matrix {args.save_imatrix}", file=sys.stderr)
    return stats.imatrix()


def run_gguf(args: argparse.Namespace) -> int:
    from qconvert.cli import resolve_preset

    preset = resolve_preset(args.bits, args.preset)
    ref = model_ref(args)
    if args.dry_run and args.size and not args.model:
        try:
            resolved = resolve_model(ref, allow_download=False)
        except QConvertError:
            return _dry_run_from_seed(args, preset)
    else:
        resolved = resolve_model(ref)
    out = None if args.dry_run else (args.output if args.output else args.out_dir / output_name(resolved.repo_id or resolved.path.name, preset))
    bars: list = []  # the progress bar appears once writing starts, after every check has passed

    def progress(done: int, total: int, name: str) -> None:
        if not bars:
            from tqdm import tqdm
            bars.append(tqdm(total=total, desc=out.name if out else "", unit="tensor", dynamic_ncols=True, file=sys.stderr))
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].update(done - bars[0].n)

    imatrix = None if out is None else _importance(args, resolved.path, resolved.repo_id or resolved.path.name)
    try:
        result = export_gguf(resolved.path, out, preset, options=_options(args), model_name=resolved.repo_id or resolved.path.name,
                             force=args.force, imatrix=imatrix, progress=None if args.quiet else progress)
    finally:
        for bar in bars:
            bar.close()
    for line in result.warnings:
        print(line, file=sys.stderr)
    plan = result.plan
    if out is None:
        print(plan.format_table())
        print(f"predicted tensor data: {plan.tensor_bytes() / 1e9:.3f} GB (+ tokenizer metadata)")
        return 0
    n = sum(e.n_elements for e in plan.entries)
    size = f"{result.bytes_written / 1e9:.3f} GB" if result.bytes_written >= 1e8 else f"{result.bytes_written / 1e6:.2f} MB"
    print(f"wrote {out} ({size}, {8 * plan.tensor_bytes() / n:.2f} bpw, "
          f"{result.seconds:.1f} s)")
    return 0
