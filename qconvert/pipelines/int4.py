"""The GPTQ/AWQ pipeline: calibrate layer by layer (or quantize from saved statistics), write, describe.

    model + CalibrationSet | CalibrationStats ──> calibrate / quantize_from_stats ──> QuantizedCheckpointWriter
                                                                                  └─> README.md (qconvert.card)

Every check that can fail (scheme vs model shapes, existing output) runs before the first forward and before
anything is created under the output name; the writer builds the checkpoint in a temporary directory and
renames it when complete.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from qconvert.card import QUALITY_SECTION, compressed_card, int4_card
from qconvert.constants import DEFAULT_HOLDOUT

if TYPE_CHECKING:  # torch is imported only when a pipeline runs
    from qconvert.calibration.quantize import CalibrationReport, CalibrationSettings
    from qconvert.calibration.stats import CalibrationStats
    from qconvert.calibset import CalibrationSet
    from qconvert.int4 import AWQConfig, GPTQConfig

__all__ = ["LAYOUT_SUFFIX", "QUALITY_SECTION", "W8A8_WEIGHTS", "awq_search_summary", "int4_quantization_config",
           "marlin_warnings", "output_dir_name", "w8a8_output_name", "write_int4", "write_w8a8"]

# --format -> suffix of the output directory name (the native GPTQ/AWQ layouts keep Qwen's names)
LAYOUT_SUFFIX = MappingProxyType({"gptq": "", "awq": "", "compressed-tensors": "-ct"})


def output_dir_name(model: str, method: str, bits: int, layout: str | None = None) -> str:
    """``Qwen/Qwen2.5-7B-Instruct`` -> ``qwen2.5-7b-instruct-gptq-int4`` / ``qwen2.5-7b-instruct-awq`` (Qwen's names);
    with ``layout="compressed-tensors"``: ``...-gptq-int4-ct`` / ``...-awq-ct``."""
    base = model.rstrip("/").split("/")[-1].lower()
    name = f"{base}-gptq-int{bits}" if method == "gptq" else f"{base}-awq"
    return name + LAYOUT_SUFFIX[layout or method]


def int4_quantization_config(cfg: GPTQConfig | AWQConfig, layout: str | None = None) -> dict[str, Any]:
    """The ``quantization_config`` of a GPTQ/AWQ result written in ``layout`` (default: the method's own layout).

    Refuses, before any calibration, a scheme the layout cannot hold (``QuantTypeError`` says what to use instead).
    """
    from qconvert.errors import QuantTypeError
    from qconvert.int4 import GPTQConfig
    from qconvert.int4.formats import (
        CT_METHOD,
        awq_quantization_config,
        compressed_quantization_config,
        gptq_quantization_config,
    )

    native = gptq_quantization_config(cfg) if isinstance(cfg, GPTQConfig) else awq_quantization_config(cfg)
    if layout in (None, native["quant_method"]):
        return native
    if layout != CT_METHOD:
        raise QuantTypeError(f"--format {layout} is not a layout of {native['quant_method']} results; use "
                             f"{native['quant_method']} or {CT_METHOD}.")
    if isinstance(cfg, GPTQConfig) and cfg.desc_act and not cfg.static_groups:
        raise QuantTypeError("--act-order writes permuted group indices (g_idx), which compressed-tensors 0.20 "
                             "cannot store (actorder 'group' was removed). Use --static-groups or --group-aware "
                             "with --format compressed-tensors, or keep --format gptq for --act-order.")
    sym = cfg.sym if isinstance(cfg, GPTQConfig) else not cfg.zero_point
    source = {k: v for k, v in native.items() if k != "quant_method"}
    return compressed_quantization_config(cfg.bits, cfg.group_size, sym,
                                          {"method": native["quant_method"], "settings": source})


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


def card_settings(qcfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings table of a model card: the ``quantization_config`` itself for GPTQ/AWQ; for compressed-tensors
    its scheme plus the GPTQ/AWQ settings it came from (the card reads ``bits`` at the top level)."""
    from qconvert.int4.formats import CT_METHOD, layout_scheme

    if qcfg.get("quant_method") != CT_METHOD:
        return dict(qcfg)
    _, scheme = layout_scheme(qcfg)
    layout_keys = ("meta", "format", "checkpoint_format", "pack_dtype", "version")  # the source layout's, not this
    source = {k: v for k, v in qcfg.get("qconvert", {}).get("settings", {}).items() if k not in layout_keys}
    return {"layout": f"{CT_METHOD} {qcfg.get('format')}", **source, "bits": scheme.bits, "group_size": scheme.group_size,
            "sym": scheme.sym}


def compressed_card_values(qcfg: Mapping[str, Any]) -> tuple[str, str, str, int]:
    """(format, origin, scheme, bits) of a compressed-tensors ``quantization_config`` for ``card.compressed_card``:
    ``("pack-quantized", "GPTQ", "W4A16", 4)``, ``("int-quantized", "RTN + SmoothQuant α=0.5", "W8A8", 8)``."""
    from qconvert.int4.formats import CT_INT_FORMAT, layout_scheme

    layout, scheme = layout_scheme(qcfg)
    meta = qcfg.get("qconvert", {})
    origin = str(meta.get("method", "quantized")).upper()
    if meta.get("smoothquant_alpha") is not None:
        origin += f" + SmoothQuant α={meta['smoothquant_alpha']}"
    act = 8 if layout.name == CT_INT_FORMAT else 16
    return str(qcfg.get("format")), origin, f"W{scheme.bits}A{act}", scheme.bits


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
               pad_intermediate: bool = False, holdout: float | None = DEFAULT_HOLDOUT,
               layout: str | None = None) -> CalibrationReport:
    """Calibrate and write the GPTQ/AWQ checkpoint ``out`` (atomic: built in a temporary directory, renamed at the end).

    ``method`` is ``gptq`` or ``awq``; warnings about vLLM tensor-parallel shapes are printed to stderr. With
    ``stats`` (GPTQ only) every linear is quantized from the stored float-model Hessians and no forward runs.
    With ``evaluate`` the model card gets the measured quality on held-out text (``qconvert.quality``).
    ``pad_intermediate`` zero-pads the MLPs to the size vLLM tensor parallelism needs (config.json follows).
    ``holdout``: the held-out guard's fraction of calibration windows (``qconvert.int4.guard``); None: off. With
    ``stats`` the split is the one the statistics recorded (``collect_stats(holdout=...)``); None turns it off.
    ``layout``: ``None`` (the method's own: GPTQ v1 / AWQ GEMM) or ``"compressed-tensors"`` (pack-quantized, from the
    same codes, scales and zero points).
    """
    from qconvert.calibration.quantize import CalibrationError, CalibrationReport, calibrate
    from qconvert.calibration.stats import quantize_from_stats
    from qconvert.int4 import AWQConfig, QuantizedCheckpointWriter
    from qconvert.int4.writer import padded_intermediate_size

    qcfg = int4_quantization_config(cfg, layout)
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
                               progress, pad_to, holdout, on_restart=writer.restart)
            for line in report.rank_warnings:
                print(f"qconvert: note: {line}", file=sys.stderr)
        else:
            start = time.perf_counter()
            kept = quantize_from_stats(model_dir, stats, cfg, writer.add_linear, settings, progress,
                                       guard=holdout is not None)
            n = int(stats.meta.get("n_samples", 0)), int(stats.meta.get("seq_len", 0))
            split = stats.holdout_windows if holdout is not None else 0
            if holdout is not None and not split:
                print(f"qconvert: note: {stats.source or 'the statistics file'} has no held-out split, so the guard "
                      "cannot run: every linear keeps GPTQ's result. Recollect the statistics with `qconvert gptq "
                      "--save-stats FILE` (the guard on) to have one.", file=sys.stderr)
            report = CalibrationReport(n[0], n[1], n[0] * n[1], time.perf_counter() - start, settings.device,
                                       str(settings.dtype).removeprefix("torch."), split, kept)
        desc = calib.describe() if calib is not None else f"{stats.source} (saved statistics)" if stats else ""
        search = awq_search_summary(cfg) if isinstance(cfg, AWQConfig) else ""
        guard = report.guard_summary()
        if layout == "compressed-tensors":
            card = compressed_card(out.name, model_name, *compressed_card_values(qcfg), card_settings(qcfg), desc,
                                   n_tokens=report.n_tokens, seconds=report.seconds, device=report.device,
                                   dtype=report.dtype, from_stats=stats is not None, search=search, guard=guard)
        else:
            card = int4_card(out.name, model_name, method, card_settings(qcfg), desc, n_tokens=report.n_tokens,
                             seconds=report.seconds, device=report.device, dtype=report.dtype,
                             from_stats=stats is not None, search=search, guard=guard)
        _publish(writer, card, model_dir, settings.device, evaluate)
    return report


