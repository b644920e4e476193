"""``ArtifactResult``: what one verification measured, and its JSON form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qconvert.verify.metrics import PositionStats


@dataclass(frozen=True)
class ArtifactResult:
    """One artifact in one runtime against the reference, on the tokens whose sha256 is ``tokens_sha256``.

    ``dppl`` = ppl - ppl_ref, ``dppl_pct`` = 100 (ppl / ppl_ref - 1); KL is KL(reference || artifact) per scored
    token in nats; ``top5`` is the mean overlap of the two top-5 sets; |Δlogit| is taken over the reference's
    top-K tokens of each position. ``bits_per_weight`` counts the stored bits of the decoder-layer matrices (the
    part every format quantizes; embeddings and norms excluded) per weight; ``size_bytes`` is the whole artifact.
    ``tokens_per_s`` is the runtime's forward throughput over all window tokens (load time excluded).
    """

    name: str
    kind: str  # gguf, gptq, awq, onnx, hf
    ppl: float
    ppl_ref: float
    dppl: float
    dppl_pct: float
    kl_mean: float
    kl_p99: float
    top1: float
    top5: float
    max_abs_dlogit: float
    mean_abs_dlogit: float
    bits_per_weight: float
    size_bytes: int
    tokens_per_s: float
    tokens_sha256: str
    runtime: str = ""  # llama.cpp, qconvert-dequant, gptqmodel, onnxruntime, transformers
    format: str = ""  # Q4_K_M, int4-g128, F16, ...
    device: str = "cpu"
    ctx: int = 0
    n_windows: int = 0
    n_scored: int = 0
    n_params: int = 0  # of the reference
    path: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        """How a baseline entry is matched: name and runtime."""
        return f"{self.name} [{self.runtime}]" if self.runtime else self.name

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactResult:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["notes"] = tuple(kw.get("notes", ()))
        return cls(**kw)


def aggregate(stats: list[PositionStats], *, ppl_ref: float, top_k: int, **fields: Any) -> ArtifactResult:
    """Fold the per-window position statistics into one result (means over all scored positions)."""
    cat = {f.name: np.concatenate([getattr(s, f.name) for s in stats]) for f in dataclasses.fields(PositionStats)}
    ppl = math.exp(float(cat["nll"].mean()))
    n = cat["nll"].size
    return ArtifactResult(
        ppl=ppl, ppl_ref=ppl_ref, dppl=ppl - ppl_ref, dppl_pct=100.0 * (ppl / ppl_ref - 1.0),
        kl_mean=float(cat["kl"].mean()), kl_p99=float(np.percentile(cat["kl"], 99)),
        top1=float(cat["top1"].mean()), top5=float(cat["top5"].mean()),
        max_abs_dlogit=float(cat["abs_dlogit_max"].max()),
        mean_abs_dlogit=float(cat["abs_dlogit_sum"].sum() / (n * top_k)), n_scored=n, **fields)
