"""Argument validators: argparse ``type=`` callables for every numeric option, and ``check_output_path``.

A bad number is refused by argparse itself (``qconvert gptq: error: argument --batch-size: must be >= 1 (got 0)``,
exit 2); an output path that cannot be written is refused by ``check_output_options`` before any model work.
Each limit says why it is there. Importing this module must stay cheap (no torch).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qconvert.errors import OutputError

SEED_MAX = 2**32 - 1  # torch, numpy and Python's random all take a 32-bit seed
MAX_CALIB_SAMPLES = 100_000  # calibration windows are held in memory at once (100k x 512 tokens ~ 0.4 GB of ids)
MAX_SEQLEN = 131_072  # Qwen2.5's longest context (with YaRN)
MAX_BATCH = 4_096  # samples per forward; more only runs out of memory
MAX_CHUNKS = 1_000_000  # verify windows; more than any text holds


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text!r})")
    return value


def int_range(low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An integer in ``low..high``; ``why`` explains the upper limit in the error message."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} (got {value})")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high} (got {value})" + (f": {why}" if why else ""))
        return value
    parse.__name__ = "integer"
    return parse


def positive_int(limit: int, why: str = "") -> Callable[[str], int]:
    """An integer in ``1..limit``."""
    return int_range(1, limit, why)


def non_negative_int(limit: int, why: str = "") -> Callable[[str], int]:
    """An integer in ``0..limit``."""
    return int_range(0, limit, why)


seed = int_range(0, SEED_MAX, "seeds are 32-bit")


def group_size(text: str) -> int:
    """``--group-size``: -1 (one group per row) or a positive number of input columns."""
    value = _int(text)
    if value == -1 or 1 <= value <= MAX_SEQLEN:
        return value
    raise argparse.ArgumentTypeError(f"must be -1 (one group per row) or between 1 and {MAX_SEQLEN} (got {value})")


def float_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                why: str = "") -> Callable[[str], float]:
    """A finite float in ``low..high`` (each end closed unless ``*_open``)."""
    def parse(text: str) -> float:
        value = _float(text)
        if value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low:g} (got {value:g})")
        if value > high or (high_open and value == high):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high:g} (got {value:g})"
                                             + (f": {why}" if why else ""))
        return value
    parse.__name__ = "number"
    return parse


non_negative_float = float_range(0.0, math.inf)


def number(text: str) -> float:
    """Any float, NaN and infinity included: for options whose range the library checks with its own message
    before any model work (``verify``'s gates: ``qconvert.verify`` refuses a NaN, negative or infinite limit)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None


def check_output_path(path: Path, *, option: str, directory: bool = False) -> None:
    """Refuse an output the run could not write, without creating anything.

    A file (``directory=False``) must not be an existing directory; a directory must not be an existing file.
    The nearest existing ancestor of what would be created must be a writable directory.
    """
    path = Path(path).expanduser()
    if path.exists():
        if directory and not path.is_dir():
            raise OutputError(f"{option} {path} is a file, not a directory; choose a directory.")
        if not directory and path.is_dir():
            raise OutputError(f"{option} {path} is a directory; give a file name.")
        target = path if directory else path.parent
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {path}: {target} is not writable; choose a writable location.")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{option} {path} cannot be created: {ancestor} is a file, not a directory.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path} cannot be created: {ancestor} is not writable; choose a writable location.")


# (attribute, option, is a directory): every output path an option names, checked before any command runs
OUTPUT_OPTIONS = (("json", "--json", False), ("report", "--report", True), ("write_baseline", "--write-baseline", False),
                  ("save_stats", "--save-stats", False), ("save_imatrix", "--save-imatrix", False),
                  ("cache_dir", "--cache-dir", True))


def check_output_options(args: argparse.Namespace) -> None:
    """``check_output_path`` for each output option given to this command."""
    for attr, option, directory in OUTPUT_OPTIONS:
        value = getattr(args, attr, None)
        if value is not None:
            check_output_path(value, option=option, directory=directory)


def output_file(output: str | None, out_dir: Path | None, default_name: str) -> Path:
    """The file a command writes, from ``--output`` and ``--out-dir``.

    ``--output`` is a path of its own (relative to the current directory, never to ``--out-dir``), so giving both
    is refused. A ``--output`` that ends with ``/`` or names an existing directory means "this directory, the
    default name".
    """
    if output is None:
        return (out_dir if out_dir is not None else Path(".")) / default_name
    if out_dir is not None:
        raise OutputError(f"--output {output} and --out-dir {out_dir} were both given; --output is a path of its own "
                          "(relative to the current directory, not to --out-dir): give one of them.")
    if not output:
        raise OutputError("--output is empty; give a file name, or a directory ending with '/'.")
    path = Path(output).expanduser()
    if output.endswith(("/", os.sep)) or path.is_dir():
        return path / default_name
    return path


def add_directory_output(group: Any, *, no_eval: bool) -> None:
    """The output options of the commands that write a checkpoint directory (gptq, awq, w8a8, onnx) on ``group``:
    --out-dir, --force, --quiet and, where a model card measures quality, --no-eval."""
    group.add_argument("--out-dir", type=Path, default=Path("."), help="parent directory of the output (default .)")
    group.add_argument("--force", action="store_true", help="replace an existing output directory")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    if no_eval:
        group.add_argument("--no-eval", action="store_true", help="skip the quality measurement for the model card "
                                                                 "(two forwards of 1,024 held-out tokens)")
