"""The config.json numbers a Qwen2 forward needs, read once (torch-free: the ONNX graph builder uses it too)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qconvert.errors import CheckpointError
from qconvert.registry import rope_theta


@dataclass(frozen=True)
class Qwen2Dims:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_positions: int = 32768  # config's max_position_embeddings: rows of the ONNX graph's fused rotary tables

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Qwen2Dims:
        if config.get("rope_scaling"):
            raise CheckpointError("this config has rope_scaling (YaRN); qconvert's Qwen2 forward and ONNX graph "
                                  "implement plain RoPE. Remove rope_scaling from config.json (fine up to 32K "
                                  "tokens) and run again.")
        nh = int(config["num_attention_heads"])
        return cls(int(config["hidden_size"]), int(config["intermediate_size"]), int(config["num_hidden_layers"]), nh,
                   int(config.get("num_key_value_heads", nh)), int(config.get("head_dim") or config["hidden_size"] // nh),
                   int(config["vocab_size"]), float(config["rms_norm_eps"]), rope_theta(dict(config)),
                   bool(config.get("tie_word_embeddings", False)), int(config.get("max_position_embeddings", 32768)))
