"""The Qwen2 decoder as an ONNX graph with a KV cache, built node by node with ``onnx.helper``.

No tracing: the graph follows ``qconvert.model.qwen2`` (the torch reference math) block by block, so it does not
depend on how transformers or torch.onnx spell their caches in a given release. Interface (the onnxruntime-genai
decoder contract, anchor §6.3–6.4)::

    input_ids                 int64 [batch, seq]
    attention_mask            int64 [batch, past + seq]     1 = real token, 0 = padding
    position_ids              int64 [batch, seq]            (plain attention only)
    past_key_values.{i}.key   kv    [batch, kv_heads, past, head_dim]   (and .value; past = 0 on the first call)
    logits                    f32   [batch, seq, vocab]
    present.{i}.key           kv    [batch, kv_heads, past + seq, head_dim]   (and .value)

Two attention graphs (``ATTENTIONS``):

* ``gqa`` (default): onnxruntime's fused ``com.microsoft.GroupQueryAttention`` with the rotary embedding inside
  (NEOX layout, tables of ``max_position_embeddings`` rows as initializers). Its past and present may be one buffer of
  the generation's full length (onnxruntime-genai's ``past_present_share_buffer``) or grow by concatenation, as in
  the plain graph. Positions are the KV buffer's row indices: ``seqlens_k`` is ``total - 1`` for every row and the
  padding is masked by an additive ``attention_bias`` from ``attention_mask``, so a left-padded row sees its tokens
  shifted by its padding length, which RoPE (relative) leaves unchanged. No ``position_ids`` input.
* ``plain``: attention as explicit ops: GQA by broadcasting each kv head over its group of query heads
  (``[b, kv, group, t, d] @ [b, kv, 1, d, s]``), a causal + padding additive mask, and NEOX rotary embeddings
  computed in the graph from ``position_ids`` and ``rope_theta``.

Numerics: the residual stream, RMSNorm and RoPE are float32 in every precision (Qwen2's activations overflow
float16). Linear weights and the KV cache are ``Numerics.weight_type`` (fp32 or fp16; fp16 matmuls take fp16
inputs and their outputs return to fp32); the plain graph's scores and softmax are float32, GroupQueryAttention
runs in the cache's type (fp16 for the fp16 export, as the CUDA EP wants). int4 / int8 linears are ``MatMulNBits``
on float32 activations, and a quantized embedding is ``GatherBlockQuantized`` (its lm_head ``MatMulNBits``; when
tied, the embedding reads the lm_head's initializers through a ``Reshape``). RMSNorm uses the
Pow/ReduceMean/Add/Sqrt/Div/Mul pattern that onnxruntime fuses into ``SimplifiedLayerNormalization``; the gqa graph
writes each residual add and the norm after it as one ``SkipSimplifiedLayerNormalization``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from qconvert.model.dims import Qwen2Dims
from qconvert.onnx_export.matmulnbits import DATA_SHAPES, GATHER, GATHER_AXIS, MATMUL, QUANTIZE_AXIS

OPSET = 21
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10
INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
MASK_MIN = float(np.finfo(np.float32).min)  # additive mask: finite, so fully padded rows give no NaN
GQA, PLAIN = "gqa", "plain"
ATTENTIONS = {GQA: "GroupQueryAttention (fused, rotary inside)", PLAIN: "explicit MatMul / Softmax ops"}
DEFAULT_ATTENTION = GQA
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)


Dims = Qwen2Dims  # the config numbers the graph needs (shared with qconvert's torch forward)


@dataclass(frozen=True)
class FloatLinear:
    """A float linear: weight initializer [K, N] in the weight type."""

    weight: str


@dataclass(frozen=True)
class QuantLinear:
    """A MatMulNBits linear: initializer names and attributes (B [N, K/bs, bs·bits/8], scales [N, K/bs])."""

    b: str
    scales: str
    zero_points: str | None
    n: int
    k: int
    block_size: int
    bits: int


@dataclass(frozen=True)
class QuantEmbedding:
    """A GatherBlockQuantized table [vocab, hidden]: data uint8 [vocab, hidden·bits/8], scales [vocab, hidden/bs].

    ``tied``: ``data`` is the lm_head's MatMulNBits ``B [vocab, hidden/bs, bs/2]`` (same bytes), reshaped in the
    graph. Neither op takes the other's data shape (MatMulNBits checks its B against N/K/block_size when it
    prepacks; GatherBlockQuantized needs scales of the data's rank), so one initializer serves both only through a
    Reshape, which onnxruntime folds at load.
    """

    data: str
    scales: str
    zero_points: str | None
    vocab: int
    hidden: int
    block_size: int
    bits: int
    tied: bool


class WeightSource(Protocol):
    """Where the graph gets its initializers (``export.Weights``): names of already stored tensors."""

    weight_type: np.dtype
    accuracy_level: int

    def linear(self, module: str) -> FloatLinear | QuantLinear: ...
    def qkv(self, prefix: str) -> FloatLinear | QuantLinear | None: ...
    def bias(self, module: str) -> str | None: ...
    def norm(self, name: str) -> str: ...
    def embedding(self) -> str | QuantEmbedding: ...
    def lm_head(self) -> str | QuantLinear: ...
    def const(self, name: str, value: np.ndarray) -> str: ...


class Graph:
    """A growing node list with unique node and value names."""

    def __init__(self, weights: WeightSource) -> None:
        self.w = weights
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], scope: str, *, outputs: int | list[str] = 1, domain: str = "",
           **attrs: Any) -> Any:
        """Append a node; returns its output name (or the list of names when ``outputs`` > 1 or is a list)."""
        self.count += 1
        name = f"{scope}/{op_type}_{self.count}"
        names = outputs if isinstance(outputs, list) else [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=name, domain=domain, **attrs))
        return names[0] if outputs == 1 or (isinstance(outputs, list) and len(outputs) == 1) else names

    def cast(self, x: str, dtype: np.dtype, src: np.dtype, scope: str) -> str:
        """``x`` in ``dtype`` (no node when it already is)."""
        if np.dtype(dtype) == np.dtype(src):
            return x
        return self.op("Cast", [x], scope, to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def ints(self, *values: int) -> str:
        return self.w.const(f"const/i64_{'_'.join(str(v).replace('-', 'm') for v in values)}",
                            np.array(values, np.int64))

    def scalar(self, value: float, dtype: np.dtype = F32) -> str:
        tag = str(value).replace("-", "m").replace(".", "p").replace("+", "")
        return self.w.const(f"const/{np.dtype(dtype).name}_{tag}", np.array(value, dtype))


# ------------------------------------------------------------------------------------------------------------
# Blocks


def matmul_nbits(g: Graph, ref: QuantLinear, x: str, scope: str, outputs: int | list[str] = 1) -> str:
    """``x`` f32 [..., K] -> f32 [..., N] = ``x · dequant(B)ᵀ`` (com.microsoft.MatMulNBits, 4- or 8-bit)."""
    inputs = [x, ref.b, ref.scales] + ([ref.zero_points] if ref.zero_points else [])
    return g.op(MATMUL, inputs, scope, outputs=outputs, domain=MS_DOMAIN, K=ref.k, N=ref.n, bits=ref.bits,
                block_size=ref.block_size, accuracy_level=g.w.accuracy_level)


def linear(g: Graph, module: str, x: str, ref: FloatLinear | QuantLinear | None = None) -> str:
    """``x`` f32 [b, t, K] -> f32 [b, t, N] through the float or MatMulNBits weight of ``module`` (+ bias)."""
    ref = g.w.linear(module) if ref is None else ref
    if isinstance(ref, QuantLinear):
        y = matmul_nbits(g, ref, x, module)
    else:
        wt = g.w.weight_type
        y = g.cast(g.op("MatMul", [g.cast(x, wt, F32, module), ref.weight], module), F32, wt, module)
    bias = g.w.bias(module)
    return y if bias is None else g.op("Add", [y, bias], module)


def qkv_projections(g: Graph, dims: Dims, p: str, x: str, split: bool) -> list[str]:
    """q, k, v f32 [b, t, heads·head_dim] of attention block ``p``: one linear on the packed q/k/v weight when the
    weights allow it (``[qkv]``, or Split into three when ``split``), else three linears."""
    packed = g.w.qkv(p)
    if packed is None:
        return [linear(g, f"{p}.{m}_proj", x) for m in "qkv"]
    qkv = linear(g, f"{p}.qkv_proj", x, packed)
    if not split:
        return [qkv]
    sizes = g.ints(dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim)
    return g.op("Split", [qkv, sizes], p, outputs=3, axis=-1)


def rms_norm(g: Graph, x: str, weight: str, eps: float, scope: str) -> str:
    """``weight * x / sqrt(mean(x²) + eps)`` over the last axis, float32."""
    var = g.op("ReduceMean", [g.op("Pow", [x, g.scalar(2.0)], scope), g.ints(-1)], scope, keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [var, g.scalar(eps)], scope)], scope)
    return g.op("Mul", [g.op("Div", [x, rms], scope), weight], scope)


def rotary_frequencies(dims: Dims) -> np.ndarray:
    """RoPE's inverse frequencies f32 [head_dim / 2], computed in float32 as both graphs use them."""
    hd = dims.head_dim
    return (1.0 / (np.float32(dims.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)


def rotary_tables(g: Graph, dims: Dims) -> tuple[str, str]:
    """cos, sin f32 [b, t, 1, head_dim] of ``position_ids`` (NEOX layout: both halves share frequencies)."""
    s = "/rotary"
    inv_freq = rotary_frequencies(dims)
    pos = g.op("Unsqueeze", [g.op("Cast", [POSITION_IDS], s, to=TensorProto.FLOAT), g.ints(-1)], s)  # [b, t, 1]
    freqs = g.op("Mul", [pos, g.w.const("rotary/inv_freq", inv_freq.astype(np.float32))], s)  # [b, t, hd/2]
    angles = g.op("Concat", [freqs, freqs], s, axis=-1)
    return tuple(g.op("Unsqueeze", [g.op(fn, [angles], s), g.ints(2)], s) for fn in ("Cos", "Sin"))


def apply_rotary(g: Graph, x: str, rope: tuple[str, str], scope: str) -> str:
    """``x * cos + rotate_half(x) * sin`` for ``x`` f32 [b, t, heads, head_dim]."""
    x1, x2 = g.op("Split", [x], scope, outputs=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, rope[0]], scope), g.op("Mul", [rotated, rope[1]], scope)], scope)


