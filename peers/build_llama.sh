#!/usr/bin/env bash
# Build .venv-llama: llama.cpp (the sources vendored in the llama-cpp-python sdist, llama.cpp commit 0c1e570 inside
# 0.3.36) compiled ONCE as shared libraries plus its C++ `llama-server`, and llama-cpp-python[server] installed
# over those libraries (its own native build switched off with LLAMA_BUILD=OFF / LLAVA_BUILD=OFF; the libraries are
# copied into llama_cpp/lib, where it loads them from). One compile serves both:
#   .venv-llama/bin/python -m llama_cpp.server ...   the Python server of tests/test_llm_server.py
#   .venv-llama/llama.cpp/bin/llama-server ...        llama.cpp's server (continuous batching, parallel slots),
#                                                     used by benchmarks/autointerp_delphi.py
# PyPI is the only source needed. Usage: peers/build_llama.sh [python3]   (JOBS=N sets the compile jobs)
set -euo pipefail
PY=${1:-python3}
VERSION=0.3.36
VENV=.venv-llama
SRC="$VENV/src"
BUILD="$VENV/llama.cpp"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
mkdir -p "$SRC"
if [ ! -f "$SRC/llama_cpp_python-$VERSION.tar.gz" ]; then
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
fi
[ -d "$SRC/llama_cpp_python-$VERSION" ] || tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
cmake -S "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
cmake --build "$BUILD" --target llama-server llama mtmd -j"${JOBS:-2}"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VENV/bin/pip" install -q \
  "$SRC/llama_cpp_python-$VERSION.tar.gz[server]"
LIB=$("$VENV/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$LIB"
cp -P "$BUILD"/bin/*.so* "$LIB"/
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'loads', llama_cpp.llama_cpp._lib._name)"
"$BUILD/bin/llama-server" --version
