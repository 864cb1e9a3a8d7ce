# Sourced by bin/llava-gguf and bin/test: make .venv hold this project, its [dev] extras and its native
# part, built once and rebuilt only when what they are built from changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"

say() { printf '[llava-gguf setup] %s\n' "$*" >&2; }

# The pinned llama-cpp-python release: its one source is its line in llava_gguf/settings.py (CMakeLists.txt
# reads it too; tests/unit/test_settings.py runs the next line and checks it against pyproject.toml's pin).
LLAMA_CPP_PYTHON_VERSION="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\([^"]*\)"$/\1/p' "$ROOT/llava_gguf/settings.py")"
if [ -z "$LLAMA_CPP_PYTHON_VERSION" ]; then
  say "llava_gguf/settings.py has no line LLAMA_CPP_PYTHON_VERSION = \"<version>\""; exit 1
fi
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llava-gguf"
SDIST="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"

pick_python() {
  for py in "${PYTHON:-}" python3.11 python3.12 python3.10 python3.13 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
      echo "$py"; return 0
    fi
  done
  say "Python >= 3.10 is required"; return 1
}

stamp_of() {
  (cd "$ROOT" && cat pyproject.toml CMakeLists.txt native/patches/*.patch bin/lib/bootstrap.sh) | sha256sum | cut -c1-16
}

# The browser the server's page is tested in: Debian's chromium (Playwright's own browser download cannot be
# reached from here). Installed when missing, as root or through sudo; LLAVA_GGUF_CHROMIUM names another binary.
chromium_setup() {
  [ -n "${LLAVA_GGUF_CHROMIUM:-}" ] && return 0
  command -v chromium >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || { say "no chromium and no apt-get: the browser test will fail (set LLAVA_GGUF_CHROMIUM)"; return 0; }
  local run=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || { say "chromium is missing and installing it needs root: apt-get install -y chromium"; return 0; }
    run=(sudo -n)
  fi
  say "installing chromium (Debian's package) for the browser test"
  DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -q chromium >/dev/null 2>&1 \
    || { DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get update -q >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -q chromium >/dev/null 2>&1; } \
    || say "could not install chromium: the browser test will fail (apt-get install -y chromium)"
}

bootstrap() {
  local want have=""
  want="$(stamp_of)"
  [ -f "$VENV/.llava-gguf-stamp" ] && have="$(cat "$VENV/.llava-gguf-stamp")"
  [ "$want" = "$have" ] && return 0
  local t0=$SECONDS py
  if [ ! -x "$VENV/bin/python" ]; then
    py="$(pick_python)"
    say "creating $VENV with $("$py" --version)"
    "$py" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade "pip>=24" >&2
  say "installing torch (CPU build)"
  "${pip[@]}" install "torch==2.13.0" >&2
  if [ ! -f "$SDIST" ]; then
    say "fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (its llama.cpp is what we build)"
    mkdir -p "$CACHE"
    "${pip[@]}" download --no-binary :all: --no-deps -d "$CACHE" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
  fi
  # llama-cpp-python without its own native build: it loads the libraries we build (one ggml per
  # process). Saves its ~5-minute compile.
  say "installing llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (Python part only)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${pip[@]}" install "$SDIST" >&2
  say "building the native part and installing llava-gguf[dev] (a few minutes the first time)"
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
  LLAVA_GGUF_SDIST="$SDIST" "${pip[@]}" install -e "$ROOT[dev]" >&2
  echo "$want" > "$VENV/.llava-gguf-stamp"
  say "ready in $((SECONDS - t0)) s"
}

bootstrap
chromium_setup