def attention_bias(g: Graph) -> str:
    """Additive mask f32 [b, 1, 1, t, past + t]: 0 where query i may see key j (causal and not padding), else min."""
    s = "/mask"
    seq = g.op("Gather", [g.op("Shape", [INPUT_IDS], s), g.scalar(1, np.dtype(np.int64))], s, axis=0)
    total = g.op("Gather", [g.op("Shape", [ATTENTION_MASK], s), g.scalar(1, np.dtype(np.int64))], s, axis=0)
    one = g.scalar(1, np.dtype(np.int64))
    keys = g.op("Range", [g.scalar(0, np.dtype(np.int64)), total, one], s)  # [S]
    queries = g.op("Range", [g.op("Sub", [total, seq], s), total, one], s)  # absolute positions [T]
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [keys, g.ints(0)], s), g.op("Unsqueeze", [queries, g.ints(1)], s)], s)
    real = g.op("Unsqueeze", [g.op("Cast", [ATTENTION_MASK], s, to=TensorProto.BOOL), g.ints(1, 2, 3)], s)
    return g.op("Where", [g.op("And", [causal, real], s), g.scalar(0.0), g.scalar(MASK_MIN)], s)


def attention(g: Graph, dims: Dims, layer: int, x: str, rope: tuple[str, str], mask: str) -> str:
    """Self-attention of normed ``x`` f32 [b, t, hidden] with the layer's KV cache; o_proj included."""
    p = f"model.layers.{layer}.self_attn"
    nh, kv, hd, kv_type = dims.num_heads, dims.num_kv_heads, dims.head_dim, g.w.weight_type
    group = nh // kv
    q, k, v = qkv_projections(g, dims, p, x, split=True)
    q = apply_rotary(g, g.op("Reshape", [q, g.ints(0, 0, nh, hd)], p), rope, p)
    k = apply_rotary(g, g.op("Reshape", [k, g.ints(0, 0, kv, hd)], p), rope, p)
    v = g.op("Reshape", [v, g.ints(0, 0, kv, hd)], p)
    present = []
    for new, past, out in ((k, PAST_KEY, PRESENT_KEY), (v, PAST_VALUE, PRESENT_VALUE)):
        new = g.cast(g.op("Transpose", [new], p, perm=[0, 2, 1, 3]), kv_type, F32, p)  # [b, kv, t, hd]
        cache = g.op("Concat", [past % layer, new], p, outputs=[out % layer], axis=2)  # [b, kv, s, hd]
        present.append(g.op("Unsqueeze", [g.cast(cache, F32, kv_type, p), g.ints(2)], p))  # [b, kv, 1, s, hd]
    q = g.op("Transpose", [g.op("Reshape", [q, g.ints(0, 0, kv, group, hd)], p)], p, perm=[0, 2, 3, 1, 4])
    keys_t = g.op("Transpose", [present[0]], p, perm=[0, 1, 2, 4, 3])  # [b, kv, 1, hd, s]
    scores = g.op("Mul", [g.op("MatMul", [q, keys_t], p), g.scalar(float(np.float32(hd ** -0.5)))], p)
    probs = g.op("Softmax", [g.op("Add", [scores, mask], p)], p, axis=-1)  # [b, kv, group, t, s]
    out = g.op("Transpose", [g.op("MatMul", [probs, present[1]], p)], p, perm=[0, 3, 1, 2, 4])  # [b, t, kv, group, hd]
    return linear(g, f"{p}.o_proj", g.op("Reshape", [out, g.ints(0, 0, nh * hd)], p))


