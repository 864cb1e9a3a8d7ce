"""`llava-gguf batch` on the shipped model: greedy records equal LLaVA.generate_from_image for --parallel 1 and 3;
questions about one image share its prefill; LLaVA's question JSONL in, its answer format out, a bad image an
`error` record and a non-zero exit; SIGKILL at random points then --resume gives every record exactly once
with the answers of an uninterrupted run."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_gguf import LLaVA
from llava_gguf.batch.api import run
from llava_gguf.demo import shapes
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.sampling import sampling_settings
from support import run_cli

MAX_TOKENS = 24
IMAGE_ROWS = 36


@pytest.fixture(scope="module")
def files(shipped_gguf):
    return locate_pair(shipped_gguf)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six scene images, and LLaVA's question JSONL about them (four questions for two images)."""
    root = tmp_path_factory.mktemp("batch")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    scenes = [sc for sc, _ in shapes.questions("test", 200, 6)]
    for i, sc in enumerate(scenes):
        sc.image().save(images / ("sub" if i % 2 else "") / f"scene{i}.png")
    qs = root / "questions.jsonl"
    lines = []
    for i in (0, 1):
        name = f"{'sub/' if i % 2 else ''}scene{i}.png"
        for j, text in enumerate((shapes.DESCRIBE, "How many shapes are there?", "What color is the shape?",
                                  "Where is the shape?")):
            lines.append({"question_id": 100 + 10 * i + j, "image": name, "text": text, "category": "shapes"})
    lines.append({"question_id": 999, "image": "missing.png", "text": "Hi?"})
    qs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture(scope="module")
def reference(files):
    cache: dict = {}

    def answer(image_path: Path, question: str) -> str:
        key = (str(image_path), question)
        if key not in cache:
            with LLaVA(*files, n_threads=2) as m:
                cache[key] = m.generate_from_image(image_path, question, temperature=0, max_tokens=MAX_TOKENS)
        return cache[key]

    return answer


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("parallel", [1, 3])
def test_captions_equal_generate_from_image(files, folder, reference, parallel):
    with run(files[0].parent, folder / "images", prompt=shapes.DESCRIBE, parallel=parallel,
             sampling=sampling_settings(temperature=0, max_tokens=MAX_TOKENS), threads=2) as records:
        got = list(records)
        engine = records.engine
    assert len(got) == 6 and all(r.get("error") is None for r in got)
    # a caption each: a KV cache per sequence (nothing copied), and still every answer generate_from_image's
    assert not engine.shares and engine.stats.copied == 0
    for r in got:
        assert r["text"] == reference(folder / "images" / r["question_id"], shapes.DESCRIBE), r
        assert len(r["image_sha256"]) == 64 and r["tokens"]["completion"] > 3


def test_questions_about_one_image_share_its_prefill(files, folder):
    with run(files[0].parent, folder / "questions.jsonl", image_folder=folder / "images", parallel=3, threads=2,
             sampling=sampling_settings(temperature=0, max_tokens=MAX_TOKENS)) as records:
        got = list(records)
        stats = records.engine.stats
    assert len(got) == 9 and sum(r.get("error") is not None for r in got) == 1
    assert stats.images_encoded == 2  # two images, four questions each
    # the second to fourth question of each image took its rows from a cache (copied from the sequence that
    # decoded them, or kept in the sequence itself)
    assert stats.copied + stats.reused >= 2 * 3 * IMAGE_ROWS
    for image in ("scene0.png", "sub/scene1.png"):
        cached = sorted(r["tokens"]["cached"] for r in got if r["image"].endswith(image))
        # its rows decoded once: one question decoded them, the three others found them cached
        assert len(cached) == 4 and cached[0] < IMAGE_ROWS and min(cached[1:]) > IMAGE_ROWS, (image, cached)


def test_llava_jsonl_in_answer_format_out_and_an_error_record(files, folder, reference, tmp_path):
    out = tmp_path / "answers.jsonl"
    p = run_cli("batch", str(files[0].parent), str(folder / "questions.jsonl"), "-o", str(out),
                "--image-folder", str(folder / "images"), "--temp", "0",
                "--max-tokens", str(MAX_TOKENS), "--parallel", "3", "--threads", "2")
    assert p.returncode == 1, p.stderr  # one record failed: the exit status counts them
    assert "1 failed" in p.stderr and "Traceback" not in p.stderr
    records = {r["question_id"]: r for r in read(out)}
    assert sorted(records) == [100, 101, 102, 103, 110, 111, 112, 113, 999]
    for qid, r in records.items():
        assert {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"} <= set(r)
        if qid == 999:
            assert "not found" in r["error"] and r["text"] == ""
            continue
        assert r.get("error") is None and r["category"] == "shapes" and r["model_id"] == files[0].stem
        assert r["text"] == reference(folder / "images" / r["image"].split("images/")[1], r["prompt"])
    # an existing OUT is never overwritten without --force, and the model is not even loaded for it
    again = run_cli("batch", str(files[0].parent), str(folder / "questions.jsonl"), "-o", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr
    assert len(read(out)) == 9


def test_sigkill_then_resume_gives_every_record_once(files, folder, tmp_path):
    source = tmp_path / "list.txt"
    images = sorted((folder / "images").rglob("*.png"))
    # 24 records: every image four times under different names (symlinks), so a run lasts long enough to kill
    names = []
    for k in range(4):
        for img in images:
            link = tmp_path / f"copy{k}-{img.name}"
            link.symlink_to(img)
            names.append(link.name)
    source.write_text("\n".join(names) + "\n")
    args = [str(files[0].parent), str(source), "--prompt", shapes.DESCRIBE, "--temp", "0", "--max-tokens",
            str(MAX_TOKENS), "--parallel", "2", "--threads", "2"]
    whole = tmp_path / "whole.jsonl"
    assert run_cli("batch", *args, "-o", str(whole)).returncode == 0
    want = {r["key"]: r["text"] for r in read(whole)}
    assert len(want) == 24

    out = tmp_path / "killed.jsonl"
    rng = random.Random(7)
    for attempt in range(3):
        cmd = [sys.executable, "-m", "llava_gguf", "batch", *args, "-o", str(out)] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = rng.randint(1, 20)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= target:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert out.read_bytes().count(b"\n") < 24  # the killed runs left work for --resume
    done = run_cli("batch", *args, "-o", str(out), "--resume")
    assert done.returncode == 0, done.stderr
    got = read(out)
    assert len(got) == len({r["key"] for r in got}) == 24  # each record exactly once
    assert {r["key"]: r["text"] for r in got} == want  # the answers of the uninterrupted run
