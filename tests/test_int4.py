"""Numerical contracts of qconvert.int4: GPTQ/AWQ packing, the algorithms, the checkpoint writer, and loaders.

* Packing: unpack(pack(q)) == q and dequant(pack(q)) == q.dequantize() exactly, for every width and both layouts;
  GPTQModel's own packer (plus its v2→v1 conversion) produces the same int32 words, and its own dequantizers read
  ours back to the same fp16 weights.
* Algorithms: on the trained ``demo`` fixture's real activations, GPTQ (with and without act-order) and AWQ leave a
  smaller output error on *held-out* text than round-to-nearest at the same bits and group size; the Hessian
  failure path damps more, then raises ``HessianError``.
* Checkpoints: transformers (``AutoModelForCausalLM.from_pretrained``) and GPTQModel (``GPTQModel.load``, torch
  kernels) load what the writer produces, and their logits match a float model carrying our dequantized weights.

Tests needing GPTQModel (and optimum, which transformers' GPTQ loader imports) skip when it is not installed.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qconvert.errors import CheckpointError, OutputError, QuantTypeError
from qconvert.int4 import (
    QWEN2_SCALE_MAPPINGS,
    AWQConfig,
    GPTQConfig,
    HessianError,
    QuantizedCheckpointWriter,
    QuantizedLinear,
    TensorParallelWarning,
    active_mappings,
    add_to_hessian,
    apply_scales,
    awq_quantization_config,
    dequantize_awq,
    dequantize_gptq,
    gptq,
    gptq_quantization_config,
    pack_awq,
    pack_gptq,
    pad_intermediate,
    padded_intermediate_size,
    quantize_awq,
    rtn,
    search_scales,
    tensor_parallel_problems,
    unpack_awq,
    unpack_gptq,
    write_quantized_checkpoint,
)
from qconvert.int4.formats import AWQ_ORDER, pack_bits, unpack_bits
from qconvert.int4.gptq import group_aware_order
from qconvert.int4.writer import tensor_parallel_warning

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these tensors are small, and on a shared 2-core machine OpenMP's second thread makes
    each small op ~8× slower (the fixtures' trainer makes the same choice)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer_like(out: int = 64, k: int = 256, tokens: int = 1024, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight [out, k], correlated inputs with a few loud channels [tokens, k], and their Hessian."""
    g = _gen(seed)
    w = 0.02 * torch.randn(out, k, generator=g)
    mix = torch.eye(k) + 3.0 * torch.randn(k, k, generator=g) / math.sqrt(k)  # strongly correlated, as in LLMs
    x = torch.randn(tokens, k, generator=g) @ mix * torch.linspace(0.2, 2.0, k)
    x[:, :4] *= 8.0
    return w, x, add_to_hessian(None, 0, x)[0]


