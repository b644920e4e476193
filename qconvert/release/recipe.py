"""Release recipes: a TOML file that names models, formats and their settings, validated against a schema table.

    [release]      name, quantized_by, threads, device, seed, tags
    [calibration]  source, samples, seq_len, format, batch_size       (shared by GPTQ, AWQ and imatrix GGUFs)
    [evaluation]   text | text_file, ctx, chunks                       (the held-out text every artifact is scored on)
    [thresholds]   max_dppl_pct, max_kl, min_top1                      (defaults; a format may override them)
    [output]       layout = "by-model" | "flat"
    [[models]]     sizes + variants | hub | path | fixture; name, license
    [[formats]]    kind = "gguf" | "gptq" | "awq" | "onnx" | "w8a8" and that kind's keys (``FORMAT_KEYS``); gptq
                   and awq take format = "gptq" | "awq" (default: the kind's own layout) or "compressed-tensors"
                   (pack-quantized); w8a8 is always compressed-tensors int-quantized (``qconvert w8a8``)

tomllib reports no positions, so ``Recipe.where`` finds a key's line in the text itself; every error names
``file:line``. Checks that need the model's shapes (a K-quant that must fall back under ``pure = true``, a group
size that does not divide a width) run in ``qconvert.release.plan`` before any work and use the same locator.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from qconvert.errors import QConvertError


class RecipeError(QConvertError):
    """The recipe is malformed or asks for something impossible; the message starts with ``file:line:``."""


_STR, _INT, _FLOAT, _BOOL, _STRS, _TABLE = "string", "integer", "number", "boolean", "list of strings", "table"

# section -> key -> type. ``models`` and ``formats`` are arrays of tables ([[models]], [[formats]]).
SECTIONS: MappingProxyType[str, MappingProxyType[str, str]] = MappingProxyType({
    "release": MappingProxyType({"name": _STR, "quantized_by": _STR, "threads": _INT, "device": _STR,
                                 "seed": _INT, "tags": _STRS}),
    "calibration": MappingProxyType({"source": _STR, "samples": _INT, "seq_len": _INT, "format": _STR,
                                     "batch_size": _INT}),
    "evaluation": MappingProxyType({"text": _STR, "text_file": _STR, "ctx": _INT, "chunks": _INT}),
    "thresholds": MappingProxyType({"max_dppl_pct": _FLOAT, "max_kl": _FLOAT, "min_top1": _FLOAT}),
    "output": MappingProxyType({"layout": _STR}),
    "models": MappingProxyType({"sizes": _STRS, "variants": _STRS, "hub": _STR, "path": _STR, "fixture": _STR,
                                "name": _STR, "license": _STR}),
    "formats": MappingProxyType({"kind": _STR, "id": _STR, "thresholds": _TABLE}),
})
ARRAY_SECTIONS = frozenset({"models", "formats"})

# [[formats]] keys allowed per kind, on top of kind / id / thresholds.
FORMAT_KEYS: MappingProxyType[str, MappingProxyType[str, str]] = MappingProxyType({
    "gguf": MappingProxyType({"presets": _STRS, "imatrix": _BOOL, "pure": _BOOL, "output_tensor_type": _STR,
                              "token_embedding_type": _STR, "optimize": _BOOL,
                              "target_bpw": _FLOAT}),
    "gptq": MappingProxyType({"bits": _INT, "group_size": _INT, "sym": _BOOL, "act_order": _BOOL,
                              "static_groups": _BOOL, "group_aware": _BOOL, "damp": _FLOAT,
                              "from_stats": _BOOL, "format": _STR}),
    "awq": MappingProxyType({"bits": _INT, "group_size": _INT, "n_grid": _INT, "clip_grid": _INT,
                             "search_samples": _INT, "clip_all": _BOOL, "format": _STR}),
    "onnx": MappingProxyType({"precision": _STR, "algo": _STR, "block_size": _INT, "from": _STR,
                              "accuracy_level": _INT, "keep_embedding_float": _BOOL, "table_bits": _INT,
                              "table_block_size": _INT, "attention": _STR,
                              "mixed_precision": _BOOL}),
    "w8a8": MappingProxyType({"weights": _STR, "smooth": _FLOAT, "damp": _FLOAT}),
})
ONNX_PRECISIONS = ("fp32", "fp16", "int4", "int8")
# onnx keys' values, as qconvert.onnx_export.matmulnbits spells them (validating a recipe must not need onnx; a test
# checks that they agree)
ONNX_QUANTIZED = ("int4", "int8")
ONNX_ACCURACY_LEVELS = (0, 1, 2, 4)
ONNX_TABLE_BITS = (4, 8)
ONNX_TABLE_BLOCK_SIZES = (16, 32, 64, 128)
ONNX_ATTENTIONS = ("gqa", "plain")
ONNX_QUANTIZED_KEYS = ("algo", "block_size", "from", "accuracy_level", "keep_embedding_float", "table_bits",
                       "table_block_size", "mixed_precision")
LAYOUTS = ("by-model", "flat")

DEFAULTS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType({
    "release": MappingProxyType({"quantized_by": "qconvert", "threads": 4, "device": "auto", "seed": 0, "tags": []}),
    "calibration": MappingProxyType({"source": "builtin", "samples": 128, "seq_len": 512, "format": "auto",
                                     "batch_size": 8}),
    "evaluation": MappingProxyType({"ctx": 512}),
    "thresholds": MappingProxyType({}),
    "output": MappingProxyType({"layout": "by-model"}),
})


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint to release. ``ref`` is what ``resolve_model`` takes, or ``fixture:NAME`` (a model the caller
    of the release provides by name: ``run_release(fixtures=...)``)."""

    ref: str
    name: str  # hub-style name used for artifact names and model cards, e.g. Qwen/Qwen2.5-7B-Instruct
    license: str | None
    index: int  # which [[models]] table it came from

    @property
    def slug(self) -> str:
        """``Qwen/Qwen2.5-7B-Instruct`` -> ``qwen2.5-7b-instruct`` (Qwen's lower-case artifact names)."""
        return self.name.rstrip("/").split("/")[-1].lower()


