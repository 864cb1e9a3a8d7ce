"""The synthetic shapes task, the small LLaVA trained on it and shipped with the package, and what it
makes measurable: answers that are right or wrong, through transformers and through our GGUF files."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from llava_gguf import LLaVA
from llava_gguf.demo import shapes
from llava_gguf.demo.run import SHIPPED_MODEL

SAMPLE = 200  # test questions checked here; bench/accuracy.py runs the whole split


def test_generator_is_deterministic_and_consistent():
    a, b = shapes.scene("test", 11), shapes.scene("test", 11)
    assert a == b and a.caption() == b.caption() and a.questions() == b.questions()
    assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    # the splits are different scenes
    assert shapes.scene("train", 11) != a and shapes.scene("val", 11) != a
    # pinned: the same scenes and questions on every machine (a changed generator changes this on purpose;
    # the pixels are Pillow's drawing of them, compared across processes below)
    h = hashlib.sha256()
    for sc, q in shapes.questions("test", 0, 20):
        h.update(f"{sc.caption()}|{q.text}|{q.answer}".encode())
    assert h.hexdigest()[:16] == PINNED
    code = ("import hashlib, numpy as np; from llava_gguf.demo import shapes; "
            "print(hashlib.sha256(b''.join(np.asarray(shapes.scene('test', i).image()).tobytes() "
            "for i in range(20))).hexdigest())")
    here = hashlib.sha256(b"".join(np.asarray(shapes.scene("test", i).image()).tobytes() for i in range(20))).hexdigest()
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == here
    for i in range(300):
        sc = shapes.scene("val", i)
        assert len({s.cell for s in sc.shapes}) == len({s.color for s in sc.shapes}) == len(sc.shapes)
        qs = {q.kind: q for q in sc.questions()}
        assert qs["count"].answer == shapes.COUNTS[len(sc.shapes) - 1]
        assert qs["exists"].answer == ("yes" if any(f"{s.color} {s.shape}" in qs["exists"].text for s in sc.shapes)
                                       else "no")
        target = next(s for s in sc.shapes if s.shape in qs["color"].text)
        assert qs["color"].answer == target.color and qs["position"].answer == target.position
    kinds = [q.kind for _, q in shapes.questions("test", 0, 20)]
    assert all(kinds.count(k) == 4 for k in shapes.QUESTION_KINDS)


PINNED = "b24adf7af3e954f1"


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        pytest.fail(f"the shipped model is missing: {SHIPPED_MODEL}")
    return SHIPPED_MODEL


@pytest.fixture(scope="module")
def sample():
    return shapes.questions("test", 0, SAMPLE)


@pytest.fixture(scope="module")
def hf_reference(shipped, sample):
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(shipped, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(shipped)
    return shapes.hf_answers(model, tok, sample)


@pytest.fixture(scope="module")
def gguf_files(shipped, tmp_path_factory):
    from llava_gguf.convert import convert_checkpoint
    from llava_gguf.quantize import quantize_gguf

    work = tmp_path_factory.mktemp("shapes")
    f32 = convert_checkpoint(shipped, work / "f32", outtype="f32", mmproj_type="f32", name="s")
    f16 = convert_checkpoint(shipped, work / "f16", outtype="f16", mmproj_type="f16", name="s")
    return {"F32": (f32.llm, f32.mmproj), "F16": (f16.llm, f16.mmproj),
            "Q8_0": (quantize_gguf(f16.llm, "Q8_0", work / "s-Q8_0.gguf").output, f16.mmproj),
            "Q4_K_M": (quantize_gguf(f16.llm, "Q4_K_M", work / "s-Q4_K_M.gguf").output, f16.mmproj)}


def test_runtime_prompt_is_the_training_prompt(shipped, gguf_files):
    """What llama.cpp/libmtmd feed the model for a question is, token for token, the prompt the model was
    trained and is evaluated on in transformers."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shipped)
    cfg = AutoConfig.from_pretrained(shipped)
    with LLaVA(*gguf_files["F16"], n_threads=2) as m:
        for sc, q in shapes.questions("test", 40, 5):
            ids = m.eval_prompt(q.text, [sc.image()])
            assert ids == shapes.hf_prompt(tok, q.text, cfg.image_token_id, cfg.image_seq_length), q.text


