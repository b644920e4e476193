"""Run one checkpoint in vLLM and print, as JSON, the log-probability vLLM gives each actual next token.

    python tests/vllm_logprobs.py CHECKPOINT_DIR IDS_JSON

Used by tests/test_vllm.py in its own process (vLLM keeps global engine state). vLLM runs in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor) in float16, or in the dtype given as a third argument.

vLLM's CPU build runs 4-bit GPTQ/AWQ through ``torch.ops._C.cpu_gemm_wna16``, which it compiles only into its
AVX-512 library. On a CPU without AVX-512 that op is missing, and this script substitutes ``emulated_gemm_wna16``:
a plain torch matmul over the weights *as vLLM has loaded and repacked them* (16-output blocks, 4-bit values in
vLLM's own int32 packing, uint4b8 = value - 8 without zero points, value - zero point with them). Everything else
is vLLM's: config parsing, the GPTQ/AWQ weight loaders and repacking (AWQ's interleaved order included), its
Qwen2 model, attention and sampler. The JSON says which kernel ran.

W8A8 INT8 checkpoints (compressed-tensors int-quantized) need no stand-in: vLLM's CPU int8 kernel
(``CPUInt8ScaledMMLinearKernel``) runs SGLang's AVX-512 ``int8_scaled_mm_with_quant`` where the CPU has it and oneDNN's
int8 matmul otherwise, both vLLM's own. The JSON's ``linear`` names the compressed-tensors scheme, the kernel class
and the path it chose, read from the loaded model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch


def emulated_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
    """``vllm._custom_ops.cpu_gemm_wna16`` for 4-bit weights, in torch: x @ ((q - zero) * scale) + bias."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    groups, n = scales.shape
    k = q_weight.shape[1] * pack_factor // 16
    packed = q_weight.view(n // 16, k, 16 // pack_factor).permute(1, 0, 2).reshape(k, n // pack_factor)
    q = unpack_quantized_values_into_int32(packed, scalar_types.uint4, 1).float()
    zero = (unpack_quantized_values_into_int32(zeros, scalar_types.uint4, 1).float() if zeros is not None
            else torch.full((groups, n), float(scalar_types.uint4b8.bias)))
    g = torch.arange(k) // (k // groups)
    out = input.float().reshape(-1, k) @ ((q - zero[g]) * scales.float()[g])
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*input.shape[:-1], n).to(input.dtype)


def main() -> None:
    import vllm._custom_ops as ops
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    checkpoint, ids_file = sys.argv[1], sys.argv[2]
    dtype = sys.argv[3] if len(sys.argv) > 3 else "float16"
    windows = json.loads(Path(ids_file).read_text())

    llm = LLM(model=checkpoint, dtype=dtype, max_model_len=max(map(len, windows)) + 8, enforce_eager=True,
              max_num_seqs=1, distributed_executor_backend="uni", seed=0)
    kernel = "vllm's own"
    if current_platform.is_cpu() and not hasattr(torch.ops._C, "cpu_gemm_wna16"):  # looked up at call time
        ops.cpu_gemm_wna16, kernel = emulated_gemm_wna16, "emulated: this vLLM build has no cpu_gemm_wna16 (AVX-512 only)"
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    result = []
    for window in windows:
        (out,) = llm.generate([{"prompt_token_ids": window}], params, use_tqdm=False)
        result.append([out.prompt_logprobs[i][tok].logprob for i, tok in enumerate(window) if i > 0])
    quant = llm.llm_engine.vllm_config.model_config.quantization
    (linear,) = llm.apply_model(describe_linear)
    print(json.dumps({"kernel": kernel, "quantization": quant, "linear": linear, "logprobs": result}))


def describe_linear(model: torch.nn.Module) -> dict:
    """The compressed-tensors scheme of the first quantized linear, its kernel class and the path the kernel chose
    (e.g. CompressedTensorsW8A8Int8, CPUInt8ScaledMMLinearKernel, _apply_weights_sgl); empty for other methods."""
    for module in model.modules():
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            kernel = getattr(scheme, "kernel", None)
            method = getattr(kernel, "linear_method", None)
            return {"scheme": type(scheme).__name__, "kernel": type(kernel).__name__ if kernel is not None else None,
                    "path": getattr(method, "__name__", None)}
    return {}


if __name__ == "__main__":
    main()
