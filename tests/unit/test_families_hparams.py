"""families/hparams.py: config.json becomes hyperparameters with transformers' defaults filled in, and a
value of the wrong type or an impossible geometry is refused in one line naming the key."""
from __future__ import annotations

import pytest

from llava_gguf.errors import LlavaGgufError
from llava_gguf.families.hparams import LLAVA_VISION, TEXT_DEFAULTS, TEXT_MODELS, resolve_llava, spelt

LLAVA = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}


def test_defaults_fill_what_the_config_leaves_out():
    root, text, vision = resolve_llava({**LLAVA, "text_config": {"hidden_size": 512, "num_attention_heads": 8}})
    assert text["intermediate_size"] == TEXT_DEFAULTS["llama"]["intermediate_size"]
    assert (text["num_key_value_heads"], text["head_dim"]) == (8, 64)  # derived: no GQA, hidden / heads
    assert vision["image_size"] == LLAVA_VISION["image_size"] == 336  # no vision_config: CLIP ViT-L/14-336
    assert root["vision_feature_layer"] == -2


def test_mistral_takes_mistrals_defaults():
    _, text, _ = resolve_llava({**LLAVA, "text_config": {"model_type": "mistral"}})
    assert (text["sliding_window"], text["num_key_value_heads"]) == (4096, 8)


def test_the_supported_text_models_are_those_with_defaults():
    assert TEXT_MODELS == ("llama", "mistral") == tuple(TEXT_DEFAULTS)


@pytest.mark.parametrize("config, says", [
    ({"text_config": {"model_type": "gpt2"}}, "unsupported text model type 'gpt2' (supported: llama, mistral)"),
    ({"text_config": {"hidden_size": "4096"}}, 'config.json: text_config.hidden_size = "4096" is not a positive '
                                               "integer below 2**31"),
    ({"text_config": {"rms_norm_eps": 0}}, "config.json: text_config.rms_norm_eps = 0 is not a positive number"),
    ({"text_config": {"tie_word_embeddings": 1}}, "text_config.tie_word_embeddings = 1 is not true or false"),
    ({"text_config": {"rope_scaling": {"factor": -2}}}, "text_config.rope_scaling.factor = -2 is not a positive"),
    ({"vision_config": {"patch_size": None}}, "config.json: vision_config.patch_size = null is not a positive"),
    ({"text_config": {"num_attention_heads": 32, "num_key_value_heads": 5}},
     "text_config.num_key_value_heads = 5 does not divide num_attention_heads = 32"),
    ({"text_config": {"num_hidden_layers": 100000}}, "llama.cpp supports"),
    ({"projector_hidden_act": ["gelu"]}, 'config.json: projector_hidden_act = ["gelu"] is not a string'),
])
def test_a_bad_value_is_refused_in_one_line_naming_its_key(config, says):
    with pytest.raises(LlavaGgufError) as e:
        resolve_llava({**LLAVA, **config})
    assert says in str(e.value) and "\n" not in str(e.value)
    assert "the config is corrupt" in str(e.value) or "supported" in str(e.value)


def test_values_in_messages_are_spelt_as_json_and_cut_short():
    assert (spelt(None), spelt(True), spelt("4096")) == ("null", "true", '"4096"')
    assert spelt("x" * 100).endswith("...") and len(spelt("x" * 100)) == 63
