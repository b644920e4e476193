"""The one streaming calibration driver: layer by layer, as IST-DASLab's ``llama_sequential``.

    ids [n, t] --embed--> h0 [n, t, hidden] (layer-0 inputs, captured once, kept on the device)
    for each decoder layer i:
        load layer i's weights (lazy reader, one layer in memory)
        GPTQ: for each sub-layer group of ``spec.sequential`` (q/k/v -> o -> gate/up -> down):
                  run the layer with hooks on that group's linears -> Hessians (fp32, ``add_to_hessian``)
                  ``gptq(W, H)`` each linear; its weight becomes the dequantized one before the next group runs
        AWQ:  one hooked forward caches every linear's inputs; ``search_scales`` per scaling site (on the float
              layer), ``apply_scales``, ``search_clip`` / ``apply_clip``, ``quantize_awq``
        RTN:  no statistics
        hand each ``QuantizedLinear`` (and AWQ's rescaled norm gains) to the callbacks
        h <- layer(h) with the quantized weights (the next layer sees what the quantized model will produce)

Peak memory: one layer's weights + the calibration activations [n, t, hidden] twice + one Hessian per linear of
the current group (AWQ: the cached inputs of one layer). Forwards run in bfloat16 or float32 (Qwen2 overflows
float16); statistics, Hessians and the quantizers work in float32. The algorithms themselves are the pure
functions of ``qconvert.int4``; this module only moves tensors and decides the order.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconvert.errors import QConvertError
from qconvert.int4 import (
    AWQConfig,
    GPTQConfig,
    QuantizedLinear,
    active_mappings,
    add_to_hessian,
    gptq,
    rtn,
)
from qconvert.int4.awq import (
    AWQ_TABLES,
    apply_clip,
    apply_scales,
    quantize_awq,
    search_clip,
    search_scales,
)
from qconvert.int4.rtn import check_scheme
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.registry import ArchSpec, spec_for_config

METHODS = ("gptq", "awq", "rtn")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

OnLinear = Callable[[str, QuantizedLinear], None]  # ("model.layers.3.mlp.down_proj", q)
OnFloat = Callable[[str, torch.Tensor], None]  # ("model.layers.3.input_layernorm.weight", new gain)
Progress = Callable[[int, int], None]  # (layers done, n_layers)


class CalibrationError(QConvertError):
    """Calibration cannot run or produced non-finite activations."""


class DeviceError(QConvertError):
    """The requested device is not available."""


@dataclass(frozen=True)
class CalibrationSettings:
    """How the driver runs: device (``cpu``/``cuda``/``cuda:1``), compute dtype, forward minibatch in samples."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    batch_size: int = 8


@dataclass(frozen=True)
class CalibrationReport:
    n_samples: int
    seq_len: int
    n_tokens: int
    seconds: float
    device: str
    dtype: str


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was requested but torch sees no CUDA GPU (torch {torch.__version__}, "
                              f"built with CUDA {torch.version.cuda}). Use --device cpu (slow for 7B and up) or "
                              "--device auto, or install a CUDA build of torch on a machine with an NVIDIA GPU.")
        return device
    if device != "cpu":
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N.")
    return device


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU, float32 on the CPU (CPU bf16 matmuls are slow); float16 is refused."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in COMPUTE_DTYPES:
        raise CalibrationError(f"calibration dtype {name!r} is not supported; use bfloat16 or float32 (Qwen2's "
                               "activations overflow float16).")
    return COMPUTE_DTYPES[name]


class DeviceLayer:
    """One decoder layer on the device: its params (names relative to the layer) and the forward helpers."""

    def __init__(self, ckpt: SafetensorsCheckpoint, prefix: str, settings: CalibrationSettings,
                 pad_to: int | None = None) -> None:
        self.prefix = prefix
        self.p = {n[len(prefix):]: torch.from_numpy(ckpt.read_f32(n)).to(settings.device, settings.dtype)
                  for n in ckpt.names() if n.startswith(prefix)}
        if pad_to is not None:  # Qwen's zero padding of the MLP (see qconvert.int4.writer.pad_intermediate)
            from qconvert.int4.writer import pad_intermediate

            names = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
            padded = pad_intermediate(*(self.p[n] for n in names), pad_to)
            self.p.update(zip(names, padded))

    def weight(self, sub: str) -> torch.Tensor:
        return self.p[f"{sub}.weight"]


