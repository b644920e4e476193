#!/usr/bin/env bash
# The GPTQ/AWQ oracle tier: a second venv (.venv-oracle) with GPTQModel 7.6.0 + optimum, whose numpy pin (2.2.6)
# cannot share the main venv, then the int4, calibration and verify-through-GPTQModel tests, whose GPTQModel tests
# skip in the main run. Installing takes about 4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/tier-venv.sh .venv-oracle constraints-oracle.txt gptqmodel "" -e . gptqmodel optimum transformers pytest
exec .venv-oracle/bin/python -m pytest -q tests/test_int4.py tests/test_calibrate.py \
  tests/test_verify.py::test_gptqmodel_path_is_skipped_or_agrees "$@"
