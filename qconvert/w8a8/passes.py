"""Layer passes for W8A8: activation maxima, SmoothQuant's per-layer folding, the fake-quantized forward.

    activation_maxima           stream_layers over the float model; a hook keeps max|x| per input channel of
                                every smoothing site: {"model.layers.3.self_attn.q_proj": f32[hidden], ...}
    Smoothing                   a layer transform: s = smooth_scales(max|X|, W, alpha) for each SMOOTH_TABLES
                                site, norm gain / s, columns × s (``awq.apply_scales``) as each layer is loaded;
                                calibrate quantizes the smoothed layers, the gains are written beside them
    w8a8_logits                 streamed_logits for a W8A8 checkpoint: each layer dequantized (DeviceLayer), every
                                linear input replaced by its per-token int8 fake quantization before the matmul

Memory is the driver's: one layer plus the activations; the maxima are one vector per site.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from qconvert.calibration.driver import (
    CalibrationSettings,
    DeviceLayer,
    LayerContext,
    LayerTransform,
    StreamedHead,
    read_config,
    stream_layers,
)
from qconvert.errors import CheckpointError
from qconvert.int4.awq import apply_scales
from qconvert.int4.smoothquant import SMOOTH_TABLES, fake_quantize_tokens, smooth_scales
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.registry import spec_for_config

Progress = Callable[[int, int], None]


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
                      progress: Progress | None = None, transform: LayerTransform | None = None
                      ) -> dict[str, torch.Tensor]:
    """max|x_j| f32 [in] over every token of ``ids`` [n, t] at each input site of the float model (each layer
    edited by ``transform`` first, e.g. ``Smoothing``), keyed by the full name of the site's first linear
    (``model.layers.0.self_attn.q_proj``, ``...mlp.gate_proj``, ...)."""
    model_dir = Path(model_dir)
    maxima = _MaximaPass()
    stream_layers(SafetensorsCheckpoint(model_dir), read_config(model_dir), ids, maxima, settings, progress=progress,
                  transform=transform)
    return maxima.maxima


class Smoothing:
    """SmoothQuant's scales folded into each decoder layer as the driver loads it (a ``LayerTransform`` for
    ``stream_layers`` / ``calibrate``): for each ``SMOOTH_TABLES`` site, s = smooth_scales(max|X|, W, alpha), the
    RMSNorm gain / s and the columns of the linears it feeds × s (``awq.apply_scales``), in float32 (so the
    function is the source's up to float32 rounding). ``gains``: each rescaled norm gain (f32, full name) as last
    computed, to be written beside the quantized weights; ``scales``: the s folded into it. No copy of the
    checkpoint is made: the same scales come out every time a layer is loaded.
    """

    def __init__(self, config: Mapping[str, Any], maxima: Mapping[str, torch.Tensor], alpha: float) -> None:
        self.spec = spec_for_config(dict(config))
        mappings = SMOOTH_TABLES.get(self.spec.hf_arch)
        if mappings is None:
            raise CheckpointError(f"SmoothQuant has no smoothing sites for {self.spec.hf_arch}; drop --smooth.")
        self.mappings, self.maxima, self.alpha = mappings, maxima, alpha
        self.gains: dict[str, torch.Tensor] = {}
        self.scales: dict[str, torch.Tensor] = {}

    def __call__(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for m in self.mappings:
            site = prefix + self.spec.input_sites[m.layers[0]]
            if site not in self.maxima:
                raise CheckpointError(f"no activation maxima for {site}: they were collected on another model; "
                                      "collect them on this checkpoint.")
            ws = [tensors[f"{n}.weight"].float() for n in m.layers]
            s = smooth_scales(self.maxima[site].to(ws[0].device), ws, self.alpha)
            gain, _, scaled = apply_scales(tensors[f"{m.prev}.weight"].float(), None, ws, s)
            tensors[f"{m.prev}.weight"] = gain
            tensors.update({f"{n}.weight": w for n, w in zip(m.layers, scaled)})
            self.gains[f"{prefix}{m.prev}.weight"] = gain.cpu()
            self.scales[f"{prefix}{m.prev}.weight"] = s.cpu()


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
