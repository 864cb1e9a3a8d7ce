"""The optimisation loop every stage runs (`run_stage`: AdamW, warm-up + cosine, resumable from its saved
state) and what one step of each stage computes (`clip_step`, `lm_step`, `llava_step`: loss and metric)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.data import Data
from training.models import Contrastive, llava_logits
from training.report import log


def schedule(opt, step: int, total: int, lr: float) -> None:
    warm = max(1, total // 20)
    f = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0) * max(f, 0.02)


def run_stage(name: str, out: Path, module: torch.nn.Module, params, steps: int, lr: float, step_fn,
              every: int = 50, save_every: int = 250, keep_final: bool = False) -> float:
    """Train `params` of `module` for `steps` with AdamW and a warm-up + cosine schedule, resumable from
    OUT/<name>/state.pt; `step_fn(step) -> (loss, metric)`. `keep_final`: the state is saved at the end
    too (a phase another follows: run again, it loads its final weights instead of training again)."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, before = 0, 0.0
    begun = time.perf_counter()
    if (d / "state.pt").is_file():
        st = torch.load(d / "state.pt", weights_only=False)
        module.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        torch.set_rng_state(st["rng"])
        start, before = st["step"], st.get("elapsed", 0.0)
        log(f"[{name}] resuming at step {start}/{steps}")
    module.train()
    t0, seen = time.perf_counter(), 0
    run_loss = run_metric = 0.0
    for step in range(start, steps):
        schedule(opt, step, steps, lr)
        loss, metric = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        run_loss += loss.item()
        run_metric += float(metric)
        seen += 1
        if (step + 1) % every == 0 or step + 1 == steps:
            rate = (time.perf_counter() - t0) / seen
            log(f"[{name}] step {step + 1}/{steps}  loss {run_loss / seen:.4f}  {step_fn.metric} "
                f"{run_metric / seen:.3f}  ({rate:.2f} s/step, {rate * (steps - step - 1) / 60:.1f} min left)")
            run_loss = run_metric = 0.0
            t0, seen = time.perf_counter(), 0
        if (step + 1) % save_every == 0 and step + 1 < steps or keep_final and step + 1 == steps:
            tmp = d / "state.pt.partial"
            torch.save({"model": module.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                        "step": step + 1,
                        "elapsed": before + time.perf_counter() - begun}, tmp)
            tmp.replace(d / "state.pt")
    module.eval()
    return before + time.perf_counter() - begun


def token_hits(logits, labels) -> tuple[int, int]:
    """(next-token predictions right, labelled positions) of a batch."""
    pred = logits[:, :-1].argmax(-1)
    lab = labels[:, 1:]
    keep = lab != -100
    return int((pred[keep] == lab[keep]).sum()), int(keep.sum())


def token_accuracy(logits, labels) -> torch.Tensor:
    hits, n = token_hits(logits, labels)
    return torch.tensor(hits / n if n else float("nan"))


def clip_step(model: Contrastive, data: Data):
    def step(i):
        return model(*data.clip_batch(i))

    step.metric = "in-batch retrieval"
    return step


def lm_step(model, data: Data):
    def step(i):
        ids, mask, lab = data.lm_batch(i)
        o = model(input_ids=ids, attention_mask=mask, labels=lab)
        return o.loss, token_accuracy(o.logits, lab)

    step.metric = "token accuracy"
    return step


def llava_params(model, name: str) -> list[dict]:
    """What LLaVA stage 1 ("projector") and stage 2 ("qa") train: the projector; and in stage 2 the
    language model too (at half the projector's rate). The vision tower stays frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    groups = [{"params": list(model.model.multi_modal_projector.parameters()),
               "lr_scale": 1.0 if name == "projector" else 2.0}]
    if name == "qa":
        groups.append({"params": list(model.model.language_model.parameters()) + list(model.lm_head.parameters()),
                       "lr_scale": 1.0})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups

def llava_step(model, data: Data, name: str, features: torch.Tensor, *, share: float | None = None,
               recitals: float | None = None, offset: int = 0, position_weight: float | None = None):
    """Stage 1: captions only; stage 2: conversations of questions, `share` of them captions (default
    `qa_caption_share`) and `recitals` of them recitals (default `qa_recital_share`), data from step
    `offset` on (stage 2's joint phase follows its first phases).
    `features`: every training scene's (`tower_features`, whitened if the projector reads them so).
    The loss is the mean over the batch's answer tokens, its captions and conversations run apart."""
    if name == "projector":
        batch, share, recitals = data.cfg.proj_batch, 1.0, 0.0
    else:
        batch = data.cfg.qa_batch
        share = data.cfg.qa_caption_share if share is None else share
        recitals = data.cfg.qa_recital_share if recitals is None else recitals

    def step(i):
        groups = data.llava_groups(name, offset + i, batch, share, recitals, position_weight)
        total = sum(int((lab[:, 1:] != -100).sum()) for *_, lab in groups)
        loss, hits = 0.0, 0
        for idx, ids, mask, lab in groups:
            logits = llava_logits(model, features[idx], ids, mask)
            loss = loss + F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100,
                                          reduction="sum") / total
            hits += token_hits(logits, lab)[0]
        return loss, hits / total

    step.metric = "answer-token accuracy"
    return step
