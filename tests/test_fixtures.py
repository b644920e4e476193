"""Contracts of the fixtures: transformers loads every checkpoint, the tokenizer is Qwen2-shaped and lossless,
builds are byte-reproducible, and the trained demo model is much better than random weights."""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from qconvert.fixtures import (
    CHAT_TEMPLATE,
    DEFAULT_BPE_VOCAB_SIZE,
    FIXTURES,
    QWEN_ADDED_TOKENS,
    FixtureSpec,
    build_fixture,
    build_tokenizer,
    eval_text,
    fixture_key,
    fixture_path,
    prune_cache,
    render_chat,
    tensor_shapes,
    tokenizer_size,
    training_text,
)
from qconvert.fixtures.checkpoint import bf16_bits_to_f32, split_contiguous, to_bf16_bits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

RANDOM_FIXTURES = [name for name, spec in FIXTURES.items() if not spec.trained_steps]
ROUND_TRIP_TEXTS = [
    "Hello world! It's 2024 - isn't it? They'll say \"yes\", we've agreed.",
    "今天天气很好，我们去公园散步吧。量化可以让模型变小。",
    "def f(x: int) -> int:\n    return x ** 2  # 平方\n\n\nprint(f(12))\n",
    "emoji 😀👍🏽 👨‍👩‍👧 and flags 🇨🇳🇬🇧",
    "  leading spaces,\ttabs,\r\nCRLF lines\n\n\n   trailing   ",
    "mixed: α≈β, ∑x², €5, ｆｕｌｌｗｉｄｔｈ, Здравствуйте, こんにちは, 안녕하세요",
    "<|im_start|>user\nhi<|im_end|>\n<tool_call>{\"name\": \"f\"}</tool_call><|fim_prefix|>a<|fim_suffix|>",
]


def _sha256_tree(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


# --------------------------------------------------------------------------------------------------------------
# corpus


def test_corpus_is_sized_multilingual_and_held_out() -> None:
    train, held_out = training_text(), eval_text()
    assert 100_000 <= len(train.encode()) <= 300_000
    assert 15_000 <= len(held_out.encode()) <= 60_000
    for text in (train, held_out):
        assert "的" in text and " the " in text and "def " in text and " = " in text and "<|im_start|>" in text
    long_train_paragraphs = {p for p in train.split("\n\n") if len(p) > 100}
    held_paragraphs = [p for p in held_out.split("\n\n") if len(p) > 100]
    assert held_paragraphs and not long_train_paragraphs.intersection(held_paragraphs)
    assert training_text() is train  # computed once per process


# --------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_and_matches_tokenizers(hf_tokenizer, tokenizer_dir: Path, text: str) -> None:
    from tokenizers import Tokenizer

    ids = hf_tokenizer.encode(text)
    assert ids == Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text).ids
    assert hf_tokenizer.decode(ids) == text
    assert max(ids) < tokenizer_size()


def test_tokenizer_normalizes_nfc(hf_tokenizer) -> None:
    decomposed = "e\u0301te\u0301"  # é as e + combining acute
    assert hf_tokenizer.decode(hf_tokenizer.encode(decomposed)) == unicodedata.normalize("NFC", decomposed)


def test_qwen2_pre_tokenizer_rules(hf_tokenizer, tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    pre = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str("I'M here 123!!\n\nok,\u4f60\u597d")]
    # contractions case-insensitive; every digit alone; a punctuation run keeps its newlines; one leading
    # non-letter joins a letter run (Ġ is the space, Ċ the newline, in GPT-2's byte-to-unicode map)
    assert pieces == ["I", "'M", "Ġhere", "Ġ", "1", "2", "3", "!!ĊĊ", "ok", ",ä½łå¥½"]
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("12345")) == ["1", "2", "3", "4", "5"]


def test_vocabulary_layout(tokenizer_dir: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    assert len(vocab) == DEFAULT_BPE_VOCAB_SIZE and sorted(vocab.values()) == list(range(DEFAULT_BPE_VOCAB_SIZE))
    assert data["model"]["unk_token"] is None and data["model"]["byte_fallback"] is False
    # GPT-2's byte order: printable bytes map to themselves, the rest to U+0100.. in byte order; ids 0..255
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    assert [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])[:256]] == symbols
    assert all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)  # Qwen's "a b" form
    assert len(merges) == DEFAULT_BPE_VOCAB_SIZE - 256
    assert json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8")) == vocab
    merges_txt = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges_txt[0] == "#version: 0.2" and merges_txt[1:] == merges
    assert data["normalizer"] == {"type": "NFC"}
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["behavior"] == "Isolated" and split["pattern"]["Regex"].startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    assert byte_level["add_prefix_space"] is False and byte_level["use_regex"] is False
    assert data["decoder"]["type"] == "ByteLevel"