def check_finite(h: torch.Tensor, where: str) -> None:
    if not torch.isfinite(h).all():
        raise CalibrationError(f"non-finite activations (NaN/Inf) in the output of {where}. The checkpoint may be "
                               "corrupt, or the forward overflowed: use --dtype float32 (never float16 for Qwen2).")


def run_layer(layer: DeviceLayer, h: torch.Tensor, dims: qwen2.Qwen2Dims, rope: tuple[torch.Tensor, torch.Tensor],
         batch: int, hook: qwen2.LinearHook | None = None) -> torch.Tensor:
    """The layer's output on all samples ``h`` [n, t, hidden], in minibatches of ``batch`` samples."""
    with torch.no_grad():
        return torch.cat([qwen2.decoder_layer(layer.p, h[i:i + batch], dims, rope, hook)
                          for i in range(0, h.shape[0], batch)])


class _GroupDone(Exception):
    """Raised by a hook once the group's input is captured: the rest of the layer's forward is not needed."""


class _SiteHessian:
    """Forward hook for one true-sequential group: the Hessian of the group's one input site (``spec.input_sites``)."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.H: torch.Tensor | None = None
        self.n = 0

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if name == self.site:
            self.H, self.n = add_to_hessian(self.H, self.n, x)
            raise _GroupDone

    def collect(self, layer: DeviceLayer, h: torch.Tensor, dims: qwen2.Qwen2Dims,
                rope: tuple[torch.Tensor, torch.Tensor], batch: int) -> torch.Tensor:
        """Run the layer on every minibatch of ``h``, each forward stopping once the site's input is seen."""
        for i in range(0, h.shape[0], batch):
            try:
                with torch.no_grad():
                    qwen2.decoder_layer(layer.p, h[i:i + batch], dims, rope, self)
            except _GroupDone:
                pass
        assert self.H is not None, f"{self.site} was never called by the forward"
        return self.H


def _gptq_layer(layer: DeviceLayer, h: torch.Tensor, dims: qwen2.Qwen2Dims, rope: tuple[torch.Tensor, torch.Tensor],
                spec: ArchSpec, cfg: GPTQConfig, settings: CalibrationSettings) -> dict[str, QuantizedLinear]:
    """True-sequential GPTQ of one layer: each group's Hessians see the already quantized earlier groups.

    Each group's forward stops as soon as the group's input is captured (q/k/v need only the input norm, o_proj
    the attention), and the linears of a group (q/k/v, gate/up) read one input, so they share one Hessian.
    """
    out: dict[str, QuantizedLinear] = {}
    for group in spec.sequential:
        H = _SiteHessian(group[0]).collect(layer, h, dims, rope, settings.batch_size)  # group[0] names the site
        for name in group:
            q = gptq(layer.weight(name).float(), H, cfg)
            layer.p[f"{name}.weight"] = q.dequantize().to(settings.dtype)
            out[name] = q
    return out


def _rtn_layer(layer: DeviceLayer, spec: ArchSpec, cfg: GPTQConfig, settings: CalibrationSettings
               ) -> dict[str, QuantizedLinear]:
    out = {}
    for name in (s for group in spec.sequential for s in group):
        q = rtn(layer.weight(name).float(), cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero)
        layer.p[f"{name}.weight"] = q.dequantize().to(settings.dtype)
        out[name] = q
    return out