def _publish(writer: Any, card: str, model_dir: Path, device: str, evaluate: bool, note: str = "") -> None:
    """Complete the checkpoint, measure the card's quality on it (``evaluate``; before it is moved into place, so
    a failure leaves nothing behind), write the card, and move the checkpoint into place."""
    writer.complete()
    if evaluate:
        from qconvert.quality import describe, measure

        quality = describe(measure(model_dir, writer.tmp, device=device))
        print(f"quality: {quality}", file=sys.stderr)
        card += QUALITY_SECTION.format(quality=quality) + note
    (writer.tmp / "README.md").write_text(card)
    writer.commit()


# ------------------------------------------------------------------------------------------------------------
# W8A8 INT8 (``qconvert w8a8``): int8 weights per channel (RTN or GPTQ), dynamic per-token int8 activations

W8A8_WEIGHTS = ("rtn", "gptq")  # how the int8 weights are chosen
W8A8_QUALITY_NOTE = ("For W8A8 that forward also quantizes every linear input per token to int8 (max|x| / 127, as "
                     "vLLM's kernels do).\n")


def w8a8_output_name(model: str) -> str:
    """``Qwen/Qwen2.5-7B-Instruct`` -> ``qwen2.5-7b-instruct-w8a8``."""
    return model.rstrip("/").split("/")[-1].lower() + "-w8a8"


