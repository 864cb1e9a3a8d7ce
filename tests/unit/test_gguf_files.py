"""Classifying, pairing and checking tiny GGUF files written with gguf-py (a 1-layer llama of width 32 and
a 1-block CLIP mmproj projecting to it): the one "is it quantized" rule, the one LLM <-> mmproj pairing
policy (directories with several quantized LLMs, a missing mmproj, explicit choices, the messages), and
the defect rules the load gate applies."""
from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from llava_gguf.errors import LlavaGgufError
from llava_gguf.gguf.classify import classify, identify, is_quantized, strip_type_suffix
from llava_gguf.gguf.defects import require_loadable
from llava_gguf.gguf.header import read_header
from llava_gguf.gguf.info import read_gguf_info
from llava_gguf.gguf.inspect import MmprojFacts, gguf_report
from llava_gguf.gguf.pairing import find_base_mmproj, locate_pair, named_for, quantize_sources

E, FF, HEADS, VOCAB = 32, 64, 4, 8
Q8_0, F16 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _tensor(w: gguf.GGUFWriter, name: str, shape: tuple[int, ...], qtype) -> None:
    """`shape` in numpy order (ggml's reversed); matrices in `qtype`, vectors in F32."""
    data = np.random.default_rng(len(name)).standard_normal(shape).astype(np.float32) * 0.02
    if len(shape) >= 2 and qtype == Q8_0:
        w.add_tensor(name, gguf.quants.quantize(data, Q8_0), raw_dtype=Q8_0)
    elif len(shape) >= 2 and qtype == F16:
        w.add_tensor(name, data.astype(np.float16))
    else:
        w.add_tensor(name, data)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_llm(path: Path, qtype=F16, *, tokens: list[str] | None = None, template: str | None = TEMPLATE,
              block_count: int = 1, file_type: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(path.stem)
    w.add_file_type(file_type if file_type is not None else (7 if qtype == Q8_0 else 1))
    w.add_context_length(256)
    w.add_embedding_length(E)
    w.add_block_count(block_count)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(E // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens or ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 3)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([1] * VOCAB)
    if template is not None:
        w.add_chat_template(template)
    _tensor(w, "token_embd.weight", (VOCAB, E), qtype)
    _tensor(w, "output_norm.weight", (E,), qtype)
    for name, shape in (("attn_norm", (E,)), ("attn_q", (E, E)), ("attn_k", (E, E)), ("attn_v", (E, E)),
                        ("attn_output", (E, E)), ("ffn_norm", (E,)), ("ffn_gate", (FF, E)), ("ffn_up", (FF, E)),
                        ("ffn_down", (E, FF))):
        _tensor(w, f"blk.0.{name}.weight", shape, qtype)
    _finish(w)
    return path


def write_mmproj(path: Path, qtype=F16, *, projection: int = E, feature_layer: bool = True) -> Path:
    w = gguf.GGUFWriter(path, arch="clip")
    w.add_file_type({Q8_0: 7, gguf.GGMLQuantizationType.F32: 0}.get(qtype, 1))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    v = "clip.vision."
    for key, value in (("image_size", 28), ("patch_size", 14), ("embedding_length", E), ("feed_forward_length", FF),
                       ("projection_dim", projection), ("attention.head_count", HEADS), ("block_count", 1)):
        w.add_uint32(v + key, value)
    w.add_float32(v + "attention.layer_norm_epsilon", 1e-5)
    w.add_array(v + "image_mean", [0.5, 0.5, 0.5])
    w.add_array(v + "image_std", [0.5, 0.5, 0.5])
    if feature_layer:
        w.add_array(v + "feature_layer", [1])
    _tensor(w, "v.patch_embd.weight", (E, 3, 14, 14), F16)
    _tensor(w, "v.position_embd.weight", (4, E), F16)
    for name, shape in (("attn_q", (E, E)), ("attn_k", (E, E)), ("attn_v", (E, E)), ("attn_out", (E, E)),
                        ("ln1", (E,)), ("ln2", (E,)), ("ffn_up", (FF, E)), ("ffn_down", (E, FF))):
        _tensor(w, f"v.blk.0.{name}.weight", shape, qtype)
    _tensor(w, "mm.0.weight", (projection, E), qtype)
    _tensor(w, "mm.0.bias", (projection,), qtype)
    _tensor(w, "mm.2.weight", (projection, projection), qtype)
    _tensor(w, "mm.2.bias", (projection,), qtype)
    _finish(w)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    return {"llm": write_llm(d / "m-F16.gguf"), "llm_q": write_llm(d / "m-Q8_0.gguf", Q8_0),
            "mmproj": write_mmproj(d / "mmproj-m-F16.gguf"), "mmproj_q": write_mmproj(d / "mmproj-m-Q8_0.gguf", Q8_0)}


def pair_dir(tmp_path: Path, files: dict[str, Path], names: dict[str, str]) -> Path:
    """A directory holding copies of `files` under new names ({new name: key of files})."""
    d = tmp_path / "pair"
    d.mkdir(exist_ok=True)
    for name, key in names.items():
        shutil.copy(files[key], d / name)
    return d


# ------------------------------------------------------------------------------------------ classify
def test_classify_and_the_one_quantized_rule(files):
    llm, llm_q, mm, mm_q = (classify(files[k]) for k in ("llm", "llm_q", "mmproj", "mmproj_q"))
    assert (llm.kind, llm.type, llm.quantized, llm.info.n_embd) == ("llm", "F16", False, E)
    assert (llm_q.kind, llm_q.type, llm_q.quantized) == ("llm", "Q8_0", True)
    assert (mm.kind, mm.type, mm.quantized, mm.info.n_embd, mm.info.image_tokens) == ("mmproj", "F16", False, E, 4)
    assert (mm_q.kind, mm_q.quantized) == ("mmproj", True)
    # one rule whatever is asked with: the path, the header, the layout
    for key, expected in (("llm", False), ("llm_q", True), ("mmproj_q", True)):
        h = read_header(files[key])
        assert is_quantized(files[key]) == is_quantized(h) == is_quantized(h.layout) == expected


def test_the_tensors_decide_not_the_name_or_file_type(tmp_path):
    # an F16 file that says Q4_K_M in its name and general.file_type is not quantized
    p = write_llm(tmp_path / "x-Q4_K_M.gguf", file_type=15)
    assert not is_quantized(p) and classify(p).type == "Q4_K_M"


def test_classify_refuses_what_is_not_a_llava_file(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "imatrix.gguf", arch="llama")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["calibration.txt"])
    _finish(w)
    with pytest.raises(LlavaGgufError, match=r"neither a LLaVA language model nor an mmproj \(imatrix\)"):
        classify(tmp_path / "imatrix.gguf")
    assert identify(tmp_path / "imatrix.gguf").kind == "llm"  # the tolerant form reads it by architecture
    with pytest.raises(LlavaGgufError, match="does not exist"):
        classify(tmp_path / "absent.gguf")


def test_type_suffixes():
    assert strip_type_suffix("llava-v1.5-7b-Q4_K_M") == "llava-v1.5-7b"
    assert strip_type_suffix("mmproj-x-f16") == "mmproj-x" and strip_type_suffix("x-Q4_K") == "x"
    assert strip_type_suffix("model-v2") == "model-v2"
    assert named_for(Path("mmproj-x-F16.gguf"), Path("x-Q4_K_M.gguf"))
    assert named_for(Path("mmproj-model.gguf"), Path("model.gguf"))
    assert not named_for(Path("mmproj-y-F16.gguf"), Path("x-F16.gguf"))


# ------------------------------------------------------------------------------------------- pairing
def test_runtime_pair_takes_the_one_quantized_llm(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-F16.gguf": "llm", "m-Q8_0.gguf": "llm_q", "mmproj-m-F16.gguf": "mmproj"})
    (d / "notes.gguf").write_bytes(b"not a gguf")  # unreadable files beside the pair are no candidates
    assert locate_pair(d) == (d / "m-Q8_0.gguf", d / "mmproj-m-F16.gguf")
    assert locate_pair(d, llm=d / "m-F16.gguf") == (d / "m-F16.gguf", d / "mmproj-m-F16.gguf")
    assert locate_pair(d / "m-F16.gguf") == (d / "m-F16.gguf", d / "mmproj-m-F16.gguf")  # a file: its directory
    assert locate_pair(d / "m-F16.gguf", mmproj=files["mmproj_q"]) == (d / "m-F16.gguf", files["mmproj_q"])


def test_runtime_pair_prefers_the_f16_mmproj_measurements_the_most_precise(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-Q8_0.gguf": "llm_q", "mmproj-m-F16.gguf": "mmproj"})
    write_mmproj(d / "mmproj-m-F32.gguf", gguf.GGMLQuantizationType.F32)
    assert locate_pair(d) == (d / "m-Q8_0.gguf", d / "mmproj-m-F16.gguf")  # what the runtime always ran
    assert find_base_mmproj(d / "m-Q8_0.gguf") == d / "mmproj-m-F32.gguf"


def test_runtime_pair_refuses_to_guess(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-F16.gguf": "llm", "m-Q8_0.gguf": "llm_q", "m-Q4_K_M.gguf": "llm_q",
                                   "mmproj-m-F16.gguf": "mmproj"})
    with pytest.raises(LlavaGgufError, match="several language models in .*: m-F16.gguf, m-Q4_K_M.gguf, "
                                             "m-Q8_0.gguf") as e:
        locate_pair(d)
    assert e.value.hint == "choose one with --model"
    assert locate_pair(d, llm=d / "m-Q4_K_M.gguf")[1] == d / "mmproj-m-F16.gguf"
    (d / "mmproj-m-F16.gguf").unlink()
    with pytest.raises(LlavaGgufError, match="no mmproj .gguf in"):
        locate_pair(d, llm=d / "m-Q8_0.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(files["mmproj"], empty / "mmproj-m-F16.gguf")
    with pytest.raises(LlavaGgufError, match="no language-model .gguf in"):
        locate_pair(empty)
    with pytest.raises(LlavaGgufError, match="does not exist"):
        locate_pair(tmp_path / "nowhere")


def test_runtime_pair_among_several_mmprojs(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-Q8_0.gguf": "llm_q", "mmproj-m-Q8_0.gguf": "mmproj_q",
                                   "mmproj-m-F16.gguf": "mmproj", "mmproj-other-F16.gguf": "mmproj"})
    assert locate_pair(d) == (d / "m-Q8_0.gguf", d / "mmproj-m-F16.gguf")  # named for it, unquantized first
    (d / "mmproj-m-Q8_0.gguf").unlink()
    (d / "mmproj-m-F16.gguf").rename(d / "mmproj-n-F16.gguf")
    with pytest.raises(LlavaGgufError, match="several mmproj files in .*: mmproj-n-F16.gguf, mmproj-other-F16.gguf") as e:
        locate_pair(d)
    assert e.value.hint == "choose one with --mmproj"
    assert locate_pair(d, mmproj=d / "mmproj-n-F16.gguf") == (d / "m-Q8_0.gguf", d / "mmproj-n-F16.gguf")


def test_base_mmproj_is_the_named_unquantized_one(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-F16.gguf": "llm", "m-Q8_0.gguf": "llm_q", "mmproj-m-Q8_0.gguf": "mmproj_q",
                                   "mmproj-m-F16.gguf": "mmproj", "mmproj-a-F16.gguf": "mmproj"})
    assert find_base_mmproj(d / "m-Q8_0.gguf") == d / "mmproj-m-F16.gguf"
    (d / "mmproj-m-F16.gguf").unlink()
    assert find_base_mmproj(d / "m-Q8_0.gguf") == d / "mmproj-m-Q8_0.gguf"  # the name first, then the type
    for p in d.glob("mmproj-*"):
        p.unlink()
    with pytest.raises(LlavaGgufError, match="no mmproj .gguf beside") as e:
        find_base_mmproj(d / "m-Q8_0.gguf", "--mmproj")
    assert e.value.hint == "name it with --mmproj"


def test_quantize_sources(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-F16.gguf": "llm", "m-Q8_0.gguf": "llm_q", "mmproj-m-F16.gguf": "mmproj",
                                   "mmproj-m-Q8_0.gguf": "mmproj_q"})
    llm, mm = quantize_sources(d)
    assert (llm.path, mm.path) == (d / "m-F16.gguf", d / "mmproj-m-F16.gguf")
    (d / "m-F16.gguf").unlink()
    with pytest.raises(LlavaGgufError, match=r"no unquantized language model in .* \(only m-Q8_0.gguf\)"):
        quantize_sources(d)
    shutil.copy(files["llm"], d / "a-F16.gguf")
    shutil.copy(files["llm"], d / "b-F16.gguf")
    with pytest.raises(LlavaGgufError, match="several unquantized language models in .*: a-F16.gguf, b-F16.gguf"):
        quantize_sources(d)
    (d / "b-F16.gguf").unlink()
    # not named for a-F16: usable only when the candidates are one file in several types
    assert quantize_sources(d)[1].path == d / "mmproj-m-F16.gguf"
    shutil.copy(files["mmproj"], d / "mmproj-z-F16.gguf")
    with pytest.raises(LlavaGgufError, match="several mmproj files in .* could go with a-F16.gguf: "
                                             "mmproj-m-F16.gguf, mmproj-z-F16.gguf, mmproj-m-Q8_0.gguf"):
        quantize_sources(d)


