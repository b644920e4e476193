"""The model-level check of a size budget: is the budget's mixture closer to the float model than the preset's?

The budget (``qconvert.gguf.budget``) ranks types by each matrix's own output error, a proxy blind to what
happens to that error downstream (q_proj's passes a softmax, ffn_down's goes straight into the residual stream).
Measured on the real Qwen2.5 0.5B, the proxy once moved bytes from ffn_down to q/k and made Q3_K_M's budgeted
file worse than Q3_K_M (docs/gguf-optimize.md). So before a budgeted mixture replaces the preset's, both run on
the held-out calibration windows, which the choice never saw:

    per decoder layer (``stream_layers``: one layer in memory)
        each matrix in the preset's type and in the budget's (llama.cpp's encoder with the importance matrix),
        decoded; the held-out hidden states advance through the float layer, the preset's and the budget's
    the final norm and head give three logit sets per window; per position KL(float ‖ mixture) and the
    next-token NLL (``score_against_float``)
    the budget's mixture is kept only where its mean KL is below the preset's and its NLL is not above by more
    than one standard error; otherwise the file is the preset's

Embedding, output projection and norms are float in all three: both files give them the same types.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qconvert.calibration.driver import (
    CalibrationSettings,
    DeviceLayer,
    LayerContext,
    StreamedHead,
    embed_rows,
    read_config,
    stream_layers,
)
from qconvert.constants import GGMLType
from qconvert.errors import CheckpointError
from qconvert.gguf.budget import BudgetChoice, MatrixCosts, anchored, choose, scaled
from qconvert.int4.guard import block_standard_error
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.quant import dequantize_rows, quantize_rows


@dataclass(frozen=True)
class BudgetCheck:
    """The two mixtures on the held-out windows: mean KL to the float model and mean next-token NLL per position;
    ``nll_se`` one standard error of the NLL difference."""

    preset: str
    kl: float
    nll: float
    preset_kl: float
    preset_nll: float
    nll_se: float
    positions: int
    preset_fits: bool = True  # else the budget's mixture is kept whatever the scores
    chosen_by: str = "output error"  # which of the budget's choices was scored (``choose_checked``)

    @property
    def better(self) -> bool:
        """The budget's mixture is kept: lower KL, NLL not worse beyond noise."""
        return self.kl < self.preset_kl and self.nll - self.preset_nll <= self.nll_se

    def summary(self) -> str:
        se = f" ± {self.nll_se:.4f}" if math.isfinite(self.nll_se) else ""
        verdict = (f"{self.preset} does not fit, so the budget's mixture is kept" if not self.preset_fits else
                   "the budget's mixture is kept" if self.better else
                   f"it is not closer to the float model, so the file is {self.preset}'s own")
        return (f"model-level check on {self.positions} held-out positions: budget (by {self.chosen_by}) KL "
                f"{self.kl:.5f} vs {self.preset}'s {self.preset_kl:.5f}, NLL {self.nll - self.preset_nll:+.4f}{se}: "
                f"{verdict}")


class _Mixtures:
    """The layer pass: the held-out windows through each mixture's layers beside the driver's float stream (a
    matrix a mixture does not type stays float); each (matrix, type) is encoded once."""

    def __init__(self, mixtures: Sequence[Mapping[str, GGMLType]], imatrix: Mapping[str, np.ndarray],
                 h0: torch.Tensor | None = None) -> None:
        self.mixtures, self.imatrix = mixtures, imatrix
        self.h0 = h0  # the layer-0 input when the driver runs no float stream (``propagate=False``)
        self.streams: list[torch.Tensor] = []

    def __call__(self, layer: DeviceLayer, h: torch.Tensor, ctx: LayerContext) -> None:
        if not self.streams:
            start = h if self.h0 is None else self.h0
            self.streams = [start.clone() for _ in self.mixtures]
            self.h0 = None
        params = [dict(layer.p) for _ in self.mixtures]
        for key, w in layer.p.items():
            name = ctx.prefix + key
            wanted = {m[name] for m in self.mixtures if name in m}
            if not wanted:
                continue
            W = np.ascontiguousarray(w.float().cpu().numpy())
            decoded = {t: torch.from_numpy(dequantize_rows(t, quantize_rows(t, W, self.imatrix.get(name)), W.shape[1])
                                           .reshape(W.shape)).to(w.device, w.dtype) for t in wanted}
            for p, m in zip(params, self.mixtures):
                if name in m:
                    p[key] = decoded[m[name]]
        self.streams = [ctx.run(p, s) for p, s in zip(params, self.streams)]
        # the driver runs the float layer