def w8a8_quantization_config_for(weights: str, alpha: float | None, damp: float = 0.01) -> dict[str, Any]:
    """The W8A8 ``quantization_config`` (``formats.w8a8_quantization_config``) with how its weights were made under
    the ``qconvert`` key; refuses an unknown weight method."""
    from qconvert.errors import QuantTypeError
    from qconvert.int4.formats import w8a8_quantization_config

    if weights not in W8A8_WEIGHTS:
        raise QuantTypeError(f"W8A8 weights come from {' or '.join(W8A8_WEIGHTS)}, not {weights!r}.")
    settings: dict[str, Any] = {"bits": 8, "group_size": -1, "sym": True, "activations": "int8 per token, dynamic"}
    if weights == "gptq":
        settings["damp_percent"] = damp
    return w8a8_quantization_config({"method": weights, "smoothquant_alpha": alpha, "settings": settings})


def write_w8a8(model_dir: Path, model_name: str, out: Path, weights: str, calib: CalibrationSet | None,
               settings: CalibrationSettings, *, alpha: float | None = None, damp: float = 0.01,
               force: bool = False, progress: Callable[[int, int], None] | None = None, evaluate: bool = True,
               holdout: float | None = DEFAULT_HOLDOUT) -> CalibrationReport:
    """Write the W8A8 INT8 checkpoint ``out`` (compressed-tensors ``int-quantized``; atomic like ``write_int4``).

    ``weights``: ``rtn`` (no calibration forward) or ``gptq`` (8-bit per channel through ``calibrate``; ``holdout``
    as in ``write_int4``). ``alpha``: SmoothQuant's migration strength, or None for no smoothing. With smoothing, the
    float model's per-channel activation maxima are collected on ``calib`` (one pass) and folded into each layer as
    ``calibrate`` loads it (``qconvert.w8a8.Smoothing``; no copy of the checkpoint); the rescaled RMSNorm gains go
    into the checkpoint. ``calib`` is needed for ``gptq`` or ``alpha``.
    """
    import torch

    from qconvert.calibration.driver import read_config
    from qconvert.calibration.quantize import CalibrationError, calibrate
    from qconvert.int4 import GPTQConfig, QuantizedCheckpointWriter
    from qconvert.w8a8 import Smoothing, activation_maxima

    qcfg = w8a8_quantization_config_for(weights, alpha, damp)
    if calib is None and (weights == "gptq" or alpha is not None):
        raise CalibrationError("W8A8 with GPTQ weights or SmoothQuant needs calibration data (--calib).")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = QuantizedCheckpointWriter(model_dir, out, qcfg, force=force)
    for w in caught:
        print(f"qconvert: warning: {w.message}", file=sys.stderr)
    cfg = GPTQConfig(bits=8, group_size=-1, sym=True, damp_percent=damp)
    ids = calib.ids if calib is not None else torch.zeros((1, 1), dtype=torch.long)  # RTN runs no forward
    with writer:
        start = time.perf_counter()
        smoothing = None
        if alpha is not None:
            smoothing = Smoothing(read_config(Path(model_dir)), activation_maxima(model_dir, ids, settings, progress),
                                  alpha)
        report = calibrate(model_dir, ids, weights, cfg, writer.add_linear, None, settings, progress,
                           holdout=holdout if weights == "gptq" else None, on_restart=writer.restart,
                           transform=smoothing)
        if smoothing is not None:  # after calibrate: a model-check fallback's restart() forgets what came before
            for name, gain in smoothing.gains.items():
                writer.add_float(name, gain)
        seconds = time.perf_counter() - start
        desc = calib.describe() if calib is not None else "none (round-to-nearest weights, no smoothing)"
        forward = None if calib is not None else "none (round-to-nearest needs no activations)"
        card = compressed_card(out.name, model_name, *compressed_card_values(qcfg), card_settings(qcfg), desc,
                               n_tokens=0 if calib is None else report.n_tokens, seconds=seconds,
                               device=report.device, dtype=report.dtype, forward=forward,
                               guard=report.guard_summary() if weights == "gptq" else "")
        _publish(writer, card, model_dir, settings.device, evaluate, W8A8_QUALITY_NOTE)
    return report


