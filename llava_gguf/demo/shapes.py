"""A synthetic visual question-answering task: images of one to three coloured shapes on plain or noisy
backgrounds, with captions and short-answer questions (colour, shape, count, position, "is there a ...?").

Everything is a pure function of (split, index): `scene("test", 17)` is the same picture, caption and
questions on every machine, so the shipped model's accuracy can be measured anywhere, and training can
resume at any step. The splits differ by seed; the shipped model never saw the validation or test scenes.

Each scene puts its shapes in distinct cells of a 3x3 grid, with distinct shapes and distinct colours,
so every question has exactly one right answer.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from llava_gguf.families.clip import CLIP_MEAN, CLIP_STD

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (240, 215, 30),
    "purple": (140, 50, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
TEST_SCENES = 500  # the test split: every question of these scenes (bench/accuracy.py)
IMAGE_SIZE = 84  # 6x6 patches of 14 pixels; a grid cell is 28x28
QUESTION_KINDS = ("color", "shape", "count", "position", "exists")
DESCRIBE = "Describe the image."
COLOR_QUESTIONS = ("What color is the {s}?", "Which color is the {s}?")
SHAPE_QUESTIONS = ("What shape is the {c} object?", "Which shape is {c}?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many objects are in the image?")
POSITION_QUESTION = "Where is the {c} {s}?"


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    cell: int  # 0..8, row-major

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        return f"{_a(self.size)} {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Question:
    kind: str  # color | shape | count | position | exists | caption
    text: str
    answer: str


@dataclass(frozen=True)
class Scene:
    split: str
    index: int
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    noisy: bool

    @property
    def seed(self) -> int:
        return _seed(self.split, self.index)

    def caption(self) -> str:
        parts = []
        for s in self.shapes:
            where = "in the center" if s.position == "center" else f"at the {s.position}"
            parts.append(f"{s.phrase()} {where}")
        return _join(parts).capitalize() + "."

    def image(self, size: int = IMAGE_SIZE):
        return render(self, size)

    def questions(self) -> list[Question]:
        """One question of each kind, with its answer (the 'exists' one is asked about a present shape
        or an absent one, half and half)."""
        rng = random.Random(self.seed * 7 + 3)
        target = rng.choice(self.shapes)
        out = [
            _color_question(target, rng),
            _shape_question(target, rng),
            Question("count", rng.choice(COUNT_QUESTIONS), COUNTS[len(self.shapes) - 1]),
            _position_question(target),
        ]
        if rng.random() < 0.5:
            ask = (target.color, target.shape)
        else:
            present = {(s.color, s.shape) for s in self.shapes}
            # absent, but often sharing the colour or the shape of something that is there (a real test)
            options = [(c, sh) for c in COLORS for sh in SHAPES if (c, sh) not in present
                       and (rng.random() < 0.3 or any(c == s.color or sh == s.shape for s in self.shapes))]
            ask = rng.choice(options)
        out.append(exists_question(self, *ask))
        return out


    def question_pool(self, rng: random.Random) -> list[Question]:
        """Every colour, shape and position question about each of the scene's shapes, the count question,
        and two "is there ...?" questions (one present shape, one absent one sharing a colour or a shape
        with a present one): follow-up turns for training."""
        out: list[Question] = []
        for s in self.shapes:
            out += [_color_question(s, rng), _shape_question(s, rng), _position_question(s)]
        out.append(Question("count", rng.choice(COUNT_QUESTIONS), COUNTS[len(self.shapes) - 1]))
        present = {(s.color, s.shape) for s in self.shapes}
        out += [exists_question(self, *rng.choice(sorted(present))), exists_question(self, *rng.choice(self.near_misses()))]
        return out

    def near_misses(self) -> list[tuple[str, str]]:
        """(colour, shape) pairs not in the scene that share a colour or a shape with one that is, in
        COLORS x SHAPES order: the absent shapes worth asking about."""
        present = {(s.color, s.shape) for s in self.shapes}
        return [(c, sh) for c in COLORS for sh in SHAPES
                if (c, sh) not in present and any(c == s.color or sh == s.shape for s in self.shapes)]

    def mentioned(self, question: Question) -> set[Shape]:
        """The scene's shapes whose colour or kind the question names."""
        words = set(re.findall(r"[a-z]+", question.text.lower()))
        return {s for s in self.shapes if s.color in words or s.shape in words}


def _color_question(s: Shape, rng: random.Random) -> Question:
    return Question("color", rng.choice(COLOR_QUESTIONS).format(s=s.shape), s.color)


def _shape_question(s: Shape, rng: random.Random) -> Question:
    return Question("shape", rng.choice(SHAPE_QUESTIONS).format(c=s.color), s.shape)


