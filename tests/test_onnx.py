"""Numerical contracts of the ONNX export (``qconvert.onnx_export``) against independent runtimes.

* MatMulNBits weights: our numpy unpacking *and* onnxruntime running one MatMulNBits node on an identity input
  both give exactly ``dequantize_gptq`` / ``dequantize_awq`` (sym GPTQ, asym GPTQ, 4 and 8 bits; AWQ; several block
  sizes). GatherBlockQuantized (the quantized embedding): onnxruntime gathering every row gives exactly the RTN /
  asymmetric grid's own dequantization (4 and 8 bits, blocks 16-128), also when it reads a MatMulNBits weight's
  bytes through a Reshape (tied).
* Logits: onnxruntime (CPU EP) on every exported fixture vs transformers' ``Qwen2ForCausalLM`` in float32 on the
  same weights: fp32 within 1e-4 of max|logit| (measured ~1e-6), fp16 within 2e-3 (measured ~5e-4), int4 / int8
  at accuracy_level 0 within 1e-4 of transformers carrying the dequantized weights (RTN, GPTQ, AWQ; calibrated
  and --from; embedding and lm_head quantized at 4 or 8 bits or kept float). accuracy_level 4 (int8 activations) within 5e-2 of
  level 0.
* KV cache: prefill + decode steps == one full-sequence run; a left-padded batch == the unpadded sequence.
* Greedy: 20 tokens on the trained ``demo`` fixture equal torch's greedy; onnxruntime-genai loads the folder and
  generates the same tokens.
* Bad input (including a block size the hidden size does not divide for the embedding, an accuracy level outside
  0/1/2/4, table bits other than 4/8, int8 from 4-bit or act-order GPTQ) fails before anything is written, and
  leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import onnx
from onnx import TensorProto, helper, numpy_helper

from qconvert.errors import CheckpointError, OutputError, QuantTypeError, UsageError
from qconvert.int4 import (
    AWQConfig,
    GPTQConfig,
    QuantizedCheckpointWriter,
    awq_quantization_config,
    dequantize_awq,
    dequantize_gptq,
    gptq_quantization_config,
    pack_awq,
    pack_gptq,
    rtn,
    unpack_awq,
    unpack_gptq,
)
from qconvert.onnx_export import export_onnx
from qconvert.onnx_export import matmulnbits as mnb
from qconvert.runtimes.onnxrt import OnnxModel

FP32_REL = 1e-4
FP16_REL = 2e-3
INT4_REL = 1e-4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def rel(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def prompt(n: int = 40, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 2000, n).tolist()


_FLOAT_MODELS: dict[Path, object] = {}


def hf_model(path: Path, replace: dict[str, torch.Tensor] | None = None):
    """transformers' Qwen2ForCausalLM in float32, optionally with some parameters replaced (HF names)."""
    from transformers import Qwen2ForCausalLM

    if not replace and path in _FLOAT_MODELS:
        return _FLOAT_MODELS[path]
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if not replace:
        _FLOAT_MODELS[path] = model
    for name, value in (replace or {}).items():
        model.get_parameter(name).data.copy_(value.float())
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy without any cache: the full sequence each step."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(hf_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def n_layers(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["num_hidden_layers"])