# ------------------------------------------------------------------------------------------------------------
# Re-packing an existing quantized checkpoint (``qconvert convert-format``)

CONVERT_TARGETS = ("compressed-tensors", "gptq", "awq")


def convert_output_name(src: Path, to: str) -> str:
    """Default output name: the source's name with its layout suffix swapped (``x-gptq-int4`` -> ``x-gptq-int4-ct``,
    ``x-gptq-int4-ct`` -> ``x-gptq-int4``), or ``<source>-<to>`` when the name says nothing."""
    name = src.resolve().name
    base = name.removesuffix(LAYOUT_SUFFIX["compressed-tensors"])
    if to == "compressed-tensors":
        return base + LAYOUT_SUFFIX[to] if base != name or "-gptq-" in name or name.endswith("-awq") else f"{name}-ct"
    return base if base != name else f"{name}-{to}"


def check_weight_only(layout: Any) -> None:
    """Refuse a W8A8 source (``Layout.dynamic_activations``): every target of convert-format is weight-only."""
    from qconvert.errors import QuantTypeError

    if layout.dynamic_activations:
        raise QuantTypeError("the source is W8A8 (int-quantized: int8 weights and per-token int8 activations); "
                             "convert-format re-packs weight-only layouts, and writing its weights as W8A16, GPTQ or "
                             "AWQ would silently drop the activation quantization. Quantize the float model with "
                             "qconvert gptq --bits 8 --group-size -1 for a weight-only 8-bit checkpoint.")


