"""The Qwen2.5 family as frozen data: published sizes, their config shapes, and the variants Qwen released.

The *seed table* holds the shape-defining ``config.json`` fields of each size's Instruct checkpoint (the
default variant). Base, Coder and Math checkpoints of the same size share every tensor shape (layers, widths,
heads, vocabulary, tying); they differ only in fields that do not change tensors (Math: 4K context and
``rope_theta`` 1e4). ``tensor_shapes`` turns a config into the GGUF tensor list a Qwen2 checkpoint has, in the
order ``llama-quantize`` writes it (anchor §1.3), so size predictions and dry runs need no weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from qconvert.errors import ModelNotFoundError
from qconvert.names import quantize_order_key


@dataclass(frozen=True)
class Shape:
    """The fields of a Qwen2.5 ``config.json`` that fix its tensor shapes (anchor §1.4)."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0


# size label -> shape of Qwen/Qwen2.5-<size>-Instruct (config.json on the Hub).
SEED_TABLE: MappingProxyType[str, Shape] = MappingProxyType({
    "0.5b": Shape(24, 896, 4864, 14, 2, 151936, True),
    "1.5b": Shape(28, 1536, 8960, 12, 2, 151936, True),
    "3b": Shape(36, 2048, 11008, 16, 2, 151936, True),
    "7b": Shape(28, 3584, 18944, 28, 4, 152064, False),
    "14b": Shape(48, 5120, 13824, 40, 8, 152064, False),
    "32b": Shape(64, 5120, 27648, 40, 8, 152064, False),
    "72b": Shape(80, 8192, 29568, 64, 8, 152064, False),
})
SIZES: tuple[str, ...] = tuple(SEED_TABLE)


@dataclass(frozen=True)
class Variant:
    """A released line of checkpoints: hub id pattern (``{size}`` = "0.5", "7", ...) and the sizes it exists in."""

    hub_pattern: str
    sizes: tuple[str, ...]


_CODER_SIZES = ("0.5b", "1.5b", "3b", "7b", "14b", "32b")
_MATH_SIZES = ("1.5b", "7b", "72b")
VARIANTS: MappingProxyType[str, Variant] = MappingProxyType({
    "instruct": Variant("Qwen/Qwen2.5-{size}B-Instruct", SIZES),
    "base": Variant("Qwen/Qwen2.5-{size}B", SIZES),
    "coder": Variant("Qwen/Qwen2.5-Coder-{size}B", _CODER_SIZES),
    "coder-instruct": Variant("Qwen/Qwen2.5-Coder-{size}B-Instruct", _CODER_SIZES),
    "math": Variant("Qwen/Qwen2.5-Math-{size}B", _MATH_SIZES),
    "math-instruct": Variant("Qwen/Qwen2.5-Math-{size}B-Instruct", _MATH_SIZES),
})
DEFAULT_VARIANT = "instruct"


def _normalize_size(size: str) -> str:
    label = size.strip().lower()
    if not label.endswith("b"):
        label += "b"
    if label not in SEED_TABLE:
        raise ModelNotFoundError(
            f"Qwen2.5 has no {size!r} model; the published sizes are {', '.join(SIZES)}."
        )
    return label


def hub_id(size: str, variant: str = DEFAULT_VARIANT) -> str:
    """Hugging Face repo id of a Qwen2.5 checkpoint: ``hub_id("7b", "coder")`` -> ``"Qwen/Qwen2.5-Coder-7B"``.

    Raises ``ModelNotFoundError`` for a size or variant Qwen never published, listing what exists.
    """
    label = _normalize_size(size)
    spec = VARIANTS.get(variant.strip().lower())
    if spec is None:
        raise ModelNotFoundError(
            f"unknown Qwen2.5 variant {variant!r}; choose one of {', '.join(VARIANTS)}."
        )
    if label not in spec.sizes:
        raise ModelNotFoundError(
            f"Qwen never published a {label} {variant} model: Qwen2.5 {variant} exists only in "
            f"{', '.join(spec.sizes)}. Pick one of those sizes or another variant."
        )
    return spec.hub_pattern.format(size=label[:-1])


def seed_config(size: str) -> dict[str, Any]:
    """A ``config.json``-like dict for the Instruct checkpoint of ``size`` (no weights, no tokenizer).

    Good enough for ``tensor_shapes``, for size predictions and for building tiny test checkpoints that keep
    the real widths; a fresh dict each call, so callers may edit it.
    """
    shape = SEED_TABLE[_normalize_size(size)]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "rope_scaling": None,
        "use_sliding_window": False,
        **asdict(shape),
    }


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and numpy shapes (HF ``[out, in]`` order) of a Qwen2 checkpoint with ``config``.

    Listed in llama-quantize's order: non-block tensors first (by name), then by block number, then by name.
    ``output.weight`` exists only when the embeddings are untied; q/k/v carry biases, o_proj does not.
    """
    n_layer = int(config["num_hidden_layers"])
    h = int(config["hidden_size"])
    ff = int(config["intermediate_size"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config["num_key_value_heads"])
    vocab = int(config["vocab_size"])
    head_dim = int(config.get("head_dim") or h // n_head)
    q_out, kv_out = n_head * head_dim, n_kv * head_dim

    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (vocab, h),
        "output_norm.weight": (h,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["output.weight"] = (vocab, h)
    for i in range(n_layer):
        blk = f"blk.{i}."
        shapes.update({
            blk + "attn_norm.weight": (h,),
            blk + "attn_q.weight": (q_out, h),
            blk + "attn_q.bias": (q_out,),
            blk + "attn_k.weight": (kv_out, h),
            blk + "attn_k.bias": (kv_out,),
            blk + "attn_v.weight": (kv_out, h),
            blk + "attn_v.bias": (kv_out,),
            blk + "attn_output.weight": (h, q_out),
            blk + "ffn_norm.weight": (h,),
            blk + "ffn_gate.weight": (ff, h),
            blk + "ffn_up.weight": (ff, h),
            blk + "ffn_down.weight": (h, ff),
        })
    return sorted(shapes.items(), key=lambda item: quantize_order_key(item[0]))
