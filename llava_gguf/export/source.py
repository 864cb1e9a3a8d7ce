"""What an export reads from the directory `convert`/`quantize` wrote: the LLM + mmproj pair (chosen by the
runtime's one pairing rule, `--model`/`--mmproj` as `chat` takes them), both checked to load as a pair,
the chat templates the runtime prompts the model with, the image's context need and the model's names."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llava_gguf.errors import LlavaGgufError
from llava_gguf.export.chat_formats import ChatFormat, detect_format
from llava_gguf.gguf.classify import classify, strip_type_suffix
from llava_gguf.gguf.header import GGUFHeader, read_header
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.loading import ModelFiles, check_files


@dataclass(frozen=True)
class ExportSource:
    llm: Path
    mmproj: Path
    files: ModelFiles  # the pair as the runtime checked it (widths, template, image geometry)
    templates: tuple[str, ...]  # the model's chat template, then its family's default, as the runtime tries them
    bos: str  # the BOS and EOS tokens' text, as the chat template sees them
    eos: str
    name: str  # general.name of the LLM (else the mmproj's), else the LLM's file name without its type
    file_type: str  # the LLM's type in llama.cpp's spelling (F16, Q4_K_M, ...; "?" when not recorded)
    organization: str | None  # general.organization, when a file records it

    def chat_format(self) -> ChatFormat:
        """The format whose prompts the runtime's rendering equals (a one-line error when none does)."""
        return detect_format(list(self.templates), self.bos, self.eos)

    @property
    def image_tokens(self) -> int:
        """The most context positions one image takes (LLaVA-1.6: its largest anyres grid)."""
        return self.files.image_tokens


def special_texts(header: GGUFHeader, *keys: str) -> tuple[str, ...]:
    """The text of the special token whose id each key holds ("" when none), as the chat template sees it
    (read from the header: an export loads no model)."""
    if "tokenizer.ggml.tokens" not in header:
        return ("",) * len(keys)
    starts, lengths = header.string_spans("tokenizer.ggml.tokens")  # once for every key: a pass over the vocab
    texts = []
    for key in keys:
        token_id = header.value(key)
        ok = isinstance(token_id, int) and 0 <= token_id < len(starts)
        start, n = (int(starts[token_id]), int(lengths[token_id])) if ok else (0, 0)
        texts.append(header.raw[start:start + n].decode("utf-8", "replace"))
    return tuple(texts)


def _text_value(headers: tuple[GGUFHeader, ...], key: str) -> str | None:
    for h in headers:
        value = h.value(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def load_source(path: Path, model: Path | None = None, mmproj: Path | None = None) -> ExportSource:
    """The pair in `path` (a directory, or an LLM file beside its mmproj), checked and described; one-line
    errors for a directory without a pair or with several candidates."""
    path = Path(path)
    if path.is_dir() and model is None and mmproj is None and not any(path.glob("*.gguf")):
        raise LlavaGgufError(f"no .gguf files in {path}", "give the directory that `llava-gguf convert` wrote")
    llm, proj = locate_pair(path, model, mmproj)
    files = check_files(Path(llm), Path(proj))
    kind = classify(files.model_path)  # its type, and its header already read
    headers = (kind.header, read_header(files.mmproj_path))
    templates = tuple(t for t in (files.llm_info.chat_template, files.family_template) if t)
    name = _text_value(headers, "general.name") or strip_type_suffix(files.model_path.stem)
    bos, eos = special_texts(kind.header, "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    return ExportSource(files.model_path, files.mmproj_path, files, templates, bos, eos, name, kind.type,
                        _text_value(headers, "general.organization"))


def slug(text: str, *, lower: bool) -> str:
    """`text` as one safe path or model-name component: letters, digits, `.`, `_` and `-`, starting with a
    letter or digit; empty when nothing of it is usable."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip())
    s = re.sub(r"^[^A-Za-z0-9]+", "", s).rstrip("-.")
    return (s.lower() if lower else s)[:80].rstrip("-.")
