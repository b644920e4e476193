"""Calibration data: the built-in multilingual set, local .txt/.jsonl files, ChatML rendering, sampling.

Offline by default. The built-in set is generated here, deterministically, from small templates — English and
Chinese prose, Python code, arithmetic and word problems — so it is distinct from the fixtures' corpus and needs
no download. For Instruct models each document is rendered as a ChatML conversation (a user request, the
document as the assistant's answer), because that is the text the deployed model sees; base models get raw text.

Sampling (as GPTQ's c4 loader): all documents are joined (end-of-text separated), tokenized once, and
``n_samples`` windows of ``seq_len`` tokens are drawn with a seeded generator. Same inputs + seed -> same tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qconvert.errors import QConvertError

BUILTIN = "builtin"
SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's default
BUILTIN_SEED = "qconvert-calibset-v1"
BUILTIN_DOCS_PER_KIND = 60


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

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def describe(self) -> str:
        n, t = self.ids.shape
        fmt = "ChatML-rendered" if self.chat else "raw"
        return (f"{self.source} ({fmt}, {self.n_documents} documents, {self.n_source_tokens:,} tokens): "
                f"{n} samples x {t} tokens = {self.n_tokens:,} tokens, seed {self.seed}")


# -- the built-in set -----------------------------------------------------------------------------------------

_EN_WHO = ("The engineer", "A young teacher", "My grandmother", "The committee", "A curious student", "The pilot",
           "Our neighbour", "The old fisherman", "A travelling musician", "The doctor on duty")
_EN_DID = ("repaired the bridge", "wrote a long letter", "planted apple trees", "measured the river",
           "explained the plan", "painted the station", "counted the votes", "cooked dinner for everyone",
           "read the report twice", "crossed the mountains")
_EN_WHEN = ("before sunrise", "after the storm", "in early spring", "during the long winter", "last Tuesday",
            "at the end of the war", "every evening", "while the town slept")
_EN_WHY = ("because nobody else would", "so that the children could learn", "to keep a promise",
           "since the rain had finally stopped", "although it was difficult", "for reasons no one understood")
_ZH_WHO = ("工程师", "年轻的老师", "我的奶奶", "委员会", "一个好奇的学生", "飞行员", "邻居", "老渔夫", "医生")
_ZH_DID = ("修好了那座桥", "写了一封长信", "种下了苹果树", "测量了河水的深度", "解释了新的计划", "粉刷了车站",
           "为大家做了晚饭", "把报告读了两遍", "翻过了大山")
_ZH_WHEN = ("天还没亮的时候", "暴风雨过后", "早春时节", "漫长的冬天里", "上周二", "每天晚上", "在小镇沉睡时")
_ZH_WHY = ("因为没有别人愿意做", "为了让孩子们能够学习", "为了信守诺言", "虽然这件事很难", "没有人知道原因")
_CODE_NAMES = ("values", "items", "scores", "prices", "lengths", "weights", "counts")
_CODE_FUNCS = ("clip", "normalize", "moving_average", "count_above", "running_max", "dedupe")


def _en(rng: random.Random) -> tuple[str, str]:
    sents = [f"{rng.choice(_EN_WHO)} {rng.choice(_EN_DID)} {rng.choice(_EN_WHEN)}, {rng.choice(_EN_WHY)}."
             for _ in range(rng.randint(3, 6))]
    return "Write a short paragraph about what happened.", " ".join(sents)


def _zh(rng: random.Random) -> tuple[str, str]:
    sents = [f"{rng.choice(_ZH_WHEN)}，{rng.choice(_ZH_WHO)}{rng.choice(_ZH_DID)}，{rng.choice(_ZH_WHY)}。"
             for _ in range(rng.randint(3, 6))]
    return "请写一段短文，讲述发生了什么。", "".join(sents)


def _code(rng: random.Random) -> tuple[str, str]:
    name, func, k = rng.choice(_CODE_NAMES), rng.choice(_CODE_FUNCS), rng.randint(2, 9)
    data = [rng.randint(-20, 99) for _ in range(rng.randint(4, 8))]
    body = {
        "clip": f"    return [min(max(x, 0), {k * 10}) for x in {name}]",
        "normalize": f"    total = sum({name}) or 1\n    return [x / total for x in {name}]",
        "moving_average": f"    w = {k}\n    return [sum({name}[i:i + w]) / w for i in range(len({name}) - w + 1)]",
        "count_above": f"    return sum(1 for x in {name} if x > {k})",
        "running_max": f"    out, best = [], float('-inf')\n    for x in {name}:\n        best = max(best, x)\n"
                       f"        out.append(best)\n    return out",
        "dedupe": f"    seen = set()\n    return [x for x in {name} if not (x in seen or seen.add(x))]",
    }[func]
    code = (f"```python\ndef {func}({name}: list[int]) -> list:\n    \"\"\"{func.replace('_', ' ')} of {name}.\"\"\"\n"
            f"{body}\n\n\nprint({func}({data}))\n```")
    return f"Write a Python function `{func}` and show how to call it.", code


def _math(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    if rng.random() < 0.5:
        q = f"Compute ({a} + {b}) × {c}."
        ans = f"First add: {a} + {b} = {a + b}. Then multiply: {a + b} × {c} = {(a + b) * c}. The answer is {(a + b) * c}."
    else:
        q = f"小明有{a}个苹果，又买了{b}个，平均分给{c}个朋友，每人分到几个，还剩几个？"
        ans = f"一共有 {a} + {b} = {a + b} 个苹果。{a + b} ÷ {c} = {(a + b) // c} 余 {(a + b) % c}。" \
              f"每人分到 {(a + b) // c} 个，还剩 {(a + b) % c} 个。"
    return q, ans


def builtin_documents() -> list[tuple[str, str]]:
    """The built-in calibration set as (request, answer) pairs: prose (en, zh), code, math; deterministic."""
    rng = random.Random(BUILTIN_SEED)
    return [make(rng) for _ in range(BUILTIN_DOCS_PER_KIND) for make in (_en, _zh, _code, _math)]


# -- sources --------------------------------------------------------------------------------------------------

def render_chatml(request: str, answer: str, system: str = SYSTEM_PROMPT) -> str:
    """A Qwen2.5 ChatML conversation: system, user request, assistant answer."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{request}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def _file_documents(path: Path) -> list[tuple[str | None, str]]:
    """.txt: paragraphs (blank-line separated); .jsonl: one object per line with "text" (or "messages")."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist; pass a .txt or .jsonl file, or "
                                   f"'{BUILTIN}' for the built-in set.")
    text = path.read_text(encoding="utf-8")
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


def render(docs: Sequence[tuple[str | None, str]], chat: bool, eos: str) -> str:
    """One text: ChatML conversations (chat) or raw documents, each followed by ``eos``."""
    parts = []
    for request, text in docs:
        if chat:
            parts.append(render_chatml(request or "Continue the text.", text))
        else:
            parts.append(text + eos)
    return "".join(parts)


def load_calibration(source: str, model_dir: Path, *, chat: bool, n_samples: int = 128, seq_len: int = 512,
                     seed: int = 0) -> CalibrationSet:
    """Tokenize ``source`` with the model's tokenizer.json and draw ``n_samples`` windows of ``seq_len`` tokens."""
    if n_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"--calib-samples ({n_samples}) must be >= 1 and --calib-seqlen ({seq_len}) >= 2.")
    from tokenizers import Tokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise CalibrationDataError(f"{model_dir} has no tokenizer.json; calibration needs the model's tokenizer.")
    docs = documents(source)
    text = render(docs, chat, "<|endoftext|>")
    ids = torch.tensor(Tokenizer.from_file(str(tok_file)).encode(text).ids, dtype=torch.long)
    if len(ids) < seq_len:
        raise CalibrationDataError(f"calibration text {source!r} has {len(ids)} tokens, fewer than one sample of "
                                   f"--calib-seqlen {seq_len}. Give more text or a smaller --calib-seqlen.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return CalibrationSet(windows, source, chat, seed, len(docs), len(ids))