def target_quantization_config(source: Mapping[str, Any], to: str, act_order: bool) -> dict[str, Any]:
    """The ``quantization_config`` of ``source``'s weights re-packed into layout ``to``, or ``QuantTypeError`` when
    that layout cannot hold them (before any tensor is read; per-tensor facts are checked while re-packing).

    GPTQ settings survive a trip through compressed-tensors (kept under its ``qconvert`` key), so GPTQ -> CT -> GPTQ
    gives back the same config.
    """
    from qconvert.errors import QuantTypeError
    from qconvert.int4 import AWQConfig, GPTQConfig
    from qconvert.int4.formats import (
        CT_BITS,
        CT_METHOD,
        QUANTIZER_TAG,
        awq_quantization_config,
        compressed_quantization_config,
        gptq_quantization_config,
        layout_scheme,
    )

    layout, scheme = layout_scheme(source)
    check_weight_only(layout)
    origin: dict[str, Any] = dict(source.get("qconvert", {})) if layout.name == CT_METHOD else \
        {"method": layout.name, "settings": {k: v for k, v in source.items() if k != "quant_method"}}
    if to == CT_METHOD:
        if scheme.bits not in CT_BITS:
            raise QuantTypeError(f"the source is {scheme.bits}-bit; compressed-tensors pack-quantized is written for "
                                 f"{' and '.join(map(str, CT_BITS))}-bit weights (what vLLM loads). Keep the GPTQ "
                                 "layout for it.")
        if act_order:
            raise QuantTypeError("the source uses act-order group indices (g_idx not k // group_size); "
                                 "compressed-tensors 0.20 cannot store them (actorder 'group' was removed). Keep the "
                                 "GPTQ layout, or requantize with --static-groups or --group-aware.")
        return compressed_quantization_config(scheme.bits, scheme.group_size, scheme.sym, origin)
    if to == "awq":
        if scheme.bits != 4 or scheme.group_size == -1 or act_order:
            why = (f"{scheme.bits}-bit weights" if scheme.bits != 4 else "per-channel scales (group size -1)"
                   if scheme.group_size == -1 else "act-order group indices (AWQ GEMM has no g_idx)")
            raise QuantTypeError(f"AWQ GEMM holds 4-bit group-wise weights in the plain column order; the source has "
                                 f"{why}. Convert to gptq or compressed-tensors instead.")
        return awq_quantization_config(AWQConfig(group_size=scheme.group_size))
    if to != "gptq":
        raise QuantTypeError(f"--to {to!r} is not a layout; use one of {', '.join(CONVERT_TARGETS)}.")
    if origin.get("method") == "gptq" and origin.get("settings", {}).get("sym") == scheme.sym:
        return {"quant_method": "gptq", **origin["settings"], "desc_act": act_order}
    qcfg = gptq_quantization_config(GPTQConfig(bits=scheme.bits, group_size=scheme.group_size, sym=scheme.sym,
                                               desc_act=act_order))
    qcfg["meta"] = {"quantizer": [QUANTIZER_TAG], "converted_from": layout.name}
    return qcfg


