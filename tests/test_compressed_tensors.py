"""Numerical contracts of the compressed-tensors ``pack-quantized`` layout (``qconvert.int4.formats``), the
``--format compressed-tensors`` writer path and ``qconvert convert-format``.

* Tensors: qconvert's packer writes the same int32 words as compressed-tensors' own ``pack_to_int32`` and its own
  decompressor reads them back to our dequantized weights; GPTQ and AWQ results dequantize identically from either
  layout (bit for bit); unpack(pack(q)) == q.
* Checkpoints: a compressed-tensors checkpoint written from a GPTQ/AWQ result dequantizes to exactly what the GPTQ/AWQ
  checkpoint does; GPTQ -> CT -> GPTQ and AWQ -> CT -> AWQ through ``qconvert convert-format`` give back the same
  bytes in every tensor (and the same quantization_config).
* Oracle: transformers with the ``compressed-tensors`` package loads every variant (W4A16/W8A16, groups and
  per-channel, symmetric and with zero points, tied and untied) on CPU; its logits equal a float model carrying our
  dequantized weights within fp16 rounding, and a checkpoint with a deliberately wrong packing order fails that
  comparison.
* Errors: what the layout cannot hold and bad sources exit 2 with a message naming the problem and the fix, no
  traceback, nothing under the final name.

Tests needing the compressed-tensors package skip when it is not installed.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from qconvert.cli import main
from qconvert.errors import QuantTypeError
from qconvert.int4 import (
    AWQConfig,
    GPTQConfig,
    QuantizedLinear,
    add_to_hessian,
    awq_quantization_config,
    dequantize_awq,
    dequantize_gptq,
    gptq,
    gptq_quantization_config,
    pack_awq,
    pack_gptq,
    quantize_awq,
    rtn,
    write_quantized_checkpoint,
)
from qconvert.int4.formats import (
    CT_METHOD,
    compressed_quantization_config,
    dequantize_compressed,
    layout_scheme,
    pack_compressed,
    unpack_compressed,
)

# transformers notes that from_pretrained's loading attributes (dequantize=True) override the checkpoint's own
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


pytestmark = [pytestmark, pytest.mark.usefixtures("one_thread")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hessian(k: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.randn(512, k, generator=g) * torch.linspace(0.2, 2.0, k)
    return 0.02 * torch.randn(64, k, generator=g), add_to_hessian(None, 0, x)[0]


SCHEMES = [(4, 128, True), (4, 32, False), (4, -1, True), (8, 64, True), (8, -1, False), (4, 64, False)]


def _same(a: QuantizedLinear, b: QuantizedLinear) -> None:
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.bits, a.group_size, a.sym) == (b.bits, b.group_size, b.sym)


# ---------------------------------------------------------------------------------------------------------------
# Tensors


@pytest.mark.parametrize("bits,group,sym", SCHEMES)
def test_layout_round_trips_and_dequantizes_like_gptq(bits: int, group: int, sym: bool) -> None:
    w, h = _hessian()
    q = gptq(w, h, GPTQConfig(bits=bits, group_size=group, sym=sym))
    t = pack_compressed(q)
    groups = 1 if group == -1 else 256 // group
    assert t["weight_packed"].dtype == torch.int32 and t["weight_packed"].shape == (64, 256 * bits // 32)
    assert t["weight_scale"].dtype == torch.float16 and t["weight_scale"].shape == (64, groups)
    assert t["weight_shape"].tolist() == [64, 256]
    assert ("weight_zero_point" in t) == (not sym)
    if not sym:
        assert t["weight_zero_point"].shape == (64 * bits // 32, groups)
    _same(unpack_compressed(t, bits, group, sym), q)
    assert torch.equal(dequantize_compressed(t, bits, group, sym), dequantize_gptq(pack_gptq(q), bits))


def test_awq_result_dequantizes_identically_from_both_layouts() -> None:
    w, _ = _hessian()
    q = quantize_awq(w, AWQConfig(group_size=64))
    t = pack_compressed(q)
    assert torch.equal(dequantize_compressed(t, 4, 64, False), dequantize_awq(pack_awq(q), 64))
    _same(unpack_compressed(t, 4, 64, False), q)


def test_zero_points_pad_to_whole_words() -> None:
    """36 output rows of 4-bit zero points fill 4.5 words: the last word is zero-padded, as compressed-tensors
    packs (ceil), and unpacking drops the padding."""
    q = rtn(torch.randn(36, 128, generator=_gen(1)), 4, 32, sym=False)
    t = pack_compressed(q)
    assert t["weight_zero_point"].shape == (5, 4)
    _same(unpack_compressed(t, 4, 32, False), q)


@pytest.mark.parametrize("bits,group,sym", SCHEMES + [(4, 32, False)])
def test_compressed_tensors_packs_the_same_words_and_reads_ours(ct, bits: int, group: int, sym: bool) -> None:
    """Oracle: compressed-tensors' own packer (on its signed codes) writes our words, and its own decompressor
    (``PackedQuantizationCompressor.decompress``) turns our tensors into our dequantized weight, rounded to fp16."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    q = rtn(torch.randn(40, 256, generator=_gen(bits + group)), bits, group, sym)
    t = pack_compressed(q)
    offset = 2 ** (bits - 1)  # compressed-tensors quantizes to signed ints and packs them + 2^(bits-1)
    assert torch.equal(pack_to_int32((q.codes.int() - offset).to(torch.int8), bits), t["weight_packed"])
    if not sym:
        theirs = pack_to_int32((q.zeros.int() - offset).to(torch.int8), bits, packed_dim=0)
        assert torch.equal(theirs, t["weight_zero_point"])
    args = QuantizationArgs(num_bits=bits, symmetric=sym, group_size=None if group == -1 else group,
                            strategy="channel" if group == -1 else "group")
    weight = PackedQuantizationCompressor.decompress(dict(t), QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(weight["weight"], q.dequantize().half())


def test_config_is_what_compressed_tensors_parses(ct) -> None:
    """compressed-tensors validates our quantization_config, and its W4A16 preset has our weights arguments."""
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    ours = compressed_quantization_config(4, 128, True)
    parsed = QuantizationConfig.model_validate(ours)
    assert parsed.format == "pack-quantized" and parsed.ignore == ["lm_head"] and parsed.quant_method == CT_METHOD
    preset = preset_name_to_scheme("W4A16", ["Linear"])
    assert parsed.config_groups["group_0"].weights == preset.weights
    channel = QuantizationConfig.model_validate(compressed_quantization_config(8, -1, False))
    w = channel.config_groups["group_0"].weights
    assert (w.num_bits, w.strategy, w.symmetric, w.group_size) == (8, "channel", False, None)
    assert layout_scheme(ours)[1].group_size == 128 and layout_scheme(compressed_quantization_config(8, -1, False))[
        1].group_size == -1


def test_layout_refuses_what_it_cannot_hold() -> None:
    w, h = _hessian()
    with pytest.raises(QuantTypeError, match="4 and 8-bit.*--format gptq"):
        pack_compressed(gptq(w, h, GPTQConfig(bits=3, group_size=64)))
    with pytest.raises(QuantTypeError, match="act-order.*--static-groups"):
        pack_compressed(gptq(w, h, GPTQConfig(desc_act=True, group_size=32)))
    static = gptq(w, h, GPTQConfig(desc_act=True, static_groups=True, group_size=32))
    assert torch.equal(dequantize_compressed(pack_compressed(static), 4, 32, True), static.dequantize())
    q = rtn(w, 4, 64, sym=False)
    with pytest.raises(QuantTypeError, match="marked symmetric"):
        pack_compressed(QuantizedLinear(q.codes, q.scales, q.zeros, q.g_idx, 4, 64, True))
    with pytest.raises(QuantTypeError, match="3-bit"):
        compressed_quantization_config(3, 128, True)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def _read_dir(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _calibrated(src: Path, fixture: str, method: str, cfg: GPTQConfig | AWQConfig
                ) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
    """The real driver's GPTQ/AWQ result on a fixture: linears and AWQ's rescaled float tensors."""
    from qconvert.calibration.quantize import calibrate
    from qconvert.fixtures.corpus import training_text
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode

    ids = encode(training_text(), FIXTURES[fixture])[: 4 * 128].reshape(4, 128)
    linears: dict[str, QuantizedLinear] = {}
    floats: dict[str, torch.Tensor] = {}
    calibrate(src, ids, method, cfg, linears.__setitem__, floats.__setitem__, holdout=None)
    return linears, floats


@pytest.fixture(scope="module")
def results(model_dir):
    """(fixture, method, cfg) -> calibrated result, computed once per module."""
    made: dict[tuple, tuple] = {}

    def get(fixture: str, method: str, cfg: GPTQConfig | AWQConfig):
        key = (fixture, method, repr(cfg))
        if key not in made:
            made[key] = _calibrated(model_dir(fixture), fixture, method, cfg)
        return made[key]

    return get


def _native(method: str, cfg: GPTQConfig | AWQConfig) -> dict:
    return gptq_quantization_config(cfg) if method == "gptq" else awq_quantization_config(cfg)  # type: ignore[arg-type]


def _ct_config(method: str, cfg: GPTQConfig | AWQConfig) -> dict:
    from qconvert.pipelines.int4 import int4_quantization_config

    return int4_quantization_config(cfg, CT_METHOD)


CASES = [  # fixture, method, config
    ("tiny-untied", "gptq", GPTQConfig()),
    ("tiny-tied", "awq", AWQConfig()),
    ("tiny-tied", "gptq", GPTQConfig(bits=8, group_size=-1)),
    ("tiny-untied", "gptq", GPTQConfig(sym=False, group_size=32)),
    ("tiny-tied", "gptq", GPTQConfig(group_aware=True, group_size=64)),
]
IDS = ["untied-gptq-w4g128", "tied-awq-w4g128-zp", "tied-gptq-w8-channel", "untied-gptq-w4g32-asym",
       "tied-gptq-w4g64-group-aware"]


@pytest.mark.parametrize("fixture,method,cfg", CASES, ids=IDS)
def test_compressed_checkpoint_dequantizes_exactly_like_the_native_one(model_dir, results, tmp_path: Path,
                                                                         fixture, method, cfg) -> None:
    """Same linears into both layouts: qconvert's reader dequantizes every tensor of both checkpoints to the same
    float32 values (bit for bit); the compressed-tensors directory has no quantize_config.json and
    lists only lm_head in ``ignore``; the writer predicted its size exactly."""
    from qconvert.int4 import QuantizedCheckpointWriter
    from qconvert.int4.formats import dequantized_tensors
    from qconvert.io.safetensors import SafetensorsCheckpoint

    src = model_dir(fixture)
    linears, floats = results(fixture, method, cfg)
    native = write_quantized_checkpoint(src, tmp_path / "native", linears, _native(method, cfg), floats=floats,
                                        tp_sizes=())
    with QuantizedCheckpointWriter(src, tmp_path / "ct", _ct_config(method, cfg), tp_sizes=(),
                                   max_shard_bytes=200_000) as w:
        predicted = w.data_bytes()
        for m, q in linears.items():
            w.add_linear(m, q)
        for n, v in floats.items():
            w.add_float(n, v)
        ct_dir = w.finish()
    tensors = _read_dir(ct_dir)
    assert predicted == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (ct_dir / "model.safetensors.index.json").exists() and not (ct_dir / "quantize_config.json").exists()
    config = json.loads((ct_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == CT_METHOD and config["torch_dtype"] == "float16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (ct_dir / f).read_bytes() == (src / f).read_bytes()
    a = dequantized_tensors(SafetensorsCheckpoint(native), "", json.loads((native / "config.json").read_text())[
        "quantization_config"])
    b = dequantized_tensors(SafetensorsCheckpoint(ct_dir), "", config["quantization_config"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("fixture,method,cfg", CASES[:2] + CASES[3:], ids=IDS[:2] + IDS[3:])
def test_round_trips_through_compressed_tensors_are_byte_exact(model_dir, results, tmp_path: Path, capsys,
                                                                fixture, method, cfg) -> None:
    """native -> CT -> native with ``qconvert convert-format``: every tensor has the same bytes, config.json's
    quantization_config is the same, and the CT directory equals the one written straight from the result."""
    src = model_dir(fixture)
    linears, floats = results(fixture, method, cfg)
    native = write_quantized_checkpoint(src, tmp_path / "model-gptq-int4", linears, _native(method, cfg),
                                        floats=floats, tp_sizes=())
    direct = write_quantized_checkpoint(src, tmp_path / "direct", linears, _ct_config(method, cfg), floats=floats,
                                        tp_sizes=())
    ct_dir, back = tmp_path / "ct", tmp_path / "back"
    assert _cli(capsys, ["convert-format", str(native), "--to", CT_METHOD, "--output", str(ct_dir)])[0] == 0
    assert _cli(capsys, ["convert-format", str(ct_dir), "--to", method, "--output", str(back)])[0] == 0
    t0, t1, t2 = _read_dir(native), _read_dir(ct_dir), _read_dir(back)
    assert t0.keys() == t2.keys()
    for name in t0:
        assert t0[name].dtype == t2[name].dtype and torch.equal(t0[name], t2[name]), name
    td = _read_dir(direct)
    assert td.keys() == t1.keys() and all(torch.equal(td[n], t1[n]) for n in td)
    cfg0, cfg2 = (json.loads((d / "config.json").read_text())["quantization_config"] for d in (native, back))
    assert cfg0 == cfg2
    assert "compressed-tensors" in (ct_dir / "README.md").read_text()


def test_convert_format_default_name_and_gptq_to_awq(model_dir, results, tmp_path: Path, capsys) -> None:
    """Without --output the name gains (or loses) -ct beside the source; a symmetric GPTQ 4-bit g128 result also
    re-packs into AWQ (zero point 8 everywhere) and dequantizes to the same weights."""
    from qconvert.int4.formats import dequantized_tensors
    from qconvert.io.safetensors import SafetensorsCheckpoint

    src = model_dir("tiny-untied")
    linears, _ = results("tiny-untied", "gptq", GPTQConfig())
    native = write_quantized_checkpoint(src, tmp_path / "tiny-gptq-int4", linears, _native("gptq", GPTQConfig()),
                                        tp_sizes=())
    rc, err = _cli(capsys, ["convert-format", str(native), "--to", CT_METHOD])
    assert rc == 0, err
    assert (tmp_path / "tiny-gptq-int4-ct" / "config.json").exists()
    rc, err = _cli(capsys, ["convert-format", str(native), "--to", "awq", "--output", str(tmp_path / "awq")])
    assert rc == 0, err
    qa = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    a = dequantized_tensors(SafetensorsCheckpoint(native), "", _native("gptq", GPTQConfig()))
    b = dequantized_tensors(SafetensorsCheckpoint(tmp_path / "awq"), "", qa)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ---------------------------------------------------------------------------------------------------------------
# Oracle: transformers + compressed-tensors


def _reference(model, linears, floats):
    """A float32 copy of ``model`` computing what the checkpoint stores: our dequantized weights, fp16 floats."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            p.copy_(p.half().float())
        for module, q in linears.items():
            ref.get_submodule(module).weight.copy_(q.dequantize())
        for name, value in floats.items():
            ref.get_parameter(name).copy_(value.half().float())
    return ref


def _logits(model, ids, dtype=None):
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def _eval_ids(fixture: str):
    from qconvert.fixtures.corpus import eval_text
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode

    return encode(eval_text(), FIXTURES[fixture])[: 2 * 64].reshape(2, 64)


def _swap_nibble_order(path: Path) -> None:
    """Rewrite every weight_packed with AWQ's nibble order (0 2 4 6 1 3 5 7) instead of the plain one: the wrong
    packing order a careless port would produce. Shapes and dtypes stay valid, so only the numbers can tell."""
    from safetensors.torch import load_file, save_file

    from qconvert.int4.formats import AWQ_ORDER, pack_bits, unpack_bits

    for f in path.glob("*.safetensors"):
        t = load_file(f)
        for name in [n for n in t if n.endswith("weight_packed")]:
            codes = unpack_bits(t[name].T.contiguous(), 4)  # [K, N]
            k, n = codes.shape
            codes = codes.reshape(k // 8, 8, n)[:, list(AWQ_ORDER)].reshape(k, n)
            t[name] = pack_bits(codes, 4).T.contiguous()
        save_file(t, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("fixture,method,cfg", CASES, ids=IDS)
def test_transformers_loads_it_and_reproduces_our_dequantized_model(ct, model_dir, results, tmp_path: Path,
                                                                     fixture, method, cfg) -> None:
    """transformers (compressed-tensors decompresses on CPU) loads the checkpoint in fp16; its logits equal the
    float32 model carrying our dequantized weights within 4x the fp16 rounding of that model itself (+1e-3), the
    unquantized model is >= 5x further away (mean |delta|), and a wrong packing order is caught."""
    from transformers import AutoModelForCausalLM

    src = model_dir(fixture)
    linears, floats = results(fixture, method, cfg)
    out = write_quantized_checkpoint(src, tmp_path / "ct", linears, _ct_config(method, cfg), floats=floats,
                                     max_shard_bytes=1 << 20, tp_sizes=())
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = _eval_ids(fixture)
    ref = _reference(model, linears, floats)
    ref32, unquantized = _logits(ref, ids), _logits(model, ids)
    tol = 4 * float((_logits(ref, ids, torch.float16) - ref32).abs().max()) + 1e-3

    for route in _routes(cfg):
        hf = _load(out, route)
        assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == hf.config.tie_word_embeddings
        got = _logits(hf, ids)
        assert float((got - ref32).abs().max()) <= tol, route
        assert float((unquantized - got).abs().mean()) >= 5 * float((ref32 - got).abs().mean()), route

    if cfg.bits == 4:  # the control: same checkpoint, nibbles in AWQ's order
        wrong = tmp_path / "wrong"
        shutil.copytree(out, wrong)
        _swap_nibble_order(wrong)
        bad = _logits(_load(wrong, _routes(cfg)[0]), ids)
        assert float((bad - ref32).abs().max()) > 10 * tol


def _routes(cfg: GPTQConfig | AWQConfig) -> tuple[str, ...]:
    """transformers' two compressed-tensors routes: ``dequantize`` (decompress each weight while loading) and
    ``compressed`` (the default: compressed modules, decompressed on the first forward). The default route cannot
    load asymmetric pack-quantized checkpoints with transformers 5.23 + compressed-tensors 0.20 (its meta-device
    compression leaves weight_zero_point unpacked, [out, groups], so the packed [out·bits/32, groups] tensor is
    dropped as a size mismatch: llm-compressor#1618), whoever wrote them; vLLM reads them with its own loader."""
    sym = cfg.sym if isinstance(cfg, GPTQConfig) else not cfg.zero_point
    return ("dequantize", "compressed") if sym else ("dequantize",)


def _load(path: Path, route: str):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if route == "dequantize" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, **extra).eval()


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _fails_cleanly(capsys, argv: list[str], needles: tuple[str, ...], final: Path) -> None:
    rc, err = _cli(capsys, argv)
    assert rc == 2, err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err
    assert not final.exists()
    assert not list(final.parent.glob(f".{final.name}.partial-*"))


@pytest.fixture
def gptq_dir(model_dir, tmp_path: Path) -> Path:
    """A symmetric 4-bit g64 RTN GPTQ checkpoint of tiny-untied (no calibration needed for error paths)."""
    from qconvert.io.safetensors import SafetensorsCheckpoint

    src = model_dir("tiny-untied")
    ckpt = SafetensorsCheckpoint(src)
    linears = {n.removesuffix(".weight"): rtn(torch.from_numpy(ckpt.read_f32(n)), 4, 64) for n in ckpt.names()
               if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    return write_quantized_checkpoint(src, tmp_path / "src-gptq", linears,
                                      gptq_quantization_config(GPTQConfig(group_size=64)), tp_sizes=())


def test_convert_format_refuses_bad_sources(model_dir, gptq_dir: Path, tmp_path: Path, capsys) -> None:
    final = tmp_path / "out"
    _fails_cleanly(capsys, ["convert-format", str(model_dir("tiny-untied")), "--to", CT_METHOD, "--output",
                            str(final)], ("not a quantized checkpoint", "qconvert gptq"), final)
    _fails_cleanly(capsys, ["convert-format", str(tmp_path / "nowhere"), "--to", CT_METHOD, "--output", str(final)],
                   ("no config.json",), final)
    bad = tmp_path / "bad-group"
    shutil.copytree(gptq_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["group_size"] = 128  # the tensors hold group 64
    (bad / "config.json").write_text(json.dumps(config))
    _fails_cleanly(capsys, ["convert-format", str(bad), "--to", CT_METHOD, "--output", str(final)],
                   ("group size 128", "disagree"), final)
    _fails_cleanly(capsys, ["convert-format", str(gptq_dir), "--to", CT_METHOD, "--output", str(gptq_dir / "x")],
                   ("inside the input",), gptq_dir / "x")


def test_convert_format_refuses_what_the_target_cannot_hold(model_dir, tmp_path: Path, capsys) -> None:
    from qconvert.io.safetensors import SafetensorsCheckpoint

    src = model_dir("tiny-untied")
    ckpt = SafetensorsCheckpoint(src)
    weights = {n.removesuffix(".weight"): torch.from_numpy(ckpt.read_f32(n)) for n in ckpt.names()
               if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    final = tmp_path / "out"
    g = _gen(5)
    act = {m: gptq(w, add_to_hessian(None, 0, torch.randn(300, w.shape[1], generator=g) *
                                     torch.rand(w.shape[1], generator=g))[0], GPTQConfig(desc_act=True, group_size=64))
           for m, w in weights.items()}
    act_dir = write_quantized_checkpoint(src, tmp_path / "act", act, gptq_quantization_config(
        GPTQConfig(desc_act=True, group_size=64)), tp_sizes=())
    _fails_cleanly(capsys, ["convert-format", str(act_dir), "--to", CT_METHOD, "--output", str(final)],
                   ("act-order", "Keep the GPTQ layout"), final)
    _fails_cleanly(capsys, ["convert-format", str(act_dir), "--to", "awq", "--output", str(final)],
                   ("act-order", "gptq or compressed-tensors"), final)
    eight = write_quantized_checkpoint(src, tmp_path / "w8", {m: rtn(w, 8, 128) for m, w in weights.items()},
                                       gptq_quantization_config(GPTQConfig(bits=8)), tp_sizes=())
    _fails_cleanly(capsys, ["convert-format", str(eight), "--to", "awq", "--output", str(final)],
                   ("8-bit", "AWQ GEMM"), final)
    three = write_quantized_checkpoint(src, tmp_path / "w3", {m: rtn(w, 3, 128) for m, w in weights.items()},
                                       gptq_quantization_config(GPTQConfig(bits=3)), tp_sizes=())
    _fails_cleanly(capsys, ["convert-format", str(three), "--to", CT_METHOD, "--output", str(final)],
                   ("3-bit", "GPTQ layout"), final)
    # AWQ zero point 0 (an all-positive group) has no GPTQ v1 encoding; compressed-tensors holds it
    awq = {m: quantize_awq(w.abs() + 0.01) for m, w in weights.items()}
    assert any(int(q.zeros.min()) == 0 for q in awq.values())
    awq_dir = write_quantized_checkpoint(src, tmp_path / "awq", awq, awq_quantization_config(AWQConfig()),
                                         tp_sizes=())
    _fails_cleanly(capsys, ["convert-format", str(awq_dir), "--to", "gptq", "--output", str(final)],
                   ("zero point 0", "compressed-tensors instead"), final)
    assert _cli(capsys, ["convert-format", str(awq_dir), "--to", CT_METHOD, "--output", str(final)])[0] == 0


@pytest.mark.parametrize("argv,needles", [
    (["gptq", "--bits", "3", "--format", CT_METHOD], ("3-bit", "--format gptq")),
    (["gptq", "--act-order", "--format", CT_METHOD], ("--act-order", "--static-groups")),
])
def test_quantize_refuses_schemes_the_layout_cannot_hold_before_any_work(model_dir, tmp_path: Path, capsys,
                                                                         monkeypatch, argv, needles) -> None:
    """Refused before calibration: the calibration driver is replaced by one that fails the test if reached."""
    def never(*a, **k):
        raise AssertionError("calibration ran before the layout check")

    monkeypatch.setattr("qconvert.calibration.quantize.calibrate", never)
    out = tmp_path / "out"
    rc, err = _cli(capsys, [argv[0], "--model", str(model_dir("tiny-untied")), *argv[1:], "--out-dir", str(out),
                            "--quiet", "--no-eval"])
    assert rc == 2 and all(n in err for n in needles) and "Traceback" not in err, err
    assert not out.exists() or not any(out.iterdir())


def test_cli_gptq_writes_compressed_tensors_and_verify_reads_it(model_dir, tmp_path: Path, capsys) -> None:
    """``qconvert gptq --format compressed-tensors`` end to end (with the quality measurement, which reads the
    checkpoint back through qconvert's streamed dequantized forward): output name ``-ct``, a card that tells how to
    load it, no GPTQ sidecar."""
    src = model_dir("tiny-tied")
    rc, err = _cli(capsys, ["gptq", "--model", str(src), "--format", CT_METHOD, "--calib-samples", "4",
                            "--calib-seqlen", "64", "--out-dir", str(tmp_path), "--quiet", "--device", "cpu"])
    assert rc == 0, err
    out = tmp_path / f"{src.name}-gptq-int4-ct"
    card = (out / "README.md").read_text()
    assert "compressed-tensors" in card and "gptqmodel" not in card and "Measured quality" in card
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == CT_METHOD and q["qconvert"]["method"] == "gptq"
    assert not (out / "quantize_config.json").exists()


def test_verify_runs_compressed_tensors_like_the_gptq_checkpoint(ct, model_dir, results, tmp_path: Path,
                                                                 capsys) -> None:
    """``qconvert verify`` on the CT and GPTQ directories of one result (asymmetric g32, zero points written):
    qconvert-dequant gives the same figures for both (same dequantized weights); transformers + compressed-tensors
    (decompressed while loading, bf16 reference dtype aside) agrees within fp rounding; bits per weight count the
    packed codes, scales and zero points."""
    from qconvert.verify import ArtifactResult

    src = model_dir("tiny-untied")
    cfg = GPTQConfig(sym=False, group_size=32)
    linears, _ = results("tiny-untied", "gptq", cfg)
    native = write_quantized_checkpoint(src, tmp_path / "g", linears, _native("gptq", cfg), tp_sizes=())
    ct_dir = write_quantized_checkpoint(src, tmp_path / "c", linears, _ct_config("gptq", cfg), tp_sizes=())
    out = tmp_path / "verify.json"
    rc, err = _cli(capsys, ["verify", str(native), str(ct_dir), "--reference", str(src), "--ctx", "128", "--chunks",
                            "2", "--json", str(out), "--runtime", "qconvert-dequant", "--runtime", "transformers"])
    assert rc == 0, err
    rs = {(r.name, r.runtime): r for r in map(ArtifactResult.from_dict, json.loads(out.read_text())["results"])}
    g, c, t = rs["g", "qconvert-dequant"], rs["c", "qconvert-dequant"], rs["c", "transformers"]
    assert c.kind == "compressed-tensors" and c.format == "w4a16-g32-zp"
    assert (c.ppl, c.kl_mean, c.top1) == (g.ppl, g.kl_mean, g.top1)
    assert abs(t.ppl - c.ppl) / c.ppl < 0.01 and abs(t.kl_mean - c.kl_mean) < 0.01
    assert 4 < c.bits_per_weight < 6 and abs(c.bits_per_weight - g.bits_per_weight) < 0.2
