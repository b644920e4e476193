"""``qconvert gguf --target-size GB`` / ``--target-bpw X``: each matrix's type chosen to fit a file size.

    start: the preset's plan (llama-quantize's mixture); the tensors without calibration statistics (embedding,
           output, norms) keep their types and count as fixed bytes
    measure, per decoder matrix W and candidate type t (the K-quant ladder Q2_K … Q6_K, Q8_0, or, for rows that
           are not a multiple of 256, llama.cpp's 32-block fallbacks Q4_0 … Q8_0; and the preset's own type):
               cost(W, t) = tr(ΔW H ΔWᵀ)   the output error of llama.cpp's encoding (with the importance matrix)
                                           on the calibration tokens behind H (``reconstruction_error``)
    choose: the multiple-choice knapsack by the greedy on each matrix's lower convex hull of (bytes, cost):
            every matrix starts at its cheapest candidate, then the step with the largest cost saved per byte is
            taken while the file still fits; the preset's own assignment competes too (where it fits, the
            lower total cost wins), so a budget equal to the preset's size can only match or beat it on the proxy
    result: per-tensor types (``--tensor-type``-style exact overrides), the predicted file size, the plan

The cost compares within a role but not across roles (q_proj's error passes a softmax, ffn_down's enters the
residual stream as it is): with held-out windows in the statistics, ``qconvert.gguf.budget_check`` weights each
role by its measured KL per unit of cost (``scaled``), chooses again, and keeps a choice only if the whole model
is closer to the float one there than with the preset's mixture.

Pure planning: no tensor is written here. ``qconvert.gguf.export`` writes the file from the overrides.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qconvert.constants import GGMLType
from qconvert.errors import UsageError
from qconvert.quant import dequantize_rows, quantize_rows

K_LADDER = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0)
BLOCK32_LADDER = (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0)


def candidates(cols: int) -> tuple[GGMLType, ...]:
    """The types a matrix with rows of ``cols`` weights can take (llama.cpp's fallbacks when 256 does not divide)."""
    return K_LADDER if cols % 256 == 0 else BLOCK32_LADDER


@dataclass(frozen=True)
class MatrixCosts:
    """One matrix's candidates: bytes (with the file's alignment padding) and cost per type."""

    name: str
    preset_type: GGMLType
    nbytes: Mapping[GGMLType, int]
    cost: Mapping[GGMLType, float]


def aligned(n: int, alignment: int = 32) -> int:
    return -(-n // alignment) * alignment


def measure(name: str, W: np.ndarray, H: torch.Tensor, preset_type: GGMLType, imatrix: np.ndarray | None = None
            ) -> MatrixCosts:
    """Encode ``W`` f32[rows, cols] in every candidate type and in the preset's own (an I-quant preset's IQ3_S,
    say; llama.cpp's encoder) and score each on ``H``."""
    from qconvert.int4.guard import reconstruction_error

    cols = W.shape[1]
    Wt = torch.from_numpy(W)
    nbytes, cost = {}, {}
    for t in dict.fromkeys((*candidates(cols), preset_type)):
        data = quantize_rows(t, W, imatrix)
        nbytes[t] = aligned(data.nbytes)
        cost[t] = reconstruction_error(Wt, torch.from_numpy(dequantize_rows(t, data, cols)), H)
    return MatrixCosts(name, preset_type, nbytes, cost)


@dataclass
class BudgetChoice:
    """The types chosen, what they cost, and the preset's assignment for comparison."""

    types: dict[str, GGMLType]
    total_bytes: int  # the predicted file size
    cost: float
    preset_cost: float
    preset_bytes: int
    kept_preset: bool  # the preset's own assignment was at least as good and fit
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> tuple[tuple[str, GGMLType], ...]:
        """Exact-name ``--tensor-type`` overrides for ``PlanOptions.tensor_types``."""
        return tuple((f"^{re.escape(name)}$", t) for name, t in self.types.items())


def _hull(m: MatrixCosts) -> list[GGMLType]:
    """The candidates on the lower convex hull of (bytes, cost), cheapest first: the greedy's steps."""
    pts = sorted(m.nbytes, key=lambda t: (m.nbytes[t], m.cost[t]))
    hull: list[GGMLType] = []
    for t in pts:
        if hull and m.cost[t] >= m.cost[hull[-1]]:
            continue  # more bytes for no less error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # slope a->b must save more per byte than b->t, else b is not on the hull
            s_ab = (m.cost[a] - m.cost[b]) / (m.nbytes[b] - m.nbytes[a])
            s_bt = (m.cost[b] - m.cost[t]) / (m.nbytes[t] - m.nbytes[b])
            if s_ab > s_bt:
                break
            hull.pop()
        hull.append(t)
    return hull


def choose(matrices: Sequence[MatrixCosts], fixed_bytes: int, budget: int, preset_fixed: int | None = None
           ) -> BudgetChoice:
    """Types for ``matrices`` so that ``fixed_bytes`` + their bytes <= ``budget`` with the least total cost.

    ``preset_fixed``: the fixed bytes when the preset's own mixture is written (its file needs no budget record,
    so its header is smaller); default ``fixed_bytes``.

    Raises ``UsageError`` naming the possible range when no assignment fits or the budget exceeds the largest file.
    """
    _in_range(matrices, fixed_bytes, budget)
    hulls = {m.name: _hull(m) for m in matrices}
    pos = {m.name: 0 for m in matrices}
    by_name = {m.name: m for m in matrices}
    used = fixed_bytes + sum(by_name[n].nbytes[h[0]] for n, h in hulls.items())
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i, m = hulls[name], pos[name], by_name[name]
        if i + 1 < len(h):
            saved = (m.cost[h[i]] - m.cost[h[i + 1]]) / (m.nbytes[h[i + 1]] - m.nbytes[h[i]])
            heapq.heappush(heap, (-saved, name))

    for name in sorted(hulls):
        push(name)
    skipped: list[str] = []
    while heap:
        _, name = heapq.heappop(heap)
        h, i, m = hulls[name], pos[name], by_name[name]
        extra = m.nbytes[h[i + 1]] - m.nbytes[h[i]]
        if used + extra > budget:
            skipped.append(name)  # this step does not fit; a smaller step elsewhere still may
            continue
        used += extra
        pos[name] = i + 1
        push(name)
    types = {n: hulls[n][pos[n]] for n in hulls}
    # fill what is left with any single non-hull step that fits and helps (the hull greedy can stop short)
    for name in sorted(skipped):
        m = by_name[name]
        best = min((t for t in m.nbytes if used - m.nbytes[types[name]] + m.nbytes[t] <= budget),
                   key=lambda t: m.cost[t])
        used += m.nbytes[best] - m.nbytes[types[name]]
        types[name] = best
    cost = sum(by_name[n].cost[t] for n, t in types.items())
    preset_bytes = (fixed_bytes if preset_fixed is None else preset_fixed) + \
        sum(m.nbytes[m.preset_type] for m in matrices)
    preset_cost = sum(m.cost[m.preset_type] for m in matrices)
    kept_preset = preset_bytes <= budget and preset_cost <= cost
    if kept_preset:
        types, used, cost = {m.name: m.preset_type for m in matrices}, preset_bytes, preset_cost
    return BudgetChoice(types, used, cost, preset_cost, preset_bytes, kept_preset)


def _in_range(matrices: Sequence[MatrixCosts], fixed_bytes: int, budget: int) -> None:
    smallest = fixed_bytes + sum(min(m.nbytes.values()) for m in matrices)
    largest = fixed_bytes + sum(max(m.nbytes.values()) for m in matrices)
    if budget < smallest or budget > largest:
        raise UsageError(f"a file of {budget / 1e6:.2f} MB is not possible for this model: with these candidate "
                         f"types files range from {smallest / 1e6:.2f} MB to {largest / 1e6:.2f} MB "
                         f"({'raise' if budget < smallest else 'lower'} --target-size / --target-bpw).")


def anchored(matrices: Sequence[MatrixCosts], fixed_bytes: int, budget: int, preset_fixed: int | None = None
             ) -> BudgetChoice:
    """The smallest departure from the preset's mixture that fits ``budget``: from the preset's types, the
    downgrades that cost least per byte freed until the file fits, then the upgrades that save most per byte
    while it still fits. Arguments as ``choose``'s; ``kept_preset`` where no type changed and the preset fits."""
    _in_range(matrices, fixed_bytes, budget)
    types = {m.name: m.preset_type for m in matrices}
    used = fixed_bytes + sum(m.nbytes[m.preset_type] for m in matrices)

    def best_step(up: bool) -> tuple[str, GGMLType] | None:
        best: tuple[float, str, GGMLType] | None = None
        for m in matrices:
            cur = types[m.name]
            for t in m.nbytes:
                delta = m.nbytes[t] - m.nbytes[cur]
                if up and delta > 0 and used + delta <= budget and m.cost[t] < m.cost[cur]:
                    rate = (m.cost[t] - m.cost[cur]) / delta  # negative: cost saved per byte spent
                elif not up and delta < 0:
                    rate = (m.cost[t] - m.cost[cur]) / -delta  # cost added per byte freed
                else:
                    continue
                if best is None or rate < best[0]:
                    best = (rate, m.name, t)
        return None if best is None else (best[1], best[2])

    by_name = {m.name: m for m in matrices}

    def take(step: tuple[str, GGMLType] | None) -> None:
        nonlocal used
        assert step is not None  # the budget is in range: downgrades always reach it
        name, t = step
        used += by_name[name].nbytes[t] - by_name[name].nbytes[types[name]]
        types[name] = t

    while used > budget:
        take(best_step(up=False))
    while (step := best_step(up=True)) is not None:
        take(step)
    preset_bytes = (fixed_bytes if preset_fixed is None else preset_fixed) + \
        sum(m.nbytes[m.preset_type] for m in matrices)
    preset_cost = sum(m.cost[m.preset_type] for m in matrices)
    same = all(types[m.name] == m.preset_type for m in matrices) and preset_bytes <= budget
    if same:
        used = preset_bytes
    return BudgetChoice(types, used, sum(m.cost[types[m.name]] for m in matrices), preset_cost, preset_bytes, same)


def scaled(matrices: Sequence[MatrixCosts], weight: Callable[[str], float]) -> list[MatrixCosts]:
    """The same candidates with each matrix's costs multiplied by ``weight(name)`` (a role's KL per unit of output
    error: ``qconvert.gguf.budget_check.role_weights``), so that costs of different roles compare."""
    return [MatrixCosts(m.name, m.preset_type, m.nbytes, {t: c * weight(m.name) for t, c in m.cost.items()})
            for m in matrices]


def measure_all(entries: Sequence[tuple[str, tuple[int, ...], GGMLType]], read: Callable[[str], np.ndarray],
                hessian: Callable[[str], torch.Tensor | None], imatrix: Mapping[str, np.ndarray], header_bytes: int,
                progress: Callable[[int, int, str], None] | None = None) -> tuple[list[MatrixCosts], int]:
    """Measure every matrix with a Hessian: its candidates for ``choose``, and the fixed bytes of the rest.
    ``entries``: the preset plan's (GGUF name, shape, type) in file order; ``read(name)`` its float32 weights;
    ``hessian(name)`` its inputs' Hessian or None (a fixed tensor); ``header_bytes``: the file's header with this
    plan (the types do not change its size)."""
    fixed = header_bytes
    matrices: list[MatrixCosts] = []
    for i, (name, shape, qtype) in enumerate(entries):
        H = hessian(name)
        if H is None or len(shape) != 2:
            fixed += aligned(qtype.row_bytes(shape[-1]) * int(np.prod(shape[:-1])))
        else:
            W = np.ascontiguousarray(read(name).reshape(-1, shape[-1]))
            matrices.append(measure(name, W, H.float(), qtype, imatrix.get(name)))
        if progress is not None:
            progress(i + 1, len(entries), name)
    return matrices, fixed
