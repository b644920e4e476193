"""Layer passes for W8A8: activation maxima, the smoothed float checkpoint, the fake-quantized forward.

    activation_maxima           stream_layers over the float model; a hook keeps max|x| per input channel of
                                every smoothing site: {"model.layers.3.self_attn.q_proj": f32[hidden], ...}
    write_smoothed_checkpoint   per layer: s = smooth_scales(max|X|, W, alpha) for each SMOOTH_TABLES site, norm
                                gain / s, columns × s (``awq.apply_scales``); one shard per layer, in the source's
                                float dtype, other tensors copied; calibrate then quantizes that directory
    w8a8_logits                 streamed_logits for a W8A8 checkpoint: each layer dequantized (DeviceLayer), every
                                linear input replaced by its per-token int8 fake quantization before the matmul

Memory is the driver's: one layer plus the activations; the maxima are one vector per site.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qconvert.calibration.driver import (
    CalibrationSettings,
    DeviceLayer,
    LayerContext,
    StreamedHead,
    read_config,
    stream_layers,
)
from qconvert.errors import CheckpointError
from qconvert.int4.awq import apply_scales
from qconvert.int4.smoothquant import SMOOTH_TABLES, fake_quantize_tokens, smooth_scales
from qconvert.io.safetensors import INDEX_FILE, SafetensorsCheckpoint
from qconvert.registry import spec_for_config

Progress = Callable[[int, int], None]
TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
COPIED_FILES = ("config.json", "generation_config.json")  # what calibrate and the writer read besides the tensors


class _MaximaPass:
    """Hooked float forward: running max|x| per input channel at each input site (the first linear of a group)."""

    def __init__(self) -> None:
        self.maxima: dict[str, torch.Tensor] = {}

    def __call__(self, layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        site_of = ctx.spec.input_sites

        def hook(name: str, x: torch.Tensor) -> None:
            if site_of.get(name) == name:  # the other linears of a site read the same x
                m = x.detach().float().abs().reshape(-1, x.shape[-1]).amax(0).cpu()
                key = ctx.prefix + name
                self.maxima[key] = torch.maximum(self.maxima[key], m) if key in self.maxima else m

        return ctx.run(layer, h, hook)


def activation_maxima(model_dir: str | Path, ids: torch.Tensor, settings: CalibrationSettings = CalibrationSettings(),
                      progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """max|x_j| f32 [in] over every token of ``ids`` [n, t] at each input site of the float model, keyed by the full
    name of the site's first linear (``model.layers.0.self_attn.q_proj``, ``...mlp.gate_proj``, ...)."""
    model_dir = Path(model_dir)
    maxima = _MaximaPass()
    stream_layers(SafetensorsCheckpoint(model_dir), read_config(model_dir), ids, maxima, settings, progress=progress)
    return maxima.maxima


def write_smoothed_checkpoint(model_dir: str | Path, out_dir: str | Path, maxima: Mapping[str, torch.Tensor],
                              alpha: float) -> dict[str, torch.Tensor]:
    """Write ``model_dir`` with SmoothQuant's scales folded in to the existing empty directory ``out_dir`` (one
    safetensors shard per decoder layer, config.json copied). Returns the scales f32 [in] by the full name of the
    RMSNorm they were folded into.

    The rescaled tensors (norm gains, q/k/v and gate/up weights) are stored in float32, so the copy computes the
    source's function up to float32 rounding (a bf16 copy would add rounding of a quarter of an int8 step); the
    others keep the source's dtype. It exists because ``calibrate`` quantizes a checkpoint directory; for a bf16
    source it is about 1.7x the source's size.
    """
    src, out = Path(model_dir), Path(out_dir)
    config = read_config(src)
    spec = spec_for_config(config)
    mappings = SMOOTH_TABLES.get(spec.hf_arch)
    if mappings is None:
        raise CheckpointError(f"SmoothQuant has no smoothing sites for {spec.hf_arch}; drop --smooth.")
    ckpt = SafetensorsCheckpoint(src)
    shards: dict[str, list[str]] = {}
    for name in ckpt.names():
        parts = name.split(".")
        layer = ".".join(parts[:3]) + "." if name.startswith(spec.block_prefix + ".") else ""
        shards.setdefault(layer, []).append(name)
    scales: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    for i, (prefix, names) in enumerate(shards.items()):
        tensors = {n: torch.from_numpy(ckpt.read_f32(n)) for n in names}
        if prefix:
            for m in mappings:
                site = prefix + spec.input_sites[m.layers[0]]
                if site not in maxima:
                    raise CheckpointError(f"no activation maxima for {site}: they were collected on another model; "
                                          "collect them on this checkpoint.")
                ws = [tensors[f"{prefix}{n}.weight"] for n in m.layers]
                s = smooth_scales(maxima[site], ws, alpha)
                gain, _, scaled = apply_scales(tensors[f"{prefix}{m.prev}.weight"], None, ws, s)
                tensors[f"{prefix}{m.prev}.weight"] = gain
                tensors.update({f"{prefix}{n}.weight": w for n, w in zip(m.layers, scaled)})
                scales[f"{prefix}{m.prev}.weight"] = s
        shard = f"smoothed-{i:05d}.safetensors"
        changed = {f"{prefix}{m.prev}.weight" for m in mappings} | \
            {f"{prefix}{n}.weight" for m in mappings for n in m.layers} if prefix else set()
        save_file({n: t.to(torch.float32 if n in changed else TORCH_DTYPES[ckpt.entries[n].dtype]).contiguous()
                   for n, t in tensors.items()},
                  str(out / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1) + "\n")
    for f in COPIED_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, out / f)
    return scales


def _fake_quant_inputs(layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """The layer's output with every linear input per-token int8 fake-quantized (W8A8's dynamic activations).

    The hook rewrites the input in place, which the linear then reads (``qwen2._linear`` calls the hook on the
    tensor it multiplies). Every linear input of the Qwen2 forward is a fresh tensor (a norm's output, the
    attention's reshaped output, silu(gate)·up), never the residual stream; q/k/v (and gate/up) share one input,
    which is quantized once and is then a fixed point of the quantizer (as in vLLM's fused qkv / gate_up linears).
    """
    def hook(name: str, x: torch.Tensor) -> None:
        x.copy_(fake_quantize_tokens(x))

    return ctx.run(layer, h, hook)


def w8a8_logits(ckpt: SafetensorsCheckpoint, config: Mapping[str, Any], windows: torch.Tensor, first: int,
                settings: CalibrationSettings = CalibrationSettings(), *,
                progress: str | None = None) -> Iterator[torch.Tensor]:
    """Float32 logits [t - 1 - first, vocab] of each window of ``windows`` [n, t] through the W8A8 checkpoint
    ``ckpt``: dequantized int8 weights, per-token int8 linear inputs (``streamed_logits`` plus the activations)."""
    from tqdm import tqdm

    n_layers = int(config["num_hidden_layers"])
    bar = tqdm(total=n_layers, desc=progress, unit="layer", disable=progress is None, file=sys.stderr)

    def advance(done: int, total: int) -> None:
        bar.update(1)

    try:
        h = stream_layers(ckpt, config, windows, _fake_quant_inputs, settings,
                          quantization_config=config["quantization_config"], progress=advance)
    finally:
        bar.close()
    head = StreamedHead(ckpt, config, settings)  # lm_head is not quantized (``ignore``): a float matmul
    with torch.no_grad():
        for w in range(h.shape[0]):
            yield head(h[w, first:-1])