def score_mixtures(model_dir: Path, mixtures: Sequence[Mapping[str, GGMLType]], imatrix: Mapping[str, np.ndarray],
                   ids: torch.Tensor, settings: CalibrationSettings = CalibrationSettings(),
                   progress: Callable[[int, int], None] | None = None, float_states: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each mixture's KL to the float model of ``model_dir`` and its next-token NLL on the token windows ``ids``
    [n, t], per window and position 0 .. t-2: float64 [len(mixtures), n, t - 1] each; and the float model's last
    hidden states of the windows [n, t, hidden], which a later call on the same ``ids`` takes as ``float_states``
    instead of running the float layers again.

    A mixture maps checkpoint tensor names (``model.layers.0.mlp.down_proj.weight``) to types, the rest stay
    float; ``imatrix``: checkpoint tensor name -> f32[in] (llama.cpp's encoder uses it where a file would)."""
    from qconvert.calibration.quantize import score_against_float

    config = read_config(Path(model_dir))
    vocab = int(config["vocab_size"])
    if ids.ndim != 2 or ids.shape[1] < 2 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise CheckpointError(f"the held-out token ids in the statistics ({tuple(ids.shape)}, values "
                              f"{int(ids.min())}..{int(ids.max())}) do not fit this model's vocabulary of {vocab}: "
                              "recollect the statistics for this checkpoint (--save-stats).")
    ckpt = SafetensorsCheckpoint(Path(model_dir))
    if float_states is None:
        layer_pass = _Mixtures(mixtures, imatrix)
        ref = stream_layers(ckpt, config, ids, layer_pass, settings, progress=progress)
    else:
        if tuple(float_states.shape[:2]) != tuple(ids.shape):
            raise ValueError("float_states belong to other windows than ids")
        layer_pass = _Mixtures(mixtures, imatrix, embed_rows(ckpt, ids, settings))
        stream_layers(ckpt, config, ids, layer_pass, settings, propagate=False, progress=progress)
        ref = float_states
    kl, nll = score_against_float(StreamedHead(ckpt, config, settings), ref, layer_pass.streams, ids)
    return kl, nll, ref


def check_budget(model_dir: Path, preset: str, preset_types: Mapping[str, GGMLType],
                 budget_types: Mapping[str, GGMLType], imatrix: Mapping[str, np.ndarray], ids: torch.Tensor,
                 settings: CalibrationSettings = CalibrationSettings(),
                 progress: Callable[[int, int], None] | None = None) -> BudgetCheck:
    """Score both mixtures (the same tensor names, see ``score_mixtures``) on the token windows ``ids`` [n, t]."""
    if set(preset_types) != set(budget_types):
        raise ValueError("the two mixtures must type the same tensors")
    kl, nll, _ = score_mixtures(model_dir, [budget_types, preset_types], imatrix, ids, settings, progress)
    return verdict(preset, kl, nll)


def verdict(preset: str, kl: torch.Tensor, nll: torch.Tensor, **more: object) -> BudgetCheck:
    """``BudgetCheck`` of ``score_mixtures``' results for [budget's mixture, preset's]."""
    return BudgetCheck(preset, float(kl[0].mean()), float(nll[0].mean()), float(kl[1].mean()), float(nll[1].mean()),
                       block_standard_error(nll[0] - nll[1]), kl.shape[1] * kl.shape[2], **more)  # type: ignore[arg-type]


def role_of(name: str) -> str:
    """A decoder matrix's role: ``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    m = re.match(r"^.*?\.\d+\.(.+)\.weight$", name)
    return m.group(1) if m else name


@dataclass
class CheckedChoice:
    choice: BudgetChoice  # what the file gets (the preset's own mixture where the check says so)
    check: BudgetCheck | None  # None: the proxy kept the preset's mixture, nothing to check
    role_weights: dict[str, float]  # KL per unit of output error, per role (empty without a check)


def choose_checked(model_dir: Path, preset: str, matrices: Sequence[MatrixCosts], fixed: int, budget: int,
                   preset_fixed: int, checkpoint_name: Mapping[str, str], imatrix: Mapping[str, np.ndarray],
                   ids: torch.Tensor, settings: CalibrationSettings = CalibrationSettings()) -> CheckedChoice:
    """``choose`` with the held-out windows ``ids`` as judge (no check where the proxy keeps the preset's mixture).

    The proxy's costs (each matrix's own output error) do not compare across roles. One pass scores, beside the
    proxy's choice and the preset's mixture, each role alone in its preset types (the rest float): a role's KL over
    its summed output error is its weight, and on the weighted costs (KL units, about additive for small errors)
    ``choose`` runs again, and ``anchored`` (the fewest changes to the preset's mixture). The closest of these
    choices to the float model is checked against the preset (``BudgetCheck.better``), which wins where it fits
    and the choice is not better.

    ``matrices``, ``fixed``, ``preset_fixed``: as ``choose`` takes them (GGUF names); ``checkpoint_name``: GGUF
    name -> checkpoint tensor name; ``imatrix``: by checkpoint tensor name."""
    proxy = choose(matrices, fixed, budget, preset_fixed)
    if proxy.kept_preset:
        return CheckedChoice(proxy, None, {})
    hf = checkpoint_name
    preset_types = {hf[m.name]: m.preset_type for m in matrices}
    roles = sorted({role_of(h) for h in preset_types})
    alone = [{h: t for h, t in preset_types.items() if role_of(h) == r} for r in roles]
    kl, nll, float_states = score_mixtures(model_dir, [{hf[n]: t for n, t in proxy.types.items()}, preset_types,
                                                       *alone], imatrix, ids, settings)
    tiny = 1e-12
    weights = {r: max(float(kl[2 + i].mean()), tiny) /
               max(sum(m.cost[m.preset_type] for m in matrices if role_of(hf[m.name]) == r), tiny)
               for i, r in enumerate(roles)}
    tried = [("output error", proxy, kl[0], nll[0])]
    in_kl = scaled(matrices, lambda n: weights[role_of(hf[n])])
    more: list[tuple[str, BudgetChoice]] = []
    for how, c in (("KL-weighted output error", choose(in_kl, fixed, budget, preset_fixed)),
                   ("KL-weighted steps from the preset", anchored(in_kl, fixed, budget, preset_fixed))):
        if not c.kept_preset and all(c.types != other.types for _, other in [*more, ("", proxy)]):
            more.append((how, c))
    if more:
        kl_m, nll_m, _ = score_mixtures(model_dir, [{hf[n]: t for n, t in c.types.items()} for _, c in more],
                                        imatrix, ids, settings, float_states=float_states)
        tried += [(how, c, kl_m[i], nll_m[i]) for i, (how, c) in enumerate(more)]
    how, best, kl_b, nll_b = min(tried, key=lambda c: float(c[2].mean()))
    fits = proxy.preset_bytes <= budget
    check = verdict(preset, torch.stack([kl_b, kl[1]]), torch.stack([nll_b, nll[1]]), preset_fits=fits,
                    chosen_by=how)
    if fits and not check.better:
        best = replace(proxy, types={m.name: m.preset_type for m in matrices}, total_bytes=proxy.preset_bytes,
                       cost=proxy.preset_cost, kept_preset=True)
    return CheckedChoice(best, check, weights)
