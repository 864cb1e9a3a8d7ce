"""convert/: small policies as pure functions — output names, Mistral's sliding window, the supported text
models, and which chat template(s) a conversion writes (named templates included)."""
from __future__ import annotations

import numpy as np
import pytest

from llava_gguf.convert import output_names
from llava_gguf.convert.llm import permute_rotary, sliding_window, window_shortens_context
from llava_gguf.convert.template import default_template, templates_for_llama_cpp
from llava_gguf.families.llava15 import LLAVA_HF_TEMPLATE, VICUNA_TEMPLATE

CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_output_names_spell_the_types_as_llama_cpp_does():
    assert output_names("tiny", "f16", "q8_0") == ("tiny-F16.gguf", "mmproj-tiny-Q8_0.gguf")


@pytest.mark.parametrize("hp, window, shortens", [
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, 4096, True),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096}, 4096, False),
    ({"model_type": "mistral", "sliding_window": None}, None, False),
    ({"model_type": "llama", "sliding_window": 16, "max_position_embeddings": 4096}, None, False),  # ignored
    ({"sliding_window": 16}, None, False),  # no model_type: LLaMA
])
def test_only_a_mistral_window_counts(hp, window, shortens):
    assert sliding_window(hp) == window and window_shortens_context(hp) is shortens


def test_rotary_permute_is_llama_cpps_interleave():
    w = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # 2 heads of 4 rows: halves [0 1 | 2 3]
    out = permute_rotary(w, 2, None)
    assert out[:4, 0].tolist() == [w[0, 0], w[2, 0], w[1, 0], w[3, 0]]


def test_the_default_of_named_templates_is_the_one_named_default():
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]
    assert default_template(named) == "y" and default_template("z") == "z" and default_template(None) is None
    assert default_template([{"name": "tool_use", "template": "x"}]) is None


def test_templates_are_prepared_each_keeping_its_name():
    assert templates_for_llama_cpp(None, VICUNA_TEMPLATE) is None
    named = [{"name": "default", "template": LLAVA_HF_TEMPLATE}, {"name": "tool_use", "template": CHATML}]
    prepared = templates_for_llama_cpp(named, VICUNA_TEMPLATE)
    assert [t["name"] for t in prepared] == ["default", "tool_use"]
    assert prepared[0]["template"].startswith(LLAVA_HF_TEMPLATE) and "vicuna" in prepared[0]["template"]
    assert prepared[1]["template"] == CHATML  # llama.cpp already knows ChatML: unchanged
