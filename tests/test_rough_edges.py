"""The rough edges a new user hit (issue 27, item 3), each on real tiny models and the real CLI: imatrix's
progress, which file the demo answers with, LLaVA.load's hint naming Python arguments (the CLI's naming
its options), convert_checkpoint without gguf-py's TemplateProcessing warning, the REPL's /stats for a
one-token answer, and a prompt stopped part way recorded as such."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from support import one_line_error, run_cli
from llava_gguf import LLaVA
from llava_gguf.quantize.imatrix import load_imatrix
from llava_gguf.runtime.imatrix import compute_imatrix
from devkit.tiny import sample_image

BAR_JUNK = ("\r", "\x1b[", "━", "calibrating")


@pytest.fixture(scope="module")
def f16_pair(tiny, converted):
    return converted(tiny(), "f16")


# ------------------------------------------------------------------------------------------ imatrix
def test_imatrix_reports_each_chunk_and_image(f16_pair, tmp_path):
    """The callback the bar draws with sees 0, then one step per chunk and per image, ending at the total;
    the matrix is the one computed without progress (the tool's per-chunk perplexity changes nothing)."""
    llm, _ = f16_pair
    images = tmp_path / "imgs"
    images.mkdir()
    sample_image(112, seed=1).save(images / "a.png")
    sample_image(112, seed=2).save(images / "b.png")
    seen: list[tuple[int, int]] = []
    r = compute_imatrix(llm, tmp_path / "with.gguf", images=images, n_ctx=128, chunks=3, threads=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert r.images == 2
    assert seen == [(k, 5) for k in range(6)], seen  # monotonic, one step at a time, ends at the total
    plain = compute_imatrix(llm, tmp_path / "without.gguf", images=images, n_ctx=128, chunks=3, threads=2)
    a, b = load_imatrix(r.output), load_imatrix(plain.output)
    assert set(a.entries) == set(b.entries) and a.chunk_count == b.chunk_count
    assert all((a.entries[k] == b.entries[k]).all() for k in a.entries)


def test_imatrix_bar_on_a_terminal_only(f16_pair, tmp_path):
    """`llava-gguf imatrix` on a terminal draws the bar from that callback; off a terminal it prints its one
    result line and no bar."""
    import pexpect

    llm, _ = f16_pair
    child = pexpect.spawn(sys.executable, ["-m", "llava_gguf", "imatrix", str(llm), "-o", str(tmp_path / "tty.gguf"),
                                           "--ctx", "128", "--chunks", "3", "--threads", "2"],
                          encoding="utf-8", timeout=120, dimensions=(24, 120))
    try:
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    assert "calibrating" in child.before and "3/3" in child.before, child.before[-2000:]
    out = tmp_path / "cli.gguf"
    p = run_cli("imatrix", str(llm), "-o", str(out), "--ctx", "128", "--chunks", "2")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"imatrix -> {out} ({load_imatrix(out).entries.__len__()} tensors, 2 chunks "
                                     "of 128 tokens)"], p.stdout
    assert not any(junk in p.stdout + p.stderr for junk in BAR_JUNK), (p.stdout, p.stderr)


# --------------------------------------------------------------------------------------------- demo
def test_demo_says_which_file_answered_and_it_is_one_rule(tiny, tmp_path):
    """--image, --image --prompt and --model all answer with the Q4_K_M file, and say so in one line."""
    env = {"LLAVA_GGUF_CACHE": str(tmp_path / "cache")}
    img = tmp_path / "mine.png"
    sample_image(112, seed=3).save(img)
    runs = [("demo", "--image", str(img)),
            ("demo", "--image", str(img), "--prompt", "How many shapes are there?"),
            ("demo", "--model", str(tiny()), "--image", str(img))]
    type_lines = []
    for args in runs:
        p = run_cli(*args, env=env)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        type_lines.append(next((ln for ln in lines if ln.startswith("type:")), None))
        model = next(ln for ln in lines if ln.startswith("model:"))
        assert model.endswith("-Q4_K_M.gguf"), (args, p.stdout)
    assert type_lines == ["type:    Q4_K_M (the demo answers with the file it quantized)"] * 3, type_lines
    p = run_cli("demo", "--model", str(tiny()), "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert '"answered_by":"Q4_K_M"' in p.stdout.splitlines()[-1]


# ---------------------------------------------------------------------------------- choosing files
@pytest.fixture(scope="module")
def crowded(f16_pair, tmp_path_factory):
    """A directory with two unquantized LLMs and two mmproj files named for neither."""
    llm, mmproj = f16_pair
    d = tmp_path_factory.mktemp("crowded")
    for name in ("a-F16.gguf", "b-F16.gguf"):
        shutil.copy(llm, d / name)
    for name in ("mmproj-x-F16.gguf", "mmproj-y-F16.gguf"):
        shutil.copy(mmproj, d / name)
    return d


def test_llava_load_names_its_arguments_the_cli_its_options(crowded, image_png):
    text = one_line_error("several language models", LLaVA.load, crowded)
    assert "choose one with the llm= argument" in text and "--model" not in text, text
    text = one_line_error("several mmproj files", LLaVA.load, crowded, llm=crowded / "a-F16.gguf")
    assert "choose one with the mmproj= argument" in text and "--mmproj" not in text, text
    # the CLI passes what it was given and says its own flags
    p = run_cli("chat", str(crowded), "--image", str(image_png), "--prompt", "hi")
    assert p.returncode == 1 and "choose one with --model" in p.stderr and "llm=" not in p.stderr, p.stderr
    p = run_cli("chat", str(crowded), "--model", str(crowded / "a-F16.gguf"), "--image", str(image_png),
                "--prompt", "hi")
    assert p.returncode == 1 and "choose one with --mmproj" in p.stderr and "mmproj=" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------- convert
def test_convert_checkpoint_prints_no_template_processing_warning(tiny, tmp_path):
    """The Python API is as quiet as the CLI about gguf-py's TemplateProcessing guesses; the same
    checkpoint does make gguf-py warn when asked directly (so the test can fail), and the caller's own
    logging of that logger still works afterwards."""
    ckpt = tiny()
    code = ("import logging, sys; from pathlib import Path; import gguf\n"
            "from llava_gguf.convert import convert_checkpoint\n"
            f"convert_checkpoint(Path({str(ckpt)!r}), Path({str(tmp_path / 'out')!r}))\n"
            "print('--- direct', file=sys.stderr, flush=True)\n"
            f"gguf.SpecialVocab(Path({str(ckpt)!r}), load_merges=False)\n"
            "logging.getLogger('gguf.vocab').warning('the caller still logs')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"})
    assert p.returncode == 0, p.stderr
    converting, direct = p.stderr.split("--- direct\n")
    assert "TemplateProcessing" not in converting, converting
    assert "Unknown separator token '<s>' in TemplateProcessing<pair>" in direct, direct
    assert "the caller still logs" in direct


# ------------------------------------------------------------------------------------------- stats
def test_repl_stats_for_a_one_token_answer(f16_pair, image_png, tmp_path):
    import pexpect

    llm, _ = f16_pair
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    child = pexpect.spawn(sys.executable, ["-m", "llava_gguf", "chat", str(llm.parent), "--temp", "0",
                                           "--max-tokens", "1", "--image", str(image_png)],
                          env=env, encoding="utf-8", timeout=120)
    try:
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect_exact("no answer yet")
        child.expect_exact("> ")
        child.sendline("What is in the image?")
        child.expect_exact("> ")
        child.sendline("/stats")
        child.expect(r"first token after \d+\.\d\d s; (.*)\r\n")
        said = child.match.group(1)
        child.expect_exact("> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert said == "1 token (no generation rate: a single token has no interval to time)", said


def test_a_prompt_that_stops_part_way_is_recorded_so(f16_pair, image_png):
    """A prompt that did not get to its first token leaves stats that say so, with the time it took, not
    the previous answer's figures; an answer closed early is marked stopped; one run to its end is not."""
    from llava_gguf.cli.render import timings

    llm, mmproj = f16_pair
    with LLaVA(llm, mmproj, n_ctx=256) as m:
        assert m.generate_from_image(image_png, "What is in the image?", temperature=0, max_tokens=3)
        assert m.last.stopped_in is None and m.last.generated_tokens >= 1
        with pytest.raises(Exception, match="context holds 256"):
            m.eval_prompt("word " * 2000)
        assert m.last.stopped_in == "prompt" and m.last.prompt_seconds > 0
        assert timings(m.last).endswith("the answer was stopped before its first token")
        stream = m.stream_from_image(image_png, "Describe it.", temperature=0, max_tokens=40)
        next(stream)
        stream.close()
        assert m.last.stopped_in == "answer" and m.last.generated_tokens >= 1
        assert timings(m.last).endswith("(stopped)")
