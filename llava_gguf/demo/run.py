"""`demo`: the small LLaVA shipped with the package (trained here on synthetic shapes, see
data/shapes-llava/README.md) converted, quantized to Q4_K_M and asked questions about test images it never
saw, with the answers checked; or a checkpoint you name, asked one question. Image features are measured
against the Hugging Face reference either way.

One rule for which file answers: every checkpoint is converted and quantized to Q4_K_M, and one question
(--image, --prompt, --model) is answered by the Q4_K_M file, which the output names; the quiz answers
with F16 and Q4_K_M side by side."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from llava_gguf.checks.metrics import mean_cosine

from llava_gguf.checks.reference import image_features, load_hf_model, pixel_values
from llava_gguf.convert import convert_checkpoint, output_names
from llava_gguf.demo import shapes
from llava_gguf.errors import LlavaGgufError
from llava_gguf.quantize import quantize_gguf
from llava_gguf.runtime.images import load_image
from llava_gguf.runtime.model import LLaVA
from llava_gguf.settings import cache_dir

DEMO_IMAGE = Path(__file__).parent.parent / "data" / "demo.jpg"
SHIPPED_MODEL = Path(__file__).parent.parent / "data" / "shapes-llava"
QUIZ_TYPES = ("F16", "Q4_K_M")
ANSWER_TYPE = "Q4_K_M"  # the file one question is answered by (the one people run)


@dataclass(frozen=True)
class DemoReport:
    """What `demo` did: the files it ran and, for the shapes quiz, the accuracy per file type; for one
    question, the answer. The text form is echoed as the demo runs; `to_json()` is the --json form (the
    fields that apply, in this order)."""

    model: str  # the F16 LLM
    mmproj: str
    accuracy: dict | None = None  # file type -> {"correct", "n"} (the quiz)
    cosine: float | None = None  # image features against transformers' (when measured)
    image_tokens: int | None = None  # (the quiz)
    q4_k_m: str | None = None  # the quantized LLM
    answer: str | None = None  # (one question)
    answered_by: str | None = None  # the file type that answered (one question): ANSWER_TYPE
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def is_shapes_model(ckpt: Path) -> bool:
    """A checkpoint `python -m training.train` wrote (it answers the shapes task's questions)."""
    try:
        return json.loads((ckpt / "training.json").read_text()).get("task") == "llava_gguf.shapes"
    except (OSError, ValueError, AttributeError):
        return False


def _key(ckpt: Path) -> str:
    """Content hash of a checkpoint's config and weights (cache key of its GGUF files)."""
    h = hashlib.sha256()
    for f in sorted(ckpt.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]


def prepared(ckpt: Path, echo: Callable[[str], None]) -> dict[str, Path]:
    """The checkpoint's F16 GGUF pair and Q4_K_M LLM, converted and quantized once, cached by content."""
    name = ckpt.resolve().name
    outdir = cache_dir() / "demo" / f"gguf-{name}-{_key(ckpt)}"
    llm_name, mm_name = output_names(name, "f16", "f16")
    files = {"F16": outdir / llm_name, "mmproj": outdir / mm_name}
    if not (files["F16"].is_file() and files["mmproj"].is_file()):
        echo(f"converting {ckpt} ...")
        convert_checkpoint(ckpt, outdir, outtype="f16", force=True)
    files["Q4_K_M"] = outdir / f"{name}-Q4_K_M.gguf"
    if not files["Q4_K_M"].is_file():
        echo("quantizing to Q4_K_M ...")
        quantize_gguf(files["F16"], "Q4_K_M", files["Q4_K_M"], force=True)
    return files


def _parity(ckpt: Path, files: dict[str, Path], img, echo: Callable[[str], None]) -> tuple[float, tuple[int, int]]:
    """Mean cosine of the F16 file's image rows against transformers' for `img` (square, at the model's
    resolution: libmtmd pads to square where HF's processor centre-crops, so only such an image is
    pre-processed identically by both)."""
    hf = load_hf_model(ckpt)
    reference = image_features(hf, pixel_values(ckpt, img))
    with LLaVA(files["F16"], files["mmproj"]) as llava:
        ours = llava.embed_image(img)
    cosine = mean_cosine(ours, reference)
    echo(f"image-feature cosine vs Hugging Face (F16): {cosine:.7f} ({ours.shape[0]} tokens x {ours.shape[1]})")
    if cosine < 0.999:
        raise LlavaGgufError(f"image features differ from the reference (cosine {cosine:.4f})",
                             "run `llava-gguf doctor`: is llava_fix true?")
    return cosine, ours.shape


def run_demo(model: Path | None, image: Path | None, prompt: str | None, echo: Callable[[str], None] = print,
             questions: int = 24, show: int = 6) -> DemoReport:
    t0 = time.perf_counter()
    ckpt = Path(model) if model is not None else SHIPPED_MODEL
    if model is None and not (ckpt / "config.json").is_file():
        raise LlavaGgufError(f"the shipped demo model is missing ({ckpt})", "reinstall llava-gguf, or pass --model DIR")
    if not (ckpt / "config.json").is_file():
        raise LlavaGgufError(f"{ckpt} is not a checkpoint directory (no config.json)")
    quiz = is_shapes_model(ckpt)
    if quiz and prompt is not None and image is None:
        raise LlavaGgufError("--prompt needs --image (without it the demo asks the test questions)")
    user_image = load_image(image) if image is not None else None  # a bad image fails before any work
    if quiz and model is None:
        echo("demo model: shapes-llava, a small LLaVA-1.5 trained here on synthetic shapes "
             f"({SHIPPED_MODEL / 'README.md'})")
    files = prepared(ckpt, echo)
    try:
        size = int(json.loads((ckpt / "config.json").read_text())["vision_config"]["image_size"])
    except (ValueError, KeyError, TypeError):
        raise LlavaGgufError(f"{ckpt}/config.json has no vision_config.image_size: not a LLaVA checkpoint") from None
    result: dict = {"model": str(files["F16"]), "mmproj": str(files["mmproj"]), "q4_k_m": str(files["Q4_K_M"])}
    if quiz and image is None:
        pairs = shapes.questions("test", 0, questions)
        cosine, shape = _parity(ckpt, files, pairs[0][0].image(size), echo)
        answers: dict[str, list[str]] = {}
        for label in QUIZ_TYPES:
            with LLaVA(files[label], files["mmproj"]) as llava:
                answers[label] = shapes.gguf_answers(llava, pairs)
        last = QUIZ_TYPES[-1]
        echo(f"{len(pairs)} questions about test images the model never saw (answers of the {last} file):")
        for (sc, q), a in list(zip(pairs, answers[last]))[:show]:
            mark = "right" if shapes.is_correct(a, q.answer) else "WRONG"
            echo(f"  [{mark}] {sc.caption()}")
            echo(f"          Q: {q.text}  A: {a.strip()}  (truth: {q.answer})")
        result["accuracy"] = {}
        for label in QUIZ_TYPES:
            k = shapes.correct(answers[label], pairs)
            echo(f"{label} accuracy: {100 * k / len(pairs):.1f}% ({k}/{len(pairs)})")
            result["accuracy"][label] = {"correct": k, "n": len(pairs)}
        result.update(cosine=cosine, image_tokens=int(shape[0]))
    else:
        prompt = prompt or (shapes_prompt() if quiz else "What is in the image?")
        img = user_image if user_image is not None else load_image(DEMO_IMAGE).resize((size, size), resample=3)
        if img.size == (size, size):
            result["cosine"], _ = _parity(ckpt, files, img, echo)
        llm = files[ANSWER_TYPE]
        with LLaVA(llm, files["mmproj"]) as llava:
            answer = llava.generate_from_image(img, prompt, temperature=0, repeat_penalty=1.0, max_tokens=48)
        echo(f"model:   {llm}")
        echo(f"type:    {ANSWER_TYPE} (the demo answers with the file it quantized)")
        echo(f"image:   {image or DEMO_IMAGE}")
        echo(f"prompt:  {prompt}")
        echo(f"answer:  {answer.strip()}")
        result.update(answer=answer, answered_by=ANSWER_TYPE)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return DemoReport(**result)


def shapes_prompt() -> str:
    return shapes.DESCRIBE
