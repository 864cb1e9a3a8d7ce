#!/usr/bin/env bash
# The wheel as a user gets it (`pip wheel .`): it holds the package and its native libraries and no test,
# benchmark or training machinery, and it installs into a fresh virtual environment where `llava-gguf
# doctor` reports our fixed libmtmd. Run by .ci/run after the suite (a second full native build does not fit
# the suite's 15 minutes). Uses the set-up's sdist cache; needs only the package registries.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/llava-gguf"
VERSION="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"$/\1/p' "$ROOT/llava_gguf/settings.py")"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llava-gguf-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
say() { printf '[wheel check] %s\n' "$*" >&2; }
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

say "building the wheel (a full native build, a few minutes)"
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
  LLAVA_GGUF_SDIST="$SDIST" "${pip[@]}" wheel "$ROOT" --no-deps -w "$WORK/dist" >&2
wheel=("$WORK"/dist/llava_gguf-*.whl)
"$VENV/bin/python" - "${wheel[0]}" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if n.split("/")[0] in ("tests", "devkit", "bench", "training", "fuzz")
       or n.endswith(("tiny.py", "conftest.py", "support.py")) or "/test_" in n]
assert not bad, f"test or benchmark machinery in the wheel: {bad[:10]}"
need = ["llava_gguf/cli/app.py", "llava_gguf/runtime/model.py", "llava_gguf/data/shapes-llava/config.json",
        "llava_gguf/data/calibration.txt", "llava_gguf/serve/app.py", "llava_gguf/serve/static/index.html"]
missing = [n for n in need if n not in names]
assert not missing, f"missing from the wheel: {missing}"
assert any(n.startswith("llava_gguf/lib/") and "mtmd" in n for n in names), "no libmtmd in the wheel"
print(f"[wheel check] {len(names)} files, no test machinery", file=sys.stderr)
PY
say "installing it into a fresh virtual environment"
"$VENV/bin/python" -m venv "$WORK/venv"
fresh=("$WORK/venv/bin/python" -m pip --disable-pip-version-check -q)
"${fresh[@]}" install "torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')" >&2
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${fresh[@]}" install "$SDIST" >&2
"${fresh[@]}" install "${wheel[0]}" >&2
cd "$WORK"  # not the source tree: the installed package must be what runs
"$WORK/venv/bin/llava-gguf" serve --help >/dev/null
"$WORK/venv/bin/python" -c "import fastapi, uvicorn"  # the server's dependencies came with the wheel
"$WORK/venv/bin/python" -c 'from importlib import resources; assert b"<input" in resources.files("llava_gguf.serve").joinpath("static/index.html").read_bytes()'
report="$("$WORK/venv/bin/llava-gguf" doctor --json)"
"$VENV/bin/python" - "$report" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("[wheel check] doctor:", json.dumps(r)[:400], file=sys.stderr)
assert r["llava_fix"] is True and r["mtmd_variant"] == "fixed", "the installed wheel's libmtmd lacks the LLaVA fix"
assert "/venv/" in r["mtmd_lib_path"], f"libmtmd was not loaded from the installed wheel: {r['mtmd_lib_path']}"
PY
say "ok"
