"""Model cards: the README.md of every artifact qconvert writes, from one renderer.

    Card.render()   title, intro, optional Hugging Face front matter, then sections (heading + markdown body)
    int4_card       GPTQ / AWQ checkpoint directories (``qconvert gptq|awq``, ``qconvert.write_int4``)
    compressed_card compressed-tensors directories: pack-quantized W4A16/W8A16 (``--format compressed-tensors``)
                    and int-quantized W8A8 (``qconvert w8a8``); ``compressed_layout`` is its layout section, also
                    used by ``qconvert convert-format``
    onnx_card       ONNX model directories (``qconvert onnx``, ``qconvert.export_onnx``)
    release_card    every artifact of a release (GGUF, GPTQ, AWQ, ONNX): front matter, hashes, measured quality

Builders take plain values (numbers, strings, the manifest entry), never pipeline objects, so this module sits at
the bottom with the formats and anything above may call it. Release cards hold no wall times: an artifact's
README is as deterministic as its weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qconvert import __version__

# Hugging Face ``library_name`` and a one-line way to run each artifact kind.
LIBRARY = {"gguf": "gguf", "gptq": "transformers", "awq": "transformers", "onnx": "onnxruntime-genai",
           "w8a8": "transformers"}
USAGE = {
    "gguf": "llama-cli -m {file} -cnv    # or: ollama / LM Studio / llama-cpp-python",
    "gptq": "vllm serve ./{name} --quantization gptq_marlin    # transformers: needs gptqmodel + optimum",
    "awq": "vllm serve ./{name} --quantization awq_marlin    # transformers: needs gptqmodel + optimum",
    "compressed-tensors": "vllm serve ./{name}    # transformers: needs the compressed-tensors package",
    "onnx": "python -c \"import onnxruntime_genai as og; og.Model('./{name}')\"",
    "w8a8": "vllm serve ./{name}    # int8 weights and activations; transformers: needs the compressed-tensors package",
}

# Appended to a GPTQ/AWQ card once its quality has been measured (``write_int4(evaluate=True)``).
QUALITY_SECTION = """
## Measured quality

