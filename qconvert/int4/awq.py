"""AWQ (Lin et al., arXiv 2306.00978) as pure functions: per-channel scale search, clip search, the Qwen2 mappings.

AWQ protects the few input channels with large activations by scaling them up before quantization: for a
mapping ``prev_op → layers`` (e.g. ``input_layernorm → q/k/v``) it multiplies the layers' input columns by
``s f32[in]`` and divides ``prev_op``'s output by ``s``. The function is unchanged in exact arithmetic, but the
quantized weight becomes ``Q(W·s)/s``, whose error on the important channels is smaller.

Search and apply are separate steps, so the scales are an artifact a driver can save and reuse:

* ``search_scales(x, weights, forward, cfg)`` tries ``s = x_mean^α / w_mean^(1-α)`` (AutoAWQ's duo scaling) for
  α on a grid of ``n_grid = 20`` points, and ``s = 1`` (no scaling), replaces each layer weight by ``Q(W·s)/s``
  and calls ``forward(weights) -> output`` (the caller's closure over the cached block inputs that runs the
  mapping's inspect module, e.g. ``self_attn`` for q/k/v); it keeps the candidate with the lowest output MSE
  against ``forward(original weights)``.
* ``apply_scales(prev_weight, prev_bias, layer_weights, s)`` returns the rescaled tensors (an RMSNorm gain or
  the output rows of a previous linear are divided by s; the layers' columns multiplied).
* ``search_clip(x, W, cfg)`` then looks, per (output row, group), for the clipping threshold
  ``max|w|·(1 - i/20)``, i < 10, that minimises the error of the group's partial dot products on 512 sampled
  tokens; ``apply_clip`` clamps. Clip search is skipped for q/k (``QWEN2_NO_CLIP``) as in AutoAWQ: their errors
  are amplified by the softmax and a per-linear loss misjudges them. ``clip_all`` clips them too; on
  Qwen2.5-Coder-0.5B that lowered the KL to the float model by 3% at the same perplexity (README, "Measured").
* ``quantize_awq(W, cfg)`` is then plain group-wise RTN with zero points (the weights have been prepared).

Per decoder layer the driver: caches the inputs of every linear and the layer's attention kwargs; for each
mapping of ``active_mappings(QWEN2_SCALE_MAPPINGS, shapes)`` searches scales (all on the unscaled layer), applies
them, divides the cached inputs of the scaled layers by ``s``; searches and applies clips; quantizes with
``quantize_awq``; runs the quantized layer to get the next layer's inputs. Calibrate in bf16/fp32: Qwen2
overflows fp16 (AutoAWQ #498/#500/#577); everything here is float32.

Sources: llm-awq ``auto_scale.py``/``auto_clip.py`` @ d6e797a, AutoAWQ 0.2.9 ``quantizer.py``/``qwen2.py``
(``reference/gptq-awq-onnx-anchor.md`` §4.2). Two deliberate differences: the quantization grid always contains
0 (``rtn``'s asym convention; AutoAWQ's uses ``[min, max]`` and clamps the zero point); and ``s = 1`` is a
candidate (``keep_identity``). Duo scaling has no α that gives ``s = 1`` (α = 0 is ``1 / w_mean``), so AutoAWQ
must rescale even where that hurts: on a checkpoint whose weights already sit on this quantizer's grid (one
dequantized from a GPTQ/AWQ g128 export) every α moves them off it. With ``s = 1`` in the search, a mapping's
scale-search loss is never above plain zero-point RTN's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from qconvert.errors import QuantTypeError
from qconvert.int4.rtn import QuantizedLinear, check_scheme, fake_quantize_groups, rtn

Forward = Callable[[list[torch.Tensor]], torch.Tensor]  # search_scales always passes a list


@dataclass(frozen=True)
class AWQConfig:
    """AWQ settings; the defaults are AutoAWQ's (4-bit, g128, zero point, GEMM)."""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    n_grid: int = 20
    duo_scaling: bool = True
    max_shrink: float = 0.5
    clip_grid: int = 20
    clip_tokens: int = 512
    clip_batch: int = 64  # output rows per clip-search step: memory ~ batch × tokens × (in / group_size) floats
    search_samples: int = 0  # calibration samples the scale search runs on (0: all); the means use all.
                             # 8 x 512 tokens keeps a CPU run of 0.5B-1.5B in minutes per layer group
    keep_identity: bool = True  # also try s = 1 (no scaling); False = AutoAWQ's search exactly
    clip_all: bool = False  # also clip-search the layers AWQ_TABLES exempts (q/k for Qwen2); False = AutoAWQ

    def __post_init__(self) -> None:
        if self.bits != 4 or not self.zero_point or self.group_size == -1:
            raise QuantTypeError(f"AWQ here writes the GEMM layout: 4-bit, group-wise, with zero points; got "
                                 f"bits={self.bits}, group_size={self.group_size}, zero_point={self.zero_point}. "
                                 "Use GPTQ for other schemes.")
        check_scheme(self.bits, self.group_size, self.group_size, "AWQ")
        if self.search_samples < 0:
            raise QuantTypeError(f"AWQ search_samples {self.search_samples} must be >= 0 (0 = every calibration sample).")