def _rel_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X Wᵀ − X Ŵᵀ|| / ||X Wᵀ|| (Frobenius)."""
    return float((x @ (w - w_hat).T).norm() / (x @ w.T).norm())


# ---------------------------------------------------------------------------------------------------------------
# Packing: exact round trips


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_stream_round_trip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (96, 40), generator=_gen(bits))
    words = pack_bits(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_bits(words, bits), codes)


GPTQ_SCHEMES = [  # bits, group, sym, desc_act, static_groups
    (4, 128, True, False, False), (4, 32, False, True, False), (3, 64, True, True, False),
    (2, 128, False, False, False), (8, -1, True, False, False), (3, 32, False, False, False),
    (4, 64, True, True, True), (8, 128, False, True, False),
]


@pytest.mark.parametrize("bits,group,sym,desc_act,static", GPTQ_SCHEMES)
def test_gptq_layout_round_trips_exactly(bits: int, group: int, sym: bool, desc_act: bool, static: bool) -> None:
    w, _, h = _layer_like()
    q = gptq(w, h, GPTQConfig(bits=bits, group_size=group, sym=sym, desc_act=desc_act, static_groups=static))
    t = pack_gptq(q)
    groups = 1 if group == -1 else 256 // group
    assert t["qweight"].shape == (256 * bits // 32, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (groups, 64 * bits // 32) and t["scales"].shape == (groups, 64)
    assert t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32
    back = unpack_gptq(t, bits, group, sym)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    assert torch.equal(dequantize_gptq(t, bits), q.dequantize())


@pytest.mark.parametrize("bits,word", [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)])
def test_symmetric_gptq_qzeros_are_the_constant_word(bits: int, word: int) -> None:
    """Sym stores z = 2^(bits-1) as z - 1 in every field: 4-bit words are all 0x77777777 (anchor §2.1)."""
    w, _, h = _layer_like()
    qzeros = pack_gptq(gptq(w, h, GPTQConfig(bits=bits, group_size=64)))["qzeros"]
    assert bool(((qzeros.long() & 0xFFFFFFFF) == word).all())


def test_gptq_v1_refuses_zero_point_zero() -> None:
    w = torch.rand(32, 128)  # all positive: asym zero point 0, which v1 (z - 1) cannot store
    with pytest.raises(QuantTypeError, match="min_zero=1"):
        pack_gptq(rtn(w, 4, 128, sym=False))
    q = rtn(w, 4, 128, sym=False, min_zero=1)
    assert int(q.zeros.min()) == 1
    assert torch.equal(dequantize_gptq(pack_gptq(q), 4), q.dequantize())
    assert _rel_err(torch.eye(128), w, q.dequantize()) < 0.05


def test_awq_layout_round_trips_exactly() -> None:
    w, _, _ = _layer_like()
    q = quantize_awq(w)
    t = pack_awq(q)
    assert t["qweight"].shape == (256, 8) and t["qzeros"].shape == (2, 8) and t["scales"].shape == (2, 64)
    back = unpack_awq(t, 128)
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(q, name)), name
    assert torch.equal(dequantize_awq(t, 128), q.dequantize())


def test_awq_interleave_puts_columns_in_awq_order() -> None:
    """Nibble i of word c holds output column 8c + AWQ_ORDER[i]: pack codes equal to their column index % 8."""
    q = rtn(torch.randn(16, 128), 4, 128, sym=False)
    codes = (torch.arange(16) % 8).to(torch.uint8).expand(128, 16).T.contiguous()
    word = pack_awq(QuantizedLinear(codes, q.scales, q.zeros, q.g_idx, 4, 128, False))["qweight"][0, 0]
    nibbles = [(int(word) >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(AWQ_ORDER)


def test_awq_rejects_act_order() -> None:
    w, _, h = _layer_like()
    with pytest.raises(QuantTypeError, match="g_idx"):
        pack_awq(gptq(w, h, GPTQConfig(desc_act=True, group_size=32)))


def test_rtn_scales_are_fp16_values_and_grid_contains_zero() -> None:
    w, _, _ = _layer_like()
    for sym in (True, False):
        q = rtn(w, 4, 32, sym)
        assert torch.equal(q.scales, q.scales.half().float())
        assert bool((q.zeros == 8).all()) if sym else int(q.zeros.max()) <= 15
        err = (q.dequantize() - w).abs().reshape(64, 8, 32).amax(-1)
        if not sym:  # asym covers [min, max]: round-to-nearest errs by at most half a step
            assert bool((err <= q.scales * 0.5 + 1e-7).all())
    with pytest.raises(QuantTypeError, match="multiple of group size"):
        rtn(torch.randn(8, 100), 4, 64)
    with pytest.raises(QuantTypeError, match="bits"):
        rtn(w, 5, 128)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ mechanics


def test_gptq_beats_rtn_on_correlated_inputs_and_lazy_blocks_do_not_change_it() -> None:
    w, x, _ = _layer_like(tokens=2048)
    calib, held_out = x[:1024], x[1024:]  # one distribution, disjoint tokens
    base = _rel_err(held_out, w, rtn(w, 4, 32).dequantize())
    h = add_to_hessian(None, 0, calib)[0]
    q = gptq(w, h, GPTQConfig(group_size=32))
    assert _rel_err(held_out, w, q.dequantize()) < 0.9 * base
    small_blocks = gptq(w, h, GPTQConfig(group_size=32, block_size=32))
    assert float((small_blocks.codes == q.codes).float().mean()) > 0.995  # same math, other fp32 summation order
    assert q.info["damp_percent"] == 0.01 and q.info["loss"] > 0


def test_gptq_act_order_g_idx() -> None:
    w, _, h = _layer_like()
    dyn = gptq(w, h, GPTQConfig(desc_act=True, group_size=32))
    assert dyn.act_order  # groups follow the permuted order: g_idx is not k // g
    assert torch.equal(torch.bincount(dyn.g_idx.long()), torch.full((8,), 32))
    assert int(dyn.g_idx[torch.argmax(torch.diagonal(h))]) == 0  # the loudest input comes first: group 0
    static = gptq(w, h, GPTQConfig(desc_act=True, static_groups=True, group_size=32))
    assert not static.act_order
    assert torch.equal(static.g_idx, torch.arange(256, dtype=torch.int32) // 32)


def test_group_aware_order_keeps_groups_whole() -> None:
    """Group-aware reordering: whole groups, loudest group first (by its largest H[k, k]), each group's columns
    by decreasing H[k, k]."""
    diag = torch.rand(256, generator=_gen(3))
    perm = group_aware_order(diag, 32)
    assert torch.equal(torch.sort(perm).values, torch.arange(256))
    runs = perm.reshape(8, 32)
    assert all(len(set((r // 32).tolist())) == 1 for r in runs)  # each run of 32 is one original group
    assert all(torch.all(diag[r][:-1] >= diag[r][1:]) for r in runs)
    run_max = torch.stack([diag[r].max() for r in runs])
    assert torch.all(run_max[:-1] >= run_max[1:]) and int(runs[0, 0]) == int(torch.argmax(diag))


def test_gptq_group_aware_keeps_the_plain_layout_and_beats_plain_gptq() -> None:
    """g_idx stays k // g (desc_act false: every loader takes it), pack/unpack is exact, and on inputs whose
    importance varies across and within groups the held-out error is below plain GPTQ's (and RTN's)."""
    w, x, _ = _layer_like(tokens=2048)
    x[:, 200:203] *= 6.0  # loud channels inside a late group too: plain order would reach them last
    calib, held_out = x[:1024], x[1024:]
    h = add_to_hessian(None, 0, calib)[0]
    gar = gptq(w, h, GPTQConfig(group_size=32, group_aware=True))
    assert not gar.act_order and torch.equal(gar.g_idx, torch.arange(256, dtype=torch.int32) // 32)
    assert torch.equal(dequantize_gptq(pack_gptq(gar), 4), gar.dequantize())
    plain = gptq(w, h, GPTQConfig(group_size=32))
    e_gar, e_plain = _rel_err(held_out, w, gar.dequantize()), _rel_err(held_out, w, plain.dequantize())
    assert e_gar < e_plain < _rel_err(held_out, w, rtn(w, 4, 32).dequantize()), (e_gar, e_plain)
    with pytest.raises(QuantTypeError, match="act-order within groups"):
        GPTQConfig(group_aware=True, desc_act=True)


def test_gptq_dead_columns_quantize_to_exact_zero() -> None:
    w, x, _ = _layer_like()
    x[:, [5, 77]] = 0.0
    q = gptq(w, add_to_hessian(None, 0, x)[0], GPTQConfig(group_size=64))
    assert bool((q.dequantize()[:, [5, 77]] == 0).all())


def _hessian_with_eigenvalues(eigenvalues: torch.Tensor) -> torch.Tensor:
    basis, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=_gen(3), dtype=torch.float64))
    return (basis @ torch.diag(eigenvalues.double()) @ basis.T).float()


def test_gptq_singular_hessian_increases_damping_then_fails_clearly() -> None:
    w = 0.02 * torch.randn(32, 128, generator=_gen(4))
    # rank 16 (16 tokens for 128 inputs): positive semi-definite, and the default damping suffices
    few = torch.randn(16, 128, generator=_gen(5))
    assert gptq(w, add_to_hessian(None, 0, few)[0]).info["damp_percent"] == 0.01
    # slightly indefinite (fp32 accumulation can do this): 1% damping is not enough, 2% is
    eig = torch.ones(128)
    eig[-1] = -0.015
    q = gptq(w, _hessian_with_eigenvalues(eig))
    assert q.info["damp_percent"] == pytest.approx(0.02)
    # far from positive definite: every retry fails and the error says what to do
    eig[-1] = -1.0
    with pytest.raises(HessianError, match="damp_percent 0.11 .*started at 0.01, 10 retries.*calibration"):
        gptq(w, _hessian_with_eigenvalues(eig))
    with pytest.raises(HessianError, match="bfloat16 or float32"):
        gptq(w, torch.full((128, 128), float("nan")))


def test_gptq_rejects_mismatched_inputs() -> None:
    w, _, h = _layer_like()
    with pytest.raises(QuantTypeError, match="Hessian shape"):
        gptq(w, h[:128, :128])
    with pytest.raises(QuantTypeError, match="block size"):
        GPTQConfig(group_size=128, block_size=96)


@pytest.mark.cuda
def test_gptq_runs_on_the_device_of_its_inputs() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    w, _, h = _layer_like()
    q = gptq(w.cuda(), h.cuda(), GPTQConfig(desc_act=True))
    assert q.codes.device.type == "cuda" and q.g_idx.device.type == "cuda"
    ref = gptq(w, h, GPTQConfig(desc_act=True))
    assert float((q.codes.cpu() == ref.codes).float().mean()) > 0.99


# ---------------------------------------------------------------------------------------------------------------
# Real activations of the trained demo model


@dataclass
class LayerIO:
    """What one decoder layer saw: each linear's input [tokens, in] and each module's call (args, kwargs)."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    calls: dict[str, tuple[tuple, dict]] = field(default_factory=dict)