@dataclass(frozen=True, eq=False)
class FormatEntry:
    """One [[formats]] table: its kind, its id (unique in the recipe), its settings and threshold overrides."""

    kind: str
    id: str
    settings: dict[str, Any]  # plain dicts: recipes travel to Ray workers (a mappingproxy does not pickle)
    thresholds: dict[str, float]
    index: int


@dataclass
class Recipe:
    path: Path
    text: str
    release: dict[str, Any]
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    thresholds: dict[str, float]
    output: dict[str, Any]
    models: list[ModelEntry]
    formats: list[FormatEntry]
    _lines: list[str] = field(default_factory=list, repr=False)

    def where(self, section: str, index: int | None = None, key: str | None = None) -> str:
        """``recipes/x.toml:12`` for ``key`` in ``[section]`` (or the ``index``-th ``[[section]]``)."""
        return f"{self.path}:{_locate(self._lines, section, index, key)}"

    def error(self, section: str, index: int | None, key: str | None, message: str) -> RecipeError:
        return RecipeError(f"{self.where(section, index, key)}: {message}")


# -- locating keys in the text ------------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-]+)\s*\]\]?")


def _locate(lines: list[str], section: str, index: int | None, key: str | None) -> int:
    """1-based line of ``key`` in ``[section]`` (or the ``index``-th ``[[section]]``); else its header; else 1."""
    current: tuple[str, int | None] = ("", None)  # keys before the first header are top-level
    counts: dict[str, int] = {}
    header_line = 0
    for no, line in enumerate(lines, 1):
        m = _HEADER.match(line)
        if m:
            name = m.group(2)
            top = name.split(".")[0]
            if m.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                current = (name, counts[name])
            else:  # [formats.thresholds] belongs to the last [[formats]]
                current = (top, counts[top]) if top in counts and name != top else (name, None)
            if current == (section, index) and not header_line:
                header_line = no
            continue
        if current == (section, index) and key is not None and re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return no
    return header_line or 1


# -- validation -------------------------------------------------------------------------------------------------

def _type_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _FLOAT:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _STRS:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict)