@dataclass(frozen=True)
class FusedInputs:
    """The per-model tensors every GroupQueryAttention node reads."""

    seqlens_k: str  # int32 [b]: total - 1 (row index of the newest key)
    total: str  # int32 scalar: attention_mask's width
    cos: str  # [max_positions, head_dim / 2] in the cache type
    sin: str
    bias: str  # [b, 1, t, total] in the cache type: 0 for real keys, the type's minimum for padding


def fused_inputs(g: Graph, dims: Dims) -> FusedInputs:
    """Sequence lengths, rotary tables and the padding bias from ``attention_mask`` (module docstring: why
    ``total - 1`` for every row)."""
    s, at = "/gqa", g.w.weight_type
    ids_shape = g.op("Shape", [INPUT_IDS], s)
    batch = g.op("Gather", [ids_shape, g.ints(0)], s, axis=0)  # [1]
    seq = g.op("Gather", [ids_shape, g.ints(1)], s, axis=0)
    total = g.op("Gather", [g.op("Shape", [ATTENTION_MASK], s), g.ints(1)], s, axis=0)
    last = g.op("Expand", [g.op("Sub", [total, g.ints(1)], s), batch], s)
    keys = g.op("Unsqueeze", [g.op("Cast", [ATTENTION_MASK], s, to=TensorProto.BOOL), g.ints(1, 2)], s)
    hidden = g.op("Where", [keys, g.scalar(0.0, at), g.scalar(float(np.finfo(at).min), at)], s)  # [b, 1, 1, total]
    bias = g.op("Expand", [hidden, g.op("Concat", [batch, g.ints(1), seq, total], s, axis=0)], s)
    angles = np.arange(dims.max_positions, dtype=np.float32)[:, None] * rotary_frequencies(dims)[None]
    return FusedInputs(g.op("Cast", [last], s, to=TensorProto.INT32),
                       g.op("Cast", [g.op("Squeeze", [total, g.ints(0)], s)], s, to=TensorProto.INT32),
                       g.w.const("rotary/cos_cache", np.cos(angles).astype(at)),
                       g.w.const("rotary/sin_cache", np.sin(angles).astype(at)), bias)


