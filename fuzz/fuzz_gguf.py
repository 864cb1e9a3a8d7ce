"""Fuzz GGUF reading as inspect, quantize and chat do it (our gguf.cpp-style header walk): an input is a .gguf
file given to inspect_path (report rendered and serialised), quantize's classify and the runtime's
read_gguf_info. Seeds are real conversions of tiny checkpoints; mutations aim at the header's length,
count, type and offset fields. Native loading is fuzz_gguf_native.py.

    bin/fuzz gguf --minutes 5                 # or: .venv/bin/python -m fuzz.fuzz_gguf FILE (reproduce)"""
from __future__ import annotations

import json
import random

import atheris

from fuzz.harness import main, mixed_mutator, scratch_dir
from fuzz.mutate import apply, gguf_slots, random_steps

with atheris.instrument_imports(include=["llava_gguf", "gguf"]):
    import gguf  # noqa: F401  (imported lazily by llava_gguf: imported here so that it is instrumented)
    from llava_gguf.checks.inspect import inspect_path
    from llava_gguf.cli.render import inspect_lines as render
    from llava_gguf.errors import LlavaGgufError
    from llava_gguf.gguf.classify import classify
    from llava_gguf.gguf.info import read_gguf_info

FILE = scratch_dir() / "input.gguf"


def target(data: bytes) -> None:
    FILE.write_bytes(data)
    try:
        report = inspect_path(FILE)
        render(report)
        json.dumps(report)
    except LlavaGgufError:
        pass
    try:
        classify(FILE)
    except LlavaGgufError:
        pass
    read_gguf_info(FILE, "model")


def structured(data: bytes, rng: random.Random) -> bytes:
    """Header fields set to edge values, or libFuzzer's byte mutations confined to the header (a
    mutation inside tensor data changes nothing a reader looks at)."""
    slots, header_end = gguf_slots(data)
    if rng.random() < 0.6:
        return apply(data, random_steps(rng), slots, header_end)
    head = data[:header_end]
    return atheris.Mutate(head, len(head) + 64) + data[header_end:]


if __name__ == "__main__":
    # a real file this size parses in well under a second, instrumented; a short limit keeps the known
    # gguf-py hang (huge array lengths) from eating the run
    main("gguf", target, mixed_mutator(structured, share=0.9), time_limit=2.0)