def _check_keys(recipe: Recipe, table: dict, allowed: dict[str, str], section: str, index: int | None,
                label: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed keys: {', '.join(sorted(allowed))}"
            raise recipe.error(section, index, key, f"unknown key {key!r} in {label}{hint}")
        if not _type_ok(value, allowed[key]):
            raise recipe.error(section, index, key, f"{key} in {label} must be a {allowed[key]}, not {value!r}")


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate ``path``; raises ``RecipeError`` (with ``file:line``) on the first problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}; give the path of a .toml recipe (see recipes/).")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = m.group(1) if m else len(text.splitlines()) if "end of document" in str(e) else 1
        raise RecipeError(f"{path}:{line}: not valid TOML: {e}") from None
    recipe = Recipe(path, text, {}, {}, {}, {}, {}, [], [], text.splitlines())
    for section, value in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; sections: {', '.join(SECTIONS)}"
            raise recipe.error(section, None, None, f"unknown section [{section}]{hint}")
        if (section in ARRAY_SECTIONS) != isinstance(value, list):
            form = f"[[{section}]]" if section in ARRAY_SECTIONS else f"[{section}]"
            raise recipe.error(section, None, None, f"{section} must be written as {form}")
    for section in ("release", "calibration", "evaluation", "thresholds", "output"):
        table = data.get(section, {})
        _check_keys(recipe, table, dict(SECTIONS[section]), section, None, f"[{section}]")
        setattr(recipe, section, {**DEFAULTS[section], **table})
    recipe.release.setdefault("name", path.stem)
    _check_sections(recipe)
    _check_thresholds(recipe, recipe.thresholds, "thresholds", None)
    recipe.models = [m for i, t in enumerate(data.get("models", [])) for m in _models(recipe, t, i)]
    recipe.formats = [_format(recipe, t, i) for i, t in enumerate(data.get("formats", []))]
    if not recipe.models:
        raise recipe.error("", None, None, "the recipe names no model: add a [[models]] table")
    if not recipe.formats:
        raise recipe.error("", None, None, "the recipe names no format: add a [[formats]] table")
    _check_formats(recipe)
    return recipe


def _check_sections(recipe: Recipe) -> None:
    ev, cal, rel = recipe.evaluation, recipe.calibration, recipe.release
    if "text" in ev and "text_file" in ev:
        raise recipe.error("evaluation", None, "text_file", "give either text or text_file in [evaluation], not both")
    if cal["format"] not in ("auto", "chat", "raw"):
        raise recipe.error("calibration", None, "format", f"format {cal['format']!r}: use auto, chat or raw")
    for section, key, table in (("calibration", "samples", cal), ("calibration", "seq_len", cal),
                                ("release", "threads", rel), ("evaluation", "ctx", ev)):
        if table[key] < 1:
            raise recipe.error(section, None, key, f"{key} must be >= 1, not {table[key]}")
    if recipe.output["layout"] not in LAYOUTS:
        raise recipe.error("output", None, "layout", f"layout {recipe.output['layout']!r}: use {' or '.join(LAYOUTS)}")


def _check_thresholds(recipe: Recipe, table: dict, section: str, i: int | None) -> None:
    """Gate values must be finite and in range (a NaN limit would pass a damaged artifact)."""
    from qconvert.verify.thresholds import validate_limit

    for key, value in table.items():
        try:
            validate_limit(key, value)
        except QConvertError as e:
            raise recipe.error(section, i, key, str(e)) from None


def _models(recipe: Recipe, table: dict, i: int) -> list[ModelEntry]:
    from qconvert.family import hub_id

    _check_keys(recipe, table, dict(SECTIONS["models"]), "models", i, "[[models]]")
    sources = [k for k in ("sizes", "hub", "path", "fixture") if k in table]
    if len(sources) != 1:
        raise recipe.error("models", i, None, "each [[models]] needs exactly one of sizes (+ variants), hub, path "
                           f"or fixture; found {', '.join(sources) or 'none'}")
    lic = table.get("license")
    if "sizes" in table:
        if "name" in table:
            raise recipe.error("models", i, "name", "name applies to a single model, not to sizes x variants")
        out = []
        for size in table["sizes"]:
            for variant in table.get("variants", ["instruct"]):
                try:
                    repo = hub_id(size, variant)
                except QConvertError as e:
                    raise recipe.error("models", i, "sizes", str(e)) from None
                out.append(ModelEntry(repo, repo, lic, i))
        return out
    if "variants" in table:
        raise recipe.error("models", i, "variants", "variants goes with sizes; hub, path and fixture name one model")
    if "hub" in table:
        return [ModelEntry(table["hub"], table.get("name", table["hub"]), lic, i)]
    if "path" in table:
        where = (recipe.path.parent / table["path"]).resolve() if not Path(table["path"]).is_absolute() else \
            Path(table["path"])
        return [ModelEntry(str(where), table.get("name", where.name), lic, i)]
    # ``fixture = NAME``: a model the caller of the release provides by name (the CLI: the demo model), checked
    # when the model is resolved (``release.plan.resolve_source``)
    return [ModelEntry(f"fixture:{table['fixture']}", table.get("name", f"qconvert/{table['fixture']}"), lic, i)]