def fused_attention(g: Graph, dims: Dims, layer: int, x: str, fused: FusedInputs) -> str:
    """Self-attention of normed ``x`` f32 [b, t, hidden] through one GroupQueryAttention node (q, k, v packed in its
    query input when they come from one linear); o_proj included."""
    p = f"model.layers.{layer}.self_attn"
    at = g.w.weight_type
    qkv = [g.cast(t, at, F32, p) for t in qkv_projections(g, dims, p, x, split=False)]
    qkv += [""] * (3 - len(qkv))
    out = g.op("GroupQueryAttention", [*qkv, PAST_KEY % layer, PAST_VALUE % layer, fused.seqlens_k, fused.total,
                                       fused.cos, fused.sin, "", fused.bias], p,
               outputs=[f"{p}/attention_out", PRESENT_KEY % layer, PRESENT_VALUE % layer], domain=MS_DOMAIN,
               num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads, scale=float(np.float32(dims.head_dim ** -0.5)),
               do_rotary=1, rotary_interleaved=0)[0]
    return linear(g, f"{p}.o_proj", g.cast(out, F32, at, p))


def mlp(g: Graph, layer: int, x: str) -> str:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""
    p = f"model.layers.{layer}.mlp"
    gate = linear(g, f"{p}.gate_proj", x)
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], p)], p)
    return linear(g, f"{p}.down_proj", g.op("Mul", [act, linear(g, f"{p}.up_proj", x)], p))


