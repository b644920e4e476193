#!/usr/bin/env bash
# One command: install into ./.venv, then convert the embedded demo model to GGUF Q5_K_M, load it in llama.cpp,
# generate, compare with the float reference and print a verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/qconvert demo "$@"
