"""The runtime against hostile or careless use (issue 23): a closed model, text that is not UTF-8, settings
out of range (sampling, threads, a context larger than memory or than the model's sliding window), huge
or damaged images, and a vocabulary that cannot encode the prompt. Every one ends in our one-line error
or warning, in the API and in the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import gguf
import numpy as np
import pytest
from PIL import Image, ImageDraw

from support import run_cli
from support import rewrite_gguf
from llava_gguf import LLaVA, LlavaGgufError
from llava_gguf.errors import LlavaGgufWarning
from llava_gguf.runtime.images import load_image
from llava_gguf.runtime.prompt import Message
from devkit.tiny import sample_image


@pytest.fixture(scope="module")
def pair(tiny, converted):
    return converted(tiny(), "f16")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    sample_image(112, seed=5).save(path)
    return path


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def _ours(caught) -> list[str]:
    assert all(issubclass(w.category, LlavaGgufWarning) for w in caught), [(w.category, str(w.message)) for w in caught]
    return [str(w.message) for w in caught]


def _one_error_line(p: subprocess.CompletedProcess, *words: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert p.stdout == ""
    return lines[0][len("error: "):]


# --------------------------------------------------------------------------------------------- item 5
CLOSED_SCRIPT = textwrap.dedent("""
    import json, sys
    from llava_gguf import LLaVA, LlavaGgufError
    from llava_gguf.runtime.prompt import Message
    from llava_gguf.checks.samples import sample_image

    img = sample_image(112, seed=1)
    m = LLaVA(sys.argv[1], sys.argv[2])
    session = m.chat()
    stream = m.stream_from_image(img, "Hi?", temperature=0, max_tokens=50)
    next(stream)  # a stream started before close() ...
    m.close()
    m.close()  # twice: harmless
    calls = {
        "stream_resumed": lambda: next(stream),  # ... is not resumed on the freed context
        "generate_from_image": lambda: m.generate_from_image(img, "Hi?"),
        "stream_from_image": lambda: m.stream_from_image(img, "Hi?"),
        "stream_messages": lambda: m.stream_messages([Message("user", "Hi?")], []),
        "embed_image": lambda: m.embed_image(img),
        "eval_prompt": lambda: m.eval_prompt("Hi?"),
        "eval_messages": lambda: m.eval_messages([Message("user", "Hi?")], []),
        "eval_image": lambda: m.eval_image(img),
        "eval_tokens": lambda: m.eval_tokens([1, 2]),
        "eval_embeddings": lambda: m.eval_embeddings(__import__("numpy").zeros((1, 256), "float32")),
        "eval_chunks": lambda: m.eval_chunks(None),
        "count_prompt": lambda: m.count_prompt([Message("user", "Hi?")], []),
        "render": lambda: m.render([Message("user", "Hi?")]),
        "last_logits": lambda: m.last_logits(),
        "reset": lambda: m.reset(),
        "is_end_of_generation": lambda: m.is_end_of_generation(2),
        "n_ctx": lambda: m.n_ctx,
        "chat": lambda: m.chat(),
        "with": lambda: m.__enter__(),
        "session.ask": lambda: session.ask("Hi?", [img]),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except LlavaGgufError as e:
            out[name] = str(e)
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"
        print(json.dumps({name: out[name]}), flush=True)
    """)


def test_a_closed_model_raises_our_error_everywhere(pair, tmp_path):
    # a child process: the old code segfaulted here (exit 139)
    script = tmp_path / "closed.py"
    script.write_text(CLOSED_SCRIPT)
    p = subprocess.run([sys.executable, str(script), str(pair[0]), str(pair[1])], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, (p.returncode, p.stdout[-3000:], p.stderr[-3000:])
    results = {k: v for line in p.stdout.splitlines() for k, v in json.loads(line).items()}
    assert len(results) == 20
    for name, said in results.items():
        assert said.startswith("the model is closed"), (name, said)


# --------------------------------------------------------------------------------------------- item 7
def test_text_that_is_not_utf8_is_our_error(pair, image, tmp_path):
    img = sample_image(112, seed=1)
    with LLaVA(*pair) as m:
        for text, words in [("what \udcff is it", "character 6 is the byte 0xFF, which is not UTF-8"),
                            ("half an emoji \ud83d", r"character 15 is a lone surrogate U\+D83D")]:
            with pytest.raises(LlavaGgufError, match=words):
                m.generate_from_image(img, text, max_tokens=2)
        s = m.chat(system="be \udce9 brief")
        with pytest.raises(LlavaGgufError, match="the system prompt is not valid text"):
            s.ask("Hi?", [img], max_tokens=2)
        s.reset(system=None)
        with pytest.raises(LlavaGgufError, match="the prompt is not valid text"):
            s.ask("what \udcff", [img], max_tokens=2)
        assert s.turns == []  # the failed turn left the conversation as it was
        assert s.ask("what is it", [img], temperature=0, max_tokens=2)  # and it goes on
    # the CLI: an argument that is not UTF-8 reaches Python surrogate-escaped
    p = subprocess.run([sys.executable, "-m", "llava_gguf", "chat", str(pair[0]), "--mmproj", str(pair[1]),
                        "--image", str(image), "--prompt", b"what \xff is it", "--max-tokens", "2"],
                       capture_output=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert p.stderr.decode().strip() == ("error: the prompt is not valid text: character 6 is the byte 0xFF, which "
                                         "is not UTF-8 (give the text in UTF-8)")


# -------------------------------------------------------------------------------------------- item 14
BAD_SETTINGS = [
    ("max_tokens", 0, "--max-tokens", "max_tokens (--max-tokens) must be an integer of at least 1, not 0"),
    ("max_tokens", -3, "--max-tokens", "max_tokens (--max-tokens) must be an integer of at least 1, not -3"),
    ("temperature", -0.5, "--temp", "temperature (--temp) must be a number of at least 0 (0: greedy), not -0.5"),
    ("top_p", -0.1, "--top-p", "top_p (--top-p) must be a number from 0 to 1 (0: only the most likely token), not -0.1"),
    ("top_p", 1.5, "--top-p", "top_p (--top-p) must be a number from 0 to 1 (0: only the most likely token), not 1.5"),
    ("top_k", -1, "--top-k", "top_k (--top-k) must be an integer of at least 0 (0: all tokens), not -1"),
    ("repeat_penalty", 0.0, "--repeat-penalty",
     "repeat_penalty (--repeat-penalty) must be a number greater than 0 (1: none), not 0.0"),
    ("seed", -2, "--seed", "seed (--seed) must be an integer from 0 to 4294967294, or -1 for a random one, not -2"),
    ("seed", 2**32, "--seed",
     "seed (--seed) must be an integer from 0 to 4294967294, or -1 for a random one, not 4294967296"),
]


def test_the_api_refuses_bad_sampling_settings_with_a_value_error(pair):
    img = sample_image(112, seed=1)
    with LLaVA(*pair) as m:
        for key, value, _, message in BAD_SETTINGS:
            with pytest.raises(ValueError) as e:
                m.generate_from_image(img, "Hi?", **{key: value})
            assert isinstance(e.value, LlavaGgufError) and str(e.value) == message
            with pytest.raises(ValueError):  # refused when the stream is made, before anything is decoded
                m.stream_from_image(img, "Hi?", **{key: value})
        for stop, words in [("", "must not be empty"), ([""], "must not be empty"), ([1], "a string or a list"),
                            (5, "a string or a list")]:
            with pytest.raises(ValueError, match=words):
                m.generate_from_image(img, "Hi?", stop=stop)
        for min_p in (-3, "x", None, 1.5):
            with pytest.raises(ValueError, match="min_p must be a number from 0 to 1"):
                m.validate_sampling(min_p=min_p)
        s = m.chat()
        with pytest.raises(ValueError, match="max_tokens"):
            s.ask("Hi?", [img], max_tokens=0)
        assert s.turns == []
        assert m.generate_from_image(img, "Hi?", temperature=0, max_tokens=2, top_p=1.0, top_k=0, seed=-1)
        # accepted as llama.cpp takes them: top_p 0 (the most likely token), its own "random" seed 0xFFFFFFFF,
        # stop strings from any iterable (a generator is consumed once: it was checked, then found empty)
        settings = m.validate_sampling(top_p=0, seed=0xFFFFFFFF, stop=(s for s in ["###", "USER:"]))
        assert (settings.top_p, settings.seed, settings.stop) == (0.0, None, ("###", "USER:"))


@pytest.mark.parametrize("key,value,option,message", [BAD_SETTINGS[0], BAD_SETTINGS[4], BAD_SETTINGS[7]])
def test_the_cli_says_what_the_api_says(pair, image, key, value, option, message):
    p = run_cli("chat", str(pair[0]), "--mmproj", str(pair[1]), "--image", str(image), "--prompt", "Hi?",
                option, str(value))
    assert _one_error_line(p) == message


# -------------------------------------------------------------------------------------------- item 13
def test_threads_are_capped_at_the_cpus(pair, image):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LLaVA(*pair, n_threads=10000) as m:
            assert m.n_threads == usable_cpus()
    assert _ours(caught) == [f"10000 threads capped at {usable_cpus()}, the number of CPUs this process can use"]
    with pytest.raises(ValueError, match=r"n_threads \(--threads\) must be a positive integer"):
        LLaVA(*pair, n_threads=-1)
    p = run_cli("chat", str(pair[0]), "--mmproj", str(pair[1]), "--image", str(image), "--prompt", "Hi?",
                "--max-tokens", "2", "--threads", "10000")
    assert p.returncode == 0, p.stderr
    assert p.stderr == f"warning: 10000 threads capped at {usable_cpus()}, the number of CPUs this process can use\n"


def test_a_context_larger_than_memory_is_refused_before_allocating(pair, image):
    with pytest.raises(ValueError) as e:
        LLaVA(*pair, n_ctx=100_000_000)
    assert isinstance(e.value, LlavaGgufError)
    said = str(e.value)
    assert said.startswith("a context of 100000000 tokens needs ") and "of KV cache: 2 layers x 2 KV heads x 64 dims" \
        in said and "is available" in said, said
    # the CLI: one line, no warning about the training context first, and no gigabytes touched
    # the child's peak RSS from /proc (VmHWM: this process image's own), not getrusage's ru_maxrss, which
    # survives execve: a child spawned by this (by now large) pytest process would report pytest's size
    p = subprocess.run([sys.executable, "-c", "import re, runpy, sys; sys.argv = sys.argv[1:]\n"
                        "try: runpy.run_module('llava_gguf', run_name='__main__')\n"
                        "finally: print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1], "
                        "file=sys.stderr)",
                        "llava-gguf", "chat", str(pair[0]), "--mmproj", str(pair[1]), "--image", str(image),
                        "--prompt", "Hi?", "--ctx", "100000000"], capture_output=True, text=True, timeout=300)
    *lines, rss_kb = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: a context of 100000000 tokens"), \
        p.stderr
    assert int(rss_kb) < 1_000_000, rss_kb  # the old code allocated the KV cache (GBs) before failing


def test_a_context_above_the_training_context_is_a_warning(pair):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LLaVA(*pair, n_ctx=8192) as m:
            assert m.n_ctx == 8192
    assert _ours(caught) == ["a context of 8192 tokens is above the model's training context (4096 tokens); "
                             "answers past that length may degrade"]


# -------------------------------------------------------------------------------------------- item 16
@pytest.fixture(scope="module")
def windowed(pair, tmp_path_factory):
    """The pair with Mistral's sliding window recorded in the LLM (what convert writes for BakLLaVA)."""
    d = tmp_path_factory.mktemp("windowed")
    llm = rewrite_gguf(pair[0], d / "w-F16.gguf",
                      set_keys={"llama.attention.sliding_window": (300, gguf.GGUFValueType.UINT32)})
    return llm, pair[1]


def test_the_context_is_capped_at_the_sliding_window(windowed):
    img = sample_image(112, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with LLaVA(*windowed) as m:  # the default context (2048) is capped quietly
            assert m.n_ctx == 300
        assert caught == []
        with LLaVA(*windowed, n_ctx=1024) as m:  # an explicit one with a warning naming the window
            assert m.n_ctx == 300
            assert m.generate_from_image(img, "Hi?", temperature=0, max_tokens=3)
            with pytest.raises(LlavaGgufError, match=r"context holds 300 .*sliding window \(300 tokens\)"):
                m.generate_from_image(img, "word " * 300, max_tokens=3)
        with LLaVA(*windowed, n_ctx=200) as m:  # within the window: as asked
            assert m.n_ctx == 200
    assert _ours(caught) == ["the context is capped at 300 tokens (asked: 1024): the model attends within a sliding "
                             "window of 300 tokens, which llama.cpp's llama architecture does not apply, so a "
                             "longer context would compute something else than the model"]


# -------------------------------------------------------------------------------------------- item 12
def _bomb_png(path, side: int = 12000):
    """What outside testing sent: a 1-bit 12000x12000 PNG of about 17 KB (144 megapixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Image.new("1", (side, side), 0).save(path, optimize=True)
    return path


RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys, warnings
    from llava_gguf.runtime.images import content_hash, load_image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = load_image(sys.argv[1])
        content_hash(img)
    print(json.dumps({"size": img.size, "warnings": [[w.category.__name__, str(w.message)] for w in caught],
                      "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
    """)


def test_a_huge_png_is_reduced_early_with_our_warning(tmp_path, pair):
    bomb = _bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 30_000
    p = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bomb)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout)
    assert r["size"] == [2400, 2400]
    assert r["warnings"] == [["LlavaGgufWarning", f"{bomb} is 12000x12000 pixels (144 megapixels, above Pillow's "
                              "89-megapixel decompression-bomb warning limit): it is decoded and reduced to 2400x2400 "
                              "(scale it down first to save memory and time)"]]
    # memory is measured in bench/image_memory.py (docs/benchmarks.md), not asserted here: 1399 MiB before
    # (full-size copies: exif_transpose, RGB, tobytes, hash), ~300 MiB after
    # the CLI: the warning once (the image is loaded twice: checked before the model loads, then asked about)
    c = run_cli("chat", str(pair[0]), "--mmproj", str(pair[1]), "--image", str(bomb), "--prompt", "Hi?",
                "--max-tokens", "2")
    assert c.returncode == 0, c.stderr
    assert c.stderr == f"warning: {r['warnings'][0][1]}\n"


