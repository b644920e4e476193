"""Numerical contracts of the ONNX export (``qconvert.onnx_export``) against independent runtimes.

* MatMulNBits weights: our numpy unpacking *and* onnxruntime running one MatMulNBits node on an identity input
  both give exactly ``dequantize_gptq`` / ``dequantize_awq`` (sym GPTQ, asym GPTQ, AWQ; several block sizes).
* Logits: onnxruntime (CPU EP) on every exported fixture vs transformers' ``Qwen2ForCausalLM`` in float32 on the
  same weights: fp32 within 1e-4 of max|logit| (measured ~1e-6), fp16 within 2e-3 (measured ~5e-4), int4 within
  1e-4 of transformers carrying the dequantized int4 weights (RTN, GPTQ, AWQ; calibrated and --from).
* KV cache: prefill + decode steps == one full-sequence run; a left-padded batch == the unpadded sequence.
* Greedy: 20 tokens on the trained ``demo`` fixture equal torch's greedy; onnxruntime-genai loads the folder and
  generates the same tokens.
* Bad input fails before anything is written, and leaves nothing behind.
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


def ort_dequantize(w: mnb.MatMulNBitsWeight) -> np.ndarray:
    """The weight [N, K] onnxruntime uses: one MatMulNBits node applied to the identity."""
    inits = [numpy_helper.from_array(w.b, "b"), numpy_helper.from_array(w.scales, "s")]
    inputs = ["a", "b", "s"]
    if w.zero_points is not None:
        inits.append(numpy_helper.from_array(w.zero_points, "z"))
        inputs.append("z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=w.k, N=w.n, bits=4,
                            block_size=w.block_size, accuracy_level=0)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, w.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"a": np.eye(w.k, dtype=np.float32)})[0].T


@pytest.mark.parametrize("k,block", [(256, 32), (256, 128), (96, 32), (512, 64)])
@pytest.mark.parametrize("scheme", ["gptq-sym", "gptq-asym", "awq"])
def test_matmulnbits_dequant_equals_checkpoint_dequant(scheme: str, k: int, block: int) -> None:
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(k + block)) * 0.05
    w[:, 3] *= 20  # an outlier column, as in real models
    if scheme == "awq":
        packed = pack_awq(rtn(w, 4, block, sym=False))
        ref, q = dequantize_awq(packed, block).numpy(), unpack_awq(packed, block)
    else:
        sym = scheme == "gptq-sym"
        packed = pack_gptq(rtn(w, 4, block, sym=sym, min_zero=0 if sym else 1))
        ref, q = dequantize_gptq(packed, 4).numpy(), unpack_gptq(packed, 4, block, sym)
    m = mnb.from_quantized(q)
    assert m.b.shape == (48, k // block, block // 2) and m.scales.shape == (48 * k // block,)
    assert (m.zero_points is None) == (scheme == "gptq-sym")
    np.testing.assert_array_equal(mnb.dequantize(m), ref)
    np.testing.assert_array_equal(ort_dequantize(m), ref)


def test_symmetric_gptq_zero_point_is_onnxruntimes_default() -> None:
    """Sym GPTQ stores z' = 7 (0x77777777 words); z = 8 is exactly MatMulNBits' default, so no zero_points."""
    packed = pack_gptq(rtn(torch.randn(16, 64) * 0.1, 4, 32, sym=True))
    assert (packed["qzeros"].numpy().view(np.uint32) == 0x77777777).all()
    assert mnb.DEFAULT_ZERO_POINT == 8 and mnb.from_quantized(unpack_gptq(packed, 4, 32, True)).zero_points is None


def test_act_order_group_indices_are_refused() -> None:
    q = rtn(torch.randn(16, 64), 4, 32, sym=True)
    permuted = dataclasses.replace(q, g_idx=torch.tensor(np.random.default_rng(0).permutation(64) // 32, dtype=torch.int32))
    with pytest.raises(QuantTypeError, match="static-groups"):
        mnb.from_quantized(permuted)


# ------------------------------------------------------------------------------------------------------------
# Logits vs transformers


@pytest.mark.parametrize("name", ["tiny-tied", "tiny-untied", "tiny-fallback", "demo"])
@pytest.mark.parametrize("precision,bound", [("fp32", FP32_REL), ("fp16", FP16_REL)])
def test_float_logits_match_transformers(exported, model_dir, name: str, precision: str, bound: float) -> None:
    ids = prompt()
    ref = hf_logits(hf_model(model_dir(name)), ids)
    got = OnnxModel(exported(name, precision)).logits(ids)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert rel(got, ref) < bound
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= (1.0 if precision == "fp32" else 0.95)


def rtn_weights(path: Path, block: int, sym: bool = True) -> dict[str, torch.Tensor]:
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(path)
    return {f"model.layers.{i}.{s}.weight": rtn(torch.from_numpy(ckpt.read_f32(f"model.layers.{i}.{s}.weight")), 4,
                                                block, sym=sym).dequantize()
            for i in range(n_layers(path)) for s in LINEARS}


@pytest.mark.parametrize("name,block", [("tiny-tied", 128), ("tiny-untied", 32), ("demo", 64)])
def test_int4_rtn_matches_transformers_on_dequantized_weights(exported, model_dir, name: str, block: int) -> None:
    ids = prompt()
    ref = hf_logits(hf_model(model_dir(name), rtn_weights(model_dir(name), block)), ids)
    assert rel(OnnxModel(exported(name, "int4", block_size=block)).logits(ids), ref) < INT4_REL


@pytest.mark.parametrize("algo", ["gptq", pytest.param("awq", marks=pytest.mark.slow)])
def test_calibrated_int4_matches_its_own_quantization(model_dir, tmp_path, algo: str) -> None:
    """The export carries exactly what the calibration driver produced (codes, scales, AWQ's rescaled norms)."""
    from qconvert.calibration.quantize import calibrate
    from qconvert.calibset import load_calibration
    from qconvert.constants import DEFAULT_HOLDOUT

    path = model_dir("tiny-tied")
    calib = load_calibration("builtin", path, chat=False, n_samples=2, seq_len=32)
    linears: dict = {}
    floats: dict = {}
    cfg = GPTQConfig(group_size=64) if algo == "gptq" else AWQConfig(group_size=64)
    # the export calibrates with the held-out guard on, as every product path does
    calibrate(path, calib.ids, algo, cfg, linears.__setitem__, floats.__setitem__, holdout=DEFAULT_HOLDOUT)
    replace = {f"{m}.weight": q.dequantize() for m, q in linears.items()} | floats
    ids = prompt()
    out = export_onnx(path, tmp_path, precision="int4", algo=algo, block_size=64, calib=calib)
    assert rel(OnnxModel(out).logits(ids), hf_logits(hf_model(path, replace), ids)) < INT4_REL


def write_checkpoint(src: Path, out: Path, method: str, block: int, sym: bool = True, act_order: bool = False) -> Path:
    """A GPTQ v1 / AWQ GEMM checkpoint of ``src`` with RTN codes (no calibration needed)."""
    from qconvert.io.safetensors import SafetensorsCheckpoint

    qcfg = (gptq_quantization_config(GPTQConfig(group_size=block, sym=sym, desc_act=act_order)) if method == "gptq"
            else awq_quantization_config(AWQConfig(group_size=block)))
    ckpt = SafetensorsCheckpoint(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer = QuantizedCheckpointWriter(src, out, qcfg)
    with writer:
        for i in range(n_layers(src)):
            for s in LINEARS:
                w = torch.from_numpy(ckpt.read_f32(f"model.layers.{i}.{s}.weight"))
                q = rtn(w, 4, block, sym=sym and method == "gptq", min_zero=1 if method == "gptq" and not sym else 0)
                if act_order:
                    perm = np.random.default_rng(i).permutation(w.shape[1])
                    q = dataclasses.replace(q, g_idx=torch.tensor(perm // block, dtype=torch.int32))
                writer.add_linear(f"model.layers.{i}.{s}", q)
        writer.finish()
    return out


@pytest.mark.parametrize("method,sym,block", [("gptq", True, 128), ("gptq", False, 64), ("awq", False, 32)])
def test_from_checkpoint_matches_its_dequantized_weights(model_dir, tmp_path, method: str, sym: bool, block: int) -> None:
    from qconvert.io.safetensors import SafetensorsCheckpoint

    qdir = write_checkpoint(model_dir("tiny-untied"), tmp_path / "q", method, block, sym)
    ckpt = SafetensorsCheckpoint(qdir)
    replace = {n: torch.from_numpy(ckpt.read_f32(n)) for n in ckpt.names() if n.endswith((".weight", ".bias"))}
    for i in range(n_layers(qdir)):
        for s in LINEARS:
            m = f"model.layers.{i}.{s}"
            t = {k: torch.from_numpy(ckpt.read_f32(f"{m}.{k}") if k == "scales" else ckpt.read_raw(f"{m}.{k}").copy())
                 for k in (("qweight", "qzeros", "scales", "g_idx") if method == "gptq" else ("qweight", "qzeros", "scales"))}
            replace[f"{m}.weight"] = dequantize_gptq(t, 4) if method == "gptq" else dequantize_awq(t, block)
    out = export_onnx(qdir, tmp_path, precision="int4", from_dir=qdir, block_size=block)
    assert out.name == "q-onnx-int4"
    ids = prompt()
    ref = hf_logits(hf_model(model_dir("tiny-untied"), replace), ids)  # the float model carrying qdir's tensors
    assert rel(OnnxModel(out).logits(ids), ref) < INT4_REL
    has_zp = any(i.name.endswith("zero_points") for i in onnx.load(out / "model.onnx").graph.initializer)
    assert has_zp == (not sym)


# ------------------------------------------------------------------------------------------------------------
# KV cache, padding, greedy, onnxruntime-genai


@pytest.mark.parametrize("precision,bound", [("fp32", 1e-5), ("fp16", 1e-3), ("int4", 1e-5)])
def test_prefill_plus_decode_equals_full_sequence(exported, precision: str, bound: float) -> None:
    m = OnnxModel(exported("demo", precision))
    ids = prompt(32, seed=1)
    full = m.logits(ids)
    logits, cache = m.step(ids[:24], m.empty_cache())
    steps = [logits]
    for t in ids[24:]:
        logits, cache = m.step([t], cache)
        steps.append(logits)
    assert next(iter(cache.values())).shape[2] == len(ids)
    assert rel(np.concatenate(steps), full) < bound


def test_left_padded_batch_equals_single_sequence(exported) -> None:
    m = OnnxModel(exported("demo", "fp32"))
    ids, pad = prompt(12), 5
    batch_ids = np.array([[0] * pad + ids, prompt(12 + pad, seed=3)], np.int64)
    mask = np.ones_like(batch_ids)
    mask[0, :pad] = 0
    positions = np.stack([np.r_[np.zeros(pad, np.int64), np.arange(12)], np.arange(12 + pad)])
    empty = {n: np.zeros((2, m.kv_heads, 0, m.head_dim), np.float32) for n in m.past_names}
    out = m.session.run(["logits"], {"input_ids": batch_ids, "attention_mask": mask, "position_ids": positions, **empty})
    got = out[0][0, pad:]
    assert np.isfinite(out[0]).all() and rel(got, m.logits(ids)) < 1e-5


def demo_prompt(path: Path) -> list[int]:
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    return Tokenizer.from_file(str(path / "tokenizer.json")).encode(eval_text()[:400]).ids[:48]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4"])
def test_greedy_20_tokens_equals_torch_on_demo(exported, model_dir, precision: str) -> None:
    path = model_dir("demo")
    replace = rtn_weights(path, 128) if precision == "int4" else None
    ids = demo_prompt(path)
    assert OnnxModel(exported("demo", precision)).greedy(ids, 20) == hf_greedy(hf_model(path, replace), ids, 20)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int4"])
def test_onnxruntime_genai_loads_and_generates(exported, model_dir, precision: str) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    out = exported("demo", precision)
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
        export_onnx(tied, tmp_path, precision="int8")
    with pytest.raises(QuantTypeError, match="320 input columns, not a multiple of block size 128"):
        export_onnx(model_dir("tiny-fallback"), tmp_path, precision="int4", block_size=128)
    with pytest.raises(CheckpointError, match="not a GPTQ or AWQ checkpoint"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=tied)
    with pytest.raises(CheckpointError, match="rope_scaling"):
        export_onnx(model_dir("tiny-yarn"), tmp_path, precision="fp32")
    write_checkpoint(tied, gptq_dir, "gptq", 64, act_order=True)
    with pytest.raises(CheckpointError, match="act-order"):
        export_onnx(tied, tmp_path, precision="int4", from_dir=gptq_dir, block_size=64)
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
    assert len(list(tmp_path.iterdir())) == 1


# ------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("precision,bound", [("fp32", 1e-3), ("fp16", 5e-3), ("int4", 1e-3)])
def test_cuda_matches_cpu(exported, precision: str, bound: float) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here")
    out = exported("demo", precision)
    ids = prompt()
    gpu, cpu = OnnxModel(out, device="cuda"), OnnxModel(out)
    assert rel(gpu.logits(ids), cpu.logits(ids)) < bound
    assert gpu.greedy(ids, 20) == cpu.greedy(ids, 20)
