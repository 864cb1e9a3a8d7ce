"""The training data, a function of the seed: the scenes' pixels (generated once), which shape each image
patch shows (`patch_labels`), the tokenizer, and every stage's batches by (stage, step) (`Data`)."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from llava_gguf.demo import shapes
from training.config import STAGES, Config
from training.report import log

LM_VALIDATION = 10_000_000  # lm_batch steps from here on: validation scenes (never trained on)

PHRASES = [f"{c} {sh}" for c in shapes.COLORS for sh in shapes.SHAPES]  # what a patch is contrasted with
_SIDE = shapes.IMAGE_SIZE // 14  # patches per image side; a grid cell is 2x2 of them
PATCH_CELLS = torch.tensor([(p // _SIDE // 2) * 3 + p % _SIDE // 2 for p in range(_SIDE * _SIDE)])  # grid cell per patch
CELL_PATCHES = [[p for p in range(_SIDE * _SIDE) if PATCH_CELLS[p] == c] for c in range(9)]  # patches per grid cell


def patch_labels(scenes: list[shapes.Scene], pixels: np.ndarray, min_pixels: int = 20) -> torch.Tensor:
    """Per image and patch (14x14 pixels, row-major), the index in PHRASES of the shape the patch shows (at
    least `min_pixels` of its pixels away from the background colour), or -1. A patch lies in one grid cell
    (2x2 patches) and a cell holds at most one shape, so the shape is the cell's."""
    side = _SIDE
    out = torch.full((len(scenes), side * side), -1, dtype=torch.long)
    for k in range(0, len(scenes), 1000):
        px = pixels[k:k + 1000].astype(np.int16)
        bg = np.array([sc.background for sc in scenes[k:k + 1000]], dtype=np.int16)[:, None, None, :]
        away = (np.abs(px - bg).sum(-1) > 90).reshape(len(px), side, 14, side, 14).sum((2, 4)) >= min_pixels
        for j, sc in enumerate(scenes[k:k + 1000]):
            for s in sc.shapes:
                for p in CELL_PATCHES[s.cell]:
                    if away[j, p // side, p % side]:
                        out[k + j, p] = PHRASES.index(f"{s.color} {s.shape}")
    return out


class Data:
    """The training scenes' pixels (generated once), the tokenizer, and batches by (stage, step)."""

    def __init__(self, cfg: Config, tok_dir: Path) -> None:
        from transformers import AutoTokenizer  # heavy: seconds to import

        self.cfg = cfg
        self.tok_dir = tok_dir
        self.tok = AutoTokenizer.from_pretrained(tok_dir)
        self.image_id = self.tok.convert_tokens_to_ids("<image>")
        self.pad_id = self.tok.convert_tokens_to_ids("<pad>")
        self.bos, self.eos = self.tok.bos_token_id, self.tok.eos_token_id
        self.n_image = (shapes.IMAGE_SIZE // 14) ** 2
        t = time.perf_counter()
        self.scenes = [shapes.scene("train", i) for i in range(cfg.train_scenes)]
        self.pixels = np.stack([np.asarray(sc.image(), dtype=np.uint8) for sc in self.scenes])
        self.patches = patch_labels(self.scenes, self.pixels) if cfg.clip_patch_weight else None
        log(f"{len(self.scenes)} training scenes generated in {time.perf_counter() - t:.1f} s")
        self._enc: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Token ids of a text segment as the runtime tokenizes it after a special token (no BOS)."""
        ids = self._enc.get(text)
        if ids is None:
            ids = self._enc[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return ids

    def rng(self, stage: str, step: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, STAGES.index(stage), step])

    @staticmethod
    def normalize(pixels: np.ndarray) -> torch.Tensor:
        return shapes.normalize_pixels(pixels)

    def pad(self, seqs: list[list[int]], labels: list[list[int]] | None = None):
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        lab = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            if labels is not None:
                lab[i, : len(s)] = torch.tensor(labels[i])
        return ids, mask, lab

    def prompt(self, question: str) -> list[int]:
        """The Vicuna prompt the runtime renders: <s>USER: <image>\\n{question} ASSISTANT:"""
        return ([self.bos] + self.encode("USER: ") + [self.image_id] * self.n_image
                + self.encode(f"\n{question} ASSISTANT:"))

    def example(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        p = self.prompt(question)
        a = self.encode(answer) + [self.eos]
        return p + a, [-100] * len(p) + a

    def clip_batch(self, step: int):
        """Half the batch training scenes, half the same scenes with one shape's kind or colour changed
        (hard negatives: otherwise captions are told apart by colour and position alone)."""
        rng = self.rng("clip", step)
        idx = rng.choice(len(self.scenes), self.cfg.clip_batch // 2, replace=False)
        twins = [shapes.variant(self.scenes[i], random.Random(int(rng.integers(1 << 62)))) for i in idx]
        caps = [self.encode(sc.caption()) + [self.eos] for sc in [self.scenes[i] for i in idx] + twins]
        ids, mask, _ = self.pad(caps)
        twin_px = np.stack([np.asarray(t.image(), dtype=np.uint8) for t in twins])
        pixels = np.concatenate([self.pixels[idx], twin_px])
        if self.patches is None:
            return self.normalize(pixels), ids, mask
        labels = torch.cat([self.patches[torch.from_numpy(idx)], patch_labels(twins, twin_px)])
        places = self.phrases(shapes.POSITIONS) if self.cfg.clip_place_weight else ()
        return self.normalize(pixels), ids, mask, labels, *self.phrases(PHRASES), *places

    def phrases(self, texts):
        """Short texts (PHRASES, the places) as a padded batch for the text encoder."""
        ids, mask, _ = self.pad([self.encode(p) + [self.eos] for p in texts])
        return ids, mask

    def lm_batch(self, step: int, answers_only: bool = False):
        """The language model's pretraining text: captions (30%), and the runtime's prompt with the
        scene's caption where the image rows go, `USER: {caption}\n{question} ASSISTANT: {answer}` —
        meant to teach the model to look an answer up in what precedes the question (which object is
        red, where the star is), the skill stage 2 needs with image rows in the caption's place. It
        learns that for a caption of one shape; with two or three, its answers stay at chance (colour
        48% / 31%, measured with the embeddings at 0.02); stage 2 learns the lookup over image rows (`Data.recital`), where the row of a shape
        holds its name and its attributes together. Without it the image-less questions only taught it to guess
        (the run without it, and without whitening: 61.2% on validation, shape questions 18%).
        The caption in the context is not a target (the captions alone are): the gradient goes to the
        lookup. `answers_only`: labels on the answers alone (validation)."""
        rng = self.rng("lm", step)
        seqs, labs = [], []
        for i in rng.choice(len(self.scenes), self.cfg.lm_batch, replace=False):
            sc = self.scenes[i] if step < LM_VALIDATION else shapes.scene("val", int(i))
            if rng.random() < 0.3 and not answers_only:
                text = self.encode(sc.caption()) + [self.eos]
                lab = text
            else:
                q = sc.questions()[rng.integers(len(shapes.QUESTION_KINDS))]
                context = self.encode("USER: ") + self.encode(sc.caption())  # not a target
                ask = self.encode(f"\n{q.text} ASSISTANT:")
                a = self.encode(q.answer.capitalize()) + [self.eos]
                text = context + ask + a
                lab = [-100] * len(context) + ([-100] * len(ask) if answers_only else ask) + a
            seqs.append([self.bos] + text)
            labs.append([-100] + lab)
        return self.pad(seqs, labs)

    def first_kind(self, rng: np.random.Generator, position_weight: float | None = None) -> int:
        """The kind of a conversation's first question (an index into QUESTION_KINDS): position ones
        `position_weight` (default `qa_position_weight`) times as likely as each other kind."""
        n = len(shapes.QUESTION_KINDS)
        w = self.cfg.qa_position_weight if position_weight is None else position_weight
        if w == 1.0:
            return int(rng.integers(n))
        p = np.ones(n)
        p[shapes.QUESTION_KINDS.index("position")] = w
        return int(rng.choice(n, p=p / p.sum()))

    def conversation(self, sc: shapes.Scene, rng: np.random.Generator,
                     position_weight: float | None = None) -> tuple[list[int], list[int]]:
        """A training conversation about one image, as the runtime renders a chat: the first question of
        any kind (what the evaluation asks, alone), then follow-up turns `USER: {question} ASSISTANT:`
        with more questions about the same image, each answer followed by EOS as its target (the input
        goes on with the next turn, as the runtime's follow-up prompt does). Follow-ups never ask what
        an earlier turn gave away (the shape of a colour once "Where is the red star?" was asked), so
        every answer has to be read from the image. Several answers per image: the 36 image rows, most
        of each sequence's cost, are paid once for all of them."""
        first = sc.questions()[self.first_kind(rng, position_weight)]
        ids, lab = self.example(first.text, first.answer.capitalize())
        if self.cfg.qa_turns == 1:
            return ids, lab
        ids, lab = ids[:-1], lab[:-1]  # the EOS: see below
        told = sc.mentioned(first)  # shapes whose colour or kind the conversation has named
        pool = sc.question_pool(random.Random(int(rng.integers(1 << 62))))
        turns = 1
        for k in rng.permutation(len(pool)):
            if turns >= self.cfg.qa_turns:
                break
            q = pool[k]
            about = sc.mentioned(q)
            if q.text == first.text or q.kind == first.kind == "count" or (q.kind in ("color", "shape", "exists") and about & told):
                continue
            told |= about
            turn = self.encode(f"USER: {q.text} ASSISTANT:")
            a = self.encode(q.answer.capitalize())
            ids += turn + a
            lab += [self.eos] + [-100] * (len(turn) - 1) + a
            turns += 1
        return ids + [self.eos], lab + [self.eos]

    def recital(self, sc: shapes.Scene, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """The image, then a word for what is recited and each of the scene's shapes (in random order)
        named and followed by that, the target: `USER: <image>\n color star Purple circle Red` (colour
        after the shape), `shape red Star ...`, `Where red star Top left ...`, or `there red star Yes
        green star No ...` (the present shapes and one absent that shares a colour or a shape with one).

        A question's answer needs a lookup and a hop: find the image rows of the shape the question names,
        and carry what they hold from the name to where the answer goes (`? ASSISTANT:`). Learnt together,
        neither gives a gradient without the other. On the associative-recall toy (`k1 v1 ... k4 v4 kq`,
        embeddings at std 1.0) a 2-layer LLaMA learns the lookup alone (the answer right after `kq`) in
        ~200 steps, then the hop (three filler tokens between `kq` and the answer) in ~100 more, while
        both from the start stay at chance for 600+. The recitals are the lookup alone."""
        kind = int(rng.integers(4))
        ids = ([self.bos] + self.encode("USER: ") + [self.image_id] * self.n_image + self.encode("\n")
               + self.encode(("color", "shape", "Where", "there")[kind]))
        lab = [-100] * len(ids)
        items = [((s.shape, s.color), (s.color, s.shape), (f"{s.color} {s.shape}", s.position),
                  (f"{s.color} {s.shape}", "yes"))[kind] for s in sc.shapes]
        if kind == 3:
            absent = sc.near_misses()
            c, sh = absent[int(rng.integers(len(absent)))]
            items.append((f"{c} {sh}", "no"))
        for k in rng.permutation(len(items)):
            key, value = items[k]
            key, value = self.encode(key), self.encode(value.capitalize())
            ids += key + value
            lab += [-100] * len(key) + value
        return ids + [self.eos], lab + [self.eos]

    def llava_examples(self, stage: str, step: int, batch: int, caption_share: float, recital_share: float = 0.0,
                       position_weight: float | None = None):
        """Scene indices (for their cached image features), and per scene its token ids, labels and whether
        it is a caption: captions (`caption_share` of them), recitals (`recital_share`) or conversations
        of questions."""
        rng = self.rng(stage, step)
        idx = rng.choice(len(self.scenes), batch, replace=False)
        seqs, labs, captions = [], [], []
        for i in idx:
            sc = self.scenes[i]
            u = rng.random()
            caption = bool(u < caption_share)
            if caption:
                s, lab = self.example(shapes.DESCRIBE, sc.caption())
            elif u < caption_share + recital_share:
                s, lab = self.recital(sc, rng)
            else:
                s, lab = self.conversation(sc, rng, position_weight)
            seqs.append(s)
            labs.append(lab)
            captions.append(caption)
        return idx, seqs, labs, captions

    def llava_batch(self, stage: str, step: int, batch: int, caption_share: float, recital_share: float = 0.0):
        """`llava_examples` as one padded batch: scene indices, token ids, mask and labels."""
        idx, seqs, labs, _ = self.llava_examples(stage, step, batch, caption_share, recital_share)
        ids, mask, lab = self.pad(seqs, labs)
        return torch.from_numpy(idx), ids, mask, lab

    def llava_groups(self, stage: str, step: int, batch: int, caption_share: float, recital_share: float = 0.0,
                     position_weight: float | None = None):
        """The same batch with its captions and its conversations (and recitals) padded apart: [(idx, ids, mask, labels)].
        One optimisation step over both (`llava_step`) is the mixed batch's, without padding every
        question to a caption's length (which made a step ~30% slower). Mixed in one step it must be:
        caption-only and question-only steps gave 64.0% on validation instead of 72.4%."""
        idx, seqs, labs, captions = self.llava_examples(stage, step, batch, caption_share, recital_share,
                                                        position_weight)
        groups = []
        for want in (False, True):
            keep = [k for k, c in enumerate(captions) if c == want]
            if keep:
                ids, mask, lab = self.pad([seqs[k] for k in keep], [labs[k] for k in keep])
                groups.append((torch.from_numpy(idx[keep]), ids, mask, lab))
        return groups
