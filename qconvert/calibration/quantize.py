"""GPTQ, AWQ and round-to-nearest as layer passes of the one streaming driver (``qconvert.calibration``).

    for each decoder layer (``stream_layers``: one layer on the device, fed the previous layer's output):
        GPTQ: for each sub-layer group of ``spec.sequential`` (q/k/v -> o -> gate/up -> down):
                  run the layer until that group's input is captured -> one Hessian (fp32, ``add_to_hessian``)
                  ``gptq(W, H)`` each linear; its weight becomes the dequantized one before the next group runs
        AWQ:  one hooked forward caches every input site; ``search_scales`` per scaling site (on the float
              layer), ``apply_scales``, ``search_clip`` / ``apply_clip``, ``quantize_awq``
        RTN:  no statistics, no forward
        hand each ``QuantizedLinear`` (and AWQ's rescaled norm gains) to the callbacks
    the driver then runs the layer with the quantized weights: the next layer sees what the quantized model
    will produce.

Peak memory: the driver's (one layer + the activations twice) + one Hessian per input site of the current
group (AWQ: the cached inputs of one layer). The algorithms themselves are the pure functions of
``qconvert.int4``; this module only decides the order and moves tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from qconvert.calibration.driver import (
    COMPUTE_DTYPES,
    CalibrationError,
    CalibrationSettings,
    DeviceError,
    DeviceLayer,
    LayerContext,
    LayerTransform,
    Progress,
    StreamedHead,
    check_finite,
    read_config,
    resolve_device,
    resolve_dtype,
    run_layer,
    stream_layers,
)
from qconvert.int4 import (
    AWQConfig,
    GPTQConfig,
    QuantizedLinear,
    active_mappings,
    add_to_hessian,
)
from qconvert.int4.awq import (
    AWQ_TABLES,
    apply_clip,
    apply_scales,
    quantize_awq,
    scaled_fake_quant,
    search_clip,
    search_scales,
)
from qconvert.int4.guard import (
    ModelCheck,
    baseline,
    block_standard_error,
    guarded_gptq,
    holdout_count,
    log_probs,
    position_scores,
    reconstruction_error,
    windows_needed,
)
from qconvert.int4.rtn import check_scheme
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.registry import ArchSpec, spec_for_config

__all__ = ["COMPUTE_DTYPES", "METHODS", "CalibrationError", "CalibrationReport", "CalibrationSettings", "DeviceError",
           "DeviceLayer", "calibrate", "check_finite", "check_model_scheme", "resolve_device", "resolve_dtype",
           "run_layer"]

METHODS = ("gptq", "awq", "rtn")

OnLinear = Callable[[str, QuantizedLinear], None]  # ("model.layers.3.mlp.down_proj", q)
OnFloat = Callable[[str, torch.Tensor], None]  # ("model.layers.3.input_layernorm.weight", new gain)
OnRestart = Callable[[], None]  # forget every result handed on so far: they come again (the model-level check)


@dataclass(frozen=True)
class CalibrationReport:
    n_samples: int
    seq_len: int
    n_tokens: int
    seconds: float
    device: str
    dtype: str
    holdout: int = 0  # windows held out for the guard (the last ones); 0: no guard
    kept: Mapping[str, int] = field(default_factory=dict)  # linears per result kept: {"gptq": 160, "rtn": 8}
    rank_warnings: tuple[str, ...] = ()  # input sites the fitted tokens cannot span (GPTQ)
    model_check: ModelCheck | None = None  # the guard's decision on the whole model (None: not run)

    def guard_summary(self) -> str:
        """One line for the model card and the terminal: the split and what the guard kept."""
        if not self.holdout:
            return "held-out guard: off"
        kept = ", ".join(f"{k} {v}" for k, v in sorted(self.kept.items(), key=lambda kv: -kv[1]))
        check = f"; {self.model_check.summary()}" if self.model_check is not None else ""
        return (f"held-out guard: the last {self.holdout} of {self.n_samples} calibration windows judged each result "
                f"against round-to-nearest (fitted on the first {self.n_samples - self.holdout}); linears kept: "
                f"{kept}{check}")


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
                spec: ArchSpec, cfg: GPTQConfig, settings: CalibrationSettings, n_out: int = 0
                ) -> dict[str, QuantizedLinear]:
    """True-sequential GPTQ of one layer: each group's Hessians see the already quantized earlier groups.

    Each group's forward stops as soon as the group's input is captured (q/k/v need only the input norm, o_proj
    the attention), and the linears of a group (q/k/v, gate/up) read one input, so they share one Hessian.
    ``n_out`` > 0: the last ``n_out`` windows are held out (the guard): GPTQ fits the others, and each linear keeps
    GPTQ's result only where it beats symmetric round-to-nearest on the held-out windows.
    """
    out: dict[str, QuantizedLinear] = {}
    n_fit = h.shape[0] - n_out
    for group in spec.sequential:
        H = _SiteHessian(group[0]).collect(layer, h[:n_fit], dims, rope, settings.batch_size)  # group[0]: the site
        H_out = _SiteHessian(group[0]).collect(layer, h[n_fit:], dims, rope, settings.batch_size) if n_out else None
        for name in group:
            q = guarded_gptq(layer.weight(name).float(), H, H_out, cfg)
            layer.p[f"{name}.weight"] = q.dequantize().to(settings.dtype)
            out[name] = q
    return out


def _rtn_layer(layer: DeviceLayer, spec: ArchSpec, cfg: GPTQConfig | AWQConfig, settings: CalibrationSettings
               ) -> dict[str, QuantizedLinear]:
    out = {}
    for name in (s for group in spec.sequential for s in group):
        q = baseline(layer.weight(name).float(), cfg)
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


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())


def _awq_layer(layer: DeviceLayer, h: torch.Tensor, dims: qwen2.Qwen2Dims, rope: tuple[torch.Tensor, torch.Tensor],
               spec: ArchSpec, cfg: AWQConfig, settings: CalibrationSettings, n_out: int = 0
               ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """AWQ of one layer (AutoAWQ's order): search every scale on the float layer, apply all, clip, quantize.

    ``n_out`` > 0: the last ``n_out`` windows are held out (the guard). The searches see only the others; a
    mapping keeps its scales, and a linear its clip, only where that lowers the error on the held-out windows;
    and the whole layer falls back to zero-point round-to-nearest when its output on the held-out windows is
    further from the float layer's than round-to-nearest's is.
    Returns the quantized linears and the rescaled float tensors (norm gains), names relative to the layer.
    """
    mappings, no_clip = AWQ_TABLES[spec.hf_arch]
    site_of = spec.input_sites  # q/k/v read one input, gate/up another: cache each input once
    float_p = dict(layer.p)  # the float layer (entries are replaced below, never modified in place)
    cached: dict[str, list[torch.Tensor]] = {}
    run_layer(layer.p, h, dims, rope, settings.batch_size,
              lambda n, x: cached.setdefault(n, []).append(x) if site_of[n] == n else None)
    inputs = {site: torch.cat(xs) for site, xs in cached.items()}  # input site -> [n, t, in]
    n_fit = h.shape[0] - n_out
    linears = [s for group in spec.sequential for s in group]
    shapes = {n: tuple(layer.weight(n).shape) for n in linears}
    sites = active_mappings(mappings, shapes)
    scales, scaled_sites = [], 0
    k = min(cfg.search_samples or n_fit, n_fit)  # the grid's forwards run on the first k samples (random windows)
    for m in sites:  # searched on the unscaled layer, like AutoAWQ's auto_scale
        if len({site_of[n] for n in m.layers}) != 1:
            raise CalibrationError(f"AWQ mapping {m.prev} -> {m.layers} spans several input sites of "
                                   f"{spec.hf_arch}'s registry groups; its layers must read one input.")
        x = inputs[site_of[m.layers[0]]]
        ws = [layer.weight(n).float() for n in m.layers]
        fwd = _inspect_forward(layer, m.inspect, m.layers, x[:k], dims, rope, settings.batch_size)
        found = search_scales(x[:n_fit], ws, fwd, cfg)
        s = found.scales
        if n_out and found.alpha is not None:  # the searched scales against s = 1, on the held-out windows
            held = _inspect_forward(layer, m.inspect, m.layers, x[n_fit:], dims, rope, settings.batch_size)
            reference = held(ws)
            ones = torch.ones_like(s)
            if _mse(held([scaled_fake_quant(w, s, cfg) for w in ws]), reference) >= \
                    _mse(held([scaled_fake_quant(w, ones, cfg) for w in ws]), reference):
                s = ones
        scaled_sites += int(not bool((s == 1).all()))
        scales.append(s)
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
    held_H: dict[str, torch.Tensor] = {}
    for n in linears:
        w = layer.weight(n).float()
        q = quantize_awq(w, cfg)
        clipped = 0.0
        if cfg.clip_all or n not in no_clip:
            qc = quantize_awq(apply_clip(w, search_clip(inputs[site_of[n]][:n_fit], w, cfg)), cfg)
            if n_out:  # the clip against none, on the held-out windows (both judged against the unclipped w)
                site = site_of[n]
                if site not in held_H:
                    held_H[site] = add_to_hessian(None, 0, inputs[site][n_fit:])[0]
                if reconstruction_error(w, qc.dequantize(), held_H[site]) < \
                        reconstruction_error(w, q.dequantize(), held_H[site]):
                    q, clipped = qc, 1.0
            else:
                q, clipped = qc, 1.0
        out[n] = replace(q, info=MappingProxyType({"kept": "awq", "clipped": clipped,
                                                   "scaled_sites": float(scaled_sites)}))
        layer.p[f"{n}.weight"] = out[n].dequantize().to(settings.dtype)
    if n_out:  # the layer against plain zero-point round-to-nearest, on the held-out windows
        h_out = h[n_fit:]
        reference = run_layer(float_p, h_out, dims, rope, settings.batch_size)
        base = {n: baseline(float_p[f"{n}.weight"].float(), cfg) for n in linears}
        base_p = {**float_p, **{f"{n}.weight": q.dequantize().to(settings.dtype) for n, q in base.items()}}
        e_awq = _mse(run_layer(layer.p, h_out, dims, rope, settings.batch_size), reference)
        e_rtn = _mse(run_layer(base_p, h_out, dims, rope, settings.batch_size), reference)
        if e_awq > e_rtn:
            layer.p.clear()
            layer.p.update(base_p)
            return {n: replace(q, info=MappingProxyType({"kept": "rtn"})) for n, q in base.items()}, {}
    floats = {n: layer.p[n] for n in changed if not any(n == f"{q}.weight" for q in linears)}
    return out, floats


def check_model_scheme(config: Mapping[str, Any], spec: ArchSpec, bits: int, group_size: int) -> None:
    """Refuse a (bits, group size) that some linear of this model cannot use — before any forward runs."""
    from qconvert.int4.writer import qwen2_linear_shapes

    shapes = qwen2_linear_shapes(config)
    for group in spec.sequential:
        for sub in group:
            check_scheme(bits, group_size, shapes[sub][1], f"{spec.block_prefix}.*.{sub} {list(shapes[sub])}")


class _HeldOutStreams:
    """The held-out windows through the float layers and through their round-to-nearest baseline, one layer at a
    time beside the driver's own stream (the quantized model): the inputs of the model-level check."""

    def __init__(self, h0: torch.Tensor) -> None:
        self.ref = h0.clone()
        self.base = h0.clone()

    def advance(self, float_p: Mapping[str, torch.Tensor], base_p: Mapping[str, torch.Tensor], ctx: LayerContext
                ) -> None:
        self.ref, self.base = ctx.run(float_p, self.ref), ctx.run(base_p, self.base)


class _QuantizePass:
    """The layer pass of ``calibrate``: quantize one layer's linears in place and hand the results on.

    ``streams``: also carry the held-out windows through the float and the round-to-nearest layers (the model
    check); ``float_names`` collects the float tensors handed on (AWQ's rescaled norms), so a fallback can undo them.
    """

    def __init__(self, method: str, cfg: GPTQConfig | AWQConfig, on_linear: OnLinear, on_float: OnFloat | None,
                 n_out: int = 0, streams: bool = False) -> None:
        self.method, self.cfg, self.on_linear, self.on_float, self.n_out = method, cfg, on_linear, on_float, n_out
        self.kept: dict[str, int] = {}
        self.want_streams = streams
        self.streams: _HeldOutStreams | None = None
        self.float_names: list[str] = []

    def __call__(self, layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> None:
        floats: dict[str, torch.Tensor] = {}
        cfg = self.cfg
        float_p = dict(layer.p)  # the float layer (the passes replace entries, never modify them in place)
        if self.want_streams and self.streams is None:
            self.streams = _HeldOutStreams(h[h.shape[0] - self.n_out:])
        if isinstance(cfg, AWQConfig) and self.method == "awq":
            qs, floats = _awq_layer(layer, h, ctx.dims, ctx.rope, ctx.spec, cfg, ctx.settings, self.n_out)
        elif self.method == "gptq":
            assert isinstance(cfg, GPTQConfig)
            qs = _gptq_layer(layer, h, ctx.dims, ctx.rope, ctx.spec, cfg, ctx.settings, self.n_out)
        else:
            qs = _rtn_layer(layer, ctx.spec, cfg, ctx.settings)
        if self.streams is not None:
            base_p = {**float_p, **{f"{n}.weight": baseline(float_p[f"{n}.weight"].float(), cfg).dequantize()
                                    .to(ctx.settings.dtype) for n in qs}}
            self.streams.advance(float_p, base_p, ctx)
        for name, q in qs.items():
            kept = str(q.info.get("kept", self.method))
            self.kept[kept] = self.kept.get(kept, 0) + 1
            self.on_linear(ctx.prefix + name, q)
        for name, t in floats.items():
            if self.on_float is None:
                raise CalibrationError("AWQ rescales norm gains; pass on_float to receive them.")
            self.float_names.append(ctx.prefix + name)
            self.on_float(ctx.prefix + name, t)
        # the driver runs the layer with its quantized weights


SCORE_ROWS = 64  # positions scored at once: 64 x 152k vocabulary x float64 x a few temporaries ~ 0.3 GB


def score_against_float(head: StreamedHead, ref: torch.Tensor, others: Sequence[torch.Tensor], ids: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window and position 0 .. t-2 of ``ids`` [n, t]: each of ``others``' KL to the float model and next-token
    NLL, from the last hidden states (``ref``, each of ``others`` [n, t, hidden]) through ``head``.
    Returns (kl, nll), float64 [len(others), n, t - 1]."""
    t, k = ids.shape[1] - 1, len(others)  # memory: one window's reference log-probs (float64) and one's logits
    kl = torch.zeros(k, ids.shape[0], t, dtype=torch.float64)
    nll = torch.zeros(k, ids.shape[0], t, dtype=torch.float64)
    rows = range(0, t, SCORE_ROWS)  # float64 softmaxes of a few rows at a time, not of the window
    with torch.no_grad():
        for w in range(ids.shape[0]):
            ref_logits = head(ref[w, :-1])
            targets = ids[w, 1:].to(ref_logits.device)
            lp = [log_probs(ref_logits[s:s + SCORE_ROWS]) for s in rows]  # once per window, for every other
            del ref_logits
            for j, other in enumerate(others):
                logits = head(other[w, :-1])
                for i, s in enumerate(rows):
                    e = min(s + SCORE_ROWS, t)
                    a, b = position_scores(lp[i], logits[s:e], targets[s:e])
                    kl[j, w, s:e], nll[j, w, s:e] = a.cpu(), b.cpu()
                del logits
    return kl, nll


def model_check(ckpt: SafetensorsCheckpoint, config: Mapping[str, Any], method: str, quantized: torch.Tensor,
                streams: _HeldOutStreams, ids: torch.Tensor, settings: CalibrationSettings) -> ModelCheck:
    """Score the held-out windows' last hidden states: the quantized model's (``quantized``) and the baseline's
    against the float model's, by the final logits (KL and next-token NLL at positions 0 .. t-2)."""
    kl, nll = score_against_float(StreamedHead(ckpt, config, settings), streams.ref, [quantized, streams.base], ids)
    return ModelCheck(method, float(kl[0].mean()), float(nll[0].mean()), float(kl[1].mean()), float(nll[1].mean()),
                      block_standard_error(nll[0] - nll[1]), ids.shape[0] * (ids.shape[1] - 1))


def rank_warnings(config: Mapping[str, Any], spec: ArchSpec, n_fit: int, seq_len: int, n_out: int) -> list[str]:
    """One line per input site whose Hessian the fitted calibration tokens cannot make full-rank (tokens < inputs):
    GPTQ then extrapolates along directions it never saw; says how many windows would cover it."""
    from qconvert.int4.writer import qwen2_linear_shapes

    shapes = qwen2_linear_shapes(config)
    tokens = n_fit * seq_len
    lines = []
    for group in spec.sequential:
        n_in = shapes[group[0]][1]
        if n_in > tokens:
            lines.append(f"{spec.block_prefix}.*.{'/'.join(group)}: {n_in} inputs but {tokens} fitted calibration "
                         f"tokens (Hessian rank <= {tokens}); {windows_needed(n_in, seq_len, n_out)} windows of "
                         f"{seq_len} would cover it. " + ("The held-out guard keeps round-to-nearest where GPTQ "
                                                          "does worse." if n_out else "The held-out guard is off "
                                                          "(--no-guard): GPTQ's result is kept everywhere."))
    return lines


def calibrate(model_dir: str | Path, ids: torch.Tensor, method: str, cfg: GPTQConfig | AWQConfig, on_linear: OnLinear,
              on_float: OnFloat | None = None, settings: CalibrationSettings = CalibrationSettings(),
              progress: Progress | None = None, pad_to: int | None = None,
              holdout: float | None = None, *, on_restart: OnRestart | None = None,
              check_model: bool = True, transform: LayerTransform | None = None) -> CalibrationReport:
    """Quantize every decoder linear of the checkpoint in ``model_dir`` with calibration tokens ``ids`` [n, t].

    ``method``: ``gptq`` (``cfg`` a GPTQConfig), ``awq`` (an AWQConfig) or ``rtn`` (a GPTQConfig; no statistics,
    the baseline). Results go to ``on_linear(full module name, q)`` layer by layer; AWQ's rescaled norm gains go to
    ``on_float(full tensor name, tensor)``. ``pad_to`` zero-pads every MLP's intermediate size first (Qwen's
    recipe for vLLM tensor parallelism; outputs unchanged). ``holdout``: the fraction of the windows (the last
    ones, at least one) held out for the guard (``qconvert.int4.guard``); None (the driver's default, so the
    algorithms stay exactly the published ones here) turns it off. The product paths (``write_int4``, the ONNX
    export, the release) pass ``DEFAULT_HOLDOUT``.

    With the guard and ``check_model``, the held-out windows also run through the float and the round-to-nearest
    layers, and the guard's last decision is on the final logits (``ModelCheck``). Where the method's model is
    worse, ``on_restart()`` is called (a writer drops what it has) and every linear comes again, now
    round-to-nearest (``baseline``), with the original float tensors for any ``on_float`` had — so a sink that
    cannot take a name twice must pass ``on_restart``.
    ``transform`` edits each float layer as it is loaded (SmoothQuant's folding): the model quantized, checked
    and, on a fallback, rounded is the transformed one.
    Returns what was used (token count, time, the guard's split and choices).
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}.")
    if (method == "awq") != isinstance(cfg, AWQConfig):
        raise CalibrationError(f"method {method!r} takes a {'AWQConfig' if method == 'awq' else 'GPTQConfig'}, "
                               f"not a {type(cfg).__name__}.")
    start = time.perf_counter()
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    spec = spec_for_config(config)
    check_model_scheme(config, spec, cfg.bits, cfg.group_size)
    n_out = holdout_count(ids.shape[0], holdout) if holdout is not None and method != "rtn" else 0
    layer_pass = _QuantizePass(method, cfg, on_linear, on_float, n_out, streams=bool(n_out) and check_model)
    warnings = rank_warnings(config, spec, ids.shape[0] - n_out, ids.shape[1], n_out) if method == "gptq" else []
    ckpt = SafetensorsCheckpoint(model_dir)
    h = stream_layers(ckpt, config, ids, layer_pass,
                      settings, pad_to=pad_to, propagate=method != "rtn", progress=progress, transform=transform)
    kept, check = dict(layer_pass.kept), None
    if layer_pass.streams is not None:
        n_fit = ids.shape[0] - n_out
        check = model_check(ckpt, config, method, h[n_fit:], layer_pass.streams, ids[n_fit:], settings)
        del h, layer_pass.streams
        if check.kept != method:
            if on_restart is not None:
                on_restart()
            again = _QuantizePass("rtn", cfg, on_linear, on_float)
            stream_layers(ckpt, config, ids, again, settings, pad_to=pad_to, propagate=False, transform=transform)
            if layer_pass.float_names:
                assert on_float is not None
                for name in layer_pass.float_names:
                    on_float(name, torch.from_numpy(ckpt.read_f32(name)))
            kept = dict(again.kept)
    return CalibrationReport(ids.shape[0], ids.shape[1], ids.numel(), time.perf_counter() - start, settings.device,
                             str(settings.dtype).removeprefix("torch."), n_out, kept,
                             tuple(warnings), check)