def exists_question(sc: Scene, color: str, shape: str) -> Question:
    """"Is there a {color} {shape}?" about the scene, with its answer."""
    there = any((s.color, s.shape) == (color, shape) for s in sc.shapes)
    return Question("exists", f"Is there {_a(color)} {color} {shape}?", "yes" if there else "no")


def _position_question(s: Shape) -> Question:
    return Question("position", POSITION_QUESTION.format(c=s.color, s=s.shape), s.position)


def variant(sc: Scene, rng: random.Random) -> Scene:
    """The same picture with one thing changed: one shape's kind (mostly) or colour. Contrastive training
    needs such near misses, or it learns to tell captions apart by colour and position alone."""
    k = rng.randrange(len(sc.shapes))
    old = sc.shapes[k]
    if rng.random() < 0.7:
        new = replace(old, shape=rng.choice([s for s in SHAPES if s not in {o.shape for o in sc.shapes}]))
    else:
        new = replace(old, color=rng.choice([c for c in COLORS if c not in {o.color for o in sc.shapes}]))
    return replace(sc, shapes=sc.shapes[:k] + (new,) + sc.shapes[k + 1:])


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _seed(split: str, index: int) -> int:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split] * 1_000_003_000 + index


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def scene(split: str, index: int) -> Scene:
    """The scene `index` of `split` ("train", "val" or "test")."""
    rng = random.Random(_seed(split, index))
    n = rng.choice((1, 1, 2, 2, 3, 3))
    cells = rng.sample(range(9), n)
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(list(COLORS), n)
    items = tuple(sorted((Shape(sh, c, rng.choice(SIZES), cell) for sh, c, cell in zip(shapes, colors, cells)),
                         key=lambda s: s.cell))
    if rng.random() < 0.5:
        g = rng.randint(185, 245)
        background = (g + rng.randint(-8, 8), g + rng.randint(-8, 8), g + rng.randint(-8, 8))
    else:
        g = rng.randint(20, 70)
        background = (g, g, g + rng.randint(0, 15))
    return Scene(split, index, items, background, noisy=rng.random() < 0.5)


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = rot + math.pi * k / 5 - math.pi / 2
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render(sc: Scene, size: int = IMAGE_SIZE):
    """The scene as a size x size RGB PIL image (deterministic)."""
    rng = random.Random(sc.seed * 7 + 1)
    scale = size / IMAGE_SIZE
    img = Image.new("RGB", (size, size), sc.background)
    d = ImageDraw.Draw(img)
    for s in sc.shapes:
        row, col = divmod(s.cell, 3)
        # a cell is 2x2 patches: a small shape sits on one of them (a patch sees all of it), a large one
        # in the middle of the cell
        if s.size == "small":
            r = rng.uniform(5.5, 6.8) * scale
            cx = (col * 28 + rng.choice((7, 21)) + rng.uniform(-1.5, 1.5)) * scale
            cy = (row * 28 + rng.choice((7, 21)) + rng.uniform(-1.5, 1.5)) * scale
        else:
            r = rng.uniform(10.0, 11.5) * scale
            cx = (col * 28 + 14 + rng.uniform(-2, 2)) * scale
            cy = (row * 28 + 14 + rng.uniform(-2, 2)) * scale
        base = COLORS[s.color]
        fill = tuple(max(0, min(255, v + rng.randint(-18, 18))) for v in base)
        if s.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s.shape == "square":
            h = r * 0.88
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif s.shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
        elif s.shape == "star":
            d.polygon(_star(cx, cy, r * 1.1, rng.uniform(-0.2, 0.2)), fill=fill)
        elif s.shape == "diamond":
            d.polygon([(cx, cy - r * 1.1), (cx + r * 0.8, cy), (cx, cy + r * 1.1), (cx - r * 0.8, cy)], fill=fill)
    if sc.noisy:
        arr = np.asarray(img, dtype=np.int16)
        noise = np.random.default_rng(sc.seed).integers(-22, 23, size=arr.shape, dtype=np.int16)
        img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")
    return img


_SYNONYMS = {"1": "one", "2": "two", "3": "three", "centre": "center", "middle": "center", "grey": "gray",
             "colour": "color"}


def normalize_answer(text: str) -> str:
    """What an answer is compared by: lower case, the first line, no punctuation or extra spaces, digits
    as words, British spellings as American ones."""
    text = text.strip().split("\n")[0].lower()
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return " ".join(_SYNONYMS.get(w, w) for w in text.split())


def is_correct(answer: str, truth: str) -> bool:
    return normalize_answer(answer) == normalize_answer(truth)


