"""Shared fixtures: tiny LLaVA checkpoints (built once per session, per spec) and their conversions.

Everything is real: checkpoints are saved by transformers-built models, conversions run our converter,
and models load in llama.cpp through our native libraries."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llava_gguf.tiny import TinySpec, make_tiny_llava

_ckpts: dict[TinySpec, Path] = {}
_converted: dict[tuple, tuple[Path, Path]] = {}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llava")


@pytest.fixture(scope="session")
def tiny(workdir):
    """tiny(**spec_fields) -> checkpoint dir, cached per spec."""

    def make(**fields) -> Path:
        spec = replace(TinySpec(), **fields)
        if spec not in _ckpts:
            name = "tiny-" + "-".join(f"{k}{v}" for k, v in sorted(fields.items())) if fields else "tiny-default"
            name = name.replace("<", "lt").replace(".", "_")
            _ckpts[spec] = make_tiny_llava(workdir / "ckpt" / name, spec)
        return _ckpts[spec]

    return make


@pytest.fixture(scope="session")
def converted(workdir):
    """converted(ckpt, outtype, mmproj_type=None) -> (llm, mmproj), cached."""
    from llava_gguf.convert import convert_checkpoint

    def conv(ckpt: Path, outtype: str = "f16", mmproj_type: str | None = None) -> tuple[Path, Path]:
        key = (ckpt, outtype, mmproj_type)
        if key not in _converted:
            out = workdir / "gguf" / f"{ckpt.name}-{outtype}-{mmproj_type}"
            r = convert_checkpoint(ckpt, out, outtype=outtype, mmproj_type=mmproj_type)
            _converted[key] = (r.llm, r.mmproj)
        return _converted[key]

    return conv


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a child process."""
    return subprocess.run([sys.executable, "-m", "llava_gguf", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_for_temporaries(proc: subprocess.Popen, outdir: Path, *, count: int = 1, min_size: int = 1,
                         timeout: float = 120) -> None:
    """Wait until `proc` (a writing command) has `count` hidden temporaries in `outdir`, one of them at least
    `min_size` bytes: the moment to kill, interrupt or race it. Fails if the run ends (or never writes) first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        temps = list(outdir.glob("*.partial")) if outdir.exists() else []
        try:
            if len(temps) >= count and any(t.stat().st_size >= min_size for t in temps):
                return
        except FileNotFoundError:  # a temporary renamed or removed meanwhile
            pass
        if proc.poll() is not None:
            pytest.fail("the run ended before its temporaries were seen: " + proc.stderr.read())
        time.sleep(0.005)
    pytest.fail("the run never started writing")
