"""Issue 23 (fuzzing): safetensors headers and config.json values of the wrong type end in our one-line
error, never in another exception type. The explicit cases are the minimal inputs the property tests in
test_fuzz_properties.py found, here deterministic and named, plus the valid forms that must stay accepted."""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support import run_cli
from llava_gguf.convert.checkpoint import read_checkpoint
from llava_gguf.errors import LlavaGgufError


# ------------------------------------------------------------------------------------ safetensors
def _st(tmp_path: Path, header: dict | bytes, data: bytes) -> Path:
    """A checkpoint directory whose model.safetensors has this header (JSON text or a dict) and data."""
    d = tmp_path / "st"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return d


def _refused(d: Path, *words: str) -> str:
    with pytest.raises(LlavaGgufError) as e:
        for ref in read_checkpoint(d).tensors.values():
            ref.read()
    line = e.value.one_line()
    assert "\n" not in line and "not a valid safetensors file" in line, line
    for w in words:
        assert w in line, line
    return line


def _t(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("header,data,words", [
    # negative dimensions whose product matches the byte range (numpy's reshape ValueError before)
    ({"t": _t("F32", [-2, -3], [0, 24])}, bytes(24), ("shape [-2, -3]", "non-negative")),
    ({"t": _t("F32", [0, -2], [0, 0])}, b"", ("shape [0, -2]",)),
    # a negative length (bytearray's "negative count" before)
    ({"t": _t("BF16", [-1], [2, 0])}, bytes(2), ("shape [-1]",)),
    ({"t": _t("BF16", [1], [2, 0])}, bytes(2), ("ends", "before it begins")),
    # dimensions numpy cannot multiply (OverflowError before), or whose byte count overflows 64 bits
    ({"t": _t("F32", [2**63], [0, 8])}, bytes(8), ("overflows",)),
    ({"t": _t("F32", [2**32, 2**32], [0, 8])}, bytes(8), ("overflows",)),
    ({"t": _t("F32", [2**64], [0, 8])}, bytes(8), ("non-negative integers",)),
    ({"t": _t("F32", [1e308, 2], [0, 8])}, bytes(8), ("shape [1e+308, 2]",)),
    ({"t": _t("F32", [2.0], [0, 8])}, bytes(8), ("shape [2.0]",)),
    ({"t": _t("F32", [True, 2], [0, 8])}, bytes(8), ("shape [true, 2]",)),
    ({"t": _t("F32", 2, [0, 8])}, bytes(8), ("shape 2",)),
    ({"t": _t("F32", [2], [0, 8, 8])}, bytes(8), ("data_offsets [0, 8, 8]",)),
    ({"t": _t("F32", [2], [0, "8"])}, bytes(8), ("data_offsets",)),
    ({"t": _t("F32", [2], None)}, bytes(8), ("data_offsets null",)),
    ({"t": _t(["F32"], [2], [0, 8])}, bytes(8), ('dtype ["F32"]',)),
    ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), ("has no data_offsets",)),
    ({"t": [1, 2]}, bytes(8), ("not an object",)),
    ({"t": _t("F32", [3], [0, 8])}, bytes(8), ("spans 8 bytes", "take 12")),
    # the data section: ranges that leave a gap, overlap, or stop before its end (safetensors refuses each)
    ({"a": _t("F32", [1], [4, 8])}, bytes(8), ("begins at byte 4", "not 0")),
    ({"a": _t("F32", [2], [0, 8]), "b": _t("F32", [1], [4, 8])}, bytes(8), ("overlap",)),
    ({"a": _t("F32", [1], [0, 4])}, bytes(8), ("4 bytes after the last tensor",)),
    # __metadata__ is a map of strings, or null
    ({"__metadata__": {"format": 1}}, b"", ("__metadata__",)),
    ({"__metadata__": ["pt"]}, b"", ("__metadata__",)),
])
def test_safetensors_header_fields_are_checked(tmp_path, header, data, words):
    _refused(_st(tmp_path, header, data), *words)


@pytest.mark.parametrize("header", [
    b'{"t": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}',  # OverflowError from int() before
    b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}',
    '{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'.encode("utf-16"),  # json.loads took UTF-16
    b'{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "x": \xff}',
])
def test_safetensors_header_text_is_strict_json(tmp_path, header):
    _refused(_st(tmp_path, header, bytes(8)))


