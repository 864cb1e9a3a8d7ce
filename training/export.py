"""The run's result as the shipped model directory: float16 weights, the tokenizer, training.json and the
model card, measured on the test split, written beside the destination and renamed into place."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from llava_gguf.demo import shapes
from training.card import model_card
from training.config import Config
from training.data import Data
from training.report import kinds_text, log


def export(cfg: Config, model, data: Data, dest: Path, metrics: dict, minutes: float,
           test_scenes: int = shapes.TEST_SCENES) -> None:
    """Save the model (float16) and the tokenizer to `dest`, with training.json and a model card, and
    measure it on the whole test split (transformers, fp32 from the saved weights: what bench/accuracy.py
    measures first): its figures go into both."""
    if dest.exists() and not (dest / "training.json").is_file():
        sys.exit(f"--export {dest} exists and is not a model this command wrote: not replacing it")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.to(torch.float16).save_pretrained(tmp)
    model.to(torch.float32)
    from transformers import LlavaForConditionalGeneration  # heavy: seconds to import

    saved = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32)  # as bench/accuracy.py loads it
    pairs = shapes.test_split(test_scenes)
    answers = shapes.hf_answers(saved, data.tok, pairs)
    del saved
    metrics = {**metrics, "test": {"accuracy": shapes.accuracy(answers, pairs), "n": len(pairs), "scenes": test_scenes,
                                   "by_kind": shapes.accuracy_by_kind(answers, pairs)}}
    log(f"test split: answers {metrics['test']['accuracy']:.1%} of {len(pairs)}; by kind: "
        + kinds_text(metrics["test"]["by_kind"]))
    for f in data.tok_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    cfgj = json.loads((tmp / "config.json").read_text())
    for sub in ("text_config", "vision_config"):  # a stage reloaded from disk says float32 there: the weights are float16
        cfgj.get(sub, {}).pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfgj, indent=2, sort_keys=True) + "\n")
    (tmp / "training.json").write_text(json.dumps({"task": "llava_gguf.shapes", "config": asdict(cfg), "metrics": metrics,
                                                   "minutes": round(minutes, 1)}, indent=2))
    (tmp / "README.md").write_text(model_card(cfg, cfgj, metrics, minutes))
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.replace(old)
    tmp.replace(dest)
    shutil.rmtree(old, ignore_errors=True)
    log(f"exported to {dest}")
