"""The GPTQ/AWQ pipeline: calibrate layer by layer (or quantize from saved statistics), write, describe.

    model + CalibrationSet | CalibrationStats ──> calibrate / quantize_from_stats ──> QuantizedCheckpointWriter
                                                                                  └─> README.md (qconvert.card)

Every check that can fail (scheme vs model shapes, existing output) runs before the first forward and before
anything is created under the output name; the writer builds the checkpoint in a temporary directory and
renames it when complete.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qconvert.card import QUALITY_SECTION, int4_card

if TYPE_CHECKING:  # torch is imported only when a pipeline runs
    from qconvert.calibration.quantize import CalibrationReport, CalibrationSettings
    from qconvert.calibration.stats import CalibrationStats
    from qconvert.calibset import CalibrationSet
    from qconvert.int4 import AWQConfig, GPTQConfig

__all__ = ["QUALITY_SECTION", "awq_search_summary", "marlin_warnings", "output_dir_name", "write_int4"]


def output_dir_name(model: str, method: str, bits: int) -> str:
    """``Qwen/Qwen2.5-7B-Instruct`` -> ``qwen2.5-7b-instruct-gptq-int4`` / ``qwen2.5-7b-instruct-awq`` (Qwen's names)."""
    base = model.rstrip("/").split("/")[-1].lower()
    return f"{base}-gptq-int{bits}" if method == "gptq" else f"{base}-awq"


def marlin_warnings(cfg: GPTQConfig | AWQConfig) -> list[str]:
    """Settings vLLM's Marlin kernels refuse or reorder at load time (an empty list for the default scheme)."""
    from qconvert.int4 import GPTQConfig

    out = []
    if isinstance(cfg, GPTQConfig) and not cfg.sym:
        out.append("--asym: vLLM's Marlin GPTQ kernels accept only symmetric checkpoints; vLLM will fall back to "
                   "slower kernels or refuse. Drop --asym for the widely loadable format.")
    if isinstance(cfg, GPTQConfig) and cfg.desc_act:
        out.append("--act-order writes permuted group indices (desc_act true); Marlin and ExLlama reorder at load "
                   "time or refuse. --static-groups keeps most of act-order's gain without it.")
    return out


def awq_search_summary(cfg: AWQConfig) -> str:
    """One line for the model card: how AWQ's scale and clip searches ran."""
    clipped = "every linear" if cfg.clip_all else "all linears but q_proj/k_proj (AutoAWQ)"
    samples = cfg.search_samples or "all"
    return (f"scales: grid of {cfg.n_grid}{' + s = 1' if cfg.keep_identity else ''} on {samples} samples; "
            f"clipping: grid of {cfg.clip_grid} up to {cfg.max_shrink:.0%} shrink on {clipped}")


def write_int4(model_dir: Path, model_name: str, out: Path, method: str, cfg: GPTQConfig | AWQConfig,
               calib: CalibrationSet | None, settings: CalibrationSettings, *, force: bool = False,
               progress: Callable[[int, int], None] | None = None,
               stats: CalibrationStats | None = None, evaluate: bool = True,
               pad_intermediate: bool = False) -> CalibrationReport:
    """Calibrate and write the GPTQ/AWQ checkpoint ``out`` (atomic: built in a temporary directory, renamed at the end).

    ``method`` is ``gptq`` or ``awq``; warnings about vLLM tensor-parallel shapes are printed to stderr. With
    ``stats`` (GPTQ only) every linear is quantized from the stored float-model Hessians and no forward runs.
    With ``evaluate`` the model card gets the measured quality on held-out text (``qconvert.quality``).
    ``pad_intermediate`` zero-pads the MLPs to the size vLLM tensor parallelism needs (config.json follows).
    """
    from qconvert.calibration.quantize import CalibrationError, CalibrationReport, calibrate
    from qconvert.calibration.stats import quantize_from_stats
    from qconvert.int4 import AWQConfig, GPTQConfig, QuantizedCheckpointWriter
    from qconvert.int4.formats import awq_quantization_config, gptq_quantization_config
    from qconvert.int4.writer import padded_intermediate_size

    qcfg = gptq_quantization_config(cfg) if isinstance(cfg, GPTQConfig) else awq_quantization_config(cfg)
    pad_to, updates = None, None
    if pad_intermediate:
        if stats is not None:
            raise CalibrationError("--pad-intermediate cannot use saved statistics (their shapes are unpadded); "
                                   "drop --stats.")
        from qconvert.registry import read_model_config

        size = int(read_model_config(Path(model_dir))["intermediate_size"])
        pad_to = padded_intermediate_size(size, cfg.group_size)
        updates = {"intermediate_size": pad_to}
        print(f"padding intermediate_size {size} -> {pad_to} (zeros; outputs unchanged)", file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = QuantizedCheckpointWriter(model_dir, out, qcfg, force=force, config_updates=updates)
    for w in caught:
        print(f"qconvert: warning: {w.message}", file=sys.stderr)
    with writer:
        if stats is None:
            if calib is None:
                raise ValueError("write_int4 needs a calibration set or statistics")
            report = calibrate(model_dir, calib.ids, method, cfg, writer.add_linear, writer.add_float, settings,
                               progress, pad_to)
        else:
            start = time.perf_counter()
            quantize_from_stats(model_dir, stats, cfg, writer.add_linear, settings, progress)
            n = int(stats.meta.get("n_samples", 0)), int(stats.meta.get("seq_len", 0))
            report = CalibrationReport(n[0], n[1], n[0] * n[1], time.perf_counter() - start, settings.device,
                                       str(settings.dtype).removeprefix("torch."))
        desc = calib.describe() if calib is not None else f"{stats.source} (saved statistics)" if stats else ""
        card = int4_card(out.name, model_name, method, qcfg, desc, n_tokens=report.n_tokens, seconds=report.seconds,
                         device=report.device, dtype=report.dtype, from_stats=stats is not None,
                         search=awq_search_summary(cfg) if isinstance(cfg, AWQConfig) else "")
        (writer.tmp / "README.md").write_text(card)
        writer.finish()
    if evaluate:
        from qconvert.quality import describe, measure

        quality = describe(measure(model_dir, out, device=settings.device))
        print(f"quality: {quality}", file=sys.stderr)
        tmp = out / ".README.md.partial"
        tmp.write_text(card + QUALITY_SECTION.format(quality=quality))
        os.replace(tmp, out / "README.md")
    return report