@dataclass(frozen=True)
class ScaleMapping:
    """One AWQ scaling site: ``prev`` feeds every module in ``layers``; ``inspect`` is whose output is compared.

    Names are relative to the decoder layer. ``prev`` is an RMSNorm (1-D gain) or a linear (its output rows are
    scaled). ``same_shape_only``: skip unless ``prev``'s and ``layers[0]``'s weights have equal shapes (v → o:
    with GQA v_proj has fewer outputs than o_proj has inputs, and scaling v's rows cannot reach o's columns).
    """

    prev: str
    layers: tuple[str, ...]
    inspect: str
    same_shape_only: bool = False


QWEN2_SCALE_MAPPINGS: tuple[ScaleMapping, ...] = (
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", same_shape_only=True),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
QWEN2_NO_CLIP: frozenset[str] = frozenset({"self_attn.q_proj", "self_attn.k_proj"})

# config.json "architectures" entry -> (scale mappings, layers exempt from clip search)
AWQ_TABLES: Mapping[str, tuple[tuple[ScaleMapping, ...], frozenset[str]]] = MappingProxyType(
    {"Qwen2ForCausalLM": (QWEN2_SCALE_MAPPINGS, QWEN2_NO_CLIP)})


def active_mappings(mappings: Sequence[ScaleMapping], weight_shapes: Mapping[str, tuple[int, ...]]
                    ) -> tuple[ScaleMapping, ...]:
    """The mappings that apply to a layer whose linear weight shapes are ``{"self_attn.v_proj": (out, in), ...}``."""
    return tuple(m for m in mappings
                 if not m.same_shape_only or tuple(weight_shapes[m.prev]) == tuple(weight_shapes[m.layers[0]]))


@dataclass(frozen=True)
class ScaleSearch:
    """Result of ``search_scales``: the scales f32 [in], the chosen α (None: ``s = 1`` won), the loss of every α
    tried (grid order) and of ``s = 1`` (None when ``keep_identity`` is off)."""

    scales: torch.Tensor
    alpha: float | None
    losses: tuple[float, ...]
    identity_loss: float | None = None


def channel_mean_abs(x: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """``mean |x|`` per input channel of ``x [..., in]`` in float32, in chunks of tokens (x may be bf16)."""
    x = x.reshape(-1, x.shape[-1])
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], chunk):
        total += x[i:i + chunk].float().abs().sum(0)
    return total / x.shape[0]


