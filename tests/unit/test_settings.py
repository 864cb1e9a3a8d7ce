"""The pinned llama-cpp-python version has one source, llava_gguf/settings.py: pyproject.toml's dependency
pin equals it, and CMakeLists.txt and bin/lib/bootstrap.sh read it from there (their extraction code is
run here in isolation: bootstrap's line in bash, CMake's commands in a `cmake -P` script)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from llava_gguf import settings

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_pins_the_settings_version():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1] for d in deps if re.match(r"llama-cpp-python\s*==", d)]
    assert pins == [settings.LLAMA_CPP_PYTHON_VERSION]


def test_the_settings_line_has_the_form_the_build_scripts_read():
    lines = (ROOT / "llava_gguf" / "settings.py").read_text().splitlines()
    assert f'LLAMA_CPP_PYTHON_VERSION = "{settings.LLAMA_CPP_PYTHON_VERSION}"' in lines


def test_bootstrap_reads_the_settings_version():
    text = (ROOT / "bin" / "lib" / "bootstrap.sh").read_text()
    assert not re.search(r"^LLAMA_CPP_PYTHON_VERSION=[0-9]", text, re.M)  # no copy of its own
    (line,) = [ln for ln in text.splitlines() if ln.startswith("LLAMA_CPP_PYTHON_VERSION=")]
    # only the extraction line runs: sourcing the script would set up the virtual environment
    p = subprocess.run(["bash", "-c", f'set -euo pipefail; ROOT="$1"; {line}; printf %s "$LLAMA_CPP_PYTHON_VERSION"',
                        "bash", str(ROOT)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout == settings.LLAMA_CPP_PYTHON_VERSION


def _cmake() -> str | None:
    return shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(_cmake() is None, reason="no cmake on PATH")
def test_cmake_reads_the_settings_version(tmp_path):
    text = (ROOT / "CMakeLists.txt").read_text()
    assert not re.search(r'set\(LLAVA_GGUF_LLAMA_CPP_PYTHON_VERSION\s+"[0-9]', text)  # no copy of its own
    # CMakeLists.txt's own commands, from reading settings.py to the match, run as a script
    start = text.index("file(STRINGS")
    end = text.index("\n", text.index("set(_pinned", start))
    script = tmp_path / "pin.cmake"
    script.write_text(text[start:end] + '\nmessage(STATUS "pinned=${_pinned}")\n')
    p = subprocess.run([_cmake(), "-P", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert f"pinned={settings.LLAMA_CPP_PYTHON_VERSION}\n" in p.stdout + p.stderr
    assert 'CACHE STRING' in text and '"${_pinned}"' in text  # and the cache entry takes that value