def _format(recipe: Recipe, table: dict, i: int) -> FormatEntry:
    kind = table.get("kind")
    if not isinstance(kind, str) or kind not in FORMAT_KEYS:
        raise recipe.error("formats", i, "kind" if kind else None,
                           f"[[formats]] needs kind = one of {', '.join(FORMAT_KEYS)}, got {kind!r}")
    allowed = {**SECTIONS["formats"], **FORMAT_KEYS[kind]}
    _check_keys(recipe, table, allowed, "formats", i, f"[[formats]] (kind {kind})")
    thresholds = table.get("thresholds", {})
    _check_keys(recipe, thresholds, dict(SECTIONS["thresholds"]), "formats", i, "[formats.thresholds]")
    _check_thresholds(recipe, thresholds, "formats", i)
    settings = {k: v for k, v in table.items() if k not in ("kind", "id", "thresholds")}
    fid = str(table.get("id") or _default_id(kind, settings))
    return FormatEntry(kind, fid, settings, dict(thresholds), i)


def _default_id(kind: str, s: dict) -> str:
    suffix = "-ct" if s.get("format") == "compressed-tensors" else ""  # both layouts may sit in one recipe
    if kind == "gptq":
        return f"gptq-int{s.get('bits', 4)}{suffix}"
    if kind == "awq":
        return f"awq{suffix}"
    if kind == "onnx":
        return f"onnx-{s.get('precision', 'int4')}"
    return kind  # gguf, w8a8


def _check_formats(recipe: Recipe) -> None:
    """Combinations that can never work, whatever the model (model-dependent checks are in ``plan``)."""
    from qconvert.gguf.plan import get_preset, parse_type
    from qconvert.int4.options import int4_config
    from qconvert.pipelines.int4 import int4_quantization_config

    ids: dict[str, FormatEntry] = {}
    for f in recipe.formats:
        if f.id in ids:
            raise recipe.error("formats", f.index, "id", f"format id {f.id!r} is used twice (also by [[formats]] "
                               f"number {ids[f.id].index + 1}); give each an id = \"...\"")
        ids[f.id] = f
        s = f.settings
        try:
            if f.kind == "gguf":
                if not s.get("presets"):
                    raise recipe.error("formats", f.index, "presets", "a gguf format needs presets = [\"Q4_K_M\", ...]")
                for p in s["presets"]:
                    get_preset(p)
                for key in ("output_tensor_type", "token_embedding_type"):
                    if key in s:
                        parse_type(s[key])
                if "target_bpw" in s and not 0 < s["target_bpw"] <= 32:
                    raise recipe.error("formats", f.index, "target_bpw", f"target_bpw = {s['target_bpw']} must be "
                                       "bits per weight above 0 (e.g. 4.5; each preset's figure is in the plan "
                                       "`qconvert gguf --dry-run` prints)")
            elif f.kind == "gptq":
                int4_quantization_config(int4_config("gptq", s), s.get("format"))
            elif f.kind == "awq":
                if s.get("bits", 4) != 4:
                    raise recipe.error("formats", f.index, "bits", f"AWQ {s['bits']}-bit is not a format: AWQ "
                                       "checkpoints (GEMM layout) are 4-bit only. Use kind = \"gptq\" with bits = "
                                       f"{s['bits']} for {s['bits']}-bit weights, or bits = 4")
                int4_quantization_config(int4_config("awq", s), s.get("format"))
            elif f.kind == "onnx":
                _check_onnx(recipe, f, ids)
            elif f.kind == "w8a8":
                _check_w8a8(recipe, f)
        except RecipeError:
            raise
        except QConvertError as e:
            bad_key = next((str(k) for k in ("format", "presets", "bits", "group_size", "damp", "output_tensor_type",
                                             "token_embedding_type", "weights") if k in s), None)
            raise recipe.error("formats", f.index, bad_key, str(e)) from None


def _check_w8a8(recipe: Recipe, f: FormatEntry) -> None:
    from qconvert.pipelines.int4 import W8A8_WEIGHTS, w8a8_quantization_config_for

    s = f.settings
    if s.get("weights", "rtn") not in W8A8_WEIGHTS:
        raise recipe.error("formats", f.index, "weights", f"w8a8 weights = {s['weights']!r}: use "
                           f"{' or '.join(repr(w) for w in W8A8_WEIGHTS)}")
    if "smooth" in s and not 0.0 <= s["smooth"] <= 1.0:
        raise recipe.error("formats", f.index, "smooth", f"smooth = {s['smooth']} is SmoothQuant's alpha, in [0, 1]; "
                           "0.5 is the usual value (drop the key for no smoothing)")
    if "damp" in s and not 0.0 < s["damp"] < 1.0:
        raise recipe.error("formats", f.index, "damp", f"damp = {s['damp']} must be in (0, 1); 0.01 is the usual value")
    w8a8_quantization_config_for(s.get("weights", "rtn"), s.get("smooth"), s.get("damp", 0.01))


