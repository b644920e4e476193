"""Calibration data: the built-in multilingual set, local .txt/.jsonl files, chat rendering, sampling.

Offline by default. The built-in set (``calib/`` of the source tree, read through ``qconvert.texts``: 198 documents,
420 KB, ~118k Qwen2.5 tokens) is natural text written for this project: English and Chinese prose in many registers,
19 other languages, code in a dozen languages with explanations, and worked math (English and Chinese), as
(request, answer) documents. It is distinct from the evaluation text and the fixtures' corpus and needs no download.

Chat or raw is decided by the checkpoint, not by its name: a checkpoint that ships a chat template
(``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``) is a chat model, and each document is
rendered by that template as a conversation (the request from the user, the document as the assistant's answer),
because that is the text the deployed model sees; a checkpoint without one gets raw text. ``--calib-format chat``
on a checkpoint without a template renders Qwen2.5's ChatML.

Sampling (as GPTQ's c4 loader): all documents are joined (end-of-text separated), tokenized once, and
``n_samples`` windows of ``seq_len`` tokens are drawn with a seeded generator. Same inputs + seed -> same tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from qconvert.errors import QConvertError
from qconvert.texts import calibration_documents

BUILTIN = "builtin"
SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's default
CALIB_FORMATS = ("auto", "chat", "raw")  # --calib-format; auto: chat exactly when the checkpoint has a chat template
# The special tokens a chat template may refer to by name (transformers passes the same ones).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class CalibrationDataError(QConvertError):
    """Calibration text is missing, too short, or names a source that cannot be used offline."""


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows ids int64 [n_samples, seq_len] and where they came from (for the model card)."""

    ids: torch.Tensor
    source: str
    chat: bool
    seed: int
    n_documents: int
    n_source_tokens: int
    rendering: str = "raw"  # "raw", or how chat text was rendered: "ChatML", "chat-template" (another format)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def describe(self) -> str:
        n, t = self.ids.shape
        fmt = f"{self.rendering}-rendered" if self.chat else "raw"
        return (f"{self.source} ({fmt}, {self.n_documents} documents, {self.n_source_tokens:,} tokens): "
                f"{n} samples x {t} tokens = {self.n_tokens:,} tokens, seed {self.seed}")


# -- the built-in set -----------------------------------------------------------------------------------------

def builtin_documents() -> list[tuple[str, str]]:
    """The built-in calibration set as (request, answer) pairs, in a fixed order (``qconvert.texts``)."""
    return list(calibration_documents())


# -- sources --------------------------------------------------------------------------------------------------

def _file_documents(path: Path) -> list[tuple[str | None, str]]:
    """.txt: paragraphs (blank-line separated); .jsonl: one object per line with "text" (or "messages")."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist; pass a .txt or .jsonl file, or "
                                   f"'{BUILTIN}' for the built-in set.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        if "\x00" in text:
            raise ValueError("NUL byte")
    except ValueError:  # UnicodeDecodeError too: a binary file, refused before anything is tokenized
        raise CalibrationDataError(f"calibration file {path} is not UTF-8 text (binary data or another encoding); "
                                   "pass a UTF-8 .txt or .jsonl file.") from None
    if path.suffix == ".jsonl":
        docs: list[tuple[str | None, str]] = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path}:{i} is not valid JSON ({e.msg}); each line must be an object "
                                           'like {"text": "..."}.') from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append((None, obj["text"]))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                user = " ".join(m.get("content", "") for m in obj["messages"] if m.get("role") == "user")
                reply = " ".join(m.get("content", "") for m in obj["messages"] if m.get("role") == "assistant")
                docs.append((user, reply))
            else:
                raise CalibrationDataError(f'{path}:{i} has no "text" string (or "messages" list).')
        return docs
    if path.suffix != ".txt":
        raise CalibrationDataError(f"calibration file {path} must end in .txt or .jsonl.")
    return [(None, para.strip()) for para in text.split("\n\n") if para.strip()]


def documents(source: str) -> list[tuple[str | None, str]]:
    """(request or None, text) pairs of ``source``: ``builtin``, a .txt/.jsonl path, or a hub dataset name."""
    if source == BUILTIN:
        return list(builtin_documents())
    from qconvert.hubdata import HubDataError, load_hub_texts, parse_hub_name

    try:
        if parse_hub_name(source) is not None:
            return [(None, t) for t in load_hub_texts(source)]
    except HubDataError as e:
        raise CalibrationDataError(f"{e} Calibration is offline by default: --calib {BUILTIN} is a multilingual "
                                   "set (prose, code, math).") from None
    return _file_documents(Path(source).expanduser())


# -- chat or raw: rendering ----------------------------------------------------------------------------------

def render_chatml(request: str, answer: str, system: str = SYSTEM_PROMPT) -> str:
    """A Qwen2.5 ChatML conversation: system, user request, assistant answer (``--calib-format chat`` on a
    checkpoint that ships no chat template of its own)."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{request}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n")


@dataclass(frozen=True)
class ChatTemplate:
    """A checkpoint's Jinja chat template and the special tokens it may refer to (``eos_token``, ...)."""

    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_tokens", MappingProxyType(dict(self.special_tokens)))

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """``messages`` (``{"role", "content"}`` dicts) as the checkpoint renders them: the text that
        transformers' ``apply_chat_template(messages, tokenize=False)`` gives."""
        import jinja2

        try:
            return _compiled(self.source).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise CalibrationDataError(f"the checkpoint's chat template failed on a calibration conversation ({e}); "
                                       "pass --calib-format raw to calibrate on raw text.") from None