def residual_norm(g: Graph, h: str, delta: str | None, norm: str, eps: float, fused: bool) -> tuple[str, str]:
    """(RMSNorm of ``h + delta`` with weight ``norm``, ``h + delta``); ``delta`` None: nothing to add. ``fused``:
    one com.microsoft.SkipSimplifiedLayerNormalization (what onnxruntime's own Add + norm fusion would give, written
    directly); else Add and the standard-op RMSNorm."""
    scope = norm.removesuffix(".weight")
    weight = g.w.norm(norm)
    if delta is None:
        return rms_norm(g, h, weight, eps, scope), h
    if not fused:
        h = g.op("Add", [h, delta], scope)
        return rms_norm(g, h, weight, eps, scope), h
    normed, total = f"{scope}/normed", f"{scope}/residual"
    g.op("SkipSimplifiedLayerNormalization", [h, delta, weight], scope, outputs=[normed, "", "", total],
         domain=MS_DOMAIN, epsilon=float(eps))
    return normed, total


def decoder_layer(g: Graph, dims: Dims, layer: int, h: str, pending: str | None, attend: Callable[[int, str], str],
                  fused: bool) -> tuple[str, str]:
    """One layer: ``h`` f32 [b, t, hidden] is the residual stream before the previous block's output ``pending`` is
    added (None before layer 0); returns (the stream, this layer's MLP output still to add). ``attend(layer, normed)``
    is the attention block."""
    p = f"model.layers.{layer}"
    eps = dims.rms_norm_eps
    normed, h = residual_norm(g, h, pending, f"{p}.input_layernorm.weight", eps, fused)
    normed, h = residual_norm(g, h, attend(layer, normed), f"{p}.post_attention_layernorm.weight", eps, fused)
    return h, mlp(g, layer, normed)


def embed(g: Graph) -> str:
    """Layer-0 input f32 [b, t, hidden]: Gather on the float table, or GatherBlockQuantized on the quantized one."""
    s, ref = "/embed", g.w.embedding()
    if not isinstance(ref, QuantEmbedding):
        return g.cast(g.op("Gather", [ref, INPUT_IDS], s, axis=0), F32, g.w.weight_type, s)
    shape = DATA_SHAPES[GATHER](ref.vocab, ref.hidden, ref.block_size, ref.bits)
    data = g.op("Reshape", [ref.data, g.ints(*shape)], s) if ref.tied else ref.data
    inputs = [data, INPUT_IDS, ref.scales] + ([ref.zero_points] if ref.zero_points else [])
    return g.op(GATHER, inputs, s, domain=MS_DOMAIN, bits=ref.bits, block_size=ref.block_size, gather_axis=GATHER_AXIS,
                quantize_axis=QUANTIZE_AXIS)  # the output has the scales' type: float32


