"""A functional Qwen2 forward in torch over HF-named tensors, one piece at a time.

The calibration driver never builds a whole model: it embeds the calibration tokens, then runs one decoder layer
at a time with that layer's weights (names relative to the layer, e.g. ``self_attn.q_proj.weight``), then the
final norm and head. Linear layers are called through ``LayerModules`` so that hooks can observe their inputs.

Numerics: matmuls run in the dtype of the weights and hidden state (float32 or bfloat16 — never float16, which
Qwen2's large activations overflow); RMSNorm and softmax are computed in float32, as in transformers.
Attention is causal over the whole sequence with NEOX-style RoPE (rotate halves) and grouped-query heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from qconvert.model.dims import Qwen2Dims

# A hook sees (sub-layer name relative to the layer, its input [batch, seq, in]) before the linear runs.
LinearHook = Callable[[str, torch.Tensor], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, result in ``x``'s dtype (as transformers' Qwen2RMSNorm)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_tables(dims: Qwen2Dims, seq_len: int, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim] for positions 0..seq_len-1 (NEOX layout: both halves share frequencies)."""
    hd = dims.head_dim
    inv_freq = 1.0 / (dims.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _linear(p: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, hook: LinearHook | None) -> torch.Tensor:
    if hook is not None:
        hook(name, x)
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def attention(p: Mapping[str, torch.Tensor], x: torch.Tensor, dims: Qwen2Dims,
              rope: tuple[torch.Tensor, torch.Tensor], hook: LinearHook | None = None) -> torch.Tensor:
    """Self-attention output [b, t, hidden] (o_proj included) of normed input ``x`` [b, t, hidden]."""
    b, t, _ = x.shape
    nh, nkv, hd = dims.num_heads, dims.num_kv_heads, dims.head_dim
    q = _linear(p, "self_attn.q_proj", x, hook).view(b, t, nh, hd).transpose(1, 2)
    k = _linear(p, "self_attn.k_proj", x, hook).view(b, t, nkv, hd).transpose(1, 2)
    v = _linear(p, "self_attn.v_proj", x, hook).view(b, t, nkv, hd).transpose(1, 2)
    cos, sin = rope[0][:t], rope[1][:t]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)  # query head j uses kv j//g
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [b, nh, t, hd]
    return _linear(p, "self_attn.o_proj", out.transpose(1, 2).reshape(b, t, nh * hd), hook)


def mlp(p: Mapping[str, torch.Tensor], x: torch.Tensor, hook: LinearHook | None = None) -> torch.Tensor:
    """SwiGLU MLP output [b, t, hidden] of normed input ``x``."""
    gate = _linear(p, "mlp.gate_proj", x, hook)
    up = _linear(p, "mlp.up_proj", x, hook)
    return _linear(p, "mlp.down_proj", F.silu(gate) * up, hook)


def decoder_layer(p: Mapping[str, torch.Tensor], h: torch.Tensor, dims: Qwen2Dims,
                  rope: tuple[torch.Tensor, torch.Tensor], hook: LinearHook | None = None) -> torch.Tensor:
    """One Qwen2 decoder layer: ``h`` [b, t, hidden] -> [b, t, hidden]; ``p`` has names relative to the layer."""
    h = h + attention(p, rms_norm(h, p["input_layernorm.weight"], dims.rms_norm_eps), dims, rope, hook)
    return h + mlp(p, rms_norm(h, p["post_attention_layernorm.weight"], dims.rms_norm_eps), hook)


def embed(embed_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Layer-0 input [b, t, hidden] of token ids [b, t]."""
    return F.embedding(ids, embed_tokens)


def head(norm_weight: torch.Tensor, lm_head: torch.Tensor, h: torch.Tensor, eps: float) -> torch.Tensor:
    """Logits [b, t, vocab] (float32) from the last hidden state."""
    return F.linear(rms_norm(h, norm_weight, eps), lm_head).float()
