"""cli/render.py: every report as text and as its --json form, from constructed reports (no model, no file).
The strings are the CLI's contract: scripts and the integration tests parse them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_gguf.checks.inspect import CheckpointReport, GgufReport
from llava_gguf.checks.quality import QualityReport
from llava_gguf.checks.verify import VerifyReport
from llava_gguf.cli import render
from llava_gguf.convert import ConvertResult
from llava_gguf.gguf.repair import RepairResult
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
    text_model="llama", vision_from="checkpoint", weights={"format": "safetensors", "files": 1, "bytes": 7918848},
    dtypes={"F32": 80}, parameters={"language_model": 1705216, "vision_tower": 192064, "projector": 82432,
                                    "total": 1979712},
    text={"layers": 2, "hidden_size": 256, "vocab_size": 1024},
    vision={"layers": 3, "hidden_size": 64, "image_size": 112, "patch_size": 14, "image_tokens": 64, "feature_layer": -2},
    convert_writes={"llm": "ck-F16.gguf", "mmproj": "mmproj-ck-F16.gguf", "projector_type": "mlp", "vision_blocks": 2,
                    "clip.vision.feature_layer": [2]})


def test_inspect_checkpoint():
    assert render.inspect_lines(CHECKPOINT) == [
        "ck: llava-1.5 checkpoint (LlavaForConditionalGeneration, transformers-5 layout, llama text model)",
        "weights     1 safetensors file(s), 0.01 GB, dtypes F32 x80",
        "parameters  2.0 M (language model 1.7 M, vision tower 0.2 M, projector 0.1 M)",
        "vision      3 layers, 112 px / 14 -> 64 image tokens, feature layer -2",
        "convert     -> ck-F16.gguf + mmproj-ck-F16.gguf (2 vision blocks, feature layer [2])"]
    as_json = CHECKPOINT.to_json()
    assert list(as_json) == ["kind", "path", "family", "layout", "architecture", "text_model", "vision_from", "weights",
                             "dtypes", "parameters", "text", "vision", "convert_writes", "defects"]
    assert as_json["kind"] == "checkpoint" and as_json["defects"] == []
    assert render.inspect_lines(as_json) == render.inspect_lines(CHECKPOINT)  # the JSON form renders the same


MMPROJ = {"kind": "gguf", "path": "mm.gguf", "bytes": 464832, "role": "mmproj", "architecture": "clip", "name": "t",
          "tensors": 41, "parameters": 224384, "tensor_types": {"F16": 15, "F32": 26}, "file_type": "F16",
          "projector_type": "mlp", "image_size": 112, "patch_size": 14, "image_tokens": 64, "projection_dim": 256,
          "anyres": False, "stored_blocks": 2, "block_count": 2, "feature_layer": None, "layers_run": 2,
          "defects": [{"code": "feature-layer", "message": "no feature layer", "repairable": True},
                      {"code": "truncated", "message": "cut", "repairable": False}],
          "metadata": {"general.architecture": "clip"}}


def test_inspect_gguf():
    report = GgufReport(MMPROJ)
    assert report.to_json() == MMPROJ and report.role == "mmproj" and len(report.defects) == 2
    assert render.inspect_lines(report) == [
        "mm.gguf: mmproj GGUF (clip), 0.5 MB, 41 tensors, 0.2 M parameters, file type F16",
        "tensor types  F16 x15, F32 x26",
        "projector     mlp, 112 px / 14 -> 64 image tokens",
        "vision layers 2 stored, block_count 2, feature layer not set, libmtmd runs 2",
        "DEFECT feature-layer: no feature layer (`llava-gguf repair` fixes it)",
        "DEFECT truncated: cut (not repairable: convert again)"]
    llm = {"kind": "gguf", "path": "m.gguf", "bytes": 3436640, "role": "llm", "architecture": "llama", "tensors": 21,
           "parameters": 1705216, "tensor_types": {"F16": 16, "F32": 5}, "file_type": "F16", "block_count": 2,
           "embedding_length": 256, "context_length": 4096, "head_count": 4, "head_count_kv": 2, "vocab_size": 1024,
           "tokenizer": "llama", "chat_template": False, "defects": []}
    assert render.inspect_lines(GgufReport(llm))[2:] == [
        "model         2 layers, width 256, 4 heads (2 kv), vocab 1024 (llama), context 4096",
        "chat template no (chat uses the family default)",
        "defects       none found"]


def test_doctor_and_chat(capsys):
    report = {"llava_gguf": "0.1.0", "llava_fix": False, "devices": [{"name": "CPU", "type": "cpu"}],
              "cpu_features": ["AVX2", "FMA"], "system_info": "long"}
    assert render.doctor_lines(report) == [
        "llava_gguf           0.1.0",
        "llava_fix            NO (image features will not match the reference)",
        "devices              CPU (cpu)",
        "cpu_features         AVX2, FMA"]
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
    render.show(False, report, dict, render.doctor_lines)
    assert capsys.readouterr().out.splitlines()[1].startswith("llava_fix ")


def test_quant_type_list():
    lines = render.quant_type_lines(QUANT_TYPES)
    assert len(lines) == len(QUANT_TYPES) and lines[0].startswith(f"{QUANT_TYPES[0].name:8} ")
    assert any(line.endswith("  (needs --imatrix)") for line in lines)
    types = render.quant_types_json(QUANT_TYPES)["types"]
    assert [t["name"] for t in types] == [t.name for t in QUANT_TYPES]
    assert set(types[0]) == {"name", "bpw", "note", "needs_imatrix"}
