#!/usr/bin/env bash
# llama-server for the `serve` benchmark (bench/serve.py): built by our CMakeLists.txt from the llama.cpp
# our native part is built from (the pinned llama-cpp-python sdist's vendor/llama.cpp, same compiler flags),
# linked to the stock (unpatched) libmtmd, in a build directory of its own outside the repository — so
# `pip install`, the wheel and CI never build it. About 20 minutes on 2 cores the first time.
#
#   bench/build_llama_server.sh [BUILD_DIR]   (default: $LLAVA_GGUF_SERVER_BUILD or ~/.cache/llava-gguf/llama-server-build)
#
# The last line of its output is the binary's path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${1:-${LLAVA_GGUF_SERVER_BUILD:-${XDG_CACHE_HOME:-$HOME/.cache}/llava-gguf/llama-server-build}}"
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
cmake -S "$root" -B "$dir" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAVA_GGUF_SERVER=ON -DLLAVA_GGUF_TOOLS=OFF >&2
cmake --build "$dir" --target llama-server --parallel "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
bin="$dir/bin/llama-server"
if command -v ldd >/dev/null; then  # the anchor must load the stock libmtmd, not a patched one
  mtmd="$(ldd "$bin" | awk '/libmtmd/ {print $3}')"
  case "$mtmd" in
    "$dir"/bin/stock/libmtmd.*) ;;
    *) echo "llama-server loads '$mtmd', not the stock libmtmd in $dir/bin/stock" >&2; exit 1 ;;
  esac
fi
echo "$bin"
