#!/usr/bin/env bash
# One command: install into ./.venv, then run the test suite (extra pytest arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/python -m pytest -q "$@"
