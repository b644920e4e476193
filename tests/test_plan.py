"""Numerical contracts for llama-quantize's type mixture (``qconvert.gguf.plan``) and the Qwen2.5 family table.

a) Against the published numbers in ``shared/reference/gguf-anchor.md`` (§1.3, §1.4, §3): tensor counts,
   parameter counts, per-type counts, use_more_bits layer sets, and the §3.2 size table (GB with ≈6 MB of
   tokenizer metadata), which the anchor validated against published files.
b) Against the real llama.cpp (b11739, the library in ``llama-cpp-py-sync``): ``llama_model_quantize`` with
   ``dry_run`` on header-only GGUFs of all seven Qwen2.5 shapes and every preset, then overrides; the plan
   must give the same type for every tensor, the same warning lines and the same total size.
c) The 80-layer (70B) rule and the shape fallbacks, on synthetic shapes, by hand and against the oracle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qconvert.constants import GGMLType as T
from qconvert.errors import ModelNotFoundError, QuantTypeError
from qconvert.family import SIZES, hub_id, seed_config, tensor_shapes
from qconvert.gguf.plan import (
    PRESETS,
    Plan,
    get_preset,
    parse_tensor_type_option,
    plan_for_config,
    preset_for_bits,
    use_more_bits,
)

# ---------------------------------------------------------------------------------------------------------
# Anchor numbers (gguf-anchor.md), typed in from the document — never from this code's output.
# ---------------------------------------------------------------------------------------------------------

ANCHOR_PARAMS_B = {"0.5b": 0.494, "1.5b": 1.544, "3b": 3.086, "7b": 7.616, "14b": 14.770, "32b": 32.764,
                   "72b": 72.706}  # §1.4 "params (my count)"
ANCHOR_N_TENSORS = {"0.5b": 290, "1.5b": 338, "7b": 339, "72b": 963}  # §1.3

# §3.2: predicted file size in GB = Σ tensor bytes + ≈6 MB metadata.
ANCHOR_PRESETS = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_0", "Q5_K_M", "Q6_K", "Q8_0")
ANCHOR_GB = {
    "0.5b": (0.339, 0.356, 0.352, 0.398, 0.397, 0.420, 0.506, 0.531),
    "1.5b": (0.676, 0.824, 0.935, 0.986, 1.099, 1.125, 1.273, 1.647),
    "3b": (1.275, 1.591, 1.823, 1.930, 2.170, 2.225, 2.538, 3.286),
    "7b": (3.016, 3.808, 4.431, 4.683, 5.315, 5.445, 6.254, 8.099),
    "14b": (5.771, 7.339, 8.518, 8.988, 10.267, 10.509, 12.125, 15.702),
    "32b": (12.313, 15.935, 18.640, 19.851, 22.638, 23.262, 26.886, 34.821),
    "72b": (29.812, 37.699, 41.232, 47.416, 50.164, 54.447, 64.348, 77.263),
}
ANCHOR_METADATA_BYTES = 6e6
# §3.2 "fbN" marks; every other cell has no fallback.
ANCHOR_FALLBACKS = {
    ("0.5b", p): 144 for p in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")
} | {("0.5b", "Q4_0"): 1, ("0.5b", "Q5_0"): 1} | {
    ("72b", p): 80 for p in ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")
}

# §3.1 "Layers that get Q6_K in Q4_K_M/Q5_K_M".
ANCHOR_MORE_BITS = {
    24: {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23},
    28: {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27},
    36: set(range(4)) | set(range(6, 31, 3)) | set(range(31, 36)),
    48: set(range(6)) | set(range(8, 42, 3)) | set(range(42, 48)),
    64: set(range(8)) | set(range(10, 56, 3)) | set(range(56, 64)),
    80: set(range(10)) | set(range(12, 70, 3)) | set(range(70, 80)),
}
ANCHOR_MORE_BITS_COUNT = {24: 12, 28: 14, 36: 18, 48: 24, 64: 32, 80: 40}


def plan(size: str, preset: str, **options: Any) -> Plan:
    return plan_for_config(seed_config(size), preset, **options)


def counts(p: Plan) -> dict[T, int]:
    """Per-type counts of the quantized matrices (norms and biases, always F32, left out as in the anchor)."""
    return {t: n for t, n in p.type_counts().items() if t != T.F32}


def layers_of(p: Plan, suffix: str, qtype: T) -> set[int]:
    return {int(e.name.split(".")[1]) for e in p if e.name.endswith(suffix) and e.type == qtype}


# ---------------------------------------------------------------------------------------------------------
# family table
# ---------------------------------------------------------------------------------------------------------


def test_hub_ids() -> None:
    assert hub_id("1.5b") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert hub_id("7b", "base") == "Qwen/Qwen2.5-7B"
    assert hub_id("7B", "coder") == "Qwen/Qwen2.5-Coder-7B"
    assert hub_id("7b", "coder-instruct") == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert hub_id("7b", "math") == "Qwen/Qwen2.5-Math-7B"
    assert hub_id("72b", "math-instruct") == "Qwen/Qwen2.5-Math-72B-Instruct"
    assert hub_id("0.5", "coder") == "Qwen/Qwen2.5-Coder-0.5B"


@pytest.mark.parametrize(("size", "variant", "listed"), [
    ("72b", "coder", "0.5b, 1.5b, 3b, 7b, 14b, 32b"),
    ("0.5b", "math-instruct", "1.5b, 7b, 72b"),
    ("3b", "math", "1.5b, 7b, 72b"),
])
def test_unpublished_combinations_list_what_exists(size: str, variant: str, listed: str) -> None:
    with pytest.raises(ModelNotFoundError, match=listed):
        hub_id(size, variant)


def test_unknown_size_and_variant() -> None:
    with pytest.raises(ModelNotFoundError, match="0.5b, 1.5b, 3b, 7b, 14b, 32b, 72b"):
        hub_id("13b")
    with pytest.raises(ModelNotFoundError, match="instruct, base, coder"):
        hub_id("7b", "chat")


@pytest.mark.parametrize("size", SIZES)
def test_parameter_count_matches_anchor(size: str) -> None:
    n = sum(_prod(shape) for _, shape in tensor_shapes(seed_config(size)))
    assert n / 1e9 == pytest.approx(ANCHOR_PARAMS_B[size], abs=0.0005)


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def test_tensor_counts_and_order() -> None:
    for size, n in ANCHOR_N_TENSORS.items():
        assert len(tensor_shapes(seed_config(size))) == n
    names = [name for name, _ in tensor_shapes(seed_config("7b"))]
    assert names[:16] == [  # anchor §1.3, "Tensor order"
        "output.weight", "output_norm.weight", "token_embd.weight", "blk.0.attn_k.bias", "blk.0.attn_k.weight",
        "blk.0.attn_norm.weight", "blk.0.attn_output.weight", "blk.0.attn_q.bias", "blk.0.attn_q.weight",
        "blk.0.attn_v.bias", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.0.ffn_gate.weight",
        "blk.0.ffn_norm.weight", "blk.0.ffn_up.weight", "blk.1.attn_k.bias",
    ]
    names = [name for name, _ in tensor_shapes(seed_config("3b"))]
    assert names.index("blk.10.attn_k.bias") > names.index("blk.9.ffn_up.weight")  # numeric, not string order


def test_shapes_are_hf_out_in() -> None:
    shapes = dict(tensor_shapes(seed_config("0.5b")))
    assert shapes["token_embd.weight"] == (151936, 896)
    assert "output.weight" not in shapes  # tied
    assert shapes["blk.0.attn_k.weight"] == (128, 896)
    assert shapes["blk.0.attn_output.weight"] == (896, 896)
    assert shapes["blk.0.ffn_down.weight"] == (896, 4864)
    assert seed_config("72b")["architectures"] == ["Qwen2ForCausalLM"]


# ---------------------------------------------------------------------------------------------------------
# presets and option parsing
# ---------------------------------------------------------------------------------------------------------


def test_presets_and_bits() -> None:
    assert get_preset("q5_k_m").default_type == T.Q5_K
    assert get_preset("q4_k").name == "Q4_K_M"  # llama-quantize's alias
    assert int(get_preset("Q4_K_M").file_type) == 15  # anchor §1.2 general.file_type
    assert int(get_preset("BF16").file_type) == 32
    assert {b: preset_for_bits(b).name for b in (2, 3, 4, 5, 6, 8, 16)} == {
        2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0", 16: "F16"}
    with pytest.raises(QuantTypeError, match=r"2 \(Q2_K\).*16 \(F16\)"):
        preset_for_bits(7)
    with pytest.raises(QuantTypeError, match="Q3_K_S"):
        get_preset("Q4_K_XL")
    assert parse_tensor_type_option("FFN_Down=Q6_k") == ("ffn_down", T.Q6_K)
    with pytest.raises(QuantTypeError, match="unknown tensor type"):
        parse_tensor_type_option("ffn_down=q7_K")
    with pytest.raises(QuantTypeError, match="REGEX=TYPE"):
        parse_tensor_type_option("ffn_down")
    with pytest.raises(QuantTypeError, match="regular expression"):
        plan("0.5b", "Q4_K_M", tensor_types=[("blk.(", "q8_0")])


# ---------------------------------------------------------------------------------------------------------
# a) anchor tables
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layer", sorted(ANCHOR_MORE_BITS))
def test_use_more_bits_layer_sets(n_layer: int) -> None:
    chosen = {i for i in range(n_layer) if use_more_bits(i, n_layer)}
    assert chosen == ANCHOR_MORE_BITS[n_layer]
    assert len(chosen) == ANCHOR_MORE_BITS_COUNT[n_layer]


@pytest.mark.parametrize("size", SIZES)
def test_size_table_matches_anchor(size: str) -> None:
    for preset, gb in zip(ANCHOR_PRESETS, ANCHOR_GB[size]):
        p = plan(size, preset)
        predicted = (p.tensor_bytes() + ANCHOR_METADATA_BYTES) / 1e9
        assert predicted == pytest.approx(gb, abs=0.0006), (size, preset)  # the anchor rounds to 1 MB
        assert p.n_fallback() == ANCHOR_FALLBACKS.get((size, preset), 0), (size, preset)


def test_qwen25_05b_mixtures() -> None:
    p = plan("0.5b", "Q5_K_M")
    assert counts(p) == {T.Q8_0: 13, T.Q5_1: 132, T.Q6_K: 12, T.Q5_K: 12}
    assert p["token_embd.weight"].type == T.Q8_0 and p["token_embd.weight"].fallback_from is None  # tied rule
    assert layers_of(p, "attn_v.weight", T.Q8_0) == ANCHOR_MORE_BITS[24]  # the Q6_K fallback
    assert layers_of(p, "ffn_down.weight", T.Q6_K) == ANCHOR_MORE_BITS[24]
    assert counts(plan("0.5b", "Q4_K_M")) == {T.Q8_0: 13, T.Q5_0: 132, T.Q6_K: 12, T.Q4_K: 12}
    assert p.warnings()[-1] == "llama_model_quantize_impl: WARNING: 144 of 290 tensor(s) required fallback quantization"


def test_qwen25_15b_q5_k_m() -> None:
    p = plan("1.5b", "Q5_K_M")
    assert counts(p) == {T.Q6_K: 29, T.Q5_K: 168}
    assert p["token_embd.weight"].type == T.Q6_K
    layers = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27}
    assert layers_of(p, "attn_v.weight", T.Q6_K) == layers == layers_of(p, "ffn_down.weight", T.Q6_K)
    assert p.tensor_bytes() / 1e6 == pytest.approx(1119.1, abs=0.05)  # §5: measured llama-quantize output
    assert (p.tensor_bytes() + ANCHOR_METADATA_BYTES) / 1e9 == pytest.approx(1.125, abs=0.0005)
    assert p.warnings() == []


def test_qwen25_72b_q4_k_m() -> None:
    p = plan("72b", "Q4_K_M")
    assert p.n_fallback() == 80
    assert {e.name for e in p if e.fallback_from} == {f"blk.{i}.ffn_down.weight" for i in range(80)}
    assert layers_of(p, "ffn_down.weight", T.Q8_0) == ANCHOR_MORE_BITS[80]
    assert layers_of(p, "ffn_down.weight", T.Q5_0) == set(range(80)) - ANCHOR_MORE_BITS[80]
    assert layers_of(p, "attn_v.weight", T.Q5_K) == set(range(80)) - ANCHOR_MORE_BITS[80]  # the 70B rule
    assert p["output.weight"].type == T.Q6_K and p["token_embd.weight"].type == T.Q4_K


def test_imatrix_q4_0_first_eighth() -> None:
    # §3.2: bartowski's imatrix Q4_0 of 7B is +13 MB: the first L/8 ffn_down layers become Q4_1.
    plain, imat = plan("7b", "Q4_0"), plan("7b", "Q4_0", has_imatrix=True)
    assert layers_of(imat, "ffn_down.weight", T.Q4_1) == {0, 1, 2}
    assert (imat.tensor_bytes() - plain.tensor_bytes()) / 1e6 == pytest.approx(13, abs=0.5)
    assert layers_of(plan("7b", "Q5_0", has_imatrix=True), "ffn_down.weight", T.Q5_1) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------------------
# c) the 80-layer rule and shape fallbacks, by hand
# ---------------------------------------------------------------------------------------------------------


def mini_config(n_layer: int, hidden: int = 256, ffn: int = 512, heads: int = 4, kv: int = 1,
                tied: bool = False) -> dict[str, Any]:
    return {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": n_layer, "hidden_size": hidden,
            "intermediate_size": ffn, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": 1024, "tie_word_embeddings": tied, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6}


def test_70b_rule_needs_exactly_80_layers() -> None:
    for n_layer, bumped in ((79, False), (80, True), (81, False)):
        p = plan_for_config(mini_config(n_layer), "Q4_K_M")
        plain = set(range(n_layer)) - {i for i in range(n_layer) if use_more_bits(i, n_layer)}
        assert layers_of(p, "attn_v.weight", T.Q5_K if bumped else T.Q4_K) == plain
    # Q2_K with n_gqa 1: attn_v Q3_K, bumped to Q5_K at 80 layers; Q3_K_S's plain Q3_K too.
    assert layers_of(plan_for_config(mini_config(80, kv=4), "Q2_K"), "attn_v.weight", T.Q5_K) == set(range(80))
    assert layers_of(plan_for_config(mini_config(64, kv=4), "Q2_K"), "attn_v.weight", T.Q3_K) == set(range(64))
    assert layers_of(plan_for_config(mini_config(80), "Q3_K_S"), "attn_v.weight", T.Q5_K) == set(range(80))


def test_fallback_for_rows_not_multiple_of_256() -> None:
    p = plan_for_config(mini_config(4, hidden=384, ffn=640, heads=6, kv=2), "Q5_K_M")
    e = p["blk.0.attn_q.weight"]
    assert (e.type, e.fallback_from) == (T.Q5_1, T.Q5_K)
    assert e.warning_lines() == [
        ("warning: blk.0.attn_q.weight                  - ncols    384 not divisible by 256 "
         "(required for type    q5_K) -> falling back to    q5_1")]
    assert p["blk.3.ffn_down.weight"].type == T.Q8_0  # Q6_K (use_more_bits: last eighth) on 640-wide rows
    assert p["blk.0.ffn_down.weight"].type == T.Q5_1
    assert p["output.weight"].type == T.Q8_0 and p["output.weight"].fallback_from is None  # output rule


def test_fallback_to_f16_when_not_multiple_of_32() -> None:
    p = plan_for_config(mini_config(2, ffn=200), "Q8_0")
    e = p["blk.0.ffn_down.weight"]
    assert (e.type, e.fallback_from) == (T.F16, T.Q8_0)
    assert e.warning_lines() == [
        ("warning: blk.0.ffn_down.weight                - ncols    200 not divisible by  32 "
         "(required for type    q8_0) (WARNING: must use F16 due to unusual shape) -> falling back to     f16")]


def test_overrides_by_hand() -> None:
    p = plan("0.5b", "Q4_K_M", tensor_types=[("attn_q", "q6_K")])
    e = p["blk.0.attn_q.weight"]
    assert (e.type, e.fallback_from, e.override_from) == (T.Q8_0, T.Q6_K, T.Q4_K)  # override, then fallback
    assert e.warning_lines()[0] == (
        "llama_tensor_get_type: blk.0.attn_q.weight                  - applying manual override: q4_K -> q6_K")
    pure = plan("1.5b", "Q5_K_M", pure=True)
    assert counts(pure) == {T.Q5_K: 197}
    assert plan("7b", "Q4_K_M", output_tensor_type="q8_0")["output.weight"].type == T.Q8_0
    assert plan("1.5b", "Q4_K_M", output_tensor_type="q8_0")["token_embd.weight"].type == T.Q8_0  # tied
    kept = plan("7b", "Q4_K_M", leave_output_tensor=True)["output.weight"]
    assert kept.type == T.BF16  # the unquantized source type
    with pytest.raises(QuantTypeError, match="without a fallback"):
        plan("0.5b", "Q4_K_M", token_embedding_type="q4_K")  # 896-wide rows cannot hold Q4_K


def test_iq4_mixtures_by_hand() -> None:
    """llama-quant.cpp's IQ4_NL/IQ4_XS rules read by hand: attn_v Q5_K when n_gqa >= 4 (every Qwen2.5 size),
    ffn_down Q5_K in the first eighth only without an imatrix, output Q6_K; 896-wide rows fall back
    IQ4_XS -> IQ4_NL and Q5_K -> Q5_1, and Q6_K -> Q8_0 for the tied 0.5B embedding."""
    p = plan("1.5b", "IQ4_XS")
    assert counts(p) == {T.Q5_K: 28 + 3, T.Q6_K: 1, T.IQ4_XS: 197 - 32}
    assert layers_of(p, "ffn_down.weight", T.Q5_K) == {0, 1, 2}
    assert layers_of(plan("1.5b", "IQ4_XS", has_imatrix=True), "ffn_down.weight", T.Q5_K) == set()
    small = plan("0.5b", "IQ4_XS")
    assert counts(small) == {T.Q8_0: 1, T.Q5_1: 24, T.Q5_K: 3, T.IQ4_NL: 120, T.IQ4_XS: 21}
    e = small["blk.0.attn_q.weight"]
    assert (e.type, e.fallback_from) == (T.IQ4_NL, T.IQ4_XS)
    assert counts(plan("0.5b", "IQ4_NL")) == {T.Q8_0: 1, T.Q5_1: 24, T.Q5_K: 3, T.IQ4_NL: 141}
    big = plan("72b", "IQ4_XS")  # ffn_down rows of 29568 = 115.5 x 256: IQ4_NL, or Q5_1 for the first 10
    assert layers_of(big, "ffn_down.weight", T.IQ4_NL) == set(range(10, 80))
    assert layers_of(big, "ffn_down.weight", T.Q5_1) == set(range(10))
    assert plan_for_config(mini_config(2, ffn=200), "IQ4_NL")["blk.0.ffn_down.weight"].type == T.F16


def test_q2_k_s_mixture_and_imatrix_requirement() -> None:
    """Q2_K_S: Q2_K with attn_v Q4_K (n_gqa >= 4) and the first eighth of ffn_down Q4_K; every Q2_K tensor but
    token_embd/output needs an importance matrix, which llama-quantize's dry run announces and a run refuses."""
    p = plan("7b", "Q2_K_S")
    assert counts(p) == {T.Q2_K: 166, T.Q4_K: 28 + 3, T.Q6_K: 1}
    assert p["token_embd.weight"].type == T.Q2_K and not p["token_embd.weight"].requires_imatrix
    assert len(p.imatrix_required()) == 165
    assert p.warnings() == [("llama_model_quantize_impl: WARNING: dry run completed successfully, but actually "
                             "completing this quantization will require an imatrix!")]
    with pytest.raises(QuantTypeError, match="--calib builtin.*--imatrix FILE"):
        p.check_imatrix(None)
    with pytest.raises(QuantTypeError, match="no entry for 1 tensor"):
        p.check_imatrix(set(p.imatrix_required()[1:]))
    p.check_imatrix(set(p.imatrix_required()))
    assert plan("7b", "Q2_K_S", has_imatrix=True).warnings() == []
    assert plan("0.5b", "Q2_K_S").imatrix_required() == [f"blk.{i}.ffn_down.weight" for i in range(3, 24)]
    assert plan("7b", "IQ4_XS").imatrix_required() == [] and plan("7b", "Q2_K").imatrix_required() == []