def _inspect_forward(layer: DeviceLayer, inspect: str, names: Sequence[str], x: torch.Tensor, dims: qwen2.Qwen2Dims,
                     rope: tuple[torch.Tensor, torch.Tensor], batch: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """``forward(ws)`` for ``search_scales``: output of module ``inspect`` on its cached input ``x`` [n, t, in]."""
    def run(p: Mapping[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        if inspect == "self_attn":
            return qwen2.attention(p, xb, dims, rope)
        if inspect == "mlp":
            return qwen2.mlp(p, xb)
        return torch.nn.functional.linear(xb, p[f"{inspect}.weight"], p.get(f"{inspect}.bias"))

    def forward(ws: list[torch.Tensor]) -> torch.Tensor:
        p = {**layer.p, **{f"{n}.weight": w.to(layer.p[f"{n}.weight"].dtype) for n, w in zip(names, ws)}}
        with torch.no_grad():
            return torch.cat([run(p, x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return forward


def _awq_layer(layer: DeviceLayer, h: torch.Tensor, dims: qwen2.Qwen2Dims, rope: tuple[torch.Tensor, torch.Tensor],
               spec: ArchSpec, cfg: AWQConfig, settings: CalibrationSettings
               ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """AWQ of one layer (AutoAWQ's order): search every scale on the float layer, apply all, clip, quantize.

    Returns the quantized linears and the rescaled float tensors (norm gains), names relative to the layer.
    """
    mappings, no_clip = AWQ_TABLES[spec.hf_arch]
    site_of = spec.input_sites  # q/k/v read one input, gate/up another: cache each input once
    cached: dict[str, list[torch.Tensor]] = {}
    run_layer(layer, h, dims, rope, settings.batch_size,
              lambda n, x: cached.setdefault(n, []).append(x) if site_of[n] == n else None)
    inputs = {site: torch.cat(xs) for site, xs in cached.items()}  # input site -> [n, t, in]
    linears = [s for group in spec.sequential for s in group]
    shapes = {n: tuple(layer.weight(n).shape) for n in linears}
    sites = active_mappings(mappings, shapes)
    scales = []
    k = cfg.search_samples or h.shape[0]  # the grid's forwards run on the first k samples (random windows)
    for m in sites:  # searched on the unscaled layer, like AutoAWQ's auto_scale
        if len({site_of[n] for n in m.layers}) != 1:
            raise CalibrationError(f"AWQ mapping {m.prev} -> {m.layers} spans several input sites of "
                                   f"{spec.hf_arch}'s registry groups; its layers must read one input.")
        x = inputs[site_of[m.layers[0]]]
        fwd = _inspect_forward(layer, m.inspect, m.layers, x[:k], dims, rope, settings.batch_size)
        scales.append(search_scales(x, [layer.weight(n).float() for n in m.layers], fwd, cfg).scales)
    changed: set[str] = set()
    for m, s in zip(sites, scales):
        prev = f"{m.prev}.weight"
        bias = layer.p.get(f"{m.prev}.bias")
        new_prev, new_bias, scaled = apply_scales(layer.p[prev].float(), None if bias is None else bias.float(),
                                                  [layer.weight(n).float() for n in m.layers], s)
        layer.p[prev] = new_prev.to(settings.dtype)
        changed.add(prev)
        if new_bias is not None:
            layer.p[f"{m.prev}.bias"] = new_bias.to(settings.dtype)
            changed.add(f"{m.prev}.bias")
        for n, w in zip(m.layers, scaled):
            layer.p[f"{n}.weight"] = w.to(settings.dtype)
        site = site_of[m.layers[0]]  # a mapping's layers are one group: their shared input is rescaled once
        inputs[site] = inputs[site] / s.to(inputs[site].dtype)
    out = {}
    for n in linears:
        w = layer.weight(n).float()
        if cfg.clip_all or n not in no_clip:
            w = apply_clip(w, search_clip(inputs[site_of[n]], w, cfg))
        out[n] = quantize_awq(w, cfg)
        layer.p[f"{n}.weight"] = out[n].dequantize().to(settings.dtype)
    floats = {n: layer.p[n] for n in changed if not any(n == f"{q}.weight" for q in linears)}
    return out, floats


def check_model_scheme(config: Mapping[str, Any], spec: ArchSpec, bits: int, group_size: int) -> None:
    """Refuse a (bits, group size) that some linear of this model cannot use — before any forward runs."""
    from qconvert.int4.writer import qwen2_linear_shapes

    shapes = qwen2_linear_shapes(config)
    for group in spec.sequential:
        for sub in group:
            check_scheme(bits, group_size, shapes[sub][1], f"{spec.block_prefix}.*.{sub} {list(shapes[sub])}")


def calibrate(model_dir: str | Path, ids: torch.Tensor, method: str, cfg: GPTQConfig | AWQConfig, on_linear: OnLinear,
              on_float: OnFloat | None = None, settings: CalibrationSettings = CalibrationSettings(),
              progress: Progress | None = None, pad_to: int | None = None) -> CalibrationReport:
    """Quantize every decoder linear of the checkpoint in ``model_dir`` with calibration tokens ``ids`` [n, t].

    ``method``: ``gptq`` (``cfg`` a GPTQConfig), ``awq`` (an AWQConfig) or ``rtn`` (a GPTQConfig; no statistics,
    the baseline). Results go to ``on_linear(full module name, q)`` layer by layer; AWQ's rescaled norm gains go to
    ``on_float(full tensor name, tensor)``. ``pad_to`` zero-pads every MLP's intermediate size first (Qwen's
    recipe for vLLM tensor parallelism; outputs unchanged). Returns what was used (token count, time).
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}.")
    start = time.perf_counter()
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    spec = spec_for_config(config)
    check_model_scheme(config, spec, cfg.bits, cfg.group_size)
    ckpt = SafetensorsCheckpoint(model_dir)
    dims = qwen2.Qwen2Dims.from_config(config)
    dev, dt = settings.device, settings.dtype
    emb = torch.from_numpy(ckpt.read_f32("model.embed_tokens.weight")).to(dev, dt)
    h = qwen2.embed(emb, ids.to(dev))  # layer-0 inputs [n, t, hidden]
    del emb
    rope = qwen2.rope_tables(dims, ids.shape[1], dev, dt)
    n_layers = int(config["num_hidden_layers"])
    for i in range(n_layers):
        prefix = f"{spec.block_prefix}.{i}."
        layer = DeviceLayer(ckpt, prefix, settings, pad_to)
        floats: dict[str, torch.Tensor] = {}
        if method == "gptq":
            assert isinstance(cfg, GPTQConfig)
            qs = _gptq_layer(layer, h, dims, rope, spec, cfg, settings)
        elif method == "awq":
            assert isinstance(cfg, AWQConfig)
            qs, floats = _awq_layer(layer, h, dims, rope, spec, cfg, settings)
        else:
            assert isinstance(cfg, GPTQConfig)
            qs = _rtn_layer(layer, spec, cfg, settings)
        for name, q in qs.items():
            on_linear(prefix + name, q)
        for name, t in floats.items():
            if on_float is None:
                raise CalibrationError("AWQ rescales norm gains; pass on_float to receive them.")
            on_float(prefix + name, t)
        if method != "rtn":  # round-to-nearest needs no activations
            h = run_layer(layer, h, dims, rope, settings.batch_size)
            check_finite(h, f"decoder layer {i} ({prefix.rstrip('.')})")
        del layer
        if progress is not None:
            progress(i + 1, n_layers)
    return CalibrationReport(ids.shape[0], ids.shape[1], ids.numel(), time.perf_counter() - start, dev,
                             str(dt).removeprefix("torch."))


def quantized_weights(model_dir: str | Path, linears: Mapping[str, QuantizedLinear],
                      floats: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The whole float model (f32, HF names) with each quantized linear replaced by its dequantized weight.

    For evaluation of small models only (holds everything in memory).
    """
    ckpt = SafetensorsCheckpoint(Path(model_dir))
    w = {n: torch.from_numpy(ckpt.read_f32(n)) for n in ckpt.names()}
    for module, q in linears.items():
        w[f"{module}.weight"] = q.dequantize().float().cpu()
    for name, t in (floats or {}).items():
        w[name] = t.float().cpu()
    return w


def perplexity(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], ids: torch.Tensor,
               window: int = 256) -> float:
    """exp(mean next-token loss) over non-overlapping ``window``-token chunks of ``ids`` [n_tokens]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = qwen2.forward(weights, chunk[:, :-1], config)
            total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)
