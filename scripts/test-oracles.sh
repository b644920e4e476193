#!/usr/bin/env bash
# The GPTQ/AWQ oracle tier: a second venv (.venv-oracle) with GPTQModel 7.6.0 + optimum, whose numpy pin (2.2.6)
# cannot share the main venv, then the int4, calibration and verify-through-GPTQModel tests, whose GPTQModel tests
# skip in the main run. Installing takes about 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
V=.venv-oracle
stamp="$V/.qconvert-installed"
want="$(cat pyproject.toml constraints-oracle.txt | sha256sum | cut -c1-16)"
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
  [ -x "$V/bin/python" ] || "$PY" -m venv "$V"
  "$V/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$V/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  "$V/bin/python" -m pip install -q --disable-pip-version-check -c constraints-oracle.txt \
    -e . gptqmodel optimum transformers pytest
  "$V/bin/python" -c "import torch, gptqmodel; assert not torch.version.cuda, 'expected the CPU torch build'"
  echo "$want" > "$stamp"
fi
exec "$V/bin/python" -m pytest -q tests/test_int4.py tests/test_calibrate.py \
  tests/test_verify.py::test_gptqmodel_path_is_skipped_or_agrees "$@"