def weight_mean_rel(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean`` f32 [in]: |w| relative to its group's max, averaged over all rows of all layers."""
    w = torch.cat([t.float() for t in weights], dim=0)
    wg = w.abs().reshape(w.shape[0], -1, group_size)  # [rows, groups, group_size]
    return (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float, duo: bool) -> torch.Tensor:
    """``s(α)`` normalised so that ``max(s)·min(s) = 1`` (keeps the scaled weights' range centred)."""
    s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)) if duo else x_mean.pow(alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_fake_quant(w: torch.Tensor, s: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """``Q(W·s)/s``: what the layer computes on the original inputs once scaled and quantized (f32 [out, in])."""
    return fake_quantize_groups(w.float() * s, cfg.bits, cfg.group_size, sym=False) / s


def search_scales(x: torch.Tensor, weights: Sequence[torch.Tensor], forward: Forward, cfg: AWQConfig = AWQConfig()
                  ) -> ScaleSearch:
    """Grid-search AWQ scales for the layers ``weights`` (each f32 [out_i, in]) that all read input ``x [..., in]``.

    ``forward(ws)`` must return the inspect module's output on the cached block inputs with the layers' weights
    replaced by ``ws`` (same order as ``weights``); it is called ``n_grid + 2`` times (``n_grid + 1`` without
    ``keep_identity``). Ties go to the earlier candidate: ``s = 1`` wins only when strictly better.
    """
    for w in weights:
        check_scheme(cfg.bits, cfg.group_size, w.shape[1], f"AWQ weight {tuple(w.shape)}")
    x_mean = channel_mean_abs(x)
    w_mean = weight_mean_rel(weights, cfg.group_size)
    candidates = [candidate_scales(x_mean, w_mean, i / cfg.n_grid, cfg.duo_scaling) for i in range(cfg.n_grid)]
    if cfg.keep_identity:
        candidates.append(torch.ones_like(x_mean))
    with torch.no_grad():
        reference = forward(list(weights)).float()
        losses: list[float] = []
        for s in candidates:
            out = forward([scaled_fake_quant(w, s, cfg).to(w.dtype) for w in weights]).float()
            losses.append(float((reference - out).pow(2).mean()))
    finite = [(loss, i) for i, loss in enumerate(losses) if math.isfinite(loss)]
    if not finite:
        raise QuantTypeError("AWQ scale search: every candidate gave a NaN/inf loss; the block inputs overflowed. "
                             "Run the calibration forward in bfloat16 or float32.")
    best = min(finite)[1]
    identity_loss = losses.pop() if cfg.keep_identity else None
    return ScaleSearch(candidates[best], best / cfg.n_grid if best < cfg.n_grid else None, tuple(losses),
                       identity_loss)


def apply_scales(prev_weight: torch.Tensor, prev_bias: torch.Tensor | None, layer_weights: Sequence[torch.Tensor],
                 s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Fold ``s`` into a mapping: returns ``(prev_weight', prev_bias', layer_weights')``, function unchanged.

    ``prev_weight``: an RMSNorm gain [in] (divided by s) or a linear weight [out_prev, in_prev] whose last
    ``len(s)`` output rows are divided by s (as is its bias). Each layer weight [out, in] has its columns × s.
    """
    s = s.to(prev_weight.device)
    if prev_weight.ndim == 1:
        new_prev = (prev_weight.float() / s).to(prev_weight.dtype)
    else:
        new_prev = prev_weight.clone()
        new_prev[-s.shape[0]:] = (prev_weight[-s.shape[0]:].float() / s[:, None]).to(prev_weight.dtype)
    new_bias = None
    if prev_bias is not None:
        new_bias = prev_bias.clone()
        new_bias[-s.shape[0]:] = (prev_bias[-s.shape[0]:].float() / s).to(prev_bias.dtype)
    return new_prev, new_bias, [(w.float() * s).to(w.dtype) for w in layer_weights]


def search_clip(x: torch.Tensor, w: torch.Tensor, cfg: AWQConfig = AWQConfig()) -> torch.Tensor:
    """Per-group clipping thresholds f32 [out, groups] for ``w`` f32 [out, in] given its inputs ``x [..., in]``.

    Candidates ``max|w|·(1 - i/clip_grid)`` for ``i < max_shrink·clip_grid``; the loss of a (row, group) is the
    mean over sampled tokens of the squared error of that group's partial dot product, ``(x_g · (Q(w_g) - w_g))²``
    (llm-awq computes the same difference as two broadcast products; a batched matmul is far cheaper).
    """
    out, k = w.shape
    check_scheme(cfg.bits, cfg.group_size, k, f"AWQ weight {tuple(w.shape)}")
    x = x.reshape(-1, k)
    x = x[:: max(1, x.shape[0] // cfg.clip_tokens)][: cfg.clip_tokens].float()
    xg = x.reshape(x.shape[0], -1, cfg.group_size).permute(1, 2, 0)  # [groups, group_size, tokens]
    return torch.cat([_best_clip(xg, w[r:r + cfg.clip_batch].float(), cfg) for r in range(0, out, cfg.clip_batch)])


def _best_clip(xg: torch.Tensor, w: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Best threshold [rows, groups] for the rows ``w`` [rows, in]."""
    rows = w.shape[0]
    wg = w.reshape(rows, xg.shape[0], cfg.group_size)  # [rows, groups, group_size]
    org_max = wg.abs().amax(-1)  # [rows, groups]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for i in range(int(cfg.max_shrink * cfg.clip_grid)):
        max_val = org_max * (1 - i / cfg.clip_grid)
        clipped = torch.maximum(torch.minimum(wg, max_val[..., None]), -max_val[..., None])
        q = fake_quantize_groups(clipped.reshape(rows, -1), cfg.bits, cfg.group_size, sym=False)
        diff = (q.reshape(wg.shape) - wg).transpose(0, 1)  # [groups, rows, group_size]
        err = torch.bmm(diff, xg).pow(2).mean(-1).T  # [groups, rows, tokens] -> [rows, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] clamped to ``±max_val`` [out, groups] group by group."""
    wg = w.reshape(*max_val.shape, -1)
    m = max_val[..., None].to(w.dtype)
    return torch.clamp(wg, -m, m).reshape(w.shape)


def quantize_awq(w: torch.Tensor, cfg: AWQConfig = AWQConfig()) -> QuantizedLinear:
    """Final AWQ quantization of an already scaled (and clipped) weight f32 [out, in]: RTN with zero points."""
    return rtn(w.float(), cfg.bits, cfg.group_size, sym=False)

