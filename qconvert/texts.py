"""The texts qconvert ships: the built-in calibration documents and the frozen held-out evaluation text.

They live in the top-level ``calib/`` directory of the source tree, which the wheel installs as the package
``qconvert.calibdata`` (a setuptools ``package-dir`` mapping), so they are read with ``importlib.resources``. A source
checkout imported without installing (``PYTHONPATH=.``) has no such package; ``calib/`` next to ``qconvert/`` is
read instead.

- ``calib/*.txt`` (``CALIBRATION_FILES``): 198 documents written for this project, each a ``### request`` line and
  its answer: English and Chinese prose, 19 other languages, code, worked math.
- ``calib/eval/qconvert-eval-v1.txt`` (``EVALUATION_FILE``): the held-out evaluation text, frozen byte for byte;
  published perplexities and cached token hashes refer to these bytes, so they are checked against
  ``EVALUATION_SHA256`` when read. A new evaluation text is a new file and a new version name, never an edit.

This module needs the standard library only: verification reads the evaluation text without torch.
"""

from __future__ import annotations

import functools
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from qconvert.errors import QConvertError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

TEXTS_PACKAGE = "qconvert.calibdata"  # calib/ of the source tree, installed under this name
CALIBRATION_VERSION = "qconvert-calib-v2"
CALIBRATION_FILES = ("en.txt", "zh.txt", "multi.txt", "code.txt", "math.txt")
EVALUATION_VERSION = "qconvert-eval-v1"
EVALUATION_FILE = ("eval", "qconvert-eval-v1.txt")
EVALUATION_SHA256 = "442d98f1be8a0e63984c39352a4fc99565c62f386727dc0266aa5c16654d8d9c"


class TextDataError(QConvertError):
    """A text that qconvert ships is missing or damaged."""


def texts_root() -> Traversable:
    """The directory of the shipped texts: the installed ``qconvert.calibdata`` or a source checkout's ``calib/``."""
    try:
        return resources.files(TEXTS_PACKAGE)
    except ModuleNotFoundError:
        pass
    checkout = Path(__file__).resolve().parent.parent / "calib"  # qconvert imported from a source checkout
    if (checkout / "__init__.py").is_file():
        return checkout
    raise TextDataError(f"this qconvert installation has neither the package {TEXTS_PACKAGE} nor a calib/ directory "
                        f"next to {Path(__file__).parent}; reinstall qconvert (pip install --force-reinstall "
                        "qconvert, or pip install -e . in a source checkout).")


def _read_bytes(*parts: str) -> bytes:
    path = texts_root().joinpath(*parts)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TextDataError(f"{'/'.join(parts)} is missing from {texts_root()}; reinstall qconvert (or restore "
                            f"calib/{'/'.join(parts)} in a source checkout: git checkout -- calib/).") from None


@functools.lru_cache(maxsize=1)
def evaluation_text() -> str:
    """The held-out evaluation text ``qconvert-eval-v1`` (~32 KB of UTF-8: English and Chinese prose, Python and
    JavaScript code, arithmetic and word problems), disjoint from the calibration documents and from the demo
    model's training text.

    Read as bytes (no newline translation) and checked against ``EVALUATION_SHA256``: a changed byte would change
    every token hash and perplexity computed from it, so a damaged file is an error, not a silent new baseline.
    """
    name = "/".join(EVALUATION_FILE)
    data = _read_bytes(*EVALUATION_FILE)
    digest = hashlib.sha256(data).hexdigest()
    if digest != EVALUATION_SHA256:
        raise TextDataError(f"the evaluation text {name} is damaged: its sha256 is {digest}, expected "
                            f"{EVALUATION_SHA256} ({EVALUATION_VERSION}); figures computed from it would not be "
                            "comparable. Reinstall qconvert, or in a source checkout restore it with "
                            f"git checkout -- calib/{name}. A new evaluation text belongs in a new versioned file.")
    return data.decode("utf-8")


def _documents(name: str) -> tuple[tuple[str, str], ...]:
    """(request, answer) pairs of one calibration file: each document opens with a ``### request`` line."""
    text = _read_bytes(name).decode("utf-8")
    docs = []
    for block in re.split(r"(?m)^### ", text)[1:]:
        request, _, body = block.partition("\n")
        docs.append((request.strip(), body.strip()))
    return tuple(docs)


@functools.lru_cache(maxsize=1)
def calibration_documents() -> tuple[tuple[str, str], ...]:
    """The built-in calibration set ``qconvert-calib-v2`` as (request, answer) pairs, in ``CALIBRATION_FILES``
    order: a user request and the document that answers it, so a chat model can see it as a conversation."""
    return tuple(doc for name in CALIBRATION_FILES for doc in _documents(name))
