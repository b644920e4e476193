"""INT4/INT8 weight quantization for GPTQ and AWQ checkpoints: pure algorithms, packing, the checkpoint writer.

Data flows one way (a calibration driver glues the stages; none of these modules walks a model or reads files,
except the writer):

    rtn.py      the shared group-wise grid and ``QuantizedLinear`` (codes, fp16-exact scales, zeros, g_idx);
                ``rtn(W, bits, group_size, sym)`` is the baseline
    gptq.py     ``add_to_hessian(H, n, x)`` while calibrating, then ``gptq(W, H, GPTQConfig) -> QuantizedLinear``
    awq.py      ``search_scales`` / ``apply_scales`` / ``search_clip`` / ``apply_clip`` / ``quantize_awq`` and the
                Qwen2 scaling map ``QWEN2_SCALE_MAPPINGS``
    guard.py    the held-out guard: a result is kept only where it beats round-to-nearest on held-out windows
    smoothquant.py  W8A8: per-token dynamic int8 activations (``fake_quantize_tokens``) and SmoothQuant's scale
                migration (``smooth_scales``, the Qwen2 sites ``SMOOTH_TABLES``; folded with ``apply_scales``)
    formats.py  ``pack_gptq`` / ``pack_awq`` / ``pack_compressed`` / ``pack_int8`` (and unpack / dequantize) into
                the GPTQ v1, AWQ GEMM, compressed-tensors pack-quantized and int-quantized (W8A8) layouts; the ``quantization_config`` dicts; ``LAYOUTS``
                and ``layout_scheme`` (which layout and scheme a checkpoint's config declares)
    writer.py   ``QuantizedCheckpointWriter`` (streaming, atomic, sharded), ``pad_intermediate`` and vLLM
                tensor-parallel shape checks

Facts and sources: ``reference/gptq-awq-onnx-anchor.md`` §1–§4.
"""

from qconvert.int4.awq import (
    QWEN2_NO_CLIP,
    QWEN2_SCALE_MAPPINGS,
    AWQConfig,
    ScaleMapping,
    active_mappings,
    apply_clip,
    apply_scales,
    quantize_awq,
    search_clip,
    search_scales,
)
from qconvert.int4.formats import (
    LAYOUTS,
    awq_quantization_config,
    compressed_quantization_config,
    dequantize_awq,
    dequantize_compressed,
    dequantize_gptq,
    dequantized_tensors,
    gptq_quantization_config,
    layout_scheme,
    pack_awq,
    pack_compressed,
    pack_gptq,
    pack_int8,
    unpack_awq,
    unpack_compressed,
    unpack_gptq,
    unpack_int8,
    w8a8_quantization_config,
)
from qconvert.int4.gptq import GPTQConfig, HessianError, add_to_hessian, gptq
from qconvert.int4.rtn import QuantizedLinear, rtn
from qconvert.int4.writer import (
    QuantizedCheckpointWriter,
    TensorParallelWarning,
    pad_intermediate,
    padded_intermediate_size,
    tensor_parallel_problems,
    write_quantized_checkpoint,
)

__all__ = [
    "LAYOUTS",
    "QWEN2_NO_CLIP",
    "QWEN2_SCALE_MAPPINGS",
    "AWQConfig",
    "GPTQConfig",
    "HessianError",
    "QuantizedCheckpointWriter",
    "QuantizedLinear",
    "ScaleMapping",
    "TensorParallelWarning",
    "active_mappings",
    "add_to_hessian",
    "apply_clip",
    "apply_scales",
    "awq_quantization_config",
    "compressed_quantization_config",
    "dequantize_awq",
    "dequantize_compressed",
    "dequantize_gptq",
    "dequantized_tensors",
    "gptq",
    "gptq_quantization_config",
    "layout_scheme",
    "pack_awq",
    "pack_compressed",
    "pack_gptq",
    "pack_int8",
    "pad_intermediate",
    "padded_intermediate_size",
    "quantize_awq",
    "rtn",
    "search_clip",
    "search_scales",
    "tensor_parallel_problems",
    "unpack_awq",
    "unpack_compressed",
    "unpack_gptq",
    "unpack_int8",
    "w8a8_quantization_config",
    "write_quantized_checkpoint",
]
