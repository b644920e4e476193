"""Frozen HF -> GGUF tensor name tables.

One table per GGUF architecture, with ``{bid}`` standing for the decoder block index. The mapping is the one
llama.cpp's converter applies to ``Qwen2ForCausalLM`` (gguf-py ``TensorNameMap`` for ``MODEL_ARCH.QWEN2``).
A checkpoint tensor that matches no entry is an error: nothing is skipped silently.
"""

from __future__ import annotations

import re
from types import MappingProxyType

from qconvert.errors import UnmappedTensorError

# HF name pattern -> GGUF name pattern. Order is irrelevant; every pattern is matched in full.
QWEN2_TENSOR_NAMES: MappingProxyType[str, str] = MappingProxyType({
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
})


class NameMap:
    """Maps checkpoint tensor names to GGUF names with one frozen table; immutable after construction."""

    def __init__(self, table: MappingProxyType[str, str]) -> None:
        compiled = []
        for hf, gguf in table.items():
            pattern = re.escape(hf).replace(re.escape("{bid}"), r"(?P<bid>\d+)")
            compiled.append((re.compile(pattern), gguf))
        self._compiled = tuple(compiled)

    def gguf_name(self, hf_name: str) -> str:
        """GGUF name of ``hf_name``; raises ``UnmappedTensorError`` when the table has no entry."""
        for pattern, gguf in self._compiled:
            m = pattern.fullmatch(hf_name)
            if m:
                return gguf.format(bid=m.group("bid")) if "bid" in pattern.groupindex else gguf
        raise UnmappedTensorError(
            f"tensor {hf_name!r} has no GGUF name for this architecture; qconvert refuses to drop weights silently. "
            "If this checkpoint is a Qwen2ForCausalLM with extra tensors (adapters, vision towers), remove or "
            "merge them before converting."
        )


def block_index(gguf_name: str) -> int:
    """Decoder block of a GGUF tensor name (``blk.7.ffn_up.weight`` -> 7), -1 for non-block tensors."""
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    return int(m.group(1)) if m else -1


def quantize_order_key(gguf_name: str) -> tuple[int, str]:
    """Sort key of llama-quantize's output order: block number first (non-block tensors = -1), then name."""
    return block_index(gguf_name), gguf_name