def test_quantize_sources_needs_an_mmproj_of_the_llms_width(tmp_path, files):
    d = pair_dir(tmp_path, files, {"m-F16.gguf": "llm"})
    write_mmproj(d / "mmproj-m-F16.gguf", projection=64)
    with pytest.raises(LlavaGgufError, match=r"no mmproj in .* matches m-F16.gguf \(embedding width 32\)"):
        quantize_sources(d)
    with pytest.raises(LlavaGgufError, match="does not exist"):
        quantize_sources(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- defects
def test_the_tiny_files_load_and_report_what_they_are(files):
    for key in files:
        assert require_loadable(files[key], key).layout.tensors
        assert gguf_report(files[key]).defects == ()
    llm = gguf_report(files["llm"]).to_dict()
    assert (llm["role"], llm["architecture"], llm["vocab_size"], llm["block_count"], llm["chat_template"]) == \
        ("llm", "llama", VOCAB, 1, True)
    assert llm["metadata"]["tokenizer.ggml.scores"] == [0.0] * VOCAB  # short arrays in full
    mm = gguf_report(files["mmproj"])
    assert isinstance(mm.facts, MmprojFacts) and (mm.facts.image_tokens, mm.facts.layers_run) == (4, 1)
    assert list(mm.to_dict())[:10] == ["kind", "path", "bytes", "role", "architecture", "name", "tensors",
                                       "parameters", "tensor_types", "file_type"]
    assert read_gguf_info(files["llm"], "model") == read_gguf_info(files["llm"], "model", reader=read_header(files["llm"]))


def test_a_duplicate_token_is_refused_before_llama_cpp_aborts(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "a", "b\0tail", "b", "c", "d"]
    p = write_llm(tmp_path / "dup.gguf", tokens=tokens)
    assert [d.code for d in gguf_report(p).defects] == ["vocab-duplicate-token"]
    with pytest.raises(LlavaGgufError, match=r"vocab-duplicate-token: .*'b' \(ids 4 and 5\)"):
        require_loadable(p, "model")


def test_a_template_that_is_not_jinja_is_reported_not_a_load_defect(tmp_path):
    p = write_llm(tmp_path / "tpl.gguf", template="{% if %}")
    report = gguf_report(p)
    assert [d.code for d in report.defects] == ["chat-template-invalid"] and not report.repairable
    require_loadable(p, "model")  # llama.cpp loads it; the runtime refuses it for its own reasons


def test_an_invalid_block_count_would_abort_llama_cpp(tmp_path):
    p = write_llm(tmp_path / "zero.gguf", block_count=0)
    with pytest.raises(LlavaGgufError, match=r"hparam-invalid: block_count is 0 \(llama.cpp aborts outside 1..512\)"):
        require_loadable(p, "model")


def test_a_legacy_mmproj_loads_and_is_repairable(tmp_path):
    p = write_mmproj(tmp_path / "legacy.gguf", feature_layer=False)
    report = gguf_report(p)
    assert [d.code for d in report.defects] == ["feature-layer-missing"] and report.repairable
    require_loadable(p, "mmproj")  # libmtmd runs it, one layer short
