"""families/: the registry resolves every family, imports a family module only when asked, and the records
agree with it; the default chat template; the Vicuna prompt layout the hand-built prompts share."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llava_gguf import families
from llava_gguf.families import REGISTRY, Family, default_chat_template, family
from llava_gguf.families.hparams import TEXT_MODELS
from llava_gguf.families.llava15 import (VICUNA_TEMPLATE, vicuna_prompt_ids, vicuna_prompt_segments,
                                         vicuna_prompt_text)
from llava_gguf.gguf.chat_template import compile_template


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_every_registered_family_resolves_to_its_record(entry):
    found = family(entry.name)
    assert isinstance(found, Family) and found.name == entry.name
    assert set(found.text_models) <= set(TEXT_MODELS)  # no family accepts a text model convert cannot write
    assert found.layouts and found.projector and found.default_chat_template


def test_names_and_modules_are_unique_and_unknown_names_are_refused():
    assert len({e.name for e in REGISTRY}) == len({e.module for e in REGISTRY}) == len(REGISTRY)
    assert [f.name for f in families.families()] == [e.name for e in REGISTRY]
    with pytest.raises(KeyError):
        family("llava-0.9")


LAZY = """
import json, sys
def loaded():
    return sorted(m for m in sys.modules if m.startswith("llava_gguf.families."))
import llava_gguf.families
first = loaded()
llava_gguf.families.find_family({"architectures": ["LlavaNextForConditionalGeneration"]})
print(json.dumps([first, loaded()]))
"""


def test_the_registry_is_lazy():
    modules = {f"llava_gguf.families.{e.module}" for e in REGISTRY}
    p = subprocess.run([sys.executable, "-c", LAZY], capture_output=True, text=True, timeout=60, check=True)
    first, after = json.loads(p.stdout)
    assert not set(first) & modules
    # llava16 builds on llava15's tables, and nothing else is imported
    assert set(after) & modules == {"llava_gguf.families.llava16", "llava_gguf.families.llava15"}


def test_default_chat_template_is_the_default_familys():
    assert default_chat_template() == family(families.DEFAULT_FAMILY).default_chat_template == VICUNA_TEMPLATE


def test_transformers_class_names_what_loads_the_checkpoint_as_saved():
    assert family("llava-1.5").transformers_class == family("bakllava").transformers_class \
        == "LlavaForConditionalGeneration"
    assert family("llava-1.6").transformers_class == "LlavaNextForConditionalGeneration"
    assert family("llava-original").transformers_class is None  # LLaVA's own code, not transformers'
    assert family("llava-original-mistral").transformers_class is None


def test_the_vicuna_prompt_is_what_the_template_renders():
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = compile_template(VICUNA_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert rendered == vicuna_prompt_text("What is it?") == "USER: <image>\nWhat is it? ASSISTANT:"


def test_vicuna_prompt_ids_are_two_segments_around_the_image_rows():
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]

    before, after = vicuna_prompt_segments(encode, 1, "Q")
    assert before == [1] + encode("USER: ") and after == encode("\nQ ASSISTANT:")
    assert vicuna_prompt_segments(encode, None, "Q")[0] == encode("USER: ")  # a tokenizer without BOS
    assert vicuna_prompt_ids(encode, 1, "Q", image_id=-5, n_image=3) == before + [-5] * 3 + after