def test_iq3_mixtures_by_hand() -> None:
    """llama-quant.cpp's IQ3 rules read by hand (7B: 28 layers, n_gqa 7): IQ3_M gives attn_v, attn_output and
    the first eighth of ffn_down Q4_K; IQ3_XS gives attn_q/attn_k and the middle ffn_gate/ffn_up IQ3_XXS,
    which needs an importance matrix; output Q6_K; everything else IQ3_S."""
    m = plan("7b", "IQ3_M")
    assert counts(m) == {T.Q4_K: 28 + 28 + 3, T.Q6_K: 1, T.IQ3_S: 198 - 60}
    assert layers_of(m, "ffn_down.weight", T.Q4_K) == {0, 1, 2} and m.imatrix_required() == []
    xs = plan("7b", "IQ3_XS")
    middle = set(range(3, 24))  # n/8 <= i < 7n/8
    assert layers_of(xs, "ffn_up.weight", T.IQ3_XXS) == middle == layers_of(xs, "ffn_gate.weight", T.IQ3_XXS)
    assert layers_of(xs, "attn_q.weight", T.IQ3_XXS) == set(range(28)) == layers_of(xs, "attn_k.weight", T.IQ3_XXS)
    assert len(xs.imatrix_required()) == 28 * 2 + 21 * 2
    assert counts(plan("7b", "IQ3_S")) == {T.Q4_K: 28, T.Q6_K: 1, T.IQ3_S: 198 - 29}


