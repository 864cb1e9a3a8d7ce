"""Train the small LLaVA that llava-gguf ships, the way the LLaVA paper trains the real one, on the
synthetic shapes task (`llava_gguf.demo.shapes`):

  a. a CLIP-style vision tower (transformers' CLIPVisionModel), pretrained contrastively against a small
     text encoder on image/caption pairs;
  b. a LLaMA language model (LlamaForCausalLM) pretrained on the task's text;
  c. LLaVA stage 1: only the 2-layer GELU projector trained, on captioning (vision tower and LLM frozen);
  d. LLaVA stage 2: projector and LLM trained on question answering (vision tower frozen).

    python -m training --out runs/shapes [--seed 0] [--steps-scale 1.0] [--export DIR]

(`python -m training.train ...`, the name README.md and the shipped model card give, is the same command.)

Each stage writes its weights to OUT/<stage>/ when it ends and a resumable state every few hundred
steps; running the command again continues where it stopped. Everything is a function of the seed (data
order included), with a fixed thread count. The result is saved by `save_pretrained` (float16) with the
tokenizer and processor files of a hub LLaVA-1.5 checkpoint, and a model card.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from devkit.tokenizer_files import write_tokenizer
from llava_gguf.demo import shapes
from training.config import Config, same_run, with_fields
from training.data import Data
from training.export import export
from training.report import log
from training.stages import assemble, stage_clip, stage_llava, stage_lm


def main(argv: list[str] | None = None) -> None:
    # `python -m training` would show argparse's default program name, __main__.py
    prog = "python -m training" if Path(sys.argv[0]).name == "__main__.py" else None
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="run directory (stage checkpoints; resumable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (quick trials)")
    ap.add_argument("--export", type=Path, help="where to save the final checkpoint (default OUT/shapes-llava)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a Config field for a trial, e.g. --set text_heads=8 (repeatable)")
    args = ap.parse_args(argv)
    cfg = Config(seed=args.seed).scaled(args.steps_scale)
    try:
        cfg = with_fields(cfg, args.set)
    except ValueError as e:
        sys.exit(f"--set: {e}")
    if cfg.clip_place_weight and not cfg.clip_patch_weight:
        sys.exit("--set: clip_place_weight contrasts the patches clip_patch_weight labels: it needs clip_patch_weight > 0")
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not same_run(args.out / "config.json", cfg):
        hint = ("; it is this run without the polish phase: go on with --set qa_polish_steps=0"
                if cfg.qa_polish_steps and same_run(args.out / "config.json", replace(cfg, qa_polish_steps=0)) else "")
        sys.exit(f"{args.out} holds a run with another configuration (seed, --steps-scale or --set): use a new --out{hint}")
    (args.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.perf_counter()
    tok_dir = args.out / "tokenizer"
    if not tok_dir.is_dir():
        tmp = args.out / "tokenizer.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write_tokenizer(tmp, shapes.corpus(), sp_vocab=cfg.sp_vocab, image_size=shapes.IMAGE_SIZE)
        tmp.replace(tok_dir)
    data = Data(cfg, tok_dir)
    vision = stage_clip(cfg, args.out, data)
    lm = stage_lm(cfg, args.out, data)
    model = None
    if not (args.out / "projector" / "model").is_dir():
        model = assemble(cfg, data, vision, lm)
    model = stage_llava(cfg, args.out, data, model, "projector")
    model = stage_llava(cfg, args.out, data, model, "qa")
    metrics = json.loads((args.out / "metrics.json").read_text())
    minutes = sum(m.get("minutes", 0.0) for m in metrics.values())  # training time over all invocations
    export(cfg, model, data, args.export or args.out / "shapes-llava", metrics, minutes)
    log(f"done: {minutes:.1f} min of training in all, {(time.perf_counter() - t0) / 60:.1f} min this invocation")