def _check_onnx(recipe: Recipe, f: FormatEntry, ids: dict[str, FormatEntry]) -> None:
    s = f.settings
    if s.get("precision", "int4") not in ONNX_PRECISIONS:
        raise recipe.error("formats", f.index, "precision", f"onnx precision {s['precision']!r}: use "
                           f"{', '.join(ONNX_PRECISIONS)}")
    precision = s.get("precision", "int4")
    given = [k for k in ONNX_QUANTIZED_KEYS if k in s]
    if precision not in ONNX_QUANTIZED and given:
        raise recipe.error("formats", f.index, given[0], f"{given[0]} applies to onnx precision \"int4\" or \"int8\" "
                           f"only; drop it for precision {precision!r}")
    for key, allowed in (("accuracy_level", ONNX_ACCURACY_LEVELS), ("table_bits", ONNX_TABLE_BITS),
                         ("table_block_size", ONNX_TABLE_BLOCK_SIZES)):
        if key in s and s[key] not in allowed:
            raise recipe.error("formats", f.index, key, f"{key} = {s[key]}: use one of "
                               f"{', '.join(str(v) for v in allowed)}")
    if s.get("mixed_precision") and (precision != "int4" or s.get("algo", "rtn") != "rtn" or "from" in s):
        raise recipe.error("formats", f.index, "mixed_precision", "mixed_precision = true re-quantizes some linears "
                           "at 8 bits with round-to-nearest: it needs precision = \"int4\" and algo = \"rtn\" (no "
                           "from)")
    if "attention" in s and s["attention"] not in ONNX_ATTENTIONS:
        raise recipe.error("formats", f.index, "attention", f"attention = {s['attention']!r}: use one of "
                           f"{', '.join(ONNX_ATTENTIONS)} (fused GroupQueryAttention, or explicit ops)")
    if s.get("keep_embedding_float") and ("table_bits" in s or "table_block_size" in s):
        raise recipe.error("formats", f.index, "keep_embedding_float", "keep_embedding_float = true keeps the "
                           "embedding / lm_head float32; drop table_bits / table_block_size (they quantize them)")
    if precision == "int8" and s.get("algo") == "awq":
        raise recipe.error("formats", f.index, "algo", "algo = \"awq\" writes 4-bit weights only; use precision = "
                           "\"int4\" with AWQ, or algo = \"rtn\" / \"gptq\" for int8")
    src = s.get("from")
    if src is not None:
        if src not in ids or ids[src].kind != "gptq":
            raise recipe.error("formats", f.index, "from", f"from = {src!r} must name the id of a gptq format listed "
                               "before this one (the ONNX int4 model reuses its weights, no requantization)")
        if ids[src].settings.get("format") == "compressed-tensors":
            raise recipe.error("formats", f.index, "from", f"from = {src!r} names a compressed-tensors GPTQ format; "
                               "the ONNX export reuses GPTQ-layout checkpoints. Add a gptq format without format = "
                               "\"compressed-tensors\" and build from that one")
        bits = ids[src].settings.get("bits", 4)
        if precision != f"int{bits}":
            fix = f"use precision = \"int{bits}\"" if f"int{bits}" in ONNX_QUANTIZED else "MatMulNBits maps 4- or 8-bit"
            raise recipe.error("formats", f.index, "from", f"from = {src!r} is a {bits}-bit GPTQ format and precision "
                               f"{precision!r} writes {precision[3:]}-bit MatMulNBits without requantizing: {fix}")
        if ids[src].settings.get("act_order") and not ids[src].settings.get("static_groups"):
            raise recipe.error("formats", f.index, "from", f"from = {src!r} uses act_order without static_groups; "
                               "its permuted group indices cannot map to MatMulNBits blocks. Set static_groups = true "
                               "on that gptq format, or drop act_order")
        group = ids[src].settings.get("group_size", 128)
        if s.get("block_size", group) != group:
            raise recipe.error("formats", f.index, "block_size", f"block_size {s['block_size']} differs from the "
                               f"group size {group} of {src!r}; MatMulNBits reuses the GPTQ groups as blocks. Drop "
                               "block_size (it follows the GPTQ format)")
