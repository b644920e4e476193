#!/usr/bin/env bash
# The converter oracle tier: llama.cpp's own convert_hf_to_gguf.py converts the fixtures and the real 0.5B
# checkpoint, and tests/test_converter_oracle.py compares whole files with qconvert's (float exports directly,
# quantized ones after llama_model_quantize).
#
# The converter comes from the llama-cpp-python 0.3.36 sdist on PyPI (its vendored llama.cpp tree), downloaded
# once and never built: only convert_hf_to_gguf.py, conversion/ and gguf-py/ are extracted. It runs in its own
# venv (constraints-converter.txt: torch 2.13.0 CPU, transformers, sentencepiece, ...). Both live in
# $QCONVERT_ORACLE_CACHE (default ~/.cache/qconvert-oracle), so a rerun downloads and installs nothing.
# For the synthetic fixture tokenizers the converter's pre-tokenizer hash lookup (get_vocab_base_pre) is patched
# to answer "qwen2"; the real checkpoint runs through the unpatched converter.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e  # the PyPI sdist of llama-cpp-python 0.3.36
CACHE="${QCONVERT_ORACLE_CACHE:-$HOME/.cache/qconvert-oracle}"
SDIST="$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz"
TREE="$CACHE/llama-cpp-python-$VERSION/vendor/llama.cpp"
start=$SECONDS

scripts/install.sh  # the main venv: qconvert, pytest and llama.cpp's library (llama-cpp-py-sync) for the tests
mkdir -p "$CACHE/sdist"
if ! echo "$SHA256  $SDIST" | sha256sum -c --status 2>/dev/null; then
  echo "converter tier: downloading the llama-cpp-python $VERSION sdist (about 75 MB) into $CACHE/sdist"
  rm -f "$SDIST"
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$CACHE/sdist"
  echo "$SHA256  $SDIST" | sha256sum -c --quiet
fi
if [ ! -f "$TREE/.extracted" ]; then
  rm -rf "$CACHE/llama-cpp-python-$VERSION"
  mkdir -p "$CACHE/llama-cpp-python-$VERSION"
  src="llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar -xzf "$SDIST" -C "$CACHE/llama-cpp-python-$VERSION" --strip-components=1 \
    "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py"
  touch "$TREE/.extracted"
fi

scripts/tier-venv.sh "$CACHE/venv" constraints-converter.txt "transformers sentencepiece yaml" "" \
  transformers sentencepiece pyyaml tqdm requests safetensors numpy
echo "converter tier: convert_hf_to_gguf.py from llama-cpp-python $VERSION at $TREE (ready after $((SECONDS - start)) s)"
echo "converter tier: fixture conversions patch get_vocab_base_pre -> 'qwen2' (synthetic tokenizers);" \
  "the real checkpoint runs unpatched"
export QCONVERT_CONVERTER="$TREE" QCONVERT_CONVERTER_PYTHON="$CACHE/venv/bin/python"
exec .venv/bin/python -m pytest -q tests/test_converter_oracle.py "$@"
