"""``qconvert gguf``: parse the options, call the GGUF pipeline (``qconvert.pipelines.gguf``), print the result."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from qconvert.commands.argtypes import output_file
from qconvert.constants import GGMLType
from qconvert.errors import QConvertError
from qconvert.family import hub_id
from qconvert.gguf.export import PlanOptions, export_gguf
from qconvert.gguf.plan import parse_tensor_type_option, parse_type
from qconvert.io.atomic import check_not_inside, check_writable_target, claim_output
from qconvert.pipelines.gguf import Importance, importance_matrix, output_name, resolve_preset, seed_plan
from qconvert.resolve import resolve_model


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
    seed = seed_plan(args.size, preset, _options(args))
    print(seed.plan.format_table())
    total = seed.predicted_bytes
    print(f"predicted file size: {total / 1e9:.3f} GB ({total:,} bytes incl. ~6 MB tokenizer metadata)")
    for line in seed.plan.warnings():
        print(line, file=sys.stderr)
    return 0


def _importance(args: argparse.Namespace, model_dir: Path, model_name: str, scratch: Path | None = None
                ) -> Importance | None:
    """The importance matrix from --imatrix, --stats or --calib (at most one); --save-stats/--save-imatrix;
    with --optimize also the Hessians (streamed into ``scratch`` unless --save-stats names a file)."""
    from qconvert.commands.calibargs import calibration_from_args, layer_progress, settings_from_args

    calibrated = args.calib is not None
    progress, bars = layer_progress("statistics", args.quiet)
    try:
        found = importance_matrix(
            model_dir, imatrix=args.imatrix, stats=args.stats,
            calib=(lambda: calibration_from_args(args, model_dir, model_name)) if calibrated else None,
            settings=settings_from_args(args) if calibrated else None, save_stats=args.save_stats,
            save_imatrix=args.save_imatrix, force=args.force, progress=progress,
            optimize=args.optimize or _budgeted(args),
            scratch=scratch)
    finally:
        for bar in bars:
            bar.close()
    if found is None:
        return None
    if args.stats is not None:
        print(f"statistics: {found.source}", file=sys.stderr)
    if found.saved_stats is not None:
        print(f"saved calibration statistics to {found.saved_stats}", file=sys.stderr)
    if found.saved_imatrix is not None:
        print(f"wrote importance matrix {found.saved_imatrix}", file=sys.stderr)
    return found


def _budgeted(args: argparse.Namespace) -> bool:
    return args.target_size is not None or args.target_bpw is not None


def _budget(args: argparse.Namespace, model_dir: Path, model_name: str, preset: str, options: PlanOptions,
            found: Importance | None, optimize_note: str | None) -> tuple[PlanOptions, list]:
    """--target-size / --target-bpw: the per-tensor types for the budget (printed), as plan options and a metadata
    record."""
    from qconvert.pipelines.gguf import budget_plan

    flag = "--target-size" if args.target_size is not None else "--target-bpw"
    if found is None or found.stats is None:
        raise QConvertError(f"{flag} measures each matrix's error on the calibration Hessians: give --calib "
                            "SOURCE or --stats FILE (saved by --save-stats).")
    from qconvert.gguf.export import OPTIMIZE_KEY
    from qconvert.gguf.metadata import KV, V

    more = [] if optimize_note is None else [KV(OPTIMIZE_KEY, V.STRING, optimize_note)]
    bp = budget_plan(model_dir, preset, options, found.stats, found.imatrix, args.target_size, bpw=args.target_bpw,
                     model_name=model_name, more_metadata=more)
    c = bp.choice
    counts: dict[str, int] = {}
    for t in c.types.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    how = (f"{preset}'s own mixture: the budget's was not closer to the float model on held-out windows"
           if c.kept_preset and bp.check is not None else
           f"{preset}'s own mixture fits and is not worse" if c.kept_preset else
           f"output error {c.cost / c.preset_cost:.3f}x {preset}'s" if c.preset_bytes <= bp.budget
           else f"{preset} itself ({c.preset_bytes / 1e9:.3f} GB) does not fit")
    asked = f"{args.target_size} GB" if args.target_size is not None else f"{args.target_bpw} bpw"
    print(f"{flag} {asked}: predicted file {c.total_bytes / 1e9:.4f} GB; decoder matrices "
          f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}; {how}", file=sys.stderr)
    if bp.check is not None:
        print(f"{flag}: {bp.check.summary()}", file=sys.stderr)
    elif not c.kept_preset and c.preset_bytes <= bp.budget:
        print(f"{flag}: the statistics hold no held-out windows, so the budget's mixture was not checked against "
              f"{preset}'s; recollect them with --calib SOURCE --save-stats FILE --optimize to check it.",
              file=sys.stderr)
    return bp.options, bp.metadata


def run_gguf(args: argparse.Namespace) -> int:
    preset = resolve_preset(args.bits, args.preset)
    ref = model_ref(args)
    if args.dry_run and args.size and not args.model:
        try:
            resolved = resolve_model(ref, allow_download=False)
        except QConvertError:
            return _dry_run_from_seed(args, preset)
    else:
        resolved = resolve_model(ref)
    out = None if args.dry_run else output_file(args.output, args.out_dir, output_name(resolved.repo_id or resolved.path.name, preset))
    bars: list = []  # the progress bar appears once writing starts, after every check has passed

    def progress(done: int, total: int, name: str) -> None:
        if not bars:
            from tqdm import tqdm
            bars.append(tqdm(total=total, desc=out.name if out else "", unit="tensor", dynamic_ncols=True, file=sys.stderr))
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].update(done - bars[0].n)

    if out is not None:
        check_writable_target(out, force=args.force)  # existing file, unwritable directory: before anything else
    claim = contextlib.nullcontext() if out is None else claim_output(out)  # before the calibration pass, not after
    with claim:
        if out is not None:
            check_not_inside(out, (resolved.path, args.imatrix, args.stats))
        with contextlib.ExitStack() as stack:
            budget = _budgeted(args)
            scratch = None
            if (args.optimize or budget) and args.calib is not None and args.save_stats is None:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix=".qconvert-stats-", dir=out.parent if out is not None else Path.cwd())))
            found = None if out is None and not budget else \
                _importance(args, resolved.path, resolved.repo_id or resolved.path.name, scratch)
            options, hessians, note = _options(args), None, ""
            extra: list = []
            if args.optimize and found is not None and found.stats is not None:
                from qconvert.gguf.optimize import optimize_note, stats_hessians

                hessians, note = stats_hessians(found.stats), optimize_note(found.source)
            if budget:
                options, extra = _budget(args, resolved.path, resolved.repo_id or resolved.path.name, preset, options,
                                         found, note if hessians is not None else None)
            try:
                result = export_gguf(resolved.path, out, preset, options=options,
                                     model_name=resolved.repo_id or resolved.path.name, force=args.force,
                                     imatrix=None if found is None else found.imatrix,
                                     progress=None if args.quiet else progress, hessians=hessians, optimize_note=note,
                                     extra_metadata=extra)
            finally:
                for bar in bars:
                    bar.close()
    for line in result.warnings:
        if _budgeted(args) and "applying manual override" in line:
            continue  # the budget's per-tensor types: summarised above, not one line per tensor
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
    if result.optimized:
        kept = ", ".join(f"{k} {v}" for k, v in sorted(result.optimized.items()))
        print(f"--optimize: tensors kept per encoding (judged on held-out calibration windows): {kept}")
    elif args.optimize:
        print(f"qconvert: note: --optimize changed nothing: no decoder matrix of {preset} is quantized (float "
              "types keep their values).", file=sys.stderr)
    return 0
