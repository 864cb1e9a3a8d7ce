"""`llava-gguf serve` through the official `openai` client, unchanged (sync, streaming, async), on a real server
process: its greedy answers are LLaVA.generate_from_image's on the same files, a follow-up reuses the
conversation's cache, a second client asking about the same image gets the image's cells copied from the
first one's sequence, and four clients at once get their own answers (no cross-talk)."""
from __future__ import annotations

import asyncio
import json
import threading
import urllib.request

import openai
import pytest

from llava_gguf import LLaVA
from llava_gguf.demo import shapes
from llava_gguf.gguf.pairing import locate_pair
from support import image_uri, serve_process, user_turn

MAX_TOKENS = 48
SCENES = [sc for sc, _ in shapes.questions("test", 60, 8)][::2]  # 4 scenes


@pytest.fixture(scope="module")
def files(shipped_gguf):
    return locate_pair(shipped_gguf)


@pytest.fixture(scope="module")
def reference(files):
    """Greedy answers of LLaVA in this process (a fresh model: nothing shared with the server)."""
    cache: dict = {}

    def answer(image, question: str) -> str:
        key = (image.tobytes(), question)
        if key not in cache:
            with LLaVA(*files, n_threads=2) as m:
                cache[key] = m.generate_from_image(image, question, temperature=0, max_tokens=MAX_TOKENS)
        return cache[key]

    return answer


@pytest.fixture(scope="module")
def server(shipped_gguf):
    with serve_process(shipped_gguf, "--parallel", "4", "--threads", "2", "--model-alias", "shapes") as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def metric(server: str, name: str) -> float:
    with urllib.request.urlopen(server + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["shapes"]
    with urllib.request.urlopen(server + "/health") as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["parallel"] == 4 and health["api_key_required"] is False


def test_greedy_answer_equals_generate_from_image_sync_and_streaming(client, reference):
    scene = SCENES[0]
    want = reference(scene.image(), shapes.DESCRIBE)
    assert len(want.split()) > 3  # a caption: several tokens to compare
    r = client.chat.completions.create(model="shapes", messages=[user_turn(shapes.DESCRIBE, image_uri(scene.image()))],
                                       temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 36 and r.usage.completion_tokens > 0  # image rows + text

    stream = client.chat.completions.create(model="shapes",
                                            messages=[user_turn(shapes.DESCRIBE, image_uri(scene.image()))],
                                            temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same request again: everything but the last prompt position comes from the cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_async_client(server, reference):
    scene = SCENES[1]
    question = "What color is the shape?"

    async def ask() -> str:
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0) as aclient:
            r = await aclient.chat.completions.create(model="shapes",
                                                      messages=[user_turn(question, image_uri(scene.image()))],
                                                      temperature=0, max_tokens=MAX_TOKENS)
            return r.choices[0].message.content

    assert asyncio.run(ask()) == reference(scene.image(), question)


def test_follow_up_reuses_the_conversation_and_equals_it_from_scratch(client, files):
    scene = SCENES[2]
    messages = [user_turn(shapes.DESCRIBE, image_uri(scene.image()))]
    first = client.chat.completions.create(model="shapes", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "How many shapes are there?"}]
    second = client.chat.completions.create(model="shapes", messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    with LLaVA(*files, n_threads=2) as m:  # the same conversation from scratch
        session = m.chat()
        assert session.ask(shapes.DESCRIBE, [scene.image()], temperature=0, max_tokens=MAX_TOKENS) \
            == first.choices[0].message.content
        assert session.ask("How many shapes are there?", temperature=0, max_tokens=MAX_TOKENS) \
            == second.choices[0].message.content


def test_second_client_same_image_gets_the_image_rows_from_the_cache(server, reference):
    scene = SCENES[3]
    a = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    b = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    first = a.chat.completions.create(model="shapes", messages=[user_turn(shapes.DESCRIBE, image_uri(scene.image()))],
                                      temperature=0, max_tokens=MAX_TOKENS)
    question = "How many shapes are there?"
    copied = metric(server, "llava_gguf_copied_positions_total")
    second = b.chat.completions.create(model="shapes", messages=[user_turn(question, image_uri(scene.image()))],
                                       temperature=0, max_tokens=MAX_TOKENS)
    image_rows = 36  # the shipped model: 6x6 patches
    assert first.usage.prompt_tokens_details.cached_tokens < image_rows
    assert second.usage.prompt_tokens_details.cached_tokens >= image_rows
    # copied into another sequence (llama_memory_seq_cp), not taken over: the first conversation keeps its cells
    assert metric(server, "llava_gguf_copied_positions_total") - copied >= image_rows
    assert second.choices[0].message.content == reference(scene.image(), question)


def test_four_clients_at_once_get_their_own_answers(server, reference):
    want = [reference(sc.image(), shapes.DESCRIBE) for sc in SCENES]
    assert len(set(want)) == len(want)  # different images, different answers: cross-talk would show
    got: dict[int, str] = {}
    barrier = threading.Barrier(len(SCENES))

    def ask(i: int) -> None:
        c = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
        barrier.wait()
        stream = c.chat.completions.create(model="shapes",
                                           messages=[user_turn(shapes.DESCRIBE, image_uri(SCENES[i].image()))],
                                           temperature=0, max_tokens=MAX_TOKENS, stream=True)
        got[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(SCENES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert [got.get(i) for i in range(len(SCENES))] == want
