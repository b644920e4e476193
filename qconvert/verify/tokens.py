"""The evaluation text, tokenized once with the reference's tokenizer; every runtime is fed these ids.

Offline default: the project's held-out evaluation text (``qconvert.texts.evaluation_text``, the frozen file
``calib/eval/qconvert-eval-v1.txt``: English and Chinese prose, Python/JavaScript code, arithmetic and word
problems), written by qconvert itself and disjoint
from both the calibration set (``qconvert.calibset``) and the demo model's training text. A local file or a
Hugging Face dataset (wikitext-2-raw test, when ``datasets`` and the network are available) can replace it.
The sha256 of the token ids goes into every result, so numbers are only compared on equal tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qconvert.errors import QConvertError, TokenizerError
from qconvert.tokenhash import tokens_sha256  # re-exported: the one token hash

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DEFAULT_SOURCE = "qconvert-eval-v1"
# --dataset NAME -> the hubdata name of its *test* split (verification never scores a training split)
DATASETS = {"wikitext2": "wikitext2-test", "wikitext2-test": "wikitext2-test"}


class EvalTextError(QConvertError):
    """The evaluation text is missing, empty, or too short for one window."""


@dataclass(frozen=True)
class EvalTokens:
    """Token ids int32 [n_tokens] of the evaluation text, their sha256, and where the text came from."""

    ids: np.ndarray
    sha256: str
    source: str

    @property
    def n_tokens(self) -> int:
        return int(self.ids.size)


def default_text() -> str:
    """The frozen held-out evaluation text ``qconvert-eval-v1`` that qconvert ships (sha256-checked)."""
    from qconvert.texts import evaluation_text

    return evaluation_text()


def dataset_text(name: str) -> str:
    """The rows of a hub dataset's test split joined as they come (``wikitext2`` -> wikitext-2-raw-v1 test)."""
    from qconvert.hubdata import HubDataError, load_hub_texts

    try:
        rows = load_hub_texts(DATASETS.get(name, name), what="evaluation")
    except HubDataError as e:
        raise EvalTextError(f"{e} Without it, qconvert verify scores its own held-out text (the default) or a local "
                            "file given with --text FILE.") from None
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


def load_tokenizer(reference_dir: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    path = Path(reference_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{reference_dir} has no tokenizer.json; verification tokenizes the text once with the "
                             "reference's tokenizer. Point --reference at the float checkpoint the artifacts came from.")
    return Tokenizer.from_file(str(path))


def eval_tokens(reference_dir: Path, text: str | None = None, text_file: Path | None = None) -> EvalTokens:
    """Tokenize ``text``, or the contents of ``text_file``, or the default held-out text, with the reference's tokenizer.

    No BOS/EOS is added (Qwen2 adds none; llama-perplexity adds BOS only where the model asks for it).
    """
    if text is not None and text_file is not None:
        raise EvalTextError("give either a text or a text file, not both.")
    if text_file is not None:
        path = Path(text_file).expanduser()
        if not path.is_file():
            raise EvalTextError(f"evaluation text file {path} does not exist; pass a UTF-8 text file.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EvalTextError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8.") from None
        source = f"file:{path.name}"
    elif text is not None:
        source = "text"
    else:
        text, source = default_text(), DEFAULT_SOURCE
    if not text.strip():
        raise EvalTextError(f"the evaluation text ({source}) is empty.")
    ids = np.asarray(load_tokenizer(reference_dir).encode(text, add_special_tokens=False).ids, dtype=np.int32)
    return EvalTokens(ids, tokens_sha256(ids), source)
