"""The four stages of a run, each ending in its saved weights (a stage whose weights are on disk is done):
a. CLIP pretraining, b. language-model pretraining, and LLaVA stage 1 (projector) and stage 2
(projector + language model, in phases) on the model `assemble` builds from the first two."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llava_gguf.demo import shapes
from training.config import Config
from training.data import LM_VALIDATION, Data
from training.loop import clip_step, llava_params, llava_step, lm_step, run_stage, token_accuracy
from training.models import Contrastive, Whitening, build_llava, text_config, tower_features
from training.report import kinds_text, log


def stage_clip(cfg: Config, out: Path, data: Data):
    from transformers import CLIPVisionModel  # heavy: seconds to import

    done = out / "clip" / "vision"
    if done.is_dir():
        return CLIPVisionModel.from_pretrained(done)
    torch.manual_seed(cfg.seed)
    model = Contrastive(cfg, len(data.tok))
    step = clip_step(model, data)
    secs = run_stage("clip", out, model, model.parameters(), cfg.clip_steps, cfg.clip_lr, step)
    with torch.no_grad():  # validation: caption retrieval among 128 unseen scenes
        val = [shapes.scene("val", i) for i in range(128)]
        px = Data.normalize(np.stack([np.asarray(s.image()) for s in val]))
        ids, mask, _ = data.pad([data.encode(s.caption()) + [data.eos] for s in val])
        _, acc = model(px, ids, mask)
    log(f"[clip] validation: image->caption retrieval among 128: {acc:.3f}")
    _metrics(out, "clip", {"val_retrieval_at_128": float(acc), "minutes": secs / 60})
    _save(model.vision, done)
    return model.vision


def stage_lm(cfg: Config, out: Path, data: Data):
    from transformers import LlamaForCausalLM  # heavy: seconds to import

    done = out / "lm" / "model"
    if done.is_dir():
        return LlamaForCausalLM.from_pretrained(done)
    torch.manual_seed(cfg.seed + 1)
    model = LlamaForCausalLM(text_config(cfg, len(data.tok), data.pad_id))
    if cfg.text_embed_std != model.config.initializer_range:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, cfg.text_embed_std)
    step = lm_step(model, data)
    secs = run_stage("lm", out, model, model.parameters(), cfg.lm_steps, cfg.lm_lr, step)
    with torch.no_grad():
        model.eval()
        accs = [token_accuracy(model(input_ids=b[0], attention_mask=b[1]).logits, b[2])
                for b in (data.lm_batch(LM_VALIDATION + k) for k in range(4))]
        looked_up = [token_accuracy(model(input_ids=b[0], attention_mask=b[1]).logits, b[2])
                     for b in (data.lm_batch(LM_VALIDATION + k, answers_only=True) for k in range(4))]
    acc, lookup = float(torch.stack(accs).mean()), float(torch.stack(looked_up).mean())
    log(f"[lm] validation scenes: next-token accuracy {acc:.3f}; answers looked up in the caption {lookup:.3f}")
    _metrics(out, "lm", {"token_accuracy": acc, "answer_accuracy": lookup, "minutes": secs / 60})
    _save(model, done)
    return model


def _save(model, done: Path) -> None:
    """A stage's weights, complete or not at all (a later run takes an existing directory as done)."""
    tmp = done.with_name(done.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.replace(done)


def _metrics(out: Path, stage: str, values: dict) -> None:
    p = out / "metrics.json"
    m = json.loads(p.read_text()) if p.is_file() else {}
    m[stage] = values
    p.write_text(json.dumps(m, indent=2))


def assemble(cfg: Config, data: Data, vision, lm):
    torch.manual_seed(cfg.seed + 2)
    model = build_llava(cfg, data)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model


def stage_llava(cfg: Config, out: Path, data: Data, model, name: str):
    """LLaVA stage 1 (projector on captions) or stage 2 (projector + LLM on questions)."""
    from transformers import LlavaForConditionalGeneration  # heavy: seconds to import

    done = out / name / "model"
    if done.is_dir():
        return LlavaForConditionalGeneration.from_pretrained(done)
    steps, lr = (cfg.proj_steps, cfg.proj_lr) if name == "projector" else (cfg.qa_steps, cfg.qa_lr)
    features = tower_features(model, data.pixels)
    white = None
    if cfg.whiten:
        # kept with the stage's saved states, so a resumed stage removes the whitening it trained in; absorbed
        # before run_stage, which may load a saved state (of the whitened projector) over it
        (out / name).mkdir(parents=True, exist_ok=True)
        kept = out / name / "whitening.pt"
        white = Whitening.load(kept) if kept.is_file() else Whitening(features)
        white.save(kept)
        white.absorb(model)
        features = white.apply(features)
    secs = 0.0
    if name == "qa" and cfg.qa_frozen_steps:
        # the projector alone first: it learns to show the language model what the questions ask about
        # before the language model moves (trained together from the start, the language model learns to
        # guess from the question instead: "is there ...?" was always "no", 51% of them right on the test split;
        # 77% so)
        secs += run_stage("qa/frozen", out, model, llava_params(model, "projector"), cfg.qa_frozen_steps,
                          cfg.qa_frozen_lr, llava_step(model, data, name, features, share=0.0, recitals=0.0),
                          keep_final=True)
    if name == "qa" and cfg.qa_recital_steps:
        secs += run_stage("qa/recital", out, model, llava_params(model, name), cfg.qa_recital_steps, cfg.qa_recital_lr,
                          llava_step(model, data, name, features, share=0.0, recitals=1.0, offset=cfg.qa_frozen_steps),
                          keep_final=True)
    polish = name == "qa" and cfg.qa_polish_steps
    offset = cfg.qa_frozen_steps + cfg.qa_recital_steps if name == "qa" else 0  # the phases before this one
    secs += run_stage(name, out, model, llava_params(model, name), steps, lr,
                      llava_step(model, data, name, features, offset=offset), keep_final=bool(polish))
    if polish:
        secs += run_stage("qa/polish", out, model, llava_params(model, name), cfg.qa_polish_steps, cfg.qa_polish_lr,
                          llava_step(model, data, name, features, offset=offset + steps,
                                     position_weight=cfg.qa_polish_position_weight))
    if white:
        white.remove(model)
    model.eval()
    if name == "projector":
        pairs = [(shapes.scene("val", i), shapes.Question("caption", shapes.DESCRIBE, shapes.scene("val", i).caption()))
                 for i in range(48)]
    else:
        pairs = shapes.questions("val", 0, cfg.val_questions)
    answers = shapes.hf_answers(model, data.tok, pairs, max_new_tokens=40 if name == "projector" else 8)
    acc = shapes.accuracy(answers, pairs)
    what = "exact captions" if name == "projector" else "answers"
    log(f"[{name}] validation: {what} {acc:.1%} of {len(pairs)}")
    values = {"val_accuracy": acc, "val_n": len(pairs), "minutes": secs / 60}
    if name == "qa":
        values["by_kind"] = shapes.accuracy_by_kind(answers, pairs)
        log("[qa] by kind: " + kinds_text(values["by_kind"]))
    _metrics(out, name, values)
    _save(model, done)
    return model