def lm_head(g: Graph, dims: Dims, x: str) -> str:
    """f32 logits [b, t, vocab] of the final-normed ``x``: MatMulNBits on the quantized [vocab, hidden] weight, or
    Gemm(x, W, transB) on the float one; when tied that weight is the embedding's (one initializer serves both ops)."""
    s, wt = "/lm_head", g.w.weight_type
    head = g.w.lm_head()
    if isinstance(head, QuantLinear):
        return matmul_nbits(g, head, x, s, outputs=[LOGITS])
    rows = g.op("Reshape", [g.cast(x, wt, F32, s), g.ints(-1, dims.hidden_size)], s)
    y = g.cast(g.op("Gemm", [rows, head], s, transB=1), F32, wt, s)
    shape = g.op("Concat", [g.op("Slice", [g.op("Shape", [x], s), g.ints(0), g.ints(2)], s), g.ints(dims.vocab_size)],
                 s, axis=0)
    return g.op("Reshape", [y, shape], s, outputs=[LOGITS])


# ------------------------------------------------------------------------------------------------------------
# The model


def _io(dims: Dims, kv_type: np.dtype, position_ids: bool
        ) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    kv = helper.np_dtype_to_tensor_dtype(np.dtype(kv_type))
    i64 = TensorProto.INT64
    inputs = [helper.make_tensor_value_info(INPUT_IDS, i64, ["batch", "sequence"]),
              helper.make_tensor_value_info(ATTENTION_MASK, i64, ["batch", "total_sequence"])]
    if position_ids:
        inputs.append(helper.make_tensor_value_info(POSITION_IDS, i64, ["batch", "sequence"]))
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", "sequence", dims.vocab_size])]
    shape_past: list[str | int] = ["batch", dims.num_kv_heads, "past_sequence", dims.head_dim]
    shape_present: list[str | int] = ["batch", dims.num_kv_heads, "total_sequence", dims.head_dim]
    for i in range(dims.num_layers):
        for past, present in ((PAST_KEY, PRESENT_KEY), (PAST_VALUE, PRESENT_VALUE)):
            inputs.append(helper.make_tensor_value_info(past % i, kv, shape_past))
            outputs.append(helper.make_tensor_value_info(present % i, kv, shape_present))
    return inputs, outputs


def build_model(dims: Dims, weights: WeightSource, progress: Any = None,
                metadata: Mapping[str, str] | None = None, attention_kind: str = DEFAULT_ATTENTION) -> onnx.ModelProto:
    """The whole decoder graph; initializers are requested from ``weights`` block by block (streaming order).

    ``attention_kind``: ``gqa`` or ``plain`` (module docstring). ``progress(done, n_layers)`` is called after each
    decoder layer. Initializers are attached by the caller (``InitializerStore.save``).
    """
    if attention_kind not in ATTENTIONS:
        raise ValueError(f"attention {attention_kind!r}: use one of {', '.join(ATTENTIONS)}")
    g = Graph(weights)
    h = embed(g)
    attend: Callable[[int, str], str]
    if attention_kind == GQA:
        fused = fused_inputs(g, dims)
        attend = lambda layer, x: fused_attention(g, dims, layer, x, fused)
    else:
        rope, mask = rotary_tables(g, dims), attention_bias(g)
        attend = lambda layer, x: attention(g, dims, layer, x, rope, mask)
    fused_norms = attention_kind == GQA  # the plain graph keeps to standard ops (+ MatMulNBits for int4/int8)
    pending: str | None = None
    for i in range(dims.num_layers):
        h, pending = decoder_layer(g, dims, i, h, pending, attend, fused_norms)
        if progress is not None:
            progress(i + 1, dims.num_layers)
    lm_head(g, dims, residual_norm(g, h, pending, "model.norm.weight", dims.rms_norm_eps, fused_norms)[0])
    inputs, outputs = _io(dims, weights.weight_type, position_ids=attention_kind == PLAIN)
    graph = helper.make_graph(g.nodes, "qwen2", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                              producer_name="qconvert")
    model.ir_version = IR_VERSION
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model
