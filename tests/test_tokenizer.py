"""llama.cpp's tokenization of the converted vocab equals the Hugging Face tokenizer's."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

SAMPLES = [
    "Hello world",
    " leading space",
    "two  spaces   and\ttabs\nnewline",
    "digits 0123456789 and 3.14159, 2+2=4",
    "ünïcödé façade naïve — 日本語 テキスト 😀🎉",
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "<image><image> twice",
    "text</s>after eos <s> bos",
    "trailing space ",
    "",
    "\n\n",
    "MiXeD CaSe WORDS and punctuation!?;:'\"()[]{}",
]


@pytest.fixture(scope="module")
def pair(tiny, converted):
    from llava_gguf.native import library as native

    ckpt = tiny()
    llm, _ = converted(ckpt, "f16")
    lc = native.llama_cpp()
    model = lc.Llama(model_path=str(llm), vocab_only=True, verbose=False)
    yield AutoTokenizer.from_pretrained(ckpt), model
    model.close()


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenization_matches(pair, text):
    hf, llama = pair
    expected = hf(text)["input_ids"]
    got = llama.tokenize(text.encode(), add_bos=True, special=True)
    assert got == expected


def test_image_token_is_one_special_token(pair, tiny):
    hf, llama = pair
    image_id = hf.convert_tokens_to_ids("<image>")
    assert llama.tokenize(b"<image>", add_bos=False, special=True) == [image_id]
    assert llama.detokenize([image_id], special=True) == b"<image>"


def test_vocab_padded_to_embedding_rows(tiny, converted):
    import gguf

    ckpt = tiny()
    llm, _ = converted(ckpt, "f16")
    r = gguf.GGUFReader(llm)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    assert len(tokens) == embd.shape[1] == 1024  # ggml order: (n_embd, n_vocab)
    assert tokens[1000] == "<image>" and tokens[1001] == "<pad>" and tokens[1023] == "[PAD1023]"