def test_shipped_model_answers_correctly_in_transformers(hf_reference, sample):
    """The issue's check: >= 95% through transformers fp32 on the suite's fixed sample (97.0% here: colour,
    shape, count and "is there" 100%, position 85%), and no kind of question left near chance: position,
    what the model still gets wrong most, at least 80%, every other kind above 95%. On the whole test split
    (bench/accuracy.py) the model has 96.8%, position 84.4%."""
    acc = shapes.accuracy(hf_reference, sample)
    assert acc >= 0.95, f"transformers fp32 accuracy {acc:.3f}"
    by_kind = shapes.accuracy_by_kind(hf_reference, sample)
    assert set(by_kind) == set(shapes.QUESTION_KINDS)
    for kind in shapes.QUESTION_KINDS:
        assert by_kind[kind] >= (0.8 if kind == "position" else 0.95), (kind, by_kind)


@pytest.mark.parametrize("label,bound", [("F32", 0.99), ("F16", 0.99), ("Q8_0", 0.98)])
def test_gguf_answers_agree_with_transformers(gguf_files, hf_reference, sample, label, bound):
    with LLaVA(*gguf_files[label], n_threads=2) as m:
        answers = shapes.gguf_answers(m, sample)
    assert shapes.agreement(answers, hf_reference) >= bound


def test_q4_k_m_keeps_the_accuracy(gguf_files, hf_reference, sample):
    with LLaVA(*gguf_files["Q4_K_M"], n_threads=2) as m:
        answers = shapes.gguf_answers(m, sample)
    assert shapes.accuracy(answers, sample) >= shapes.accuracy(hf_reference, sample) - 0.05


def test_shipped_checkpoint_is_a_standard_llava(shipped):
    cfg = json.loads((shipped / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["text_config"]["hidden_size"] % 256 == 0 and cfg["text_config"]["intermediate_size"] % 256 == 0
    assert cfg["vision_config"]["patch_size"] == 14
    # float16 weights, and no sub-config claiming another dtype (a stage reloaded from disk says float32 there)
    from safetensors import safe_open

    with safe_open(shipped / "model.safetensors", "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}
    assert cfg["dtype"] == "float16"
    assert cfg["text_config"].get("dtype", "float16") == cfg["vision_config"].get("dtype", "float16") == "float16"
    assert (shipped / "README.md").read_text().startswith("# shapes-llava")
    assert json.loads((shipped / "training.json").read_text())["task"] == "llava_gguf.shapes"
    assert sum(f.stat().st_size for f in shipped.iterdir()) < 20e6  # a few MB, carried by pip


def test_quality_report_on_a_trained_model(gguf_files, tmp_path):
    """`quality` on a model whose answers mean something: Q8_0 is nearly the F16 model, Q4_K_M measurably
    further away, and both still give the F16 model's answers to the task's questions."""
    from llava_gguf.checks.quality import measure_quality

    images = tmp_path / "images"
    images.mkdir()
    prompts = []
    for sc, q in shapes.questions("test", 500, 10):
        sc.image().save(images / f"{sc.index}.png")
        prompts.append(q.text)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    f16, mm = gguf_files["F16"]
    reports = {label: measure_quality(f16, gguf_files[label][0], base_mmproj=mm, images=images,
                                      prompts=tmp_path / "prompts.txt", tokens=8)
               for label in ("Q8_0", "Q4_K_M")}
    q8, q4 = reports["Q8_0"], reports["Q4_K_M"]
    assert q8.kl_mean < 0.01 and q8.top1 >= 0.98
    assert q4.kl_mean < 0.2 and q4.top1 >= 0.9
    assert q8.kl_mean < q4.kl_mean
    assert q8.same_answers >= 0.95 * q8.pairs and q4.same_answers >= 0.8 * q4.pairs
