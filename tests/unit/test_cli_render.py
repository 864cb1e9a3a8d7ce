"""cli/render.py: every report as text and as its --json form, from constructed reports (no model, no file).
The strings are the CLI's contract: scripts and the integration tests parse them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_gguf.checks.inspect import (CheckpointReport, ConvertWrites, Parameters, TextModel, VisionTower, Weights,
                                       report_from_json)
from llava_gguf.checks.quality import QualityReport
from llava_gguf.checks.verify import VerifyReport
from llava_gguf.cli import render
from llava_gguf.convert import ConvertResult
from llava_gguf.gguf.inspect import GGUFReport, LlmFacts, MmprojFacts
from llava_gguf.gguf.layout import Defect
from llava_gguf.gguf.repair import RepairResult
from llava_gguf.native.doctor import Device, DoctorReport
from llava_gguf.quantize import QUANT_TYPES, QuantizeResult
from llava_gguf.runtime.imatrix import ImatrixResult
from llava_gguf.runtime.generate import EvalStats


def test_convert():
    r = ConvertResult(Path("out/m-F16.gguf"), Path("out/mmproj-m-F16.gguf"), "llava-1.5", "transformers-5", 62, 3874816)
    assert render.convert_lines(r) == ["llava-1.5 (transformers-5 layout) -> out/m-F16.gguf",
                                       " " * 33 + " -> out/mmproj-m-F16.gguf"]
    assert render.convert_json(r) == {"llm": "out/m-F16.gguf", "mmproj": "out/mmproj-m-F16.gguf", "family": "llava-1.5",
                                      "layout": "transformers-5", "tensors": 62, "bytes": 3874816}


def test_quantize():
    rs = [QuantizeResult(Path("q/m-Q4_K_M.gguf"), "Q4_K_M", 1097056, Path("o/m-F16.gguf")),
          QuantizeResult(Path("q/mmproj-m-F16.gguf"), "F16", 464832)]
    assert render.quantize_lines(rs) == ["Q4_K_M  -> q/m-Q4_K_M.gguf (1.1 MB, from m-F16.gguf)",
                                         "F16     -> q/mmproj-m-F16.gguf (0.5 MB, kept)"]
    assert render.quantize_json(rs) == {"outputs": [
        {"path": "q/m-Q4_K_M.gguf", "type": "Q4_K_M", "bytes": 1097056, "source": "o/m-F16.gguf"},
        {"path": "q/mmproj-m-F16.gguf", "type": "F16", "bytes": 464832, "source": None}]}


def test_imatrix_and_repair():
    r = ImatrixResult(Path("m.imatrix.gguf"), 14, 3, 128, 384, "calibration.txt", images=2)
    assert render.imatrix_lines(r) == ["imatrix -> m.imatrix.gguf (14 tensors, 3 chunks of 128 tokens and 2 images)"]
    assert render.imatrix_json(r)["images"] == 2 and render.imatrix_json(r)["output"] == "m.imatrix.gguf"
    nothing = RepairResult(Path("/abs/mm.gguf"), None, ())
    assert render.repair_lines(nothing, Path("mm.gguf")) == ["mm.gguf: nothing to repair"]
    assert render.repair_json(nothing) == {"source": "/abs/mm.gguf", "output": None, "fixed": []}
    fixed = RepairResult(Path("mm.gguf"), Path("mm.gguf"), ("feature-layer", "block-count"))
    assert render.repair_lines(fixed, Path("mm.gguf")) == ["fixed feature-layer, block-count -> mm.gguf"]


def _quality(cosine: float | None) -> QualityReport:
    return QualityReport("b/m-F16.gguf", "q/m-Q4_K_M.gguf", "b/mmproj-m-F16.gguf", "q/mmproj-m-Q8_0.gguf", 4, 100,
                         0.0123456, 0.01, 0.1, 0.2, 0.975, 3, cosine, None if cosine is None else cosine - 0.01)


def test_quality():
    assert render.quality_lines(_quality(None)) == [
        "base   b/m-F16.gguf + mmproj-m-F16.gguf",
        "quant  q/m-Q4_K_M.gguf + mmproj-m-Q8_0.gguf",
        "4 prompts with images, 100 answer positions",
        "KL divergence   mean 0.012346  median 0.010000  p99 0.100000  max 0.200000",
        "top-1 agreement 97.5%   identical greedy answers 3/4"]
    assert render.quality_lines(_quality(0.999))[-1] == \
        "image embedding cosine vs base mmproj: mean 0.999000  min 0.989000"
    as_json = render.to_json(_quality(None))
    assert as_json["kl_mean"] == 0.0123456 and as_json["mmproj_cosine_mean"] is None and as_json["per_pair"] == []


def test_verify_pass_and_fail():
    r = VerifyReport("ckpt", "out/m-F16.gguf", "out/mmproj-m-F16.gguf", "fixed", "float32", ["a.png", "b.png"], 16,
                     cosine_mean=0.99999, cosine_min=0.9999, kl_mean=1e-4, kl_max=2e-3, top1=1.0, greedy_identical=2,
                     thresholds={"cosine": 0.999, "top1": 0.95}, passed=True)
    assert render.verify_lines(r) == [
        "reference ckpt (transformers, float32)",
        "gguf      out/m-F16.gguf + mmproj-m-F16.gguf (fixed libmtmd)",
        "images    2: a.png, b.png",
        "image embedding cosine  mean 0.9999900  min 0.9999000",
        "next-token KL           mean 0.000100  max 0.002000",
        "top-1 agreement         100.0%   identical greedy answers 2/2",
        "PASS"]
    failed = VerifyReport("ckpt", "l", "m", "stock", "float32", [], 16, failures=["x < 1", "y < 2"])
    assert render.verify_lines(failed)[-1] == "FAIL: x < 1; y < 2"
    assert list(render.to_json(r)) == ["source", "llm", "mmproj", "runtime", "reference_dtype", "images", "tokens",
                                       "cosine_mean", "cosine_min", "kl_mean", "kl_max", "top1", "greedy_identical",
                                       "thresholds", "grid_pinpoints_conflict", "passed", "failures"]
    with pytest.raises(AttributeError):  # reports are frozen
        r.passed = False


CHECKPOINT = CheckpointReport(
    path="ck", family="llava-1.5", layout="transformers-5", architecture="LlavaForConditionalGeneration",
    text_model="llama", vision_from="checkpoint", weights=Weights("safetensors", 1, 7918848),
    dtypes={"F32": 80}, parameters=Parameters(1705216, 192064, 82432, 1979712), text=TextModel(2, 256, 1024),
    vision=VisionTower(3, 64, 112, 14, 64, -2),
    convert_writes=ConvertWrites("ck-F16.gguf", "mmproj-ck-F16.gguf", "mlp", 2, [2]))


def test_inspect_checkpoint():
    assert render.inspect_lines(CHECKPOINT) == [
        "ck: llava-1.5 checkpoint (LlavaForConditionalGeneration, transformers-5 layout, llama text model)",
        "weights     1 safetensors file(s), 0.01 GB, dtypes F32 x80",
        "parameters  2.0 M (language model 1.7 M, vision tower 0.2 M, projector 0.1 M)",
        "vision      3 layers, 112 px / 14 -> 64 image tokens, feature layer -2",
        "convert     -> ck-F16.gguf + mmproj-ck-F16.gguf (2 vision blocks, feature layer [2])"]
    as_json = render.to_json(CHECKPOINT)
    assert as_json == {
        "kind": "checkpoint", "path": "ck", "family": "llava-1.5", "layout": "transformers-5",
        "architecture": "LlavaForConditionalGeneration", "text_model": "llama", "vision_from": "checkpoint",
        "weights": {"format": "safetensors", "files": 1, "bytes": 7918848}, "dtypes": {"F32": 80},
        "parameters": {"language_model": 1705216, "vision_tower": 192064, "projector": 82432, "total": 1979712},
        "text": {"layers": 2, "hidden_size": 256, "vocab_size": 1024},
        "vision": {"layers": 3, "hidden_size": 64, "image_size": 112, "patch_size": 14, "image_tokens": 64,
                   "feature_layer": -2},
        "convert_writes": {"llm": "ck-F16.gguf", "mmproj": "mmproj-ck-F16.gguf", "projector_type": "mlp",
                           "vision_blocks": 2, "clip.vision.feature_layer": [2]},
        "defects": []}
    assert list(as_json) == ["kind", "path", "family", "layout", "architecture", "text_model", "vision_from", "weights",
                             "dtypes", "parameters", "text", "vision", "convert_writes", "defects"]
    assert report_from_json(as_json) == CHECKPOINT  # the JSON form reads back, and renders the same
    assert render.inspect_lines(as_json) == render.inspect_lines(CHECKPOINT)


MMPROJ = GGUFReport(
    Path("mm.gguf"), 464832, "mmproj", "clip", "t", 41, 224384, {"F16": 15, "F32": 26}, "F16",
    MmprojFacts("mlp", 112, 14, 64, 256, False, 2, 2, None, 2),
    (Defect("feature-layer", "no feature layer", True), Defect("truncated", "cut", False)),
    {"general.architecture": "clip"})

MMPROJ_JSON = {
    "kind": "gguf", "path": "mm.gguf", "bytes": 464832, "role": "mmproj", "architecture": "clip", "name": "t",
    "tensors": 41, "parameters": 224384, "tensor_types": {"F16": 15, "F32": 26}, "file_type": "F16",
    "projector_type": "mlp", "image_size": 112, "patch_size": 14, "image_tokens": 64, "projection_dim": 256,
    "anyres": False, "stored_blocks": 2, "block_count": 2, "feature_layer": None, "layers_run": 2,
    "defects": [{"code": "feature-layer", "message": "no feature layer", "repairable": True},
                {"code": "truncated", "message": "cut", "repairable": False}],
    "metadata": {"general.architecture": "clip"}}


def test_inspect_gguf():
    assert render.to_json(MMPROJ) == MMPROJ_JSON and list(render.to_json(MMPROJ)) == list(MMPROJ_JSON)
    assert json.dumps(render.to_json(MMPROJ)) == json.dumps(MMPROJ_JSON)  # the key order is the contract too
    assert report_from_json(MMPROJ_JSON) == MMPROJ and not MMPROJ.repairable
    lines = [
        "mm.gguf: mmproj GGUF (clip), 0.5 MB, 41 tensors, 0.2 M parameters, file type F16",
        "tensor types  F16 x15, F32 x26",
        "projector     mlp, 112 px / 14 -> 64 image tokens",
        "vision layers 2 stored, block_count 2, feature layer not set, libmtmd runs 2",
        "DEFECT feature-layer: no feature layer (`llava-gguf repair` fixes it)",
        "DEFECT truncated: cut (not repairable: convert again)"]
    assert render.inspect_lines(MMPROJ) == lines and render.inspect_lines(MMPROJ_JSON) == lines
    anyres = GGUFReport(Path("a.gguf"), 1, "mmproj", "clip", None, 1, 1, {}, None,
                        MmprojFacts("mlp", 336, 14, 576, 4096, True, 23, 23, [23], 23), (), {})
    assert render.inspect_lines(anyres)[2:] == [
        "projector     mlp, 336 px / 14 -> 576 image tokens (anyres)",
        "vision layers 23 stored, block_count 23, feature layer [23], libmtmd runs 23",
        "defects       none found"]
    llm = GGUFReport(Path("m.gguf"), 3436640, "llm", "llama", None, 21, 1705216, {"F16": 16, "F32": 5}, "F16",
                     LlmFacts(2, 256, 4096, 4, 2, 1024, "llama", False), (), {})
    assert render.inspect_lines(llm)[2:] == [
        "model         2 layers, width 256, 4 heads (2 kv), vocab 1024 (llama), context 4096",
        "chat template no (chat uses the family default)",
        "defects       none found"]
    llm_json = render.to_json(llm)
    assert list(llm_json)[10:18] == ["block_count", "embedding_length", "context_length", "head_count",
                                     "head_count_kv", "vocab_size", "tokenizer", "chat_template"]
    assert report_from_json(llm_json) == llm and render.inspect_lines(llm_json) == render.inspect_lines(llm)


DOCTOR = DoctorReport(
    llava_gguf="0.1.0", python="3.11.7", platform="Linux", llama_cpp_python="0.3.36", gguf="0.19.0",
    transformers=None, torch=None, llama_cpp_lib_path="/lib", mtmd_lib_path="/lib/stock", mtmd_variant="stock",
    tools_path=None, llava_fix=False, llava_fix_detail="CLS last", gpu_offload=False, llm_backend="cpu",
    vision_backend="cpu", devices=(Device("CPU", "AMD EPYC", "cpu"), Device("CUDA0", "A100", "gpu")),
    cpu_features=("AVX2", "FMA"), system_info="CPU : AVX2 = 1 | FMA = 1 |")


def test_doctor():
    assert render.doctor_lines(DOCTOR) == [
        "llava_gguf           0.1.0",
        "python               3.11.7",
        "platform             Linux",
        "llama_cpp_python     0.3.36",
        "gguf                 0.19.0",
        "transformers         None",
        "torch                None",
        "llama_cpp_lib_path   /lib",
        "mtmd_lib_path        /lib/stock",
        "mtmd_variant         stock",
        "tools_path           None",
        "llava_fix            NO (image features will not match the reference)",
        "llava_fix_detail     CLS last",
        "gpu_offload          False",
        "llm_backend          cpu",
        "vision_backend       cpu",
        "devices              CPU (cpu), CUDA0 (gpu)",
        "cpu_features         AVX2, FMA"]
    as_json = render.to_json(DOCTOR)
    assert list(as_json) == ["llava_gguf", "python", "platform", "llama_cpp_python", "gguf", "transformers", "torch",
                             "llama_cpp_lib_path", "mtmd_lib_path", "mtmd_variant", "tools_path", "llava_fix",
                             "llava_fix_detail", "gpu_offload", "llm_backend", "vision_backend", "devices",
                             "cpu_features", "system_info"]
    assert as_json["devices"] == [{"name": "CPU", "description": "AMD EPYC", "type": "cpu"},
                                  {"name": "CUDA0", "description": "A100", "type": "gpu"}]
    assert as_json["cpu_features"] == ["AVX2", "FMA"] and as_json["system_info"] == "CPU : AVX2 = 1 | FMA = 1 |"
    fixed = DoctorReport(**{**{f: getattr(DOCTOR, f) for f in as_json}, "llava_fix": True})
    assert render.doctor_lines(fixed)[11] == "llava_fix            yes"
    with pytest.raises(AttributeError):  # reports are frozen
        DOCTOR.llava_fix = True


def test_show_and_chat(capsys):
    st = EvalStats(prompt_tokens=20, reused_tokens=4, evaluated_tokens=16, images_encoded=1, generated_tokens=5,
                   prompt_seconds=0.5, first_token_seconds=0.6, generate_seconds=0.4)
    assert render.chat_json(" hi \n", st) == {
        "text": "hi", "prompt_tokens": 20, "reused_tokens": 4, "generated_tokens": 5, "images_encoded": 1,
        "prompt_seconds": 0.5, "first_token_seconds": 0.6, "generation_tokens_per_second": 10.0}
    assert render.timings(st) == ("prompt: 20 tokens (4 from the cache, 16 decoded, 1 image(s) encoded) in 0.50 s, "
                                  "32.0 tok/s; first token after 0.60 s; 5 tokens at 10.0 tok/s")
    render.show(True, st, lambda s: render.chat_json("x", s), lambda s: pytest.fail("the text form was built"))
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and json.loads(out)["text"] == "x"  # one JSON line
    render.show(False, DOCTOR, render.to_json, render.doctor_lines)
    assert capsys.readouterr().out.splitlines()[11].startswith("llava_fix ")
    render.show(True, DOCTOR, render.to_json, lambda r: pytest.fail("the text form was built"))
    assert json.loads(capsys.readouterr().out) == render.to_json(DOCTOR)


def test_quant_type_list():
    lines = render.quant_type_lines(QUANT_TYPES)
    assert len(lines) == len(QUANT_TYPES) and lines[0].startswith(f"{QUANT_TYPES[0].name:8} ")
    assert any(line.endswith("  (needs --imatrix)") for line in lines)
    types = render.quant_types_json(QUANT_TYPES)["types"]
    assert [t["name"] for t in types] == [t.name for t in QUANT_TYPES]
    assert set(types[0]) == {"name", "bpw", "note", "needs_imatrix"}


def test_quant_type_list_columns_align():
    """`quantize --list`: every row's bits-per-weight and note columns start where every other row's do,
    the longest name (MXFP4_MOE) included, with two spaces at least between the columns."""
    import re

    lines = render.quant_type_lines(QUANT_TYPES)
    assert any(line.startswith("MXFP4_MOE ") for line in lines)
    bpw_ends = {line.index(" bpw  ") for line in lines}
    assert len(bpw_ends) == 1, lines
    note_start = bpw_ends.pop() + len(" bpw  ")
    for line, t in zip(lines, QUANT_TYPES):
        name_column = re.match(r"(\S+)( +)", line)
        assert name_column.group(1) == t.name and len(name_column.group(2)) >= 2, line
        assert line[note_start:].startswith(t.note), line
