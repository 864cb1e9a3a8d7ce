"""The Python API's conversations: KV-cache reuse that changes nothing but the cost, image caching by
content, no stale images, transcripts, context limits, and the constructor's other names."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from llava_gguf import LLaVA, LlavaGgufError
from llava_gguf.runtime.prompt import Message
from devkit.tiny import sample_image

GREEDY = dict(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def pair(tiny, converted):
    return converted(tiny(), "f16")


def _from_scratch(pair, messages, images) -> str:
    with LLaVA(*pair) as fresh:
        return "".join(fresh.stream_messages(messages, images, **GREEDY))


def test_three_turns_reuse_the_cache_and_answer_as_from_scratch(pair):
    a, b = sample_image(112, seed=1), sample_image(112, seed=2)
    with LLaVA(*pair) as m:
        s = m.chat(system="You are a careful assistant.")
        first = s.ask("What is in the image?", [a], **GREEDY)
        t1 = m.last
        second = s.ask("Which colours are there?", **GREEDY)
        t2 = m.last
        third = s.ask("How does this one differ?", [b], **GREEDY)
        t3 = m.last
        turns = list(s.turns)
    assert (t1.images, t1.images_encoded, t1.reused_tokens) == (1, 1, 0)
    # the follow-up: the system prompt, the image and the first question come from the cache
    assert t2.images_encoded == 0 and t2.reused_tokens >= t1.prompt_tokens
    assert t2.evaluated_tokens == t2.prompt_tokens - t2.reused_tokens
    assert t2.evaluated_tokens <= t2.prompt_tokens - t1.prompt_tokens
    assert t3.images == 2 and t3.images_encoded == 1 and t3.reused_tokens >= t2.prompt_tokens
    # ... and so does the answer, as the tokens it was generated as (all but the last, which was sampled
    # and never decoded): only the end of the turn and the new question are decoded
    for before, after, answer in ((t1, t2, turns[1]), (t2, t3, turns[3])):
        assert answer.tokens and list(answer.tokens) == list(before.answer_tokens)
        assert after.reused_tokens == before.prompt_tokens + len(answer.tokens) - 1
    # the same conversation from scratch, turn by turn, gives the same greedy answers
    sys_msg = [Message("system", "You are a careful assistant.")]
    assert _from_scratch(pair, sys_msg + [Message("user", "What is in the image?", 1)], [a]).strip() == first.strip()
    convo = sys_msg + [Message("user", "What is in the image?", 1), Message("assistant", turns[1].text, tokens=turns[1].tokens),
                       Message("user", "Which colours are there?")]
    assert _from_scratch(pair, convo, [a]).strip() == second.strip()
    convo += [Message("assistant", turns[3].text, tokens=turns[3].tokens), Message("user", "How does this one differ?", 1)]
    assert _from_scratch(pair, convo, [a, b]).strip() == third.strip()


def test_alternating_images_never_go_stale(pair):
    imgs = [sample_image(112, seed=5), sample_image(112, seed=6)]
    with LLaVA(*pair) as ref:
        expected = []
        for im in imgs:
            ref.reset()
            ref.engine.images.cache.clear()
            ref.eval_prompt("What is in the image?", [im])
            expected.append(ref.last_logits())
        assert not np.allclose(expected[0], expected[1])
    apart = np.abs(expected[0] - expected[1]).max()

    def check(logits, k):
        # KV cells reused in another order change the last float bits, nothing more: the logits are those
        # of the image asked about, far from the other image's
        assert np.abs(logits - expected[k]).max() < 0.01 * apart
        assert np.abs(logits - expected[1 - k]).max() > 0.5 * apart

    with LLaVA(*pair) as m:
        for k in [0, 1, 0, 0, 1, 1, 0]:  # one-shot calls, the cache warm
            m.eval_prompt("What is in the image?", [imgs[k]])
            check(m.last_logits(), k)
        s1, s2 = m.chat(), m.chat()
        for k, s in ((1, s1), (0, s2), (0, s1)):
            s.ask("Describe it.", [imgs[k]], **GREEDY)
        m.eval_prompt("What is in the image?", [imgs[1]])
        check(m.last_logits(), 1)


def test_exif_rotated_image_embeds_like_the_upright_one(pair, tmp_path):
    from PIL import Image

    upright = sample_image(112, seed=9).resize((112, 84))
    upright.save(tmp_path / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone stores for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    stored.save(tmp_path / "rotated.png", exif=exif.tobytes())
    with LLaVA(*pair) as m:
        np.testing.assert_array_equal(m.embed_image(tmp_path / "rotated.png"), m.embed_image(tmp_path / "upright.png"))
        assert not np.allclose(m.embed_image(stored), m.embed_image(upright))


def test_memory_stays_flat_over_many_one_shot_calls(pair):
    import resource  # noqa: F401  (POSIX)

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    with LLaVA(*pair) as m:
        for i in range(20):
            m.generate_from_image(sample_image(64, seed=1000 + i), "Hi?", temperature=0, max_tokens=1)
        before = rss_mb()
        for i in range(200):
            m.generate_from_image(sample_image(64, seed=i), "Hi?", temperature=0, max_tokens=1)
        assert rss_mb() - before < 50


def test_transcript_save_and_load(pair, tmp_path):
    img = tmp_path / "pic.png"
    sample_image(112, seed=3).save(img)
    with LLaVA(*pair) as m:
        s = m.chat(system="Be brief.")
        s.ask("What is this?", [img], **GREEDY)
        s.ask("Sure?", **GREEDY)
        s.save(tmp_path / "t.json")
        t = m.chat()
        t.load(tmp_path / "t.json")
        assert t.history == s.history and t.system == "Be brief."
        assert [h["role"] for h in t.history] == ["system", "user", "assistant", "user", "assistant"]
        before = m.last
        t.ask("And now?", **GREEDY)
        # the whole saved conversation, its answers as generated, comes from the cache
        assert m.last.images_encoded == 0 and m.last.reused_tokens == before.prompt_tokens + len(before.answer_tokens) - 1
        sample_image(112, seed=4).save(img)  # the file changed since
        with pytest.raises(LlavaGgufError, match="changed"):
            m.chat().load(tmp_path / "t.json")


def test_context_limits(pair):
    img = sample_image(112, seed=1)
    with LLaVA(*pair, n_ctx=96) as m:  # 64 image rows + the template's text
        with pytest.raises(LlavaGgufError, match=r"needs \d+ tokens .* context holds 96"):
            m.chat().ask("What is in the image? " * 10, [img], **GREEDY)
        s = m.chat(on_overflow="drop_oldest")
        s.ask("Hi?", [img], temperature=0, max_tokens=2)
        s.ask("And?", [img], temperature=0, max_tokens=2)
        assert s.dropped_turns >= 2 and len(s.turns) == 2
        with pytest.raises(LlavaGgufError, match="context holds 96"):
            m.generate_from_image(img, "What is in the image? " * 20, **GREEDY)


def test_constructor_names_and_load(pair, tmp_path):
    llm, mmproj = pair
    with LLaVA(language_model_path=llm, vision_model_path=mmproj, device="cpu") as m:
        assert m.llm is not None
    for kwargs, words in [(dict(model_path=llm, language_model_path=llm, mmproj_path=mmproj), "not both"),
                          (dict(model_path=llm, mmproj_path=mmproj, device="cpu", n_gpu_layers=1), "not both"),
                          (dict(model_path=llm, mmproj_path=mmproj, device="tpu"), "unknown device"),
                          (dict(model_path=llm, mmproj_path=mmproj, device="cuda"), "not in this build"),
                          (dict(model_path=llm), "needs the language model and the mmproj")]:
        with pytest.raises(LlavaGgufError, match=words):
            LLaVA(**kwargs)
    d = tmp_path / "out"
    d.mkdir()
    shutil.copy(llm, d / "m-F16.gguf")
    shutil.copy(mmproj, d / "mmproj-m-F16.gguf")
    with LLaVA.load(d, n_ctx=512) as m:
        assert m.model_path == d / "m-F16.gguf" and m.n_ctx == 512
    shutil.copy(llm, d / "m-F32.gguf")
    with pytest.raises(LlavaGgufError, match="several language models"):
        LLaVA.load(d)
    with LLaVA.load(d, llm=d / "m-F32.gguf") as m:
        assert m.model_path.name == "m-F32.gguf"


def test_failed_turns_leave_the_conversation_as_it_was(pair):
    img = sample_image(112, seed=1)
    with LLaVA(*pair, n_ctx=160) as m:
        s = m.chat()
        s.ask("Hi?", [img], temperature=0, max_tokens=2)
        before = list(s.turns)
        with pytest.raises(LlavaGgufError, match="context holds 160"):
            s.ask("Tell me more. " * 40, **GREEDY)
        assert s.turns == before and s.dropped_turns == 0
        # text that contains the image placeholder is text, not an image slot
        s.ask("What does <image> mean here?", temperature=0, max_tokens=2)
        assert s.turns[-2].text == "What does <image> mean here?" and len(s.turns) == 4


def test_seed_none_is_random_again_after_a_seeded_call(pair):
    img = sample_image(112, seed=1)
    with LLaVA(*pair) as m:
        sampled = dict(temperature=1.5, top_k=0, top_p=1.0, max_tokens=12)
        a = m.generate_from_image(img, "Hi?", seed=42, **sampled)
        assert m.generate_from_image(img, "Hi?", seed=42, **sampled) == a
        others = {m.generate_from_image(img, "Hi?", **sampled) for _ in range(3)}
        assert others != {a}
