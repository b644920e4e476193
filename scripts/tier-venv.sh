#!/usr/bin/env bash
# Build (or reuse) the separate venv of a test tier whose pins cannot share the main venv.
#   scripts/tier-venv.sh VENV CONSTRAINTS IMPORTS REMOVE PACKAGE...
# VENV: directory; CONSTRAINTS: pip constraints file; IMPORTS: modules that must import afterwards ("gptqmodel");
# REMOVE: packages to uninstall after the install ("" for none); PACKAGE...: pip arguments ("-e ." for qconvert).
# torch is installed first as torch==2.13.0 (the CPU wheel on local disk). The venv is rebuilt only when
# pyproject.toml, CONSTRAINTS or these arguments change (a stamp file holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 5 ] || { echo "usage: $0 VENV CONSTRAINTS IMPORTS REMOVE PACKAGE..." >&2; exit 2; }
V="$1" C="$2" IMPORTS="$3" REMOVE="$4"
shift 4
PY="${PYTHON:-python3}"
stamp="$V/.qconvert-installed"
want="$( { cat pyproject.toml "$C" scripts/tier-venv.sh; echo "$IMPORTS|$REMOVE|$*"; } | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip=("$V/bin/python" -m pip install -q --disable-pip-version-check)
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"${pip[@]}" --upgrade pip
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -c "$C" "$@"
if [ -n "$REMOVE" ]; then
  # shellcheck disable=SC2086  # a space-separated list of package names
  "$V/bin/python" -m pip uninstall -q -y $REMOVE
fi
"$V/bin/python" -c "import torch, ${IMPORTS// /, }; assert not torch.version.cuda, 'expected the CPU torch build'"
echo "$want" > "$stamp"
