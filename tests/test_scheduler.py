"""runtime/scheduler.py in process (the loop `serve` and `batch` run): four questions about one image
submitted at once share its prefill — the image is encoded once, its rows decoded once and copied into the
other sequences — and every answer is the one LLaVA gives alone; a cancelled job frees its sequence."""
from __future__ import annotations

import queue

import pytest

from llava_gguf import LLaVA
from llava_gguf.demo import shapes
from llava_gguf.gguf.pairing import locate_pair
from llava_gguf.runtime.engine import Engine
from llava_gguf.runtime.prompt import Message
from llava_gguf.runtime.sampling import sampling_settings
from llava_gguf.runtime.scheduler import Done, Failed, Job, Scheduler, Text

QUESTIONS = [shapes.DESCRIBE, "How many shapes are there?", "What color is the shape?", "Where is the shape?"]
IMAGE_ROWS = 36


@pytest.fixture(scope="module")
def files(shipped_gguf):
    return locate_pair(shipped_gguf)


def run_jobs(scheduler: Scheduler, asks: list[tuple[object, str]], max_tokens: int = 32) -> list[str]:
    boxes = []
    for image, question in asks:
        box: queue.Queue = queue.Queue()
        scheduler.submit(Job([Message("user", question, n_images=1)], [image],
                             sampling_settings(temperature=0, max_tokens=max_tokens), emit=box.put))
        boxes.append(box)
    answers = []
    for box in boxes:
        text = []
        while True:
            ev = box.get(timeout=120)
            assert not isinstance(ev, Failed), ev
            if isinstance(ev, Text):
                text.append(ev.text)
            if isinstance(ev, Done):
                break
        answers.append("".join(text))
    return answers


def test_questions_about_one_image_share_its_prefill(files):
    image = shapes.scene("test", 7).image()
    engine = Engine.open(*files, n_seq_max=4, n_threads=2)
    scheduler = Scheduler(engine, queue=8)
    try:
        answers = run_jobs(scheduler, [(image, q) for q in QUESTIONS])
        stats = engine.stats
        assert stats.images_encoded == 1
        assert stats.copied >= 3 * IMAGE_ROWS  # the image's rows were copied into the three other sequences
        # everything decoded (one prompt in full, the others' own text, the answers) is less than the four
        # prompts' image rows alone: the rows were decoded once (each request on its own: 209 positions)
        assert stats.decoded < 4 * IMAGE_ROWS, stats
    finally:
        assert scheduler.stop()
        engine.close()
    with LLaVA(*files, n_threads=2) as m:
        assert answers == [m.generate_from_image(image, q, temperature=0, max_tokens=32) for q in QUESTIONS]