@pytest.fixture(scope="session")
def exported(model_dir, tmp_path_factory):
    """``exported("demo", "int4", block_size=64)`` -> an export directory, made once per session."""
    made: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str, precision: str, **kw) -> Path:
        key = (name, precision, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = export_onnx(model_dir(name), root / str(len(made)), precision=precision, model_name=name, **kw)
        return made[key]
    return get


# ------------------------------------------------------------------------------------------------------------
# MatMulNBits bit-exactness


def run_one_node(nodes: list, inits: dict[str, np.ndarray], x: np.ndarray, x_type: int) -> np.ndarray:
    """onnxruntime (CPU) on a graph of ``nodes`` from input ``x`` to output ``y``."""
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", x_type, [None, None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def ort_dequantize(w: mnb.BlockWeight) -> np.ndarray:
    """The weight [N, K] onnxruntime uses: one MatMulNBits node applied to the identity."""
    inits = {"b": w.data, "s": w.scales} | ({} if w.zero_points is None else {"z": w.zero_points})
    node = helper.make_node("MatMulNBits", ["x", *inits], ["y"], domain="com.microsoft", K=w.cols, N=w.rows,
                            bits=w.bits, block_size=w.block_size, accuracy_level=0)
    return run_one_node([node], inits, np.eye(w.cols, dtype=np.float32), TensorProto.FLOAT).T


def ort_gather(w: mnb.BlockWeight) -> np.ndarray:
    """The table [V, H] onnxruntime uses: one GatherBlockQuantized node gathering every row, in order. A
    MatMulNBits-shaped ``w`` is read through a Reshape, as the tied export does."""
    inits = {"d": w.data, "s": w.scales} | ({} if w.zero_points is None else {"z": w.zero_points})
    nodes, data = [], "d"
    if w.op == mnb.MATMUL:
        inits["shape"] = np.array([w.rows, w.cols * w.bits // 8], np.int64)
        nodes, data = [helper.make_node("Reshape", ["d", "shape"], ["d2"])], "d2"
    inputs = [data, "x", "s"] + (["z"] if w.zero_points is not None else [])
    nodes.append(helper.make_node("GatherBlockQuantized", inputs, ["y"], domain="com.microsoft", bits=w.bits,
                                  block_size=w.block_size, gather_axis=0, quantize_axis=1))
    return run_one_node(nodes, inits, np.arange(w.rows, dtype=np.int64)[None], TensorProto.INT64)[0]


@pytest.mark.parametrize("k,block", [(256, 32), (256, 128), (96, 32), (512, 64)])
@pytest.mark.parametrize("scheme,bits", [("gptq-sym", 4), ("gptq-asym", 4), ("awq", 4), ("gptq-sym", 8),
                                         ("gptq-asym", 8)])
def test_matmulnbits_dequant_equals_checkpoint_dequant(scheme: str, bits: int, k: int, block: int) -> None:
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(k + block)) * 0.05
    w[:, 3] *= 20  # an outlier column, as in real models
    if scheme == "awq":
        packed = pack_awq(rtn(w, 4, block, sym=False))
        ref, q = dequantize_awq(packed, block).numpy(), unpack_awq(packed, block)
    else:
        sym = scheme == "gptq-sym"
        packed = pack_gptq(rtn(w, bits, block, sym=sym, min_zero=0 if sym else 1))
        ref, q = dequantize_gptq(packed, bits).numpy(), unpack_gptq(packed, bits, block, sym)
    m = mnb.from_quantized(q)
    assert m.bits == bits and m.data.shape == (48, k // block, block * bits // 8) and m.scales.shape == (48, k // block)
    assert (m.zero_points is None) == (scheme == "gptq-sym")
    np.testing.assert_array_equal(mnb.dequantize(m), ref)
    np.testing.assert_array_equal(ort_dequantize(m), ref)


def table(hidden: int, seed: int) -> torch.Tensor:
    """A [300, hidden] embedding-like table with a row of outliers and a zero row (smallest scale)."""
    t = torch.randn(300, hidden, generator=torch.Generator().manual_seed(seed)) * 0.05
    t[7] *= 30
    t[8] = 0
    return t


@pytest.mark.parametrize("hidden,block", [(256, 32), (256, 128), (96, 32), (320, 64)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_gather_block_quantized_equals_the_grids_dequantization(hidden: int, block: int, sym: bool, bits: int) -> None:
    """The embedding table in GatherBlockQuantized's layout (and a tied lm_head's MatMulNBits bytes read through a
    Reshape): onnxruntime gathers exactly ``QuantizedLinear.dequantize()``, as MatMulNBits computes with it."""
    q = rtn(table(hidden, hidden + block), bits, block, sym=sym)
    ref = q.dequantize().numpy()
    g = mnb.from_quantized(q, "the table", op=mnb.GATHER)
    assert g.data.shape == (300, hidden * bits // 8) and g.scales.shape == (300, hidden // block)
    assert (g.zero_points is None) == sym  # symmetric: onnxruntime's default zero point 2^(bits-1), as for MatMulNBits
    np.testing.assert_array_equal(mnb.dequantize(g), ref)
    np.testing.assert_array_equal(ort_gather(g), ref)
    head = mnb.from_quantized(q, "the lm_head")  # MatMulNBits: same bytes, scales and zero points
    assert head.data.tobytes() == g.data.tobytes() and head.data.shape == (300, hidden // block, block * bits // 8)
    assert np.array_equal(head.scales, g.scales) and (head.zero_points is None or np.array_equal(head.zero_points, g.zero_points))
    np.testing.assert_array_equal(ort_gather(head), ref)
    np.testing.assert_array_equal(ort_dequantize(head), ref)


def test_row_slices_concatenate_to_the_whole() -> None:
    """The export quantizes big tables a slice of rows at a time; blocks never span rows, so that is exact. A slice
    without zero points (all 8) next to one with them gets explicit 8s."""
    table = torch.randn(300, 64, generator=torch.Generator().manual_seed(5))
    for sym in (True, False):
        whole = mnb.from_quantized(rtn(table, 4, 32, sym=sym), op=mnb.GATHER)
        parts = mnb.concat_rows([mnb.from_quantized(rtn(table[i:i + 128], 4, 32, sym=sym), op=mnb.GATHER)
                                 for i in range(0, 300, 128)])
        for field in ("data", "scales", "zero_points"):
            assert np.array_equal(getattr(parts, field), getattr(whole, field)), field
    mixed = [mnb.from_quantized(rtn(table[:100], 4, 32, sym=True)), mnb.from_quantized(rtn(table[100:], 4, 32, sym=False))]
    joined = mnb.concat_rows(mixed)
    assert joined.zero_points is not None and joined.zero_points.shape == (300, 1)
    np.testing.assert_array_equal(mnb.dequantize(joined), np.concatenate([mnb.dequantize(m) for m in mixed]))
    np.testing.assert_array_equal(ort_dequantize(joined), mnb.dequantize(joined))


def test_symmetric_gptq_zero_point_is_onnxruntimes_default() -> None:
    """Sym GPTQ stores z' = 7 (0x77777777 words); z = 8 is exactly MatMulNBits' default, so no zero_points."""
    packed = pack_gptq(rtn(torch.randn(16, 64) * 0.1, 4, 32, sym=True))
    assert (packed["qzeros"].numpy().view(np.uint32) == 0x77777777).all()
    assert mnb.default_zero_point(4) == 8 and mnb.from_quantized(unpack_gptq(packed, 4, 32, True)).zero_points is None
    packed8 = pack_gptq(rtn(torch.randn(16, 64) * 0.1, 8, 32, sym=True))  # 8-bit: z = 128, onnxruntime's default too
    assert mnb.default_zero_point(8) == 128 and mnb.from_quantized(unpack_gptq(packed8, 8, 32, True)).zero_points is None


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_table_rtn_is_group_rtn_and_onnxruntime_reads_it(bits: int, block: int) -> None:
    """The embedding / lm_head quantizer (RTN per block, any block the ops take): for blocks of 32-128 exactly
    ``rtn(w, bits, block)``, and for every block onnxruntime's Gather (through the tied Reshape) and MatMulNBits
    read exactly its dequantization."""
    from qconvert.onnx_export.export import Tables, _rtn_blocks

    w = table(256, block + bits)
    head = _rtn_blocks(w.numpy(), Tables(bits, block), mnb.MATMUL)
    assert head.zero_points is None and head.data.shape == (300, 256 // block, block * bits // 8)
    if block >= 32:
        np.testing.assert_array_equal(mnb.dequantize(head), rtn(w, bits, block, sym=True).dequantize().numpy())
    else:  # below qconvert's group sizes: the sym grid's scale (2·max|w| / (2^bits - 1), fp16) and within a step
        absmax = np.abs(w.numpy()).reshape(300, -1, block).max(-1)
        np.testing.assert_allclose(head.scales, np.maximum(2 * absmax / (2 ** bits - 1), 1e-6), rtol=1e-3,
                                   atol=1e-7)  # the zero row: the fp16-subnormal floor
        assert (np.abs(mnb.dequantize(head) - w.numpy()) <= np.repeat(head.scales, block, axis=1)).all()
    np.testing.assert_array_equal(ort_gather(head), mnb.dequantize(head))
    np.testing.assert_array_equal(ort_dequantize(head), mnb.dequantize(head))


def test_act_order_group_indices_are_refused() -> None:
    q = rtn(torch.randn(16, 64), 4, 32, sym=True)
    permuted = dataclasses.replace(q, g_idx=torch.tensor(np.random.default_rng(0).permutation(64) // 32, dtype=torch.int32))
    with pytest.raises(QuantTypeError, match="static-groups"):
        mnb.from_quantized(permuted)


# ------------------------------------------------------------------------------------------------------------
# Logits vs transformers


@pytest.mark.parametrize("attention", ["gqa", "plain"])
@pytest.mark.parametrize("name", ["tiny-tied", "tiny-untied", "tiny-fallback", "demo"])
@pytest.mark.parametrize("precision,bound", [("fp32", FP32_REL), ("fp16", FP16_REL)])
def test_float_logits_match_transformers(exported, model_dir, name: str, precision: str, bound: float,
                                         attention: str) -> None:
    """Both attention graphs; fp16's GroupQueryAttention runs in float16 (the plain graph's scores stay float32)."""
    ids = prompt()
    ref = hf_logits(hf_model(model_dir(name)), ids)
    got = OnnxModel(exported(name, precision, attention=attention)).logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert rel(got, ref) < bound
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if precision == "fp32" else 0.95)


def table_weights(path: Path, block: int = mnb.DEFAULT_TABLE_BLOCK_SIZE,
                  bits: int = mnb.DEFAULT_TABLE_BITS) -> dict[str, torch.Tensor]:
    """The embedding (and an untied lm_head) as the int4 / int8 export quantizes them: symmetric RTN, dequantized. A
    tied model's lm_head is the same parameter in transformers, so replacing the embedding replaces both."""
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(path)
    names = [n for n in ("model.embed_tokens.weight", "lm_head.weight") if n in ckpt.entries]
    # RTN with one group per row of the [rows · n_blocks, block] view is group RTN (test_table_rtn_is_group_rtn...),
    # and also gives blocks of 16, below rtn's group sizes
    return {n: rtn(torch.from_numpy(ckpt.read_f32(n)).reshape(-1, block), bits, -1, sym=True).dequantize()
            .reshape(-1, ckpt.entries[n].shape[1]) for n in names}


def rtn_weights(path: Path, block: int, sym: bool = True, tables: bool = True, bits: int = 4,
                table_bits: int = mnb.DEFAULT_TABLE_BITS) -> dict[str, torch.Tensor]:
    """Every weight the RTN export quantizes (linears at ``bits``), dequantized; ``tables``: the embedding / lm_head
    too (``table_bits``, the default table block size)."""
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(path)
    linears = {f"model.layers.{i}.{s}.weight": rtn(torch.from_numpy(ckpt.read_f32(f"model.layers.{i}.{s}.weight")),
                                                   bits, block, sym=sym).dequantize()
               for i in range(n_layers(path)) for s in LINEARS}
    return linears | (table_weights(path, bits=table_bits) if tables else {})


@pytest.mark.parametrize("name,block", [("tiny-tied", 128), ("tiny-untied", 32), ("demo", 64)])
@pytest.mark.parametrize("tables", [True, False], ids=["int4-embedding", "float-embedding"])
def test_int4_rtn_matches_transformers_on_dequantized_weights(exported, model_dir, name: str, block: int,
                                                              tables: bool) -> None:
    """accuracy_level 0: the export computes with exactly the RTN weights, the embedding and lm_head included."""
    ids = prompt()
    ref = hf_logits(hf_model(model_dir(name), rtn_weights(model_dir(name), block, tables=tables)), ids)
    out = exported(name, "int4", block_size=block, accuracy_level=0, quantize_embedding=tables)
    assert rel(OnnxModel(out).logits(ids), ref) < INT4_REL


@pytest.mark.parametrize("name,block,table_bits", [("tiny-tied", 128, 8), ("tiny-untied", 32, 4), ("demo", 64, 8)])
def test_int8_rtn_matches_transformers_on_dequantized_weights(exported, model_dir, name: str, block: int,
                                                              table_bits: int) -> None:
    """--precision int8: 8-bit MatMulNBits linears (RTN sym, zero point 128 = onnxruntime's default) and 4- or 8-bit
    tables; at accuracy_level 0 exactly transformers carrying the same dequantized weights."""
    ids = prompt()
    ref = hf_logits(hf_model(model_dir(name), rtn_weights(model_dir(name), block, bits=8, table_bits=table_bits)), ids)
    out = exported(name, "int8", block_size=block, accuracy_level=0, table_bits=table_bits)
    assert out.name == f"{name}-onnx-int8"
    model = onnx.load(out / "model.onnx")
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] != "logits"
            for a in n.attribute if a.name == "bits"} == {8}
    assert not any(i.name.endswith("zero_points") for i in model.graph.initializer)
    assert rel(OnnxModel(out).logits(ids), ref) < INT4_REL
    card = (out / "README.md").read_text()  # the model card names the linears' op, level and table layout
    assert "| precision | int8 |" in card and f"(8-bit, block size {block}, from rtn" in card
    assert "`accuracy_level 0`" in card and f"lm_head MatMulNBits ({table_bits}-bit RTN, block size 16)" in card


@pytest.mark.parametrize("bits,block", [(4, 16), (4, 128), (8, 32), (8, 64)])
def test_table_bits_and_block_sizes_match_transformers(exported, model_dir, bits: int, block: int) -> None:
    """--table-bits / --table-block-size on the untied fixture: the exported embedding and lm_head are exactly the
    table quantizer's (blocks of 16 included) while the linears keep their own block size."""
    path, ids = model_dir("tiny-untied"), prompt()
    replace = rtn_weights(path, 64, tables=False) | table_weights(path, block, bits)
    out = exported("tiny-untied", "int4", block_size=64, accuracy_level=0, table_bits=bits, table_block_size=block)
    assert rel(OnnxModel(out).logits(ids), hf_logits(hf_model(path, replace), ids)) < INT4_REL
    model = onnx.load(out / "model.onnx")
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in gather.attribute if a.name in ("bits", "block_size")} == {"bits": bits, "block_size": block}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qconvert.lm_head"] == f"int{bits} MatMulNBits (RTN sym, block {block})"


@pytest.mark.parametrize("name,block", [("tiny-untied", 32), ("demo", 64)])
def test_mixed_precision_writes_llamacpps_layers_at_8_bits(exported, model_dir, name: str, block: int) -> None:
    """--mixed-precision: v_proj and down_proj of llama.cpp's use_more_bits layers are 8-bit MatMulNBits, every other
    linear 4-bit; at accuracy level 0 the logits are transformers' on those RTN weights (8-bit where widened)."""
    from qconvert.gguf.plan import use_more_bits

    path, ids = model_dir(name), prompt()
    n = n_layers(path)
    wide = {f"model.layers.{i}.{r}" for i in range(n) if use_more_bits(i, n) for r in ("self_attn.v_proj", "mlp.down_proj")}
    assert wide and len(wide) < 2 * n or n < 8
    replace = rtn_weights(path, block)
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(path)
    for m in wide:
        replace[f"{m}.weight"] = rtn(torch.from_numpy(ckpt.read_f32(f"{m}.weight")), 8, block, sym=True).dequantize()
    out = exported(name, "int4", block_size=block, accuracy_level=0, mixed_precision=True)
    model = onnx.load(out / "model.onnx")
    bits = {n.name.split("/")[0]: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits" and n.output[0] != "logits"}
    assert {m for m, b in bits.items() if b == 8} == wide and set(bits.values()) == {4, 8}
    assert rel(OnnxModel(out).logits(ids), hf_logits(hf_model(path, replace), ids)) < INT4_REL
    meta = {p.key: p.value for p in model.metadata_props}
    layers = ", ".join(str(i) for i in range(n) if use_more_bits(i, n))
    assert meta["qconvert.mixed_precision"] == f"int8 v_proj, down_proj in layers {layers} ({len(wide) // 2} of {n})"
    assert "mixed precision: int8 v_proj" in (out / "README.md").read_text()
    # q, k and v go through one MatMulNBits (rows q, k, v) where they share bits; apart where v_proj is 8-bit
    assert {m for m in bits if m.endswith(".qkv_proj")} == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(n)
                                                           if not use_more_bits(i, n)}
    plain = exported(name, "int4", block_size=block, accuracy_level=0)
    assert sorted(n.name.split("/")[0] for n in onnx.load(plain / "model.onnx").graph.node
                  if n.op_type == "MatMulNBits" and "self_attn" in n.name and "o_proj" not in n.name) == \
        sorted(f"model.layers.{i}.self_attn.qkv_proj" for i in range(n))
    size = lambda d: sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))
    assert size(out) > size(plain)


def test_int4_tables_quantized_in_row_slices_match_transformers(model_dir, tmp_path, monkeypatch) -> None:
    """Big tables are quantized TABLE_CHUNK weights at a time; with slices of 100 rows the untied fixture's
    embedding and lm_head are still exactly the whole-table RTN."""
    from qconvert.onnx_export import export as export_module

    monkeypatch.setattr(export_module, "TABLE_CHUNK", 100 * 256)
    path, ids = model_dir("tiny-untied"), prompt()
    out = export_onnx(path, tmp_path, precision="int4", block_size=32, accuracy_level=0)
    assert rel(OnnxModel(out).logits(ids), hf_logits(hf_model(path, rtn_weights(path, 32)), ids)) < INT4_REL


def initializers(out: Path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(out / "model.onnx", load_external_data=False).graph.initializer}


def test_int4_tied_embedding_and_lm_head_share_one_quantized_tensor(exported, model_dir) -> None:
    """Tied: the lm_head's MatMulNBits B and scales are the embedding's GatherBlockQuantized data (through a Reshape;
    neither op accepts the other's data shape) and scales. Untied: two tables. Recorded in the metadata."""
    tied, untied = exported("tiny-tied", "int4", accuracy_level=0), exported("tiny-untied", "int4", accuracy_level=0)
    model = onnx.load(tied / "model.onnx")
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    reshape = next(n for n in model.graph.node if n.output[0] == gather.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1] and gather.input[2] == head.input[2]
    inits = initializers(tied)
    assert list(inits[head.input[1]].dims) == [2304, 256 // 16, 8] and list(inits[head.input[2]].dims) == [2304, 16]
    assert not [n for n, t in inits.items() if t.dims and t.dims[0] == 2304 and n not in head.input]  # nothing else
    assert not any(n.op_type == "Gemm" or (n.op_type == "Gather" and "input_ids" in n.input) for n in model.graph.node)
    assert len([t for t in initializers(untied).values() if t.data_type == TensorProto.UINT8 and t.dims[0] == 2304]) == 2
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qconvert.accuracy_level"] == "0" and meta["qconvert.embedding"].startswith("int4 GatherBlockQuantized")


@pytest.mark.parametrize("name", ["tiny-tied", "tiny-untied"])
def test_keep_embedding_float_gives_the_float_gather(exported, name: str) -> None:
    """quantize_embedding=False (CLI --keep-embedding-float): Gather on a float32 [vocab, hidden] initializer and a
    float lm_head Gemm, as before int4 tables existed (logits: the float-embedding case above)."""
    out = exported(name, "int4", block_size=32, accuracy_level=0, quantize_embedding=False)
    model, inits = onnx.load(out / "model.onnx"), initializers(out)
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    assert inits[gather.input[0]].data_type == TensorProto.FLOAT and list(inits[gather.input[0]].dims) == [2304, 256]
    assert not any(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    assert [n.op_type for n in model.graph.node if n.name.startswith("/lm_head/")].count("Gemm") == 1
    assert {p.key: p.value for p in model.metadata_props}["qconvert.embedding"] == "float32"


@pytest.mark.parametrize("name,block", [("tiny-untied", 32), ("demo", 128)])
def test_accuracy_level_4_is_close_to_level_0(exported, model_dir, name: str, block: int) -> None:
    """Level 4 rounds each MatMulNBits input to int8 per block: every activation moves by at most 1/254 of its block's
    largest one (~0.4 %). Compounded over the 4 quantized inputs of each layer and the lm_head, that stays within a
    few percent of max|logit| (measured 0.7-2.4 % on these fixtures) and far below what the 4-bit weights
    themselves cost (17-55 % on these random or tiny models): bound 5e-2, and a quarter of the weight error."""
    ids = prompt()
    level0 = OnnxModel(exported(name, "int4", block_size=block, accuracy_level=0)).logits(ids)
    level4_dir = exported(name, "int4", block_size=block)  # the default
    assert {p.key: p.value for p in onnx.load(level4_dir / "model.onnx").metadata_props}["qconvert.accuracy_level"] == "4"
    level4 = OnnxModel(level4_dir).logits(ids)
    assert np.isfinite(level4).all() and 0 < rel(level4, level0) < 5e-2
    assert rel(level4, level0) < 0.25 * rel(level0, OnnxModel(exported(name, "fp32")).logits(ids))
    assert (level4.argmax(-1) == level0.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("algo,bits", [("gptq", 4), ("gptq", 8), pytest.param("awq", 4, marks=pytest.mark.slow)])
def test_calibrated_int4_matches_its_own_quantization(model_dir, tmp_path, algo: str, bits: int) -> None:
    """The export carries exactly what the calibration driver produced (codes, scales, AWQ's rescaled norms)."""
    from qconvert.calibration.quantize import calibrate
    from qconvert.calibset import load_calibration
    from qconvert.constants import DEFAULT_HOLDOUT

    path = model_dir("tiny-tied")
    calib = load_calibration("builtin", path, chat=False, n_samples=2, seq_len=32)
    linears: dict = {}
    floats: dict = {}
    cfg = GPTQConfig(bits=bits, group_size=64) if algo == "gptq" else AWQConfig(group_size=64)
    # the export calibrates with the held-out guard on, as every product path does
    calibrate(path, calib.ids, algo, cfg, linears.__setitem__, floats.__setitem__, holdout=DEFAULT_HOLDOUT)
    replace = {f"{m}.weight": q.dequantize() for m, q in linears.items()} | floats | table_weights(path)
    ids = prompt()
    out = export_onnx(path, tmp_path, precision=f"int{bits}", algo=algo, block_size=64, calib=calib, accuracy_level=0)
    assert rel(OnnxModel(out).logits(ids), hf_logits(hf_model(path, replace), ids)) < INT4_REL


def write_checkpoint(src: Path, out: Path, method: str, block: int, sym: bool = True, act_order: bool = False,
                     bits: int = 4) -> Path:
    """A GPTQ v1 (4- or 8-bit) / AWQ GEMM checkpoint of ``src`` with RTN codes (no calibration needed)."""
    from qconvert.io.safetensors import SafetensorsCheckpoint

    qcfg = (gptq_quantization_config(GPTQConfig(bits=bits, group_size=block, sym=sym, desc_act=act_order))
            if method == "gptq" else awq_quantization_config(AWQConfig(group_size=block)))
    ckpt = SafetensorsCheckpoint(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = QuantizedCheckpointWriter(src, out, qcfg)
    with writer:
        for i in range(n_layers(src)):
            for s in LINEARS:
                w = torch.from_numpy(ckpt.read_f32(f"model.layers.{i}.{s}.weight"))
                q = rtn(w, bits, block, sym=sym and method == "gptq", min_zero=1 if method == "gptq" and not sym else 0)
                if act_order:
                    perm = np.random.default_rng(i).permutation(w.shape[1])
                    q = dataclasses.replace(q, g_idx=torch.tensor(perm // block, dtype=torch.int32))
                writer.add_linear(f"model.layers.{i}.{s}", q)
        writer.finish()
    return out


@pytest.mark.parametrize("method,sym,block,bits", [("gptq", True, 128, 4), ("gptq", False, 64, 4), ("awq", False, 32, 4),
                                                  ("gptq", True, 64, 8), ("gptq", False, 32, 8)])
def test_from_checkpoint_matches_its_dequantized_weights(model_dir, tmp_path, method: str, sym: bool, block: int,
                                                         bits: int) -> None:
    """--from: int4 from 4-bit GPTQ / AWQ, int8 from 8-bit GPTQ (8-bit zero points one byte per block)."""
    from qconvert.io.safetensors import SafetensorsCheckpoint

    qdir = write_checkpoint(model_dir("tiny-untied"), tmp_path / "q", method, block, sym, bits=bits)
    ckpt = SafetensorsCheckpoint(qdir)
    replace = {n: torch.from_numpy(ckpt.read_f32(n)) for n in ckpt.names() if n.endswith((".weight", ".bias"))}
    for i in range(n_layers(qdir)):
        for s in LINEARS:
            m = f"model.layers.{i}.{s}"
            t = {k: torch.from_numpy(ckpt.read_f32(f"{m}.{k}") if k == "scales" else ckpt.read_raw(f"{m}.{k}").copy())
                 for k in (("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales"))}
            replace[f"{m}.weight"] = dequantize_gptq(t, bits) if method == "gptq" else dequantize_awq(t, block)
    replace |= table_weights(qdir)  # the float tables of the checkpoint, RTN-quantized by the export
    out = export_onnx(qdir, tmp_path, precision=f"int{bits}", from_dir=qdir, block_size=block, accuracy_level=0)
    assert out.name == f"q-onnx-int{bits}"
    ids = prompt()
    ref = hf_logits(hf_model(model_dir("tiny-untied"), replace), ids)  # the float model carrying qdir's tensors
    assert rel(OnnxModel(out).logits(ids), ref) < INT4_REL
    has_zp = any(i.name.endswith("zero_points") for i in onnx.load(out / "model.onnx").graph.initializer)
    assert has_zp == (not sym)


# ------------------------------------------------------------------------------------------------------------
# KV cache, padding, greedy, onnxruntime-genai


@pytest.mark.parametrize("attention", ["gqa", "plain"])
@pytest.mark.parametrize("precision,kw,bound", [("fp32", {}, 1e-5), ("fp16", {}, 1e-3),
                                                ("int4", {"accuracy_level": 0}, 1e-5), ("int4", {}, 2e-3)],
                         ids=["fp32", "fp16", "int4-level0", "int4"])
def test_prefill_plus_decode_equals_full_sequence(exported, precision: str, kw: dict, bound: float,
                                                  attention: str) -> None:
    """Bounds: float32 rounding, or fp16's cache; at accuracy level 4 MatMulNBits rounds its inputs to int8, so a
    last-bit difference between the prefill and decode attention kernels can move one activation by a whole int8 step
    (1/254 of its block's largest): measured 5e-4 of max|logit| with GroupQueryAttention, 2e-7 with the plain ops."""
    m = OnnxModel(exported("demo", precision, attention=attention, **kw))
    ids = prompt(32, seed=1)
    full = m.logits(ids)
    logits, cache = m.step(ids[:24], m.empty_cache())
    steps = [logits]
    for t in ids[24:]:
        logits, cache = m.step([t], cache)
        steps.append(logits)
    assert next(iter(cache.values())).shape[2] == len(ids)
    assert rel(np.concatenate(steps), full) < bound


@pytest.mark.parametrize("attention", ["gqa", "plain"])
def test_left_padded_batch_equals_single_sequence(exported, attention: str) -> None:
    """Batch of a left-padded row and a longer one, prefill then 3 batched decode steps: the padded row's logits equal
    the same tokens run alone (the fused graph has no position_ids: its positions are shifted by the padding)."""
    m = OnnxModel(exported("demo", "fp32", attention=attention))
    ids, pad, steps = prompt(12), 5, prompt(3, seed=4)
    batch_ids = np.array([[0] * pad + ids, prompt(12 + pad, seed=3)], np.int64)
    mask = np.ones_like(batch_ids)
    mask[0, :pad] = 0
    positions = np.stack([np.r_[np.zeros(pad, np.int64), np.arange(12)], np.arange(12 + pad)])
    cache = {n: np.zeros((2, m.kv_heads, 0, m.head_dim), np.float32) for n in m.past_names}
    feeds = {"input_ids": batch_ids, "attention_mask": mask, "position_ids": positions}
    got = []
    for t in range(len(steps) + 1):  # the prefill, then one batched step per token of ``steps``
        if t:
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
            feeds = {"input_ids": np.array([[steps[t - 1]], [7]], np.int64), "attention_mask": mask,
                     "position_ids": positions[:, -1:] + t}
        out = dict(zip(m.output_names, m.session.run(m.output_names, {k: v for k, v in feeds.items()
                                                                        if k in m.input_names} | cache)))
        assert np.isfinite(out["logits"]).all()
        got.append(out["logits"][0, pad:] if t == 0 else out["logits"][0])
        cache = {n: out[n.replace("past_key_values.", "present.")] for n in m.past_names}
    assert "position_ids" in m.input_names if attention == "plain" else "position_ids" not in m.input_names
    assert rel(np.concatenate(got), m.logits(ids + steps)) < 1e-5


def demo_prompt(path: Path) -> list[int]:
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(eval_text()[:400]).ids[:48]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4"])
def test_greedy_20_tokens_equals_torch_on_demo(exported, model_dir, precision: str) -> None:
    path = model_dir("demo")
    replace, kw = (rtn_weights(path, 128), {"accuracy_level": 0}) if precision == "int4" else (None, {})
    ids = demo_prompt(path)
    assert OnnxModel(exported("demo", precision, **kw)).greedy(ids, 20) == hf_greedy(hf_model(path, replace), ids, 20)


@pytest.mark.parametrize("precision,kw", [("fp32", {}), ("fp16", {}), ("int4", {}),
                                         ("int4", {"quantize_embedding": False, "accuracy_level": 0}),
                                         ("int8", {"table_bits": 8}), ("fp32", {"attention": "plain"}),
                                         ("int4", {"attention": "plain"})],
                         ids=["fp32", "fp16", "int4", "int4-float-embedding-level0", "int8-table-bits-8", "fp32-plain",
                              "int4-plain"])
def test_onnxruntime_genai_loads_and_generates(exported, model_dir, precision: str, kw: dict) -> None:
    """int4 / int8 by default: GatherBlockQuantized reading the tied lm_head's bytes, MatMulNBits at accuracy
    level 4. GroupQueryAttention by default, where genai shares one past/present buffer of the whole generation
    (genai_config says so); the plain graph's cache grows by concatenation."""
    og = pytest.importorskip("onnxruntime_genai")
    out = exported("demo", precision, **kw)
    fused = kw.get("attention", "gqa") == "gqa"
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is fused
    assert ("position_ids" in cfg["model"]["decoder"]["inputs"]) is not fused
    ops = {n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert ("GroupQueryAttention" in ops) is fused and ("Softmax" in ops) is not fused
    assert ("SkipSimplifiedLayerNormalization" in ops) is fused  # residual add + RMSNorm as one op
    ids = demo_prompt(model_dir("demo"))
    model = og.Model(str(out))
    assert list(og.Tokenizer(model).encode("def add(a, b):"))  # the copied tokenizer loads
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 20, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    assert tokens == OnnxModel(out).greedy(ids, 20)


# ------------------------------------------------------------------------------------------------------------
# Files


def test_output_files_and_tied_embedding_is_one_initializer(exported) -> None:
    out = exported("tiny-tied", "fp32")
    assert out.name == "tiny-tied-onnx-fp32"
    for f in ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json", "config.json", "README.md"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["decoder"]["num_key_value_heads"] == 2 and cfg["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    vocab_rows = [i for i in onnx.load(out / "model.onnx").graph.initializer if list(i.dims) == [2304, 256]]
    assert len(vocab_rows) == 1  # Gather and the lm_head Gemm share it
    untied = [i for i in onnx.load(exported("tiny-untied", "fp32") / "model.onnx").graph.initializer
              if list(i.dims) == [2304, 256]]
    assert len(untied) == 2


def test_external_data_gives_the_same_model(model_dir, exported, tmp_path) -> None:
    out = export_onnx(model_dir("demo"), tmp_path, precision="int4", model_name="demo", inline_limit=0)
    assert (out / "model.onnx.data").is_file() and (out / "model.onnx").stat().st_size < 200_000
    ids = prompt()
    np.testing.assert_array_equal(OnnxModel(out).logits(ids), OnnxModel(exported("demo", "int4")).logits(ids))


# ------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_refused_and_leaves_nothing(model_dir, tmp_path) -> None:
    tied, gptq_dir = model_dir("tiny-tied"), tmp_path / "src" / "act-order-gptq"
    with pytest.raises(UsageError, match="--precision int4"):
        export_onnx(tied, tmp_path, precision="fp32", algo="gptq")
    with pytest.raises(UsageError, match="--precision int4"):
        export_onnx(tied, tmp_path, precision="fp16", from_dir=tied)
    with pytest.raises(UsageError, match="not supported"):
        export_onnx(tied, tmp_path, precision="int2")
    fallback = model_dir("tiny-fallback")  # hidden 320: blocks of 64 tile it, 128 do not
    with pytest.raises(QuantTypeError, match=r"embedding / lm_head \[2304, 320\].*320 input columns, not a multiple "
                                             r"of block size 128.*\(16, 32, 64\)"):
        export_onnx(fallback, tmp_path, precision="int4", block_size=64, table_block_size=128)
    with pytest.raises(QuantTypeError, match=r"block size 24 cannot be used for the embedding.*--table-block-size 16"):
        export_onnx(tied, tmp_path, precision="int8", table_block_size=24)
    for bits in (3, 16, True):
        with pytest.raises(UsageError, match=f"{bits!r}-bit embedding / lm_head tables cannot be written.*4 or 8"):
            export_onnx(tied, tmp_path, precision="int4", table_bits=bits)
    with pytest.raises(UsageError, match="--algo awq writes 4-bit weights only"):
        export_onnx(tied, tmp_path, precision="int8", algo="awq")
    with pytest.raises(QuantTypeError, match=r"q_proj.*320 input columns, not a multiple of block size 128"):
        export_onnx(fallback, tmp_path, precision="int4", block_size=128, quantize_embedding=False)
    for level in (3, 8, -1, True):
        with pytest.raises(UsageError, match=f"accuracy level {level!r} is not supported; use one of 0 = .*4 = int8"):
            export_onnx(tied, tmp_path, precision="int4", accuracy_level=level)
    with pytest.raises(UsageError, match=r"attention 'mha' is not supported; use one of gqa \(GroupQueryAttention"):
        export_onnx(tied, tmp_path, precision="fp32", attention="mha")
    with pytest.raises(UsageError, match="--mixed-precision .* --precision int4 only"):
        export_onnx(tied, tmp_path, precision="int8", mixed_precision=True)
    with pytest.raises(UsageError, match="--mixed-precision .*--algo rtn only, not --algo gptq"):
        export_onnx(tied, tmp_path, precision="int4", algo="gptq", mixed_precision=True)
    with pytest.raises(UsageError, match="quantize_embedding must be True or False"):
        export_onnx(tied, tmp_path, precision="int4", quantize_embedding="no")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="not a GPTQ or AWQ checkpoint"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=tied)
    with pytest.raises(CheckpointError, match="rope_scaling"):
        export_onnx(model_dir("tiny-yarn"), tmp_path, precision="fp32")
    write_checkpoint(tied, gptq_dir, "gptq", 64, act_order=True)
    with pytest.raises(UsageError, match="--mixed-precision .*not --from"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=gptq_dir, mixed_precision=True)
    with pytest.raises(CheckpointError, match="act-order"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=gptq_dir, block_size=64)
    with pytest.raises(UsageError, match=r"4-bit GPTQ weights and --precision int8 writes 8-bit.*--precision int4"):
        export_onnx(tied, tmp_path, precision="int8", from_dir=gptq_dir)
    gptq8 = write_checkpoint(tied, tmp_path / "src" / "gptq8", "gptq", 64, act_order=True, bits=8)
    with pytest.raises(CheckpointError, match="act-order"):
        export_onnx(tied, tmp_path, precision="int8", from_dir=gptq8)
    with pytest.raises(UsageError, match=r"8-bit GPTQ weights and --precision int4 writes 4-bit.*--precision int8"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=gptq8)
    with pytest.raises(UsageError, match="--block-size 64"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=gptq_dir, block_size=128)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]
    out = export_onnx(tied, tmp_path, precision="fp32", model_name="x")
    with pytest.raises(OutputError, match="--force"):
        export_onnx(tied, tmp_path, precision="fp32", model_name="x")
    assert export_onnx(tied, tmp_path, precision="fp32", model_name="x", force=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "x-onnx-fp32"]


def test_failure_midway_removes_the_partial_directory(model_dir, tmp_path) -> None:
    src = tmp_path / "broken"
    shutil.copytree(model_dir("tiny-tied"), src)
    (src / "tokenizer.json").unlink()  # found only after the weights were written
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        export_onnx(src, tmp_path / "out", precision="fp32")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli(model_dir, tmp_path, capsys) -> None:
    from qconvert.cli import main

    tied = str(model_dir("tiny-tied"))
    assert main(["onnx", "--model", tied, "--precision", "fp16", "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / f"{Path(tied).name}-onnx-fp16" / "model.onnx").is_file()
    assert main(["onnx", "--model", tied, "--precision", "fp32", "--algo", "awq", "--out-dir", str(tmp_path)]) != 0
    assert main(["onnx", "--model", str(model_dir("tiny-fallback")), "--precision", "int4", "--block-size", "128",
                 "--out-dir", str(tmp_path)]) != 0
    assert "not a multiple of block size 128" in capsys.readouterr().err
    for flag in (["--keep-embedding-float"], ["--accuracy-level", "0"], ["--table-bits", "8"],
                 ["--table-block-size", "16"], ["--mixed-precision"]):
        assert main(["onnx", "--model", tied, "--precision", "fp16", *flag, "--out-dir", str(tmp_path)]) != 0
        assert f"{flag[0]} applies to --precision int4 / int8 only" in capsys.readouterr().err
    assert main(["onnx", "--model", tied, "--precision", "int8", "--keep-embedding-float", "--table-bits", "8",
                 "--out-dir", str(tmp_path)]) == 2
    assert "--keep-embedding-float keeps them float32" in capsys.readouterr().err
    gptq4 = write_checkpoint(model_dir("tiny-tied"), tmp_path.parent / f"{tmp_path.name}-gptq4", "gptq", 64)
    assert main(["onnx", "--from", str(gptq4), "--precision", "int8", "--out-dir", str(tmp_path)]) == 2
    assert "4-bit GPTQ weights and --precision int8" in capsys.readouterr().err
    for bad in (["--table-bits", "3"], ["--table-block-size", "256"]):
        with pytest.raises(SystemExit) as exit_:
            main(["onnx", "--model", tied, "--precision", "int8", *bad, "--out-dir", str(tmp_path)])
        assert exit_.value.code == 2 and f"{bad[0]}: invalid" in capsys.readouterr().err
    for bad in ("3", "8", "int8"):
        with pytest.raises(SystemExit) as exit_:
            main(["onnx", "--model", tied, "--precision", "int4", "--accuracy-level", bad, "--out-dir", str(tmp_path)])
        assert exit_.value.code == 2 and "--accuracy-level: invalid" in capsys.readouterr().err
    assert len(list(tmp_path.iterdir())) == 1
    out = tmp_path / f"{Path(tied).name}-onnx-int4"
    assert main(["onnx", "--model", tied, "--precision", "int4", "--accuracy-level", "1", "--keep-embedding-float",
                 "--out-dir", str(tmp_path), "--quiet"]) == 0
    model = onnx.load(out / "model.onnx")
    meta = {p.key: p.value for p in model.metadata_props}
    assert (meta["qconvert.accuracy_level"], meta["qconvert.embedding"]) == ("1", "float32")
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"} == {1}
    assert meta["qconvert.attention"] == "gqa" and "GroupQueryAttention" in (out / "README.md").read_text()
    assert main(["onnx", "--model", tied, "--precision", "fp32", "--attention", "plain", "--out-dir", str(tmp_path),
                 "--quiet"]) == 0
    plain = tmp_path / f"{Path(tied).name}-onnx-fp32"
    assert {p.key: p.value for p in onnx.load(plain / "model.onnx").metadata_props}["qconvert.attention"] == "plain"
    assert "`position_ids`" in (plain / "README.md").read_text()
    with pytest.raises(SystemExit) as exit_:
        main(["onnx", "--model", tied, "--precision", "fp32", "--attention", "mha", "--out-dir", str(tmp_path)])
    assert exit_.value.code == 2 and "--attention: invalid choice" in capsys.readouterr().err


def test_cli_accuracy_levels_are_the_exporters() -> None:
    """The parser spells the levels itself (building it must not import onnx); they must be the exporter's."""
    from qconvert.commands import onnx as onnx_cmd

    assert onnx_cmd.ACCURACY_CHOICES == tuple(mnb.ACCURACY_LEVELS)
    assert onnx_cmd.DEFAULT_ACCURACY_LEVEL == mnb.DEFAULT_ACCURACY_LEVEL == 4
    assert (onnx_cmd.TABLE_BITS, onnx_cmd.TABLE_BLOCK_SIZES) == (mnb.BITS, mnb.TABLE_BLOCK_SIZES)
    assert (onnx_cmd.DEFAULT_TABLE_BITS, onnx_cmd.DEFAULT_TABLE_BLOCK_SIZE) == (mnb.DEFAULT_TABLE_BITS,
                                                                               mnb.DEFAULT_TABLE_BLOCK_SIZE)
    assert onnx_cmd.QUANTIZED == tuple(mnb.PRECISION_BITS)
    from qconvert.onnx_export import graph

    assert onnx_cmd.ATTENTION_CHOICES == tuple(graph.ATTENTIONS) and onnx_cmd.DEFAULT_ATTENTION == graph.DEFAULT_ATTENTION


# ------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("precision,bound", [("fp32", 1e-3), ("fp16", 5e-3), ("int4", 1e-3)])
def test_cuda_matches_cpu(exported, precision: str, bound: float) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    out = exported("demo", precision, **({"accuracy_level": 0} if precision == "int4" else {}))  # same math on both
    ids = prompt()
    gpu, cpu = OnnxModel(out, device="cuda"), OnnxModel(out)
    assert rel(gpu.logits(ids), cpu.logits(ids)) < bound
    assert gpu.greedy(ids, 20) == cpu.greedy(ids, 20)


def test_initializer_store_rolls_back_to_a_mark(tmp_path: Path) -> None:
    """The ONNX export's restart after the guard's model-level fallback: everything added after the mark is gone,
    its external bytes too, and onnxruntime reads what was added afterwards at the right offsets."""
    import onnxruntime as ort

    from qconvert.onnx_export.writer import DATA_FILE, InitializerStore

    store = InitializerStore(tmp_path, external=True)
    keep = np.arange(2048, dtype=np.float32).reshape(2, 1024)
    store.add("keep", keep)
    mark = store.mark()
    store.add("dropped", np.ones((4, 4096), np.float32))
    store.add("dropped_small", np.ones(3, np.float32))
    store.rollback(mark)
    later = np.full((2, 1024), 7.0, np.float32)
    store.add("dropped", later)  # the name is free again
    assert [t.name for t in store.tensors] == ["keep", "dropped"]
    nodes = [helper.make_node("Add", ["keep", "dropped"], ["y"])]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1024])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    store.save(model, tmp_path / "model.onnx")
    assert (tmp_path / DATA_FILE).stat().st_size == store.offset < 4 * 4096 * 4
    y = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {})[0]
    np.testing.assert_array_equal(y, keep + later)