def test_iq3_xxs_and_iq2_m_mixtures_by_hand() -> None:
    """IQ3_XXS: attn_q/attn_k IQ2_S, attn_output IQ3_S, attn_v Q4_K (n_gqa >= 4), output Q5_K, ffn_down Q4_K
    (first eighth) / Q3_K without an imatrix. IQ2_M (llama.cpp's IQ1/IQ2 branch): attn_v Q4_K with no 70B bump,
    first eighth of ffn_down and attn_output IQ3_S, output Q5_K, the rest IQ2_S."""
    p = plan("7b", "IQ3_XXS")
    # 7B is untied: token_embd IQ3_S too
    assert counts(p) == {T.Q3_K: 25, T.Q4_K: 28 + 3, T.Q5_K: 1, T.IQ3_XXS: 56, T.IQ3_S: 28 + 1, T.IQ2_S: 56}
    assert counts(plan("7b", "IQ3_XXS", has_imatrix=True)) == {T.Q4_K: 28, T.Q5_K: 1, T.IQ3_XXS: 56 + 28,
                                                                 T.IQ3_S: 28 + 1, T.IQ2_S: 56}
    assert len(p.imatrix_required()) == 56 + 56  # IQ3_XXS ffn_gate/up and IQ2_S attn_q/k
    m = plan("7b", "IQ2_M")
    assert counts(m) == {T.Q4_K: 28, T.Q5_K: 1, T.IQ3_S: 28 + 3 + 1, T.IQ2_S: 198 - 61}
    assert layers_of(m, "ffn_down.weight", T.IQ3_S) == {0, 1, 2}
    big = plan_for_config(mini_config(80), "IQ2_M")
    assert layers_of(big, "attn_v.weight", T.Q4_K) == set(range(80))  # no 70B rule in this branch
    assert big["token_embd.weight"].type == T.IQ3_S and big["output.weight"].type == T.Q5_K


