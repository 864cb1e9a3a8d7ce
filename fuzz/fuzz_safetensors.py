"""Fuzz the safetensors header reader: an input is a `model.safetensors` in a checkpoint directory, read by
read_checkpoint, and every small tensor it accepts is then read (an accepted header must be readable).

    bin/fuzz safetensors --minutes 5          # or: .venv/bin/python -m fuzz.fuzz_safetensors FILE (reproduce)"""
from __future__ import annotations

import json
import random

import atheris

from fuzz.harness import main, mixed_mutator, scratch_dir
from fuzz.mutate import apply, dumps, mutate_json, random_steps, safetensors_slots

with atheris.instrument_imports(include=["llava_gguf"]):
    from llava_gguf.convert.checkpoint import read_checkpoint

CKPT = scratch_dir()
(CKPT / "config.json").write_text("{}")


def target(data: bytes) -> None:
    (CKPT / "model.safetensors").write_bytes(data)
    for ref in read_checkpoint(CKPT).tensors.values():
        if ref.nbytes <= 2**20:
            ref.read()


def structured(data: bytes, rng: random.Random) -> bytes:
    """The JSON header mutated as JSON (a field odd, dropped, wrapped), or the length field and bytes."""
    n = int.from_bytes(data[:8], "little")
    if rng.random() < 0.6 and 8 + n <= len(data):
        header = mutate_json(json.loads(data[8:8 + n]), rng)
        raw = dumps(header)
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    return apply(data, random_steps(rng), *safetensors_slots(data))


if __name__ == "__main__":
    main("safetensors", target, mixed_mutator(structured))
