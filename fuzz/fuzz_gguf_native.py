"""Fuzz LLaVA construction on GGUF files: our reading, then llama.cpp loading the LLM and libmtmd the mmproj,
in this process — a native crash (abort, segfault) is what this target looks for, and libFuzzer writes the
input that caused it to the -artifact_prefix (bin/fuzz: out/fuzz/crashes/gguf-native/) and stops; bin/fuzz
starts it again for the rest of the time. An input that is an mmproj (it has clip.projector_type) is
paired with the real LLM of out/fuzz/base/pair, anything else with its real mmproj.

    bin/fuzz gguf-native --minutes 5          # or: .venv/bin/python -m fuzz.fuzz_gguf_native FILE (reproduce)"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import atheris

from fuzz.harness import ROOT, main, mixed_mutator, scratch_dir
from fuzz.mutate import apply, gguf_slots, random_steps

with atheris.instrument_imports(include=["llava_gguf", "gguf"]):
    import gguf  # noqa: F401
    from llava_gguf.runtime.model import LLaVA

PAIR = (Path(os.environ.get("LLAVA_GGUF_FUZZ_BASE", ROOT / "out" / "fuzz" / "base")) / "pair").resolve()
REAL_LLM = next((p for p in sorted(PAIR.glob("*.gguf")) if not p.name.startswith("mmproj-")), None)
REAL_MMPROJ = next(iter(sorted(PAIR.glob("mmproj-*.gguf"))), None)
FILE = scratch_dir() / "input.gguf"


def target(data: bytes) -> None:
    FILE.write_bytes(data)
    is_mmproj = b"clip.projector_type" in data[:65536]
    llm, mmproj = (REAL_LLM, FILE) if is_mmproj else (FILE, REAL_MMPROJ)
    LLaVA(llm, mmproj, n_ctx=256, n_threads=1).close()


def structured(data: bytes, rng: random.Random) -> bytes:
    slots, header_end = gguf_slots(data)
    return apply(data, random_steps(rng), slots, header_end)


if __name__ == "__main__":
    if REAL_LLM is None or REAL_MMPROJ is None:
        sys.exit(f"no converted pair in {PAIR}: build the seeds first (bin/fuzz does)")
    main("gguf-native", target, mixed_mutator(structured, share=0.9))
