"""Conversions that would silently compute something else are refused or made exact (issue 23, items
15, 16, 17, 19): the text model's activation, Mistral's sliding window, every tensor's dtype and shape
against config.json, and a one-element vision_feature_layer list."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from support import run_cli
from llava_gguf.convert import convert_checkpoint
from llava_gguf.errors import LlavaGgufError
from support import assert_clean_failure

# tiny()'s default layout (transformers-5) stores these prefixes
TEXT = "language_model.model."
VISION = "vision_tower."
PROJ = "multi_modal_projector."


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_text_config(ckpt: Path, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"].update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(ckpt: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(state)` applied to its numpy state dict."""
    from safetensors.numpy import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    edit(state)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt"})


def _refused(ckpt: Path, out: Path, *words: str) -> str:
    """The library refuses before writing anything; the message names `words`."""
    with pytest.raises(LlavaGgufError) as e:
        convert_checkpoint(ckpt, out, outtype="f32")
    msg = e.value.one_line()
    for w in words:
        assert w.lower() in msg.lower(), msg
    assert not out.exists() or not any(out.iterdir())
    return msg


@pytest.fixture()
def base(tiny, tmp_path):
    return _copy(tiny(), tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------- item 15
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_text_activation_other_than_silu_is_refused(base, tmp_path, act):
    """transformers' own LLaVA test config uses gelu; llama.cpp's llama graph is SiLU only."""
    _edit_text_config(base, hidden_act=act)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "hidden_act", repr(act))


def test_swish_is_silu(base, tmp_path):
    _edit_text_config(base, hidden_act="swish")  # transformers' ACT2FN: the same nn.SiLU
    assert convert_checkpoint(base, tmp_path / "out").llm.is_file()


@pytest.mark.parametrize("where,act", [("vision", "relu"), ("vision", "gelu_10"), ("projector", "silu")])
def test_unsupported_vision_and_projector_activations_are_refused(base, tmp_path, where, act):
    cfg = json.loads((base / "config.json").read_text())
    if where == "vision":
        cfg["vision_config"]["hidden_act"] = act
    else:
        cfg["projector_hidden_act"] = act
    (base / "config.json").write_text(json.dumps(cfg))
    _refused(base, tmp_path / "out", repr(act), "not supported")


# ---------------------------------------------------------------------------------------- item 16
def _sliding_window(llm: Path) -> int | None:
    field = gguf.GGUFReader(llm).fields.get("llama.attention.sliding_window")
    return None if field is None else int(field.contents())


def test_mistral_sliding_window_is_recorded_and_warned_once(tiny, tmp_path):
    ckpt = _copy(tiny(text_model="mistral"), tmp_path / "ckpt")
    _edit_text_config(ckpt, sliding_window=16)
    out = tmp_path / "out"
    p = run_cli("convert", str(ckpt), "-o", str(out))
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, p.stderr
    assert "sliding window of 16 tokens" in warnings[0] and "caps the context at 16" in warnings[0]
    assert "Traceback" not in p.stderr
    llm = next(f for f in out.iterdir() if not f.name.startswith("mmproj-"))
    assert _sliding_window(llm) == 16


@pytest.mark.parametrize("window", [4096, None])
def test_window_that_never_takes_effect_is_not_warned(tiny, tmp_path, window):
    """A window >= max_position_embeddings (4096 here) or none: no warning; the window is still recorded."""
    ckpt = _copy(tiny(text_model="mistral"), tmp_path / "ckpt")
    _edit_text_config(ckpt, sliding_window=window)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm = convert_checkpoint(ckpt, tmp_path / "out").llm
    assert _sliding_window(llm) == window


def test_llama_has_no_sliding_window(tiny, converted):
    llm, _ = converted(tiny(), "f16")
    assert _sliding_window(llm) is None


def test_llama_cpp_ignores_the_key_for_its_llama_architecture(tiny, tmp_path):
    """llama.cpp's llama loader reads no sliding window (n_swa stays 0): to llama.cpp the file is an
    ordinary LLaMA, so recording the window changes nothing there."""
    import warnings

    from llava_gguf.native.library import llama_cpp, quiet_logs

    ckpt = _copy(tiny(text_model="mistral"), tmp_path / "ckpt")
    _edit_text_config(ckpt, sliding_window=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = convert_checkpoint(ckpt, tmp_path / "out")
    assert _sliding_window(r.llm) == 16
    lc = llama_cpp()
    quiet_logs(False)
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(r.llm).encode(), params)
    assert model
    try:
        assert lc.llama_model_n_swa(model) == 0
    finally:
        lc.llama_model_free(model)


# ---------------------------------------------------------------------------------------- item 17
def _to_int(dtype):
    def edit(state):
        name = TEXT + "layers.0.mlp.up_proj.weight"
        state[name] = np.clip(state[name] * 1000, -100, 100).astype(dtype)
    return edit


def _transpose(name):
    def edit(state):
        state[name] = np.ascontiguousarray(state[name].T)
    return edit


def _drop(name):
    def edit(state):
        del state[name]
    return edit