{quality}. Text: the project's held-out evaluation text (disjoint from the calibration set); the float source
and this checkpoint's dequantized weights each run in qconvert's streamed forward, scored exactly as
`qconvert verify` scores them (same windows, positions and metrics), so it reproduces these figures.
"""


@dataclass(frozen=True)
class Card:
    """One README.md: ``sections`` are (heading, body); a section without heading continues the previous text."""

    title: str
    intro: str
    sections: Sequence[tuple[str | None, str]] = ()
    front_matter: Sequence[tuple[str, str | Sequence[str]]] = ()

    def render(self) -> str:
        parts = []
        if self.front_matter:
            lines = ["---"]
            for key, value in self.front_matter:
                if isinstance(value, str):
                    lines.append(f"{key}: {value}")
                else:
                    lines += [f"{key}:"] + [f"- {v}" for v in value]
            parts.append("\n".join(lines + ["---"]))
        parts += [f"# {self.title}", self.intro.strip()]
        for heading, body in self.sections:
            parts.append(f"## {heading}\n\n{body.strip()}" if heading else body.strip())
        return "\n\n".join(parts) + "\n"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A markdown table; ``align`` has one character per column, ``r`` for right-aligned (numbers)."""
    rule = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["|" + "|".join(f" {h} " if h else " " for h in header) + "|", "|" + "|".join(rule) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def settings_rows(settings: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(`key`, `json value`) rows of a settings table."""
    return [(f"`{k}`", f"`{json.dumps(v)}`") for k, v in settings.items()]


# -- GPTQ / AWQ --------------------------------------------------------------------------------------------------

def int4_card(name: str, source: str, method: str, qcfg: Mapping[str, Any], calib: str, *, n_tokens: int,
              seconds: float, device: str, dtype: str, from_stats: bool = False, search: str = "",
              guard: str = "") -> str:
    """README.md of a GPTQ/AWQ checkpoint: settings (``quantization_config``), calibration data and forward."""
    forward = ("none: GPTQ from saved float-model Hessians (one float pass, not true-sequential)" if from_stats else
               f"{device}, {dtype}; layer-by-layer (quantized outputs propagated), statistics in float32")
    rows = settings_rows({k: v for k, v in qcfg.items() if k != "meta"})
    if qcfg.get("meta", {}).get("act_group_aware"):
        rows.append(("group-aware reordering (act-order within groups; plain layout)", "yes"))
    if search:
        rows.append(("AWQ search", search))
    kernel = "gptq_marlin" if method == "gptq" else "awq_marlin"
    return Card(
        title=f"{name} — {method.upper()} {qcfg['bits']}-bit",
        intro=f"Quantized with qconvert {__version__} from `{source}`.",
        sections=[
            (None, table(("setting", "value"), rows)),
            ("Calibration", (f"- data: {calib}\n- tokens used: {n_tokens:,}\n- forward: {forward}\n"
                            + (f"- {guard}\n" if guard else "") + f"- time: {seconds:.1f} s")),
            (None, ("Load with transformers (`AutoModelForCausalLM.from_pretrained`; GPTQ and AWQ both need "
                   "gptqmodel + optimum,\nthe combination qconvert's oracle tests load them with) or vLLM "
                   f"(`--quantization {kernel}`).")),
        ]).render()


# -- compressed-tensors -----------------------------------------------------------------------------------------

# quantization_config.format -> what the layout stores and what runs it (the card's "Layout" section)
CT_LAYOUTS = {
    "pack-quantized": ("The codes, scales and zero points are those of the {origin} result above, stored in the "
                       "`pack-quantized` layout\nthat llm-compressor writes (`quantization_config.quant_method = "
                       "\"compressed-tensors\"`, one config group of\n{bits}-bit int weights on every Linear but "
                       "`lm_head`). Activations stay in floating point ({scheme})."),
    "int-quantized": ("Weights are int8 with one scale per output row ({origin}), stored unpacked in the "
                      "`int-quantized` layout\nthat llm-compressor writes for W8A8 (`weight` int8, `weight_scale`); "
                      "every Linear but `lm_head` also quantizes its\ninput to int8 per token at run time "
                      "(`input_activations`: dynamic, strategy `token`), so the matmuls run on\nint8 kernels."),
}
CT_LOADING = ("vLLM detects it from config.json (`vllm serve ./{name}`); transformers loads it with the "
              "`compressed-tensors` package\ninstalled (no GPTQ/AWQ kernel package needed).")


def compressed_layout(fmt: str, origin: str, scheme: str, bits: int, name: str) -> tuple[str, str]:
    """The (heading, body) of a compressed-tensors card's layout section: ``fmt`` is ``quantization_config.format``,
    ``origin`` what made the weights (``GPTQ``, ``AWQ``, ``RTN + SmoothQuant α=0.5``), ``scheme`` e.g. ``W4A16``."""
    body = CT_LAYOUTS[fmt].format(origin=origin, bits=bits, scheme=scheme)
    return f"Layout: compressed-tensors {fmt}", body + "\n\n" + CT_LOADING.format(name=name)


def compressed_card(name: str, source: str, fmt: str, origin: str, scheme: str, bits: int,
                    settings: Mapping[str, Any], calib: str, *, n_tokens: int, seconds: float, device: str,
                    dtype: str, forward: str | None = None, from_stats: bool = False, search: str = "",
                    guard: str = "") -> str:
    """README.md of a compressed-tensors checkpoint: settings, calibration, the layout and how to load it.

    ``forward`` overrides the calibration forward line (e.g. round-to-nearest weights that needed none)."""
    rows = settings_rows({k: v for k, v in settings.items() if k != "meta"})
    if search:
        rows.append(("AWQ search", search))
    if forward is None:
        forward = ("none: GPTQ from saved float-model Hessians (one float pass, not true-sequential)" if from_stats
                   else f"{device}, {dtype}; layer-by-layer (quantized outputs propagated), statistics in float32")
    return Card(
        title=f"{name} — {scheme} ({origin}, compressed-tensors)",
        intro=f"Quantized with qconvert {__version__} from `{source}`.",
        sections=[
            (None, table(("setting", "value"), rows)),
            ("Calibration", (f"- data: {calib}\n- tokens used: {n_tokens:,}\n- forward: {forward}\n"
                             + (f"- {guard}\n" if guard else "") + f"- time: {seconds:.1f} s")),
            compressed_layout(fmt, origin, scheme, bits, name),
        ]).render()


# -- ONNX --------------------------------------------------------------------------------------------------------

class DecoderShape(Protocol):
    """What an ONNX card states about the decoder (``qconvert.onnx_export.graph.Dims`` has these fields)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def tie_word_embeddings(self) -> bool: ...
    @property
    def rope_theta(self) -> float: ...
    @property
    def rms_norm_eps(self) -> float: ...


def onnx_card(name: str, source: str, precision: str, algo: str, block_size: int, external: bool, seconds: float,
              nbytes: int, dims: DecoderShape, calib: str | None, *, accuracy_level: int | None = None,
              tables: tuple[int, int] | None = None, attention: str = "gqa", mixed: str | None = None) -> str:
    """README.md of an ONNX model directory ``name``: weights layout, shapes, how to run it.

    int4 / int8: ``accuracy_level`` is MatMulNBits'; ``tables`` (bits, block size) of the embedding / lm_head, None
    when they are float32. ``attention``: ``gqa`` (fused GroupQueryAttention) or ``plain`` (explicit ops). ``mixed``:
    which linears a mixed-precision int4 export wrote at 8 bits."""
    if precision in ("int4", "int8"):
        weights = (f"decoder linears as `com.microsoft.MatMulNBits` ({precision[3:]}-bit, block size {block_size}, "
                   f"from {algo}; symmetric weights without zero points), `accuracy_level {accuracy_level}`; "
                   "norms and biases float32" + (f"; mixed precision: {mixed}" if mixed else ""))
        table_text = ("embedding / lm_head float32" if tables is None else
                      f"embedding `com.microsoft.GatherBlockQuantized` and lm_head MatMulNBits ({tables[0]}-bit RTN, "
                      f"block size {tables[1]})")
        shared = "one set of initializers for the embedding and the lm_head"
    else:
        weights = f"all weights {precision}; norms and RoPE computed in float32"
        table_text, shared = f"embedding / lm_head {precision}", "one initializer for the embedding Gather and the lm_head Gemm"
    tied = f"tied ({shared})" if dims.tie_word_embeddings else "untied"
    fused = attention == "gqa"
    attention_text = ("`com.microsoft.GroupQueryAttention` (rotary inside; past and present may share one buffer)"
                      if fused else "explicit ops (MatMul, Softmax; rotary from `position_ids`), float32 scores")
    rows = [
        ("precision", precision), ("weights", weights), ("embedding / lm_head", table_text),
        ("attention", attention_text),
        ("layers / heads / kv heads / head dim",
         f"{dims.num_layers} / {dims.num_heads} / {dims.num_kv_heads} / {dims.head_dim}"),
        ("embeddings", tied), ("RoPE theta / RMSNorm eps", f"{dims.rope_theta:g} / {dims.rms_norm_eps:g}"),
        ("weights stored", f"{nbytes / 1e6:.1f} MB {'in model.onnx.data (external data)' if external else 'inside model.onnx'}"),
        ("calibration", calib or "none"), ("export time", f"{seconds:.1f} s"),
    ]
    io = (f"Inputs `input_ids`, `attention_mask`{'' if fused else ', `position_ids`'} (int64) and "
          f"`past_key_values.N.key/value`\n"
          f"`[batch, {dims.num_kv_heads}, past, {dims.head_dim}]`; outputs `logits` (float32) and "
          "`present.N.key/value`.")
    run = (f"Run it with onnxruntime-genai:\n\n```python\nimport onnxruntime_genai as og\nmodel = og.Model(\"{name}\")\n"
           f"```\n\nor with onnxruntime directly (`qconvert.runtimes.onnxrt.OnnxModel(\"{name}\").greedy(ids, 20)`).")
    return Card(title=name, intro=f"ONNX export of `{source}` by qconvert {__version__}.",
                sections=[(None, table(("", ""), rows)), (None, io), (None, run)]).render()


# -- release artifacts -------------------------------------------------------------------------------------------

def artifact_title(model_name: str, kind: str, settings: Mapping[str, Any]) -> str:
    """``Qwen2.5-7B-Instruct — GGUF Q4_K_M`` / ``— GPTQ Int4`` / ``— AWQ`` / ``— ONNX int4``; a GPTQ/AWQ result in
    the compressed-tensors layout (``format``) adds `` (compressed-tensors)``."""
    base = model_name.split("/")[-1]
    if kind == "gguf":
        return f"{base} — GGUF {settings.get('preset')}"
    layout = " (compressed-tensors)" if settings.get("format") == "compressed-tensors" else ""
    if kind == "gptq":
        return f"{base} — GPTQ Int{settings.get('bits', 4)}{layout}"
    if kind == "awq":
        return f"{base} — AWQ{layout}"
    if kind == "w8a8":
        return f"{base} — W8A8 INT8 (compressed-tensors)"
    return f"{base} — ONNX {settings.get('precision', 'int4')}"


def release_card(entry: Mapping[str, Any], *, model_name: str, artifact: str, license: str, quantized_by: str,
                 tags: Sequence[str], release_name: str, repo_id: str | None, revision: str | None) -> str:
    """README.md of one release artifact from its manifest ``entry`` (files, settings, calibration, metrics)."""
    kind, settings = entry["kind"], entry["settings"]
    preset = settings.get("preset")
    m, th, ev = entry["metrics"], entry["thresholds"], entry["evaluation"]
    files = table(("file", "bytes", "sha256"), [(f"`{Path(k).name}`", f"{v['size']:,}", f"`{v['sha256']}`")
                                                 for k, v in entry["files"].items()], "lrl")
    calib = entry["calibration"]
    calib_text = (f"{calib['description']} (token sha256 `{calib['sha256']}`); statistics: {entry['statistics']}"
                  if calib else "none (this format needs no calibration data)")
    origin = f"[{model_name}](https://huggingface.co/{repo_id})" if repo_id else f"`{model_name}`"
    verdict = "PASS" if entry["passed"] else "FAIL (" + "; ".join(entry["failures"]) + ")"
    quality = table(("perplexity (float → this)", "ΔPPL", "mean KL", "top-1 agreement"),
                    [(f"{m['ppl_ref']:.4f} → {m['ppl']:.4f}", f"{m['dppl_pct']:+.3f}%", f"{m['kl_mean']:.5f}",
                      f"{100 * m['top1']:.2f}%")], "lrrr")
    all_tags = ["qconvert", kind, "quantized", *([preset.lower()] if preset else []), *tags]
    return Card(
        title=artifact_title(model_name, kind, settings),
        intro=(f"Made by `qconvert release` (qconvert {__version__}, recipe `{release_name}`) from\n"
               f"{origin}{f' at revision `{revision}`' if revision else ''}. The release's `manifest.json` lists "
               "the\nsource checkpoint's file hashes and every setting below."),
        front_matter=[("base_model", model_name), ("quantized_by", quantized_by), ("library_name", LIBRARY[kind]),
                      ("license", license), ("pipeline_tag", "text-generation"),
                      ("tags", list(dict.fromkeys(all_tags)))],
        sections=[
            ("Files", f"{files}\n\nBits per weight (decoder matrices): {entry['bits_per_weight']:.3f}."),
            ("Settings", table(("setting", "value"), settings_rows(settings))),
            ("Calibration", calib_text),
            ("Measured quality", (
                f"Against the float source on {ev['n_tokens']:,} tokens of held-out text ({ev['source']},\n"
                f"sha256 `{ev['sha256']}`), {ev['windows']} windows of {ev['ctx']} tokens, run in\n{m['runtime']}:\n\n"
                f"{quality}\n\nGate: ΔPPL ≤ {th['max_dppl_pct']:.3f}%, mean KL ≤ {th['max_kl']:.5f}: **{verdict}**.")),
            ("Use", "```\n" + USAGE[settings.get("format") if settings.get("format") in USAGE else kind]
             .format(file=Path(next(iter(entry["files"]))).name, name=artifact) + "\n```"),
        ]).render()
