"""Tokenizer files of tiny checkpoints: a SentencePiece BPE written as a hub LLaMA/LLaVA-1.5 tokenizer
(tokenizer.model + tokenizer.json + tokenizer_config.json with added_tokens_decoder), optionally with
ChatML's tokens and template, or a LLaMA-3-style byte-level BPE; with the processor's config and the chat
template, as a hub download carries them. Used by tiny.py, training and the convert benchmark."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

from llava_gguf.families.clip import CLIP_MEAN, CLIP_STD
from llava_gguf.families.llava15 import LLAVA_HF_TEMPLATE


def corpus(seed: int) -> list[str]:
    """3000 lines of random words, the chat template's words and odd characters (digits, accents, CJK, an
    emoji, tabs, newlines): what the tiny tokenizers are trained on, reproducibly from `seed`."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9))) for _ in range(4000)]
    words += ["USER", "ASSISTANT", "What", "is", "in", "the", "image", "A", "cat", "red", "circle", "Describe"]
    tails = [".", "?", "!", ",", " 123", " 4.5", " ünïcödé", " 日本語", " 😀", " \t", "\n", "  "]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 16))) + rng.choice(tails) for _ in range(3000)]


def _train_tokenizer(lines: list[str], sp_vocab: int) -> bytes:
    import sentencepiece as spm  # heavy, and only the SentencePiece tokenizers need it

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=sp_vocab, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, num_threads=1,
        minloglevel=2)
    return buf.getvalue()


def write_preprocessor(out: Path, image_size: int) -> None:
    """llava-hf's CLIPImageProcessor config at the tower's resolution."""
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD), "do_convert_rgb": True, "resample": 3}, indent=2))


# LLaMA-3's pre-tokenizer split (tokenizer.json of meta-llama/Meta-Llama-3-8B and llama3-llava-next-8b)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# llava-hf/llama3-llava-next-8b-hf's template (images first, LLaMA-3 headers)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def write_llama3_tokenizer(out: Path, corpus: list[str], *, n_vocab: int, image_size: int) -> None:
    """A LLaMA-3-style tokenizer: byte-level BPE (no byte fallback) behind LLaMA-3's split regex, its
    header/eot special tokens, `<image>` at id `n_vocab` and `<pad>` after it, LLaMA-3's chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(byte_fallback=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    base = n_vocab - len(LLAMA3_SPECIALS)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=base, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    k = 0
    while tok.get_vocab_size() < base:  # LLaMA-3 pads its vocabulary with reserved special tokens too
        tok.add_special_tokens([AddedToken(f"<|reserved_special_token_{k}|>", special=True, normalized=False)])
        k += 1
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                            AddedToken("<pad>", special=True, normalized=False)])
    assert tok.token_to_id("<image>") == n_vocab and tok.token_to_id("<pad>") == n_vocab + 1
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<pad>", "model_max_length": 8192, "clean_up_tokenization_spaces": False}, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE}))
    write_preprocessor(out, image_size)


# llava-hf/llava-v1.6-34b-hf's template (Nous-Hermes-2-Yi-34B: ChatML)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tokenizer(out: Path, corpus: list[str], *, sp_vocab: int, image_size: int, chatml: bool = False) -> int:
    """A SentencePiece BPE tokenizer trained on `corpus` (at most `sp_vocab` pieces, byte fallback), with
    `<image>` and `<pad>` added after it, written as a hub LLaVA-1.5 checkpoint's tokenizer and processor
    files (with the Vicuna chat template); returns the number of SentencePiece pieces."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model = _train_tokenizer(corpus, sp_vocab)
    n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    (out / "tokenizer.model").write_bytes(model)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [n, n + 1]
    extra = ["<|im_start|>", "<|im_end|>"] if chatml else []  # ChatML (Yi-34B): <|im_end|> ends a turn
    if extra:
        tok.add_tokens(extra, special_tokens=True)
        tok.eos_token = "<|im_end|>"
    tok.save_pretrained(out)
    # transformers 5 no longer writes added_tokens_decoder; hub checkpoints (saved by 4.x) have it.
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for i, t in ((0, "<unk>"), (1, "<s>"), (2, "</s>"), (n, "<image>"), (n + 1, "<pad>"),
                     *((n + 2 + k, t) for k, t in enumerate(extra)))}
    cfg.update({"add_bos_token": True, "add_eos_token": False, "legacy": False, "padding_side": "left"})
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    # Hub LLaMA tokenizers (llava-hf's included) were converted by transformers 4.x with the legacy
    # SentencePiece normalizer: "▁" prepended to every segment between special tokens, spaces kept.
    # transformers 5 writes a Metaspace pre-tokenizer instead, which folds a leading space into the
    # prefix; write what the hub files say.
    tj = json.loads((out / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                             {"type": "Replace", "pattern": {"String": " "},
                                                              "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    # llava-hf's template as the hub files carry it (convert makes it recognisable to llama.cpp's tools)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE if chatml else LLAVA_HF_TEMPLATE}))
    write_preprocessor(out, image_size)
    return n