INSPECTED = ("", "self_attn", "mlp", "mlp.down_proj")  # "" = the decoder layer itself


def capture(model, ids: torch.Tensor) -> list[LayerIO]:
    """Run ``model`` (float32, HF Qwen2) on ``ids`` [batch, seq] and record every decoder layer's inputs."""
    ios = [LayerIO() for _ in model.model.layers]
    hooks = []
    for layer, io in zip(model.model.layers, ios):
        for name in LINEARS:
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda m, args, io=io, name=name: io.inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
        for name in INSPECTED:
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(
                lambda m, args, kwargs, io=io, name=name: io.calls.__setitem__(name, (args, kwargs)),
                with_kwargs=True))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return ios


def run_module(layer, io: LayerIO, name: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Output of ``layer.<name>`` on its recorded call with some parameters (names relative to ``layer``) replaced."""
    prefix = f"{name}." if name else ""
    local = {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}
    args, kwargs = io.calls[name]
    with torch.no_grad():
        out = torch.func.functional_call(layer.get_submodule(name), local, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


def weights_of(layer) -> dict[str, torch.Tensor]:
    return {n: layer.get_submodule(n).weight.detach().clone() for n in LINEARS}


def gptq_layer(layer, io: LayerIO, cfg: GPTQConfig) -> dict[str, QuantizedLinear]:
    return {n: gptq(w, add_to_hessian(None, 0, io.inputs[n])[0], cfg) for n, w in weights_of(layer).items()}


@pytest.fixture(scope="module")
def demo_model():
    transformers = pytest.importorskip("transformers")
    from qconvert.fixtures.models import fixture_path

    return transformers.AutoModelForCausalLM.from_pretrained(fixture_path("demo"), dtype=torch.float32).eval()


def corpus_ids(name: str, text: str, batch: int = 8, seq: int = 256) -> torch.Tensor:
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode

    return encode(text, FIXTURES[name])[: batch * seq].reshape(batch, seq)


@pytest.fixture(scope="module")
def demo_io(demo_model) -> tuple[list[LayerIO], list[LayerIO]]:
    """(calibration, held-out) activations of every demo layer: 2048 training tokens, 2048 evaluation tokens."""
    from qconvert.fixtures.corpus import eval_text, training_text

    return capture(demo_model, corpus_ids("demo", training_text())), capture(demo_model, corpus_ids("demo", eval_text()))


def layer_output_error(layer, io: LayerIO, linears: Mapping[str, QuantizedLinear],
                       floats: Mapping[str, torch.Tensor] | None = None) -> float:
    """Relative error of the whole decoder layer's output when its linears (and norms) are replaced."""
    params = {f"{n}.weight": q.dequantize() for n, q in linears.items()} | dict(floats or {})
    ref = run_module(layer, io, "", {})
    return float((run_module(layer, io, "", params) - ref).norm() / ref.norm())


DEMO_LAYERS = (0, 3)


@pytest.mark.parametrize("bits,group", [(4, 128), (3, 128)])
def test_gptq_beats_rtn_on_demo_layers(demo_model, demo_io, bits: int, group: int) -> None:
    """Per linear, on held-out text: GPTQ and GPTQ act-order < RTN (same bits and group, sym)."""
    calib, held = demo_io
    for li in DEMO_LAYERS:
        layer = demo_model.model.layers[li]
        plain = gptq_layer(layer, calib[li], GPTQConfig(bits=bits, group_size=group))
        act = gptq_layer(layer, calib[li], GPTQConfig(bits=bits, group_size=group, desc_act=True))
        for n, w in weights_of(layer).items():
            x = held[li].inputs[n]
            e_rtn = _rel_err(x, w, rtn(w, bits, group).dequantize())
            e_gptq, e_act = _rel_err(x, w, plain[n].dequantize()), _rel_err(x, w, act[n].dequantize())
            assert e_gptq < e_rtn and e_act < e_rtn, (li, n, e_rtn, e_gptq, e_act)
        rtn_all = {n: rtn(w, bits, group) for n, w in weights_of(layer).items()}
        assert layer_output_error(layer, held[li], plain) < layer_output_error(layer, held[li], rtn_all)


def test_awq_beats_rtn_on_demo_layers(demo_model, demo_io) -> None:
    """Decoder-layer output on held-out text: AWQ (scales + clip, 4-bit g128 zero point) < RTN with zero point.

    The AWQ weights come from the real driver (``qconvert.calibration.quantize``) on the calibration windows."""
    from qconvert.fixtures.corpus import training_text
    from qconvert.fixtures.models import fixture_path

    held = demo_io[1]
    linears, floats = quantize_model(fixture_path("demo"), corpus_ids("demo", training_text()), "awq", AWQConfig())
    for li in DEMO_LAYERS:
        layer = demo_model.model.layers[li]
        prefix = f"model.layers.{li}."
        ours = {n: linears[prefix + n] for n in LINEARS}
        norms = {n.removeprefix(prefix): t for n, t in floats.items() if n.startswith(prefix)}
        assert norms, f"AWQ rescaled no norm of layer {li}"
        rtn_all = {n: rtn(w, 4, 128, sym=False) for n, w in weights_of(layer).items()}
        assert layer_output_error(layer, held[li], ours, norms) < layer_output_error(layer, held[li], rtn_all)


def test_awq_scale_search_keeps_weights_that_already_sit_on_the_grid() -> None:
    """A checkpoint dequantized from a GPTQ/AWQ g128 export has weights on a zero-point 4-bit g128 grid already. No duo-scaling α gives s = 1, so AutoAWQ's search must move them off the grid; ours also tries
    s = 1, which reproduces them, and must pick it. Same search without it (keep_identity=False): strictly worse."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (64, 2, 128), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # every group spans the whole grid, so re-quantizing it is exact
    step = torch.rand(64, 2, 1, generator=g).mul(0.05).add(0.01).half().float()
    zero = torch.randint(1, 15, (64, 2, 1), generator=g).float()
    w = (step * (codes - zero)).reshape(64, 256)
    x = torch.randn(512, 256, generator=g) * (1 + 20 * (torch.rand(256, generator=g) < 0.05))  # outlier channels

    def forward(ws):
        return x @ ws[0].T

    found = search_scales(x, [w], forward, AWQConfig())
    autoawq = search_scales(x, [w], forward, AWQConfig(keep_identity=False))
    assert found.alpha is None and torch.equal(found.scales, torch.ones(256))
    assert found.identity_loss == 0.0 < min(autoawq.losses)
    assert found.losses == autoawq.losses and autoawq.identity_loss is None
    assert autoawq.alpha is not None and not torch.equal(autoawq.scales, torch.ones(256))


def test_awq_mappings_skip_v_to_o_under_gqa_and_scales_keep_the_function() -> None:
    gqa = {"self_attn.v_proj": (128, 256), "self_attn.o_proj": (256, 256)}
    assert "self_attn.v_proj" not in {m.prev for m in active_mappings(QWEN2_SCALE_MAPPINGS, gqa)}
    mha = {"self_attn.v_proj": (256, 256), "self_attn.o_proj": (256, 256)}
    assert len(active_mappings(QWEN2_SCALE_MAPPINGS, mha)) == 4
    g = _gen(6)
    prev, bias, w, x = torch.randn(64, 32, generator=g), torch.randn(64, generator=g), torch.randn(16, 64, generator=g), \
        torch.randn(5, 32, generator=g)
    s = torch.rand(64, generator=g) + 0.5
    new_prev, new_bias, (new_w,) = apply_scales(prev, bias, [w], s)
    torch.testing.assert_close((x @ new_prev.T + new_bias) @ new_w.T, (x @ prev.T + bias) @ w.T, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Writer and tensor-parallel rules

QWEN25 = {  # config.json values (anchor §1)
    "0.5B": {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2},
    "7B": {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4},
    "32B": {"hidden_size": 5120, "intermediate_size": 27648, "num_attention_heads": 40, "num_key_value_heads": 8},
    "72B": {"hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64, "num_key_value_heads": 8},
}


def test_tensor_parallel_rules_match_the_anchor_table() -> None:
    ok = lambda size, tp: not tensor_parallel_problems(QWEN25[size], 128, tp)
    assert not ok("0.5B", 2) and "self_attn.o_proj" in tensor_parallel_problems(QWEN25["0.5B"], 128, 2)
    assert ok("7B", 4) and ok("32B", 8)
    assert [ok("72B", tp) for tp in (1, 2, 4, 8)] == [True, False, False, False]
    assert padded_intermediate_size(29568) == 29696
    padded = QWEN25["72B"] | {"intermediate_size": 29696}
    assert all(ok_ for ok_ in (not tensor_parallel_problems(padded, 128, tp) for tp in (2, 4, 8)))
    assert "--pad-intermediate" in tensor_parallel_warning(QWEN25["72B"], 128) and "29696" in \
        tensor_parallel_warning(QWEN25["72B"], 128)
    assert "does not fix" in tensor_parallel_warning(QWEN25["0.5B"], 128)
    assert tensor_parallel_warning(padded, 128) is None


def test_pad_intermediate_keeps_the_mlp_function() -> None:
    g = _gen(7)
    gate, up, down, x = (torch.randn(288, 64, generator=g), torch.randn(288, 64, generator=g),
                         torch.randn(64, 288, generator=g), torch.randn(9, 64, generator=g))
    mlp = lambda gt, u, d: (torch.nn.functional.silu(x @ gt.T) * (x @ u.T)) @ d.T
    pg, pu, pd = pad_intermediate(gate, up, down, 384)
    assert pg.shape == (384, 64) and pd.shape == (64, 384) and bool((pd[:, 288:] == 0).all())
    torch.testing.assert_close(mlp(pg, pu, pd), mlp(gate, up, down), rtol=1e-4, atol=1e-5)
    npg, _, npd = pad_intermediate(gate.numpy(), up.numpy(), down.numpy(), 384)
    assert npg.shape == (384, 64) and np.array_equal(npd[:, :288], down.numpy())


def _rtn_linears(src: Path, bits: int = 4, group: int = 128, sym: bool = True) -> dict[str, QuantizedLinear]:
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(src)
    modules = [n.removesuffix(".weight") for n in ckpt.names()
               if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    return {m: rtn(torch.from_numpy(ckpt.read_f32(f"{m}.weight")), bits, group, sym, 0 if sym else 1) for m in modules}


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


GPTQ_CFG = gptq_quantization_config(GPTQConfig())


@pytest.mark.parametrize("fixture", ["tiny-tied", "tiny-untied"])
def test_writer_lays_out_a_gptq_checkpoint(model_dir, tmp_path: Path, fixture: str) -> None:
    src = model_dir(fixture)
    linears = _rtn_linears(src)
    out = tmp_path / "q"
    with pytest.warns(TensorParallelWarning):  # hidden 256 / TP 4 = 64 input columns per o_proj shard
        write_quantized_checkpoint(src, out, linears, GPTQ_CFG, max_shard_bytes=300_000)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((out / "quantize_config.json").read_text()) == GPTQ_CFG
    assert config["torch_dtype"] == "float16" and "is_marlin_format" not in config["quantization_config"]
    assert GPTQ_CFG["meta"]["quantizer"][0].startswith("qconvert:") and GPTQ_CFG["format"] == "gptq"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = _read_dir(out)
    assert set(index["weight_map"]) == set(tensors)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    tied = json.loads((src / "config.json").read_text())["tie_word_embeddings"]
    assert ("lm_head.weight" in tensors) == (not tied)
    float_names = [n for n in tensors if not n.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")]
    assert all(tensors[n].dtype == torch.float16 for n in float_names)
    assert "model.layers.0.self_attn.q_proj.bias" in float_names and "model.norm.weight" in float_names
    for module, q in linears.items():
        t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(dequantize_gptq(t, 4), q.dequantize())
    assert not list(tmp_path.glob(".q.partial-*"))


def test_quantization_config_dicts_have_the_loader_keys() -> None:
    assert GPTQ_CFG == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
        "true_sequential": True, "damp_percent": 0.01, "static_groups": False, "lm_head": False,
        "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32",
        "meta": {"quantizer": [f"qconvert:{__import__('qconvert').__version__}"]},
    }
    assert awq_quantization_config(AWQConfig()) == {"quant_method": "awq", "zero_point": True, "group_size": 128,
                                                    "bits": 4, "version": "gemm", "modules_to_not_convert": None}


def test_writer_lays_out_an_awq_checkpoint_with_rescaled_norms(model_dir, tmp_path: Path) -> None:
    src = model_dir("tiny-tied")
    linears = {m: quantize_awq(rtn(torch.randn(*q.shape, generator=_gen(8)), 4, 128).dequantize())
               for m, q in _rtn_linears(src).items()}
    norm = "model.layers.1.post_attention_layernorm.weight"
    gain = torch.rand(256, generator=_gen(9)) + 0.5
    out = write_quantized_checkpoint(src, tmp_path / "awq", linears, awq_quantization_config(AWQConfig()),
                                     floats={norm: gain}, tp_sizes=())
    tensors = _read_dir(out)
    assert torch.equal(tensors[norm], gain.half())
    assert "lm_head.weight" not in tensors and not any(n.endswith("g_idx") for n in tensors)
    for module, q in linears.items():
        t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales")}
        assert torch.equal(dequantize_awq(t, 128), q.dequantize())
    with pytest.raises(QuantTypeError, match="declares"):  # a GPTQ-sym layer cannot go into an AWQ checkpoint
        write_quantized_checkpoint(src, tmp_path / "bad", _rtn_linears(src), awq_quantization_config(AWQConfig()),
                                   tp_sizes=())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq"]


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_writer_knows_its_size_up_front_and_refuses_a_full_disk(model_dir, tmp_path: Path, monkeypatch,
                                                                 method: str) -> None:
    """``data_bytes()`` (computed from config.json before any layer is quantized) equals the tensor bytes the
    finished checkpoint holds; with less free space than that the writer stops before creating anything."""
    import shutil

    from qconvert.errors import OutputError

    src = model_dir("tiny-untied")
    linears = _rtn_linears(src, sym=method == "gptq")
    qcfg = GPTQ_CFG if method == "gptq" else awq_quantization_config(AWQConfig())
    if method == "awq":
        linears = {m: quantize_awq(q.dequantize()) for m, q in linears.items()}
    with QuantizedCheckpointWriter(src, tmp_path / "ok", qcfg, tp_sizes=()) as w:
        predicted = w.data_bytes()
        for m, q in linears.items():
            w.add_linear(m, q)
        out = w.finish()
    written = sum(t.numel() * t.element_size() for t in _read_dir(out).values())
    assert predicted == written
    monkeypatch.setattr("qconvert.io.atomic.shutil.disk_usage",
                        lambda path: shutil._ntuple_diskusage(2**40, 2**40 - predicted, predicted))
    with pytest.raises(OutputError, match="is free"):
        QuantizedCheckpointWriter(src, tmp_path / "full", qcfg, tp_sizes=())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_writer_restart_forgets_flushed_and_pending_tensors(model_dir, tmp_path: Path) -> None:
    """After ``restart`` (the guard's model-level fallback) every linear is added again, no shard of the first
    round survives, and the checkpoint holds the second round's weights."""
    src = model_dir("tiny-tied")
    first, second = _rtn_linears(src), {m: rtn(q.dequantize() * 0.5, 4, 128) for m, q in _rtn_linears(src).items()}
    out = tmp_path / "q"
    with QuantizedCheckpointWriter(src, out, GPTQ_CFG, tp_sizes=(), max_shard_bytes=100_000) as w:
        for module, q in first.items():
            w.add_linear(module, q)
        w.add_float("model.norm.weight", torch.zeros(256))
        assert len(w.shards) > 1
        w.restart()
        assert not list(w.tmp.glob("shard-*"))
        for module, q in second.items():
            w.add_linear(module, q)
        w.finish()
    tensors = _read_dir(out)
    for module, q in second.items():
        t = {k: tensors[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        assert torch.equal(dequantize_gptq(t, 4), q.dequantize())
    from qconvert.io.safetensors import SafetensorsCheckpoint

    norm = torch.from_numpy(SafetensorsCheckpoint(src).read_f32("model.norm.weight")).half()
    assert torch.equal(tensors["model.norm.weight"], norm)  # the float added before the restart is gone


def test_writer_is_strict_and_leaves_nothing_on_failure(model_dir, tmp_path: Path) -> None:
    src = model_dir("tiny-tied")
    linears = _rtn_linears(src)
    first = "model.layers.0.self_attn.q_proj"
    out = tmp_path / "q"
    with QuantizedCheckpointWriter(src, out, GPTQ_CFG, tp_sizes=()) as w:
        w.add_linear(first, linears[first])
        with pytest.raises(CheckpointError, match="already written"):
            w.add_linear(first, linears[first])
        with pytest.raises(CheckpointError, match="not a quantizable linear"):
            w.add_linear("model.layers.9.mlp.up_proj", linears[first])
        with pytest.raises(CheckpointError, match="config.json implies"):
            w.add_linear("model.layers.0.mlp.down_proj", linears[first])
        with pytest.raises(QuantTypeError, match="declares"):
            w.add_linear("model.layers.0.self_attn.k_proj", rtn(torch.randn(128, 256), 8, 128))
        with pytest.raises(CheckpointError, match="never added"):
            w.finish()
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(RuntimeError), QuantizedCheckpointWriter(src, out, GPTQ_CFG, tp_sizes=()):
        raise RuntimeError("driver crashed")
    assert not list(tmp_path.iterdir())
    write_quantized_checkpoint(src, out, linears, GPTQ_CFG, tp_sizes=())
    with pytest.raises(OutputError, match="--force"):
        write_quantized_checkpoint(src, out, linears, GPTQ_CFG, tp_sizes=())
    write_quantized_checkpoint(src, out, linears, GPTQ_CFG, force=True, tp_sizes=())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# ---------------------------------------------------------------------------------------------------------------
# Oracle: GPTQModel's packers and kernels, transformers' and GPTQModel's loaders


@pytest.fixture(scope="module")
def gptqmodel():
    """GPTQModel 7.6 (CPU torch kernels); transformers' GPTQ loader also needs optimum."""
    mod = pytest.importorskip("gptqmodel", reason="GPTQModel is not installed: pip install gptqmodel==7.6.0 optimum")
    pytest.importorskip("optimum", reason="transformers' GPTQ loader needs optimum: pip install optimum")
    return mod


@pytest.mark.parametrize("bits,group,sym,desc_act,static", GPTQ_SCHEMES)
def test_gptqmodel_packs_the_same_words_and_reads_ours(gptqmodel, bits, group, sym, desc_act, static) -> None:
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import (
        convert_gptq_v1_to_v2_format_module,
        convert_gptq_v2_to_v1_format_module,
    )

    w, _, h = _layer_like()
    q = gptq(w, h, GPTQConfig(bits=bits, group_size=group, sym=sym, desc_act=desc_act, static_groups=static))
    ours = pack_gptq(q)

    def module() -> TorchLinear:
        return TorchLinear(bits=bits, group_size=256 if group == -1 else group, sym=sym, desc_act=desc_act,
                           in_features=256, out_features=64, bias=False, pack_dtype=torch.int32)

    theirs, linear = module(), torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = q.dequantize()
    theirs.pack_original(linear, q.scales, q.zeros.float(), q.g_idx)  # GPTQModel packs v2 (z as-is) ...
    convert_gptq_v2_to_v1_format_module(theirs, QuantizeConfig(bits=bits))  # ... and saves v1
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(theirs, name), ours[name]), name

    reader = module()
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(reader, name).copy_(ours[name])
    convert_gptq_v1_to_v2_format_module(reader, bits, torch.int32)  # what its loader does to a v1 checkpoint
    reader.post_init()
    with torch.compiler.set_stance("force_eager"):
        their_weight = reader.eval().dequantize_weight()  # [in, out], fp16
    assert torch.equal(their_weight.T, q.dequantize().half())


def test_gptqmodel_awq_packer_and_dequantizer_agree(gptqmodel) -> None:
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from gptqmodel.quantization.awq.utils.packing_utils import (
        pack_awq as their_pack_awq,
    )

    w, _, _ = _layer_like()
    q = quantize_awq(w, AWQConfig(group_size=64))
    ours = pack_awq(q)
    qweight, qzeros = their_pack_awq(q.codes.T.int(), q.zeros.T.int(), 4)
    assert torch.equal(qweight, ours["qweight"]) and torch.equal(qzeros, ours["qzeros"])
    module = AwqTorchLinear(bits=4, group_size=64, sym=False, desc_act=False, in_features=256, out_features=64,
                            bias=False, register_buffers=True)
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = q.dequantize()
    module.pack(linear, q.scales, q.zeros.float())  # re-derives the codes from the float weight, then packs
    for name in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(module, name), ours[name]), name
    their_weight = dequantize_gemm(ours["qweight"], ours["qzeros"], ours["scales"], 4, 64)  # [in, out] fp16
    assert torch.equal(their_weight.T, q.dequantize().half())


def quantize_model(src: Path, ids: torch.Tensor, method: str, cfg: GPTQConfig | AWQConfig
                   ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """Full names -> quantized linears, and the float tensors AWQ rescaled (norm gains): the real driver's output."""
    from qconvert.calibration.quantize import calibrate

    linears: dict[str, QuantizedLinear] = {}
    floats: dict[str, torch.Tensor] = {}
    calibrate(src, ids, method, cfg, linears.__setitem__, floats.__setitem__)
    return linears, floats


def reference_model(model, linears: Mapping[str, QuantizedLinear], floats: Mapping[str, torch.Tensor]):
    """A float32 copy of ``model`` computing what the checkpoint stores: our dequantized weights, fp16 floats."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(p.half().float())  # the checkpoint keeps embeddings, norms and biases in fp16
        for module, q in linears.items():
            ref.get_submodule(module).weight.copy_(q.dequantize())
        for name, value in floats.items():
            ref.get_parameter(name).copy_(value.half().float())
    return ref


def logits(model, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


ORACLE_CASES = [  # fixture, method, algorithm config
    ("tiny-untied", "gptq", GPTQConfig()),
    ("tiny-tied", "gptq", GPTQConfig(desc_act=True)),
    ("tiny-tied", "awq", AWQConfig()),
    ("demo", "gptq", GPTQConfig(desc_act=True)),
    ("demo", "gptq", GPTQConfig(group_aware=True)),
    ("demo", "awq", AWQConfig()),
]


@pytest.mark.parametrize("fixture,method,cfg", ORACLE_CASES, ids=[
    f"{f}-{m}" + ("-act-order" if getattr(c, "desc_act", False) else "-group-aware" if getattr(c, "group_aware", False)
                  else "") for f, m, c in ORACLE_CASES])
def test_loaders_reproduce_our_dequantized_model(gptqmodel, model_dir, tmp_path: Path, fixture, method, cfg) -> None:
    """transformers and GPTQModel load the checkpoint; logits match a float model with our dequantized weights.

    Tolerances, per kernel precision (|logits| reach 7.4 on demo, 2 on the random fixtures):
    * transformers' CPU path (GPTQModel's ATen int4 kernel) casts scales and activations to bf16, so it must agree
      with our fp32 reference within 2× the max |bf16 − fp32| difference of that reference itself;
    * GPTQModel's plain torch kernels (dequantize to fp16, fp16 matmul) within 4× the max |fp16 − fp32|
      difference (+1e-3);
    * control: the unquantized model is ≥ 5× further away (mean |Δ|), so a packing error could not pass.
    """
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM

    from qconvert.fixtures.corpus import eval_text, training_text

    src = model_dir(fixture)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    linears, floats = quantize_model(src, corpus_ids(fixture, training_text(), 4, 128), method, cfg)
    qcfg = awq_quantization_config(cfg) if method == "awq" else gptq_quantization_config(cfg)
    out = tmp_path / f"{fixture}-{method}"
    write_quantized_checkpoint(src, out, linears, qcfg, floats=floats, max_shard_bytes=1 << 20, tp_sizes=())

    ids = corpus_ids(fixture, eval_text(), 2, 64)
    ref = reference_model(model, linears, floats)
    ref32, unquantized = logits(ref, ids), logits(model, ids)
    noise_bf16 = float((logits(ref, ids, torch.bfloat16) - ref32).abs().max())
    noise_fp16 = float((logits(ref, ids, torch.float16) - ref32).abs().max())

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).eval()
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    got = logits(hf, ids)
    assert float((got - ref32).abs().max()) <= 2 * noise_bf16
    assert float((unquantized - got).abs().mean()) >= 5 * float((ref32 - got).abs().mean())

    backend = BACKEND.GPTQ_TORCH if method == "gptq" else BACKEND.AWQ_TORCH
    with torch.compiler.set_stance("force_eager"):
        loaded = GPTQModel.load(str(out), backend=backend, device="cpu", dtype=torch.float16)
        got = logits(loaded.model, ids)
    assert float((got - ref32).abs().max()) <= 4 * noise_fp16 + 1e-3


def test_padded_intermediate_checkpoint_computes_the_same_logits(gptqmodel, model_dir, tmp_path: Path) -> None:
    """Qwen's 72B recipe on tiny-tied: intermediate 512 -> 640, RTN g128; transformers loads both checkpoints and
    the padded one gives the same logits (the padding adds whole zero groups, so no original weight changes)."""
    from transformers import AutoModelForCausalLM

    from qconvert.fixtures.corpus import eval_text
    from qconvert.io.safetensors import SafetensorsCheckpoint

    src = model_dir("tiny-tied")
    ckpt = SafetensorsCheckpoint(src)
    weights = {n.removesuffix(".weight"): torch.from_numpy(ckpt.read_f32(n)) for n in ckpt.names()
               if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    padded = dict(weights)
    for i in range(2):
        mlp = f"model.layers.{i}.mlp."
        padded[mlp + "gate_proj"], padded[mlp + "up_proj"], padded[mlp + "down_proj"] = pad_intermediate(
            weights[mlp + "gate_proj"], weights[mlp + "up_proj"], weights[mlp + "down_proj"], 640)
    plain_dir = write_quantized_checkpoint(src, tmp_path / "plain", {m: rtn(w) for m, w in weights.items()},
                                           GPTQ_CFG, tp_sizes=())
    with pytest.raises(CheckpointError, match="config.json implies"):
        write_quantized_checkpoint(src, tmp_path / "bad", {m: rtn(w) for m, w in padded.items()}, GPTQ_CFG,
                                   tp_sizes=())
    padded_dir = write_quantized_checkpoint(src, tmp_path / "padded", {m: rtn(w) for m, w in padded.items()},
                                            GPTQ_CFG, config_updates={"intermediate_size": 640}, tp_sizes=())
    ids = corpus_ids("tiny-tied", eval_text(), 2, 64)
    plain = logits(AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch.float16).eval(), ids)
    model = AutoModelForCausalLM.from_pretrained(padded_dir, dtype=torch.float16).eval()
    assert model.config.intermediate_size == 640
    assert float((logits(model, ids) - plain).abs().max()) <= 1e-3
