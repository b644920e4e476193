"""One registry of supported architectures, keyed on ``config.json["architectures"]``.

Per-model knowledge is a declarative ``ArchSpec``; exporters read the spec, never class names.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from qconvert.errors import CheckpointError, UnsupportedArchitectureError
from qconvert.names import QWEN2_TENSOR_NAMES, NameMap


@dataclass(frozen=True)
class ArchSpec:
    """What qconvert knows about one HF architecture.

    ``gguf_arch`` is the GGUF ``general.architecture``; ``hparam_keys`` maps GGUF hparam key suffixes to
    config.json keys (written as u32 unless listed in ``float_hparams``); ``block_prefix`` and ``sequential``
    describe the decoder blocks for calibration: sub-layer groups in true-sequential order, where the linears of
    one group read the same input tensor (one input site: one Hessian, one importance vector).
    """

    hf_arch: str
    gguf_arch: str
    tensor_names: MappingProxyType[str, str]
    hparam_keys: tuple[tuple[str, str], ...]
    float_hparams: frozenset[str]
    block_prefix: str
    sequential: tuple[tuple[str, ...], ...]
    qkv_bias: bool

    @property
    def name_map(self) -> NameMap:
        return NameMap(self.tensor_names)

    @property
    def input_sites(self) -> MappingProxyType[str, str]:
        """Each calibrated linear (name relative to the block) -> the first linear of its group, which names the
        input site it shares with the rest of the group (q/k/v -> q_proj, gate/up -> gate_proj)."""
        return MappingProxyType({sub: group[0] for group in self.sequential for sub in group})


QWEN2 = ArchSpec(
    hf_arch="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    tensor_names=QWEN2_TENSOR_NAMES,
    # GGUF key suffix (after "qwen2."), config.json key; order = the order llama.cpp's converter writes them.
    hparam_keys=(
        ("block_count", "num_hidden_layers"),
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("rope.freq_base", "rope_theta"),
        ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ),
    float_hparams=frozenset({"rope.freq_base", "attention.layer_norm_rms_epsilon"}),
    block_prefix="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    qkv_bias=True,
)

REGISTRY: MappingProxyType[str, ArchSpec] = MappingProxyType({QWEN2.hf_arch: QWEN2})


def spec_for_config(config: dict[str, Any]) -> ArchSpec:
    """The ``ArchSpec`` for a parsed config.json; a clear error when it names no supported architecture."""
    archs = config.get("architectures")
    supported = ", ".join(sorted(REGISTRY))
    if not archs:
        raise CheckpointError(
            "config.json has no 'architectures' list, so qconvert cannot tell which model this is. "
            f"Add e.g. \"architectures\": [\"Qwen2ForCausalLM\"] to config.json (supported: {supported})."
        )
    for arch in archs:
        if arch in REGISTRY:
            return REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"architecture {archs} is not supported; qconvert supports: {supported}. "
        "Qwen2.5 base/Instruct/Coder/Math checkpoints are all Qwen2ForCausalLM."
    )


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base from either config style: transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``."""
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    raise CheckpointError("config.json has no rope_theta (nor rope_parameters.rope_theta); add the model's RoPE base.")