def test_safetensors_valid_edge_cases_are_read(tmp_path):
    """Zero-size and scalar tensors, null metadata, entries in any order (safetensors sorts by offset)."""
    header = {"__metadata__": None, "s": _t("F32", [], [8, 12]), "e": _t("F16", [0, 4], [8, 8]),
              "b": _t("BF16", [2, 2], [0, 8]), "z": _t("I8", [0], [12, 12])}
    data = np.array([1.0, 2.0, 3.0, 4.0], np.float32).view(np.uint32).__rshift__(16).astype("<u2").tobytes()
    data += np.float32(1.5).tobytes()
    ck = read_checkpoint(_st(tmp_path, header, data))
    assert list(ck.tensors) == ["b", "e", "s", "z"]
    got = {n: r.read() for n, r in ck.tensors.items()}
    assert got["e"].shape == (0, 4) and got["z"].shape == (0,) and got["s"].shape == () and float(got["s"]) == 1.5
    assert got["b"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_safetensors_library_files_are_read(tmp_path):
    from safetensors.numpy import save

    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "e": np.zeros((0, 3), np.float16),
               "i": np.arange(3, dtype=np.int64)}
    d = tmp_path / "lib"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    ck = read_checkpoint(d)
    for name, want in tensors.items():
        assert np.array_equal(ck.tensors[name].read(), want)


# ------------------------------------------------------------------------------------ config.json
LLAVA = ["LlavaForConditionalGeneration"]


def _error(fn, *args) -> str:
    with pytest.raises(LlavaGgufError) as e:
        fn(*args)
    line = e.value.one_line()
    assert "\n" not in line
    return line


@pytest.mark.parametrize("config,message", [
    ({"architectures": [1]}, "config.json: architectures = [1] is not a string or a list of strings"),
    ({"architectures": True}, "config.json: architectures = true is not"),
    ({"architectures": LLAVA, "model_type": 5}, "config.json: model_type = 5 is not a string"),
    ({"architectures": LLAVA, "_name_or_path": True}, "config.json: _name_or_path = true is not a string"),
    ({"architectures": LLAVA, "text_config": {"model_type": ["llama"]}},
     'config.json: text_config.model_type = ["llama"] is not a string'),
    ({"architectures": LLAVA, "text_config": {"model_type": 5}}, "config.json: text_config.model_type = 5 is not a string"),
])
def test_find_family_refuses_wrong_types(config, message):
    from llava_gguf.families import find_family

    assert message in _error(find_family, config)


@pytest.mark.parametrize("text,message", [
    ({"model_type": {"a": 1}}, 'text_config.model_type = {"a": 1} is not a string'),
    ({"rope_scaling": 2}, "text_config.rope_scaling = 2 is not an object or null"),
    ({"rope_scaling": ["rope_theta"]}, 'text_config.rope_scaling = ["rope_theta"] is not an object'),
    ({"rope_parameters": True}, "text_config.rope_parameters = true is not an object"),
    ({"rope_scaling": {"rope_theta": "1e4"}}, 'text_config.rope_scaling.rope_theta = "1e4" is not a positive number'),
    ({"rope_scaling": {"type": "linear", "factor": [2]}}, "text_config.rope_scaling.factor = [2] is not"),
    # an explicit null overrides the default (TypeError in the head checks before)
    ({"num_attention_heads": None}, "text_config.num_attention_heads = null is not a positive integer"),
    ({"hidden_size": None}, "text_config.hidden_size = null is not a positive integer"),
    ({"hidden_size": "4096"}, 'text_config.hidden_size = "4096" is not a positive integer'),
    ({"num_hidden_layers": 2**31}, "text_config.num_hidden_layers = 2147483648 is not a positive integer below 2**31"),
    ({"num_hidden_layers": 513}, "text_config.num_hidden_layers = 513 is more than the 512 layers llama.cpp supports"),
    ({"hidden_act": ["silu"]}, 'text_config.hidden_act = ["silu"] is not a string'),
    ({"rms_norm_eps": float("inf")}, "text_config.rms_norm_eps = Infinity is not a positive number"),
    ({"tie_word_embeddings": "false"}, 'text_config.tie_word_embeddings = "false" is not true or false'),
])
def test_resolve_llava_refuses_wrong_text_types(text, message):
    from llava_gguf.families.hparams import resolve_llava

    line = _error(resolve_llava, {"architectures": LLAVA, "text_config": text})
    assert line.startswith(f"config.json: {message}") and line.endswith("(the config is corrupt)"), line


