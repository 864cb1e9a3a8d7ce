"""LLaMA-3 based LLaVA-NeXT (llama3-llava-next-8b): a byte-level BPE tokenizer (no byte fallback) and the
LLaMA-3 chat template. The GGUF must tokenize as transformers does, carry the template, and chat must
render it and stop at <|eot_id|>; answers equal transformers'."""
from __future__ import annotations

import gguf
import pytest

from llava_gguf import LLaVA
from llava_gguf.runtime.prompt import Message
from devkit.tokenizer_files import LLAMA3_TEMPLATE
from support import crop_image, hf_next, hf_rows

N_GREEDY = 8
from support import hf_greedy, ours_greedy

TEXTS = ["Hello world! What's in the image? 123456", " ünïcödé 日本語 😀\n\n  x  y", "don't 12345678 a\tb",
         "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", "<image>\nDescribe the image."]


@pytest.fixture(scope="module")
def llama3(tiny, converted):
    ckpt = tiny(tokenizer="llama3", anyres=True)
    return ckpt, converted(ckpt, "f32")


def test_llama3_tokenizer_and_template_in_the_gguf(llama3):
    from transformers import AutoTokenizer

    from llava_gguf.native import library as native

    ckpt, (llm, _) = llama3
    r = gguf.GGUFReader(llm)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    assert r.fields["tokenizer.chat_template"].contents() == LLAMA3_TEMPLATE
    assert len(r.fields["tokenizer.ggml.merges"].data) > 100
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == tok.convert_tokens_to_ids("<|eot_id|>")
    native.configure()
    vocab_only = native.llama_cpp().Llama(model_path=str(llm), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert vocab_only.tokenize(text.encode(), add_bos=False, special=True) == \
            tok.encode(text, add_special_tokens=False), text


def test_llama3_chat_renders_the_template_and_stops_at_eot(llama3):
    ckpt, (llm, mmproj) = llama3
    with LLaVA(llm, mmproj, n_threads=2) as m:
        text = m.render([Message("user", "What is in the image?", n_images=1)])
        assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is in the image?<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n")
        eot = m.llm.tokenize(b"<|eot_id|>", add_bos=False, special=True)
        assert len(eot) == 1 and m.is_end_of_generation(eot[0])
        s = m.chat()
        answer = s.ask("What is in the image?", [crop_image(200, 112)], temperature=0.0, max_tokens=40)
        assert "<|eot_id|>" not in answer and "<|start_header_id|>" not in answer


def test_llama3_answers_match_transformers(llama3):
    from transformers import AutoTokenizer

    ckpt, (llm, mmproj) = llama3
    model, proc = hf_next(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    before = [tok.bos_token_id] + tok.encode("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=False)
    after = tok.encode("\nWhat is in the image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                       add_special_tokens=False)
    img = crop_image(300, 170)
    ref, inp = hf_rows(model, proc, img)
    ids = before + [model.config.image_token_id] * ref.shape[0] + after
    _, tokens_hf = hf_greedy(model, ids, N_GREEDY, pixel_values=inp["pixel_values"], image_sizes=inp["image_sizes"])
    with LLaVA(llm, mmproj, n_threads=2) as m:
        _, tokens = ours_greedy(m, img, before, after, N_GREEDY)
    assert tokens == tokens_hf


def test_unknown_bpe_pre_tokenizer(llama3, tmp_path):
    import json
    import shutil

    from support import run_cli
    from support import assert_clean_failure

    ckpt, _ = llama3
    bad = shutil.copytree(ckpt, tmp_path / "bad")
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(bad), "-o", str(out)), out, "pre-tokenizer", "llama-bpe")


def test_yi_chatml(tiny, converted):
    """LLaVA-1.6-34B's Nous-Hermes-2-Yi text model: LLaMA architecture, SentencePiece, ChatML template with
    <|im_end|> ending a turn."""
    from transformers import AutoTokenizer

    from devkit.tokenizer_files import CHATML_TEMPLATE

    ckpt = tiny(tokenizer="chatml", anyres=True)
    llm, mmproj = converted(ckpt, "f16")
    r = gguf.GGUFReader(llm)
    assert r.fields["tokenizer.chat_template"].contents() == CHATML_TEMPLATE
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>")
    with LLaVA(llm, mmproj, n_threads=2) as m:
        text = m.render([Message("user", "What is in the image?", n_images=1)])
        assert text.endswith("<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n")
        for probe in ("<|im_start|>user\nhi<|im_end|>\n", "What is in the image? 123"):
            assert m.llm.tokenize(probe.encode(), add_bos=False, special=True) == \
                tok.encode(probe, add_special_tokens=False), probe
        end = m.llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
        assert len(end) == 1 and m.is_end_of_generation(end[0])
        answer = m.chat().ask("What is in the image?", [crop_image(112, 200)], temperature=0.0, max_tokens=30)
        assert "<|im_end|>" not in answer and "<|im_start|>" not in answer
