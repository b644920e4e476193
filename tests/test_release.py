"""``qconvert release``: recipes and their errors, the demo release (local and Ray give the same manifest),
resuming after a kill, --only, a changed source, a full disk, threshold failures.

The demo release (recipes/demo.toml on the trained demo fixture: GGUF Q8_0 + Q4_K_M with an importance matrix,
GPTQ-4 from the shared statistics, AWQ, ONNX int4 from the GPTQ weights) is built once per module; the other
end-to-end tests use GGUF-only recipes, which take seconds.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qconvert.cli import main
from qconvert.fixtures import fixture_path
from qconvert.release import RecipeError, load_recipe, run_release
from qconvert.release.manifest import SourceChangedError, sha256_file

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "demo.toml"


def write_recipe(tmp_path: Path, body: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


GGUF_ONLY = """
[release]
threads = 1
device = "cpu"

[evaluation]
ctx = 64
chunks = 4

[[models]]
{model}

[[formats]]
kind = "gguf"
presets = {presets}
{extra}
"""


def gguf_recipe(tmp_path: Path, presets: str = '["Q8_0", "Q4_K_M", "Q5_K_M"]', extra: str = "",
                model: str = 'fixture = "demo"\nname = "qconvert/Qwen2.5-Demo-Instruct"', name: str = "g.toml") -> Path:
    return write_recipe(tmp_path, GGUF_ONLY.format(presets=presets, extra=extra, model=model), name)


def artifact_hashes(manifest: dict) -> dict[str, str]:
    return {f: v["sha256"] for e in manifest["artifacts"].values() for f, v in e["files"].items()}


# -- recipes -----------------------------------------------------------------------------------------------------

def test_shipped_recipes_validate_and_expand() -> None:
    from qconvert.release.plan import expand

    counts = {}
    for name in ("qwen2.5", "qwen2.5-coder", "demo"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.toml")
        jobs = expand(recipe)
        counts[name] = len(jobs)
        assert len({j.id for j in jobs}) == len(jobs)
    # Qwen2.5: 7 Instruct sizes x (8 GGUF presets + GPTQ-Int4 + GPTQ-Int8 + AWQ + ONNX int4)
    assert counts["qwen2.5"] == 7 * 12
    assert counts["qwen2.5-coder"] == 6 * 12
    assert counts["demo"] == 5
    names = {j.name for j in expand(load_recipe(ROOT / "recipes" / "qwen2.5.toml"))}
    assert {"qwen2.5-7b-instruct-gguf-q4_k_m", "qwen2.5-72b-instruct-gptq-int8", "qwen2.5-0.5b-instruct-awq",
            "qwen2.5-3b-instruct-onnx-int4"} <= names


@pytest.mark.parametrize("body, line, needle", [
    ('[[models]]\nfixture = "demo"\n\n[[formats]]\nkind = "gptq"\nbitz = 4\n', 6,
     "unknown key 'bitz' in [[formats]] (kind gptq) (did you mean 'bits'?)"),
    ('[release]\nthreds = 2\n', 2, "unknown key 'threds' in [release] (did you mean 'threads'?)"),
    ('[releese]\nname = "x"\n', 1, "unknown section [releese] (did you mean 'release'?)"),
    (('[[models]]\nfixture = "demo"\n\n[[formats]]\nkind = "gguf"\npresets = ["Q4_K_M"]\n\n[[formats]]\n'
      'kind = "awq"\nbits = 8\n'), 10, "AWQ 8-bit is not a format"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\nbits = "4"\n', 5,
     "bits in [[formats]] (kind gptq) must be a integer"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gguf"\npresets = ["Q4_K_X"]\n', 5,
     "unknown quantization preset 'Q4_K_X'"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nfrom = "gptq-int4"\n', 5,
     "from = 'gptq-int4' must name the id of a gptq format"),
    ('[[models]]\nsizes = ["72b"]\nvariants = ["coder"]\n[[formats]]\nkind = "awq"\n', 2,
     "Qwen never published a 72b coder model"),
    (('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gguf"\npresets = ["Q8_0"]\n[formats.thresholds]\n'
      'max_kll = 0.1\n'), 7, "unknown key 'max_kll' in [formats.thresholds] (did you mean 'max_kl'?)"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gguf"\npresets = ["Q8_0"\n', 5, "not valid TOML"),
    (('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gguf"\npresets = ["Q8_0"]\n[formats.thresholds]\n'
      'max_kl = nan\n'), 7, "max_kl = nan is not a usable gate"),
    ('[thresholds]\nmax_dppl_pct = -1.0\n[[models]]\nfixture = "demo"\n[[formats]]\nkind = "awq"\n', 2,
     "max_dppl_pct = -1.0 is not a usable gate"),
    (('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\ngroup_size = 64\n[[formats]]\nkind = "onnx"\n'
      'from = "gptq-int4"\nblock_size = 128\n'), 9, "block_size 128 differs from the group size 64"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\nformat = "marlin"\n', 5,
     "--format marlin is not a layout of gptq results"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\nact_order = true\nformat = "compressed-tensors"\n', 6,
     "--act-order writes permuted group indices"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\nbits = 3\nformat = "compressed-tensors"\n', 6,
     "not 3-bit; use --format gptq"),
    (('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\nformat = "compressed-tensors"\n[[formats]]\n'
      'kind = "onnx"\nfrom = "gptq-int4-ct"\n'), 8, "names a compressed-tensors GPTQ format"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "w8a8"\nweights = "awq"\n', 5,
     "w8a8 weights = 'awq': use 'rtn' or 'gptq'"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "w8a8"\nsmooth = 1.5\n', 5,
     "smooth = 1.5 is SmoothQuant's alpha, in [0, 1]"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gguf"\npresets = ["Q4_K_M"]\ntarget_bpw = 0.0\n', 6,
     "target_bpw = 0.0 must be bits per weight above 0"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "w8a8"\nbits = 4\n', 5,
     "unknown key 'bits' in [[formats]] (kind w8a8)"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nprecision = "int8"\naccuracy_level = 3\n', 6,
     "accuracy_level = 3: use one of 0, 1, 2, 4"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nprecision = "fp16"\nattention = "mha"\n', 6,
     "attention = 'mha': use one of gqa, plain"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nalgo = "gptq"\nmixed_precision = true\n', 6,
     "mixed_precision = true re-quantizes some linears at 8 bits"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\ntable_bits = 2\n', 5,
     "table_bits = 2: use one of 4, 8"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\ntable_block_size = 256\n', 5,
     "table_block_size = 256: use one of 16, 32, 64, 128"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nkeep_embedding_float = "yes"\n', 5,
     "keep_embedding_float in [[formats]] (kind onnx) must be a"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nprecision = "fp16"\n\ntable_bits = 8\n', 7,
     "table_bits applies to onnx precision \"int4\" or \"int8\" only"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nkeep_embedding_float = true\ntable_bits = 8\n', 5,
     "drop table_bits / table_block_size"),
    ('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "onnx"\nprecision = "int8"\nalgo = "awq"\n', 6,
     "algo = \"awq\" writes 4-bit weights only"),
    (('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\n[[formats]]\nkind = "onnx"\nprecision = "int8"\n'
      'from = "gptq-int4"\n'), 8, "is a 4-bit GPTQ format and precision 'int8' writes 8-bit MatMulNBits"),
    (('[[models]]\nfixture = "demo"\n[[formats]]\nkind = "gptq"\nbits = 8\nact_order = true\n[[formats]]\n'
      'kind = "onnx"\nprecision = "int8"\nfrom = "gptq-int8"\n'), 10, "uses act_order without static_groups"),
])
def test_recipe_errors_point_at_the_line(tmp_path: Path, body: str, line: int, needle: str) -> None:
    path = write_recipe(tmp_path, body)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
    assert needle in str(e.value)


def test_onnx_recipe_keys_are_the_exporters(tmp_path: Path) -> None:
    """The recipe spells the onnx values itself (validating must not need onnx); they must be the exporter's, and an
    int8 recipe with every onnx key loads with ids ``onnx-int8``."""
    pytest.importorskip("onnx")
    from qconvert.onnx_export import graph
    from qconvert.onnx_export import matmulnbits as mnb
    from qconvert.release import recipe as r

    assert r.ONNX_ACCURACY_LEVELS == tuple(mnb.ACCURACY_LEVELS) and r.ONNX_TABLE_BITS == mnb.BITS
    assert r.ONNX_TABLE_BLOCK_SIZES == mnb.TABLE_BLOCK_SIZES and r.ONNX_QUANTIZED == tuple(mnb.PRECISION_BITS)
    assert r.ONNX_ATTENTIONS == tuple(graph.ATTENTIONS)
    recipe = load_recipe(write_recipe(tmp_path, '''
[[models]]
fixture = "demo"
[[formats]]
kind = "gptq"
bits = 8
group_size = 64
[[formats]]
kind = "onnx"
precision = "int8"
from = "gptq-int8"
accuracy_level = 0
table_bits = 8
table_block_size = 16
attention = "plain"
[[formats]]
kind = "onnx"
keep_embedding_float = true
'''))
    assert [f.id for f in recipe.formats] == ["gptq-int8", "onnx-int8", "onnx-int4"]
    assert recipe.formats[1].settings["table_block_size"] == 16 and recipe.formats[1].settings["attention"] == "plain"


def test_compressed_tensors_format_key_names_and_ids(tmp_path: Path) -> None:
    """``format = "compressed-tensors"`` on gptq/awq formats: ids and artifact names get ``-ct``, so one recipe can
    ship both layouts of one method."""
    from qconvert.release.plan import expand

    recipe = load_recipe(write_recipe(tmp_path, '''
        [[models]]
        fixture = "demo"
        name = "qconvert/Qwen2.5-Demo-Instruct"
        [[formats]]
        kind = "gptq"
        [[formats]]
        kind = "gptq"
        format = "compressed-tensors"
        [[formats]]
        kind = "awq"
        format = "compressed-tensors"
        '''))
    assert [f.id for f in recipe.formats] == ["gptq-int4", "gptq-int4-ct", "awq-ct"]
    assert [j.rel.rsplit("/", 1)[-1] for j in expand(recipe)] == [
        "qwen2.5-demo-instruct-gptq-int4", "qwen2.5-demo-instruct-gptq-int4-ct", "qwen2.5-demo-instruct-awq-ct"]


# a one-thread CPU release of the demo fixture on few tokens; a test appends its [[formats]]
SMALL_DEMO_RELEASE = '''
        [release]
        threads = 1
        device = "cpu"
        [calibration]
        samples = 4
        seq_len = 64
        [evaluation]
        ctx = 64
        chunks = 4
        [[models]]
        fixture = "demo"
        name = "qconvert/Qwen2.5-Demo-Instruct"
'''


def test_compressed_tensors_release_artifact(tmp_path: Path) -> None:
    """A release with a compressed-tensors GPTQ format: the checkpoint is pack-quantized, passes the release's
    verification, and its card serves it without a GPTQ --quantization flag."""
    recipe = write_recipe(tmp_path, SMALL_DEMO_RELEASE + '''
        [[formats]]
        kind = "gptq"
        format = "compressed-tensors"
        from_stats = false
        ''')
    out = tmp_path / "rel"
    assert main(["release", str(recipe), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["artifacts"].values()
    assert entry["passed"] and entry["settings"]["format"] == "compressed-tensors"
    art = out / entry["path"]
    assert art.name.endswith("-gptq-int4-ct")
    qcfg = json.loads((art / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "pack-quantized"
    card = (art / "README.md").read_text()
    assert "GPTQ Int4 (compressed-tensors)" in card and "vllm serve ./" in card and "gptq_marlin" not in card


def test_w8a8_release_artifact(tmp_path: Path) -> None:
    """``kind = "w8a8"`` in a recipe: an int-quantized compressed-tensors checkpoint whose GPTQ weights and
    SmoothQuant gains come from the shared calibration tokens, verified by the release like every other artifact."""
    recipe = write_recipe(tmp_path, SMALL_DEMO_RELEASE + '''
        [[formats]]
        kind = "w8a8"
        weights = "gptq"
        smooth = 0.5
        [[formats]]
        kind = "gptq"
        from_stats = false
        ''')
    out = tmp_path / "rel"
    assert main(["release", str(recipe), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    by_kind = {e["kind"]: e for e in manifest["artifacts"].values()}
    entry = by_kind["w8a8"]
    assert entry["passed"] and entry["settings"]["smooth"] == 0.5
    assert entry["calibration"] is not None and entry["statistics"] == "own pass on the shared calibration tokens"
    # scored on the same tokens: 8-bit weights (even with 8-bit activations) lose less than 4-bit weights
    assert 0 < entry["metrics"]["kl_mean"] < by_kind["gptq"]["metrics"]["kl_mean"], manifest["artifacts"]
    art = out / entry["path"]
    assert art.name == "qwen2.5-demo-instruct-w8a8"
    qcfg = json.loads((art / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["format"] == "int-quantized"
    assert qcfg["qconvert"]["method"] == "gptq" and qcfg["qconvert"]["smoothquant_alpha"] == 0.5
    card = (art / "README.md").read_text()
    assert "W8A8 INT8 (compressed-tensors)" in card and "vllm serve ./qwen2.5-demo-instruct-w8a8" in card


def test_optimized_gguf_release_artifact(tmp_path: Path) -> None:
    """``optimize = true`` in a GGUF format: beside the plain imatrix file of the same preset (its own artifact
    name), from the one shared statistics pass, with the plain file's tensor types and sizes; llama.cpp scores it.
    (Its quality is tests/test_gguf_optimize.py's subject: 4 x 64 calibration tokens are too few to judge it.)"""
    from qconvert.gguf.reader import read_gguf

    recipe = write_recipe(tmp_path, SMALL_DEMO_RELEASE + '''
        [[formats]]
        kind = "gguf"
        presets = ["Q3_K_M"]
        imatrix = true
        [[formats]]
        kind = "gguf"
        id = "gguf-optimized"
        presets = ["Q3_K_M"]
        optimize = true
        [[formats]]
        kind = "gguf"
        id = "gguf-budget"
        presets = ["Q3_K_M"]
        target_bpw = 4.0
        ''')
    out = tmp_path / "rel"
    assert main(["release", str(recipe), "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    (budget,) = [e for e in manifest["artifacts"].values() if "target_bpw" in e["settings"]]
    assert Path(budget["path"]).name.endswith("-gguf-q3_k_m-4bpw") and budget["passed"]
    assert budget["statistics"] == "shared float pass" and budget["bits_per_weight"] <= 4.0 + 0.1  # + metadata
    (bpath,) = (out / budget["path"]).glob("*.gguf")
    tensors = read_gguf(bpath).tensors.values()
    assert 8 * sum(t.nbytes for t in tensors) / sum(math.prod(t.shape) for t in tensors) <= 4.0
    assert "at most 4.0 bits per weight" in read_gguf(bpath).metadata["qconvert.budget"]
    assert "target_bpw" in (out / budget["path"] / "README.md").read_text()
    by_opt = {bool(e["settings"].get("optimize")): e for e in manifest["artifacts"].values()
              if "target_bpw" not in e["settings"]}
    assert set(by_opt) == {False, True} and all(e["passed"] for e in by_opt.values())
    opt, plain = by_opt[True], by_opt[False]
    assert Path(opt["path"]).name.endswith("-gguf-q3_k_m-optimized")
    assert opt["statistics"] == plain["statistics"] and opt["size_bytes"] > 0
    (path,) = (out / opt["path"]).glob("*.gguf")
    (plain_path,) = (out / plain["path"]).glob("*.gguf")
    g, g_plain = read_gguf(path), read_gguf(plain_path)
    assert "error-feedback" in g.metadata["qconvert.optimize"] and "qconvert.optimize" not in g_plain.metadata
    assert [(n, t.type, t.nbytes) for n, t in g.tensors.items()] == \
        [(n, t.type, t.nbytes) for n, t in g_plain.tensors.items()]
    assert any(not np.array_equal(g.read_tensor_bytes(n), g_plain.read_tensor_bytes(n)) for n in g.tensors)
    assert opt["metrics"]["kl_mean"] > 0


def test_pure_k_quant_on_a_fallback_shape_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    recipe = gguf_recipe(tmp_path, '["Q4_K_M"]', "pure = true", model='fixture = "tiny-fallback"')
    out = tmp_path / "rel"
    assert main(["release", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = next(i for i, t in enumerate(recipe.read_text().splitlines(), 1) if t.startswith("pure"))
    assert f"{recipe}:{line}: pure = true" in err and "rows of 320 are not a multiple of 256" in err
    assert not (out / "manifest.json").exists()


# -- the demo release --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "demo"
    assert main(["release", str(DEMO), "--out", str(out), "--quiet"]) == 0
    return out


def test_demo_release_manifest_cards_and_report(demo_release: Path) -> None:
    m = json.loads((demo_release / "manifest.json").read_text())
    arts = m["artifacts"]
    assert sorted(e["kind"] for e in arts.values()) == ["awq", "gguf", "gguf", "gptq", "onnx"]
    for aid, e in arts.items():
        assert e["passed"], (aid, e["failures"])
        for rel, f in e["files"].items():  # every file of every artifact, hashed and present
            assert sha256_file(demo_release / rel) == f["sha256"] and (demo_release / rel).stat().st_size == f["size"]
        assert set(e["metrics"]) >= {"dppl_pct", "kl_mean", "top1", "ppl", "ppl_ref"}
        assert e["evaluation"]["sha256"] == m["models"]["qwen2.5-demo-instruct"]["evaluation"]["sha256"]
        card = (demo_release / e["path"] / "README.md").read_text()
        front = card.split("---")[1]
        for line in ("base_model: qconvert/Qwen2.5-Demo-Instruct", "quantized_by: qconvert", "license: apache-2.0",
                     "library_name: ", "tags:"):
            assert line in front, (aid, line)
    # one shared calibration: every calibrated artifact names the same token hash; GPTQ and the imatrix used the
    # statistics pass, AWQ ran its own pass on the same tokens
    calib = {e["calibration"]["sha256"] for e in arts.values() if e["calibration"]}
    assert len(calib) == 1
    kinds = {e["settings"].get("preset", e["kind"]): e["statistics"] for e in arts.values()}
    assert kinds["Q4_K_M"] == kinds["gptq"] == "shared float pass"
    assert kinds["awq"].startswith("own AWQ pass") and kinds["onnx"] is None
    src = m["models"]["qwen2.5-demo-instruct"]
    assert "model.safetensors" in src["files"] and m["release"]["qconvert_version"]
    onnx = next(e for e in arts.values() if e["kind"] == "onnx")
    assert onnx["metrics"]["runtime"] == "onnxruntime"
    assert "finished" not in json.dumps(m) and "seconds" not in json.dumps(m)  # timings live in timings.json
    timings = json.loads((demo_release / "timings.json").read_text())
    assert set(timings["artifacts"]) == set(arts) and timings["runs"][0]["executor"] == "local"
    report = (demo_release / "report.md").read_text()
    assert "# Release report" in report and ".png)" in report
    assert not list(demo_release.rglob(".*.partial*"))


def test_manifest_card_and_verify_give_the_same_figures(demo_release: Path, tmp_path: Path, capsys) -> None:
    """One quality definition: for each artifact, `qconvert verify` on the same text and ctx measures what the
    release manifest records, and the artifact's model card states those figures."""
    m = json.loads((demo_release / "manifest.json").read_text())
    for aid, e in m["artifacts"].items():
        ev = e["evaluation"]
        if e["kind"] == "onnx":
            continue  # onnxruntime: covered by tests/test_verify.py; its thread count changes the last digits
        target = demo_release / (next(f for f in e["files"] if f.endswith(".gguf")) if e["kind"] == "gguf"
                                 else e["path"])
        out = tmp_path / f"{aid.replace('/', '_')}.json"
        rc = main(["verify", str(target), "--reference", str(fixture_path("demo")), "--ctx", str(ev["ctx"]),
                   "--chunks", str(ev["windows"]), "--json", str(out), "--max-dppl", "100", "--max-kl", "10"])
        capsys.readouterr()
        assert rc == 0, aid
        r = json.loads(out.read_text())["results"][0]
        assert r["tokens_sha256"] == ev["sha256"], aid
        for key in ("ppl", "ppl_ref", "kl_mean", "top1"):
            assert r[key] == pytest.approx(e["metrics"][key], rel=1e-4, abs=1e-7), (aid, key)
        card = (demo_release / e["path"] / "README.md").read_text()
        row = re.search(r"\| ([\d.]+) → ([\d.]+) \| [-+\d.]+% \| ([\d.]+) \| ([\d.]+)% \|", card)
        assert row is not None, (aid, card)
        ppl_ref, ppl, kl, top1 = (float(x) for x in row.groups())
        assert ppl_ref == pytest.approx(r["ppl_ref"], abs=1e-3) and ppl == pytest.approx(r["ppl"], abs=1e-3), aid
        assert kl == pytest.approx(r["kl_mean"], abs=1e-5) and top1 == pytest.approx(100 * r["top1"], abs=1e-2), aid


class _Tripwire:
    """Unpickling this writes ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "unpickled"))


def test_pickle_only_source_is_refused_without_unpickling(tmp_path: Path, capsys) -> None:
    """A release of a checkpoint whose weights are a code-running torch.save pickle: exit 2, nothing unpickled,
    nothing released."""
    torch = pytest.importorskip("torch")
    bad = tmp_path / "pickled"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(fixture_path("demo") / name, bad / name)
    marker = tmp_path / "marker"
    torch.save({"model.embed_tokens.weight": _Tripwire(marker)}, bad / "pytorch_model.bin")
    recipe = write_recipe(tmp_path, f'[[models]]\npath = "{bad}"\n[[formats]]\nkind = "gguf"\npresets = ["Q8_0"]\n'
                                    '[[formats]]\nkind = "gptq"\n')
    assert main(["release", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "never unpickles" in err and "Traceback" not in err, err
    assert not marker.exists(), "the pickle was loaded"
    assert not list(tmp_path.glob("out/**/*.gguf")), "an artifact was released"


def test_ray_executor_writes_the_same_manifest(demo_release: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    out = tmp_path / "ray"
    try:
        outcome = run_release(DEMO, out, executor="ray", verbose=False, fixtures=fixture_path,
                              ray_init={"num_cpus": 2, "include_dashboard": False})
    finally:
        ray.shutdown()
    assert len(outcome.built) == 5 and not outcome.failures
    assert (out / "manifest.json").read_bytes() == (demo_release / "manifest.json").read_bytes()
    assert json.loads((out / "timings.json").read_text())["runs"][0]["executor"] == "ray"


def test_rerun_is_idempotent_and_only_rebuilds_a_subset(demo_release: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(demo_release, out)
    before = (out / "manifest.json").read_bytes()
    assert main(["release", str(DEMO), "--out", str(out)]) == 2  # an existing release needs --resume or --only
    assert "pass --resume" in capsys.readouterr().err
    outcome = run_release(DEMO, out, resume=True, verbose=False, fixtures=fixture_path)
    assert outcome.built == [] and len(outcome.skipped) == 5
    outcome = run_release(DEMO, out, only="*q8_0*", verbose=False, fixtures=fixture_path)
    assert outcome.built == ["qwen2.5-demo-instruct/qwen2.5-demo-instruct-gguf-q8_0"]
    assert (out / "manifest.json").read_bytes() == before


# -- resume, bad input ---------------------------------------------------------------------------------------------

def test_killed_run_resumes_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    from qconvert.release import build

    recipe = gguf_recipe(tmp_path)
    clean = run_release(recipe, tmp_path / "clean", verbose=False, fixtures=fixture_path)
    real = build.BUILDERS["gguf"]
    calls = []

    def dies_on_the_second(ctx, job, out, settings, deps):
        calls.append(job.id)
        if len(calls) == 2:
            real(ctx, job, out, settings, deps)  # the file is written, then the process "dies"
            raise KeyboardInterrupt
        return real(ctx, job, out, settings, deps)

    monkeypatch.setitem(build.BUILDERS, "gguf", dies_on_the_second)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_release(recipe, out, verbose=False, fixtures=fixture_path)
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["artifacts"]) == [calls[0]]
    assert not list(out.rglob(".*.partial*")) and not (out / calls[1].replace("/", "/", 1)).exists()
    monkeypatch.setitem(build.BUILDERS, "gguf", real)
    outcome = run_release(recipe, out, resume=True, verbose=False, fixtures=fixture_path)
    assert outcome.skipped == [calls[0]] and len(outcome.built) == 2
    assert (out / "manifest.json").read_bytes() == (tmp_path / "clean" / "manifest.json").read_bytes()
    assert artifact_hashes(m).items() <= artifact_hashes(clean.manifest.data).items()


def test_changed_source_is_refused(tmp_path: Path, model_dir, capsys) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(model_dir("demo"), src)
    recipe = gguf_recipe(tmp_path, '["Q8_0"]', model=f'path = "{src}"\nname = "qconvert/Qwen2.5-Demo-Instruct"')
    out = tmp_path / "rel"
    run_release(recipe, out, verbose=False)
    before = (out / "manifest.json").read_bytes()
    cfg = src / "generation_config.json"
    cfg.write_text(cfg.read_text() + "\n")
    with pytest.raises(SourceChangedError, match="generation_config.json"):
        run_release(recipe, out, resume=True, verbose=False)
    assert main(["release", str(recipe), "--out", str(out), "--only", "*q8_0*"]) == 2
    assert "changed since" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


def test_full_disk_fails_cleanly_and_keeps_the_manifest(tmp_path: Path, monkeypatch, capsys) -> None:
    from qconvert.release import build

    real = build.BUILDERS["gguf"]

    def full_on_q4(ctx, job, out, settings, deps):
        if job.preset == "Q4_K_M":
            out.mkdir()
            (out / "half.gguf").write_bytes(b"GGUF")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(ctx, job, out, settings, deps)

    monkeypatch.setitem(build.BUILDERS, "gguf", full_on_q4)
    recipe = gguf_recipe(tmp_path, '["Q8_0", "Q4_K_M"]')
    out = tmp_path / "rel"
    assert main(["release", str(recipe), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device while building" in err and "--resume" in err
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["artifacts"]) == ["qwen2.5-demo-instruct/qwen2.5-demo-instruct-gguf-q8_0"]
    assert not list(out.rglob("*q4_k_m*")) and not list(out.rglob(".*.partial*"))


def test_threshold_failure_exits_nonzero(tmp_path: Path, capsys) -> None:
    recipe = gguf_recipe(tmp_path, '["Q4_K_M"]', "[formats.thresholds]\nmax_kl = 0.0")
    out = tmp_path / "rel"
    assert main(["release", str(recipe), "--out", str(out), "--quiet"]) == 1
    assert "FAIL qwen2.5-demo-instruct/qwen2.5-demo-instruct-gguf-q4_k_m: mean KL" in capsys.readouterr().err
    entry = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert [e["passed"] for e in entry.values()] == [False]


def test_a_second_run_in_the_same_directory_is_refused(tmp_path: Path) -> None:
    import fcntl

    from qconvert.errors import OutputError

    out = tmp_path / "rel"
    (out / ".qconvert-release").mkdir(parents=True)
    with open(out / ".qconvert-release" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputError, match="another qconvert release is running"):
            run_release(gguf_recipe(tmp_path, '["Q8_0"]'), out, verbose=False)



def test_manifest_write_on_a_full_disk_keeps_the_previous_manifest(tmp_path: Path, monkeypatch) -> None:
    from qconvert.errors import OutputError
    from qconvert.release.manifest import Manifest

    m = Manifest(tmp_path)
    m.data["artifacts"]["a/b"] = {"passed": True}
    m.save()
    before = (tmp_path / "manifest.json").read_bytes()
    real_write = Path.write_text

    def full(self: Path, *args, **kwargs):
        if ".partial" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    m.data["artifacts"]["a/c"] = {"passed": False}
    with pytest.raises(OutputError, match="no space left"):
        m.save()
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".*partial*"))
