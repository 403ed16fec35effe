#!/usr/bin/env bash
# Build .venv-llama: llama.cpp (the sources vendored in the llama-cpp-python sdist, llama.cpp commit 0c1e570 inside
# 0.3.36) compiled as shared libraries plus its C++ `llama-server`, and llama-cpp-python[server] installed over those
# libraries (its own native build switched off with LLAMA_BUILD=OFF / LLAVA_BUILD=OFF; the libraries are copied into
# llama_cpp/lib, where it loads them from). One compile serves both:
#   .venv-llama/bin/python -m llama_cpp.server ...   the Python server of tests/test_llm_server.py
#   .venv-llama/llama.cpp/bin/llama-server ...        llama.cpp's server (continuous batching, parallel slots),
#                                                     used by benchmarks/autointerp_delphi.py
#
# The compile (20-40 min on 2 busy cores) happens once per machine: it goes into a cache folder outside the clone,
#   ${SAELAB_CACHE:-${XDG_CACHE_HOME:-~/.cache}/saelab}/llama.cpp/<key>/
# keyed by the llama-cpp-python version, the cmake flags, the compiler's version and the CPU's instruction-set flags
# (GGML_NATIVE=ON compiles for this CPU), as the model cache is keyed. A finished build there holds a file `.complete`;
# a fresh clone on the same machine links .venv-llama/llama.cpp to it and compiles nothing. Two builds at once are
# serialised by a lock on the key's folder.
# PyPI is the only source needed. Usage: peers/build_llama.sh [python3]   (JOBS=N sets the compile jobs)
set -euo pipefail
PY=${1:-python3}
VERSION=0.3.36
VENV=.venv-llama
CMAKE_FLAGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF)
TARGETS=(llama-server llama mtmd)

CACHE_ROOT=${SAELAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/saelab}
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
compiler=$( (c++ --version 2>/dev/null || true) | head -n1)
KEY=$(printf '%s\n' "$VERSION" "${CMAKE_FLAGS[*]}" "${TARGETS[*]}" "$compiler" "$cpu_flags" "$(uname -m)" |
  sha256sum | cut -c1-16)
CACHED="$CACHE_ROOT/llama.cpp/$VERSION-$KEY"
SRC="$CACHED/src"
BUILD="$CACHED/build"
mkdir -p "$CACHED"

(
  flock 9
  if [ -f "$CACHED/.complete" ]; then
    echo "llama.cpp $VERSION: reusing the build in $CACHED (nothing compiled)"
  else
    echo "llama.cpp $VERSION: compiling into $CACHED (once per machine)"
    mkdir -p "$SRC"
    if [ ! -f "$SRC/llama_cpp_python-$VERSION.tar.gz" ]; then
      "$PY" -m pip download -q --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
    fi
    [ -d "$SRC/llama_cpp_python-$VERSION" ] || tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
    cmake -S "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$BUILD" "${CMAKE_FLAGS[@]}"
    cmake --build "$BUILD" --target "${TARGETS[@]}" -j"${JOBS:-2}"
    "$BUILD/bin/llama-server" --version
    touch "$CACHED/.complete"
  fi
) 9>"$CACHED/.lock"

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
ln -sfn "$BUILD" "$VENV/llama.cpp"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$VENV/bin/pip" install -q \
  "$SRC/llama_cpp_python-$VERSION.tar.gz[server]"
LIB=$("$VENV/bin/python" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent / 'lib')")
mkdir -p "$LIB"
cp -P "$BUILD"/bin/*.so* "$LIB"/
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'loads', llama_cpp.llama_cpp._lib._name)"
"$VENV/llama.cpp/bin/llama-server" --version