def test_added_tokens_ids_and_flags(tokenizer_dir: Path, hf_tokenizer) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert len(QWEN_ADDED_TOKENS) == 22 and sum(t.special for t in QWEN_ADDED_TOKENS) == 14
    expected = [(DEFAULT_BPE_VOCAB_SIZE + i, t.content, t.special) for i, t in enumerate(QWEN_ADDED_TOKENS)]
    assert [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]] == expected
    assert all(not t["normalized"] and not t["lstrip"] and not t["rstrip"] for t in data["added_tokens"])
    assert [(int(i), t["content"], t["special"]) for i, t in config["added_tokens_decoder"].items()] == expected
    loaded = hf_tokenizer.added_tokens_decoder
    assert [(i, loaded[i].content, loaded[i].special) for i, _, _ in expected] == expected
    assert hf_tokenizer.convert_tokens_to_ids("<tool_call>") == DEFAULT_BPE_VOCAB_SIZE + 14
    assert len(hf_tokenizer) == tokenizer_size() == DEFAULT_BPE_VOCAB_SIZE + 22


@pytest.mark.parametrize("variant, eos", [("instruct", "<|im_end|>"), ("base", "<|endoftext|>")])
def test_tokenizer_config_as_qwen(tmp_path: Path, variant: str, eos: str) -> None:
    build_tokenizer(tmp_path, variant=variant)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is False and config["bos_token"] is None and config["errors"] == "replace"
    assert config["eos_token"] == eos and config["pad_token"] == "<|endoftext|>" and config["unk_token"] is None
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.eos_token == eos and tok.pad_token_id == DEFAULT_BPE_VOCAB_SIZE and tok.bos_token is None
    assert tok.encode("hi") == tok("hi")["input_ids"]  # no BOS added


