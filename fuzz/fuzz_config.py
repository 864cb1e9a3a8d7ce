"""Fuzz config.json parsing: an input is the config.json of a real tiny checkpoint (its other files linked
from out/fuzz/base/checkpoint), opened as convert opens it (family, key layout, hyperparameters) and
inspected (report rendered and serialised); the parsed JSON also goes to find_family and resolve_llava.

    bin/fuzz config --minutes 5               # or: .venv/bin/python -m fuzz.fuzz_config FILE (reproduce)"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import atheris

from fuzz.harness import ROOT, main, mixed_mutator, scratch_dir
from fuzz.mutate import dumps, mutate_json

with atheris.instrument_imports(include=["llava_gguf"]):
    from llava_gguf.checks.inspect import inspect_path
    from llava_gguf.cli.render import inspect_lines as render
    from llava_gguf.convert import open_llava
    from llava_gguf.errors import LlavaGgufError
    from llava_gguf.families import find_family
    from llava_gguf.families.hparams import resolve_llava

BASE = Path(os.environ.get("LLAVA_GGUF_FUZZ_BASE", ROOT / "out" / "fuzz" / "base")) / "checkpoint"
CKPT = scratch_dir()
for f in BASE.resolve().iterdir():
    if f.name != "config.json":
        (CKPT / f.name).symlink_to(f.resolve())


def target(data: bytes) -> None:
    (CKPT / "config.json").write_bytes(data)
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        config = None
    if isinstance(config, dict):
        for fn in (find_family, resolve_llava):
            try:
                fn(config)
            except LlavaGgufError:
                pass
    try:
        open_llava(CKPT)
    except LlavaGgufError:
        pass
    report = inspect_path(CKPT)
    render(report)
    json.dumps(report)


def structured(data: bytes, rng: random.Random) -> bytes:
    doc = json.loads(data)
    for _ in range(rng.randint(1, 3)):
        doc = mutate_json(doc, rng)
    return dumps(doc)


if __name__ == "__main__":
    if not BASE.exists():
        sys.exit(f"{BASE} is missing: build the seeds first (bin/fuzz does)")
    main("config", target, mixed_mutator(structured))