def convert_format(src: Path, out: Path, to: str, *, force: bool = False) -> Path:
    """Re-pack the GPTQ / AWQ / compressed-tensors checkpoint ``src`` into layout ``to`` at ``out``, without
    requantizing: every linear's codes, scales and zero points are unpacked and packed again, so both checkpoints
    dequantize to the same weights bit for bit; float tensors are copied (they are fp16 already).

    Errors (``QConvertError``, before or while writing; nothing is left under ``out``): a source that is not a
    quantized checkpoint, tensors that disagree with its quantization_config (e.g. another group size), or weights
    the target layout cannot hold (act-order into compressed-tensors or AWQ, 8-bit into AWQ, zero point 0 into GPTQ).
    """
    import dataclasses

    import torch

    from qconvert.card import USAGE, Card, compressed_layout, settings_rows, table
    from qconvert.errors import CheckpointError, QuantTypeError
    from qconvert.int4 import QuantizedCheckpointWriter
    from qconvert.int4.formats import layout_scheme, read_linear
    from qconvert.io.safetensors import SafetensorsCheckpoint
    from qconvert.registry import read_model_config

    config = read_model_config(Path(src))
    source = config.get("quantization_config")
    if not isinstance(source, dict) or not source.get("quant_method"):
        raise CheckpointError(f"{src} is not a quantized checkpoint (config.json has no quantization_config); "
                              "convert-format re-packs GPTQ, AWQ and compressed-tensors checkpoints. Quantize a float "
                              "model with qconvert gptq or qconvert awq.")
    layout, scheme = layout_scheme(source, f"{src}/config.json")
    check_weight_only(layout)  # before its tensors are opened
    ckpt = SafetensorsCheckpoint(Path(src))
    act_order = _source_act_order(ckpt, layout.name, source)
    qcfg = target_quantization_config(source, to, act_order)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = QuantizedCheckpointWriter(src, out, qcfg, force=force)
    for w in caught:
        print(f"qconvert: warning: {w.message}", file=sys.stderr)
    with writer:
        _check_packed_shapes(ckpt, writer.linears, layout, scheme, src)
        names = set(ckpt.names())
        for module in writer.linears:
            q = read_linear(lambda n: torch.from_numpy(ckpt.read_raw(n)), names, module, layout, scheme)
            if q.sym and not writer.scheme.sym:  # symmetric is asymmetric with z = 2^(bits-1) everywhere: exact
                q = dataclasses.replace(q, sym=False)
            if to == "gptq" and not q.sym and int(q.zeros.min()) < 1:
                raise QuantTypeError(f"{module} has zero point 0 in {int((q.zeros == 0).sum())} group(s); GPTQ v1 "
                                     "stores z - 1 and cannot hold it. Convert to compressed-tensors instead (it "
                                     "stores zero points as they are).")
            writer.add_linear(module, q)
        name = Path(out).name
        last = compressed_layout(*(compressed_card_values(qcfg) + (name,))) if to == "compressed-tensors" else \
            (None, f"Serve it with `{USAGE[to].format(name=name)}`.")
        card = Card(title=f"{name} — {layout.name} re-packed as {to}",
                    intro=f"Re-packed by qconvert convert-format from `{Path(src).resolve().name}` without "
                          "requantizing: the codes, scales and zero points are the source's, so both checkpoints "
                          "dequantize to the same weights bit for bit.",
                    sections=[(None, table(("setting", "value"), settings_rows(card_settings(qcfg)))), last]).render()
        (writer.tmp / "README.md").write_text(card)
        writer.finish()
    return Path(out)


def _source_act_order(ckpt: Any, method: str, source: Mapping[str, Any]) -> bool:
    """Whether a GPTQ source's g_idx is permuted (desc_act true and some g_idx not k // group_size)."""
    import numpy as np

    if method != "gptq" or not source.get("desc_act"):
        return False
    group = int(source["group_size"])
    for name in ckpt.names():
        if name.endswith(".g_idx"):
            g_idx = ckpt.read_raw(name)
            k = np.arange(g_idx.shape[0])
            if not np.array_equal(g_idx, np.zeros_like(k) if group == -1 else k // group):
                return True
    return False


def _check_packed_shapes(ckpt: Any, linears: Mapping[str, tuple[int, int]], layout: Any, scheme: Any,
                         src: Path) -> None:
    """Every linear's packed tensors have the shapes its quantization_config implies (else nothing is read)."""
    from qconvert.errors import CheckpointError

    for module, (n, k) in linears.items():
        want = layout.shapes(n, k, scheme)
        got = {s: tuple(ckpt.entries[f"{module}.{s}"].shape) for s in want if f"{module}.{s}" in ckpt.entries}
        if got != want:
            declared = (f"config.json's quantization_config declares {scheme.bits}-bit, group size "
                        f"{scheme.group_size} {layout.name} weights")
            if f"{module}.weight" in ckpt.entries:
                raise CheckpointError(f"{src}: {module} is a float weight but {declared}; convert-format needs "
                                      "every decoder linear quantized. Quantize the float model instead.")
            raise CheckpointError(f"{src}: {module} [{n}, {k}] has packed tensors {got}, but {declared}, which "
                                  f"need {want}. The tensors and the config disagree (another group size or width?): "
                                  "re-export the checkpoint, or correct its quantization_config.")