@pytest.mark.parametrize("config,message", [
    ({"text_config": 3}, "config.json: text_config = 3 is not an object or null"),
    ({"vision_config": []}, "config.json: vision_config = [] is not an object or null"),
    ({"vision_config": {"layer_norm_eps": "1e-5"}}, 'config.json: vision_config.layer_norm_eps = "1e-5" is not'),
    ({"vision_config": {"image_size": 336.0}}, "config.json: vision_config.image_size = 336.0 is not a positive"),
    ({"vision_feature_select_strategy": None}, "config.json: vision_feature_select_strategy = null is not a string"),
    # a root key the text model sees is named where it is, at the root
    ({"sliding_window": "4096"}, 'config.json: sliding_window = "4096" is not a positive integer'),
])
def test_resolve_llava_refuses_wrong_root_and_vision_types(config, message):
    from llava_gguf.families.hparams import resolve_llava

    assert message in _error(resolve_llava, {"architectures": LLAVA, **config})


def test_resolve_llava_accepts_nulls_that_mean_the_default():
    from llava_gguf.families.hparams import resolve_llava

    _, text, vision = resolve_llava({"architectures": LLAVA, "text_config": None, "vision_config": None})
    assert text["hidden_size"] == 4096 and vision["hidden_size"] == 1024
    _, text, _ = resolve_llava({"text_config": {"model_type": "mistral", "sliding_window": None, "head_dim": None,
                                                "num_key_value_heads": None, "rope_scaling": None,
                                                "rope_theta": 1000000}})
    assert (text["num_key_value_heads"], text["head_dim"], text["rope_theta"]) == (32, 128, 1000000)


def test_liuhaotian_config_names_its_top_level_keys():
    from llava_gguf.families.liuhaotian import llava_config

    clip = {"hidden_size": 64}
    assert "config.json: mm_projector_type = 5 is not a string" in _error(llava_config, {"mm_projector_type": 5},
                                                                            clip, "llama")
    assert 'config.json: hidden_size = "64" is not a positive integer' in _error(
        llava_config, {"mm_projector_type": "linear", "hidden_size": "64"}, clip, "llama")


@pytest.mark.parametrize("pre,words", [
    ([1, 2], ("does not hold a JSON object",)),
    ({"image_mean": 0.5, "image_std": [1, 1]}, ("image_std = [1, 1] is not three numbers",)),
    ({"image_mean": "0.5"}, ('image_mean = "0.5" is not three numbers',)),
    ({"image_std": [0.5, 0, 0.5]}, ("image_std", "none of them 0")),
])
def test_preprocessor_config_values_are_checked(tmp_path, pre, words):
    from llava_gguf.convert.mmproj import image_norm

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    line = _error(image_norm, tmp_path)
    for w in words:
        assert w in line, line


def test_preprocessor_config_single_value_applies_to_each_channel(tmp_path):
    from llava_gguf.convert.mmproj import image_norm

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.5, "image_std": [1, 2, 3]}))
    assert image_norm(tmp_path) == ((0.5, 0.5, 0.5), (1.0, 2.0, 3.0))


# ------------------------------------------------------------------------- real checkpoints, real CLI
@pytest.fixture()
def base(tiny, tmp_path):
    return Path(shutil.copytree(tiny(), tmp_path / "ckpt"))


def _edit(ckpt: Path, section: str | None, **changes) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    (cfg[section] if section else cfg).update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_wrong_type_is_one_line_for_convert_and_inspect(base, tmp_path):
    _edit(base, "text_config", model_type=5)
    for args in (("convert", str(base), "-o", str(tmp_path / "out")), ("inspect", str(base))):
        p = run_cli(*args)
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [
            "error: config.json: text_config.model_type = 5 is not a string (the config is corrupt)"], p.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_huge_vision_layer_count_is_refused_quickly(base, tmp_path):
    """A layer count far past the tower's tensors: the missing layer is named without enumerating the count
    (the set of the required tensors of 2**31 layers took all memory before). In a child process with its
    address space capped, so that a regression fails this test and not the machine."""
    _edit(base, "vision_config", num_hidden_layers=2**31 - 1)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "llava_gguf", "convert", str(base), "-o", str(out)], capture_output=True,
                       text=True, timeout=120, preexec_fn=cap)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "error: the vision tower lacks its layer 3 (encoder.layers.3.*), one of the 2147483646 layers its feature "
        "layer needs (the checkpoint is incomplete or does not match its config)"], p.stderr


@pytest.mark.parametrize("shape", [[0, 2**62], [1] * 70])
def test_shapes_numpy_cannot_hold_are_refused_on_read(tmp_path, shape):
    """Valid safetensors (a zero-size tensor with a huge dimension; more dimensions than numpy's 64), read:
    our error, not numpy's ValueError ("array is too big", found by the property test at 10x examples)."""
    ck = read_checkpoint(_st(tmp_path, {"a": _t("BF16", shape, [0, 0 if 0 in shape else 2])}, b"" if 0 in shape
                                        else bytes(2)))
    with pytest.raises(LlavaGgufError, match="which no array can have"):
        ck.tensors["a"].read()
