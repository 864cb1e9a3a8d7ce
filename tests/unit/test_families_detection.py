"""families/: which family a config.json is (find_family) and which key layout a checkpoint's tensor names
are in (detect_layout), from small dicts and name lists; refusals are one line."""
from __future__ import annotations

import pytest

from llava_gguf.errors import LlavaGgufError
from llava_gguf.families import detect_layout, family, find_family


@pytest.mark.parametrize("config, name", [
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {}}, "llava-1.5"),
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "llama"}}, "llava-1.5"),
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "mistral"}}, "bakllava"),
    ({"architectures": ["LlavaNextForConditionalGeneration"], "text_config": {"model_type": "mistral"}}, "llava-1.6"),
    ({"architectures": "LlavaNextForConditionalGeneration"}, "llava-1.6"),  # a bare string, as some configs have
    ({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama"}, "llava-original"),
    ({"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral"}, "llava-original-mistral"),
])
def test_a_config_finds_its_family(config, name):
    assert find_family(config).name == name


@pytest.mark.parametrize("config, says", [
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": "qwen2"}},
     "unsupported text model type 'qwen2' in a LlavaForConditionalGeneration checkpoint (supported: llama, mistral)"),
    ({"model_type": "llava"}, "config.json names no architecture (model_type 'llava')"),
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM is not a LLaVA checkpoint"),
    ({"architectures": ["Qwen2VLForConditionalGeneration"]},
     "unsupported architecture 'Qwen2VLForConditionalGeneration' (supported: LlavaForConditionalGeneration, "
     "LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaNextForConditionalGeneration)"),
    ({"architectures": [3]}, "config.json: architectures = [3] is not a string or a list of strings"),
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {"model_type": ["llama"]}},
     'config.json: text_config.model_type = ["llama"] is not a string'),
])
def test_a_config_of_no_family_is_refused_in_one_line(config, says):
    with pytest.raises(LlavaGgufError) as e:
        find_family(config)
    assert says in str(e.value) and "\n" not in str(e.value)


def _names(text: str, vision: str, projector: str) -> list[str]:
    return [f"{text}layers.0.self_attn.q_proj.weight", f"{vision}encoder.layers.0.mlp.fc1.weight",
            f"{projector}linear_1.weight"]


@pytest.mark.parametrize("text, vision, projector, layout", [
    ("language_model.model.", "vision_tower.vision_model.", "multi_modal_projector.", "transformers<4.52"),
    ("model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector.",
     "transformers-4.52"),
    ("language_model.model.", "vision_tower.", "multi_modal_projector.", "transformers-5"),
])
def test_each_llava_hf_layout_is_detected(text, vision, projector, layout):
    for name in ("llava-1.5", "bakllava", "llava-1.6"):
        assert detect_layout(family(name), _names(text, vision, projector)).name == layout


def test_the_liuhaotian_layout_is_detected_with_its_tower_inside():
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.mm_projector.0.weight",
             "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert detect_layout(family("llava-original"), names).name == "liuhaotian"


def test_a_checkpoint_lacking_a_part_is_refused_naming_it():
    with pytest.raises(LlavaGgufError, match="lack the vision tower and projector of a llava-1.5 model"):
        detect_layout(family("llava-1.5"), ["language_model.model.embed_tokens.weight"])
