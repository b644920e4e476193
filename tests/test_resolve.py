"""Model resolution (local dir -> HF cache -> download), the family table and the architecture registry."""

from __future__ import annotations

import pytest

from qconvert.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError
from qconvert.family import hub_id
from qconvert.registry import spec_for_config
from qconvert.resolve import resolve_model


@pytest.mark.parametrize("size, variant, repo", [
    ("1.5b", "instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
    ("0.5b", "base", "Qwen/Qwen2.5-0.5B"),
    ("7b", "coder", "Qwen/Qwen2.5-Coder-7B"),
    ("32b", "coder-instruct", "Qwen/Qwen2.5-Coder-32B-Instruct"),
    ("72b", "math", "Qwen/Qwen2.5-Math-72B"),
    ("1.5b", "math-instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct"),
])
def test_hub_ids(size, variant, repo):
    assert hub_id(size, variant) == repo


def test_unpublished_combination_is_refused():
    with pytest.raises(ModelNotFoundError, match="coder"):
        hub_id("72b", "coder")


def _fake_cache(root, repo_id, files):
    """A Hugging Face hub cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>)."""
    base = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap, commit


def test_local_directory_wins(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = resolve_model(str(tmp_path))
    assert r.path == tmp_path.resolve() and r.repo_id is None


def test_found_in_hf_cache_offline(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap, commit = _fake_cache(cache, "Qwen/Qwen2.5-0.5B-Instruct", {"config.json": "{}"})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    assert r.path == snap and r.repo_id == "Qwen/Qwen2.5-0.5B-Instruct" and r.revision == commit


def test_hf_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap, _ = _fake_cache(tmp_path / "home" / "hub", "Qwen/Qwen2.5-7B", {"config.json": "{}"})
    assert resolve_model("Qwen/Qwen2.5-7B").path == snap


def test_offline_miss_explains_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("Qwen/Qwen2.5-1.5B-Instruct")
    msg = str(e.value)
    assert "Qwen/Qwen2.5-1.5B-Instruct" in msg and str(tmp_path / "empty") in msg and "--model PATH" in msg


def test_no_network_miss_explains_how_to_fix(tmp_path, monkeypatch):
    """This machine has no route to the hub: the download fails and the error still says what to do."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ModelNotFoundError, match="--model PATH"):
        resolve_model("Qwen/Qwen2.5-1.5B-Instruct")


def test_not_a_path_nor_repo_id():
    with pytest.raises(ModelNotFoundError, match="neither an existing directory"):
        resolve_model("./no/such/dir")


def test_registry():
    assert spec_for_config({"architectures": ["Qwen2ForCausalLM"]}).gguf_arch == "qwen2"
    with pytest.raises(UnsupportedArchitectureError, match="Qwen2ForCausalLM"):
        spec_for_config({"architectures": ["MistralForCausalLM"]})
    with pytest.raises(CheckpointError, match="architectures"):
        spec_for_config({})


@pytest.mark.parametrize("size, variant, preset, name", [
    ("1.5b", "instruct", "Q5_K_M", "qwen2.5-1.5b-instruct-q5_k_m.gguf"),
    ("7b", "coder-instruct", "Q4_K_M", "qwen2.5-coder-7b-instruct-q4_k_m.gguf"),
    ("72b", "base", "Q8_0", "qwen2.5-72b-q8_0.gguf"),
])
def test_output_names_follow_qwen(size, variant, preset, name):
    from qconvert.pipelines.gguf import output_name

    assert output_name(hub_id(size, variant), preset) == name


def test_an_existing_file_is_not_a_hub_id(tmp_path, monkeypatch):
    """``org/model.safetensors`` looks like a repo id; as an existing relative path it is refused as a file,
    without asking the hub (the endpoint is a closed port: a lookup would fail differently)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a checkpoint directory.*config.json"):
        resolve_model("ckpt/model.safetensors")
