"""The one LLM <-> mmproj pairing policy, for a directory that `convert` (or `quantize`) wrote.

One rule, three askers: an mmproj goes with an LLM when its name is the LLM's with `mmproj-` before it
(`mmproj-x-F16.gguf` for `x-Q4_K_M.gguf`, type suffixes aside); among the candidates the named ones come
first, then the unquantized, the most precise (F32, F16, BF16; the runtime: F16 first), then by name. The runtime (`locate_pair`)
takes the quantized LLM when there is exactly one beside unquantized ones; quality and imatrix
(`find_base_mmproj`) take the best-ranked mmproj as the unquantized base; quantize
(`quantize_sources`) takes the one unquantized LLM and an mmproj of its width."""
from __future__ import annotations

from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.classify import FLOAT_ORDER, GGUFKind, classify, identify, strip_type_suffix


def named_for(mmproj: Path, llm: Path) -> bool:
    """Whether `mmproj`'s name says it goes with `llm` (`mmproj-<llm stem>`, type suffixes aside)."""
    return strip_type_suffix(mmproj.stem) == f"mmproj-{strip_type_suffix(llm.stem)}"


# The runtime runs the F16 mmproj `convert` writes by default when an F32 one is also there: half the memory
# and faster encoding, image features within cosine 0.99999 of F32. Measurements (quality, imatrix) take
# the most precise base.
RUNTIME_ORDER = ("F16", "F32", "BF16")


def ranked(mmprojs: list[GGUFKind], llm: Path, order: tuple[str, ...] = FLOAT_ORDER) -> list[GGUFKind]:
    """The mmproj candidates for `llm`, best first: named for it, unquantized, by `order` of float types
    (most precise first by default), by name."""
    return sorted(mmprojs, key=lambda k: (not named_for(k.path, llm), k.quantized,
                                          order.index(k.type) if k.type in order else len(order), k.path.name))


def scan(directory: Path, *, strict: bool = False) -> list[GGUFKind]:
    """Every GGUF in `directory` that reads as a language model or an mmproj, by name (each file walked
    once); `strict`: only what `classify` accepts (quantize's and quality's sources)."""
    kinds = []
    for p in sorted(directory.glob("*.gguf")):
        if not p.is_file():
            continue
        try:
            k = classify(p) if strict else identify(p)
        except LlavaGgufError:
            continue  # an imatrix, a damaged file or anything else beside the pair is not a candidate
        if k.kind in ("llm", "mmproj"):
            kinds.append(k)
    return kinds


# How a caller names its choice when a directory holds several candidates: the CLI's options by default;
# the Python API passes its keyword arguments (a Python caller has no --model to give).
CLI_CHOICES = ("--model", "--mmproj")
PYTHON_CHOICES = ("the llm= argument", "the mmproj= argument")


def locate_pair(path: Path | str, llm: Path | str | None = None, mmproj: Path | str | None = None, *,
                choices: tuple[str, str] = CLI_CHOICES) -> tuple[Path, Path]:
    """(LLM, mmproj) for a directory, or for an LLM file plus an explicit mmproj. `choices`: how the caller
    chooses an LLM and an mmproj, named in the hint when there are several (the CLI's options by default)."""
    path = Path(path)
    if path.is_file():
        if mmproj is None:
            return locate_pair(path.parent, llm=path, choices=choices)
        return path, Path(mmproj)
    if not path.is_dir():
        raise LlavaGgufError(f"{path} does not exist", "give the directory that `llava-gguf convert` wrote")
    kinds = {k.path: k for k in scan(path)}
    mmprojs = [Path(mmproj)] if mmproj else [p for p, k in kinds.items() if k.kind == "mmproj"]
    llms = [Path(llm)] if llm else [p for p, k in kinds.items() if p not in mmprojs and k.kind == "llm"]
    if not llms:
        raise LlavaGgufError(f"no language-model .gguf in {path}", "run `llava-gguf convert` first")
    if not mmprojs:
        raise LlavaGgufError(f"no mmproj .gguf in {path}", "run `llava-gguf convert` first")
    if len(llms) > 1:
        quantized = [p for p in llms if kinds[p].quantized]
        if len(quantized) == 1:
            llms = quantized
        else:
            raise LlavaGgufError(f"several language models in {path}: {', '.join(p.name for p in llms)}",
                                 f"choose one with {choices[0]}")
    if len(mmprojs) > 1:
        same = [kinds[p] for p in mmprojs if named_for(p, llms[0])]
        if not same:
            raise LlavaGgufError(f"several mmproj files in {path}: {', '.join(p.name for p in mmprojs)}",
                                 f"choose one with {choices[1]}")
        mmprojs = [ranked(same, llms[0], RUNTIME_ORDER)[0].path]
    return llms[0], mmprojs[0]


def find_base_mmproj(llm: Path, option: str = "--base-mmproj") -> Path:
    """The unquantized mmproj beside an LLM (the one named for it first, F32 before F16)."""
    llm = Path(llm)
    found = [k for k in scan(llm.parent, strict=True) if k.kind == "mmproj"]
    if not found:
        raise LlavaGgufError(f"no mmproj .gguf beside {llm}", f"name it with {option}")
    return ranked(found, llm)[0].path


def quantize_sources(src: Path) -> tuple[GGUFKind, GGUFKind]:
    """(the unquantized LLM, its mmproj) in a directory `convert` wrote: what `quantize DIR` reads."""
    if not src.is_dir():
        raise LlavaGgufError(f"{src} does not exist", "give a .gguf file or the directory `llava-gguf convert` wrote")
    kinds = scan(src, strict=True)
    llms = [k for k in kinds if k.kind == "llm" and not k.quantized]
    if not llms:
        quantized = [k.path.name for k in kinds if k.kind == "llm"]
        raise LlavaGgufError(f"no unquantized language model in {src}" + (f" (only {', '.join(quantized)})" if quantized else ""),
                             "run `llava-gguf convert` first, or give the .gguf file itself")
    if len(llms) > 1:
        raise LlavaGgufError(f"several unquantized language models in {src}: {', '.join(k.path.name for k in llms)}",
                             "give the .gguf file to quantize instead of the directory")
    llm = llms[0]
    width = llm.info.n_embd
    pairs = [k for k in kinds if k.kind == "mmproj" and k.info.n_embd == width]
    if not pairs:
        raise LlavaGgufError(f"no mmproj in {src} matches {llm.path.name} (embedding width {width})",
                             "run `llava-gguf convert` first")
    named = [k for k in pairs if named_for(k.path, llm.path)]
    candidates = ranked(named or pairs, llm.path)
    if not named and len({strip_type_suffix(k.path.stem) for k in candidates}) > 1:
        raise LlavaGgufError(f"several mmproj files in {src} could go with {llm.path.name}: "
                             f"{', '.join(k.path.name for k in candidates)}", "quantize the files one by one")
    return llm, candidates[0]
