"""qconvert's exception hierarchy.

Every error a user can cause is a ``QConvertError``; its message says what went wrong, why, and how to fix it.
The CLI prints the message (no traceback) and exits with ``exit_code``.
"""

from __future__ import annotations


class QConvertError(Exception):
    """Base class: a problem the user can fix. The message must say how."""

    exit_code = 2


class ModelNotFoundError(QConvertError):
    """A checkpoint could not be found locally, in the Hugging Face cache, or downloaded."""


class UnsupportedArchitectureError(QConvertError):
    """``config.json["architectures"]`` names no registered architecture."""


class CheckpointError(QConvertError):
    """A checkpoint file is missing, corrupt, truncated, or disagrees with its config."""


class UnmappedTensorError(CheckpointError):
    """A checkpoint tensor has no entry in the name table."""


class TokenizerError(QConvertError):
    """Tokenizer files are missing or not of the expected kind."""


class QuantTypeError(QConvertError):
    """An unknown or impossible quantization type, preset or override."""


class OutputError(QConvertError):
    """The output cannot be written (exists, not writable, disk full)."""


class RuntimeMissingError(QConvertError):
    """An optional runtime (llama.cpp binding, onnxruntime, ...) is not installed."""


class UsageError(QConvertError):
    """Command-line options that do not go together."""