TENSOR_CASES = {
    "i16": (_to_int(np.int16), ("layers.0.mlp.up_proj.weight", "I16", "not a float")),
    "i8": (_to_int(np.int8), ("layers.0.mlp.up_proj.weight", "I8", "not a float")),
    "transposed-gate": (_transpose(TEXT + "layers.1.mlp.gate_proj.weight"),
                        ("layers.1.mlp.gate_proj.weight", "[256, 512]", "[512, 256]")),
    "transposed-k": (_transpose(TEXT + "layers.0.self_attn.k_proj.weight"),
                     ("layers.0.self_attn.k_proj.weight", "[256, 128]", "[128, 256]")),
    "missing-down": (_drop(TEXT + "layers.1.mlp.down_proj.weight"), ("lacks", "model.layers.1.mlp.down_proj.weight")),
    "missing-lm-head": (_drop("language_model.lm_head.weight"), ("lacks", "lm_head.weight")),
    "missing-norm": (_drop(TEXT + "norm.weight"), ("lacks", "model.norm.weight")),
    "vision-fc1-transposed": (_transpose(VISION + "encoder.layers.0.mlp.fc1.weight"),
                              ("vision tensor", "encoder.layers.0.mlp.fc1.weight", "[64, 256]", "[256, 64]")),
    "vision-position-rows": (lambda s: s.update({VISION + "embeddings.position_embedding.weight":
                                                 s[VISION + "embeddings.position_embedding.weight"][:-1].copy()}),
                             ("position_embedding", "[64, 64]", "[65, 64]")),
    "projector-i8": (lambda s: s.update({PROJ + "linear_2.weight": s[PROJ + "linear_2.weight"].astype(np.int8)}),
                     ("projector tensor", "linear_2.weight", "I8")),
    "projector-transposed-in": (_transpose(PROJ + "linear_1.weight"), ("linear_1.weight", "[64, 256]", "[256, 64]")),
}


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensors_are_refused_before_writing(base, tmp_path, case):
    edit, words = TENSOR_CASES[case]
    _edit_tensors(base, edit)
    _refused(base, tmp_path / "out", *words)


def test_bad_tensor_through_the_cli(base, tmp_path):
    _edit_tensors(base, _to_int(np.int16))
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, "up_proj.weight", "I16")


def test_tied_embeddings_need_no_lm_head(base, tmp_path):
    _edit_tensors(base, _drop("language_model.lm_head.weight"))
    _edit_text_config(base, tie_word_embeddings=True)
    r = convert_checkpoint(base, tmp_path / "out")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(r.llm).tensors}


def test_biases_the_config_does_not_have_are_refused(base, tmp_path):
    """transformers ignores an o_proj bias its config lacks; llama.cpp would add it."""
    _edit_tensors(base, lambda s: s.update({TEXT + "layers.0.self_attn.o_proj.bias": np.ones(256, np.float32)}))
    _refused(base, tmp_path / "out", "unexpected", "layers.0.self_attn.o_proj.bias")


@pytest.mark.parametrize("changes,words", [
    ({"num_key_value_heads": 3}, ("num_key_value_heads = 3", "does not divide", "num_attention_heads = 4")),
    ({"num_key_value_heads": 4}, ("k_proj.weight", "[128, 256]", "[256, 256]")),  # the config, not the tensor
    ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
     ("hidden_size = 256", "not a multiple of", "num_attention_heads = 3")),
    ({"intermediate_size": 640}, ("layers.0.mlp.", "512", "640")),
    ({"head_dim": 33}, ("head size 33", "odd")),
])
def test_config_inconsistent_with_llama_cpp_is_refused(base, tmp_path, changes, words):
    _edit_text_config(base, **changes)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(base), "-o", str(out)), out, *words)


# ---------------------------------------------------------------------------------------- item 19
@pytest.mark.parametrize("layer,index", [([-1], 3), ([-2], 2)])
def test_one_element_feature_layer_list_is_that_layer(tiny, tmp_path, layer, index):
    """transformers concatenates the hidden states of the listed layers: one layer is that layer."""
    from llava_gguf import LLaVA
    from llava_gguf.checks.metrics import mean_cosine
    from llava_gguf.checks.reference import image_features, load_hf_model, pixel_values
    from devkit.tiny import sample_image

    ckpt = _copy(tiny(), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_feature_layer"] = layer
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = convert_checkpoint(ckpt, tmp_path / "out", outtype="f32")
    fields = gguf.GGUFReader(r.mmproj).fields
    assert fields["clip.vision.feature_layer"].contents() == [index]
    assert fields["clip.vision.block_count"].contents() == index
    image = sample_image(112, seed=3)
    model = load_hf_model(ckpt)
    assert model.config.vision_feature_layer == layer
    ref = image_features(model, pixel_values(ckpt, image))
    with LLaVA(r.llm, r.mmproj, n_threads=2) as m:
        feats = m.embed_image(image)
    assert feats.shape == ref.shape == (64, 256)
    assert mean_cosine(feats, ref) >= 0.9999


def test_unreadable_model_card_front_matter_is_a_warning(base, tmp_path):
    """gguf-py reads README.md's YAML front matter for general.* metadata; a broken one raised yaml's
    ParserError as a traceback. The model card is metadata only: one warning, and the model converts."""
    (base / "README.md").write_text("---\nlicense: [1, 2\n---\n# a model card\n")
    p = run_cli("convert", str(base), "-o", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "front matter" in lines[0], p.stderr
    assert len(list((tmp_path / "out").glob("*.gguf"))) == 2


def test_yarn_without_original_length_uses_the_trained_context(base, tmp_path):
    """transformers' yarn takes max_position_embeddings when original_max_position_embeddings is not given;
    the converter raised KeyError."""
    rope = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    _edit_text_config(base, max_position_embeddings=2048, rope_parameters=rope, rope_scaling=rope)
    llm = convert_checkpoint(base, tmp_path / "out").llm
    r = gguf.GGUFReader(llm)
    assert r.fields["llama.rope.scaling.original_context_length"].contents() == 2048
    assert r.fields["llama.rope.scaling.factor"].contents() == 2.0