def test_chat_template_matches_render_chat(hf_tokenizer) -> None:
    conversations = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
         {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"}],
    ]
    assert hf_tokenizer.chat_template == CHAT_TEMPLATE
    for messages in conversations:
        for gen in (False, True):
            assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                render_chat(messages, add_generation_prompt=gen)
    assert render_chat(conversations[0], True).endswith("<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("name", list(FIXTURES))
def test_transformers_loads_and_runs(name: str) -> None:
    spec, path = FIXTURES[name], fixture_path(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == \
        (spec.num_hidden_layers, spec.hidden_size, spec.vocab_size)
    assert cfg.tie_word_embeddings == spec.tie_word_embeddings
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == spec.tie_word_embeddings
    ids = torch.tensor([[5, 300, 1999, 2001, 7, 42]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 6, spec.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(FIXTURES))
def test_checkpoint_files(name: str) -> None:
    spec, path = FIXTURES[name], fixture_path(name)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["torch_dtype"] == "bfloat16" and config["rope_theta"] == spec.rope_theta
    assert config["use_sliding_window"] is False and "rope_parameters" not in config
    assert config.get("rope_scaling") == (None if spec.rope_scaling is None else dict(spec.rope_scaling))
    assert config["bos_token_id"] == DEFAULT_BPE_VOCAB_SIZE
    assert config["eos_token_id"] == DEFAULT_BPE_VOCAB_SIZE + (2 if spec.variant == "instruct" else 0)
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == spec.shards
    found: dict[str, tuple[str, list[int], str]] = {}
    for file in files:
        with safe_open(file, framework="numpy") as f:  # numpy: reading headers only, no bf16 needed
            assert f.metadata() == {"format": "pt"}
        found |= {n: (h["dtype"], h["shape"], file.name) for n, h in _header(file).items() if n != "__metadata__"}
    assert {n: (d, tuple(s)) for n, (d, s, _) in found.items()} == \
        {n: ("BF16", s) for n, s in tensor_shapes(spec).items()}
    if spec.shards > 1:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == {n: f for n, (_, _, f) in found.items()}
        assert index["metadata"]["total_size"] == sum(2 * math.prod(s) for s in tensor_shapes(spec).values())


def _header(file: Path) -> dict:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


@pytest.mark.parametrize("name", RANDOM_FIXTURES)
def test_builds_are_byte_identical(tmp_path: Path, name: str) -> None:
    first = _sha256_tree(build_fixture(FIXTURES[name], tmp_path / "a"))
    assert first == _sha256_tree(build_fixture(FIXTURES[name], tmp_path / "b"))
    assert first == _sha256_tree(fixture_path(name))  # and the cached copy is the same build


def test_fixture_path_caches_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCONVERT_FIXTURE_CACHE", str(tmp_path / "cache"))
    path = fixture_path("tiny-tied")
    assert path.parent == tmp_path / "cache" and path.name == fixture_key(FIXTURES["tiny-tied"])
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def refuse(*args: object) -> None:
        raise AssertionError("a cached fixture was rebuilt")

    monkeypatch.setattr("qconvert.fixtures.models.build_fixture", refuse)
    assert fixture_path("tiny-tied") == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir() if p.is_dir()] == [path.name]  # no temp dir left behind
    with pytest.raises(KeyError, match="unknown fixture"):
        fixture_path("no-such-fixture")


def test_prune_cache_removes_only_stale_fixture_builds(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    current = fixture_path("tiny-tied", cache_dir=tmp_path)
    stale = ["tiny-tied-0123456789ab", ".tiny-tied-0123456789ab.x1y2", ".tiny-tied-0123456789ab.lock"]
    running = ["demo-ffffffffffff", ".demo-ffffffffffff.tmp1"]  # a build holding its lock: left alone
    for name in [*stale, *running, "not-a-fixture"]:
        if name.endswith(".lock"):
            (tmp_path / name).touch()
        else:
            (tmp_path / name).mkdir()
    with (tmp_path / ".demo-ffffffffffff.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = prune_cache(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    left = {p.name for p in tmp_path.iterdir()}
    assert {current.name, *running, "not-a-fixture"} <= left and not left & set(stale)


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(spec: FixtureSpec, out_dir: Path) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr("qconvert.fixtures.models.build_fixture", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        fixture_path("tiny-tied", cache_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="kv heads"):
        FixtureSpec("bad", hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=3, vocab_size=2304, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        FixtureSpec("bad", hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2000, tie_word_embeddings=True)
    spec = FIXTURES["tiny-yarn"]
    with pytest.raises(TypeError):
        spec.rope_scaling["factor"] = 8.0  # type: ignore[index]
    assert hash(spec) == hash(FIXTURES["tiny-yarn"])


def test_bf16_rounding_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10_000, dtype=np.float32) * 10.0 ** rng.integers(-6, 6, 10_000),
                        # exact half-way cases: round to even both ways
                        np.array([1.00390625, 1.01171875, -1.00390625, 3.0e38], dtype=np.float32)])
    ours = bf16_bits_to_f32(to_bf16_bits(x))
    theirs = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(ours, theirs)


def test_shard_split_is_contiguous_and_non_empty() -> None:
    assert split_contiguous([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert split_contiguous([5] * 10, 3) == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert split_contiguous([1, 1, 100], 3) == [0, 1, 2]


# --------------------------------------------------------------------------------------------------------------
# the trained demo model


def _hf_perplexity(path: Path, text: str, window: int = 256) -> float:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([tok.encode(text)])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start:start + window + 1]
            logits = model(input_ids=chunk[:, :-1]).logits[0]
            total += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(total / count)


def test_demo_perplexity_is_far_below_random() -> None:
    text = eval_text()
    trained, random = _hf_perplexity(fixture_path("demo"), text), _hf_perplexity(fixture_path("tiny-tied"), text)
    assert random > 1000  # near-uniform over the 2304 logits
    assert trained < 100 and trained < random / 20


def test_training_forward_matches_transformers() -> None:
    from qconvert.fixtures.train import forward

    spec, path = FIXTURES["demo"], fixture_path("demo")
    with safe_open(path / "model.safetensors", framework="pt") as f:
        weights = {name: f.get_tensor(name).float() for name in f.keys()}  # noqa: SIM118 - not iterable
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(path).encode(eval_text()[:400])])
    with torch.no_grad():
        ours, theirs = forward(weights, ids, spec), model(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


@pytest.mark.slow
def test_demo_build_is_reproducible(tmp_path: Path) -> None:
    assert _sha256_tree(build_fixture(FIXTURES["demo"], tmp_path)) == _sha256_tree(fixture_path("demo"))