def questions(split: str, start: int, n: int) -> list[tuple[Scene, Question]]:
    """n (scene, question) pairs of `split` from scene `start` on: the kinds taken in turn, so any
    20 consecutive pairs ask every kind four times."""
    out = []
    for k in range(n):
        sc = scene(split, start + k)
        out.append((sc, sc.questions()[k % len(QUESTION_KINDS)]))
    return out


def corpus(n_scenes: int = 4000) -> list[str]:
    """The task's text (captions, questions, answers, the chat template's words): what the tokenizer
    is trained on."""
    lines = []
    for i in range(n_scenes):
        sc = scene("train", i)
        lines.append(sc.caption())
        for q in sc.questions():
            lines.append(f"USER: <image>\n{q.text} ASSISTANT: {q.answer.capitalize()}")
    lines.append(f"USER: <image>\n{DESCRIBE} ASSISTANT:")
    return lines


def test_split(n_scenes: int = TEST_SCENES) -> list[tuple[Scene, Question]]:
    """Every question of the first `n_scenes` test scenes."""
    return [(sc, q) for sc in (scene("test", i) for i in range(n_scenes)) for q in sc.questions()]


def normalize_pixels(images):
    """CLIP-normalised pixel tensor (N, 3, H, W) of RGB images already at the model's resolution: what
    CLIPImageProcessor gives for them (its resize and centre crop leave them as they are)."""
    import torch  # heavy: only training and the tests build tensors; the demo itself never does

    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).float().div_(255)
    x = x.permute(0, 3, 1, 2)
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def hf_prompt(tok, question: str, image_id: int, n_image: int) -> list[int]:
    """Token ids of `<s>USER: <image>\\n{question} ASSISTANT:` (the Vicuna prompt the runtime renders)
    for a transformers tokenizer, the image token repeated once per image row as LLaVA's processor does;
    the text around the image is tokenized as two segments, as llama.cpp does."""
    return ([tok.bos_token_id] + tok("USER: ", add_special_tokens=False)["input_ids"] + [image_id] * n_image
            + tok(f"\n{question} ASSISTANT:", add_special_tokens=False)["input_ids"])


def hf_answers(model, tok, pairs: list[tuple[Scene, Question]], *, max_new_tokens: int = 8,
               batch: int = 32) -> list[str]:
    """Greedy answers of a transformers LlavaForConditionalGeneration to (scene, question) pairs, from the
    prompt the runtime renders (`<s>USER: <image>\\n{question} ASSISTANT:`, the image token repeated once
    per image row as LLaVA's processor does)."""
    import torch  # heavy: only the transformers reference side needs it

    model.eval()
    size = int(model.config.vision_config.image_size)
    image_id = model.config.image_token_id
    n_image = model.config.image_seq_length
    pad = tok.convert_tokens_to_ids("<pad>")
    out: list[str] = []
    with torch.no_grad():
        for k in range(0, len(pairs), batch):
            chunk = pairs[k:k + batch]
            prompts = [hf_prompt(tok, q.text, image_id, n_image) for _, q in chunk]
            n = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (n - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
            px = normalize_pixels([sc.image(size) for sc, _ in chunk])
            gen = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id)
            out += [tok.decode(row, skip_special_tokens=True).strip() for row in gen[:, n:]]
    return out


def gguf_answers(llava, pairs: list[tuple[Scene, Question]], *, max_tokens: int = 12) -> list[str]:
    """Greedy answers of a llava_gguf.LLaVA to (scene, question) pairs (plain greedy, as hf_answers)."""
    size = int(llava.mmproj_info.image_size or IMAGE_SIZE)
    return [llava.generate_from_image(sc.image(size), q.text, temperature=0, repeat_penalty=1.0,
                                      max_tokens=max_tokens).strip() for sc, q in pairs]


def correct(answers: list[str], pairs: list[tuple[Scene, Question]]) -> int:
    return sum(is_correct(a, q.answer) for a, (_, q) in zip(answers, pairs))


def accuracy(answers: list[str], pairs: list[tuple[Scene, Question]]) -> float:
    return correct(answers, pairs) / max(1, len(pairs))


def accuracy_by_kind(answers: list[str], pairs: list[tuple[Scene, Question]]) -> dict[str, float]:
    """Accuracy per question kind, in QUESTION_KINDS order (kinds without questions left out)."""
    out = {}
    for kind in QUESTION_KINDS:
        sel = [(a, p) for a, p in zip(answers, pairs) if p[1].kind == kind]
        if sel:
            out[kind] = accuracy([a for a, _ in sel], [p for _, p in sel])
    return out


def agreement(a: list[str], b: list[str]) -> float:
    return sum(normalize_answer(x) == normalize_answer(y) for x, y in zip(a, b)) / max(1, len(a))