@functools.lru_cache(maxsize=4)
def _compiled(source: str) -> Any:  # -> jinja2.Template
    """Compile a chat template in a sandbox: templates come with downloaded checkpoints and are untrusted code.

    The environment is the one chat templates are written for (transformers'): blocks trimmed, loop controls,
    ``raise_exception``, a ``tojson`` that keeps non-ASCII text, ``strftime_now``, and ``{% generation %}``
    blocks rendered as their content.
    """
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationBlock(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja2 declares a set) marks assistant text; here just its body

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals |= {"raise_exception": raise_exception, "strftime_now": strftime_now}
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CalibrationDataError(f"the checkpoint's chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                                   "pass --calib-format raw to calibrate on raw text.") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CalibrationDataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); restore the file from "
                                   "the checkpoint's source.") from None
    return data if isinstance(data, dict) else {}


def _default_template(value: Any, path: Path) -> str | None:
    """``chat_template`` of tokenizer_config.json: a string, or a list of named templates (the ``default`` one)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise CalibrationDataError(f"{path} has named chat templates {sorted(map(str, named))} but no 'default' "
                                       "one; pass --calib-format raw, or --calib-format chat for Qwen2.5's ChatML.")
        value = named["default"]
    return value if isinstance(value, str) and value.strip() else None


def chat_template(model_dir: Path) -> ChatTemplate | None:
    """The chat template ``model_dir`` ships, or None: ``chat_template.jinja`` if present (it takes precedence, as
    in transformers), else ``chat_template`` of ``tokenizer_config.json``; with the named special tokens of
    ``tokenizer_config.json`` (``special_tokens_map.json`` fills the ones it lacks)."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "tokenizer_config.json")
    jinja_file = model_dir / "chat_template.jinja"
    source: str | None
    if jinja_file.is_file():
        source = jinja_file.read_text(encoding="utf-8")
    else:
        source = _default_template(config.get("chat_template"), model_dir / "tokenizer_config.json")
    if source is None:
        return None
    legacy = _read_json(model_dir / "special_tokens_map.json")
    tokens = {}
    for name in TEMPLATE_TOKENS:
        value = config.get(name) if config.get(name) is not None else legacy.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[name] = value
    return ChatTemplate(source, tokens)


def uses_chat(model_dir: Path, calib_format: str = "auto") -> bool:
    """Whether calibration text for ``model_dir`` is rendered as chat: ``--calib-format`` chat or raw as given;
    auto (the default) -> chat exactly when the checkpoint ships a chat template. Its name plays no part: a
    "base" checkpoint with a template is chat, an "instruct" one without is raw."""
    if calib_format not in CALIB_FORMATS:
        raise CalibrationDataError(f"calibration format {calib_format!r} is not one of {', '.join(CALIB_FORMATS)}.")
    if calib_format != "auto":
        return calib_format == "chat"
    return chat_template(model_dir) is not None


def render(docs: Sequence[tuple[str | None, str]], chat: bool, eos: str, template: ChatTemplate | None = None) -> str:
    """One text: raw documents each followed by ``eos``, or (chat) each document as a conversation, a user request
    and the document as the assistant's answer, rendered by ``template`` (Qwen2.5 ChatML when None)."""
    parts = []
    for request, text in docs:
        if not chat:
            parts.append(text + eos)
        elif template is None:
            parts.append(render_chatml(request or "Continue the text.", text))
        else:
            parts.append(template.render([{"role": "user", "content": request or "Continue the text."},
                                          {"role": "assistant", "content": text}]))
    return "".join(parts)


def load_calibration(source: str, model_dir: Path, *, chat: bool, n_samples: int = 128, seq_len: int = 512,
                     seed: int = 0) -> CalibrationSet:
    """Tokenize ``source`` with the model's tokenizer.json and draw ``n_samples`` windows of ``seq_len`` tokens.

    ``chat``: render documents as conversations with the checkpoint's chat template (``uses_chat`` decides it from
    ``model_dir`` and ``--calib-format``); ids int64 [n_samples, seq_len].
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"--calib-samples ({n_samples}) must be >= 1 and --calib-seqlen ({seq_len}) >= 2.")
    from tokenizers import Tokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise CalibrationDataError(f"{model_dir} has no tokenizer.json; calibration needs the model's tokenizer.")
    docs = documents(source)
    template = chat_template(model_dir) if chat else None
    text = render(docs, chat, "<|endoftext|>", template)
    ids = torch.tensor(Tokenizer.from_file(str(tok_file)).encode(text).ids, dtype=torch.long)
    if len(ids) < seq_len:
        raise CalibrationDataError(f"calibration text {source!r} has {len(ids)} tokens, fewer than one sample of "
                                   f"--calib-seqlen {seq_len}. Give more text or a smaller --calib-seqlen.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    style = ("ChatML" if "<|im_start|>" in text else "chat-template") if chat else "raw"
    return CalibrationSet(windows, source, chat, seed, len(docs), len(ids), style)
