#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (continuous batching, parallel slots) from the sources vendored in the
# llama-cpp-python sdist (llama.cpp commit 0c1e570 inside 0.3.36), into benchmarks/.cache/ (git-ignored).
# PyPI is the only source needed; ~8 min on 2 quiet cores. Usage: benchmarks/build_llama_server.sh [python]
set -euo pipefail
PY=${1:-python3}
VERSION=0.3.36
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="$HERE/.cache"
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -f "dl/llama_cpp_python-$VERSION.tar.gz" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: -d dl "llama-cpp-python==$VERSION"
fi
[ -d "llama_cpp_python-$VERSION" ] || tar xzf "dl/llama_cpp_python-$VERSION.tar.gz"
cmake -S "llama_cpp_python-$VERSION/vendor/llama.cpp" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
cmake --build build --target llama-server -j"${JOBS:-2}"
cp build/bin/llama-server "$CACHE/llama-server"
echo "built $CACHE/llama-server"
