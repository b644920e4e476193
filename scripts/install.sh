#!/usr/bin/env bash
# Install qconvert and everything its tests and demo use into ./.venv, offline-friendly and CPU-only.
# torch is pinned to 2.13.0 (on this machine kind pip takes the CPU wheel from local disk); every later install
# runs under constraints.txt so no dependency can swap torch for a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.qconvert-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
.venv/bin/python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed; expected the CPU build'" 
echo "$want" > "$stamp"
