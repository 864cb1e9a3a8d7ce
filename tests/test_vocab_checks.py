"""Convert warns when the tokenizer cannot encode what prompts need: a SentencePiece vocabulary trained
without byte fallback and without a newline piece cannot tokenize "<image>\\n" of the Vicuna template, so
every chat with the converted model fails."""
from __future__ import annotations

import io
import shutil

import pytest

from support import run_cli
from devkit.tiny import sample_image
from devkit.tokenizer_files import corpus as _corpus


def _train_without_byte_fallback(corpus: list[str], sp_vocab: int) -> bytes:
    """tiny.py's tokenizer training, without byte fallback, on text with no newline in it."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line.replace("\n", " ") for line in corpus]), model_writer=buf,
        vocab_size=sp_vocab, model_type="bpe", byte_fallback=False, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def no_newline(tiny, tmp_path_factory):
    """The default tiny checkpoint with its tokenizer.model replaced by one that cannot encode a newline."""
    ckpt = shutil.copytree(tiny(), tmp_path_factory.mktemp("vocab") / "no-newline")
    corpus = _corpus(0) + ["USER: What is it? ASSISTANT: A cat."] * 20  # every character but the newline
    (ckpt / "tokenizer.model").write_bytes(_train_without_byte_fallback(corpus, 1000))
    return ckpt


def test_unencodable_characters(tiny, no_newline):
    from llava_gguf.families.llava15 import VICUNA_TEMPLATE
    from llava_gguf.convert.template import template_text
    from llava_gguf.convert.vocab import read_vocab, unencodable

    text = template_text(VICUNA_TEMPLATE)
    assert "\n" in text and "USER: " in text
    vocab = read_vocab(no_newline, 1024)
    assert not any(t.startswith(b"<0x") for t in vocab.tokens)  # no byte pieces
    assert unencodable(vocab, text) == ["\n"]
    assert unencodable(vocab, "USER: <image>\nhi") == ["\n"]  # <image> is one special token, not characters
    assert unencodable(vocab, "a\tb\U0001F9A9") == ["\U0001F9A9"]  # a character the corpus never had
    assert unencodable(read_vocab(tiny(), 1024), text + "\u65e5\U0001F600") == []  # byte fallback: everything


def test_convert_warns_that_prompts_will_fail(no_newline, tmp_path):
    out = tmp_path / "out"
    p = run_cli("convert", str(no_newline), "-o", str(out))
    assert p.returncode == 0, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:") and "tokenizer" in ln]
    assert len(warnings) == 1, p.stderr
    assert "cannot encode a newline" in warnings[0] and "every chat prompt will fail" in warnings[0]
    # and so it does: the warning is not a false alarm
    img = tmp_path / "img.png"
    sample_image(112).save(img)
    chat = run_cli("chat", str(out), "--image", str(img), "--prompt", "hi", "--max-tokens", "2")
    assert chat.returncode == 1 and chat.stderr.startswith("error:"), chat.stderr


def test_no_warning_for_a_byte_fallback_vocabulary(tiny, tmp_path):
    p = run_cli("convert", str(tiny()), "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert "tokenizer cannot encode" not in p.stderr and "chat template" not in p.stderr
