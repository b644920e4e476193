#!/usr/bin/env bash
# One command: install into ./.venv, lint with ruff, type-check qconvert/ with mypy, then run the test suite (extra
# pytest arguments pass through).
# By default the tests marked slow are left out (about 15 minutes on 2 cores); QCONVERT_TEST_MARKERS=slow runs
# only those, QCONVERT_TEST_MARKERS= (empty) runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check --quiet .  # lint first: the rules and their exceptions are in pyproject.toml [tool.ruff]
.venv/bin/mypy qconvert  # type-check the package: settings in pyproject.toml [tool.mypy], cache in .mypy_cache/
markers="${QCONVERT_TEST_MARKERS-not slow}"
if [ -n "$markers" ]; then
  exec .venv/bin/python -m pytest -q -m "$markers" "$@"
fi
exec .venv/bin/python -m pytest -q "$@"
