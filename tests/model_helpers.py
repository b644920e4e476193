"""Helpers for tests on tiny fixtures: whole-model weights in memory, one forward, perplexity, directory digests.

Test support only (product code streams one layer at a time through ``qconvert.calibration``). The forward is a
plain composition of ``qconvert.model.qwen2``'s pieces, so tests can feed it weights that no checkpoint holds
(dequantized linears, rounded copies) and compare against the streamed product paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qconvert.int4 import QuantizedLinear
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.model.dims import Qwen2Dims


def quantized_weights(model_dir: str | Path, linears: Mapping[str, QuantizedLinear],
                      floats: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The whole float model (f32, HF names) with each quantized linear replaced by its dequantized weight."""
    ckpt = SafetensorsCheckpoint(Path(model_dir))
    w = {n: torch.from_numpy(ckpt.read_f32(n)) for n in ckpt.names()}
    for module, q in linears.items():
        w[f"{module}.weight"] = q.dequantize().float().cpu()
    for name, t in (floats or {}).items():
        w[name] = t.float().cpu()
    return w


def forward(weights: Mapping[str, torch.Tensor], ids: torch.Tensor, config: Mapping[str, Any]) -> torch.Tensor:
    """Logits [b, t, vocab] of a whole model held in memory (``weights``: HF names)."""
    dims = Qwen2Dims.from_config(config)
    emb = weights["model.embed_tokens.weight"]
    rope = qwen2.rope_tables(dims, ids.shape[1], emb.device, emb.dtype)
    h = qwen2.embed(emb, ids)
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{i}."
        h = qwen2.decoder_layer({n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)}, h, dims,
                                rope)
    lm = emb if dims.tie_word_embeddings else weights["lm_head.weight"]
    return qwen2.head(weights["model.norm.weight"], lm, h, dims.rms_norm_eps)


def perplexity(weights: Mapping[str, torch.Tensor], config: Mapping[str, Any], ids: torch.Tensor,
               window: int = 256) -> float:
    """exp(mean next-token loss) over non-overlapping ``window``-token chunks of ``ids`` [n_tokens]."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            logits = forward(weights, chunk[:, :-1], config)
            total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def tree_digest(d: Path) -> str:
    """sha256 over every file under ``d`` (names and bytes, sorted): "this directory is untouched" in one value."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(d.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()
