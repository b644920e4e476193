"""ONNX export of Qwen2 checkpoints: fp32 / fp16 with a KV cache, and INT4 / INT8 as ``com.microsoft.MatMulNBits``.

    graph.py        the decoder graph, built with ``onnx.helper`` block by block (no tracing)
    matmulnbits.py  GPTQ / AWQ / RTN grids -> MatMulNBits / GatherBlockQuantized initializers, bit-exact; --from checks
    writer.py       streaming initializer store (inline, or ``model.onnx.data`` for large models)
    export.py       ``export_onnx``: plan, quantize or read, build, genai_config.json, model card, atomic rename

Facts and sources: ``reference/gptq-awq-onnx-anchor.md`` §6. The runtime side is ``qconvert.runtimes.onnxrt``.
"""

from qconvert.onnx_export.export import (
    ALGOS,
    PRECISIONS,
    export_onnx,
    genai_config,
    output_dir_name,
)

__all__ = ["ALGOS", "PRECISIONS", "export_onnx", "genai_config", "output_dir_name"]
