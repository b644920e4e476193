"""One registry of supported architectures, keyed on ``config.json["architectures"]``.

Per-model knowledge is a declarative ``ArchSpec``; exporters read the spec, never class names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qconvert.errors import CheckpointError, TokenizerError, UnsupportedArchitectureError
from qconvert.io.safetensors import strict_json
from qconvert.names import QWEN2_TENSOR_NAMES, NameMap


@dataclass(frozen=True)
class ArchSpec:
    """What qconvert knows about one HF architecture.

    ``gguf_arch`` is the GGUF ``general.architecture``; ``hparam_keys`` maps GGUF hparam key suffixes to
    config.json keys (written as u32 unless listed in ``float_hparams``); ``block_prefix`` and ``sequential``
    describe the decoder blocks for calibration: sub-layer groups in true-sequential order, where the linears of
    one group read the same input tensor (one input site: one Hessian, one importance vector).
    """

    hf_arch: str
    gguf_arch: str
    tensor_names: MappingProxyType[str, str]
    hparam_keys: tuple[tuple[str, str], ...]
    float_hparams: frozenset[str]
    block_prefix: str
    sequential: tuple[tuple[str, ...], ...]
    qkv_bias: bool

    @property
    def name_map(self) -> NameMap:
        return NameMap(self.tensor_names)

    @property
    def input_sites(self) -> MappingProxyType[str, str]:
        """Each calibrated linear (name relative to the block) -> the first linear of its group, which names the
        input site it shares with the rest of the group (q/k/v -> q_proj, gate/up -> gate_proj)."""
        return MappingProxyType({sub: group[0] for group in self.sequential for sub in group})


QWEN2 = ArchSpec(
    hf_arch="Qwen2ForCausalLM",
    gguf_arch="qwen2",
    tensor_names=QWEN2_TENSOR_NAMES,
    # GGUF key suffix (after "qwen2."), config.json key; order = the order llama.cpp's converter writes them.
    hparam_keys=(
        ("block_count", "num_hidden_layers"),
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("feed_forward_length", "intermediate_size"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
        ("rope.freq_base", "rope_theta"),
        ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ),
    float_hparams=frozenset({"rope.freq_base", "attention.layer_norm_rms_epsilon"}),
    block_prefix="model.layers",
    sequential=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    qkv_bias=True,
)

REGISTRY: MappingProxyType[str, ArchSpec] = MappingProxyType({QWEN2.hf_arch: QWEN2})


def spec_for_config(config: dict[str, Any]) -> ArchSpec:
    """The ``ArchSpec`` for a parsed config.json; a clear error when it names no supported architecture."""
    archs = config.get("architectures")
    supported = ", ".join(sorted(REGISTRY))
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(
            "config.json has no 'architectures' list of names, so qconvert cannot tell which model this is. "
            f"Add e.g. \"architectures\": [\"Qwen2ForCausalLM\"] to config.json (supported: {supported})."
        )
    for arch in archs:
        if arch in REGISTRY:
            return REGISTRY[arch]
    raise UnsupportedArchitectureError(
        f"architecture {archs} is not supported; qconvert supports: {supported}. "
        "Qwen2.5 base/Instruct/Coder/Math checkpoints are all Qwen2ForCausalLM."
    )


def rope_theta(config: dict[str, Any]) -> float:
    """RoPE base from either config style: transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``."""
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    raise CheckpointError("config.json has no rope_theta (nor rope_parameters.rope_theta); add the model's RoPE base.")


# Shape-defining config.json keys -> the largest value accepted. The largest published decoders stay far below
# (Llama-3.1-405B: 126 layers, hidden 16384, FFN 53248, 128 heads; vocabularies up to 256K); a value past these
# caps is a corrupt or hostile config that would make qconvert plan and allocate for tensors no checkpoint holds.
SIZE_LIMITS: MappingProxyType[str, int] = MappingProxyType({
    "num_hidden_layers": 1024,
    "hidden_size": 65536,
    "intermediate_size": 1 << 20,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "vocab_size": 1 << 24,
})
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # real config.json files are a few KB
CONFIG_FIX = "Re-download config.json from the model's repository (or fix the value by hand)."


def _positive_int(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if type(value) is not int or value < 1:  # bool is an int subclass; 896.0 is not a size
        raise CheckpointError(f"{where}: {key} is {value!r}; it must be a positive integer. {CONFIG_FIX}")
    if value > SIZE_LIMITS[key]:
        raise CheckpointError(f"{where}: {key} is {value}, above the limit of {SIZE_LIMITS[key]} (no real model comes "
                              f"close; a value this large would make qconvert allocate for tensors that cannot "
                              f"exist). The config is corrupt or hostile. {CONFIG_FIX}")
    return value


def _check_floats(config: dict[str, Any], where: str) -> None:
    theta = config["rope_theta"] if "rope_theta" in config else (config.get("rope_parameters") or {}).get("rope_theta")
    if not isinstance(theta, int | float) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
        raise CheckpointError(f"{where}: rope_theta is {theta!r}; RoPE needs a finite positive base (Qwen2.5: "
                              f"1000000.0). {CONFIG_FIX}")
    eps = config.get("rms_norm_eps")
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise CheckpointError(f"{where}: rms_norm_eps is {eps!r}; RMSNorm needs a finite non-negative epsilon "
                              f"(Qwen2.5: 1e-06). {CONFIG_FIX}")


# Optional keys that code reads with ``.get`` -> the JSON kind they must have: a wrong kind would crash far away.
OPTIONAL_KINDS: tuple[tuple[str, type, str], ...] = (
    ("tie_word_embeddings", bool, "true or false"), ("rope_scaling", dict, "an object"),
    ("rope_parameters", dict, "an object"), ("quantization_config", dict, "an object"),
    ("max_position_embeddings", int, "a positive integer"), ("head_dim", int, "a positive integer"))


def _check_kinds(config: dict[str, Any], where: str) -> None:
    for key, kind, spelled in OPTIONAL_KINDS:
        value = config.get(key)
        if value is None:
            continue
        wrong = type(value) is not kind if kind is int else not isinstance(value, kind)  # bool is an int subclass
        if wrong or (kind is int and value < 1):
            raise CheckpointError(f"{where}: {key} is {str(value)[:60]!r}; it must be {spelled} (or absent). "
                                  f"{CONFIG_FIX}")


def validate_config(config: dict[str, Any], where: str = "config.json") -> ArchSpec:
    """Refuse a parsed config.json whose shape keys are missing, mistyped, inconsistent or absurd; return its spec.

    Every later stage sizes tensors and loops from these numbers, so they are checked once, before any work.
    """
    spec = spec_for_config(config)
    sizes = {key: _positive_int(config, key, where) for key in SIZE_LIMITS}
    hidden, heads, kv = sizes["hidden_size"], sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if hidden % heads:
        raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}, so "
                              f"the heads cannot split the hidden state. {CONFIG_FIX}")
    if heads % kv:
        raise CheckpointError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; "
                              f"grouped-query attention shares each KV head among a whole number of heads. {CONFIG_FIX}")
    _check_kinds(config, where)
    _check_floats(config, where)  # after _check_kinds: rope_parameters is a dict or absent
    return spec


def _tokenizer_ids(path: Path) -> int:
    """The largest token id in tokenizer.json (model vocabulary and added tokens); -1 when it has none."""
    tok = strict_json(path.read_bytes(), str(path))
    vocab = tok.get("model", {}).get("vocab") if isinstance(tok, dict) and isinstance(tok.get("model"), dict) else None
    added = tok.get("added_tokens", []) if isinstance(tok, dict) else None
    if not isinstance(vocab, dict) or not isinstance(added, list) or not all(isinstance(t, dict) for t in added):
        raise TokenizerError(f"{path} is not a BPE tokenizer.json (no model.vocab object / added_tokens list); "
                             "re-download the tokenizer files from the model's repository.")
    ids = [*vocab.values(), *(t.get("id") for t in added)]
    if not all(type(i) is int and i >= 0 for i in ids):
        raise TokenizerError(f"{path} has a token id that is not a non-negative integer; re-download it.")
    return max(ids, default=-1)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json of ``model_dir``, parsed strictly and validated (``validate_config``) before any work.

    When the directory has a tokenizer.json, ``vocab_size`` must also cover every token id in it: an id past the
    embedding's rows crashes GPTQ/AWQ/verify with an IndexError and gives an ONNX model that fails at run time.
    """
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{model_dir} has no config.json; point --model at a Hugging Face checkpoint directory.")
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is not a regular file of at most {MAX_CONFIG_BYTES} bytes (a FIFO, a directory "
                              f"or far too large to be a model config). {CONFIG_FIX}")
    config = strict_json(path.read_bytes(), str(path))
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object. {CONFIG_FIX}")
    validate_config(config, str(path))
    tokenizer = Path(model_dir) / "tokenizer.json"
    if tokenizer.is_file() and (top := _tokenizer_ids(tokenizer)) >= config["vocab_size"]:
        raise CheckpointError(f"{path}: vocab_size {config['vocab_size']} is smaller than the tokenizer's vocabulary "
                              f"(token ids up to {top} in tokenizer.json), so some tokens have no embedding row. The "
                              "config and tokenizer do not belong together: re-download both from the same repository.")
    return config