def test_format_table() -> None:
    text = plan("0.5b", "Q5_K_M").format_table()
    assert "blk.0.attn_q.weight" in text and "q5_K -> q5_1" in text
    assert "144 of 290 tensor(s) required fallback quantization" in text
    assert "bits per weight" in text


# ---------------------------------------------------------------------------------------------------------
# b) the oracle: llama.cpp's own dry run
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle() -> Any:
    pytest.importorskip("llama_cpp_py_sync", reason="llama-cpp-py-sync (llama.cpp b11739) is not installed")
    pytest.importorskip("gguf", reason="gguf-py writes the oracle's input files")
    from llama_dry_run import LlamaQuantizeOracle

    try:
        return LlamaQuantizeOracle()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"libllama from llama-cpp-py-sync cannot be loaded here: {e}")


@pytest.fixture(scope="module")
def header_only(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Header-only BF16 GGUF per config (sparse data section; a 72B file allocates a few KiB)."""
    from llama_dry_run import write_header_only_gguf

    made: dict[str, Path] = {}

    def get(key: str, config: dict[str, Any]) -> Path:
        if key not in made:
            path = tmp_path_factory.mktemp("gguf") / f"{key}.gguf"
            write_header_only_gguf(path, config, tensor_shapes(config), matrix_type=T.BF16)
            made[key] = path
        return made[key]

    return get


def assert_same_as_llama(oracle: Any, path: Path, p: Plan, **oracle_options: Any) -> None:
    run = oracle.dry_run(path, p.preset.file_type, **oracle_options)
    assert [e.name for e in p] == run.order
    mismatched = [(e.name, e.type.label, run.types[e.name]) for e in p if e.type.label != run.types[e.name]]
    assert mismatched == []
    assert p.warnings() == run.warnings
    assert f"{p.tensor_bytes() / 2**20:.2f}" == run.quant_size_mib


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("size", SIZES)
def test_matches_llama_quantize(oracle: Any, header_only: Any, size: str, preset: str) -> None:
    config = seed_config(size)
    assert_same_as_llama(oracle, header_only(size, config), plan_for_config(config, preset))


OVERRIDE_CASES: dict[str, dict[str, Any]] = {
    "pure": {"pure": True},
    "output_q8_0": {"output_tensor_type": T.Q8_0},
    "output_q4_K": {"output_tensor_type": T.Q4_K},  # on a tied model: through the mixture, with fallback
    "embd_q8_0": {"token_embedding_type": T.Q8_0},
    "embd_q4_0_output_f16": {"token_embedding_type": T.Q4_0, "output_tensor_type": T.F16},
    "regex_needs_fallback": {"tensor_types": [("attn_q", T.Q5_K), ("ffn_down", T.Q8_0)]},
    "regex_shifts_counters": {"tensor_types": [(r"blk\.1[0-9]\.attn_v", T.Q2_K), ("ffn_up", T.Q6_K)]},
    "regex_and_pure": {"tensor_types": [("token_embd", T.Q3_K)], "pure": True},
    "regex_whole_block": {"tensor_types": [(r"blk\.0\.", T.Q4_0)]},
    "leave_output": {"leave_output_tensor": True},
    "regex_iq3": {"tensor_types": [("ffn_up", T.IQ3_XXS), ("attn_q", T.IQ4_XS), ("ffn_gate", T.IQ3_S)]},
    "output_iq3_xxs": {"output_tensor_type": T.IQ3_XXS, "token_embedding_type": T.IQ4_NL},
    "imatrix": {"has_imatrix": True},
}
OVERRIDE_PRESETS = ("Q2_K", "Q2_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_M", "Q6_K", "Q8_0", "F16",
                    "IQ4_NL", "IQ4_XS", "IQ3_XS", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                    "IQ1_M", "IQ1_S")


@pytest.mark.parametrize("case", list(OVERRIDE_CASES))
@pytest.mark.parametrize("preset", OVERRIDE_PRESETS)
@pytest.mark.parametrize("size", ["0.5b", "72b"])
def test_overrides_match_llama_quantize(oracle: Any, header_only: Any, size: str, preset: str, case: str) -> None:
    config, options = seed_config(size), dict(OVERRIDE_CASES[case])
    oracle_options = dict(options)
    if oracle_options.pop("has_imatrix", False):  # any imatrix makes llama.cpp take its has-imatrix branches
        oracle_options["imatrix"] = {"blk.0.ffn_down.weight": config["intermediate_size"]}
    assert_same_as_llama(oracle, header_only(size, config), plan_for_config(config, preset, **options),
                         **oracle_options)


SYNTHETIC = {
    "80_layers_gqa4": mini_config(80),
    "80_layers_mha": mini_config(80, kv=4),
    "79_layers": mini_config(79),
    "rows_384_640": mini_config(4, hidden=384, ffn=640, heads=6, kv=2),
    "rows_200": mini_config(3, ffn=200),
    "tied_rows_384": mini_config(8, hidden=384, heads=6, kv=2, tied=True),
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shape", list(SYNTHETIC))
def test_synthetic_shapes_match_llama_quantize(oracle: Any, header_only: Any, shape: str, preset: str) -> None:
    config = SYNTHETIC[shape]
    assert_same_as_llama(oracle, header_only(shape, config), plan_for_config(config, preset))