def test_damaged_exif_is_our_warning(tmp_path):
    img = Image.new("RGB", (64, 48), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate
    exif[0x010F] = "Camera"
    buf = tmp_path / "exif.jpg"
    img.save(buf, exif=exif.tobytes())
    raw = bytearray(buf.read_bytes())
    i = raw.index(b"Exif\0\0") + 6  # the TIFF header; its first IFD's entry count claims 64 entries
    raw[i + 8:i + 10] = b"\x40\x00" if raw[i:i + 2] == b"II" else b"\x00\x40"
    buf.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = load_image(buf)
        again = load_image(out)  # what the model does with a session's image
    assert out.size == (48, 64)  # the orientation Pillow could still read is applied, once
    assert again.size == (48, 64)
    said = _ours(caught)
    assert len(said) == 1 and said[0].startswith(f"{buf} has damaged EXIF metadata (Corrupt EXIF data."), said


def test_reduction_keeps_normal_photos_untouched_and_orientation(tmp_path):
    for size in [(4095, 3000), (4032, 3024), (300, 4095)]:  # below 2 x KEEP_SIDE: never reduced
        arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        assert np.array_equal(np.asarray(load_image(arr)), arr)
    assert load_image(Image.new("RGB", (4096, 100))).size == (2048, 50)
    assert load_image(Image.new("P", (9000, 30))).size == (2250, 8)  # palette images are reduced too
    # a large JPEG: decoded at a reduced scale (draft), then reduced; EXIF orientation still applied
    big = Image.new("RGB", (9000, 5000), (10, 200, 10))
    ImageDraw.Draw(big).rectangle((0, 0, 4500, 5000), fill=(200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "big.jpg"
    big.save(path, exif=exif.tobytes())
    out = load_image(path)
    assert out.size[0] < out.size[1] and 2048 <= max(out.size) < 4096, out.size
    assert np.array_equal(np.asarray(load_image(out)), np.asarray(out))  # loading it again changes nothing
    top, bottom = np.asarray(out)[10, out.size[0] // 2], np.asarray(out)[-10, out.size[0] // 2]
    assert top[0] > 150 and bottom[1] > 150  # rotated: the red left half is now on top


# -------------------------------------------------------------------------------------------- item 18
@pytest.fixture(scope="module")
def no_byte_fallback(pair, tmp_path_factory):
    """The pair with a SentencePiece vocabulary that has no byte pieces (no byte fallback) and therefore
    no newline, as some converted tokenizers are; ':' kept as a piece (the tiny corpus has none)."""
    d = tmp_path_factory.mktemp("nobytes")
    r = gguf.GGUFReader(pair[0])
    types = r.fields["tokenizer.ggml.token_type"].contents()
    byte = gguf.TokenType.BYTE

    def edit(name, value):
        if name == "tokenizer.ggml.tokens":
            return [(":" if s == "<0x3A>" else f"<unused{i}>") if t == byte else s
                    for i, (s, t) in enumerate(zip(value, types))]
        if name == "tokenizer.ggml.token_type":
            return [(gguf.TokenType.NORMAL if i == 3 + 0x3A else gguf.TokenType.UNUSED) if t == byte else t
                    for i, t in enumerate(value)]
        return value

    assert r.fields["tokenizer.ggml.tokens"].contents()[3 + 0x3A] == "<0x3A>"
    return rewrite_gguf(pair[0], d / "nb-F16.gguf", edit=edit), pair[1]


def test_a_character_the_vocabulary_cannot_encode_is_named(no_byte_fallback, image):
    img = sample_image(112, seed=1)
    with LLaVA(*no_byte_fallback) as m:
        # the template puts a newline after the image: every chat with an image fails, and says why
        with pytest.raises(LlavaGgufError) as e:
            m.generate_from_image(img, "what is it", max_tokens=2)
        assert str(e.value).startswith("the model's vocabulary cannot encode the newline (U+000A) in the prompt "
                                       "(the chat template adds it)")
        # without an image the template has no newline; the user's own character is named as theirs
        with pytest.raises(LlavaGgufError, match=r"cannot encode '€' \(U\+20AC\) in your text"):
            "".join(m.stream_messages([Message("user", "what is this €")], [], max_tokens=2))
        assert "".join(m.stream_messages([Message("user", "what is it")], [], temperature=0, max_tokens=2))
    p = run_cli("chat", str(no_byte_fallback[0]), "--mmproj", str(no_byte_fallback[1]), "--image", str(image),
                "--prompt", "what is it")
    _one_error_line(p, "cannot encode the newline (U+000A)", "byte fallback")


def test_available_memory_counts_reclaimable_page_cache_in_a_cgroup(tmp_path):
    """cgroup v2's memory.current includes the page cache (a model just read): a 24 GiB container with
    23.5 GiB 'used', 20 GiB of it inactive file pages, has ~20.5 GiB to give, not 0.5 (which refused even
    the default context of a 7B)."""
    from llava_gguf.runtime.resources import available_memory

    gib = 2**30
    (tmp_path / "meminfo").write_text(f"MemTotal: {64 * gib // 1024} kB\nMemAvailable: {60 * gib // 1024} kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.max").write_text(f"{24 * gib}\n")
    (cg / "memory.current").write_text(f"{int(23.5 * gib)}\n")
    (cg / "memory.stat").write_text(f"anon {3 * gib}\nfile {20 * gib}\ninactive_file {20 * gib}\n")
    assert available_memory(tmp_path / "meminfo", cg) == int(20.5 * gib)
    (cg / "memory.max").write_text("max\n")
    assert available_memory(tmp_path / "meminfo", cg) == 60 * gib


def test_images_read_in_many_threads_keep_the_warning_filters(tmp_path):
    """The server reads request images in a thread pool: catch_warnings (process-wide state) must not
    interleave, or a thread's restore drops another's filters and an `always` filter leaks for good."""
    import threading

    img = Image.new("RGB", (64, 48), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Camera"
    paths = []
    for k in range(8):
        p = tmp_path / f"exif{k}.jpg"
        img.save(p, exif=exif.tobytes())
        raw = bytearray(p.read_bytes())
        i = raw.index(b"Exif\0\0") + 6
        raw[i + 8:i + 10] = b"\x40\x00" if raw[i:i + 2] == b"II" else b"\x00\x40"
        p.write_bytes(bytes(raw))
        paths.append(p)
    before = list(warnings.filters)
    errors: list[BaseException] = []

    def work(p) -> None:
        try:
            for _ in range(30):
                assert load_image(p).size == (48, 64)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warnings themselves are not what is tested here
        filters = list(warnings.filters)
        threads = [threading.Thread(target=work, args=(p,)) for p in paths]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list(warnings.filters) == filters
    assert errors == [] and list(warnings.filters) == before
