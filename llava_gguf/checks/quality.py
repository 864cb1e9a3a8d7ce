"""`quality`: what quantization cost. Both models answer the same prompts about the same images; along
the base model's own greedy answer, we compare the next-token distributions position by position:
mean KL(base || quant), top-1 agreement, and how many greedy answers are identical. When the quantized
pair has its own (quantized) mmproj, the image embeddings are compared too (per-token cosine).

The models run one after the other, so peak memory is that of the larger one."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llava_gguf.checks.metrics import kl_divergence, log_softmax, same_top1, token_cosines
from llava_gguf.checks.samples import sample_image
from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.classify import classify
from llava_gguf.gguf.pairing import find_base_mmproj
from llava_gguf.runtime.images import image_files
from llava_gguf.runtime.model import LLaVA
from llava_gguf.settings import IMAGE_PROMPTS


@dataclass(frozen=True)
class QualityReport:
    """What `quality` measured (rendered by cli/render.py; `to_json()` is --json)."""

    base: str
    quant: str
    base_mmproj: str
    mmproj: str
    pairs: int
    positions: int
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float  # fraction of positions whose most likely next token is the same
    same_answers: int  # pairs whose greedy answers are identical token for token
    mmproj_cosine_mean: float | None = None  # only when the two pairs use different mmproj files
    mmproj_cosine_min: float | None = None
    per_pair: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """The --json form: every field, as named here."""
        return asdict(self)

    to_dict = to_json  # the name of the API before reports had one shape


def _require(path: Path, kind: str, role: str) -> None:
    k = classify(path)
    if k.kind != kind:
        want = "a language model" if kind == "llm" else "an mmproj file"
        raise LlavaGgufError(f"{role} {path} is {'an mmproj file' if k.kind == 'mmproj' else 'a language model'}, "
                             f"not {want}", "usage: llava-gguf quality BASE.gguf QUANT.gguf [--mmproj MMPROJ.gguf]")


def _images(images: Path | str | None) -> list:
    if images is None:
        return [sample_image(336, seed=s) for s in (11, 12, 13)]
    return image_files(images)


def _prompts(prompts: Path | str | None) -> list[str]:
    if prompts is None:
        return list(IMAGE_PROMPTS)
    p = Path(prompts)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise LlavaGgufError(f"cannot read --prompts {p} ({e.__class__.__name__})") from None
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise LlavaGgufError(f"--prompts {p} holds no prompt (one per line)")
    return lines


def measure_quality(base: Path | str, quant: Path | str, *, mmproj: Path | str | None = None,
                    base_mmproj: Path | str | None = None, images: Path | str | None = None,
                    prompts: Path | str | None = None, tokens: int = 32, n_ctx: int | None = None,
                    threads: int | None = None) -> QualityReport:
    base, quant = Path(base), Path(quant)
    _require(base, "llm", "BASE")
    _require(quant, "llm", "QUANT")
    base_mm = Path(base_mmproj) if base_mmproj else find_base_mmproj(base)
    quant_mm = Path(mmproj) if mmproj else base_mm
    _require(base_mm, "mmproj", "the base mmproj")
    _require(quant_mm, "mmproj", "--mmproj")
    imgs, texts = _images(images), _prompts(prompts)
    n = max(len(imgs), len(texts))
    pairs = [(imgs[i % len(imgs)], texts[i % len(texts)]) for i in range(n)]
    compare_mm = base_mm.resolve() != quant_mm.resolve()

    # base: its greedy answer to each pair, and its log-probabilities along it
    ref: list[tuple[list[int], np.ndarray]] = []
    base_embd = []
    with LLaVA(base, base_mm, n_ctx=n_ctx, n_threads=threads) as m:
        n_vocab = m.llm.n_vocab
        for image, prompt in pairs:
            m.eval_prompt(prompt, [image])
            answer, logps = [], []
            for _ in range(tokens):
                lp = log_softmax(m.last_logits())
                tok = int(np.argmax(lp))
                logps.append(lp)
                answer.append(tok)
                if m.is_end_of_generation(tok):
                    break
                m.eval_tokens([tok])
            ref.append((answer, np.stack(logps)))
        if compare_mm:
            base_embd = [m.embed_image(im) for im in imgs]

    kls, agree, same, per_pair = [], [], 0, []
    cosines = []
    with LLaVA(quant, quant_mm, n_ctx=n_ctx, n_threads=threads) as m:
        if m.llm.n_vocab != n_vocab:
            raise LlavaGgufError(f"BASE has {n_vocab} tokens and QUANT {m.llm.n_vocab}: not the same model")
        for (image, prompt), (answer, logps) in zip(pairs, ref):
            m.eval_prompt(prompt, [image])
            pair_kl, pair_agree = [], []
            for i, tok in enumerate(answer):
                lq = log_softmax(m.last_logits())
                lb = logps[i]
                pair_kl.append(max(0.0, kl_divergence(lb, lq)))
                pair_agree.append(same_top1(lq, lb))
                if i + 1 < len(answer):
                    m.eval_tokens([tok])
            kls += pair_kl
            agree += pair_agree
            same += all(pair_agree)
            per_pair.append({"image": str(image) if isinstance(image, Path) else f"generated-{len(per_pair)}",
                             "prompt": prompt, "positions": len(answer), "kl_mean": float(np.mean(pair_kl)),
                             "top1": float(np.mean(pair_agree))})
        if compare_mm:
            for im, e in zip(imgs, base_embd):
                cosines.append(token_cosines(m.embed_image(im), e))
    kl = np.array(kls)
    cos = np.concatenate(cosines) if cosines else None
    return QualityReport(
        str(base), str(quant), str(base_mm), str(quant_mm), len(pairs), len(kl), float(kl.mean()),
        float(np.median(kl)), float(np.percentile(kl, 99)), float(kl.max()), float(np.mean(agree)), same,
        float(cos.mean()) if cos is not None else None, float(cos.min()) if cos is not None else None, per_pair)
