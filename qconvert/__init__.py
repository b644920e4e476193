"""qconvert: turn Qwen2.5 Hugging Face checkpoints into verified deployable artifacts.

The pipelines are plain functions; the ``qconvert`` command line only parses options, calls them and prints::

    from qconvert import export_gguf, write_int4, export_onnx, verify_artifacts, run_release

Importing ``qconvert`` is cheap: each name below is imported on first use (torch only with the pipelines that
need it).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    # GGUF: plan + stream-write (llama.cpp mixtures), and the importance matrix for the K-quants
    "export_gguf": "qconvert.gguf.export",
    "PlanOptions": "qconvert.gguf.export",
    "importance_matrix": "qconvert.pipelines.gguf",
    "output_name": "qconvert.pipelines.gguf",
    # GPTQ / AWQ checkpoints
    "write_int4": "qconvert.pipelines.int4",
    "output_dir_name": "qconvert.pipelines.int4",
    "convert_format": "qconvert.pipelines.int4",
    # W8A8 INT8 (compressed-tensors int-quantized): int8 weights, per-token int8 activations, optional SmoothQuant
    "write_w8a8": "qconvert.pipelines.int4",
    "GPTQConfig": "qconvert.int4",
    "AWQConfig": "qconvert.int4",
    "CalibrationSettings": "qconvert.calibration.quantize",
    "load_calibration": "qconvert.calibset",
    # ONNX
    "export_onnx": "qconvert.onnx_export.export",
    # verification and releases
    "verify_artifacts": "qconvert.pipelines.verify",
    "run_release": "qconvert.release.runner",
    "load_recipe": "qconvert.release.recipe",
    # model references: a directory, a hub repo id
    "resolve_model": "qconvert.resolve",
}

__all__ = [  # the names of _API, spelled out for linters and `from qconvert import *`
    "AWQConfig", "CalibrationSettings", "GPTQConfig", "PlanOptions", "__version__", "convert_format", "export_gguf",
    "export_onnx",
    "importance_matrix", "load_calibration", "load_recipe", "output_dir_name", "output_name", "resolve_model",
    "run_release", "verify_artifacts", "write_int4", "write_w8a8",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'qconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
