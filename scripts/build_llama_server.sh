#!/usr/bin/env bash
# Builds llama.cpp's llama-server from the llama.cpp source that the llama-cpp-python sdist on PyPI
# vendors (PyPI is the only source registry this project may use), and caches the result.
# Prints the path of the built binary on its last line. About 6 minutes on 2 cores the first time.
set -euo pipefail
CACHE_DIR="${CI_MAGIC_LLAMA_CACHE:-$HOME/.cache/ci-magic/llama.cpp}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE_DIR"
SERVER_BIN="$CACHE_DIR/build/bin/llama-server"
if [[ -x "$SERVER_BIN" ]]; then
  echo "$SERVER_BIN"
  exit 0
fi
if [[ ! -d "$CACHE_DIR/src" ]]; then
  echo "downloading the llama-cpp-python sdist into $CACHE_DIR" >&2
  "$PYTHON" -m pip download -q --no-binary llama-cpp-python --no-deps -d "$CACHE_DIR/sdist" llama-cpp-python >&2
  tarball="$(ls "$CACHE_DIR"/sdist/llama_cpp_python-*.tar.gz | head -1)"
  rm -rf "$CACHE_DIR/unpacked" && mkdir -p "$CACHE_DIR/unpacked"
  tar -xzf "$tarball" -C "$CACHE_DIR/unpacked"
  mv "$CACHE_DIR"/unpacked/*/vendor/llama.cpp "$CACHE_DIR/src"
  rm -rf "$CACHE_DIR/unpacked"
fi
echo "building llama-server in $CACHE_DIR/build (several minutes)" >&2
cmake -S "$CACHE_DIR/src" -B "$CACHE_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$CACHE_DIR/build" --target llama-server -j "$(nproc)" >&2
echo "$SERVER_BIN"
