"""Numerical contracts of W8A8 INT8 (``qconvert w8a8``): the compressed-tensors ``int-quantized`` layout, per-token
activation quantization and SmoothQuant (``qconvert.int4.smoothquant``, ``qconvert.w8a8``).

* Tensors: ``pack_int8``/``unpack_int8`` are exact inverses; compressed-tensors' own compressor decompresses our
  ``weight``/``weight_scale`` to our dequantized weight and compresses that weight back to our int8 codes; our
  per-token quantizer equals compressed-tensors' dynamic token quantization on its grid (max|x| / 127.5) and the
  definition on vLLM's (max|x| / 127).
* Config: compressed-tensors parses our ``quantization_config`` into exactly its ``W8A8`` preset.
* SmoothQuant: the smoothed float checkpoint computes the same logits as the source (transformers, 1e-4) while the
  smoothed sites' activation maxima become max|X|·... ≤ the source's largest outlier ratio.
* Oracle: transformers + compressed-tensors loads the W8A8 checkpoints (RTN; SmoothQuant + GPTQ) on CPU. Its default
  route runs W8A8 (int8 activations simulated per token): in float32 its logits equal, within 1e-4, a float32 model
  carrying our dequantized weights with every linear input fake-quantized on compressed-tensors' grid; the
  weights-only model (no activation quantization) is >= 5x further away. Its ``dequantize=True`` route drops the
  activation scheme and equals the weights-only model. A checkpoint whose ``weight_scale`` is stored as [1, N]
  instead of [N, 1] fails to load or misses by > 100x the tolerance.
* qconvert's own W8A8 forward (``qconvert.w8a8.w8a8_logits``, what ``qconvert verify`` runs) equals that reference on
  vLLM's grid within 1e-4.
* Errors: W8A8 checkpoints into weight-only layouts, non-W8A8 int-quantized configs, bad options: exit 2, a message
  naming the fix, nothing under the final name.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from qconvert.cli import main
from qconvert.errors import CheckpointError, QuantTypeError
from qconvert.int4 import rtn
from qconvert.int4.formats import (
    CT_INT_FORMAT,
    W8A8_ACTIVATIONS,
    layout_scheme,
    pack_int8,
    unpack_int8,
    w8a8_quantization_config,
)
from qconvert.int4.smoothquant import fake_quantize_tokens, quantize_tokens, smooth_scales

pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

CT_GRID = 127.5  # compressed-tensors' simulated per-token scale: max|x| / (255 / 2)


pytestmark = [pytestmark, pytest.mark.usefixtures("one_thread")]


def _weight(out: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    w[3, 5] = 9.0  # an outlier row
    w[7] = 0.0  # an all-zero row
    return w


# ---------------------------------------------------------------------------------------------------------------
# Tensors and config


def test_int8_layout_round_trips_exactly() -> None:
    q = rtn(_weight(), 8, -1, True)
    t = pack_int8(q)
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (48, 96)
    assert t["weight_scale"].dtype == torch.float16 and t["weight_scale"].shape == (48, 1)
    assert int(t["weight"].min()) >= -128 and int(t["weight"].max()) <= 127
    back = unpack_int8(t)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales) and torch.equal(back.zeros, q.zeros)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_compressed_tensors_reads_and_writes_the_same_int8(ct) -> None:
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    q = rtn(_weight(seed=1), 8, -1, True)
    t = pack_int8(q)
    scheme = QuantizationScheme(targets=["Linear"], weights=w8a8_quantization_config()["config_groups"]["group_0"]
                                ["weights"], input_activations=dict(W8A8_ACTIVATIONS))
    dense = IntQuantizationCompressor.decompress({"weight": t["weight"], "weight_scale": t["weight_scale"].float()},
                                                 scheme)
    assert torch.equal(dense["weight"].float(), q.dequantize())
    packed = IntQuantizationCompressor.compress({"weight": q.dequantize(), "weight_scale": t["weight_scale"].float()},
                                                scheme)
    assert torch.equal(packed["weight"], t["weight"])


def test_config_is_compressed_tensors_w8a8_preset(ct) -> None:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme

    parsed = QuantizationConfig.model_validate(w8a8_quantization_config())
    assert parsed.format == CT_INT_FORMAT and parsed.ignore == ["lm_head"]
    ours = parsed.config_groups["group_0"]
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert isinstance(ours, QuantizationScheme)
    assert ours.weights == preset.weights and ours.input_activations == preset.input_activations
    layout, scheme = layout_scheme(w8a8_quantization_config())
    assert layout.name == CT_INT_FORMAT and layout.dynamic_activations and (scheme.bits, scheme.group_size) == (8, -1)


def test_per_token_quantization_matches_compressed_tensors_and_vllm(ct) -> None:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.1, 30, 64)
    x[0, 3] = 0.0  # an all-zero token
    args = QuantizationArgs(**W8A8_ACTIVATIONS)
    scale, zp = compute_dynamic_scales_and_zp(x, args, torch.nn.Linear(64, 1))
    assert torch.equal(fake_quantize_tokens(x, CT_GRID)[x.abs().amax(-1) > 0],
                       fake_quantize(x, scale, zp, args)[x.abs().amax(-1) > 0])
    q, s = quantize_tokens(x)  # vLLM's grid: the largest |x| of a token maps to ±127
    nz = x.abs().amax(-1) > 0
    assert torch.equal(q[nz].abs().amax(-1), torch.full((int(nz.sum()),), 127, dtype=torch.int8))
    assert torch.allclose(s[nz].squeeze(-1), x.abs().amax(-1)[nz] / 127)
    assert torch.equal(q, torch.clamp(torch.round(x / s), -128, 127).to(torch.int8))
    assert torch.equal(fake_quantize_tokens(x)[0, 3], torch.zeros(64))


def test_smooth_scales_formula() -> None:
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 1.0, 0.25], [0.5, 1.0, 0.0, -1.0]])
    w2 = torch.tensor([[-4.0, 0.5, 1.0, 0.0]])
    s = smooth_scales(act, [w1, w2], 0.5)
    w_max = torch.tensor([4.0, 2.0, 1.0, 1.0])
    want = (act.clamp(min=1e-5) ** 0.5 / w_max ** 0.5).clamp(min=1e-5)
    assert torch.allclose(s, want)
    assert torch.allclose(smooth_scales(act, [w1, w2], 1.0), act.clamp(min=1e-5))
    with pytest.raises(QuantTypeError, match="alpha"):
        smooth_scales(act, [w1], 1.5)


# ---------------------------------------------------------------------------------------------------------------
# SmoothQuant on a fixture


def _ids(fixture: str, n: int = 2, t: int = 64) -> torch.Tensor:
    from qconvert.fixtures.corpus import eval_text
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode

    return encode(eval_text(), FIXTURES[fixture])[: n * t].reshape(n, t)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def test_smoothing_keeps_the_function_and_flattens_activations(model_dir, tmp_path: Path) -> None:
    """``Smoothing`` as the driver applies it: every layer's smoothed tensors, loaded into transformers' model,
    give the source's logits; the activation maxima of the smoothed layers are the source's divided by s."""
    from transformers import AutoModelForCausalLM

    from qconvert.calibration.driver import CalibrationSettings, DeviceLayer, read_config
    from qconvert.io.safetensors import SafetensorsCheckpoint
    from qconvert.w8a8 import Smoothing, activation_maxima

    src = model_dir("tiny-untied")
    ids = _ids("tiny-untied", 4)
    maxima = activation_maxima(src, ids)
    config = read_config(src)
    smoothing = Smoothing(config, maxima, 0.5)
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ckpt = SafetensorsCheckpoint(src)
    with torch.no_grad():
        params = dict(b.named_parameters())
        for i in range(int(config["num_hidden_layers"])):
            prefix = f"model.layers.{i}."
            for name, t in DeviceLayer(ckpt, prefix, CalibrationSettings(), transform=smoothing).p.items():
                params[prefix + name].copy_(t)
    scales = smoothing.scales
    assert len(scales) == 2 * 3 and set(smoothing.gains) == set(scales)  # two RMSNorms per layer, three layers
    for name, gain in smoothing.gains.items():
        torch.testing.assert_close(params[name], gain)
        assert not torch.equal(gain, dict(a.named_parameters())[name])
    assert float((_logits(a, ids) - _logits(b, ids)).abs().max()) < 1e-4
    after = activation_maxima(src, ids, transform=smoothing)
    norms = {"self_attn.q_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm"}
    for site, m in maxima.items():
        layer, _, sub = site.partition(".self_attn.") if ".self_attn." in site else site.partition(".mlp.")
        sub = site[len(layer) + 1:]
        if sub not in norms:  # o_proj, down_proj: no RMSNorm before them, not smoothed
            assert torch.allclose(after[site], m, rtol=1e-4, atol=1e-6), site
            continue
        s = scales[f"{layer}.{norms[sub]}.weight"]
        assert torch.allclose(after[site], m / s, rtol=1e-4, atol=1e-6), site  # channel j's inputs divided by s_j
        # the outlier ratio (largest channel / median channel) shrinks: that is what helps per-token int8
        assert float(after[site].max() / after[site].median()) < float(m.max() / m.median()), site


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: transformers + compressed-tensors oracle


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


CASES = {  # id -> extra qconvert w8a8 arguments, fixture
    "rtn-tied": ([], "tiny-tied"),
    "smooth-gptq-untied": (["--smooth", "--weights", "gptq", "--calib-samples", "4", "--calib-seqlen", "64"],
                           "tiny-untied"),
}


@pytest.fixture(scope="module")
def w8a8_dir(model_dir, tmp_path_factory):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            extra, fixture = CASES[case]
            out_dir = tmp_path_factory.mktemp(case)
            assert main(["w8a8", "--model", str(model_dir(fixture)), "--out-dir", str(out_dir), "--quiet",
                         "--no-eval", *extra]) == 0
            (made[case],) = [p for p in out_dir.iterdir() if p.is_dir()]
        return made[case]

    return get


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _reference(src: Path, ckpt: Path, qmax: float | None, fp16_weights: bool = False):
    """transformers' float32 Qwen2 carrying the checkpoint's tensors (int8 weights dequantized by ``unpack_int8``,
    fp16 floats widened), every linear input but lm_head's fake-quantized per token on grid ``qmax`` (None: none).
    ``fp16_weights``: dequantized weights rounded to fp16 (what compressed-tensors' decompression in the scale's
    dtype produces)."""
    from transformers import AutoModelForCausalLM

    t = _tensors(ckpt)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = t.get(name.removesuffix("weight") + "weight_scale")
            if scale is not None:
                w = unpack_int8({"weight": t[name], "weight_scale": scale}).dequantize()
                p.copy_(w.half().float() if fp16_weights else w)
            else:
                p.copy_(t[name].float() if name in t else p.half().float())  # a tied lm_head is not stored
    if qmax is not None:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.register_forward_pre_hook(lambda _, args: (fake_quantize_tokens(args[0], qmax),))
    return model


def _load(path: Path, route: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if route == "dequantize" else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_runs_w8a8_like_our_reference(ct, model_dir, w8a8_dir, tmp_path: Path, case: str) -> None:
    out = w8a8_dir(case)
    src = model_dir(CASES[case][1])
    ids = _ids(CASES[case][1])
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == CT_INT_FORMAT and config["config_groups"]["group_0"]["input_activations"]["dynamic"]
    w8a8 = _logits(_reference(src, out, CT_GRID), ids)
    weights_only = _logits(_reference(src, out, None), ids)
    tol = 1e-4

    hf = _load(out, "compressed")
    assert hf.model.layers[0].self_attn.q_proj.quantization_scheme.input_activations.dynamic
    got = _logits(hf, ids)
    assert float((got - w8a8).abs().max()) <= tol
    assert float((weights_only - got).abs().mean()) >= 5 * max(float((w8a8 - got).abs().mean()), 1e-7)
    # transformers' dequantize route removes the scheme: weights only (W8A16), decompressed in fp16
    got = _logits(_load(out, "dequantize"), ids)
    assert float((got - _logits(_reference(src, out, None, fp16_weights=True), ids)).abs().max()) <= tol

    wrong = tmp_path / "wrong-scale"  # weight_scale as [1, N] (per input column), not [N, 1]
    shutil.copytree(out, wrong)
    from safetensors.torch import load_file, save_file

    for f in wrong.glob("*.safetensors"):
        t = {k: (v.T.contiguous() if k.endswith("weight_scale") else v) for k, v in load_file(f).items()}
        save_file(t, str(f), metadata={"format": "pt"})
    try:
        bad = _logits(_load(wrong, "compressed"), ids)
    except (RuntimeError, ValueError) as e:  # a size mismatch refused while loading
        assert "weight_scale" in str(e) or "size" in str(e)
    else:
        assert float((bad - w8a8).abs().max()) > 100 * tol
    with pytest.raises(CheckpointError, match=r"\[N, 1\]"):
        unpack_int8({"weight": torch.zeros(4, 8, dtype=torch.int8), "weight_scale": torch.ones(1, 4)})


def test_card_and_sizes(w8a8_dir) -> None:
    out = w8a8_dir("smooth-gptq-untied")
    card = (out / "README.md").read_text()
    assert "W8A8" in card and "int-quantized" in card and "SmoothQuant α=0.5" in card and "gptqmodel" not in card
    assert not (out / "quantize_config.json").exists()
    t = _tensors(out)
    assert all(v.dtype == torch.int8 for k, v in t.items() if k.endswith("_proj.weight"))
    assert "lm_head.weight" in t and t["lm_head.weight"].dtype == torch.float16
    assert not list(out.parent.glob(".*smoothed-*"))  # the smoothed copy is gone


@pytest.mark.parametrize("case", list(CASES))
def test_qconvert_forward_equals_the_reference_on_vllm_grid(model_dir, w8a8_dir, case: str) -> None:
    from qconvert.calibration.driver import CalibrationSettings
    from qconvert.io.safetensors import SafetensorsCheckpoint
    from qconvert.w8a8 import w8a8_logits

    out = w8a8_dir(case)
    ids = _ids(CASES[case][1])
    config = json.loads((out / "config.json").read_text())
    ours = torch.stack(list(w8a8_logits(SafetensorsCheckpoint(out), config, ids, 0, CalibrationSettings())))
    ref = _logits(_reference(model_dir(CASES[case][1]), out, 127.0), ids)[:, :-1]
    assert float((ours - ref).abs().max()) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Errors


def _fails_cleanly(capsys, argv: list[str], needles: tuple[str, ...], final: Path) -> None:
    rc, err = _cli(capsys, argv)
    assert rc == 2, err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err
    assert not final.exists()
    assert not list(final.parent.glob(f".{final.name}.partial-*"))


def test_w8a8_refusals(model_dir, w8a8_dir, tmp_path: Path, capsys) -> None:
    src = model_dir("tiny-tied")
    final = tmp_path / f"{src.name.lower()}-w8a8"
    _fails_cleanly(capsys, ["w8a8", "--model", str(src), "--out-dir", str(tmp_path), "--stats", "x.safetensors"],
                   ("neither --stats", "Drop the option"), final)
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses it
        main(["w8a8", "--model", str(src), "--out-dir", str(tmp_path), "--smooth", "1.5"])
    assert exit_info.value.code == 2 and "--smooth: must be <= 1" in capsys.readouterr().err and not final.exists()
    out = w8a8_dir("rtn-tied")
    for to in ("gptq", "compressed-tensors", "awq"):
        target = tmp_path / f"conv-{to}"
        _fails_cleanly(capsys, ["convert-format", str(out), "--to", to, "--output", str(target)],
                       ("W8A8", "drop the activation quantization"), target)


def test_int_quantized_refuses_what_it_cannot_hold(model_dir, tmp_path: Path) -> None:
    from qconvert.int4 import write_quantized_checkpoint

    with pytest.raises(QuantTypeError, match="one scale per output row"):
        pack_int8(rtn(_weight(), 8, 32, True))
    with pytest.raises(QuantTypeError, match="one scale per output row"):
        pack_int8(rtn(_weight(), 4, -1, True))
    static = copy.deepcopy(w8a8_quantization_config())
    static["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    with pytest.raises(QuantTypeError, match="static or per-tensor"):
        layout_scheme(static)
    src = model_dir("tiny-tied")
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(src)
    linears = {n.removesuffix(".weight"): rtn(torch.from_numpy(ckpt.read_f32(n)), 8, 32) for n in ckpt.names()
               if n.startswith("model.layers.") and n.endswith("_proj.weight")}
    final = tmp_path / "w4"
    with pytest.raises(QuantTypeError, match="quantize every linear with one config"):
        write_quantized_checkpoint(src, final, linears, w8a8_quantization_config(), tp_sizes=())
    assert not final.exists() and not list(tmp_path.glob(".w4.partial-*"))


def test_smoothed_norm_gains_survive_the_model_checks_fallback(model_dir, tmp_path: Path, monkeypatch) -> None:
    """SmoothQuant folds its scales into the RMSNorm gains and the q/k/v, gate/up weights. When the model-level
    check sends GPTQ's weights back as round-to-nearest (the writer forgets what it had), the smoothed gains must
    still be written: the fallback checkpoint carries the same gains as the run that kept GPTQ, not the source's
    (smoothed weights beside unsmoothed norms would be another model)."""
    from qconvert.calibration import quantize
    from qconvert.int4.guard import ModelCheck

    src = model_dir("tiny-untied")
    args = ["w8a8", "--model", str(src), "--quiet", "--no-eval", "--smooth", "--weights", "gptq",
            "--calib-samples", "4", "--calib-seqlen", "64"]
    assert main([*args, "--out-dir", str(tmp_path / "kept")]) == 0
    real = quantize.model_check

    def worse(*a, **k) -> ModelCheck:
        c = real(*a, **k)
        return ModelCheck(c.method, c.base_kl + 1.0, c.nll, c.base_kl, c.base_nll, c.nll_se, c.positions)

    monkeypatch.setattr(quantize, "model_check", worse)
    assert main([*args, "--out-dir", str(tmp_path / "fallback")]) == 0
    (kept,), (fell,) = [[p for p in (tmp_path / d).iterdir() if p.is_dir()] for d in ("kept", "fallback")]
    assert "round-to-nearest" in (fell / "README.md").read_text()
    source = _tensors(src)
    gains_kept, gains_fell = _tensors(kept), _tensors(fell)
    norms = [n for n in gains_kept if n.endswith("layernorm.weight")]
    assert norms
    for n in norms:
        assert not torch.equal(gains_kept[n].float(), source[n].float().half().float()), n  # smoothing changed it
        torch.testing.assert_close(gains_fell[n], gains_kept[n], rtol=0, atol=0)
