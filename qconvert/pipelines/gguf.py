"""The GGUF pipeline around ``export_gguf``: output names, presets, plans from published shapes, importance matrices.

    model (resolve_model) ──> importance_matrix(imatrix file | statistics file | calibration pass) ──> export_gguf
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import UsageError
from qconvert.io.atomic import check_not_inside, check_writable_target

if TYPE_CHECKING:
    from qconvert.calibration.quantize import CalibrationSettings
    from qconvert.calibset import CalibrationSet
    from qconvert.gguf.export import PlanOptions
    from qconvert.gguf.plan import Plan

# Qwen's published GGUFs carry ~6 MB of tokenizer metadata (151k tokens + 151k merges); used for dry-run sizes
# when the tokenizer is not at hand.
QWEN_TOKENIZER_METADATA_BYTES = 6_000_000


def output_name(model: str, preset: str) -> str:
    """``Qwen/Qwen2.5-1.5B-Instruct`` + Q5_K_M -> ``qwen2.5-1.5b-instruct-q5_k_m.gguf`` (Qwen's own naming)."""
    return f"{model.rstrip('/').split('/')[-1].lower()}-{preset.lower()}.gguf"


def resolve_preset(bits: int | None, preset: str | None) -> str:
    """``preset`` wins; otherwise ``bits`` (default 5 -> Q5_K_M)."""
    from qconvert.gguf.plan import get_preset, preset_for_bits

    if preset is not None:
        return get_preset(preset).name
    return preset_for_bits(5 if bits is None else bits).name


@dataclass(frozen=True)
class SeedPlan:
    plan: Plan
    predicted_bytes: int  # tensor data + ~6 MB of tokenizer metadata


def seed_plan(size: str, preset: str, options: PlanOptions) -> SeedPlan:
    """Plan a Qwen2.5 ``size`` from its published shapes alone (no weights, no download)."""
    from qconvert.family import seed_config, tensor_shapes
    from qconvert.gguf.export import build_plan

    config = seed_config(size)
    plan = build_plan(config, preset, options, tensor_shapes(config))
    return SeedPlan(plan, plan.tensor_bytes() + QWEN_TOKENIZER_METADATA_BYTES)


@dataclass
class Importance:
    """An importance matrix (GGUF tensor name -> f32[in], mean of x²) and what was written on the way."""

    imatrix: dict[str, np.ndarray]
    source: str  # the file it was read from, or the calibration description
    saved_stats: Path | None = None
    saved_imatrix: Path | None = None
    stats: Any = None  # the CalibrationStats (Hessians read on demand) when --optimize asked for them


def importance_matrix(model_dir: Path, *, imatrix: Path | None = None, stats: Path | None = None,
                      calib: CalibrationSet | Callable[[], CalibrationSet] | None = None,
                      settings: CalibrationSettings | None = None, save_stats: Path | None = None,
                      save_imatrix: Path | None = None, force: bool = False,
                      progress: Callable[[int, int], None] | None = None, optimize: bool = False,
                      scratch: Path | None = None) -> Importance | None:
    """The K-quants' importance matrix from one of: a llama.cpp ``imatrix`` GGUF, a ``stats`` file saved by an
    earlier pass, or a float pass over ``calib`` (a ``CalibrationSet``, or a function loading it: called only once
    every argument check has passed). ``save_stats`` streams that pass's statistics (with GPTQ Hessians) to a file;
    ``save_imatrix`` writes the matrix as a llama.cpp imatrix GGUF. None when no source is given.
    ``optimize`` (``--optimize``) also keeps the GPTQ Hessians, with the held-out guard's split, for
    ``qconvert.gguf.optimize``: from ``calib`` they stream into ``save_stats`` or, without it, into
    ``scratch/stats.safetensors`` (the caller removes it); a ``stats`` file must hold them.
    """
    given = [f for f, v in (("--imatrix", imatrix), ("--stats", stats), ("--calib", calib)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} each give an importance matrix; use one of them.")
    if optimize and calib is None and stats is None:
        raise UsageError("--optimize and --target-size work from the calibration Hessians: give --calib SOURCE "
                         "(e.g. --calib builtin) or --stats FILE saved by --save-stats"
                         + (" (an imatrix file holds only their diagonals)." if imatrix is not None else "."))
    if optimize and calib is not None and save_stats is None and scratch is None:
        raise ValueError("--optimize from --calib needs save_stats or a scratch directory for the Hessians")
    if save_stats is not None and calib is None:
        raise UsageError("--save-stats needs --calib SOURCE (statistics are collected on calibration text).")
    if save_imatrix is not None and calib is None and stats is None:
        raise UsageError("--save-imatrix needs --calib SOURCE or --stats FILE.")
    for target in (save_stats, save_imatrix):
        if target is not None:
            check_not_inside(target, (model_dir, imatrix, stats))
            check_writable_target(target, force=force)
    if imatrix is not None:
        from qconvert.gguf.imatrix import read_imatrix

        return Importance(read_imatrix(imatrix), str(imatrix))
    if stats is not None:
        from qconvert.calibration.stats import CalibrationStats

        collected = CalibrationStats.load(stats)
        collected.check_model(model_dir)
        source = f"{stats} ({collected.source or 'unknown source'})"
        if optimize and not all(site.has_hessian for site in collected.sites.values()):
            raise UsageError(f"{stats} holds no GPTQ Hessians, which --optimize needs; recollect it with "
                             "`qconvert gguf --calib SOURCE --save-stats FILE --optimize` (or gptq --save-stats).")
    elif calib is not None:
        from qconvert.calibration.quantize import CalibrationSettings
        from qconvert.calibration.stats import collect_stats
        from qconvert.constants import DEFAULT_HOLDOUT

        calib_set = calib() if callable(calib) else calib
        path = save_stats if save_stats is not None or not optimize else Path(scratch or ".") / "stats.safetensors"
        collected = collect_stats(model_dir, calib_set.ids, settings or CalibrationSettings(), progress,
                                  source=calib_set.describe(), path=path, force=force,
                                  hessians=path is not None, holdout=DEFAULT_HOLDOUT if optimize else None)
        source = calib_set.describe()
    else:
        return None
    if save_imatrix is not None:
        collected.write_imatrix(save_imatrix, force=force)
    return Importance(collected.imatrix(), source, save_stats, save_imatrix, collected if optimize else None)


BUDGET_KEY = "qconvert.budget"  # the size budget's record in the GGUF (llama.cpp ignores unknown keys)


@dataclass
class BudgetPlan:
    options: PlanOptions  # the caller's options with the budget's exact per-tensor types in front
    choice: Any  # qconvert.gguf.budget.BudgetChoice
    metadata: list[Any]  # the KV recording it
    budget: int  # the file size asked for, in bytes
    check: Any = None  # qconvert.gguf.budget_check.BudgetCheck: the two mixtures on held-out windows, when run


def budget_plan(model_dir: Path, preset: str, options: PlanOptions, stats: Any, imatrix: dict[str, np.ndarray],
                size_gb: float | None = None, *, bpw: float | None = None, model_name: str | None = None,
                more_metadata: Sequence[Any] = (), progress: Callable[[int, int, str], None] | None = None,
                settings: Any = None, check: bool = True) -> BudgetPlan:
    """Each decoder matrix's type for a file of at most ``size_gb`` GB (10^9 bytes), or of at most ``bpw`` bits per
    weight of tensor data (what ``qconvert gguf`` prints; the header comes on top), from the preset's plan and the
    Hessians of ``stats`` (``qconvert.gguf.budget``). ``more_metadata``: the other ``qconvert.*`` keys the file
    will carry (``--optimize``'s), counted in its header. When the preset's own mixture is the choice, the file is
    that preset's and carries no budget record (so a budget equal to the preset's file size gives the preset).

    With a held-out split in ``stats`` the types are chosen on the other windows' Hessians, and (``check``) where
    the preset's own file also fits, both mixtures then run on the held-out windows (``check_budget``, on
    ``settings``' device): the budget's is kept only if it is closer to the float model there."""
    from dataclasses import replace

    from qconvert.gguf.budget import choose, measure_all
    from qconvert.gguf.export import prepare
    from qconvert.gguf.metadata import KV, V

    if (size_gb is None) == (bpw is None):
        raise UsageError("give one budget: --target-size GB or --target-bpw BITS, not both.")
    if size_gb is not None and not size_gb > 0:
        raise UsageError(f"--target-size {size_gb} must be a positive number of GB (10^9 bytes).")
    if bpw is not None and not 0 < bpw <= 32:
        raise UsageError(f"--target-bpw {bpw} must be a number of bits per weight above 0 (e.g. 4.5; F32 is 32).")
    prep = prepare(model_dir, preset, options, model_name=model_name, imatrix=imatrix)
    what = f"{size_gb} GB" if size_gb is not None else f"{bpw} bits per weight"
    held_out = stats.heldout_ids if check else None
    record = KV(BUDGET_KEY, V.STRING, f"types chosen for a file of at most {what} from {preset}'s mixture by "
                                      f"the output error on {stats.source or 'calibration tokens'}"
                                      + (f", checked against {preset} on held-out windows" if held_out is not None
                                         else ""))
    header = prep.header_bytes(prep.metadata(model_dir, preset, [*more_metadata, record]))
    if size_gb is not None:
        budget = int(size_gb * 1e9)
    else:
        assert bpw is not None
        budget = header + int(bpw * sum(e.n_elements for e in prep.plan.entries) / 8)
    bare = prep.header_bytes(prep.metadata(model_dir, preset, list(more_metadata)))

    last: dict[str, Any] = {}  # q/k/v and gate/up share one input site: read it once, hold one at a time

    def hessian(name: str) -> Any:
        module = prep.mapped[name].removesuffix(".weight")
        if module not in stats.linears:
            return None
        key = stats.linears[module]
        if key not in last:
            last.clear()
            site = stats.site(module)
            if site.n_heldout and held_out is not None:  # choose on the windows the check does not use
                from qconvert.int4.guard import fit_hessian

                last[key] = fit_hessian(site.hessian, site.n_tokens, site.heldout_hessian, site.n_heldout)
            else:
                last[key] = site.hessian
        return last[key]

    entries = [(e.name, tuple(e.shape), e.type) for e in prep.plan.entries]
    matrices, fixed = measure_all(entries, lambda g: prep.ckpt.read_f32(prep.mapped[g]), hessian, imatrix, header,
                                  progress)
    preset_fixed = fixed - header + bare
    if held_out is not None:
        from qconvert.calibration.driver import CalibrationSettings
        from qconvert.gguf.budget_check import choose_checked

        hf = {m.name: prep.mapped[m.name] for m in matrices}
        checked = choose_checked(model_dir, preset, matrices, fixed, budget, preset_fixed, hf,
                                 {hf[g]: v for g, v in imatrix.items() if g in hf}, held_out,
                                 settings or CalibrationSettings())
        choice, verdict = checked.choice, checked.check
    else:
        choice, verdict = choose(matrices, fixed, budget, preset_fixed), None
    if choice.kept_preset:
        return BudgetPlan(options, choice, [], budget, verdict)
    return BudgetPlan(replace(options, tensor_types=choice.overrides() + tuple(options.tensor_types)), choice,
                      [record], budget, verdict)
