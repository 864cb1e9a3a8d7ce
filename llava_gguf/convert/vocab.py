"""The LLM's tokenizer in GGUF, the way llama.cpp's convert_hf_to_gguf.py writes it for LLaMA-family
models: SentencePiece `tokenizer.model` when present (scores, token types, added tokens, `[PADn]`
rows up to the embedding's vocab size), else the Hugging Face `tokenizer.json`: a byte-fallback BPE through
gguf-py's LlamaHfVocab, a byte-level BPE (LLaMA-3) as llama.cpp's `gpt2` tokenizer with its merges and the
pre-tokenizer named by what tokenizer.json's split regex is; special token ids, add_bos/eos and the chat
template through gguf.SpecialVocab."""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import gguf

from llava_gguf.errors import LlavaGgufError, warn
from llava_gguf.convert.template import default_template, template_text, templates_for_llama_cpp


class TokenType(IntEnum):  # llama.cpp's llama_token_type
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class Vocab:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special: added tokens some models forget to mark special
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _sentencepiece_vocab(src: Path, vocab_size: int | None) -> Vocab:
    from sentencepiece import SentencePieceProcessor  # optional: only SentencePiece vocabularies need it

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(src / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise LlavaGgufError(f"{src / 'tokenizer.model'} is not a SentencePiece model ({e})",
                             "download the tokenizer again") from None
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [int(TokenType.UNUSED)] * n
    for i in range(min(sp.vocab_size(), n)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = TokenType.BYTE
        else:
            types[i] = TokenType.NORMAL

    added_json = src / "added_tokens.json"
    if added_json.is_file():
        for text, i in json.loads(added_json.read_text(encoding="utf-8")).items():
            if i < n:
                tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, TokenType.USER_DEFINED

    decoder: dict[int, dict] = {}
    tok_cfg = src / "tokenizer_config.json"
    if tok_cfg.is_file():
        decoder = {int(k): v for k, v in json.loads(tok_cfg.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items()}
    # transformers 5 no longer writes added_tokens_decoder; its tokenizer.json still lists them.
    # (llama.cpp's converter misses these, leaving e.g. <image> as [PADn].)
    tok_json = src / "tokenizer.json"
    if tok_json.is_file():
        for entry in json.loads(tok_json.read_text(encoding="utf-8")).get("added_tokens", []):
            decoder.setdefault(int(entry["id"]), entry)
    for i, data in sorted(decoder.items()):
        if i >= n:
            continue
        text: str = data["content"]
        if data.get("special") or _looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = TokenType.USER_DEFINED
        scores[i] = -1000.0
        tokens[i] = text.encode("utf-8")
    return Vocab("llama", "default", tokens, scores, [int(t) for t in types])


def _hf_vocab(src: Path) -> Vocab:
    try:
        hf = gguf.LlamaHfVocab(src)
    except (FileNotFoundError, TypeError, KeyError) as e:
        raise LlavaGgufError(f"no usable LLaMA tokenizer in {src} ({e})",
                             "expected tokenizer.model or a byte-fallback BPE tokenizer.json") from None
    tokens, scores, types = [], [], []
    for text, score, toktype in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(toktype))
    return Vocab("llama", "default", tokens, scores, types)


# tokenizer.json split regexes -> llama.cpp's tokenizer.ggml.pre (llama-vocab.cpp implements each)
BPE_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",  # LLaMA-3
}


def read_vocab(src: Path, vocab_size: int | None) -> Vocab:
    if (src / "tokenizer.model").is_file():
        return _sentencepiece_vocab(src, vocab_size)
    if (src / "tokenizer.json").is_file():
        tj = _load_tokenizer_json(src)
        model = tj.get("model") or {}
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return _gpt2_vocab(src, tj, vocab_size)
        return _hf_vocab(src)
    raise LlavaGgufError(f"{src} has no tokenizer (tokenizer.model or tokenizer.json)", "the download is incomplete")


def _load_tokenizer_json(src: Path) -> dict:
    try:
        data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LlavaGgufError(f"{src / 'tokenizer.json'} is not valid JSON", "download the tokenizer again") from None
    if not isinstance(data, dict):
        raise LlavaGgufError(f"{src / 'tokenizer.json'} does not hold a tokenizer", "download the tokenizer again")
    return data


def _split_regexes(pre: dict | None) -> list[str]:
    if not isinstance(pre, dict):
        return []
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return [p.get("pattern", {}).get("Regex") for p in items
            if isinstance(p, dict) and p.get("type") == "Split" and isinstance(p.get("pattern"), dict)]


def _gpt2_vocab(src: Path, tj: dict, vocab_size: int | None) -> Vocab:
    """A byte-level BPE (no byte fallback: LLaMA-3) as llama.cpp's `gpt2` tokenizer, laid out as
    convert_hf_to_gguf.py's get_vocab_base does: ids without a token become [PADn] (UNUSED), added tokens
    CONTROL when special, else USER_DEFINED. The pre-tokenizer is named by its split regex."""
    pre = next((BPE_PRE[r] for r in _split_regexes(tj.get("pre_tokenizer")) if r in BPE_PRE), None)
    if pre is None:
        raise LlavaGgufError(f"{src / 'tokenizer.json'}: a byte-level BPE tokenizer whose pre-tokenizer llama.cpp "
                             "is not known here to implement", "supported: LLaMA-3's (llama-bpe)")
    vocab = tj["model"].get("vocab") or {}
    added = [e for e in tj.get("added_tokens", []) if isinstance(e, dict) and "id" in e]
    n = vocab_size or (max([*vocab.values(), *(e["id"] for e in added)], default=-1) + 1)
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    for text, i in vocab.items():
        if 0 <= i < n:
            tokens[i], types[i] = text.encode("utf-8"), int(TokenType.NORMAL)
    for e in added:
        i = int(e["id"])
        if 0 <= i < n:
            tokens[i] = e["content"].encode("utf-8")
            types[i] = int(TokenType.CONTROL if e.get("special") else TokenType.USER_DEFINED)
    return Vocab("gpt2", pre, tokens, [0.0] * n, types)


def add_vocab(writer: gguf.GGUFWriter, src: Path, vocab: Vocab, default_chat_template: str | None) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.model != "gpt2":  # convert_hf_to_gguf.py writes no scores for BPE
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    with _without_template_processing_warnings():
        special = gguf.SpecialVocab(src, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if special.chat_template is None and default_chat_template is not None:
        special.chat_template = default_chat_template
    special.chat_template = templates_for_llama_cpp(special.chat_template, default_chat_template)
    _check_encodable(vocab, default_template(special.chat_template))
    special.add_to_gguf(writer, quiet=True)


def _drop_template_processing(record: logging.LogRecord) -> bool:
    return "TemplateProcessing" not in record.getMessage()


@contextlib.contextmanager
def _without_template_processing_warnings() -> Iterator[None]:
    """gguf-py's SpecialVocab guesses add_bos/add_sep from tokenizer.json's TemplateProcessing and logs a
    warning (through the `gguf.vocab` logger; with no logging configured Python prints it on stderr) for
    every pair template it does not recognise, e.g. "Unknown separator token '<s>' in
    TemplateProcessing<pair>" for LLaMA's `<s> A <s> B`. The pair template is never used (llama.cpp
    tokenizes single sequences), so those warnings say nothing about the file written: they are dropped
    for this call only, by a filter on that one logger; every other record, and the caller's logging
    configuration, are left as they are."""
    logger = logging.getLogger(gguf.vocab.__name__)
    logger.addFilter(_drop_template_processing)
    try:
        yield
    finally:
        logger.removeFilter(_drop_template_processing)


def _describe(ch: str) -> str:
    return {"\n": "a newline", " ": "a space", "\t": "a tab"}.get(ch, repr(ch))


def unencodable(vocab: Vocab, text: str) -> list[str]:
    """The characters of `text` that llama.cpp's SentencePiece tokenizer cannot encode with `vocab`: no
    piece for the character (a space is looked up as "▁") and no byte-fallback pieces (<0x0A>, ...) for
    its UTF-8 bytes. llama.cpp then fails the whole tokenization (libmtmd: code 2). Special and
    user-defined tokens (`<image>`, `<s>`, ...) are matched whole before the text is split, so their
    characters do not count. A byte-level BPE (`gpt2`) has a token for every byte: nothing is missing."""
    if vocab.model != "llama":
        return []
    for tok, kind in sorted(zip(vocab.tokens, vocab.types), key=lambda tk: -len(tk[0])):
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED) and tok:
            text = text.replace(tok.decode("utf-8", errors="replace"), "")
    pieces = set(vocab.tokens)
    missing = []
    for ch in dict.fromkeys(text.replace("<image>", "")):
        key = "\u2581" if ch == " " else ch
        if key.encode() in pieces or all(f"<0x{b:02X}>".encode() in pieces for b in key.encode()):
            continue
        missing.append(ch)
    return missing


def _check_encodable(vocab: Vocab, chat_template: str | None) -> None:
    """Warn when prompts will not tokenize: a SentencePiece vocabulary without byte fallback that lacks a
    character the chat template writes fails every prompt; one that lacks only a newline fails every
    prompt with a line break in it."""
    written = unencodable(vocab, template_text(chat_template)) if chat_template else []
    newline = [] if "\n" in written else unencodable(vocab, "\n")
    if written:
        names = ", ".join(_describe(c) for c in written)
        warn(f"the tokenizer cannot encode {names}, which the chat template writes (no piece for "
             f"{'it' if len(written) == 1 else 'them'} and no byte fallback): every chat prompt will fail to tokenize",
             "convert a checkpoint whose tokenizer has byte-fallback pieces <0x00>..<0xFF>")
    elif newline:
        warn("the tokenizer cannot encode a newline (no piece for it and no byte fallback): "
             "every prompt with a line break will fail to tokenize",
             "convert a checkpoint whose tokenizer has byte-fallback pieces <0x00>..<0xFF>")
